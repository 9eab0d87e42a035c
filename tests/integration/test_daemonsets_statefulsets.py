"""DaemonSet and StatefulSet controllers in an in-process apiserver.

The test plays the scheduler and the node agents: it reads where a daemon pod
must go from its node affinity, and sets pod status (Running, Ready) itself.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from apiserver.controllers.daemonsets import target_node
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace, leading_apiserver
from shoal.testing.waiting import eventually


@pytest.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("workloads")
    async with leading_apiserver(data, controllers=("daemonset", "statefulset")) as srv:
        yield srv


@pytest.fixture
async def c(api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(api, "wl") as client:
        yield client




async def pods_of(c: AsyncClient, app: str) -> list[core_pb2.Pod]:
    got = await c.list(core_pb2.Pod, label_selector=f"app={app}")
    return [p for p in got.items if not p.metadata.HasField("deletion_timestamp")]


async def set_ready(c: AsyncClient, pod: core_pb2.Pod, ready: bool = True) -> None:
    for _ in range(10):
        fresh = await c.get(core_pb2.Pod, pod.metadata.name)
        del fresh.status.conditions[:]
        fresh.status.phase = "Running"
        fresh.status.conditions.add(type="Ready", status="True" if ready else "False")
        try:
            await c.update_status(fresh)
            return
        except errors.Conflict:
            continue
    raise AssertionError(f"could not set the status of {pod.metadata.name}")


# -- DaemonSet ------------------------------------------------------------------------------

async def make_node(c: AsyncClient, name: str, **labels: str) -> None:
    n = core_pb2.Node()
    n.metadata.name = name
    n.metadata.labels.update(labels)
    await c.create(n)


def daemonset(name: str, image: str = "busybox:1") -> apps_pb2.DaemonSet:
    d = apps_pb2.DaemonSet()
    d.metadata.name = name
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    d.spec.template.spec.containers.add(name="c", image=image)
    d.spec.template.spec.node_selector["ds-test"] = "yes"
    return d


async def test_daemonset_covers_nodes_follows_new_ones_and_rolls(c: AsyncClient) -> None:
    for n in ("ds-a", "ds-b"):
        await make_node(c, n, **{"ds-test": "yes"})
    await make_node(c, "ds-other")  # not selected
    await c.create(daemonset("agent"))

    async def on(nodes: set[str]) -> list[core_pb2.Pod] | None:
        pods = await pods_of(c, "agent")
        return pods if sorted(target_node(p) for p in pods) == sorted(nodes) else None
    pods = await eventually("one pod per selected node", lambda: on({"ds-a", "ds-b"}))
    for p in pods:
        assert not p.spec.node_name  # placed by affinity; the scheduler binds it
        keys = {t.key for t in p.spec.tolerations}
        assert "node.kubernetes.io/unreachable" in keys

    await make_node(c, "ds-c", **{"ds-test": "yes"})
    pods = await eventually("a node that joins later gets its pod",
                            lambda: on({"ds-a", "ds-b", "ds-c"}))
    for p in pods:
        await set_ready(c, p)

    async def status(want: tuple[int, ...]) -> bool:
        ds = await c.get(apps_pb2.DaemonSet, "agent")
        st = ds.status
        return (st.desired_number_scheduled, st.current_number_scheduled, st.number_ready,
                st.updated_number_scheduled, st.number_available,
                st.observed_generation) == want
    await eventually("status counts", lambda: status((3, 3, 3, 3, 3, 1)))
    old_hash = {p.metadata.labels["controller-revision-hash"] for p in pods}
    assert len(old_hash) == 1

    # A new template rolls over node by node; the test makes each new pod ready.
    ds = await c.get(apps_pb2.DaemonSet, "agent")
    ds.spec.template.spec.containers[0].image = "busybox:2"
    ds.metadata.resource_version = ""
    await c.update(ds)

    async def rolled() -> bool:
        pods = await pods_of(c, "agent")
        unready = 0
        for p in pods:
            if not any(x.type == "Ready" and x.status == "True" for x in p.status.conditions):
                unready += 1
                await set_ready(c, p)
        assert unready <= 1, "maxUnavailable 1: at most one node without a ready pod"
        images = sorted(p.spec.containers[0].image for p in pods)
        return images == ["busybox:2"] * 3
    await eventually("rolling update done", rolled, timeout=30)
    await eventually("status after the update", lambda: status((3, 3, 3, 3, 3, 2)))
    revs = await c.list(apps_pb2.ControllerRevision)
    assert sorted(r.revision for r in revs.items) == [1, 2]

    # A NoExecute taint the daemon does not tolerate removes its pod.
    node = await c.get(core_pb2.Node, "ds-c")
    node.spec.taints.add(key="dedicated", effect="NoExecute")
    node.metadata.resource_version = ""
    await c.update(node)
    await eventually("pod leaves a NoExecute-tainted node", lambda: on({"ds-a", "ds-b"}))
    events = await c.list(core_pb2.Event)
    assert any(e.reason == "SuccessfulCreate" and e.message.startswith("Created pod: agent-")
               for e in events.items)


# -- StatefulSet ----------------------------------------------------------------------------

def statefulset(name: str, replicas: int, *, parallel: bool = False) -> apps_pb2.StatefulSet:
    s = apps_pb2.StatefulSet()
    s.metadata.name = name
    s.spec.replicas = replicas
    s.spec.service_name = name
    s.spec.selector.match_labels["app"] = name
    s.spec.template.metadata.labels["app"] = name
    s.spec.template.spec.containers.add(name="c", image="busybox:1")
    if parallel:
        s.spec.pod_management_policy = "Parallel"
    return s


async def names(c: AsyncClient, app: str) -> list[str]:
    return sorted(p.metadata.name for p in await pods_of(c, app))


async def test_statefulset_starts_in_order_recreates_and_scales_down_in_reverse(
        c: AsyncClient) -> None:
    await c.create(statefulset("web", 3))
    for i in range(3):
        await eventually(f"web-{i} created", functools.partial(_has, c, "web", f"web-{i}"))
        # web-i is not Ready yet, so the next ordinal cannot exist.
        assert await names(c, "web") == [f"web-{k}" for k in range(i + 1)]
        pod = await c.get(core_pb2.Pod, f"web-{i}")
        assert (pod.spec.hostname, pod.spec.subdomain) == (f"web-{i}", "web")
        assert pod.metadata.labels["statefulset.kubernetes.io/pod-name"] == f"web-{i}"
        assert pod.metadata.labels["apps.kubernetes.io/pod-index"] == str(i)
        await set_ready(c, pod)

    async def status_ready() -> bool:
        s = await c.get(apps_pb2.StatefulSet, "web")
        st = s.status
        return (st.replicas, st.ready_replicas, st.current_replicas, st.updated_replicas,
                st.available_replicas) == (3, 3, 3, 3, 3) and \
            st.current_revision == st.update_revision != ""
    await eventually("status", status_ready)
    s = await c.get(apps_pb2.StatefulSet, "web")
    pod = await c.get(core_pb2.Pod, "web-1")
    assert pod.metadata.labels["controller-revision-hash"] == s.status.update_revision

    # A deleted pod comes back under the same name.
    await c.delete(core_pb2.Pod, "web-1")

    async def back() -> core_pb2.Pod | None:
        try:
            p = await c.get(core_pb2.Pod, "web-1")
        except errors.NotFound:
            return None
        return p if p.metadata.uid != pod.metadata.uid else None
    again = await eventually("web-1 recreated", back)
    await set_ready(c, again)

    # Scale down: the highest ordinal goes first, one at a time. A finalizer the
    # test holds keeps each deleted pod Terminating until the test lets it go.
    for name in ("web-1", "web-2"):
        await hold(c, name, True)
    s = await c.get(apps_pb2.StatefulSet, "web")
    s.spec.replicas = 1
    s.metadata.resource_version = ""  # a retrying read-modify-write
    await c.update(s)
    await eventually("web-2 terminating first", functools.partial(
        _terminating_are, c, "web", ["web-2"]))
    assert await _terminating_are(c, "web", ["web-2"])  # web-1 waits for web-2 to go
    await hold(c, "web-2", False)
    await eventually("then web-1", functools.partial(_terminating_are, c, "web", ["web-1"]))
    await hold(c, "web-1", False)
    await eventually("one pod left", lambda: _names_are(c, "web", ["web-0"]))
    events = await c.list(core_pb2.Event)
    messages = {e.message for e in events.items if e.reason == "SuccessfulCreate"}
    assert "create Pod web-0 in StatefulSet web successful" in messages


async def test_statefulset_rolling_update_in_reverse_with_partition(c: AsyncClient) -> None:
    await c.create(statefulset("db", 3, parallel=True))

    async def all_ready() -> bool:
        pods = await pods_of(c, "db")
        for p in pods:
            if not any(x.type == "Ready" and x.status == "True" for x in p.status.conditions):
                await set_ready(c, p)
        return len(pods) == 3
    await eventually("three pods at once (Parallel)", all_ready)
    s = await c.get(apps_pb2.StatefulSet, "db")
    s.spec.template.spec.containers[0].image = "busybox:2"
    s.spec.update_strategy.rolling_update.partition = 1
    s.metadata.resource_version = ""
    await c.update(s)

    async def images() -> dict[str, str]:
        await all_ready()
        return {p.metadata.name: p.spec.containers[0].image for p in await pods_of(c, "db")}

    async def updated() -> bool:
        return await images() == {"db-0": "busybox:1", "db-1": "busybox:2",
                                  "db-2": "busybox:2"}
    await eventually("ordinals >= partition updated", updated, timeout=30)
    s = await c.get(apps_pb2.StatefulSet, "db")
    assert s.status.current_revision != s.status.update_revision
    assert s.status.updated_replicas == 2


HOLD = "test.shoal.dev/hold"


async def hold(c: AsyncClient, name: str, on: bool) -> None:
    for _ in range(10):
        pod = await c.get(core_pb2.Pod, name)
        if on and HOLD not in pod.metadata.finalizers:
            pod.metadata.finalizers.append(HOLD)
        elif not on and HOLD in pod.metadata.finalizers:
            pod.metadata.finalizers.remove(HOLD)
        try:
            await c.update(pod)
            return
        except errors.Conflict:
            continue
    raise AssertionError(f"could not change the finalizers of {name}")


async def _terminating_are(c: AsyncClient, app: str, want: list[str]) -> bool:
    got = await c.list(core_pb2.Pod, label_selector=f"app={app}")
    return sorted(p.metadata.name for p in got.items
                  if p.metadata.HasField("deletion_timestamp")) == want


async def _has(c: AsyncClient, app: str, name: str) -> bool:
    return name in await names(c, app)


async def _names_are(c: AsyncClient, app: str, want: list[str]) -> Any:
    got = await c.list(core_pb2.Pod, label_selector=f"app={app}")
    if sorted(p.metadata.name for p in got.items) == want:
        return True
    return [(p.metadata.name, p.status.phase, [(x.type, x.status) for x in p.status.conditions],
             p.metadata.HasField("deletion_timestamp")) for p in got.items]
