"""The node lifecycle controller in an in-process apiserver, with fake nodes and Leases.

The test plays the node agents: it creates Nodes and their Leases, renews the
Lease of a live node, and lets another go quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from apiserver.controllers.base import ControllerSettings
from shoal import errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import leading_apiserver
from shoal.testing.waiting import eventually

GRACE = 1.0
EVICTION = 1.0
AGENT_FINALIZER = "shoal.dev/nodeagent"


@pytest.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("nodelifecycle")
    settings = ControllerSettings(node_monitor_grace_period=GRACE,
                                  pod_eviction_timeout=EVICTION)
    async with leading_apiserver(data, controllers=("nodelifecycle",),
                                  controller_settings=settings) as srv:
        yield srv


@pytest.fixture
async def c(api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with api.client() as client:
        yield client




def _now_ts(ts: Any) -> None:
    ts.FromNanoseconds(time.time_ns())


async def make_node(c: AsyncClient, name: str) -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = name
    n.spec.pod_cidr = ""
    node = await c.create(n)
    await post_ready(c, name, "True")
    await renew(c, name)
    return node


async def post_ready(c: AsyncClient, name: str, status: str) -> None:
    for _ in range(10):
        node = await c.get(core_pb2.Node, name)
        del node.status.conditions[:]
        cond = node.status.conditions.add(type="Ready", status=status, reason="KubeletReady")
        _now_ts(cond.last_heartbeat_time)
        _now_ts(cond.last_transition_time)
        try:
            await c.update_status(node)
            return
        except errors.Conflict:
            continue  # node IPAM or the controller wrote meanwhile
    raise AssertionError(f"could not post status of {name}")


async def renew(c: AsyncClient, name: str) -> None:
    try:
        lease = await c.get(coordination_pb2.Lease, name, namespace="kube-node-lease")
    except errors.NotFound:
        lease = coordination_pb2.Lease()
        lease.metadata.name, lease.metadata.namespace = name, "kube-node-lease"
        lease.spec.holder_identity = name
        lease.spec.lease_duration_seconds = 40
        _now_ts(lease.spec.renew_time)
        await c.create(lease)
        return
    _now_ts(lease.spec.renew_time)
    await c.update(lease)


@contextlib.asynccontextmanager
async def heartbeat(c: AsyncClient, name: str) -> AsyncIterator[None]:
    async def beat() -> None:
        while True:
            await renew(c, name)
            await asyncio.sleep(0.2)
    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def make_pod(c: AsyncClient, name: str, node: str,
                   *tolerations: core_pb2.Toleration) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.namespace, p.metadata.name = "default", name
    p.metadata.finalizers.append(AGENT_FINALIZER)
    p.spec.node_name = node
    p.spec.containers.add(name="c", image="busybox")
    p.spec.tolerations.extend(tolerations)
    pod = await c.create(p)
    pod.status.phase = "Running"
    pod.status.conditions.add(type="Ready", status="True")
    return await c.update_status(pod)


def taint_keys(node: core_pb2.Node) -> set[tuple[str, str]]:
    return {(t.key, t.effect) for t in node.spec.taints}


async def gone(c: AsyncClient, name: str) -> bool:
    try:
        await c.get(core_pb2.Pod, name, namespace="default")
    except errors.NotFound:
        return True
    return False


async def events(c: AsyncClient, reason: str) -> list[core_pb2.Event]:
    got = await c.list(core_pb2.Event, namespace="")
    return [e for e in got.items if e.reason == reason]


async def test_a_silent_node_goes_unknown_tainted_and_its_pods_are_evicted(
        c: AsyncClient) -> None:
    await make_node(c, "live")
    await make_node(c, "quiet")
    forever = core_pb2.Toleration(key="node.kubernetes.io/unreachable", operator="Exists",
                                  effect="NoExecute")
    async with heartbeat(c, "live"):
        await make_pod(c, "evicted", "quiet")
        await make_pod(c, "stays", "quiet", forever)
        await make_pod(c, "elsewhere", "live")

        async def unknown() -> core_pb2.Node | None:
            node = await c.get(core_pb2.Node, "quiet")
            ready = next(x for x in node.status.conditions if x.type == "Ready")
            return node if ready.status == "Unknown" else None
        node = await eventually("quiet node Ready=Unknown", unknown)
        ready = next(x for x in node.status.conditions if x.type == "Ready")
        assert ready.reason == "NodeStatusUnknown"
        assert ready.message == "shoal-nodeagent stopped posting node status."

        async def tainted() -> bool:
            node = await c.get(core_pb2.Node, "quiet")
            return ("node.kubernetes.io/unreachable", "NoExecute") in taint_keys(node)
        await eventually("unreachable taint", tainted)

        # The pod without a toleration goes once the eviction timeout passes: the
        # agent's finalizer is removed for it, since the agent is unreachable.
        await eventually("pod evicted and gone", lambda: gone(c, "evicted"))
        stays = await c.get(core_pb2.Pod, "stays", namespace="default")
        assert not stays.metadata.HasField("deletion_timestamp")
        assert [x.status for x in stays.status.conditions if x.type == "Ready"] == ["False"]
        elsewhere = await c.get(core_pb2.Pod, "elsewhere", namespace="default")
        assert [x.status for x in elsewhere.status.conditions if x.type == "Ready"] == ["True"]

        live = await c.get(core_pb2.Node, "live")
        assert taint_keys(live) == set()
        assert [x.status for x in live.status.conditions if x.type == "Ready"] == ["True"]

        async def recorded() -> bool:
            ev = await events(c, "TaintManagerEviction")
            nn = await events(c, "NodeNotReady")
            return any(e.message == "Marking for deletion Pod default/evicted" for e in ev) \
                and any(e.involved_object.name == "quiet" for e in nn)
        await eventually("events recorded", recorded)

        # The agent comes back: Lease renewed and Ready=True posted; taints go.
        async with heartbeat(c, "quiet"):
            await post_ready(c, "quiet", "True")

            async def clean() -> bool:
                node = await c.get(core_pb2.Node, "quiet")
                return taint_keys(node) == set()
            await eventually("taints removed after recovery", clean)
            assert not await gone(c, "stays")


async def test_not_ready_node_gets_the_not_ready_taint_and_cordon_taints(
        c: AsyncClient) -> None:
    await make_node(c, "sick")
    async with heartbeat(c, "sick"):
        await post_ready(c, "sick", "False")

        async def not_ready() -> bool:
            node = await c.get(core_pb2.Node, "sick")
            return taint_keys(node) == {("node.kubernetes.io/not-ready", "NoSchedule"),
                                        ("node.kubernetes.io/not-ready", "NoExecute")}
        await eventually("not-ready taints", not_ready)
        await post_ready(c, "sick", "True")
        node = await c.get(core_pb2.Node, "sick")
        node.spec.unschedulable = True
        node.metadata.resource_version = ""  # a retrying read-modify-write
        await c.update(node)

        async def cordoned() -> bool:
            node = await c.get(core_pb2.Node, "sick")
            return taint_keys(node) == {("node.kubernetes.io/unschedulable", "NoSchedule")}
        await eventually("only the unschedulable taint", cordoned)
