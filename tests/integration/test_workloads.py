"""ReplicaSets and Deployments in an in-process apiserver, with no nodes.

The controllers run inside the apiserver (``replicaset``, ``deployment``,
``garbagecollector``). Nothing runs the pods: the test plays the node agent
and marks pods Running and Ready itself (``UpdateStatus``), which is what
lets a rollout move on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer

CONTROLLERS = ("replicaset", "garbagecollector")


@pytest.fixture(scope="module")
async def workloads_api(tmp_path_factory: pytest.TempPathFactory
                        ) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("workloads")
    async with InProcessAPIServer(data, controllers=CONTROLLERS,
                                  leader_lease=(5.0, 4.0, 0.2)) as api:
        assert api.server is not None and api.server.controller_manager is not None
        async with asyncio.timeout(10):
            await api.server.controller_manager.leading.wait()
        yield api


@pytest.fixture
async def wl(workloads_api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with workloads_api.client() as c:
        ns = core_pb2.Namespace()
        ns.metadata.name = f"wl-{id(c) % 100000}-{int(time.time() * 1000) % 100000}"
        await c.create(ns)
        c.namespace = ns.metadata.name
        yield c


async def eventually(what: str, check: Callable[[], Awaitable[Any]], *,
                     timeout: float = 15.0) -> Any:
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await check()
                if last:
                    return last
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what} (last: {last!r})") from None


def template(spec: Any, app: str, image: str = "busybox:v1") -> None:
    spec.selector.match_labels["app"] = app
    spec.template.metadata.labels["app"] = app
    spec.template.spec.containers.add(name="c", image=image)


def replicaset(name: str, replicas: int) -> apps_pb2.ReplicaSet:
    r = apps_pb2.ReplicaSet()
    r.metadata.name = name
    r.spec.replicas = replicas
    template(r.spec, name)
    return r


def deployment(name: str, replicas: int, *, image: str = "busybox:v1",
               max_surge: int | str = 1, max_unavailable: int | str = 0,
               deadline: int | None = None) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name = name
    d.spec.replicas = replicas
    template(d.spec, name, image)
    rolling = d.spec.strategy.rolling_update
    for field, value in ((rolling.max_surge, max_surge),
                         (rolling.max_unavailable, max_unavailable)):
        if isinstance(value, int):
            field.int_val = value
        else:
            field.str_val = value
    if deadline is not None:
        d.spec.progress_deadline_seconds = deadline
    return d


async def pods_of(c: AsyncClient, app: str) -> list[core_pb2.Pod]:
    got = await c.list(core_pb2.Pod, label_selector=f"app={app}")
    return [p for p in got.items if not p.metadata.HasField("deletion_timestamp")]


async def count_pods(c: AsyncClient, app: str, n: int) -> list[core_pb2.Pod] | None:
    pods = await pods_of(c, app)
    return pods if len(pods) == n else None


async def make_ready(c: AsyncClient, pod: core_pb2.Pod, *, ready: bool = True) -> None:
    """What a node agent would report for a started pod."""
    for _ in range(5):
        try:
            fresh = await c.get(core_pb2.Pod, pod.metadata.name)
        except errors.NotFound:
            return
        if fresh.metadata.HasField("deletion_timestamp"):
            return
        fresh.status.phase = "Running"
        del fresh.status.conditions[:]
        cond = fresh.status.conditions.add(type="Ready", status="True" if ready else "False")
        cond.last_transition_time.seconds = int(time.time())
        try:
            await c.update_status(fresh)
            return
        except errors.Conflict:
            continue
        except errors.NotFound:
            return


def is_ready(p: core_pb2.Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)


async def ready_all(c: AsyncClient, app: str) -> int:
    """Mark every not-yet-ready pod of ``app`` ready; returns how many it marked."""
    n = 0
    for p in await pods_of(c, app):
        if not is_ready(p):
            await make_ready(c, p)
            n += 1
    return n


# --------------------------------------------------------------------------- ReplicaSet


async def test_replicaset_keeps_its_pods(wl: AsyncClient) -> None:
    await wl.create(replicaset("keep", 3))
    pods = await eventually("3 pods", lambda: count_pods(wl, "keep", 3))
    assert all(p.metadata.name.startswith("keep-") for p in pods)
    assert all(p.metadata.owner_references[0].kind == "ReplicaSet" for p in pods)
    await wl.delete(core_pb2.Pod, pods[0].metadata.name)
    again = await eventually("a replacement", lambda: count_pods(wl, "keep", 3))
    assert pods[0].metadata.name not in {p.metadata.name for p in again}
    for p in again:
        await make_ready(wl, p)

    async def status_counts() -> bool:
        st = (await wl.get(apps_pb2.ReplicaSet, "keep")).status
        return (st.replicas, st.ready_replicas, st.available_replicas,
                st.observed_generation) == (3, 3, 3, 1)
    await eventually("status counts the ready pods", status_counts)


async def test_replicaset_scales_up_and_down(wl: AsyncClient) -> None:
    r = await wl.create(replicaset("sc", 1))
    await eventually("1 pod", lambda: count_pods(wl, "sc", 1))
    r.spec.replicas = 4
    r.metadata.resource_version = ""  # the controller writes status meanwhile
    r = await wl.update(r)
    await eventually("4 pods", lambda: count_pods(wl, "sc", 4))
    r.spec.replicas = 2
    r.metadata.resource_version = ""
    await wl.update(r)
    await eventually("2 pods", lambda: count_pods(wl, "sc", 2))


async def test_replicaset_adopts_an_orphan_and_releases_a_relabelled_pod(
        wl: AsyncClient) -> None:
    orphan = core_pb2.Pod()
    orphan.metadata.name = "stray"
    orphan.metadata.labels["app"] = "adopt"
    orphan.spec.containers.add(name="c", image="busybox")
    await wl.create(orphan)
    await wl.create(replicaset("adopt", 2))
    await eventually("2 pods, one the orphan", lambda: count_pods(wl, "adopt", 2))

    async def adopted() -> bool:
        p = await wl.get(core_pb2.Pod, "stray")
        return [r.kind for r in p.metadata.owner_references] == ["ReplicaSet"]
    await eventually("orphan adopted", adopted)
    p = await wl.get(core_pb2.Pod, "stray")
    p.metadata.labels["app"] = "elsewhere"
    await wl.update(p)

    async def released() -> bool:
        q = await wl.get(core_pb2.Pod, "stray")
        return not q.metadata.owner_references
    await eventually("relabelled pod released", released)
    await eventually("replaced", lambda: count_pods(wl, "adopt", 2))
