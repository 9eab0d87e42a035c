"""Which pods the mesh agent captures, and how it names workloads (pure)."""

from __future__ import annotations

import pytest

from meshagent.daemon import captured, workload_name
from shoal.api.core.v1 import core_pb2


def pod(*, ip: str = "10.244.1.5", labels: dict[str, str] | None = None, phase: str = "Running",
        host_network: bool = False, ns: str = "shop") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = "web-1", ns
    p.metadata.labels.update(labels or {})
    p.spec.host_network = host_network
    p.status.pod_ip, p.status.phase = ip, phase
    return p


def namespace(name: str, labels: dict[str, str]) -> core_pb2.Namespace:
    n = core_pb2.Namespace()
    n.metadata.name = name
    n.metadata.labels.update(labels)
    return n


@pytest.mark.parametrize(("p", "nss", "out"), [
    (pod(), {}, True),
    (pod(ip=""), {}, False),  # no IP yet
    (pod(host_network=True), {}, False),
    (pod(phase="Succeeded"), {}, False),
    (pod(labels={"shoal.dev/mesh": "disabled"}), {}, False),
    (pod(), {"shop": namespace("shop", {"istio.io/dataplane-mode": "none"})}, False),
    (pod(), {"other": namespace("other", {"shoal.dev/mesh": "disabled"})}, True),
])
def test_captured(p: core_pb2.Pod, nss: dict[str, core_pb2.Namespace], out: bool) -> None:
    assert captured(p, nss) is out


@pytest.mark.parametrize(("labels", "name"), [
    ({}, "web-1"), ({"app": "web"}, "web"),
    ({"app": "web", "app.kubernetes.io/name": "shopfront"}, "shopfront")])
def test_workload_name(labels: dict[str, str], name: str) -> None:
    assert workload_name(pod(labels=labels)) == name
