"""Autoscaling on the mesh's request rate (issue 11's Done-when), on ``shoal lab up --mesh``.

Runs with ``SHOAL_E2E_MESH=1`` (scripts/test.sh runs it in the mesh pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_hpa_mesh.py``.

Namespace ``hpa-mesh``: a Deployment ``web`` of the busybox test app
(:mod:`shoal.testing.meshapps`) behind Service web:80 (port name http, so the
meshagents see HTTP requests), and a client pod on node-1. Its HPA targets one
request per second per pod (``istio_requests_per_second``, from the
meshagents' ``istio_requests_total`` with reporter="destination"), between 1
and 3 replicas, with a 20 s scale-down stabilization window. The test sends
requests from the client pod's network namespace in bounded batches until the
Deployment has 3 replicas, then stops: the autoscaler holds 3 while the window
remembers the load (AbleToScale ScaleDownStabilized), then goes back to 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from shoal.api.apps.v1 import apps_pb2
from shoal.api.autoscaling.v2 import autoscaling_pb2 as pb
from shoal.api.core.v1 import core_pb2
from shoal.testing import meshapps, podnet
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "hpa-mesh"
WINDOW = 20
Cluster = Any


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


def _ready_web(cluster: Cluster) -> list[core_pb2.Pod]:
    return [p for p in cluster.client.list(core_pb2.Pod, namespace=NS,
                                           label_selector="app=web").items
            if not p.metadata.HasField("deletion_timestamp")
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)]


def _send(target: tuple[str, str], count: int) -> meshapps.Tally:
    """``count`` requests from the client pod (netns) to the Service's ClusterIP."""
    netns, ip = target
    return meshapps.send(netns, ip, 80, count=count, concurrency=2, timeout=10)


def autoscaler() -> pb.HorizontalPodAutoscaler:
    h = pb.HorizontalPodAutoscaler()
    h.metadata.name, h.metadata.namespace = "web", NS
    ref = h.spec.scale_target_ref
    ref.api_version, ref.kind, ref.name = "apps/v1", "Deployment", "web"
    h.spec.min_replicas, h.spec.max_replicas = 1, 3
    m = h.spec.metrics.add(type="Pods")
    m.pods.metric.name = "istio_requests_per_second"
    m.pods.target.type = "AverageValue"
    m.pods.target.average_value.value = "1"
    h.spec.behavior.scale_down.stabilization_window_seconds = WINDOW
    return h


@pytest.fixture(scope="module")
def client_netns(cluster: Cluster) -> Iterator[tuple[str, str]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    cluster.client.create(meshapps.app_deployment("web", NS, app="web", replicas=1))
    cluster.client.create(meshapps.http_service("web", NS, app="web"))
    cluster.client.create(meshapps.client_pod("client", NS, node="node-1"))
    client = wait_for("the client pod runs", partial(_running, cluster, "client"),
                      timeout=120)
    wait_for("web is ready", lambda: _ready_web(cluster) or None, timeout=120)
    ip = cluster.client.get(core_pb2.Service, "web", namespace=NS).spec.cluster_ip
    target = (podnet.pod_netns(client.status.pod_ip), ip)
    wait_for("web answers through the mesh", lambda: _send(target, 1).ok() == 1 or None,
             timeout=60)
    yield target
    cluster.shoal("delete", "namespace", NS, "--ignore-not-found")


def _replicas(cluster: Cluster) -> int:
    d = cluster.client.get(apps_pb2.Deployment, "web", namespace=NS)
    return int(d.spec.replicas)


def _hpa(cluster: Cluster) -> pb.HorizontalPodAutoscaler:
    return cluster.client.get(pb.HorizontalPodAutoscaler, "web", namespace=NS)


def _condition(h: pb.HorizontalPodAutoscaler, type_: str) -> tuple[str, str]:
    return next(((c.status, c.reason) for c in h.status.conditions if c.type == type_),
                ("", ""))


def test_request_rate_scales_1_to_3_and_back_after_the_window(cluster: Cluster,
                                                              client_netns: tuple[str, str]
                                                              ) -> None:
    cluster.client.create(autoscaler())
    # Two scrapes of the meshagents make a rate: then the metric is active (at 0 rps).
    wait_for("the HPA reads the mesh's request rate",
             lambda: _condition(_hpa(cluster), "ScalingActive")[0] == "True" or None,
             timeout=60)
    assert _replicas(cluster) == 1

    # Load, in bounded batches, until the autoscaler reacts (at most ~4 minutes).
    sent = 0
    deadline = time.monotonic() + 240
    while _replicas(cluster) < 3 and time.monotonic() < deadline:
        tally = _send(client_netns, 40)
        sent += tally.ok()
        # The load is real: the app answers (a request caught by a pod starting
        # or stopping may fail; that is not what this test is about).
        assert tally.ok() > 0, (tally.by_status, tally.errors[:3])
    assert _replicas(cluster) == 3, f"still {_replicas(cluster)} replicas after {sent} requests"
    h = _hpa(cluster)
    assert h.status.desired_replicas == 3
    [metric] = h.status.current_metrics
    assert metric.pods.metric.name == "istio_requests_per_second"
    wait_for("three web pods are ready", lambda: len(_ready_web(cluster)) == 3 or None,
             timeout=120)
    r = cluster.shoal("get", "hpa", "-n", NS)
    assert r.returncode == 0 and "Deployment/web" in r.stdout and \
        "istio_requests_per_second:" in r.stdout, r.stdout + r.stderr

    # No more load: the window keeps 3 for a while, then the count goes back to 1.
    reasons: set[str] = set()

    def scaled_down() -> bool:
        h = _hpa(cluster)
        reasons.add(_condition(h, "AbleToScale")[1])
        return _replicas(cluster) == 1

    wait_for("the HPA scales back to 1 after the window", scaled_down, timeout=WINDOW + 90)
    assert "ScaleDownStabilized" in reasons, reasons
    events = [e.message for e in cluster.client.list(core_pb2.Event, namespace=NS).items
              if e.reason == "SuccessfulRescale"]
    assert any(m.startswith("New size: 3;") for m in events), events
    assert any(m.startswith("New size: 1;") for m in events), events
