"""The shared 3-node lab for the orchestration and mesh e2e tests.

``cluster`` brings one ``shoal lab up --nodes 3`` for the whole session (the
first test that asks for it starts it; the session's end takes it down with
``--purge``). Timeouts of node lifecycle are shortened so fault tests finish
quickly: a node is NotReady 8 s after its last Lease renewal and its pods are
evicted 5 s later.

Only one lab can run on a machine (bridge ``shoal0``): ``test_lab.py`` brings
its own and takes it down inside its module, so modules using ``cluster`` must
sort after it (name them ``test_orch_*.py`` / ``test_mesh_*.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal import config as configmod
from shoal.client import Client
from shoal.testing.cli import shoal_process

NODES = ("node-1", "node-2", "node-3")
IMAGE = "docker.io/library/busybox:1.36"
NODE_MONITOR_GRACE = 8
POD_EVICTION_TIMEOUT = 5
# Seconds between HorizontalPodAutoscaler evaluations (Kubernetes: 15).
HPA_SYNC = 3


def shoal_cli(*args: str, config: Path | None = None, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    return shoal_process(*args, config=config, timeout=timeout)


@dataclass
class Cluster:
    dir: Path
    config: Path
    client: Client

    def lab(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return shoal_cli("lab", *args, "--dir", str(self.dir), timeout=timeout)

    def shoal(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return shoal_cli(*args, config=self.config, timeout=timeout)

    @contextlib.contextmanager
    def paused(self, name: str) -> Iterator[int]:
        """The lab daemon ``name`` (its state-file name, e.g. ``nodeagent/node-1``)
        stopped with SIGSTOP for the block, continued after; yields its PID."""
        state = json.loads((self.dir / "state.json").read_text())
        pid = next(int(p["pid"]) for p in state["processes"].values() if p["name"] == name)
        os.kill(pid, signal.SIGSTOP)
        try:
            yield pid
        finally:
            os.kill(pid, signal.SIGCONT)


LOGS_KEPT = Path(os.environ.get("SHOAL_E2E_LOGS", "/tmp/shoal-e2e-logs"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_lab: the module brings up (and takes down) a "
                                       "lab of its own; it runs before the shared one")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a lab of their own (``own_lab``) run first: one lab per machine,
    and the shared ``cluster`` stays up from its first user to the session's end."""
    own = [item for item in items if item.get_closest_marker("own_lab") is not None]
    if not own:
        return
    rest = [item for item in items if item.get_closest_marker("own_lab") is None]
    here = Path(__file__).parent
    at = next((i for i, item in enumerate(rest) if here in item.path.parents), len(rest))
    items[:] = rest[:at] + own + rest[at:]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if subprocess.run(["ip", "link", "show", "shoal0"], capture_output=True,
                      check=False).returncode == 0:
        pytest.skip("a lab is already up on this machine (bridge shoal0 exists)")
    lab_dir = tmp_path_factory.mktemp("cluster") / "lab"
    up = shoal_cli("lab", "up", "--nodes", str(len(NODES)), "--dir", str(lab_dir),
                   f"--apiserver-arg=--node-monitor-grace-period={NODE_MONITOR_GRACE}",
                   f"--apiserver-arg=--pod-eviction-timeout={POD_EVICTION_TIMEOUT}",
                   f"--apiserver-arg=--horizontal-pod-autoscaler-sync-period={HPA_SYNC}",
                   # Opt-in: the same tests with every pod's traffic through meshagents.
                   *(["--mesh"] if os.environ.get("SHOAL_E2E_MESH") == "1" else []),
                   timeout=300)
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        config = lab_dir / "admin.conf"
        with Client(configmod.load(config), timeout=30) as client:
            yield Cluster(dir=lab_dir, config=config, client=client)
    finally:
        if request.session.testsfailed and (lab_dir / "logs").is_dir():
            # The daemons' logs outlive the purge when something failed (CI keeps
            # /tmp/shoal-e2e-logs/ as an artifact).
            kept = LOGS_KEPT / time.strftime("%Y%m%dT%H%M%S")
            shutil.copytree(lab_dir / "logs", kept, dirs_exist_ok=True)
            print(f"\nlab logs kept in {kept}", file=sys.stderr)
        if os.environ.get("SHOAL_E2E_MESH") == "1":
            _down_removes_the_mesh(lab_dir)
        shoal_cli("lab", "down", "--purge", "--dir", str(lab_dir), timeout=300)


def _down_removes_the_mesh(lab_dir: Path) -> None:
    """``lab down`` of a mesh lab: every meshagent removed its own capture rules as
    it stopped (its log says so, while its netns still existed), and nothing of
    the lab's netfilter state is left."""
    down = shoal_cli("lab", "down", "--dir", str(lab_dir), timeout=300)
    assert down.returncode == 0, f"lab down failed:\n{down.stdout}\n{down.stderr}"
    for node in NODES:
        log = (lab_dir / "logs" / f"{node}-meshagent.log").read_text()
        assert "mesh capture: rules removed" in log, f"{node}'s meshagent left its rules"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    assert "shoal-node-" not in netns, netns
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True,
                           check=True).stdout
    assert "SHOAL" not in rules, [r for r in rules.splitlines() if "SHOAL" in r]
