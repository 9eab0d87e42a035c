"""The HorizontalPodAutoscaler controller against an in-process apiserver, with a
scripted metrics source: it scales a Deployment up on the mesh request rate,
writes the status and events a user sees, and scales back down once the
(shortened) stabilization window has passed. A bad HPA is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from apiserver.controllers.base import ControllerContext, ControllerSettings, SharedInformers
from apiserver.controllers.podautoscaler import HorizontalPodAutoscalerController
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.autoscaling.v2 import autoscaling_pb2 as pb
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.events import EventRecorder
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace


class ScriptedRates:
    """Every running pod gets ``rate`` requests per second."""

    def __init__(self) -> None:
        self.rate = 0.0

    async def resource_usage(self, *, namespace: str, selector: str,
                             resource: str) -> dict[str, float]:
        return {}

    async def pods_metric(self, *, namespace: str, metric: str,
                          pods: Sequence[core_pb2.Pod]) -> dict[str, float]:
        return {p.metadata.name: self.rate for p in pods if p.status.phase == "Running"}


@pytest.fixture
async def client(apiserver: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(apiserver, "hpa") as c:
        yield c


async def running_pod(client: AsyncClient, name: str) -> None:
    pod = core_pb2.Pod()
    pod.metadata.name = name
    pod.metadata.labels["app"] = "web"
    pod.spec.containers.add(name="app", image="busybox")
    created = await client.create(pod)
    created.status.phase = "Running"
    created.status.conditions.add(type="Ready", status="True")
    await client.update_status(created)


def deployment() -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name = "web"
    d.spec.replicas = 1
    d.spec.selector.match_labels["app"] = "web"
    d.spec.template.metadata.labels["app"] = "web"
    d.spec.template.spec.containers.add(name="app", image="busybox")
    return d


def autoscaler(window: int) -> pb.HorizontalPodAutoscaler:
    h = pb.HorizontalPodAutoscaler()
    h.metadata.name = "web"
    ref = h.spec.scale_target_ref
    ref.api_version, ref.kind, ref.name = "apps/v1", "Deployment", "web"
    h.spec.min_replicas, h.spec.max_replicas = 1, 3
    m = h.spec.metrics.add(type="Pods")
    m.pods.metric.name = "istio_requests_per_second"
    m.pods.target.type = "AverageValue"
    m.pods.target.average_value.value = "1"
    h.spec.behavior.scale_down.stabilization_window_seconds = window
    return h


async def eventually(what: str, check: Any, timeout: float = 20.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            got = await check()
            if got:
                return got
            await asyncio.sleep(0.1)
    raise AssertionError(what)  # pragma: no cover


async def test_scales_up_on_request_rate_and_down_after_the_window(
        client: AsyncClient) -> None:
    rates = ScriptedRates()
    ctrl = HorizontalPodAutoscalerController(source=rates)
    informers = SharedInformers(client)
    events = EventRecorder(client, component="test-hpa")
    ctx = ControllerContext(client=client, informers=informers, events=events,
                            settings=ControllerSettings(hpa_sync_period=0.3))
    ctrl.setup(ctx)
    informers.start()
    await client.create(deployment())
    await running_pod(client, "web-a")
    await running_pod(client, "web-b")
    rates.rate = 5.0  # 10 rps over two pods against 1 per pod: as many as allowed, 3
    await client.create(autoscaler(window=2))
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(ctrl.run(ctx)), tg.create_task(events.run())]
        try:
            async def replicas() -> int:
                d = await client.get(apps_pb2.Deployment, "web")
                return int(d.spec.replicas)

            await eventually("scaled to 3", lambda: _equals(replicas, 3))
            h = await client.get(pb.HorizontalPodAutoscaler, "web")
            assert h.status.desired_replicas == 3
            assert h.status.HasField("last_scale_time")
            conditions = {c.type: (c.status, c.reason) for c in h.status.conditions}
            assert conditions["AbleToScale"][0] == "True"  # SucceededRescale, then Ready...
            assert conditions["ScalingActive"] == ("True", "ValidMetricFound")
            assert conditions["ScalingLimited"] == ("True", "TooManyReplicas")
            [m] = h.status.current_metrics
            assert m.pods.metric.name == "istio_requests_per_second"
            assert m.pods.current.average_value.value == "5"

            rates.rate = 0.0
            await eventually("back to 1", lambda: _equals(replicas, 1))
            listed = await client.list(core_pb2.Event)
            reasons = [(e.reason, e.message) for e in listed.items
                       if e.involved_object.kind == "HorizontalPodAutoscaler"]
            assert ("SuccessfulRescale", "New size: 3; reason: pods metric "
                    "istio_requests_per_second above target") in reasons
            assert any(r == "SuccessfulRescale" and m.startswith("New size: 1")
                       for r, m in reasons)
        finally:
            for t in tasks:
                t.cancel()
            informers.stop()


async def _equals(read: Any, want: int) -> bool:
    return bool(await read() == want)


async def test_an_invalid_autoscaler_is_refused(client: AsyncClient) -> None:
    h = autoscaler(window=0)
    h.spec.min_replicas, h.spec.max_replicas = 4, 2
    h.spec.scale_target_ref.kind = "DaemonSet"
    with pytest.raises(errors.Invalid) as e:
        await client.create(h)
    assert "spec.maxReplicas" in str(e.value) and "spec.scaleTargetRef.kind" in str(e.value)
