"""What one service-proxy sync costs as Services grow: generating the ruleset,
``iptables-restore --noflush`` of it, and the ``iptables-save`` read-back that
the drift check does every few seconds.

    flock /tmp/shoal-e2e.lock python bench/serviceproxy_bench.py [--sizes 100,1000,5000]
        [--binary iptables-legacy]

Needs root. It re-runs itself in a private network namespace (``unshare -n``),
so the rules it loads never touch this machine's own tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodeagent.serviceproxy import (  # noqa: E402
    ServicePort,
    build_ruleset,
    changes,
    existing_chains,
    our_lines,
    plan_ruleset,
)


def ports(n: int, endpoints: int) -> list[ServicePort]:
    out = []
    for i in range(n):
        ip = f"10.96.{i // 250}.{i % 250 + 2}"
        eps = tuple((f"10.244.{(i + j) % 3 + 1}.{(i * 3 + j) % 250 + 2}", 8080)
                    for j in range(endpoints))
        out.append(ServicePort(name=f"default/svc-{i}:http", cluster_ip=ip, port=80,
                               protocol="tcp", endpoints=eps))
    return out


def timed(fn: object, repeat: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(cmd: list[str], stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                          check=True).stdout


def bench(sizes: list[int], endpoints: int, binary: str) -> None:
    save, restore = [f"{binary}-save"], [f"{binary}-restore", "-w", "5", "--noflush"]
    print(f"{binary}:")
    print(f"| services x {endpoints} endpoints | rules | generate (ms) | restore, first "
          "(ms) | restore, again (ms) | one endpoint added: partial restore (ms) | "
          "save + compare (ms) |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        sp = ports(n, endpoints)
        gen, text = timed(lambda sp=sp: build_ruleset(sp))
        assert isinstance(text, str)
        rules = sum(1 for line in text.splitlines() if line.startswith("-A "))
        t0 = time.perf_counter()
        run(restore, stdin=text)
        first = time.perf_counter() - t0

        def again(sp: list[ServicePort] = sp) -> None:
            chains = existing_chains(run([*save, "-t", "nat"]))
            run(restore, stdin=build_ruleset(sp, existing_chains=chains))

        refresh, _ = timed(again)
        grown = [sp[0].__class__(name=sp[0].name, cluster_ip=sp[0].cluster_ip, port=80,
                                 protocol="tcp",
                                 endpoints=(*sp[0].endpoints, ("10.244.9.9", 8080))), *sp[1:]]
        before, after = plan_ruleset(sp), plan_ruleset(grown)

        def partial(before: object = before, after: object = after) -> None:
            for a, b in ((before, after), (after, before)):
                text = changes(a, b)  # type: ignore[arg-type]
                assert text is not None
                run(restore, stdin=text)

        step, _ = timed(partial)
        check, _ = timed(lambda: our_lines(run([*save, "-t", "nat"]))
                         + our_lines(run([*save, "-t", "filter"])))
        print(f"| {n:,} | {rules:,} | {gen * 1e3:.1f} | {first * 1e3:.0f} | "
              f"{refresh * 1e3:.0f} | {step / 2 * 1e3:.0f} | {check * 1e3:.0f} |")
        # Leave nothing for the next size: flush and delete every chain of ours.
        chains = sorted(c for c in existing_chains(run([*save, "-t", "nat"]))
                        if c.startswith("SHOAL-"))
        run(restore, stdin="\n".join(
            ["*nat", *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains),
             "COMMIT", ""]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--endpoints", type=int, default=3)
    p.add_argument("--binary", default="iptables",
                   help="iptables (nf_tables here, what the agent uses) or iptables-legacy")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (iptables in a private network namespace)", file=sys.stderr)
        return 2
    if not ns.in_netns:
        return subprocess.run(["unshare", "-n", sys.executable, __file__, "--in-netns",
                               "--sizes", ns.sizes, "--endpoints", str(ns.endpoints),
                               "--binary", ns.binary],
                              check=False).returncode
    bench([int(x) for x in ns.sizes.split(",")], ns.endpoints, ns.binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
