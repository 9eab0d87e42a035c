"""Autoscaling on the 3-node lab: ``shoal top`` shows what the node agents sampled
from containerd, and a HorizontalPodAutoscaler on CPU utilization scales a
Deployment of busy-looping busybox pods up to its maxReplicas.

Each pod requests 100m and is capped at 200m of CPU (a CFS quota), so a busy
loop is 200% of its request against a 50% target, and three of them take at
most 0.6 of a core on the shared machine. The lab's HPA sync period is
shortened (conftest). Needs root; run with
``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_hpa.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.autoscaling.v2 import autoscaling_pb2
from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for as _wait_for

pytestmark = pytest.mark.e2e

NS = "hpa-e2e"
IMAGE = "docker.io/library/busybox:1.36"
Cluster = Any  # tests/e2e/conftest.py's Cluster

HPA = f"""\
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: busy
  namespace: {NS}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: busy
  minReplicas: 1
  maxReplicas: 3
  metrics:
  - type: Resource
    resource:
      name: cpu
      target:
        type: Utilization
        averageUtilization: 50
"""


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 120.0) -> Any:
    return _wait_for(what, check, timeout=timeout)


def busy() -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = "busy", NS
    d.spec.replicas = 1
    d.spec.selector.match_labels["app"] = "busy"
    d.spec.template.metadata.labels["app"] = "busy"
    pod = d.spec.template.spec
    pod.termination_grace_period_seconds = 1
    c = pod.containers.add(name="loop", image=IMAGE)
    c.command.extend(["sh", "-c", "while :; do :; done"])
    c.resources.requests["cpu"].value = "100m"
    c.resources.limits["cpu"].value = "200m"
    return d


def ready_pods(cluster: Cluster) -> list[core_pb2.Pod]:
    return [p for p in cluster.client.list(core_pb2.Pod, namespace=NS,
                                           label_selector="app=busy").items
            if not p.metadata.HasField("deletion_timestamp")
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)]


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    n = core_pb2.Namespace()
    n.metadata.name = NS
    try:
        cluster.client.create(n)
    except errors.AlreadyExists:
        pass
    yield NS
    cluster.shoal("delete", "namespace", NS, "--ignore-not-found")


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def test_top_and_a_cpu_autoscaler_scale_a_deployment_up(cluster: Cluster,
                                                         namespace: str) -> None:
    cluster.client.create(busy())
    (pod,) = wait_for("the busy pod is ready", lambda: ready_pods(cluster))

    def top_pods() -> list[list[str]] | None:
        r = cluster.shoal("top", "pods", "-n", NS)
        if r.returncode != 0:
            return None
        table = rows(r.stdout)
        # Busy but capped at 200m by its quota.
        busy_rows = [row for row in table[1:] if int(row[1].rstrip("m")) >= 100]
        return table if busy_rows else None

    table = wait_for("top pods shows the busy loop's CPU", top_pods)
    assert table[0] == ["NAME", "CPU(cores)", "MEMORY(bytes)"]
    name, cpu, mem = table[1]
    assert name == pod.metadata.name
    assert 100 <= int(cpu.rstrip("m")) <= 260, cpu  # the 200m quota, give or take a sample
    assert mem.endswith("Mi")

    r = cluster.shoal("top", "nodes")
    assert r.returncode == 0, r.stderr
    nodes = rows(r.stdout)
    assert nodes[0] == ["NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"]
    assert sorted(row[0] for row in nodes[1:]) == ["node-1", "node-2", "node-3"]
    assert all(row[1].endswith("m") and row[2].endswith("%") and row[3].endswith("Mi")
               for row in nodes[1:])

    r = cluster.shoal("top", "pods", "-A", "-l", "app=busy")
    assert rows(r.stdout)[0] == ["NAMESPACE", "NAME", "CPU(cores)", "MEMORY(bytes)"]

    path = cluster.dir / "hpa-busy.yaml"
    path.write_text(HPA)
    r = cluster.shoal("apply", "-f", str(path))
    assert r.returncode == 0, r.stderr

    def scaled() -> bool:
        d = cluster.client.get(apps_pb2.Deployment, "busy", namespace=NS)
        return bool(d.spec.replicas == 3)

    wait_for("the HPA scales the Deployment to 3", scaled)
    wait_for("three busy pods are ready", lambda: len(ready_pods(cluster)) == 3)

    hpa = cluster.client.get(autoscaling_pb2.HorizontalPodAutoscaler, "busy", namespace=NS)
    assert hpa.status.desired_replicas == 3
    conditions = {c.type: c.status for c in hpa.status.conditions}
    assert conditions["ScalingActive"] == "True"
    r = cluster.shoal("get", "hpa", "-n", NS)
    assert r.returncode == 0, r.stderr
    header, row = rows(r.stdout)[:2]
    assert header == ["NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS", "AGE"]
    assert row[:3] == ["busy", "Deployment/busy", "cpu:"]
    assert row[3].endswith("/50%") and row[4:6] == ["1", "3"], row
