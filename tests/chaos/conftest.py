"""The chaos suite's one lab (issue 10): real faults on a real lab, an invariant
checked after each.

``chaos_lab`` brings up ``shoal lab up --nodes 2 --control-planes 3 --mesh`` once
for the session (3 etcd members, 3 apiservers, 2 nodes with capturing
meshagents) and takes it down with ``--purge`` at the end. Every test leaves
the lab as it found it (the supervisor restarts what a test kills; a test
that changes the network undoes it in a ``finally``), except the partition
test, which runs last (its node's pods are evicted).

Run it on its own, in the lock (scripts/test.sh runs it as its own pass)::

    flock /tmp/shoal-e2e.lock pytest -q tests/chaos

In a run that collects other tiers too (a bare ``pytest``), the chaos tests
are deselected unless ``SHOAL_CHAOS=1``: one lab per machine, and the shared
e2e lab may be up. ``SHOAL_CHAOS_LONG=1`` runs the longer variants (more
writes, more kill rounds, longer traffic under packet loss).

Each test records its figures in ``figures`` (time to recover, requests
failed, events lost); they are printed at the end of the run and appended,
one JSON line per test, to ``$SHOAL_E2E_FIGURES`` when set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shoal import bootstrap, errors
from shoal import config as configmod
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.client import Client
from shoal.lab.topology import Node, plan
from shoal.testing import podnet
from shoal.testing.cli import shoal_process
from shoal.testing.waiting import wait_for

HERE = Path(__file__).parent
NODES = 2
NS = "chaos"
IMAGE = "docker.io/library/busybox:1.36"
LONG = os.environ.get("SHOAL_CHAOS_LONG") == "1"
# Shortened for the faults: a Lease moves 6 s after its holder's last renewal;
# a node is NotReady 8 s after its last heartbeat and its pods are evicted 10 s
# later (only the partition test, last, keeps a node away that long).
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 6.0, 4.0, 1.0
NODE_MONITOR_GRACE, POD_EVICTION_TIMEOUT = 8, 10
# etcd keeps every revision until the apiserver compacts (every 300 s by default):
# within a 2-minute soak its memory would grow by design. Compacting every 60 s
# bounds that history inside the soak's window, so what the soak sees growing
# is not retained history.
ETCD_COMPACTION_INTERVAL = 60

FIGURES: dict[str, dict[str, Any]] = {}


def cli(*args: str, config: Path | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    return shoal_process(*args, config=config, timeout=timeout)


@dataclass
class ChaosLab:
    dir: Path
    config: Path
    client: Client
    nodes: tuple[Node, ...] = field(default_factory=tuple)

    def pids(self) -> dict[str, int]:
        state = json.loads((self.dir / "state.json").read_text())
        return {p["name"]: int(p["pid"]) for p in state["processes"].values()}

    def members(self) -> list[bootstrap.ControlPlane]:
        specs = [self.dir / "bootstrap.yaml",
                 *sorted((self.dir / "control-planes").glob("cp-*/bootstrap.yaml"))]
        out = []
        for path in specs:
            cp = bootstrap.load(path).control_plane
            assert cp is not None
            out.append(cp)
        return out

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def shoal(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return cli(*args, config=self.config, timeout=timeout)

    def new_client(self, timeout: float = 10.0) -> Client:
        return Client(configmod.load(self.config), timeout=timeout)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: issue 10's chaos suite (tests/chaos, a lab of "
                                       "its own; run alone)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Chaos tests run only in a run of their own (or with SHOAL_CHAOS=1)."""
    if os.environ.get("SHOAL_CHAOS") == "1":
        return
    chaos = [i for i in items if HERE in i.path.parents]
    if not chaos or len(chaos) == len(items):
        return
    config.hook.pytest_deselected(items=chaos)
    items[:] = [i for i in items if HERE not in i.path.parents]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.write_sep("-", "chaos figures")
    for test, figures in FIGURES.items():
        terminalreporter.write_line(f"{test}: {json.dumps(figures)}")


def record(test: str, **figures: Any) -> None:
    """Keep a test's figures for the summary and $SHOAL_E2E_FIGURES."""
    FIGURES.setdefault(test, {}).update(figures)
    if os.environ.get("SHOAL_E2E_FIGURES"):
        with open(os.environ["SHOAL_E2E_FIGURES"], "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


@pytest.fixture(scope="session")
def chaos_lab(tmp_path_factory: pytest.TempPathFactory,
              request: pytest.FixtureRequest) -> Iterator[ChaosLab]:
    if os.geteuid() != 0:
        pytest.skip("the chaos suite needs root (a real lab)")
    if subprocess.run(["ip", "link", "show", "shoal0"], capture_output=True,
                      check=False).returncode == 0:
        pytest.skip("a lab is already up on this machine (bridge shoal0 exists)")
    lab_dir = tmp_path_factory.mktemp("chaos") / "lab"
    t0 = time.monotonic()
    up = cli("lab", "up", "--nodes", str(NODES), "--control-planes", "3", "--mesh",
             "--dir", str(lab_dir),
             f"--apiserver-arg=--leader-elect-lease-duration={LEASE_DURATION:g}",
             f"--apiserver-arg=--leader-elect-renew-deadline={RENEW_DEADLINE:g}",
             f"--apiserver-arg=--leader-elect-retry-period={RETRY_PERIOD:g}",
             f"--apiserver-arg=--node-monitor-grace-period={NODE_MONITOR_GRACE}",
             f"--apiserver-arg=--pod-eviction-timeout={POD_EVICTION_TIMEOUT}",
             f"--apiserver-arg=--etcd-compaction-interval={ETCD_COMPACTION_INTERVAL}")
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        record("lab", up_s=round(time.monotonic() - t0, 1))
        config = lab_dir / "admin.conf"
        with Client(configmod.load(config), timeout=30) as client:
            yield ChaosLab(dir=lab_dir, config=config, client=client,
                           nodes=plan(nodes=NODES, lab_dir=lab_dir).nodes)
    finally:
        if request.session.testsfailed and (lab_dir / "logs").is_dir():
            kept = Path(os.environ.get("SHOAL_E2E_LOGS", "/tmp/shoal-e2e-logs")) / (
                "chaos-" + time.strftime("%Y%m%dT%H%M%S"))
            shutil.copytree(lab_dir / "logs", kept, dirs_exist_ok=True)
            print(f"\nchaos lab logs kept in {kept}", file=sys.stderr)
        cli("lab", "down", "--purge", "--dir", str(lab_dir))


# -- workloads shared by the node and network faults --------------------------------

# An echo server (in a pod's netns, started from the host): each connection gets
# back what it sent. argv: port.
ECHO = """
    import socket, sys, threading
    srv = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=128)
    def serve(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Steady TCP traffic: a new connection every ``interval`` s for ``seconds`` s (at most
# ``timeout`` s each), one line each: "<monotonic start> OK|ERR <detail>".
# argv: ip port seconds interval timeout.
TRAFFIC = """
    import socket, sys, time
    ip, port = sys.argv[1], int(sys.argv[2])
    seconds, interval, timeout = map(float, sys.argv[3:6])
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t = time.monotonic()
        payload = f"req-{i}".encode()
        try:
            with socket.create_connection((ip, port), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            print(f"{t:.3f}", "OK" if out == payload else "ERR", out[:40], flush=True)
        except OSError as e:
            print(f"{t:.3f}", "ERR", e, flush=True)
        i += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t)))
"""
ECHO_PORT = 9000


@dataclass
class Request:
    at: float
    ok: bool
    detail: str


def parse_traffic(out: str) -> list[Request]:
    reqs = []
    for line in out.splitlines():
        at, status, detail = [*line.split(" ", 2), "", ""][:3]
        reqs.append(Request(at=float(at), ok=status == "OK", detail=detail))
    return reqs


@dataclass
class Workloads:
    web_ip: str      # on node-2, an echo server on ECHO_PORT
    web_netns: str
    client_netns: str  # the client pod's, on node-1
    client_ip: str


def pod(name: str, node: str, command: list[str]) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels["app"] = name
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(command)
    return p


def running(lab: ChaosLab, name: str) -> core_pb2.Pod | None:
    try:
        p = lab.client.get(core_pb2.Pod, name, namespace=NS)
    except errors.NotFound:
        return None
    return p if p.status.phase == "Running" and p.status.pod_ip else None


@pytest.fixture(scope="session")
def namespace(chaos_lab: ChaosLab) -> str:
    chaos_lab.client.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
    return NS


@pytest.fixture(scope="session")
def workloads(chaos_lab: ChaosLab, namespace: str) -> Iterator[Workloads]:
    chaos_lab.client.create(pod("web", "node-2", ["sleep", "3600"]))
    chaos_lab.client.create(pod("client", "node-1", ["sleep", "3600"]))
    web = wait_for("web running", lambda: running(chaos_lab, "web"), timeout=120)
    client = wait_for("client running", lambda: running(chaos_lab, "client"), timeout=120)
    web_ns = podnet.pod_netns(web.status.pod_ip)
    server = subprocess.Popen(["ip", "netns", "exec", web_ns, sys.executable, "-c",
                               textwrap.dedent(ECHO), str(ECHO_PORT)])
    try:
        w = Workloads(web_ip=web.status.pod_ip, web_netns=web_ns,
                      client_netns=podnet.pod_netns(client.status.pod_ip),
                      client_ip=client.status.pod_ip)
        wait_for("the echo server answers through the mesh", lambda: podnet.in_netns(
            w.client_netns, podnet.REQUEST, w.web_ip, str(ECHO_PORT), "x"
        ).stdout.startswith("OK x"), timeout=30)
        yield w
    finally:
        server.terminate()
        server.wait(timeout=10)


def start_traffic(w: Workloads, seconds: float, *, interval: float = 0.1,
                  timeout: float = 2.0) -> subprocess.Popen[str]:
    return podnet.start_in_netns(w.client_netns, TRAFFIC, w.web_ip, str(ECHO_PORT),
                                 str(seconds), str(interval), str(timeout))
