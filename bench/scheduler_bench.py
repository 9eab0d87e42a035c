"""Benchmark the scheduler on hollow nodes: pods/s scheduled and bound, create->bound latency.

    python bench/scheduler_bench.py [--nodes 5000] [--pods 10000] [--runs 3]
                                    [--heartbeat 10] [--profile] [--json OUT]

A command, not a test. Each run starts from nothing:

    etcd (fsync on, shoal.testing.etcd)
    shoal-apiserver serve --controllers scheduler       (its own process)
    python -m shoal.testing.hollow --nodes N            (its own process: N real
        NodeAgents on the fake CRI runtime, one shared pod watch; they register
        Nodes, renew Leases every --heartbeat s, and run the pods bound to them)
    --creators client processes create the pods (each --inflight creates in flight)
    this process watches pods with spec.nodeName set and notes when each is bound

Figures per run:
    overall   pods / (last pod bound - first create sent)
    steady    the middle 80% of pods / the time between the 10% and 90% binds
    latency   create acknowledged -> the watch shows it bound, p50 / p99
    CPU       seconds used by the apiserver (with the scheduler), etcd, hollow
              nodes and the creators during the pod phase
The medians of the runs are printed at the end. ``--profile`` samples the
apiserver with py-spy during the pod phase of the first run and prints where
its time goes.

Exit status 0; 2 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import APIServerProcess
from shoal.testing.etcd import EtcdServer

NAMESPACE = "default"


class BenchError(RuntimeError):
    pass


@dataclass
class RunResult:
    nodes: int
    pods: int
    register_s: float
    create_s: float
    overall_pods_per_s: float
    steady_pods_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    profile: str = ""


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _request_counts(metrics_port: int) -> dict[str, float]:
    """The apiserver's request and watch-event counters, by method and resource."""
    import urllib.request

    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("shoal_apiserver_request_total{",
                                "shoal_apiserver_watch_events_sent_total{")):
                key, _, value = line.rpartition(" ")
                labels = dict(kv.split("=", 1) for kv in
                              key[key.index("{") + 1:-1].replace('"', "").split(","))
                name = (f"watch-events {labels.get('resource')}"
                        if key.startswith("shoal_apiserver_watch") else
                        f"{labels.get('method')} {labels.get('resource')}")
                out[name] = out.get(name, 0.0) + float(value)
    return out


def _pct(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    i = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[i]


def make_pod(name: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NAMESPACE
    p.metadata.labels["app"] = "bench"
    c = p.spec.containers.add(name="c", image="busybox:1.36")
    c.command.extend(["sleep", "3600"])
    c.resources.requests["cpu"].value = "100m"
    c.resources.requests["memory"].value = "500Mi"
    return p


# --------------------------------------------------------------------------- creators


def _creator_main(config: str, names: list[str], inflight: int, go: Any,
                  conn: Connection) -> None:
    async def body() -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        pods = [make_pod(n) for n in names]
        async with AsyncClient.from_config(config) as client:
            await client.version()
            conn.send("ready")
            while not go.is_set():
                await asyncio.sleep(0.001)
            it = iter(pods)

            async def worker() -> None:
                for p in it:
                    sent = time.time()
                    for attempt in range(10):
                        try:
                            await client.create(p)
                        except errors.AlreadyExists:
                            pass                 # an earlier attempt got through
                        except errors.ShoalError:
                            await asyncio.sleep(0.2 * (attempt + 1))
                            continue
                        out[p.metadata.name] = (sent, time.time())
                        break

            await asyncio.gather(*(worker() for _ in range(inflight)))
        return out

    conn.send(asyncio.run(body()))
    conn.close()


# --------------------------------------------------------------------------- one run


class Cluster:
    def __init__(self, *, nodes: int, heartbeat: float, relist: float, channels: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-schedbench-"))
        self.etcd = EtcdServer()
        self.api: APIServerProcess | None = None
        self.hollow: subprocess.Popen[bytes] | None = None
        self.nodes, self.heartbeat, self.relist, self.channels = nodes, heartbeat, relist, channels

    def start(self) -> float:
        self.etcd.start()
        (self.dir / "api").mkdir(parents=True)
        self.api = APIServerProcess(
            self.dir / "api", etcd_endpoint=self.etcd.endpoint,
            extra_args=("--controllers", "scheduler", "--log-level", "warning"))
        self.api.start()
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "shoal.testing.hollow", "--config",
               str(self.api.config_path), "--nodes", str(self.nodes),
               "--heartbeat", str(self.heartbeat), "--relist", str(self.relist),
               "--channels", str(self.channels), "--root", str(self.dir / "hollow")]
        log = (self.dir / "hollow.log").open("wb")
        self.hollow = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                       stdin=subprocess.DEVNULL)
        log.close()
        assert self.hollow.stdout is not None
        line = self.hollow.stdout.readline().decode().strip()
        if not line.startswith("ready"):
            raise BenchError(f"hollow nodes did not start ({line!r}); see {self.dir}/hollow.log")
        return time.monotonic() - t0

    @property
    def pids(self) -> dict[str, int]:
        out = {"etcd": self.etcd.pid}
        if self.api is not None:
            out["apiserver"] = self.api.pid
        if self.hollow is not None:
            out["hollow"] = self.hollow.pid
        return out

    def stop_hollow(self) -> None:
        if self.hollow is not None and self.hollow.poll() is None:
            self.hollow.send_signal(signal.SIGTERM)
            try:
                self.hollow.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.hollow.kill()
                self.hollow.wait()
        self.hollow = None

    def stop(self) -> None:
        self.stop_hollow()
        if self.api is not None:
            self.api.stop()
        with contextlib.suppress(Exception):
            self.etcd.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def _watch_binds(client: AsyncClient, want: int, bound: dict[str, float],
                       done: asyncio.Event, started: asyncio.Event) -> None:
    rv = (await client.list(core_pb2.Pod, namespace=NAMESPACE, limit=1)).resource_version
    started.set()
    async for ev in client.watch(core_pb2.Pod, namespace=NAMESPACE, resource_version=rv,
                                 field_selector="spec.nodeName!="):
        if ev.object is None:
            continue
        name = ev.object.metadata.name
        if name not in bound and ev.object.spec.node_name:
            bound[name] = time.time()
            if len(bound) >= want:
                done.set()
                return


async def _nodes_seen(client: AsyncClient, want: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = await client.list_all(core_pb2.Node)
        if len(nodes.items) >= want:
            return
        await asyncio.sleep(0.5)
    raise BenchError(f"fewer than {want} nodes registered after {timeout:.0f}s")


def _profile_summary(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample counts by function from py-spy's raw (folded) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")")
                  for f in stack.split(";")[1:]]
        if frames:
            self_counts[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples", "self:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_counts.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


async def one_run(ns: argparse.Namespace, *, profile: bool) -> RunResult:
    cluster = Cluster(nodes=ns.nodes, heartbeat=ns.heartbeat, relist=ns.relist,
                      channels=ns.channels)
    spy: subprocess.Popen[bytes] | None = None
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        t_start = time.monotonic()
        register_s = cluster.start()
        assert cluster.api is not None
        config = str(cluster.api.config_path)
        async with AsyncClient.from_config(config) as client:
            await _nodes_seen(client, ns.nodes)
            if ns.agents == "off":
                cluster.stop_hollow()
            print(f"  {ns.nodes} hollow nodes registered in {register_s:.1f}s", flush=True)
            ctx = multiprocessing.get_context("spawn")
            go = ctx.Event()
            names = [f"pod-{i}" for i in range(ns.pods)]
            conns: list[Connection] = []
            for k in range(ns.creators):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_creator_main, daemon=True,
                                args=(config, names[k::ns.creators], ns.inflight, go, child))
                p.start()
                procs.append(p)
                conns.append(parent)
            for c in conns:
                if c.recv() != "ready":
                    raise BenchError("a creator failed to start")
            bound: dict[str, float] = {}
            done, started = asyncio.Event(), asyncio.Event()
            watcher = asyncio.create_task(_watch_binds(client, ns.pods, bound, done, started))
            await started.wait()
            if profile and shutil.which("py-spy"):
                raw = cluster.dir / "profile.txt"
                spy = subprocess.Popen(["py-spy", "record", "--format", "raw", "--rate", "200",
                                        "-o", str(raw), "--pid", str(cluster.api.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.sleep(1.0)      # py-spy attaches
            pids = {**cluster.pids, **{f"creator-{i}": p.pid or 0 for i, p in enumerate(procs)}}
            cpu0 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            req0 = _request_counts(cluster.api.metrics_port)
            go.set()
            t0_wall = time.time()
            loop = asyncio.get_running_loop()
            created: dict[str, tuple[float, float]] = {}
            for c in conns:
                created.update(await loop.run_in_executor(None, c.recv))
            if len(created) < ns.pods:
                raise BenchError(f"only {len(created)} of {ns.pods} pods could be created")
            create_s = max(a for _, a in created.values()) - min(s for s, _ in created.values())
            try:
                async with asyncio.timeout(ns.timeout):
                    await done.wait()
            except TimeoutError:
                raise BenchError(f"only {len(bound)} of {ns.pods} pods bound after "
                                 f"{ns.timeout:.0f}s") from None
            cpu = {k: round(_cpu_seconds(pid) - cpu0[k], 1) for k, pid in pids.items()}
            req1 = _request_counts(cluster.api.metrics_port)
            requests = {k: v - req0.get(k, 0.0) for k, v in sorted(req1.items())
                        if v - req0.get(k, 0.0) > 0}
            watcher.cancel()
            prof = ""
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                prof = _profile_summary(cluster.dir / "profile.txt")
                if ns.profile_out:
                    shutil.copy(cluster.dir / "profile.txt", ns.profile_out)
        first = min(s for s, _ in created.values())
        times = sorted(bound.values())
        n = len(times)
        t10, t90 = _pct(times, 10), _pct(times, 90)
        lat = sorted((bound[k] - a) * 1000 for k, (_, a) in created.items() if k in bound)
        del t0_wall
        return RunResult(
            nodes=ns.nodes, pods=n, register_s=round(register_s, 1), create_s=round(create_s, 2),
            overall_pods_per_s=round(n / (times[-1] - first), 1),
            steady_pods_per_s=round(0.8 * n / (t90 - t10), 1) if t90 > t10 else float("nan"),
            latency_p50_ms=round(_pct(lat, 50), 1), latency_p99_ms=round(_pct(lat, 99), 1),
            cpu_s=cpu, requests=requests, wall_s=round(time.monotonic() - t_start, 1), profile=prof)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        for p in procs:
            if p.is_alive():
                p.terminate()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=5000)
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help="hollow nodes' Lease renewal interval, seconds (kubelet: 10)")
    p.add_argument("--relist", type=float, default=10.0,
                   help="hollow nodes' runtime relist interval, seconds")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels of the hollow nodes")
    p.add_argument("--creators", type=int, default=2, help="pod-creating processes")
    p.add_argument("--inflight", type=int, default=64, help="creates in flight per creator")
    p.add_argument("--agents", choices=("on", "off"), default="on",
                   help="off: stop the hollow nodes once registered; their Nodes stay Ready "
                        "(no node lifecycle controller runs), so only the scheduler and the "
                        "apiserver work, as in kube's scheduler_perf (no kubelets)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--profile", action="store_true", help="py-spy the apiserver in run 1")
    p.add_argument("--profile-out", default="", help="keep py-spy's raw stacks here")
    p.add_argument("--json", default="", help="write the results here")
    ns = p.parse_args(argv)
    results: list[RunResult] = []
    try:
        for i in range(ns.runs):
            print(f"run {i + 1}/{ns.runs}: {ns.nodes} hollow nodes, {ns.pods} pods", flush=True)
            r = asyncio.run(one_run(ns, profile=ns.profile and i == 0))
            results.append(r)
            print(f"  overall {r.overall_pods_per_s} pods/s, steady {r.steady_pods_per_s} "
                  f"pods/s; create->bound p50 {r.latency_p50_ms} ms, p99 {r.latency_p99_ms} ms; "
                  f"creates took {r.create_s}s; CPU s {r.cpu_s}", flush=True)
            print("  apiserver requests during the pod phase: " + ", ".join(
                f"{k} {v:.0f}" for k, v in r.requests.items()), flush=True)
            if r.profile:
                print(r.profile, flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    med = {k: statistics.median(getattr(r, k) for r in results)
           for k in ("overall_pods_per_s", "steady_pods_per_s", "latency_p50_ms",
                     "latency_p99_ms", "register_s")}
    print(f"median of {len(results)} runs: overall {med['overall_pods_per_s']} pods/s, "
          f"steady {med['steady_pods_per_s']} pods/s, create->bound p50 "
          f"{med['latency_p50_ms']} ms / p99 {med['latency_p99_ms']} ms "
          f"(machine: {os.cpu_count()} cores, Python {platform.python_version()})")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"runs": [asdict(r) for r in results],
                                             "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
