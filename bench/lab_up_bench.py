#!/usr/bin/env python3
"""Lab start-up: ``shoal lab up --nodes 3`` to every node Ready, and RSS at idle (issue 4).

    sudo python bench/lab_up_bench.py [--runs 3] [--nodes 3] [--idle 10] [--mesh]
        [--json OUT]

Each run: ``shoal lab up`` (``--mesh``: with meshagents) as a process, timed
from its start to its exit (it exits once every Node is Ready in the API); the
stage times ``up`` records in its state file; then, over ``--idle`` seconds with
nothing to do, how often every process of the lab (etcd, apiserver, registry,
each node agent, each containerd, each meshagent) was woken (context switches
of all its threads, from /proc/PID/task/*/schedstat) and the CPU it used, and
its RSS at the end; then ``shoal lab down --purge``. Prints each run and the
medians. Leaves nothing behind: every run ends with ``down``, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shoal.lab.state import StateFile
from shoal.lab.supervising import alive, rss_bytes

STAGES = ("network", "etcd", "registry", "apiserver", "joined", "agents", "ready")


def lab(*args: str, lab_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", "lab", *args,
                           "--dir", str(lab_dir)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def containerd_pid(lab_dir: Path, node: str) -> int:
    pidfile = lab_dir / "nodes" / node / "containerd" / "state" / "shoal-containerd.pid"
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return 0


def schedstat(pid: int) -> tuple[int, int]:
    """(CPU ns, context switches) of every thread of ``pid`` so far."""
    cpu = switches = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            run, _, slices = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        cpu, switches = cpu + int(run), switches + int(slices)
    return cpu, switches


def one_run(*, nodes: int, idle: float, lab_dir: Path, mesh: bool = False) -> dict[str, Any]:
    start = time.monotonic()
    up = lab("up", "--nodes", str(nodes), *(["--mesh"] if mesh else []), lab_dir=lab_dir)
    wall = time.monotonic() - start
    try:
        if up.returncode != 0:
            raise SystemExit(f"lab up failed:\n{up.stdout}\n{up.stderr}")
        state = StateFile(lab_dir / "state.json").load()
        assert state is not None
        pids = {name: record.pid for name, record in sorted(state.processes.items())
                if not name.startswith("containerd/") and alive(record)}
        for node in state.nodes:
            if pid := containerd_pid(lab_dir, node):
                pids[f"containerd/{node}"] = pid
        # idle: the measurement is what the lab holds and does doing nothing
        before, t0 = {n: schedstat(p) for n, p in pids.items()}, time.monotonic()
        time.sleep(idle)
        after, dt = {n: schedstat(p) for n, p in pids.items()}, time.monotonic() - t0
        rss = {n: rss_bytes(p) / 2**20 for n, p in pids.items()}
        wakeups = {n: (after[n][1] - before[n][1]) / dt for n in pids}
        cpu = {n: (after[n][0] - before[n][0]) / dt / 1e7 for n in pids}  # % of a core
        return {"wall_s": wall, "stages_s": dict(state.timings), "rss_mb": rss,
                "wakeups_per_s": wakeups, "cpu_percent": cpu}
    finally:
        down = lab("down", "--purge", lab_dir=lab_dir)
        if down.returncode != 0:
            print(f"lab down reported problems:\n{down.stdout}\n{down.stderr}",
                  file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/shoal-lab-bench"))
    ap.add_argument("--mesh", action="store_true", help="shoal lab up --mesh")
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    runs = []
    for i in range(1, ns.runs + 1):
        r = one_run(nodes=ns.nodes, idle=ns.idle, lab_dir=ns.dir.absolute(), mesh=ns.mesh)
        runs.append(r)
        stages = "  ".join(f"{s} {r['stages_s'].get(s, 0):.2f}" for s in STAGES)
        print(f"run {i}: up -> all {ns.nodes} nodes Ready in {r['wall_s']:.2f} s "
              f"(command wall time); stages since start of up: {stages}")
    print()
    print(f"median up -> Ready: {statistics.median(r['wall_s'] for r in runs):.2f} s "
          f"(command wall time), "
          f"{statistics.median(r['stages_s']['ready'] for r in runs):.2f} s (inside up)")
    for stage in STAGES:
        values = [r["stages_s"].get(stage, 0.0) for r in runs]
        print(f"  median stage {stage:10s} reached at {statistics.median(values):.2f} s")
    print("RSS at idle, median over runs (MB):")
    names = sorted({k for r in runs for k in r["rss_mb"]})
    total = 0.0
    for name in names:
        value = statistics.median(r["rss_mb"].get(name, 0.0) for r in runs)
        total += value
        print(f"  {name:22s} {value:6.1f}")
    print(f"  {'total':22s} {total:6.1f}")
    print(f"At idle over {ns.idle:.0f} s, median over runs: wakeups/s, CPU % of a core:")
    totals = [0.0, 0.0]
    for name in names:
        w = statistics.median(r["wakeups_per_s"].get(name, 0.0) for r in runs)
        c = statistics.median(r["cpu_percent"].get(name, 0.0) for r in runs)
        totals[0], totals[1] = totals[0] + w, totals[1] + c
        print(f"  {name:22s} {w:8.1f} {c:6.2f}")
    print(f"  {'total':22s} {totals[0]:8.1f} {totals[1]:6.2f}")
    if ns.json:
        ns.json.write_text(json.dumps({"nodes": ns.nodes, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
