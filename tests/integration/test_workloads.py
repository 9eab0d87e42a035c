"""ReplicaSets and Deployments in an in-process apiserver, with no nodes.

The controllers run inside the apiserver (``replicaset``, ``deployment``,
``garbagecollector``). Nothing runs the pods: the test plays the node agent
and marks pods Running and Ready itself (``UpdateStatus``), which is what
lets a rollout move on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace, leading_apiserver
from shoal.testing.waiting import eventually

CONTROLLERS = ("replicaset", "deployment", "garbagecollector")


@pytest.fixture(scope="module")
async def workloads_api(tmp_path_factory: pytest.TempPathFactory
                        ) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("workloads")
    async with leading_apiserver(data, controllers=CONTROLLERS) as api:
        yield api


@pytest.fixture
async def wl(workloads_api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(workloads_api, "wl") as c:
        yield c




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


# --------------------------------------------------------------------------- Deployment


async def replicasets_of(c: AsyncClient, app: str) -> list[apps_pb2.ReplicaSet]:
    got = await c.list(apps_pb2.ReplicaSet, label_selector=f"app={app}")
    return sorted(got.items, key=lambda r: r.metadata.annotations.get(
        "deployment.kubernetes.io/revision", ""))


def cond(d: apps_pb2.Deployment, type_: str) -> tuple[str, str]:
    for c in d.status.conditions:
        if c.type == type_:
            return c.status, c.reason
    return "", ""


async def rolled_out(c: AsyncClient, name: str, replicas: int) -> apps_pb2.Deployment | None:
    """Play the node agent until the Deployment reports a finished rollout."""
    await ready_all(c, name)
    d = await c.get(apps_pb2.Deployment, name)
    st = d.status
    done = (st.observed_generation >= d.metadata.generation
            and (st.replicas, st.updated_replicas, st.available_replicas) == (replicas,) * 3
            and cond(d, "Progressing") == ("True", "NewReplicaSetAvailable"))
    return d if done else None


async def test_deployment_creates_a_hashed_replicaset_and_reports_status(
        wl: AsyncClient) -> None:
    await wl.create(deployment("hello", 3))
    d = await eventually("rolled out", lambda: rolled_out(wl, "hello", 3))
    assert d.metadata.annotations["deployment.kubernetes.io/revision"] == "1"
    assert cond(d, "Available") == ("True", "MinimumReplicasAvailable")
    assert (d.status.ready_replicas, d.status.unavailable_replicas) == (3, 0)
    [rs] = await replicasets_of(wl, "hello")
    h = rs.spec.template.metadata.labels["pod-template-hash"]
    assert rs.metadata.name == f"hello-{h}"
    assert rs.spec.selector.match_labels["pod-template-hash"] == h
    assert rs.metadata.annotations["deployment.kubernetes.io/revision"] == "1"
    assert rs.metadata.owner_references[0].kind == "Deployment"
    for p in await pods_of(wl, "hello"):
        assert p.metadata.labels["pod-template-hash"] == h

    async def scaled_event() -> list[str]:
        events = (await wl.list(core_pb2.Event)).items
        return [e.message for e in events if e.reason == "ScalingReplicaSet"
                and e.involved_object.kind == "Deployment"
                and e.involved_object.name == "hello"]
    messages = await eventually("a ScalingReplicaSet event", scaled_event)
    assert messages == [f"Scaled up replica set hello-{h} to 3 from 0"]


async def test_rolling_update_never_drops_below_replicas_with_max_unavailable_zero(
        wl: AsyncClient) -> None:
    await wl.create(deployment("roll", 3, max_surge=1, max_unavailable=0))
    await eventually("v1 rolled out", lambda: rolled_out(wl, "roll", 3))
    d = await wl.get(apps_pb2.Deployment, "roll")
    d.spec.template.spec.containers[0].image = "busybox:v2"
    await wl.update(d)
    lowest = 3
    seen_rs = 0

    async def step() -> apps_pb2.Deployment | None:
        # One pod at a time becomes ready, as a slow node agent would make it.
        nonlocal lowest, seen_rs
        pods = await pods_of(wl, "roll")
        ready = [p for p in pods if is_ready(p)]
        lowest = min(lowest, len(ready))
        pending = [p for p in pods if not is_ready(p)]
        if pending:
            await make_ready(wl, pending[0])
        seen_rs = max(seen_rs, len(await replicasets_of(wl, "roll")))
        got = await wl.get(apps_pb2.Deployment, "roll")
        done = (got.status.observed_generation >= got.metadata.generation
                and got.status.updated_replicas == 3 and got.status.replicas == 3
                and got.status.available_replicas == 3)
        return got if done else None

    d = await eventually("v2 rolled out", step, timeout=30)
    assert lowest >= 3, f"ready pods went down to {lowest}"
    assert seen_rs == 2
    old, new = await replicasets_of(wl, "roll")
    assert (old.spec.replicas, new.spec.replicas) == (0, 3)
    assert new.metadata.annotations["deployment.kubernetes.io/revision"] == "2"
    assert d.metadata.annotations["deployment.kubernetes.io/revision"] == "2"
    images = {p.spec.containers[0].image for p in await pods_of(wl, "roll")}
    assert images == {"busybox:v2"}


async def test_undo_by_copying_an_old_template_makes_it_the_newest_revision(
        wl: AsyncClient) -> None:
    await wl.create(deployment("undo", 2))
    await eventually("v1", lambda: rolled_out(wl, "undo", 2))
    d = await wl.get(apps_pb2.Deployment, "undo")
    d.spec.template.spec.containers[0].image = "busybox:v2"
    await wl.update(d)

    async def v2() -> apps_pb2.Deployment | None:
        got = await rolled_out(wl, "undo", 2)
        return got if got and got.metadata.annotations.get(
            "deployment.kubernetes.io/revision") == "2" else None
    await eventually("v2", v2)
    rs1 = (await replicasets_of(wl, "undo"))[0]
    d = await wl.get(apps_pb2.Deployment, "undo")
    d.spec.template.CopyFrom(rs1.spec.template)
    del d.spec.template.metadata.labels["pod-template-hash"]
    await wl.update(d)  # what `shoal rollout undo` does

    async def back() -> list[apps_pb2.ReplicaSet] | None:
        got = await rolled_out(wl, "undo", 2)
        if got is None:
            return None
        rss = await replicasets_of(wl, "undo")
        revs = sorted((r.metadata.annotations["deployment.kubernetes.io/revision"],
                       r.spec.replicas) for r in rss)
        return rss if revs == [("2", 0), ("3", 2)] else None
    rss = await eventually("back on v1 as revision 3", back)
    again = next(r for r in rss if r.metadata.uid == rs1.metadata.uid)
    assert again.metadata.annotations["deployment.kubernetes.io/revision-history"] == "1"
    images = {p.spec.containers[0].image for p in await pods_of(wl, "undo")}
    assert images == {"busybox:v1"}


async def test_scaling_and_pause(wl: AsyncClient) -> None:
    await wl.create(deployment("pz", 2))
    await eventually("rolled out", lambda: rolled_out(wl, "pz", 2))
    d = await wl.get(apps_pb2.Deployment, "pz")
    d.spec.paused = True
    d = await wl.update(d)

    async def paused() -> bool:
        got = await wl.get(apps_pb2.Deployment, "pz")
        return cond(got, "Progressing") == ("Unknown", "DeploymentPaused")
    await eventually("Progressing=Unknown DeploymentPaused", paused)
    d = await wl.get(apps_pb2.Deployment, "pz")
    d.spec.template.spec.containers[0].image = "busybox:v2"
    d.spec.replicas = 4
    await wl.update(d)
    await eventually("scaled while paused", lambda: count_pods(wl, "pz", 4))
    await asyncio.sleep(0.5)
    assert len(await replicasets_of(wl, "pz")) == 1  # no rollout while paused
    d = await wl.get(apps_pb2.Deployment, "pz")
    d.spec.paused = False
    await wl.update(d)

    async def resumed() -> apps_pb2.Deployment | None:
        got = await rolled_out(wl, "pz", 4)
        return got if got and len(await replicasets_of(wl, "pz")) == 2 else None
    await eventually("rolled out after resume", resumed, timeout=30)
    images = {p.spec.containers[0].image for p in await pods_of(wl, "pz")}
    assert images == {"busybox:v2"}


async def test_progress_deadline_exceeded(wl: AsyncClient) -> None:
    await wl.create(deployment("stuck", 2, deadline=1))

    async def exceeded() -> apps_pb2.Deployment | None:
        got = await wl.get(apps_pb2.Deployment, "stuck")  # nobody makes its pods ready
        return got if cond(got, "Progressing") == ("False", "ProgressDeadlineExceeded") \
            else None
    d = await eventually("Progressing=False", exceeded, timeout=10)
    assert cond(d, "Available") == ("False", "MinimumReplicasUnavailable")
    await ready_all(wl, "stuck")
    await eventually("recovers once pods are ready", lambda: rolled_out(wl, "stuck", 2))


async def test_revision_history_limit_cleans_idle_replicasets(wl: AsyncClient) -> None:
    d = deployment("hist", 1)
    d.spec.revision_history_limit = 1
    await wl.create(d)
    for v in ("v2", "v3", "v4"):
        await eventually("rolled out", lambda: rolled_out(wl, "hist", 1))
        d = await wl.get(apps_pb2.Deployment, "hist")
        d.spec.template.spec.containers[0].image = f"busybox:{v}"
        await wl.update(d)

    async def trimmed() -> list[str] | None:
        await rolled_out(wl, "hist", 1)
        revs = [r.metadata.annotations["deployment.kubernetes.io/revision"]
                for r in await replicasets_of(wl, "hist")]
        return revs if revs == ["3", "4"] else None
    await eventually("one old revision kept", trimmed, timeout=30)


async def test_recreate_stops_old_pods_before_starting_new(wl: AsyncClient) -> None:
    d = deployment("rc", 2)
    d.spec.strategy.type = "Recreate"
    d.spec.strategy.ClearField("rolling_update")
    await wl.create(d)
    await eventually("rolled out", lambda: rolled_out(wl, "rc", 2))
    d = await wl.get(apps_pb2.Deployment, "rc")
    d.spec.template.spec.containers[0].image = "busybox:v2"
    await wl.update(d)

    async def step() -> apps_pb2.Deployment | None:
        pods = await pods_of(wl, "rc")
        assert len({p.spec.containers[0].image for p in pods}) <= 1, "old and new together"
        return await rolled_out(wl, "rc", 2)
    await eventually("recreated", step, timeout=30)


async def test_deleting_a_deployment_removes_replicasets_and_pods(wl: AsyncClient) -> None:
    await wl.create(deployment("gone", 2))
    await eventually("rolled out", lambda: rolled_out(wl, "gone", 2))
    await wl.delete(apps_pb2.Deployment, "gone")  # background propagation

    async def nothing_left() -> bool:
        return not await replicasets_of(wl, "gone") and not await pods_of(wl, "gone")
    await eventually("no ReplicaSet or Pod left", nothing_left)
