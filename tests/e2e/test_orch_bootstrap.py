"""The VMs' node bootstrap, without VMs: a fourth node joins the shared lab.

No VM can boot on the machines that run these tests, so the Vagrant lab's
node-side provisioning is run here against the local lab instead:

- the control plane's step of ``deploy/vagrant/provision/control-plane.sh``
  (``python -m shoal.bootstrap token --publish``), on the lab's own bootstrap
  spec;
- ``deploy/vagrant/provision/node-bootstrap.sh`` as it is (spec, files, join),
  inside a network namespace of its own on the lab bridge;
- containerd and the node agent started with the ``ExecStart=`` lines of
  ``deploy/systemd/shoal-containerd.service`` and ``shoal-nodeagent.service``
  (the venv's python and the spec path swapped for this machine's), with a
  ``NOTIFY_SOCKET`` of the test's own, standing in for systemd.

The node must say READY=1 as systemd would hear it, become Ready, run a pod the
scheduler puts on it and serve it to the lab's node-1 across nodes; a killed
agent started again (systemd's Restart=on-failure) adopts the pod, which kept
running beside containerd's own unit. The test
then removes the node (pod, agent, containerd, Node, Lease, netns), so the other
modules find the 3-node lab as it was. Needs root; run with
``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_bootstrap.py``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal import bootstrap, errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.lab import netsetup
from shoal.lab.topology import BRIDGE, Node, NodeName
from shoal.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
NODE_BOOTSTRAP = REPO / "deploy" / "vagrant" / "provision" / "node-bootstrap.sh"
NAME = "vm-1"
NETNS = "shoal-vm-1"
IP = "10.77.0.41"
API = "10.77.0.1:6443"
IMAGE = "docker.io/library/busybox:1.36"
Cluster = Any  # tests/e2e/conftest.py's Cluster (conftest modules are not importable)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    out["PATH"] = out.get("PATH", "/usr/bin:/bin") + ":/usr/local/sbin:/usr/sbin:/sbin"
    return out


def unit_exec_start(unit: str, *, spec: Path) -> list[str]:
    """The unit's ExecStart, for this machine: our python, our spec."""
    text = (UNITS / unit).read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == "/opt/shoal/venv/bin/python", argv
    assert str(bootstrap.DEFAULT_SPEC) in argv, argv
    return [sys.executable if a == argv[0] else str(spec) if a == str(bootstrap.DEFAULT_SPEC)
            else a for a in argv]


@dataclass
class VMNode:
    dir: Path
    spec: Path
    data: Path
    logs: list[Path]
    procs: dict[str, subprocess.Popen[bytes]]
    notify: socket.socket

    def start(self, unit: str, *, netns: str | None = NETNS) -> subprocess.Popen[bytes]:
        """Start a unit's ExecStart (in the node's netns), as systemd would (with a
        NOTIFY_SOCKET), logging to a file."""
        log = self.dir / f"{unit}.log"
        self.logs.append(log)
        enter = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*enter, *unit_exec_start(unit, spec=self.spec)],
                env={**env(), "NOTIFY_SOCKET": str(self.dir / "notify")},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.procs[unit] = proc
        return proc

    def ready_sent(self, proc: subprocess.Popen[bytes]) -> bool:
        """Wait for READY=1 sent by ``proc``'s own PID, which systemd's
        NotifyAccess=main requires (``exec`` keeps the unit's main PID)."""
        while True:
            try:
                data, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                return False
            sender = next(struct.unpack("3i", cdata[:12])[0]
                          for level, kind, cdata in ancillary
                          if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            if b"READY=1" in data.split(b"\n") and sender == proc.pid:
                return True
            assert proc.poll() is None, f"exited {proc.returncode}: {self.tails()}"

    def tails(self) -> str:
        return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace")
                                                     .splitlines()[-30:])
                         for p in self.logs if p.exists())


def ready(node: core_pb2.Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def get(cluster: Cluster, kind: Any, name: str, namespace: str = "") -> Any:
    try:
        return cluster.client.get(kind, name, namespace=namespace)
    except errors.NotFound:
        return None


@pytest.fixture
def vm_node(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMNode]:
    base = tmp_path_factory.mktemp("vm")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # who sent it, as systemd
    notify.bind(str(base / "notify"))
    notify.settimeout(90)
    node = VMNode(dir=base, spec=base / "bootstrap.yaml", data=base / "node", logs=[],
                  procs={}, notify=notify)
    link = Node(index=31, name=NodeName(NAME), netns=NETNS, host_veth="shln-vm1", ip=IP,
                data_dir=node.data)
    netsetup.ensure_netns(NETNS)
    netsetup.ensure_node_link(link, bridge=BRIDGE)
    try:
        yield node
    finally:
        _remove(cluster, node, link)


def _remove(cluster: Cluster, node: VMNode, link: Node) -> None:
    try:
        cluster.client.delete(core_pb2.Pod, "on-vm", namespace="default")
        wait_for("pod on-vm gone", lambda: get(cluster, core_pb2.Pod, "on-vm", "default")
                 is None, timeout=60)
    except errors.NotFound:
        pass
    finally:
        for proc in reversed(node.procs.values()):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        _clean_containerd(node)
        for kind, ns in ((core_pb2.Node, ""), (coordination_pb2.Lease, "kube-node-lease")):
            try:
                cluster.client.delete(kind, NAME, namespace=ns)
            except errors.NotFound:
                pass
        netsetup.remove_link(link.host_veth)
        netsetup.remove_netns(NETNS)
        node.notify.close()


def _clean_containerd(node: VMNode) -> None:
    """Stop the unit's containerd as `shoal lab down` stops a node's: adopt it by
    its PID, remove every sandbox through CRI, then shims and mounts."""
    from nodeagent.containerd import PIDFILE_NAME, ContainerdProcess

    if not node.data.exists():
        return
    spec = bootstrap.load(node.spec).node
    assert spec is not None
    config = bootstrap.agent_config(spec).containerd_config()
    proc = node.procs.get("shoal-containerd.service")
    if proc is not None:
        config.state.mkdir(parents=True, exist_ok=True)
        (config.state / PIDFILE_NAME).write_text(f"{proc.pid}\n")
    cd = ContainerdProcess(config, netns=NETNS)

    async def clean() -> None:
        if proc is not None and proc.poll() is None:
            await cd.start()  # adopts the running one
        report = await cd.cleanup()
        assert not report.errors, report.errors

    asyncio.run(clean())


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def test_the_control_plane_bootstrap_serves_and_publishes_a_token(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """control-plane.sh's steps after the packages, beside any lab (on 127.0.0.3):
    etcd, the registry and the apiserver started with the units' ExecStart lines
    (READY=1 from etcd's and the apiserver's main PIDs; the registry unit's
    health check), then seed, token (twice: the second keeps it) and check."""
    base = tmp_path_factory.mktemp("cp")
    addr = "127.0.0.3"
    spec_path = base / "bootstrap.yaml"
    bootstrap.save(bootstrap.Spec(control_plane=bootstrap.ControlPlane(
        address=addr, data_dir=base / "data", etcd_client_port=_free_port("127.0.0.1"),
        etcd_peer_port=_free_port("127.0.0.1"), apiserver_metrics=f"{addr}:9090")),
        spec_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.bind(str(base / "notify"))
    notify.settimeout(90)
    cp = VMNode(dir=base, spec=spec_path, data=base / "data", logs=[], procs={},
                notify=notify)

    def tool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-P", "-m", "shoal.bootstrap", "--spec",
                               str(spec_path), *args], capture_output=True, text=True,
                              env=env(), timeout=120, check=False)

    try:
        render = tool("render")
        assert render.returncode == 0, render.stderr
        etcd = cp.start("shoal-etcd.service", netns=None)
        assert cp.ready_sent(etcd), "etcd: no READY=1\n" + cp.tails()
        cp.start("shoal-registry.service", netns=None)
        waited = tool("wait", "registry", "--timeout", "60")  # the unit's ExecStartPost
        assert waited.returncode == 0, waited.stderr + cp.tails()
        api = cp.start("shoal-apiserver.service", netns=None)
        assert cp.ready_sent(api), "apiserver: no READY=1\n" + cp.tails()

        seeded = tool("seed")
        assert seeded.returncode == 0, seeded.stderr
        assert f"pushed {addr}:5000/library/busybox:1.36" in seeded.stderr
        token_file = base / "shared" / "join.env"
        first = tool("token", "--publish", str(token_file))
        assert first.returncode == 0, first.stderr
        published = token_file.read_text()
        again = tool("token", "--publish", str(token_file))
        assert again.returncode == 0 and "still valid; kept" in again.stderr, again.stderr
        assert token_file.read_text() == published
        checked = tool("check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"apiserver: http://{addr}:9090/readyz answers" in checked.stdout
    finally:
        for proc in reversed(cp.procs.values()):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        notify.close()


def test_the_vm_node_bootstrap_joins_a_node_that_runs_pods(cluster: Cluster,
                                                           vm_node: VMNode) -> None:
    # The control plane's step: a join token published to the "shared folder".
    token_file = vm_node.dir / "shared" / "join.env"
    published = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.bootstrap", "--spec",
         str(cluster.dir / "bootstrap.yaml"), "token", "--publish", str(token_file)],
        capture_output=True, text=True, env=env(), timeout=60, check=False)
    assert published.returncode == 0, published.stderr
    assert "SHOAL_JOIN_TOKEN=" in token_file.read_text()

    # The node's step: node-bootstrap.sh as the VMs run it, inside the node's netns.
    boot = subprocess.run(
        ["nsenter", f"--net=/var/run/netns/{NETNS}", "bash", str(NODE_BOOTSTRAP)],
        env={**env(), "SHOAL_NODE_NAME": NAME, "SHOAL_NODE_IP": IP,
             "SHOAL_API_SERVER": API, "SHOAL_TOKEN_FILE": str(token_file),
             "SHOAL_SPEC": str(vm_node.spec), "SHOAL_DATA_DIR": str(vm_node.data),
             "SHOAL_PYTHON": sys.executable, "SHOAL_MESH": "0", "SHOAL_LEASE_RENEW": "2",
             "SHOAL_WAIT": "60"},
        capture_output=True, text=True, timeout=180, check=False)
    assert boot.returncode == 0, boot.stdout + boot.stderr
    assert f"node {NAME} joined" in boot.stdout + boot.stderr
    assert (vm_node.data / "node.conf").exists()
    assert "docker.io" in {p.name for p in (vm_node.data / "containerd/certs.d").iterdir()}

    # The units' commands, supervised by the test instead of systemd: each says
    # READY=1 on NOTIFY_SOCKET, and only then is the next one started (After=).
    containerd = vm_node.start("shoal-containerd.service")
    assert vm_node.ready_sent(containerd), "containerd: no READY=1\n" + vm_node.tails()
    agent = vm_node.start("shoal-nodeagent.service")
    assert vm_node.ready_sent(agent), "nodeagent: no READY=1\n" + vm_node.tails()
    assert Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0")[3] == \
        b"nodeagent.main", "the unit's main PID is the agent itself"

    node = wait_for(f"Node {NAME} Ready", lambda: (n := get(cluster, core_pb2.Node, NAME))
                    is not None and ready(n) and n, timeout=60)
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == [IP]

    pod = core_pb2.Pod()
    pod.metadata.name, pod.metadata.namespace = "on-vm", "default"
    pod.spec.node_selector["kubernetes.io/hostname"] = NAME
    pod.spec.termination_grace_period_seconds = 2
    c = pod.spec.containers.add(name="httpd", image=IMAGE)
    c.command.extend(["sh", "-c", "mkdir -p /www && echo hello from $(hostname) > "
                      "/www/index.html && exec httpd -f -p 8080 -h /www"])
    cluster.client.create(pod)
    running = wait_for("pod on-vm Running on vm-1", lambda: (
        p := get(cluster, core_pb2.Pod, "on-vm", "default")) is not None
        and p.status.phase == "Running" and p.status.pod_ip and p, timeout=90)
    assert running.spec.node_name == NAME

    def fetch(netns: str) -> subprocess.CompletedProcess[str]:
        get = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
               f"'http://{running.status.pod_ip}:8080/', timeout=2).read().decode())")
        return subprocess.run(["nsenter", f"--net=/var/run/netns/{netns}", sys.executable,
                               "-c", get], capture_output=True, text=True, timeout=10,
                              check=False, env={**env(), "no_proxy": "*"})

    def from_node_1() -> str:
        return fetch("shoal-node-1").stdout.strip()

    try:
        assert wait_for("node-1 reaches the pod on vm-1", from_node_1,
                        timeout=30) == "hello from on-vm"
    except AssertionError:  # what the two nodes' networks look like, for the log
        for argv in (["ip", "route"], ["ip", "addr"], ["iptables-save"]):
            for ns in ("shoal-node-1", NETNS):
                shown = subprocess.run(["ip", "netns", "exec", ns, *argv], text=True,
                                       capture_output=True, check=False)
                print(f"--- {ns}: {' '.join(argv)}\n{shown.stdout}{shown.stderr}")
        print("--- from vm-1 itself:", fetch(NETNS))
        print("--- from node-1:", fetch("shoal-node-1"))
        raise

    # The agent dies; systemd would start it again (Restart=on-failure). containerd
    # is a unit of its own, so the pod kept running, and the new agent adopts it.
    cid = running.status.container_statuses[0].container_id
    agent.kill()
    agent.wait()
    restarted = time.time()
    again = vm_node.start("shoal-nodeagent.service")
    assert vm_node.ready_sent(again), "nodeagent again: no READY=1\n" + vm_node.tails()

    def renewed_twice() -> bool:  # the new agent's loops have run for a while
        lease = get(cluster, coordination_pb2.Lease, NAME, "kube-node-lease")
        return lease is not None and \
            lease.spec.renew_time.ToMicroseconds() / 1e6 >= restarted + 2
    wait_for("vm-1's Lease renewed twice by the new agent", renewed_twice, timeout=30)
    adopted = get(cluster, core_pb2.Pod, "on-vm", "default")
    assert adopted.status.phase == "Running"
    assert adopted.status.container_statuses[0].container_id == cid
    assert adopted.status.container_statuses[0].restart_count == 0
    assert from_node_1() == "hello from on-vm"


def test_the_lab_runs_what_the_bootstrap_shows(cluster: Cluster) -> None:
    """The lab's node agents run the very command ``python -m shoal.bootstrap show
    nodeagent`` prints for their spec (the one systemd's unit execs)."""
    import json

    state = json.loads((cluster.dir / "state.json").read_text())
    recorded = state["processes"]["nodeagent/node-1"]["argv"]
    shown = subprocess.run(
        [sys.executable, "-P", "-m", "shoal.bootstrap", "--spec",
         str(cluster.dir / "nodes" / "node-1" / "bootstrap.yaml"), "show", "nodeagent"],
        capture_output=True, text=True, env=env(), timeout=60, check=True).stdout
    assert recorded[-len(shlex.split(shown)):] == shlex.split(shown)
