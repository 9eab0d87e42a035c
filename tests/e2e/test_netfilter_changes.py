"""The kernel's nf_tables change notifications (``netfilter.Changes``), in a
network namespace of the test's own: an iptables write wakes a watcher at once,
and nothing wakes it while nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WATCHER = textwrap.dedent("""
    import asyncio, sys
    from shoal import netfilter

    async def main():
        changes = await netfilter.watch_changes("iptables", what="test")
        if changes is None:
            print("unavailable", flush=True)
            return
        print("ready", flush=True)
        quiet = not await netfilter_wait(changes, 0.5)
        print("quiet" if quiet else "woken-early", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print("changed" if await netfilter_wait(changes, 5) else "missed", flush=True)
        print("taken" if changes.take() and not changes.take() else "not-taken", flush=True)
        changes.close()

    async def netfilter_wait(changes, timeout):
        try:
            async with asyncio.timeout(timeout):
                await changes.changed.wait()
        except TimeoutError:
            return False
        return True

    asyncio.run(main())
""")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"shoal-test-nfchanges-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_an_iptables_write_wakes_the_watcher_and_nothing_else_does(netns: str) -> None:
    watcher = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", WATCHER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert watcher.stdout is not None and watcher.stdin is not None
        assert watcher.stdout.readline().strip() == "ready"
        assert watcher.stdout.readline().strip() == "quiet"
        made = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-w", "5", "-t",
                               "nat", "-N", "SHOAL-TEST"], check=False, capture_output=True,
                              text=True)
        assert made.returncode == 0, made.stderr
        watcher.stdin.write("go\n")
        watcher.stdin.flush()
        assert watcher.stdout.readline().strip() == "changed"
        assert watcher.stdout.readline().strip() == "taken"
        assert watcher.wait(10) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
