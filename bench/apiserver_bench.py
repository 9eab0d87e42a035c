"""Benchmark one Shoal apiserver against a real etcd: latency, throughput, memory, CPU.

    python bench/apiserver_bench.py [--quick] [--json OUT] [--profile PHASE ...]

This is a command, not a test (pytest never collects it). It starts etcd
(``shoal.testing.etcd.EtcdServer``, fsync on) and ``shoal-apiserver serve`` from
the same virtualenv as a separate process, waits for ``/readyz``, then runs:

    idle         RSS and CPU of the apiserver before any client work
    open-loop    Pod creates at a fixed offered rate (300/s for 20 s) on a fixed
                 timetable, split over client processes; each latency runs from
                 the *scheduled* send time to the response, so queueing in the
                 server is not hidden by a client that waits (no coordinated
                 omission)
    closed-loop  64 creates in flight until the store holds 10,000 Pods (1,000 of
                 them in one namespace for the reads); maximum create throughput
    reads        Get, List of a 1,000-Pod namespace, label-selected Lists
    watch        1,000 watch streams (several processes, several channels each)
                 in one namespace; a writer creates/updates Pods at 10/s for 20 s
                 and every (event, watcher) delivery delay is measured from the
                 write's acknowledgement (and from its send time, which the
                 writer stamps into an annotation; same machine clock)

For every phase it records the apiserver's and etcd's CPU time (``/proc/PID/stat``),
the apiserver's RSS (``VmRSS``) and the client workers' own CPU use, so a
saturated client is visible. It prints a table, PASS/FAIL against the targets
(create p99 < 50 ms at 300/s; watch delivery p99 < 100 ms with 1,000 watchers;
apiserver RSS < 150 MB with 10,000 stored objects) and optionally writes JSON.
``--profile PHASE`` samples the apiserver with py-spy during that phase and
prints where its CPU time goes. ``--quick`` shrinks every phase (smoke test).

Processes::

    start: etcd -> apiserver init -> apiserver serve -> /readyz 200
    each phase: spawn workers -> "ready" -> "go" -> "result" -> workers exit
    stop (finally, also on Ctrl-C / SIGTERM / failure): py-spy, workers,
         apiserver (SIGTERM by PID, then SIGKILL), etcd; temp dirs removed

Exit status: 0 when every applicable target passes, 1 when one fails, 2 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from shoal import config as shoal_config
from shoal import errors
from shoal.api.core.v1.core_pb2 import (
    Container,
    ContainerPort,
    EnvVar,
    Namespace,
    Pod,
    PodSpec,
)
from shoal.api.meta.v1.meta_pb2 import ObjectMeta
from shoal.api.resources.v1 import resources_pb2
from shoal.client import SERVICE, AsyncClient
from shoal.testing.etcd import EtcdServer

MB = 1024 * 1024
SEQ_ANNOTATION = "bench.shoal.dev/seq"
SENT_ANNOTATION = "bench.shoal.dev/sent"
LIST_NAMESPACE = "bench-list"
WATCH_NAMESPACE = "bench-watch"
PHASES = ("open-loop", "closed-loop", "reads", "watch")
_PADDING = "p" * 200  # brings a Pod to about 1 KB as sent


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Every knob of a run. ``FULL`` is the real benchmark; ``QUICK`` a smoke test."""

    name: str
    open_rate: float = 300.0  # offered creates/s
    open_seconds: float = 20.0
    open_workers: int = 2
    closed_inflight: int = 64  # in total, split over closed_workers
    closed_workers: int = 2
    stored_objects: int = 10_000  # Pods stored once closed-loop is done
    spread_namespaces: int = 4
    list_pods: int = 1_000  # Pods in LIST_NAMESPACE
    gets: int = 1_000
    lists: int = 50
    selector_lists: int = 100
    watchers: int = 1_000
    watch_workers: int = 4
    watch_channels: int = 5  # per watch worker
    watch_rate: float = 10.0  # writes/s seen by every watcher
    watch_seconds: float = 20.0
    watch_drain: float = 15.0  # the longest to wait for the last deliveries
    request_timeout: float = 10.0


FULL = Plan(name="full")
QUICK = Plan(
    name="quick", open_rate=100.0, open_seconds=3.0, stored_objects=1_500, list_pods=200,
    gets=200, lists=10, selector_lists=20, watchers=100, watch_workers=2, watch_channels=2,
    watch_seconds=3.0, watch_drain=5.0)


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    limit: float
    unit: str
    applicable: bool  # were the target's conditions met by this run?
    ok: bool  # value < limit and nothing was lost or failed

    @property
    def verdict(self) -> str:
        if not self.applicable:
            return "SKIP"
        return "PASS" if self.ok else "FAIL"


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Latency:
    """Order statistics of a sample, in milliseconds."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @staticmethod
    def of(seconds: Sequence[float]) -> Latency:
        if not seconds:
            return Latency(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        s = sorted(seconds)
        return Latency(count=len(s), p50=_rank(s, 50) * 1e3, p90=_rank(s, 90) * 1e3,
                       p99=_rank(s, 99) * 1e3, max=s[-1] * 1e3, mean=sum(s) / len(s) * 1e3)


def _rank(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ordered sample."""
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# --------------------------------------------------------------------------- the objects


def make_pod(*, namespace: str, name: str, index: int) -> Pod:
    """A ~1 KB Pod with one container; labels app, tier (web|db) and shard (0-9)."""
    labels = {"app": "bench", "tier": "web" if index % 2 == 0 else "db",
              "shard": str(index % 10)}
    return Pod(
        metadata=ObjectMeta(name=name, namespace=namespace, labels=labels,
                            annotations={"bench.shoal.dev/padding": _PADDING}),
        spec=PodSpec(restart_policy="Always", containers=[Container(
            name="app", image="registry.example.com/bench/app:1.4.2",
            command=["/usr/local/bin/app"], args=["--listen=:8080", "--log-level=info"],
            ports=[ContainerPort(name="http", container_port=8080, protocol="TCP")],
            env=[EnvVar(name=f"BENCH_VAR_{j}", value=f"value-{j:02d}-" + "x" * 40)
                 for j in range(8)],
        )]))


def spread_namespace(index: int, plan: Plan) -> str:
    return f"bench-{index % plan.spread_namespaces}"


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcSample:
    rss_bytes: int
    hwm_bytes: int
    cpu_seconds: float


def proc_sample(pid: int) -> ProcSample:
    """RSS and peak RSS (``/proc/PID/status``) and user+system CPU (``/proc/PID/stat``)."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])
    return ProcSample(rss, hwm, (utime + stime) / os.sysconf("SC_CLK_TCK"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the benchmark dies (even by SIGKILL)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class BenchError(RuntimeError):
    """The benchmark could not run (a process failed to start, a worker died...)."""


class ControlPlane:
    """etcd (fsync on) plus one ``shoal-apiserver serve`` process. ``stop()`` is idempotent."""

    def __init__(self, *, workdir: Path, apiserver_bin: Path, log_level: str) -> None:
        self.workdir = workdir
        self.apiserver_bin = apiserver_bin
        self.log_level = log_level
        self.etcd = EtcdServer()
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_port = 0
        self.metrics_port = 0
        self.log_path = workdir / "apiserver.log"

    @property
    def admin_config(self) -> Path:
        return self.workdir / "admin.conf"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the apiserver is not running")
        return self.proc.pid

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, *, ready_timeout: float = 60.0) -> None:
        self.etcd.start()
        self.api_port, self.metrics_port = _free_port(), _free_port()
        subprocess.run(
            [str(self.apiserver_bin), "init", "--data-dir", str(self.workdir),
             "--server-address", f"127.0.0.1:{self.api_port}"],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(self.apiserver_bin), "serve", "--data-dir", str(self.workdir),
                 "--storage", "etcd", "--etcd-servers", self.etcd.endpoint,
                 "--listen", f"127.0.0.1:{self.api_port}",
                 "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                 "--log-level", self.log_level, "--log-format", "text"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C is ours to handle, and stop() ends it.
                start_new_session=True,
                # Runs before exec, while this process has no threads yet.
                preexec_fn=_die_with_parent)  # noqa: PLW1509
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the apiserver exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.metrics_url}/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise BenchError(f"the apiserver was not ready after {timeout:.0f}s ({last}):\n"
                         f"{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """The apiserver's Prometheus samples, keyed by ``name{labels}``."""
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5.0) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.etcd.stop()


def _metric_sum_count(samples: dict[str, float], name: str, label: str) -> tuple[float, float]:
    """Sum and count of histogram ``name`` over every series carrying ``label``."""
    total = count = 0.0
    for key, value in samples.items():
        if label not in key:
            continue
        if key.startswith(f"{name}_sum{{"):
            total += value
        elif key.startswith(f"{name}_count{{"):
            count += value
    return total, count


# --------------------------------------------------------------------------- workers
#
# A worker is a spawned process running one role. Protocol over its pipe:
#     worker -> ("ready", info)    connected, objects built / watches open
#     parent -> ("go", value)      create: the wall-clock start; watch: when to finish
#     worker -> ("result", dict)   or ("error", traceback) at any point


@dataclass(frozen=True)
class CreateJob:
    config_path: str
    items: list[tuple[int, str, str]]  # (schedule index, namespace, name)
    rate: float  # > 0: open loop, item k is sent at start + k / rate; 0: closed loop
    inflight: int  # closed loop only
    timeout: float


@dataclass(frozen=True)
class WatchJob:
    config_path: str
    namespace: str
    watchers: int
    channels: int
    establish_timeout: float
    timeout: float


async def _recv(conn: Connection, tag: str) -> Any:
    got, value = await asyncio.to_thread(conn.recv)
    if got != tag:
        raise BenchError(f"expected {tag!r} from the parent, got {got!r}")
    return value


async def _create_role(job: CreateJob, conn: Connection) -> dict[str, Any]:
    cfg = shoal_config.load(job.config_path)
    async with AsyncClient(cfg, timeout=job.timeout) as client:
        await client.version()  # connect (TLS) before the clock starts
        pods = [(k, make_pod(namespace=ns, name=name, index=k)) for k, ns, name in job.items]
        conn.send(("ready", None))
        start_wall: float = await _recv(conn, "go")
        cpu0, wall0 = time.process_time(), time.time()
        if job.rate > 0:
            result = await _open_loop(client, pods, start_wall=start_wall, rate=job.rate)
        else:
            result = await _closed_loop(client, pods, inflight=job.inflight)
        result["cpu_s"] = time.process_time() - cpu0
        result["wall_s"] = time.time() - wall0
        return result


async def _open_loop(client: AsyncClient, pods: list[tuple[int, Pod]], *, start_wall: float,
                     rate: float) -> dict[str, Any]:
    """Send item k at start + k/rate whatever is still in flight; latency from that time."""
    mono_start = time.monotonic() + (start_wall - time.time())
    latencies: list[float] = []
    lags: list[float] = []
    failures: Counter[str] = Counter()
    done_at = [start_wall]

    async def send(pod: Pod, scheduled: float) -> None:
        try:
            await client.create(pod)
        except errors.ShoalError as e:
            failures[type(e).__name__] += 1
        else:
            latencies.append(time.monotonic() - scheduled)
        done_at[0] = max(done_at[0], time.time())

    tasks: set[asyncio.Task[None]] = set()
    for k, pod in pods:
        scheduled = mono_start + k / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.monotonic() - scheduled)
        task = asyncio.create_task(send(pod, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)
    return {"latencies": latencies, "lags": lags, "failures": dict(failures),
            "start_wall": start_wall, "end_wall": done_at[0]}


async def _closed_loop(client: AsyncClient, pods: list[tuple[int, Pod]], *,
                       inflight: int) -> dict[str, Any]:
    """``inflight`` senders, each sending its next create when the last one returns."""
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    queue = iter(pods)

    async def sender() -> None:
        for _, pod in queue:
            t = time.monotonic()
            try:
                await client.create(pod)
            except errors.ShoalError as e:
                failures[type(e).__name__] += 1
            else:
                latencies.append(time.monotonic() - t)

    start = time.time()
    await asyncio.gather(*(sender() for _ in range(inflight)))
    return {"latencies": latencies, "lags": [], "failures": dict(failures),
            "start_wall": start, "end_wall": time.time()}


@dataclass
class _WatchState:
    """What one watch worker's streams share (one event loop: no locks).

    Writes are numbered (seq) in send order, but two writes in flight together may
    commit in either order; so each watcher is checked for seeing every seq exactly
    once, and for resourceVersions that only go up, not for rising seqs."""

    watchers: int
    ready: int = 0
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[set[int]] = field(default_factory=list)
    last_rv: list[int] = field(default_factory=list)
    wanted: frozenset[int] | None = None  # the acknowledged writes, once the parent says
    missing: list[int] = field(default_factory=list)  # per watcher, of wanted
    finished: int = 0
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    duplicates: int = 0
    out_of_order: int = 0  # an event whose resourceVersion is not above the last one
    unexpected: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.seen = [set() for _ in range(self.watchers)]
        self.last_rv = [0] * self.watchers

    def saw(self, watcher: int, *, seq: int, rv: int, now: float) -> None:
        if rv <= self.last_rv[watcher]:
            self.out_of_order += 1
        self.last_rv[watcher] = max(rv, self.last_rv[watcher])
        seen = self.seen[watcher]
        if seq in seen:
            self.duplicates += 1
            return
        seen.add(seq)
        self.arrivals[seq].append(now)
        if self.wanted is not None and seq in self.wanted:
            self.missing[watcher] -= 1
            if self.missing[watcher] == 0:
                self._one_finished()

    def expect(self, wanted: frozenset[int]) -> None:
        self.wanted = wanted
        self.missing = [len(wanted - seen) for seen in self.seen]
        self.finished = 0
        for missing in self.missing:
            if missing == 0:
                self._one_finished()

    def _one_finished(self) -> None:
        self.finished += 1
        if self.finished >= self.watchers:
            self.all_finished.set()


async def _watch_role(job: WatchJob, conn: Connection) -> dict[str, Any]:
    cfg = shoal_config.load(job.config_path)
    clients = [AsyncClient(cfg, timeout=job.timeout) for _ in range(job.channels)]
    state = _WatchState(watchers=job.watchers)

    async def watch(i: int, client: AsyncClient) -> None:
        ready = False
        try:
            async for ev in client.watch(Pod, namespace=job.namespace, bookmarks=True):
                now = time.time()
                if ev.type == "BOOKMARK":
                    if not ready:  # the first one comes right after registration
                        ready = True
                        state.ready += 1
                        if state.ready == job.watchers:
                            state.all_ready.set()
                    continue
                assert ev.object is not None
                seq = ev.object.metadata.annotations.get(SEQ_ANNOTATION)
                if seq is None:
                    state.unexpected += 1
                else:
                    state.saw(i, seq=int(seq), rv=int(ev.resource_version), now=now)
        except errors.ShoalError as e:
            state.failures[type(e).__name__] += 1

    started = time.monotonic()
    for c in clients:
        await c.version()  # one connection per channel, up before the watches
    tasks = [asyncio.create_task(watch(i, clients[i % job.channels]))
             for i in range(job.watchers)]
    try:
        try:
            await asyncio.wait_for(state.all_ready.wait(), timeout=job.establish_timeout)
        except TimeoutError:
            raise BenchError(f"only {state.ready} of {job.watchers} watches were open after "
                             f"{job.establish_timeout:.0f}s") from None
        cpu0, wall0 = time.process_time(), time.time()
        conn.send(("ready", {"establish_s": time.monotonic() - started}))
        go: dict[str, Any] = await _recv(conn, "go")
        state.expect(frozenset(go["acked"]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.all_finished.wait(),
                                   timeout=max(0.0, go["deadline"] - time.time()))
        return {"arrivals": dict(state.arrivals), "out_of_order": state.out_of_order,
                "duplicates": state.duplicates,
                "unexpected": state.unexpected, "failures": dict(state.failures),
                "finished": state.finished, "watchers": job.watchers,
                "cpu_s": time.process_time() - cpu0, "wall_s": time.time() - wall0}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()


_ROLES: dict[str, Callable[[Any, Connection], Coroutine[Any, Any, dict[str, Any]]]] = {
    "create": _create_role,
    "watch": _watch_role,
}


def _worker_main(role: str, job: Any, conn: Connection) -> None:
    """Entry point of a spawned worker; the parent ends it (SIGTERM) if need be."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        result = asyncio.run(_ROLES[role](job, conn))
        conn.send(("result", result))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class WorkerSet:
    """Spawned worker processes of one phase. ``close()`` ends any still running."""

    def __init__(self, role: str, jobs: Sequence[Any]) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork after grpc has threads
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        try:
            for i, job in enumerate(jobs):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(role, job, child),
                                   name=f"bench-{role}-{i}", daemon=True)
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def _recv(self, i: int, tag: str, timeout: float) -> Any:
        conn, proc = self.conns[i], self.procs[i]
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive() and not conn.poll(0):
                raise BenchError(f"worker {proc.name} exited ({proc.exitcode}) before {tag!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"worker {proc.name}: no {tag!r} after {timeout:.0f}s")
        got, value = conn.recv()
        if got == "error":
            raise BenchError(f"worker {proc.name} failed:\n{value}")
        if got != tag:
            raise BenchError(f"worker {proc.name}: expected {tag!r}, got {got!r}")
        return value

    async def gather(self, tag: str, timeout: float) -> list[Any]:
        return list(await asyncio.gather(*(
            asyncio.to_thread(self._recv, i, tag, timeout) for i in range(len(self.procs)))))

    def send_all(self, tag: str, value: Any) -> None:
        for conn in self.conns:
            conn.send((tag, value))

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


@contextlib.contextmanager
def workers(role: str, jobs: Sequence[Any]) -> Iterator[WorkerSet]:
    ws = WorkerSet(role, jobs)
    try:
        yield ws
    finally:
        ws.close()


# --------------------------------------------------------------------------- profiling


class Profiler:
    """py-spy sampling the apiserver during chosen phases; a text summary per phase."""

    def __init__(self, *, phases: Sequence[str], pid: int, outdir: Path, native: bool,
                 rate: int = 200) -> None:
        self.phases = set(phases)
        self.native = native
        self.pid = pid
        self.outdir = outdir
        self.rate = rate
        self.binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc: subprocess.Popen[bytes] | None = None
        self.current = ""
        self.summaries: dict[str, str] = {}

    def begin(self, phase: str) -> None:
        if phase not in self.phases:
            return
        if not Path(self.binary).exists():
            raise BenchError("--profile needs py-spy: pip install py-spy")
        self.current = phase
        # --native (C frames: grpc, protobuf) must pause the process to sample it.
        mode = ["--native"] if self.native else ["--nonblocking"]
        self.proc = subprocess.Popen(
            [self.binary, "record", "--pid", str(self.pid), "--rate", str(self.rate),
             "--format", "raw", "--threads", *mode, "--output", str(self._raw(phase))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _raw(self, phase: str) -> Path:
        return self.outdir / f"apiserver-{phase}.folded"

    def end(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raw = self._raw(self.current)
        if raw.exists():
            self.summaries[self.current] = summarize_profile(raw.read_text())
        else:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            self.summaries[self.current] = f"(py-spy wrote nothing: {err.strip()})"


def summarize_profile(folded: str, *, top: int = 15) -> str:
    """A text summary of py-spy's folded stacks (``thread;frame;...;frame count``):
    time by thread, by innermost Shoal function (apiserver/ or shoal/, with what it
    calls), self time by function and by area, and inclusive time by function."""
    threads: Counter[str] = Counter()
    shoal: Counter[str] = Counter()
    own: Counter[str] = Counter()
    area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = waiting = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        thread = ""
        if frames and frames[0].startswith("thread ("):
            thread = frames[0].partition("): ")[2] or frames[0]
            frames = frames[1:]
        if not frames:
            continue
        names = [_short(f) for f in frames]
        if names[-1].partition(" (")[0] in _WAITS:  # blocked in the kernel, not on CPU
            waiting += n
            continue
        total += n
        threads[thread or "(unnamed)"] += n
        own[names[-1]] += n
        area[_area(names[-1])] += n
        ours = [x for x in names if _path(x).startswith(("apiserver/", "shoal/"))
                and _path(x) != "apiserver/main.py"]
        shoal[ours[-1] if ours else f"(no Shoal frame; leaf in {_area(names[-1])})"] += n
        for name in set(names):
            inclusive[name] += n
    if not total:
        return "  (no samples)"

    def block(title: str, counts: Counter[str]) -> list[str]:
        rows = [f"  {title}"]
        rows += [f"    {c / total:6.1%}  {name}" for name, c in counts.most_common(top)]
        return rows

    lines = [f"  {total} samples of apiserver threads on CPU ({waiting} more blocked in "
             "epoll/futex left out)"]
    lines += block("by thread", threads)
    lines += block("by innermost Shoal function (including what it calls)", shoal)
    lines += block("self time, by function", own)
    lines += block("self time, by area", area)
    lines += block("inclusive time, by function", inclusive)
    return "\n".join(lines)


_WAITS = frozenset({"epoll_wait", "EpollSelector.select", "poll", "select",
                    "pthread_cond_wait", "pthread_cond_timedwait",
                    "__futex_abstimed_wait_common", "futex_wait", "nanosleep", "clock_nanosleep"})


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/pkg/mod.py:12)`` -> ``fn (pkg/mod.py)``; a native
    frame without a symbol (``0x7f.. (lib.so)``) -> ``[native] (lib.so)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if name.startswith("0x"):
        name = "[native]"
        path = path.rsplit("/", 1)[-1].split(".cpython")[0]
    return f"{name} ({path})" if path else name


def _path(short: str) -> str:
    return short.partition(" (")[2].rstrip(")")


def _area(short: str) -> str:
    """The module of a Shoal frame, else the top-level package or library."""
    path = _path(short)
    if not path:
        return short
    if path.startswith(("apiserver/", "shoal/")):
        return path
    if short.startswith("[native]"):
        return f"native {path}"
    return path.split("/", 1)[0]


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseUsage:
    """Resource use while one phase ran."""

    phase: str
    wall_s: float
    apiserver_cpu_s: float
    etcd_cpu_s: float
    apiserver_rss_mb: float  # at the end of the phase
    client_cpu_max_pct: float | None = None  # the busiest client worker, % of one core
    server_create_mean_ms: float | None = None  # the apiserver's own Create latency
    storage_ms: dict[str, float] = field(default_factory=dict)  # mean per storage op

    @property
    def apiserver_cpu_pct(self) -> float:
        return 100 * self.apiserver_cpu_s / self.wall_s if self.wall_s else math.nan


class Meter:
    """Samples the apiserver and etcd around phases."""

    def __init__(self, cp: ControlPlane, profiler: Profiler | None) -> None:
        self.cp = cp
        self.profiler = profiler
        self.usage: list[PhaseUsage] = []
        self._phase = ""
        self._t0 = 0.0
        self._api0 = self._etcd0 = ProcSample(0, 0, 0.0)
        self._metrics0: dict[str, float] = {}

    def begin(self, phase: str) -> None:
        self._phase = phase
        self._metrics0 = self.cp.metrics()
        self._api0, self._etcd0 = proc_sample(self.cp.pid), proc_sample(self.cp.etcd.pid)
        self._t0 = time.monotonic()
        if self.profiler is not None:
            self.profiler.begin(phase)

    def end(self, *, client_cpu_pct: float | None = None) -> PhaseUsage:
        wall = time.monotonic() - self._t0
        api, etcd = proc_sample(self.cp.pid), proc_sample(self.cp.etcd.pid)
        if self.profiler is not None:
            self.profiler.end()
        m1 = self.cp.metrics()
        usage = PhaseUsage(
            phase=self._phase, wall_s=wall,
            apiserver_cpu_s=api.cpu_seconds - self._api0.cpu_seconds,
            etcd_cpu_s=etcd.cpu_seconds - self._etcd0.cpu_seconds,
            apiserver_rss_mb=api.rss_bytes / MB, client_cpu_max_pct=client_cpu_pct)
        mean = self._mean_delta(m1, "shoal_apiserver_request_duration_seconds",
                                'method="Create"')
        usage.server_create_mean_ms = mean
        for op in ("get", "create", "update", "range", "current_revision"):
            op_mean = self._mean_delta(m1, "shoal_storage_request_duration_seconds",
                                       f'operation="{op}"')
            if op_mean is not None:
                usage.storage_ms[op] = op_mean
        self.usage.append(usage)
        return usage

    def snapshot(self, name: str) -> None:
        """A row with the apiserver's RSS now, and no interval."""
        rss = proc_sample(self.cp.pid).rss_bytes / MB
        self.usage.append(PhaseUsage(phase=name, wall_s=0.0, apiserver_cpu_s=0.0,
                                     etcd_cpu_s=0.0, apiserver_rss_mb=rss))

    def _mean_delta(self, m1: dict[str, float], name: str, label: str) -> float | None:
        s1, c1 = _metric_sum_count(m1, name, label)
        s0, c0 = _metric_sum_count(self._metrics0, name, label)
        return (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else None


@dataclass
class CreateResult:
    mode: str
    offered_rate: float | None
    inflight: int | None
    sent: int
    ok: int
    failures: dict[str, int]
    achieved_rate: float
    latency: Latency
    send_lag: Latency | None  # open loop: how late the client sent vs. the timetable
    client_cpu_pct: list[float]


def _merge_create(mode: str, results: list[dict[str, Any]], *, offered: float | None,
                  inflight: int | None) -> CreateResult:
    latencies = [x for r in results for x in r["latencies"]]
    lags = [x for r in results for x in r["lags"]]
    failures: Counter[str] = Counter()
    for r in results:
        failures.update(r["failures"])
    start = min(r["start_wall"] for r in results)
    end = max(r["end_wall"] for r in results)
    ok = len(latencies)
    return CreateResult(
        mode=mode, offered_rate=offered, inflight=inflight, sent=ok + sum(failures.values()),
        ok=ok, failures=dict(failures), achieved_rate=ok / (end - start) if end > start else 0,
        latency=Latency.of(latencies), send_lag=Latency.of(lags) if lags else None,
        client_cpu_pct=[100 * r["cpu_s"] / r["wall_s"] for r in results])


async def run_creates(*, cp: ControlPlane, plan: Plan, meter: Meter, phase: str,
                      items: list[tuple[int, str, str]], nworkers: int, rate: float,
                      inflight: int) -> CreateResult:
    """Creates ``items`` from ``nworkers`` processes: open loop at ``rate``, else closed.
    The phase is metered from "go" (workers connected, Pods built) to the last answer."""
    shares = [items[i::nworkers] for i in range(nworkers)]
    per_worker = max(1, inflight // nworkers)
    jobs = [CreateJob(config_path=str(cp.admin_config), items=share, rate=rate,
                      inflight=per_worker, timeout=plan.request_timeout) for share in shares]
    with workers("create", jobs) as ws:
        await ws.gather("ready", timeout=120)
        meter.begin(phase)
        ws.send_all("go", time.time() + 0.2)
        budget = len(items) / rate if rate else len(items) / 20
        results = await ws.gather("result", timeout=budget + 4 * plan.request_timeout + 60)
    result = _merge_create(phase, results, offered=rate or None,
                           inflight=None if rate else per_worker * nworkers)
    meter.end(client_cpu_pct=max(result.client_cpu_pct))
    return result


@dataclass
class ReadResults:
    get: Latency
    list_all: Latency
    list_all_items: int
    list_all_wire: Latency  # the same List, response left undecoded by the client
    list_eq: Latency
    list_eq_items: int
    list_set: Latency
    list_set_items: int
    failures: dict[str, int]


async def run_reads(client: AsyncClient, plan: Plan) -> ReadResults:
    """One request at a time: latency, not throughput."""
    rng = random.Random(7)
    failures: Counter[str] = Counter()
    names = [f"l-{i}" for i in range(plan.list_pods)]

    async def timed(n: int, call: Callable[[], Awaitable[Any]], warmup: int = 5
                    ) -> tuple[list[float], Any]:
        out: list[float] = []
        last: Any = None
        for i in range(n + warmup):
            t = time.monotonic()
            try:
                last = await call()
            except errors.ShoalError as e:
                failures[type(e).__name__] += 1
                continue
            if i >= warmup:
                out.append(time.monotonic() - t)
        return out, last

    gets, _ = await timed(plan.gets, lambda: client.get(
        Pod, rng.choice(names), namespace=LIST_NAMESPACE))
    full, full_last = await timed(plan.lists, lambda: client.list(
        Pod, namespace=LIST_NAMESPACE))
    wire_rpc = client.channel.unary_unary(
        f"/{SERVICE}/List", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=None)
    wire_req = resources_pb2.ListRequest(resource="pods", namespace=LIST_NAMESPACE)
    wire, _ = await timed(plan.lists, lambda: wire_rpc(wire_req, timeout=plan.request_timeout))
    eq, eq_last = await timed(plan.selector_lists, lambda: client.list(
        Pod, namespace=LIST_NAMESPACE, label_selector="shard=3"))
    sel, sel_last = await timed(plan.selector_lists, lambda: client.list(
        Pod, namespace=LIST_NAMESPACE, label_selector="tier=web,shard in (2,4)"))
    return ReadResults(
        get=Latency.of(gets), list_all=Latency.of(full),
        list_all_items=len(full_last.items) if full_last else 0,
        list_all_wire=Latency.of(wire), list_eq=Latency.of(eq),
        list_eq_items=len(eq_last.items) if eq_last else 0, list_set=Latency.of(sel),
        list_set_items=len(sel_last.items) if sel_last else 0, failures=dict(failures))


@dataclass
class WriteLog:
    sent: dict[int, float] = field(default_factory=dict)  # seq -> wall time before the call
    acked: dict[int, float] = field(default_factory=dict)  # seq -> wall time of the answer
    failures: Counter[str] = field(default_factory=Counter)


async def write_events(client: AsyncClient, *, namespace: str, rate: float, count: int
                       ) -> WriteLog:
    """Event ``seq`` at start + seq/rate: even seqs create Pod w-N, odd ones update it.
    Each write carries its seq and send time in annotations."""
    log = WriteLog()
    loop = asyncio.get_running_loop()
    created: dict[int, asyncio.Future[Pod]] = {}

    async def write(seq: int) -> None:
        pair = seq // 2
        try:
            if seq % 2 == 0:
                pod = make_pod(namespace=namespace, name=f"w-{pair}", index=pair)
                _stamp(pod, seq, log)
                try:
                    obj = await client.create(pod)
                except BaseException as e:
                    created[pair].set_exception(e)
                    raise
                created[pair].set_result(obj)
            else:
                base = await created[pair]
                pod = Pod()
                pod.CopyFrom(base)
                _stamp(pod, seq, log)
                await client.update(pod)
            log.acked[seq] = time.time()
        except errors.ShoalError as e:
            log.failures[type(e).__name__] += 1

    start = time.monotonic() + 0.05
    tasks = []
    for seq in range(count):
        if seq % 2 == 0:
            created[seq // 2] = loop.create_future()
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(write(seq)))
    await asyncio.gather(*tasks)
    for fut in created.values():
        if fut.done() and not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" warnings
    return log


def _stamp(pod: Pod, seq: int, log: WriteLog) -> None:
    now = time.time()
    pod.metadata.annotations[SEQ_ANNOTATION] = str(seq)
    pod.metadata.annotations[SENT_ANNOTATION] = f"{now:.6f}"
    log.sent[seq] = now


@dataclass
class WatchResult:
    watchers: int
    events_written: int
    expected: int
    delivered: int
    from_ack: Latency
    from_send: Latency
    fanout_spread: Latency  # per event: last watcher's arrival minus the first's
    establish_s: float
    out_of_order: int
    duplicates: int
    unexpected: int
    write_failures: dict[str, int]
    watch_failures: dict[str, int]
    client_cpu_pct: list[float]


async def run_watch(*, cp: ControlPlane, plan: Plan, client: AsyncClient, meter: Meter
                    ) -> WatchResult:
    per = [plan.watchers // plan.watch_workers + (1 if i < plan.watchers % plan.watch_workers
                                                  else 0) for i in range(plan.watch_workers)]
    jobs = [WatchJob(config_path=str(cp.admin_config), namespace=WATCH_NAMESPACE, watchers=n,
                     channels=plan.watch_channels, establish_timeout=120,
                     timeout=plan.request_timeout) for n in per if n]
    count = max(2, round(plan.watch_rate * plan.watch_seconds))
    with workers("watch", jobs) as ws:
        ready = await ws.gather("ready", timeout=300)
        meter.snapshot(f"{plan.watchers} watches open")
        meter.begin("watch")
        log = await write_events(client, namespace=WATCH_NAMESPACE, rate=plan.watch_rate,
                                 count=count)
        ws.send_all("go", {"acked": sorted(log.acked),
                           "deadline": time.time() + plan.watch_drain})
        results = await ws.gather("result", timeout=plan.watch_drain + 60)
    cpu = [100 * r["cpu_s"] / r["wall_s"] for r in results]
    meter.end(client_cpu_pct=max(cpu))
    from_ack: list[float] = []
    from_send: list[float] = []
    by_seq: defaultdict[int, list[float]] = defaultdict(list)
    for r in results:
        for seq, times in r["arrivals"].items():
            by_seq[seq].extend(times)
    spread: list[float] = []
    for seq, times in by_seq.items():
        if seq not in log.acked:
            continue
        from_ack.extend(t - log.acked[seq] for t in times)
        from_send.extend(t - log.sent[seq] for t in times)
        spread.append(max(times) - min(times))
    watch_failures: Counter[str] = Counter()
    for r in results:
        watch_failures.update(r["failures"])
    return WatchResult(
        watchers=sum(r["watchers"] for r in results), events_written=len(log.acked),
        expected=len(log.acked) * sum(r["watchers"] for r in results),
        delivered=len(from_ack), from_ack=Latency.of(from_ack),
        from_send=Latency.of(from_send), fanout_spread=Latency.of(spread),
        establish_s=max(x["establish_s"] for x in ready),
        out_of_order=sum(r["out_of_order"] for r in results),
        duplicates=sum(r["duplicates"] for r in results),
        unexpected=sum(r["unexpected"] for r in results),
        write_failures=dict(log.failures), watch_failures=dict(watch_failures),
        client_cpu_pct=cpu)


async def wait_cached(cp: ControlPlane, pods: int, timeout: float = 60.0) -> None:
    """Until the apiserver's watch cache holds ``pods`` Pods (its own gauge)."""
    deadline = time.monotonic() + timeout
    key = 'shoal_watch_cache_objects{resource="pods"}'
    while cp.metrics().get(key, 0) < pods:
        if time.monotonic() > deadline:
            raise BenchError(f"the watch cache did not reach {pods} pods in {timeout:.0f}s")
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    plan: Plan
    machine: dict[str, Any]
    pod_bytes: int  # one stored Pod, serialized
    stored_pods: int
    idle_rss_mb: float
    rss_at_stored_mb: float
    peak_rss_mb: float
    open_loop: CreateResult | None = None
    closed_loop: CreateResult | None = None
    reads: ReadResults | None = None
    watch: WatchResult | None = None
    usage: list[PhaseUsage] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)


def _machine() -> dict[str, Any]:
    try:
        etcd = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                              check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        etcd = "unknown"
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "python": platform.python_version(), "etcd": etcd, "etcd_fsync": True}


async def run(plan: Plan, cp: ControlPlane, *, profile: Sequence[str], profile_native: bool,
              outdir: Path) -> Report:
    profiler = (Profiler(phases=profile, pid=cp.pid, outdir=outdir, native=profile_native)
                if profile else None)
    meter = Meter(cp, profiler)
    report = Report(plan=plan, machine=_machine(), pod_bytes=0, stored_pods=0,
                    idle_rss_mb=0.0, rss_at_stored_mb=0.0, peak_rss_mb=0.0)
    async with AsyncClient(shoal_config.load(cp.admin_config),
                           timeout=plan.request_timeout) as client:
        _say("idle")
        meter.begin("idle")
        await asyncio.sleep(2.0)  # a fixed window to measure idle CPU over
        report.idle_rss_mb = meter.end().apiserver_rss_mb

        namespaces = [f"bench-{i}" for i in range(plan.spread_namespaces)]
        for ns in (*namespaces, LIST_NAMESPACE, WATCH_NAMESPACE):
            await client.create(Namespace(metadata=ObjectMeta(name=ns)))
        warm = [await client.create(make_pod(namespace=namespaces[0], name=f"warm-{i}",
                                             index=i)) for i in range(20)]
        report.pod_bytes = warm[-1].ByteSize()
        stored = len(warm)

        n_open = round(plan.open_rate * plan.open_seconds)
        _say(f"open-loop: {n_open} creates at {plan.open_rate:.0f}/s "
             f"from {plan.open_workers} processes")
        items = [(k, spread_namespace(k, plan), f"o-{k}") for k in range(n_open)]
        report.open_loop = await run_creates(
            cp=cp, plan=plan, meter=meter, phase="open-loop", items=items,
            nworkers=plan.open_workers, rate=plan.open_rate, inflight=0)
        stored += report.open_loop.ok

        n_closed = max(plan.list_pods, plan.stored_objects - stored)
        _say(f"closed-loop: {n_closed} creates, {plan.closed_inflight} in flight")
        items = [(k, LIST_NAMESPACE, f"l-{k}") if k < plan.list_pods
                 else (k, spread_namespace(k, plan), f"c-{k}") for k in range(n_closed)]
        report.closed_loop = await run_creates(
            cp=cp, plan=plan, meter=meter, phase="closed-loop", items=items,
            nworkers=plan.closed_workers, rate=0, inflight=plan.closed_inflight)
        stored += report.closed_loop.ok
        report.stored_pods = stored
        await wait_cached(cp, stored)
        meter.begin(f"{stored} pods stored")
        await asyncio.sleep(2.0)
        report.rss_at_stored_mb = meter.end().apiserver_rss_mb

        _say("reads: get, list, label-selected list")
        meter.begin("reads")
        report.reads = await run_reads(client, plan)
        meter.end()

        _say(f"watch: {plan.watchers} watchers, {plan.watch_rate:.0f} writes/s "
             f"for {plan.watch_seconds:.0f}s")
        report.watch = await run_watch(cp=cp, plan=plan, client=client, meter=meter)
    report.peak_rss_mb = proc_sample(cp.pid).hwm_bytes / MB
    report.usage = meter.usage
    report.targets = targets(plan, report)
    report.profiles = profiler.summaries if profiler else {}
    return report


def targets(plan: Plan, r: Report) -> list[Target]:
    out = []
    if r.open_loop is not None:
        ol = r.open_loop
        out.append(Target(
            name=f"create p99 < 50 ms at {plan.open_rate:.0f} creates/s", value=ol.latency.p99,
            limit=50.0, unit="ms", applicable=plan.open_rate >= 300,
            ok=ol.latency.p99 < 50 and not ol.failures
            and ol.achieved_rate >= 0.95 * plan.open_rate))
    if r.watch is not None:
        w = r.watch
        out.append(Target(
            name=f"watch delivery p99 < 100 ms with {w.watchers} watchers",
            value=w.from_ack.p99, limit=100.0, unit="ms", applicable=w.watchers >= 1000,
            ok=w.from_ack.p99 < 100 and w.delivered == w.expected and w.expected > 0
            and not w.duplicates and not w.out_of_order))
    out.append(Target(
        name=f"apiserver RSS < 150 MB with {r.stored_pods} stored objects",
        value=r.rss_at_stored_mb, limit=150.0, unit="MB", applicable=r.stored_pods >= 10_000,
        ok=r.rss_at_stored_mb < 150))
    return out


# --------------------------------------------------------------------------- output


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _lat_row(name: str, n: str, ok: str, rate: str, lat: Latency) -> str:
    return (f"  {name:<34} {n:>6} {ok:>6} {rate:>8}  {_ms(lat.p50):>7} {_ms(lat.p90):>7} "
            f"{_ms(lat.p99):>7} {_ms(lat.max):>7}")


def render(r: Report) -> str:
    p = r.plan
    m = r.machine
    out = [
        f"Shoal apiserver benchmark ({p.name}): {m['etcd']} (fsync on), Python {m['python']}, "
        f"{m['cpus']} CPUs, load at start {m['loadavg_at_start'][0]:.2f}",
        f"  Pod as stored: {r.pod_bytes} bytes; Pods stored after closed-loop: {r.stored_pods}",
        "",
        f"  {'latency (ms)':<34} {'sent':>6} {'ok':>6} {'rate/s':>8}  {'p50':>7} {'p90':>7} "
        f"{'p99':>7} {'max':>7}",
    ]
    for c in (r.open_loop, r.closed_loop):
        if c is None:
            continue
        label = (f"create open-loop @{c.offered_rate:.0f}/s" if c.offered_rate
                 else f"create closed-loop {c.inflight} in flight")
        out.append(_lat_row(label, str(c.sent), str(c.ok), f"{c.achieved_rate:.0f}",
                            c.latency))
        if c.failures:
            out.append(f"    failures: {c.failures}")
        if c.send_lag is not None:
            out.append(f"    client send lag vs. timetable: p99 {_ms(c.send_lag.p99)} ms, "
                       f"max {_ms(c.send_lag.max)} ms")
        out.append("    client CPU per worker: "
                   + ", ".join(f"{x:.0f}%" for x in c.client_cpu_pct) + " of one core")
    if r.reads is not None:
        rd = r.reads
        for name, lat in (
            ("get", rd.get),
            (f"list namespace ({rd.list_all_items} pods)", rd.list_all),
            ("  same, response not decoded", rd.list_all_wire),
            (f"list shard=3 ({rd.list_eq_items} pods)", rd.list_eq),
            (f"list tier=web,shard in (2,4) ({rd.list_set_items})", rd.list_set),
        ):
            out.append(_lat_row(name, str(lat.count), "", "", lat))
        if rd.failures:
            out.append(f"    failures: {rd.failures}")
    if r.watch is not None:
        w = r.watch
        out.append(_lat_row("watch delivery, from write ack", str(w.expected),
                            str(w.delivered), "", w.from_ack))
        out.append(_lat_row("watch delivery, from write send", "", "", "", w.from_send))
        out.append(_lat_row("fan-out spread per event", str(w.fanout_spread.count), "", "",
                            w.fanout_spread))
        pct = 100 * w.delivered / w.expected if w.expected else 0.0
        out.append(f"    {w.watchers} watchers x {w.events_written} writes: delivered "
                   f"{w.delivered}/{w.expected} ({pct:.2f}%), duplicates {w.duplicates}, "
                   f"resourceVersion out of order {w.out_of_order}")
        out.append(f"    all watches open after {w.establish_s:.1f}s; client CPU per worker: "
                   + ", ".join(f"{x:.0f}%" for x in w.client_cpu_pct) + " of one core")
        if w.write_failures or w.watch_failures:
            out.append(f"    failures: writes {w.write_failures}, watches {w.watch_failures}")
    out += [
        "",
        f"  {'resources by phase':<26} {'wall s':>7} {'api CPU s':>9} {'api %core':>9} "
        f"{'etcd CPU s':>10} {'api RSS MB':>10} {'client %':>8} {'srv create':>10} "
        f"{'etcd ms (mean/op)':<24}",
    ]
    for u in r.usage:
        if not u.wall_s:
            out.append(f"  {u.phase:<26} {'-':>7} {'-':>9} {'-':>9} {'-':>10} "
                       f"{u.apiserver_rss_mb:>10.1f}")
            continue
        storage = " ".join(f"{k}={v:.1f}" for k, v in u.storage_ms.items()
                           if k in ("get", "create", "update", "current_revision"))
        out.append(
            f"  {u.phase:<26} {u.wall_s:>7.1f} {u.apiserver_cpu_s:>9.1f} "
            f"{u.apiserver_cpu_pct:>8.0f}% {u.etcd_cpu_s:>10.1f} "
            f"{u.apiserver_rss_mb:>10.1f} "
            f"{'-' if u.client_cpu_max_pct is None else f'{u.client_cpu_max_pct:.0f}%':>8} "
            f"{'-' if u.server_create_mean_ms is None else f'{u.server_create_mean_ms:.1f}':>10} "
            f"{storage:<24}")
    out.append(f"  apiserver RSS: idle {r.idle_rss_mb:.1f} MB, with {r.stored_pods} pods "
               f"{r.rss_at_stored_mb:.1f} MB, peak {r.peak_rss_mb:.1f} MB")
    out += ["", "  targets"]
    for t in r.targets:
        value = "-" if t.value is None else f"{t.value:.1f} {t.unit}"
        out.append(f"    {t.verdict:<5} {t.name:<56} {value}")
    for phase, text in r.profiles.items():
        out += ["", f"  apiserver profile during {phase} (py-spy, --nonblocking)", text]
    return "\n".join(out)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Target):
            d["verdict"] = obj.verdict
        return d
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short phases: a smoke test")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--rate", type=float, help="open-loop creates/s (default 300)")
    p.add_argument("--duration", type=float, help="open-loop seconds (default 20)")
    p.add_argument("--objects", type=int, help="Pods stored after closed-loop (default 10000)")
    p.add_argument("--watchers", type=int, help="watch streams (default 1000)")
    p.add_argument("--watch-rate", type=float, help="watch-phase writes/s (default 10)")
    p.add_argument("--watch-seconds", type=float, help="watch-phase seconds (default 20)")
    p.add_argument("--profile", action="append", default=[], choices=PHASES,
                   help="sample the apiserver with py-spy during this phase (repeatable)")
    p.add_argument("--profile-native", action="store_true",
                   help="include C frames (grpc, protobuf); pauses the apiserver per sample")
    p.add_argument("--apiserver-log-level", default="info")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (apiserver log, PKI, profiles)")
    return p


def _plan(ns: argparse.Namespace) -> Plan:
    plan = QUICK if ns.quick else FULL
    overrides = {"open_rate": ns.rate, "open_seconds": ns.duration,
                 "stored_objects": ns.objects, "watchers": ns.watchers,
                 "watch_rate": ns.watch_rate, "watch_seconds": ns.watch_seconds}
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM: unwind from wherever the main thread is, through every
    ``finally`` (asyncio.run would only cancel its main task on SIGINT)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    plan = _plan(ns)
    apiserver_bin = Path(sys.executable).parent / "shoal-apiserver"
    if not apiserver_bin.exists():
        print(f"no {apiserver_bin}: install Shoal in this virtualenv", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    cp = ControlPlane(workdir=workdir, apiserver_bin=apiserver_bin,
                      log_level=ns.apiserver_log_level)
    try:
        _say(f"starting etcd and the apiserver (work dir {workdir})")
        cp.start()
        _say(f"apiserver pid {cp.pid}, etcd pid {cp.etcd.pid}")
        report = asyncio.run(run(plan, cp, profile=ns.profile,
                                 profile_native=ns.profile_native, outdir=workdir))
    except KeyboardInterrupt:
        _say("interrupted; stopping everything")
        return 130
    except (BenchError, errors.ShoalError, subprocess.CalledProcessError, OSError) as e:
        print(f"benchmark failed: {type(e).__name__}: {e}", file=sys.stderr)
        if cp.proc is not None:
            code = cp.proc.poll()
            state = "running" if code is None else f"exited with {code}"
            print(f"apiserver ({state}) log, last lines:\n{cp.log_tail()}", file=sys.stderr)
        return 2
    finally:
        cp.stop()
        if ns.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(report))
    if ns.json:
        ns.json.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        _say(f"wrote {ns.json}")
    return 1 if any(t.verdict == "FAIL" for t in report.targets) else 0


if __name__ == "__main__":
    sys.exit(main())
