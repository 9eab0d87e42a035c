"""Nodes on the 3-node lab: a DaemonSet on every node, a StatefulSet started in
order, drain/uncordon, and a stopped node whose pods move elsewhere.

The lab's apiserver runs every controller (scheduler, ReplicaSet, Deployment,
DaemonSet, StatefulSet, node lifecycle, garbage collector) with shortened node
timeouts: NotReady 8 s after the last Lease renewal, eviction 5 s later. Each
test leaves the lab as it found it (nodes Ready and schedulable). Needs root;
run with ``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_nodes.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shoal import config as configmod
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import Client
from shoal.testing.waiting import wait_for as _wait_for

pytestmark = pytest.mark.e2e

NS = "nodes-e2e"
NODES = ("node-1", "node-2", "node-3")
IMAGE = "docker.io/library/busybox:1.36"
UNREACHABLE = "node.kubernetes.io/unreachable"
Cluster = Any  # tests/e2e/conftest.py's Cluster (conftest modules are not importable)




def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 90.0) -> Any:
    return _wait_for(what, check, timeout=timeout)

def httpd_template(app: str) -> core_pb2.PodTemplateSpec:
    """busybox httpd with a readiness probe: Ready means serving."""
    t = core_pb2.PodTemplateSpec()
    t.metadata.labels["app"] = app
    t.spec.termination_grace_period_seconds = 2
    c = t.spec.containers.add(name="httpd", image=IMAGE)
    c.command.extend(["sh", "-c", "mkdir -p /www && hostname > /www/index.html "
                      "&& exec httpd -f -p 8080 -h /www"])
    c.ports.add(name="http", container_port=8080)
    probe = c.readiness_probe
    probe.http_get.path = "/"
    probe.http_get.port.int_val = 8080
    probe.period_seconds, probe.failure_threshold = 1, 1
    return t


def is_ready(p: core_pb2.Pod) -> bool:
    return (not p.metadata.HasField("deletion_timestamp")
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions))


def pods(cluster: Cluster, app: str) -> list[core_pb2.Pod]:
    return list(cluster.client.list(core_pb2.Pod, namespace=NS,
                                    label_selector=f"app={app}").items)


def live(cluster: Cluster, app: str) -> list[core_pb2.Pod]:
    return [p for p in pods(cluster, app) if not p.metadata.HasField("deletion_timestamp")]


def ready_status(node: core_pb2.Node) -> core_pb2.NodeCondition | None:
    return next((c for c in node.status.conditions if c.type == "Ready"), None)


def node_healthy(cluster: Cluster, name: str) -> bool:
    node = cluster.client.get(core_pb2.Node, name)
    ready = ready_status(node)
    return (ready is not None and ready.status == "True" and not node.spec.unschedulable
            and not any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints))


def deployment(name: str, replicas: int = 3) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, NS
    d.spec.replicas = replicas
    d.spec.selector.match_labels["app"] = name
    d.spec.template.CopyFrom(httpd_template(name))
    return d


def ready_on(cluster: Cluster, app: str, n: int) -> list[core_pb2.Pod] | None:
    running = [p for p in live(cluster, app) if is_ready(p)]
    return running if len(running) == n else None


@pytest.fixture(scope="module")
def ns(cluster: Cluster) -> Iterator[str]:
    n = core_pb2.Namespace()
    n.metadata.name = NS
    try:
        cluster.client.create(n)
    except errors.AlreadyExists:
        pass
    yield NS
    cluster.shoal("delete", "namespace", NS, "--ignore-not-found")


def test_a_daemonset_covers_every_node(cluster: Cluster, ns: str) -> None:
    ds = apps_pb2.DaemonSet()
    ds.metadata.name, ds.metadata.namespace = "everywhere", NS
    ds.spec.selector.match_labels["app"] = "everywhere"
    ds.spec.template.CopyFrom(httpd_template("everywhere"))
    cluster.client.create(ds)

    def one_running_pod_per_node() -> list[str] | None:
        running = [p for p in live(cluster, "everywhere")
                   if p.status.phase == "Running" and is_ready(p)]
        nodes = sorted(p.spec.node_name for p in running)
        return nodes if nodes == list(NODES) and len(live(cluster, "everywhere")) == 3 \
            else None
    wait_for("one Running pod of the DaemonSet on each node", one_running_pod_per_node)

    def status() -> bool:
        st = cluster.client.get(apps_pb2.DaemonSet, "everywhere", namespace=NS).status
        return (st.desired_number_scheduled, st.current_number_scheduled, st.number_ready,
                st.number_available, st.updated_number_scheduled) == (3, 3, 3, 3, 3)
    wait_for("DaemonSet status counts every node", status, timeout=30)
    cluster.client.delete(apps_pb2.DaemonSet, "everywhere", namespace=NS)
    wait_for("daemon pods deleted with their DaemonSet",
             lambda: not pods(cluster, "everywhere"))


class OrderRecorder:
    """Watches one app's pods and logs, in the server's order, when each pod was
    first seen (created) and first seen Ready."""

    def __init__(self, cluster: Cluster, app: str) -> None:
        self.client = Client(configmod.load(cluster.config), timeout=30)
        self.app = app
        self.log: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="order-recorder")

    def _run(self) -> None:
        try:
            for ev in self.client.watch(core_pb2.Pod, namespace=NS,
                                        label_selector=f"app={self.app}"):
                if ev.object is None or ev.type == "DELETED":
                    continue
                name = ev.object.metadata.name
                if ("created", name) not in self.log:
                    self.log.append(("created", name))
                if is_ready(ev.object) and ("ready", name) not in self.log:
                    self.log.append(("ready", name))
        except BaseException:
            return

    def __enter__(self) -> OrderRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.thread.join(timeout=10)


def test_a_statefulset_starts_web_0_1_2_in_order(cluster: Cluster, ns: str) -> None:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", NS
    svc.spec.cluster_ip = "None"
    svc.spec.selector["app"] = "web"
    svc.spec.ports.add(name="http", port=8080)
    cluster.client.create(svc)
    sts = apps_pb2.StatefulSet()
    sts.metadata.name, sts.metadata.namespace = "web", NS
    sts.spec.replicas = 3
    sts.spec.service_name = "web"
    sts.spec.selector.match_labels["app"] = "web"
    sts.spec.template.CopyFrom(httpd_template("web"))
    with OrderRecorder(cluster, "web") as recorder:
        cluster.client.create(sts)
        running = wait_for("web-0, web-1 and web-2 Ready", lambda: ready_on(cluster, "web", 3),
                           timeout=120)
        wait_for("the recorder saw web-2 Ready", lambda: ("ready", "web-2") in recorder.log,
                 timeout=10)
    log = recorder.log
    for i in range(2):
        assert log.index(("ready", f"web-{i}")) < log.index(("created", f"web-{i + 1}")), (
            f"web-{i + 1} was created before web-{i} was Ready: {log}")
    for p in running:
        assert p.spec.hostname == p.metadata.name and p.spec.subdomain == "web"
    st = cluster.client.get(apps_pb2.StatefulSet, "web", namespace=NS).status
    assert (st.replicas, st.ready_replicas) == (3, 3)
    assert st.current_revision == st.update_revision != ""
    cluster.client.delete(apps_pb2.StatefulSet, "web", namespace=NS)
    cluster.client.delete(core_pb2.Service, "web", namespace=NS)


def test_drain_moves_pods_off_a_node_and_uncordon_restores_it(cluster: Cluster,
                                                              ns: str) -> None:
    node = "node-2"
    cluster.client.create(deployment("drained"))
    wait_for("3 ready pods", lambda: ready_on(cluster, "drained", 3), timeout=120)
    try:
        # --force and --delete-emptydir-data: leftovers of other modules sharing the
        # lab must not stop the drain (the refusals have their integration test).
        out = cluster.shoal("drain", node, "--ignore-daemonsets", "--force",
                            "--delete-emptydir-data", "--timeout", "120s", timeout=180)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == f"node/{node} cordoned"
        assert out.stdout.splitlines()[-1] == f"node/{node} drained"
        assert cluster.client.get(core_pb2.Node, node).spec.unschedulable
        moved = wait_for("3 ready pods off the drained node",
                         lambda: ready_on(cluster, "drained", 3), timeout=120)
        assert node not in {p.spec.node_name for p in moved}
        assert not [p for p in cluster.client.list(
            core_pb2.Pod, all_namespaces=True, field_selector=f"spec.nodeName={node}").items
            if p.metadata.namespace == NS]

        # A pod that can only go to the cordoned node waits ...
        probe = core_pb2.Pod()
        probe.metadata.name, probe.metadata.namespace = "pinned", NS
        probe.spec.node_selector["kubernetes.io/hostname"] = node
        probe.spec.termination_grace_period_seconds = 1
        probe.spec.containers.add(name="c", image=IMAGE, command=["sleep", "3600"])
        cluster.client.create(probe)

        def unschedulable() -> bool:
            p = cluster.client.get(core_pb2.Pod, "pinned", namespace=NS)
            return any(c.type == "PodScheduled" and c.reason == "Unschedulable"
                       for c in p.status.conditions)
        wait_for("the pinned pod is Unschedulable while the node is cordoned", unschedulable,
                 timeout=30)
    finally:
        out = cluster.shoal("uncordon", node)
    assert out.returncode == 0 and out.stdout == f"node/{node} uncordoned\n", out.stderr
    # ... and runs there once it is uncordoned.
    def pinned_running() -> bool:
        p: core_pb2.Pod = cluster.client.get(core_pb2.Pod, "pinned", namespace=NS)
        return p.spec.node_name == node and p.status.phase == "Running"
    wait_for("the pinned pod runs on the uncordoned node", pinned_running, timeout=60)
    cluster.client.delete(core_pb2.Pod, "pinned", namespace=NS)
    cluster.client.delete(apps_pb2.Deployment, "drained", namespace=NS)


def test_a_stopped_node_goes_not_ready_and_its_pods_move(cluster: Cluster, ns: str) -> None:
    node = "node-3"
    cluster.client.create(deployment("mover"))
    before = wait_for("3 ready pods, one per node",
                      lambda: (r := ready_on(cluster, "mover", 3)) and
                      sorted(p.spec.node_name for p in r) == list(NODES) and r, timeout=120)
    doomed = {p.metadata.uid: p.metadata.name for p in before if p.spec.node_name == node}
    assert doomed
    t0 = time.monotonic()
    stopped = cluster.lab("stop-node", node)
    try:
        assert stopped.returncode == 0, stopped.stderr

        def unknown() -> core_pb2.Node | None:
            n = cluster.client.get(core_pb2.Node, node)
            ready = ready_status(n)
            return n if ready is not None and ready.status == "Unknown" else None
        n = wait_for("the stopped node's Ready condition is Unknown", unknown, timeout=60)
        t_unknown = time.monotonic() - t0
        ready = ready_status(n)
        assert ready is not None and ready.reason == "NodeStatusUnknown"
        wait_for("the unreachable NoExecute taint", lambda: any(
            t.key == UNREACHABLE and t.effect == "NoExecute"
            for t in cluster.client.get(core_pb2.Node, node).spec.taints), timeout=30)

        def moved() -> list[core_pb2.Pod] | None:
            running = ready_on(cluster, "mover", 3)
            if running is None or {p.metadata.uid for p in running} & doomed.keys():
                return None
            return running if node not in {p.spec.node_name for p in running} else None
        after = wait_for("its pods recreated and Ready on the other nodes", moved, timeout=90)
        # Figures for the record (pytest -s), not assertions.
        print(f"\nstop-node -> Ready=Unknown {t_unknown:.1f}s; -> pods Ready elsewhere "
              f"{time.monotonic() - t0:.1f}s")
        assert {p.spec.node_name for p in after} <= {"node-1", "node-2"}
        reasons = {(e.reason, e.involved_object.name) for e in cluster.client.list(
            core_pb2.Event, all_namespaces=True).items}
        assert ("NodeNotReady", node) in reasons
        assert any(("TaintManagerEviction", name) in reasons for name in doomed.values())
    finally:
        started = cluster.lab("start-node", node)
    assert started.returncode == 0, started.stderr
    wait_for(f"{node} Ready again, without taints", lambda: node_healthy(cluster, node),
             timeout=60)
    cluster.client.delete(apps_pb2.Deployment, "mover", namespace=NS)
