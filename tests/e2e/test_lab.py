"""End to end: the real ``shoal lab up --nodes 3`` on this machine, then ``down``.

One lab for the module, in a temporary directory: a bridge ``shoal0``
(10.77.0.1/24), three node network namespaces, etcd, the apiserver and the
registry on the host, one node agent with its own containerd per node, and
the lab's supervisor. Pods run busybox httpd; every request goes to pod IPs
inside the lab, from inside pods (``shoal exec``). Images reach the nodes
through the lab registry (the docker.io mirror) or ``shoal image import``;
nothing is pulled from outside. Next to last, daemons are killed and must come
back (the supervisor), while a node stopped on purpose must stay down. The last
test takes the lab down and checks that no namespace, interface, process,
mount or iptables chain of it is left; the fixture's finalizer runs ``down
--purge`` again in case a test failed first.

Every wait is bounded (``until``'s timeouts, the commands' timeouts): a run
takes about two minutes here, and a hung lab fails a test instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodeagent.containerd import mounts_under
from shoal import config as configmod
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import Client
from shoal.lab.state import ProcessRecord
from shoal.lab.supervising import alive, http_ok
from shoal.testing.cli import shoal_process
from shoal.testing.waiting import wait_for as until

pytestmark = pytest.mark.e2e

NODES = ("node-1", "node-2", "node-3")
IMAGE = "docker.io/library/busybox:1.36"


def run(*args: str, config: Path | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return shoal_process(*args, config=config, timeout=timeout)


@dataclass
class LabEnv:
    dir: Path
    config: Path
    client: Client
    cni_netns_before: set[str]

    def lab(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run("lab", *args, "--dir", str(self.dir), timeout=timeout)

    def shoal(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(*args, config=self.config, timeout=timeout)

    def state(self) -> dict[str, Any]:
        return json.loads((self.dir / "state.json").read_text())  # type: ignore[no-any-return]


def _netns(prefix: str) -> set[str]:
    try:
        return {p.name for p in Path("/var/run/netns").iterdir() if p.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    if subprocess.run(["ip", "link", "show", "shoal0"], capture_output=True,
                      check=False).returncode == 0:
        pytest.skip("a lab is already up on this machine (bridge shoal0 exists); "
                    "`shoal lab down` it first")
    lab_dir = tmp_path_factory.mktemp("lab") / "lab"
    before = _netns("cni-")
    up = run("lab", "up", "--nodes", "3", "--dir", str(lab_dir), timeout=300)
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        config = lab_dir / "admin.conf"
        with Client(configmod.load(config), timeout=15) as client:
            yield LabEnv(dir=lab_dir, config=config, client=client, cni_netns_before=before)
    finally:
        run("lab", "down", "--purge", "--dir", str(lab_dir), timeout=300)


def web_pod(node: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = f"web-{node}"
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 2
    c = p.spec.containers.add(name="httpd", image=IMAGE)
    c.command.extend(["sh", "-c", f"mkdir -p /www && echo hello from {node} > "
                      "/www/index.html && exec httpd -f -p 8080 -h /www"])
    return p


def running_pod(env: LabEnv, name: str) -> core_pb2.Pod | None:
    pod = env.client.get(core_pb2.Pod, name, namespace="default")
    ok = pod.status.phase == "Running" and pod.status.pod_ip
    return pod if ok else None


def fetch_from(env: LabEnv, pod: str, url: str) -> subprocess.CompletedProcess[str]:
    # busybox 1.35's `wget -T` segfaults: bound it from outside instead.
    return env.shoal("exec", pod, "-n", "default", "--", "timeout", "5", "wget", "-q", "-O",
                     "-", url)


def test_three_nodes_are_ready(lab: LabEnv) -> None:
    got = lab.shoal("get", "nodes")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()[1:]
    assert sorted(ln.split()[0] for ln in lines) == list(NODES)
    assert all(ln.split()[1] == "Ready" for ln in lines), got.stdout
    nodes = lab.client.list(core_pb2.Node).items
    cidrs = [n.spec.pod_cidr for n in nodes]
    assert all(cidrs) and len(set(cidrs)) == 3, cidrs


def test_pods_on_every_node_reach_each_other(lab: LabEnv) -> None:
    for node in NODES:
        lab.client.create(web_pod(node))
    pods = {node: until(f"web-{node} Running", lambda n=node: running_pod(lab, f"web-{n}"))
            for node in NODES}
    for src in NODES:
        for dst in NODES:
            ip = pods[dst].status.pod_ip
            got = fetch_from(lab, f"web-{src}", f"http://{ip}:8080/")
            assert got.returncode == 0 and got.stdout.strip() == f"hello from {dst}", (
                f"web-{src} -> web-{dst} ({ip}): rc={got.returncode} "
                f"out={got.stdout!r} err={got.stderr!r}")


def mac_of(name: str, *, netns: str | None = None) -> str:
    out = subprocess.run(["ip", "-j", *(["-n", netns] if netns else []), "link", "show",
                          "dev", name], capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)[0]["address"])


def test_a_port_joining_and_leaving_the_bridge_keeps_its_mac(lab: LabEnv) -> None:
    """A fourth node's veth on shoal0, with a MAC lower than any the kernel picks,
    and its removal leave the bridge's MAC as it was, so the nodes' ARP entries
    for the apiserver stay right (a bridge takes its lowest port's MAC unless
    its own was set: the nodes then lost the apiserver for 30-50 s)."""
    before = mac_of("shoal0")
    sh = ["ip", "link"]
    subprocess.run([*sh, "add", "shln-t", "type", "veth", "peer", "name", "shln-tp"],
                   check=True)
    try:
        subprocess.run([*sh, "set", "dev", "shln-t", "address", "00:00:5e:00:53:01"],
                       check=True)
        subprocess.run([*sh, "set", "dev", "shln-t", "master", "shoal0", "up"], check=True)
        assert mac_of("shoal0") == before
    finally:
        subprocess.run([*sh, "del", "dev", "shln-t"], check=True)
    assert mac_of("shoal0") == before
    neigh = json.loads(subprocess.run(
        ["ip", "-j", "-n", "shoal-node-1", "neigh", "show", "10.77.0.1"],
        capture_output=True, text=True, check=True).stdout)
    assert [n.get("lladdr") for n in neigh] == [before], neigh


def test_images_come_from_the_lab_registry(lab: LabEnv) -> None:
    """The web pods' docker.io/library/busybox:1.36 was pulled through the docker.io
    mirror (nothing was imported into the nodes); the registry's own name works too."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            "http://10.77.0.1:5000/v2/_catalog", timeout=5) as r:
        catalog = json.loads(r.read())["repositories"]
    assert {"library/busybox", "shoal/pause"} <= set(catalog)
    p = core_pb2.Pod()
    p.metadata.name = "by-registry-name"
    p.spec.node_name = "node-2"
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image="10.77.0.1:5000/library/busybox:1.36")
    c.command.extend(["sleep", "3600"])
    lab.client.create(p)
    got = until("by-registry-name Running", lambda: running_pod(lab, "by-registry-name"))
    assert got.status.container_statuses[0].image_id
    lab.client.delete(core_pb2.Pod, "by-registry-name", namespace="default")


def test_an_imported_archive_runs_on_every_node(lab: LabEnv, tmp_path: Path) -> None:
    """`shoal image build` + `shoal image import`: no registry involved, and pods
    that may not pull (imagePullPolicy Never) run it on every node."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello.txt").write_text("imported into every node\n")
    archive = tmp_path / "hello.tar"
    built = lab.shoal("image", "build", "-t", "docker.io/library/lab-hello:1", "-o",
                      str(archive), str(tmp_path / "src"))
    assert built.returncode == 0, built.stderr
    imported = lab.shoal("image", "import", str(archive), timeout=120)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert sorted(ln.split(":")[0] for ln in imported.stdout.splitlines()) == list(NODES)
    for node in NODES:
        p = core_pb2.Pod()
        p.metadata.name = f"imported-{node}"
        p.spec.node_name = node
        p.spec.termination_grace_period_seconds = 1
        c = p.spec.containers.add(name="main", image="docker.io/library/lab-hello:1")
        c.image_pull_policy = "Never"
        c.command.extend(["sleep", "3600"])
        lab.client.create(p)
    for node in NODES:
        until(f"imported-{node} Running", lambda n=node: running_pod(lab, f"imported-{n}"))
        got = lab.shoal("exec", f"imported-{node}", "-n", "default", "--", "cat",
                        "/hello.txt")
        assert got.stdout == "imported into every node\n", got.stderr
        lab.client.delete(core_pb2.Pod, f"imported-{node}", namespace="default")


def test_partition_drops_traffic_and_heal_restores_it(lab: LabEnv) -> None:
    ip2 = lab.client.get(core_pb2.Pod, "web-node-2", namespace="default").status.pod_ip
    cut = lab.lab("partition", "node-1", "node-2")
    assert cut.returncode == 0, cut.stderr
    assert fetch_from(lab, "web-node-1", f"http://{ip2}:8080/").returncode != 0
    ip3 = lab.client.get(core_pb2.Pod, "web-node-3", namespace="default").status.pod_ip
    assert fetch_from(lab, "web-node-1", f"http://{ip3}:8080/").returncode == 0
    healed = lab.lab("heal")
    assert healed.returncode == 0 and "healed 1 partition" in healed.stdout
    assert fetch_from(lab, "web-node-1", f"http://{ip2}:8080/").stdout.strip() == \
        "hello from node-2"


def lease_expired(lab: LabEnv, node: str) -> bool:
    age, duration = lease_age(lab, node)
    return age > duration


def lease_age(lab: LabEnv, node: str) -> tuple[float, int]:
    lease = lab.client.get(coordination_pb2.Lease, node, namespace="kube-node-lease")
    age = time.time() - lease.spec.renew_time.ToMicroseconds() / 1e6
    return age, lease.spec.lease_duration_seconds


def test_stop_node_expires_its_lease_and_start_node_adopts_its_pods(lab: LabEnv) -> None:
    before = lab.client.get(core_pb2.Pod, "web-node-3", namespace="default")
    cid = before.status.container_statuses[0].container_id
    assert cid
    stopped = lab.lab("stop-node", "node-3")
    assert stopped.returncode == 0, stopped.stderr
    status = lab.lab("status")
    assert "stopped (stop-node)" in status.stdout
    # The Lease stops being renewed: its renewTime falls behind leaseDurationSeconds.
    until("node-3's Lease expired", lambda: lease_expired(lab, "node-3"), timeout=70,
          interval=1.0)
    started = lab.lab("start-node", "node-3")
    assert started.returncode == 0, started.stdout + started.stderr
    age, duration = lease_age(lab, "node-3")
    assert age < duration
    node = lab.client.get(core_pb2.Node, "node-3")
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    time.sleep(2)  # let the agent relist and report; the pod must still be the same one
    after = until("web-node-3 Running", lambda: running_pod(lab, "web-node-3"))
    assert after.status.container_statuses[0].container_id == cid
    assert after.status.container_statuses[0].restart_count == 0
    ip = after.status.pod_ip
    assert fetch_from(lab, "web-node-1", f"http://{ip}:8080/").stdout.strip() == \
        "hello from node-3"


def test_a_second_up_changes_nothing(lab: LabEnv) -> None:
    before = lab.state()
    again = lab.lab("up", "--nodes", "3")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    assert lab.state()["processes"] == before["processes"]


def record_of(env: LabEnv, name: str) -> ProcessRecord:
    p = env.state()["processes"][name]
    return ProcessRecord(name=p["name"], pid=p["pid"], start_time=p["start_time"],
                         argv=tuple(p["argv"]), supervised=p.get("supervised", False),
                         restarts=p.get("restarts", 0), last_exit=p.get("last_exit", ""))


def replaced(env: LabEnv, old: ProcessRecord) -> ProcessRecord | None:
    """The record of ``old``'s daemon once the supervisor has restarted it."""
    now = record_of(env, old.name)
    return now if (now.pid, now.start_time) != (old.pid, old.start_time) and alive(now) \
        else None


def answers(check: Callable[[], Any]) -> Any:
    """``check()``, or None while the apiserver does not answer yet."""
    try:
        return check()
    except Exception:
        return None


def renewed_since(env: LabEnv, node: str, since: float) -> bool:
    lease = env.client.get(coordination_pb2.Lease, node, namespace="kube-node-lease")
    return bool(lease.spec.renew_time.ToMicroseconds() / 1e6 >= since)


def test_the_supervisor_restarts_killed_daemons_but_not_a_stopped_node(lab: LabEnv) -> None:
    """After the second `up` (which must see nothing change), so the other tests
    see the daemons `up` started."""
    assert alive(record_of(lab, "supervisor"))
    api, agent = record_of(lab, "apiserver"), record_of(lab, "nodeagent/node-1")
    assert api.supervised and agent.supervised and (api.restarts, agent.restarts) == (0, 0)
    before = lab.client.get(core_pb2.Pod, "web-node-1", namespace="default")
    cid = before.status.container_statuses[0].container_id
    killed_at = time.time()
    os.kill(api.pid, signal.SIGKILL)
    os.kill(agent.pid, signal.SIGKILL)

    new_api = until("apiserver restarted", lambda: replaced(lab, api), timeout=30)
    new_agent = until("node-1's agent restarted", lambda: replaced(lab, agent), timeout=30)
    for new in (new_api, new_agent):
        assert (new.restarts, new.last_exit) == (1, "killed by SIGKILL")
        assert new.argv == (api if new.name == "apiserver" else agent).argv
    until("apiserver /readyz", lambda: http_ok("http://127.0.0.1:9090/readyz"), timeout=60)
    until("node-1's Lease renewed by its new agent",
          lambda: answers(lambda: renewed_since(lab, "node-1", killed_at)), timeout=60)

    def node_1_ready() -> bool:
        got = lab.shoal("get", "nodes")
        return any(ln.split()[:2] == ["node-1", "Ready"] for ln in got.stdout.splitlines())

    until("shoal get nodes: node-1 Ready", node_1_ready, timeout=60, interval=0.5)
    time.sleep(2)  # let the new agent relist and report; the pod must still be the same one
    after = until("web-node-1 Running", lambda: answers(lambda: running_pod(lab, "web-node-1")))
    assert after.status.container_statuses[0].container_id == cid
    assert after.status.container_statuses[0].restart_count == 0
    status = lab.lab("status")
    assert status.returncode == 0, status.stdout + status.stderr
    rows = {ln.split()[0]: ln for ln in status.stdout.splitlines() if ln.strip()}
    for name in ("apiserver", "nodeagent/node-1"):
        assert rows[name].split()[2:4] == ["running", "1"], status.stdout
        assert "killed by SIGKILL" in rows[name], status.stdout
    assert rows["supervisor"].split()[2] == "running", status.stdout
    log = (lab.dir / "logs" / "supervisor.log").read_text()
    assert f"apiserver (pid {api.pid}) killed by SIGKILL" in log
    assert f"nodeagent/node-1 (pid {agent.pid}) killed by SIGKILL" in log

    # A node stopped on purpose stays stopped while the supervisor runs.
    agent2 = record_of(lab, "nodeagent/node-2")
    stopped = lab.lab("stop-node", "node-2")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(agent2)
    quiet_until = time.monotonic() + 6
    while time.monotonic() < quiet_until:
        assert record_of(lab, "nodeagent/node-2") == agent2 and not alive(agent2)
        assert alive(record_of(lab, "supervisor"))
        time.sleep(0.25)
    status = lab.lab("status")
    assert "stopped (stop-node)" in status.stdout and status.returncode == 0, status.stdout
    started = lab.lab("start-node", "node-2")
    assert started.returncode == 0, started.stdout + started.stderr
    again = record_of(lab, "nodeagent/node-2")
    assert alive(again) and again.supervised and again.restarts == 0
    assert "node-2" not in lab.state()["stopped_nodes"]


def test_down_leaves_nothing_behind(lab: LabEnv) -> None:
    state = lab.state()
    records = [ProcessRecord(name=p["name"], pid=p["pid"], start_time=p["start_time"],
                             argv=tuple(p["argv"])) for p in state["processes"].values()]
    names = {r.name for r in records}
    assert {"etcd", "apiserver", "registry", "supervisor"} <= names
    assert {f"nodeagent/{n}" for n in NODES} <= names
    assert {f"containerd/{n}" for n in NODES} <= names
    pidfiles = list(lab.dir.glob("nodes/*/containerd/state/shoal-containerd.pid"))
    down = lab.lab("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert [r.name for r in records if alive(r)] == []
    for pidfile in pidfiles:  # the containerd each agent runs now, whatever its PID
        assert not pidfile.exists() or not Path(f"/proc/{pidfile.read_text().strip()}").exists()
    assert _netns("shoal-") == set()
    assert _netns("cni-") - lab.cni_netns_before == set()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    names_left = [ln.split(":")[1].strip() for ln in links.splitlines()]
    assert [n for n in names_left if n == "shoal0" or n.startswith("shln-")] == []
    assert mounts_under(lab.dir) == []
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True,
                           check=True).stdout
    assert "SHOAL-LAB" not in rules
    again = lab.lab("down")  # idempotent
    assert again.returncode == 0, again.stdout + again.stderr
