#!/usr/bin/env python3
"""Lab start-up: ``shoal lab up --nodes 3`` to every node Ready, and RSS at idle (issue 4).

    sudo python bench/lab_up_bench.py [--runs 3] [--nodes 3] [--idle 10] [--json OUT]

Each run: ``shoal lab up`` as a process, timed from its start to its exit (it
exits once every Node is Ready in the API); the stage times ``up`` records in
its state file; then, after ``--idle`` seconds with nothing to do, the RSS of
every process of the lab (etcd, apiserver, registry, each node agent, each
containerd); then ``shoal lab down --purge``. Prints each run and the medians.
Leaves nothing behind: every run ends with ``down``, also on failure.
"""

from __future__ import annotations

import argparse
import json
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


def one_run(*, nodes: int, idle: float, lab_dir: Path) -> dict[str, Any]:
    start = time.monotonic()
    up = lab("up", "--nodes", str(nodes), lab_dir=lab_dir)
    wall = time.monotonic() - start
    try:
        if up.returncode != 0:
            raise SystemExit(f"lab up failed:\n{up.stdout}\n{up.stderr}")
        state = StateFile(lab_dir / "state.json").load()
        assert state is not None
        time.sleep(idle)  # idle: the measurement is what the lab holds doing nothing
        rss: dict[str, float] = {}
        for name, record in sorted(state.processes.items()):
            if name.startswith("containerd/"):
                continue
            if alive(record):
                rss[name] = rss_bytes(record.pid) / 2**20
        for node in state.nodes:
            pid = containerd_pid(lab_dir, node)
            if pid:
                rss[f"containerd/{node}"] = rss_bytes(pid) / 2**20
        return {"wall_s": wall, "stages_s": dict(state.timings), "rss_mb": rss}
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
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    runs = []
    for i in range(1, ns.runs + 1):
        r = one_run(nodes=ns.nodes, idle=ns.idle, lab_dir=ns.dir.absolute())
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
    if ns.json:
        ns.json.write_text(json.dumps({"nodes": ns.nodes, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
