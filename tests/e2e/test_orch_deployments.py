"""Deployments on the 3-node lab: spread, a rolling update that never loses a ready
pod, ``rollout undo``, garbage collection, and ``rollout status`` on a bad image.

Pods are busybox httpd serving their version; v1 and v2 are the same image with
a different ``VERSION`` in the environment (a different template, so a new
ReplicaSet). A readiness probe fetches the page, so Ready means serving. The
scheduler, the ReplicaSet and Deployment controllers and the garbage collector
run in the lab's apiserver. Needs root; run with
``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_deployments.py``.
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

NS = "deploy-e2e"
NODES = ("node-1", "node-2", "node-3")
IMAGE = "docker.io/library/busybox:1.36"
MISSING_IMAGE = "docker.io/library/busybox:no-such-tag"
Cluster = Any  # tests/e2e/conftest.py's Cluster (conftest modules are not importable)




def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 90.0) -> Any:
    return _wait_for(what, check, timeout=timeout)

def deployment(name: str, *, version: str = "v1", replicas: int = 3,
               image: str = IMAGE) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, NS
    d.spec.replicas = replicas
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    rolling = d.spec.strategy.rolling_update
    rolling.max_surge.int_val, rolling.max_unavailable.int_val = 1, 0
    d.spec.progress_deadline_seconds = 120
    pod = d.spec.template.spec
    pod.termination_grace_period_seconds = 2
    c = pod.containers.add(name="httpd", image=image)
    c.env.add(name="VERSION", value=version)
    c.command.extend(["sh", "-c", 'mkdir -p /www && echo "$VERSION" > /www/index.html '
                      "&& exec httpd -f -p 8080 -h /www"])
    c.ports.add(name="http", container_port=8080)
    probe = c.readiness_probe
    probe.http_get.path = "/"
    probe.http_get.port.int_val = 8080
    probe.period_seconds, probe.failure_threshold = 1, 1
    return d


def version_of(spec: Any) -> str:
    return next(e.value for e in spec.containers[0].env if e.name == "VERSION")


def is_ready(p: core_pb2.Pod) -> bool:
    return (not p.metadata.HasField("deletion_timestamp")
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions))


def pods(cluster: Cluster, app: str) -> list[core_pb2.Pod]:
    return list(cluster.client.list(core_pb2.Pod, namespace=NS,
                                    label_selector=f"app={app}").items)


def replicasets(cluster: Cluster, app: str) -> list[apps_pb2.ReplicaSet]:
    return list(cluster.client.list(apps_pb2.ReplicaSet, namespace=NS,
                                    label_selector=f"app={app}").items)


def rollout_status(cluster: Cluster, name: str, timeout: str = "150s") -> Any:
    return cluster.shoal("rollout", "status", f"deployment/{name}", "-n", NS,
                         f"--timeout={timeout}", timeout=200)


def apiserver_log(cluster: Cluster, lines: int = 40) -> str:
    """The end of the lab apiserver's log (where the controllers run), for failures."""
    try:
        text = (cluster.dir / "logs" / "apiserver.log").read_text(errors="replace")
    except OSError as e:
        return f"(no apiserver log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def rolled_out(cluster: Cluster, name: str) -> Any:
    done = rollout_status(cluster, name)
    assert done.returncode == 0, (f"{done.stdout}{done.stderr}\napiserver log:\n"
                                  f"{apiserver_log(cluster)}")
    assert f'deployment "{name}" successfully rolled out' in done.stdout
    return done


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


class ReadyWatcher:
    """Watches the pods of one app in a thread and remembers the fewest ready
    (and not terminating) pods it saw once it was armed."""

    def __init__(self, cluster: Cluster, app: str) -> None:
        self.client = Client(configmod.load(cluster.config), timeout=30)
        self.app = app
        self.ready: dict[str, bool] = {}
        self.names: set[str] = set()  # every pod seen after arming
        self.lowest: int | None = None
        self.armed = threading.Event()
        self.seen_three = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name="ready-watcher")

    def _run(self) -> None:
        try:
            for ev in self.client.watch(core_pb2.Pod, namespace=NS,
                                        label_selector=f"app={self.app}"):
                if ev.object is None:
                    continue
                name = ev.object.metadata.name
                if ev.type == "DELETED":
                    self.ready.pop(name, None)
                else:
                    self.ready[name] = is_ready(ev.object)
                count = sum(self.ready.values())
                if count >= 3:
                    self.seen_three.set()
                if self.armed.is_set():
                    self.names.add(name)
                    self.lowest = count if self.lowest is None else min(self.lowest, count)
        except BaseException as e:  # the client closed under us ends the watch
            self.errors.append(e)

    def __enter__(self) -> ReadyWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.thread.join(timeout=10)


def test_three_replicas_spread_over_the_three_nodes(cluster: Cluster, ns: str) -> None:
    cluster.client.create(deployment("spread"))
    rolled_out(cluster, "spread")
    running = [p for p in pods(cluster, "spread") if is_ready(p)]
    assert sorted(p.spec.node_name for p in running) == list(NODES)


def test_rolling_update_keeps_three_ready_pods_then_undo(cluster: Cluster, ns: str) -> None:
    cluster.client.create(deployment("roll"))
    rolled_out(cluster, "roll")
    [rs1] = replicasets(cluster, "roll")
    with ReadyWatcher(cluster, "roll") as watcher:
        wait_for("the watcher sees the 3 ready v1 pods", watcher.seen_three.is_set)
        watcher.armed.set()
        d = cluster.client.get(apps_pb2.Deployment, "roll", namespace=NS)
        d.spec.template.spec.containers[0].env[0].value = "v2"
        cluster.client.update(d)
        done = rolled_out(cluster, "roll")
        assert "Waiting for deployment" in done.stdout
        time.sleep(1)  # let the last events of the rollout reach the watcher
    assert watcher.lowest is not None and watcher.lowest >= 3, (
        f"only {watcher.lowest} ready pods during the rolling update")
    assert len(watcher.names) >= 6, f"the watcher saw only {sorted(watcher.names)}"
    live = [p for p in pods(cluster, "roll") if not p.metadata.HasField("deletion_timestamp")]
    assert {version_of(p.spec) for p in live} == {"v2"}
    assert len(replicasets(cluster, "roll")) == 2

    undo = cluster.shoal("rollout", "undo", "deployment/roll", "-n", NS)
    assert undo.returncode == 0 and "rolled back" in undo.stdout, undo.stderr
    rolled_out(cluster, "roll")
    d = cluster.client.get(apps_pb2.Deployment, "roll", namespace=NS)
    assert version_of(d.spec.template.spec) == "v1"
    assert d.metadata.annotations["deployment.kubernetes.io/revision"] == "3"

    def only_v1() -> bool:
        live = [p for p in pods(cluster, "roll") if not p.metadata.HasField("deletion_timestamp")]
        return len(live) == 3 and {version_of(p.spec) for p in live} == {"v1"} and all(
            p.metadata.labels["pod-template-hash"]
            == rs1.spec.template.metadata.labels["pod-template-hash"] for p in live)
    wait_for("v1 pods of the first ReplicaSet only", only_v1)
    history = cluster.shoal("rollout", "history", "deployment/roll", "-n", NS)
    assert [ln.split()[0] for ln in history.stdout.splitlines()[2:] if ln] == ["2", "3"]


def test_deleting_a_deployment_leaves_nothing_behind(cluster: Cluster, ns: str) -> None:
    cluster.client.create(deployment("doomed", replicas=2))
    rolled_out(cluster, "doomed")
    d = cluster.client.get(apps_pb2.Deployment, "doomed", namespace=NS)
    d.spec.template.spec.containers[0].env[0].value = "v2"
    cluster.client.update(d)  # two ReplicaSets to collect
    rolled_out(cluster, "doomed")
    assert len(replicasets(cluster, "doomed")) == 2
    gone = cluster.shoal("delete", "deployment", "doomed", "-n", NS)
    assert gone.returncode == 0, gone.stderr
    wait_for("no ReplicaSet and no Pod left",
             lambda: not replicasets(cluster, "doomed") and not pods(cluster, "doomed"))


def test_rollout_status_names_an_image_pull_failure(cluster: Cluster, ns: str) -> None:
    cluster.client.create(deployment("broken", replicas=1, image=MISSING_IMAGE))
    r = rollout_status(cluster, "broken", timeout="120s")
    assert r.returncode != 0
    assert "ImagePullBackOff" in r.stderr or "ErrImagePull" in r.stderr, r.stderr
    assert "pod broken-" in r.stderr
    cluster.shoal("delete", "deployment", "broken", "-n", NS)
