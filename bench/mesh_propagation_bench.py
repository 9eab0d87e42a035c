"""Config propagation latency with 100 meshagents (issue 7): a VirtualService
change until every agent enforces it.

    python bench/mesh_propagation_bench.py [--changes 60] [--warmup-changes 1] [--hollow 97]
        [--per-process 25] [--lab-dir /tmp/shoal-prop-lab] [--json FILE]
        [--mesh-profile demo|default]

Needs root. Takes ``/tmp/shoal-e2e.lock`` itself (as ``bench/mesh_bench.py``, whose
lab and process plumbing it uses), brings up ``shoal lab up --nodes 3 --mesh
--mesh-profile demo`` (``--mesh-profile``) and takes it down (``--purge``) at the end.

Agents: the lab's 3 real meshagents, plus ``--hollow`` hollow ones
(``bench/hollow_meshagent.py``: the real ``MeshAgent``'s informers and L7
RouteTable/Clusters rebuild, no data path), ``--per-process`` per process, each
with its own apiserver connection and a node's credentials.

Namespace ``prop-bench``: ``web-v1`` (node-2) and ``web-v2`` (node-3), HTTP echo
servers (``bench/meshload.py serve --http --version vN``) behind Service ``web``
port 80 named ``http``; a DestinationRule with subsets v1 and v2; a
VirtualService ``web`` routing 100 % to one subset. A captured client pod on each
node runs ``meshload.py probe`` against the ClusterIP every ``--probe-interval``
seconds (through its node's agent's L7 engine) and prints when the answering
version changes.

Each change flips the VirtualService to the other subset (100/0 <-> 0/100) with one
update through the SDK. Its latency for an agent is from just before the update
call to: for a real agent, the first probe answer from the new version through
it (so it includes up to one probe interval and one request); for a hollow one,
its own report that its rebuilt RouteTable routes to the new subset. A change is
enforced everywhere when all agents have; the next change follows after a pause
of 200-400 ms. The first ``--warmup-changes`` are measured the same way but
printed apart and left out of the figures (the first event through every watch
and rebuild path is slower). Reported: p50/p99/max over changes of the slowest agent, and the
per-agent latencies of real and hollow agents separately.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import mesh_bench as mb  # noqa: E402

from shoal import config as configmod  # noqa: E402
from shoal.api.core.v1 import core_pb2  # noqa: E402
from shoal.api.traffic.v1 import traffic_pb2  # noqa: E402
from shoal.client import Client  # noqa: E402
from shoal.lab.topology import plan  # noqa: E402
from shoal.testing.waiting import wait_for  # noqa: E402

NS = "prop-bench"
HOST = f"web.{NS}.svc.cluster.local"
APP_PORT = 9000
HOLLOW = BENCH / "hollow_meshagent.py"
say = mb.say


def pod(name: str, node: str, labels: dict[str, str]) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels.update(labels)
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=mb.IMAGE)
    c.command.extend(["sleep", "86400"])
    return p


def service() -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = "web", NS
    s.spec.selector["app"] = "web"
    port = s.spec.ports.add(name="http", port=80)
    port.target_port.int_val = APP_PORT
    return s


def destination_rule() -> traffic_pb2.DestinationRule:
    d = traffic_pb2.DestinationRule()
    d.metadata.name, d.metadata.namespace = "web", NS
    d.spec.host = "web"
    for v in ("v1", "v2"):
        s = d.spec.subsets.add(name=v)
        s.labels["version"] = v
    return d


def set_route(vs: traffic_pb2.VirtualService, to: str) -> None:
    """100 % to subset ``to``, 0 % to the other (both destinations kept)."""
    del vs.spec.http[:]
    r = vs.spec.http.add(name="flip")
    for v in ("v1", "v2"):
        d = r.route.add(weight=100 if v == to else 0)
        d.destination.host, d.destination.subset = "web", v


def virtual_service(to: str) -> traffic_pb2.VirtualService:
    vs = traffic_pb2.VirtualService()
    vs.metadata.name, vs.metadata.namespace = "web", NS
    vs.spec.hosts.append("web")
    set_route(vs, to)
    return vs


def node_config(lab_dir: Path, node: str) -> Path:
    """The client config the lab's meshagent on ``node`` runs with (node.conf)."""
    argv = mb.cmdline(mb.meshagent_pid(lab_dir, node))
    return Path(argv[argv.index("--config") + 1])


class Lines:
    """Every line the started processes print, as (source, line, CLOCK_MONOTONIC)."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, str, float]] = queue.Queue()

    def follow(self, source: str, p: subprocess.Popen[str]) -> None:
        def pump() -> None:
            assert p.stdout is not None
            for line in p.stdout:
                self.q.put((source, line.strip(), time.monotonic()))
            self.q.put((source, "EXIT", time.monotonic()))
        threading.Thread(target=pump, daemon=True, name=f"lines-{source}").start()

    def get(self, timeout: float) -> tuple[str, str, float] | None:
        try:
            return self.q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(q / 100 * len(v) + 0.5) - 1))]


def bench(args: argparse.Namespace, started: mb.Started) -> dict[str, Any]:
    lab_dir: Path = args.lab_dir
    topo = plan(nodes=3, lab_dir=lab_dir)
    logs = lab_dir / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    lines = Lines()
    with Client(configmod.load(lab_dir / "admin.conf"), timeout=30) as client:
        ns = core_pb2.Namespace()
        ns.metadata.name = NS
        client.create(ns)
        pods = {"web-v1": ("node-2", {"app": "web", "version": "v1"}),
                "web-v2": ("node-3", {"app": "web", "version": "v2"})}
        for n in topo.nodes:
            pods[f"probe-{n.name}"] = (n.name, {"app": "probe"})
        for name, (node, labels) in pods.items():
            client.create(pod(name, node, labels))
        vip = str(client.create(service()).spec.cluster_ip)
        client.create(destination_rule())
        vs = client.create(virtual_service("v1"))

        def running(name: str) -> str | None:
            p = client.get(core_pb2.Pod, name, namespace=NS)
            return str(p.status.pod_ip) if p.status.phase == "Running" and p.status.pod_ip \
                else None

        ips = {name: wait_for(f"{name} running", partial(running, name), timeout=120)
               for name in pods}

        def endpoints() -> bool:
            ep = client.get(core_pb2.Endpoints, "web", namespace=NS)
            return sum(len(s.addresses) for s in ep.subsets) == 2

        wait_for("web has 2 endpoints", endpoints, timeout=60)
        say(f"pods: {ips}; web ClusterIP {vip}")
        for n in topo.nodes:
            ip = ips[f"probe-{n.name}"]
            wait_for(f"probe-{n.name} captured", lambda ip=ip, n=n: f"-s {ip}/32"
                     in mb.nat_rules(n.netns), timeout=60)
        for name in ("web-v1", "web-v2"):
            log = logs / f"echo-{name}.log"
            started.spawn(f"echo/{name}", mb.in_netns(mb.pod_netns(ips[name]), [
                sys.executable, str(mb.LOAD), "serve", "--http", "--port", str(APP_PORT),
                "--version", name.removeprefix("web-")]), log=log)
            wait_for(f"echo server in {name}", lambda log=log: "READY" in log.read_text(),
                     timeout=20)
        # Hollow agents, with the real nodes' credentials (round robin).
        configs = [node_config(lab_dir, n.name) for n in topo.nodes]
        hollow_procs = []
        for first in range(0, args.hollow, args.per_process):
            count = min(args.per_process, args.hollow - first)
            p = started.spawn(f"hollow/{first}", [
                sys.executable, str(HOLLOW), *[x for c in configs for x in ("--config", str(c))],
                "--count", str(count), "--first", str(first), "--host", HOST, "--port", "80"],
                log=logs / f"hollow-{first}.log", stdout=subprocess.PIPE)
            lines.follow(f"hollow/{first}", p)
            hollow_procs.append(p)
        ready = 0
        t_start = time.monotonic()
        while ready < len(hollow_procs):
            got = lines.get(300 - (time.monotonic() - t_start))
            if got is None:
                raise RuntimeError("hollow agents did not sync in 300 s")
            src, line, _ = got
            if line == "READY":
                ready += 1
            elif line == "EXIT":
                raise RuntimeError(f"{src} exited; see {logs}")
        say(f"{args.hollow} hollow agents synced in {time.monotonic() - t_start:.1f} s "
            f"({len(hollow_procs)} processes)")
        hollow_rss = {f"hollow/{i}": mb.rss_mb(p.pid) for i, p in enumerate(hollow_procs)}
        # Probes through the real agents.
        for n in topo.nodes:
            name = f"probe-{n.name}"
            p = started.spawn(name, mb.in_netns(mb.pod_netns(ips[name]), [
                sys.executable, str(mb.LOAD), "probe", "--target", f"{vip}:80",
                "--interval", str(args.probe_interval), "--host-header", HOST]),
                log=logs / f"{name}.log", stdout=subprocess.PIPE)
            lines.follow(f"real/{n.name}", p)
        # Every probe answered by v1, every hollow agent settled on v1.
        state: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while sum(1 for k, v in state.items() if k.startswith("real/") and v == "v1") < 3:
            got = lines.get(deadline - time.monotonic())
            if got is None:
                raise RuntimeError(f"probes did not all see v1: {state}")
            src, line, _ = got
            if line.startswith("SWITCH"):
                state[src] = line.split()[1]
            elif line.startswith("ERROR"):
                say(f"{src}: {line}")
        say("every probe answered by v1 through its node's agent")
        machine = mb.machine_info()
        load_before = os.getloadavg()
        rng = random.Random(7)
        changes: list[dict[str, Any]] = []
        current = "v1"
        agents_real = [f"real/{n.name}" for n in topo.nodes]
        for i in range(args.warmup_changes + args.changes):
            target = "v2" if current == "v1" else "v1"
            set_route(vs, target)
            time.sleep(rng.uniform(0.2, 0.4))
            t0 = time.monotonic()
            vs = client.update(vs)
            t_written = time.monotonic()
            rv = int(vs.metadata.resource_version)
            seen: dict[str, float] = {}
            deadline = t0 + args.timeout
            while len(seen) < 3 + args.hollow:
                got = lines.get(deadline - time.monotonic())
                if got is None:
                    break
                src, line, _ = got
                parts = line.split()
                if src.startswith("real/") and parts[:1] == ["SWITCH"]:
                    if parts[1] == target and src not in seen:
                        seen[src] = float(parts[2]) - t0
                elif parts[:1] == ["APPLIED"]:
                    agent = f"hollow/{int(parts[1])}"
                    routed = dict(x.split(":") for x in parts[3].split(","))
                    if int(parts[2]) >= rv and routed.get(target) == "100" \
                            and agent not in seen:
                        seen[agent] = float(parts[4]) - t0
                elif line == "EXIT":
                    raise RuntimeError(f"{src} exited during the changes")
                elif parts[:1] == ["ERROR"]:
                    say(f"{src}: {line}")
            missing = sorted({*agents_real, *(f"hollow/{k}" for k in range(args.hollow))}
                             - set(seen))
            worst = max(seen.values()) if not missing else float("nan")
            real = [seen[a] for a in agents_real if a in seen]
            hollow = [v for k, v in seen.items() if k.startswith("hollow/")]
            changes.append({"to": target, "rv": rv, "write_ms": (t_written - t0) * 1e3,
                            "all_ms": worst * 1e3, "missing": missing,
                            "real_ms": [x * 1e3 for x in real],
                            "hollow_ms": [x * 1e3 for x in hollow],
                            "slowest": max(seen, key=lambda k: seen[k]) if seen else ""})
            c = changes[-1]
            if i < args.warmup_changes:
                c["warmup"] = True
            say(f"{'warm-up ' if c.get('warmup') else ''}change {i + 1:3d} -> {target}: "
                f"write {c['write_ms']:.1f} ms, every agent "
                f"{c['all_ms']:.1f} ms (slowest {c['slowest']}), real "
                f"{'/'.join(f'{x:.1f}' for x in c['real_ms'])} ms, hollow max "
                f"{max(c['hollow_ms'], default=float('nan')):.1f} ms"
                + (f"; MISSING {len(missing)}: {missing[:5]}" if missing else ""))
            current = target
            if missing:
                # Let stragglers land before the next change (counted as missed).
                time.sleep(2)
                while lines.get(0.05) is not None:
                    pass
        load_after = os.getloadavg()
        hollow_rss_end = {f"hollow/{i}": mb.rss_mb(p.pid) for i, p in enumerate(hollow_procs)}
    warm = [c for c in changes if c.get("warmup")]
    changes = [c for c in changes if not c.get("warmup")]
    ok = [c for c in changes if not c["missing"]]
    alls = [c["all_ms"] for c in ok]
    real_all = [x for c in ok for x in c["real_ms"]]
    hollow_all = [x for c in ok for x in c["hollow_ms"]]
    writes = [c["write_ms"] for c in changes]
    summary = {
        "changes": len(changes), "complete": len(ok),
        "every_agent_ms": {"p50": pct(alls, 50), "p90": pct(alls, 90), "p99": pct(alls, 99),
                           "max": max(alls, default=float("nan"))},
        "real_agent_ms": {"p50": pct(real_all, 50), "p99": pct(real_all, 99),
                          "max": max(real_all, default=float("nan"))},
        "hollow_agent_ms": {"p50": pct(hollow_all, 50), "p99": pct(hollow_all, 99),
                            "max": max(hollow_all, default=float("nan"))},
        "write_ms": {"p50": pct(writes, 50), "p99": pct(writes, 99)},
        "slowest_kind": {"real": sum(1 for c in ok if c["slowest"].startswith("real/")),
                         "hollow": sum(1 for c in ok if c["slowest"].startswith("hollow/"))},
    }
    say("")
    for c in warm:
        say(f"warm-up change (not counted): every agent {c['all_ms']:.1f} ms")
    say(f"{len(ok)}/{len(changes)} changes enforced by all {3 + args.hollow} agents "
        f"(3 real + {args.hollow} hollow) within {args.timeout:.0f} s")
    e = summary["every_agent_ms"]
    say(f"every agent: p50 {e['p50']:.1f} ms, p90 {e['p90']:.1f} ms, p99 {e['p99']:.1f} ms, "
        f"max {e['max']:.1f} ms (slowest was a real agent {summary['slowest_kind']['real']} "
        f"times, a hollow one {summary['slowest_kind']['hollow']} times)")
    for kind in ("real_agent_ms", "hollow_agent_ms"):
        k = summary[kind]
        say(f"{kind}: p50 {k['p50']:.1f}, p99 {k['p99']:.1f}, max {k['max']:.1f} ms")
    say(f"the update call itself: p50 {summary['write_ms']['p50']:.1f} ms, p99 "
        f"{summary['write_ms']['p99']:.1f} ms")
    say(f"hollow processes RSS (MB) after sync: {hollow_rss}; at the end: {hollow_rss_end}")
    say(f"load average before/after the changes: {load_before} / {load_after}")
    target_met = len(ok) == len(changes) and e["p99"] < 500
    say(f"target: propagation p99 < 500 ms -> {e['p99']:.1f} ms: "
        f"{'met' if target_met else 'NOT met'}")
    return {"machine": machine, "args": {k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()},
            "summary": summary, "changes": changes, "warmup_changes": warm,
            "hollow_rss_mb": hollow_rss,
            "hollow_rss_end_mb": hollow_rss_end, "load": [load_before, load_after]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--changes", type=int, default=60)
    p.add_argument("--warmup-changes", type=int, default=1)
    p.add_argument("--hollow", type=int, default=97)
    p.add_argument("--per-process", type=int, default=25)
    p.add_argument("--probe-interval", type=float, default=0.002)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per change")
    p.add_argument("--lab-dir", type=Path, default=Path("/tmp/shoal-prop-lab"))
    p.add_argument("--json", type=Path)
    p.add_argument("--mesh-profile", choices=("default", "demo"), default="demo",
                   help="the lab's mesh telemetry (shoal lab up --mesh-profile); demo, "
                        "the lab's default, is what the recorded runs had")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (the lab, network namespaces)", file=sys.stderr)
        return 2
    if min(args.changes, args.per_process) <= 0 or min(args.hollow, args.warmup_changes) < 0 \
            or args.probe_interval <= 0 or args.timeout <= 0:
        print("--changes, --per-process, --probe-interval and --timeout must be positive",
              file=sys.stderr)
        return 2
    with mb.lab_lock() as free:
        if not free:
            print("a lab is already up on this machine (bridge shoal0 exists)",
                  file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, mb._interrupt)
        started = mb.Started()
        try:
            with mb.lab(args.lab_dir, args.mesh_profile):
                try:
                    out = bench(args, started)
                finally:
                    started.stop_all()
        except KeyboardInterrupt:
            say("interrupted; cleaned up")
            return 130
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
            say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
