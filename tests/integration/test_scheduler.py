"""The scheduler in an in-process apiserver, on fake Nodes made through the client."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import leading_apiserver
from shoal.testing.waiting import eventually

NS = "default"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[InProcessAPIServer]:
    async with leading_apiserver(tmp_path, controllers=("scheduler",)) as api:
        yield api


@pytest.fixture
async def c(api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with api.client() as client:
        client.namespace = NS
        yield client




def node(name: str, *, cpu: str = "4", memory: str = "8Gi", pods: str = "110",
         ready: str = "True", taints: tuple[tuple[str, str, str], ...] = (),
         unschedulable: bool = False, labels: dict[str, str] | None = None) -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = name
    n.metadata.labels.update({"kubernetes.io/hostname": name, **(labels or {})})
    n.spec.unschedulable = unschedulable
    for key, value, effect in taints:
        n.spec.taints.add(key=key, value=value, effect=effect)
    for k, v in (("cpu", cpu), ("memory", memory), ("pods", pods)):
        n.status.allocatable[k].value = v
        n.status.capacity[k].value = v
    n.status.conditions.add(type="Ready", status=ready, reason="NodeReady")
    return n


def pod(name: str, *, cpu: str = "", owner: str = "", tolerate: str = "",
        selector: dict[str, str] | None = None, anti: str = "") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.metadata.labels["app"] = anti or name
    c = p.spec.containers.add(name="c", image="busybox")
    if cpu:
        c.resources.requests["cpu"].value = cpu
    if owner:
        p.metadata.owner_references.add(api_version="apps/v1", kind="ReplicaSet", name="rs",
                                         uid=owner, controller=True)
    if tolerate:
        p.spec.tolerations.add(key=tolerate, operator="Exists", effect="NoSchedule")
    if selector:
        p.spec.node_selector.update(selector)
    if anti:
        term = p.spec.affinity.pod_anti_affinity.\
            required_during_scheduling_ignored_during_execution.add(
                topology_key="kubernetes.io/hostname")
        term.label_selector.match_labels["app"] = anti
    return p


async def add_nodes(c: AsyncClient, *nodes: core_pb2.Node) -> None:
    for n in nodes:
        await c.create(n)


async def bound_to(c: AsyncClient, name: str) -> str:
    async def check() -> str:
        return (await c.get(core_pb2.Pod, name)).spec.node_name
    return str(await eventually(f"pod {name} bound", check))


async def unschedulable_message(c: AsyncClient, name: str) -> str:
    async def check() -> str:
        p = await c.get(core_pb2.Pod, name)
        for cond in p.status.conditions:
            if cond.type == "PodScheduled" and cond.status == "False":
                assert cond.reason == "Unschedulable"
                return cond.message
        return ""
    return str(await eventually(f"pod {name} marked unschedulable", check))


async def events_for(c: AsyncClient, name: str, reason: str) -> list[core_pb2.Event]:
    evs = (await c.list(core_pb2.Event)).items
    return [e for e in evs if e.involved_object.name == name and e.reason == reason]


async def test_pods_of_one_owner_spread_over_nodes(c: AsyncClient) -> None:
    await add_nodes(c, node("n1"), node("n2"), node("n3"))
    for i in range(6):
        await c.create(pod(f"web-{i}", owner="rs-uid-1"))
    placed = Counter([await bound_to(c, f"web-{i}") for i in range(6)])
    assert placed == {"n1": 2, "n2": 2, "n3": 2}


async def test_scheduled_event_names_pod_and_node(c: AsyncClient) -> None:
    await add_nodes(c, node("n1"))
    await c.create(pod("p"))
    assert await bound_to(c, "p") == "n1"

    async def scheduled() -> list[core_pb2.Event]:
        return await events_for(c, "p", "Scheduled")
    ev = (await eventually("Scheduled event", scheduled))[0]
    assert ev.type == "Normal"
    assert ev.message == "Successfully assigned default/p to n1"


async def test_full_tainted_and_cordoned_nodes_refuse_with_counted_reasons(
        c: AsyncClient) -> None:
    await add_nodes(c, node("small-1", cpu="1"), node("small-2", cpu="1"),
                    node("gpu", cpu="8", taints=(("dedicated", "gpu", "NoSchedule"),)),
                    node("off", cpu="8", unschedulable=True))
    for name in ("small-1", "small-2"):
        await c.create(pod(f"fill-{name}", cpu="800m",
                           selector={"kubernetes.io/hostname": name}))
        assert await bound_to(c, f"fill-{name}") == name
    await c.create(pod("mid", cpu="500m"))
    assert await unschedulable_message(c, "mid") == (
        "0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, "
        "1 node(s) were unschedulable, 2 Insufficient cpu.")

    async def failed() -> list[core_pb2.Event]:
        return await events_for(c, "mid", "FailedScheduling")
    ev = (await eventually("FailedScheduling event", failed))[0]
    assert ev.type == "Warning" and ev.message.startswith("0/4 nodes are available")

    await c.create(pod("gpu-job", cpu="500m", tolerate="dedicated"))
    assert await bound_to(c, "gpu-job") == "gpu"

    off = await c.get(core_pb2.Node, "off")
    off.spec.unschedulable = False
    await c.update(off)
    assert await bound_to(c, "mid") == "off"


async def test_not_ready_node_is_skipped(c: AsyncClient) -> None:
    await add_nodes(c, node("down", ready="False"), node("up"))
    for i in range(3):
        await c.create(pod(f"p-{i}"))
    assert {await bound_to(c, f"p-{i}") for i in range(3)} == {"up"}


async def test_required_anti_affinity_one_per_node(c: AsyncClient) -> None:
    await add_nodes(c, node("n1"), node("n2"))
    for i in range(3):
        await c.create(pod(f"db-{i}", anti="db"))
    first = {await bound_to(c, f"db-{i}") for i in range(2)}
    assert first == {"n1", "n2"}
    assert await unschedulable_message(c, "db-2") == (
        "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.")
    await c.delete(core_pb2.Pod, "db-0")
    assert await bound_to(c, "db-2") in {"n1", "n2"}


async def test_pending_pod_is_scheduled_once_a_node_is_added(c: AsyncClient) -> None:
    await c.create(pod("early"))
    assert await unschedulable_message(c, "early") == "no nodes available to schedule pods"
    await add_nodes(c, node("late"))
    assert await bound_to(c, "early") == "late"


async def test_a_bound_pod_cannot_be_bound_again(c: AsyncClient) -> None:
    p = pod("manual")
    p.spec.scheduler_name = "someone-else"      # the scheduler leaves it alone
    created = await c.create(p)
    created.spec.node_name = "n1"
    bound = await c.update(created)
    assert bound.spec.node_name == "n1"
    again = core_pb2.Pod()
    again.CopyFrom(bound)
    again.spec.node_name = "n2"
    again.metadata.resource_version = ""
    with pytest.raises(errors.Conflict, match='already assigned to node "n1"'):
        await c.update(again)
    # A stale binding (old resourceVersion) is a Conflict too.
    created.spec.node_name = "n2"
    with pytest.raises(errors.Conflict):
        await c.update(created)
    assert (await c.get(core_pb2.Pod, "manual")).spec.node_name == "n1"
