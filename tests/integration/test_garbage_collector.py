"""The garbage collector in an in-process apiserver: background, foreground, orphan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace, leading_apiserver
from shoal.testing.waiting import eventually

HOLD = "test.shoal.dev/hold"


@pytest.fixture(scope="module")
async def gc_api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("gc")
    async with leading_apiserver(data, controllers=("garbagecollector",)) as api:
        yield api


@pytest.fixture
async def gc(gc_api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(gc_api, "gc") as c:
        yield c




async def gone(c: AsyncClient, kind: type[Any], name: str) -> bool:
    try:
        await c.get(kind, name)
    except errors.NotFound:
        return True
    return False


def owned(obj: Any, owner: Any, *, kind: str = "ConfigMap", block: bool = False) -> Any:
    ref = obj.metadata.owner_references.add(api_version="v1", kind=kind,
                                            name=owner.metadata.name, uid=owner.metadata.uid)
    if block:
        ref.block_owner_deletion = True
    return obj


def cm(name: str, *finalizers: str) -> core_pb2.ConfigMap:
    c = core_pb2.ConfigMap()
    c.metadata.name = name
    c.metadata.finalizers.extend(finalizers)
    return c


def pod(name: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.spec.containers.add(name="c", image="busybox")
    return p


async def test_background_deletes_dependents_after_the_owner(gc: AsyncClient) -> None:
    owner = await gc.create(cm("owner"))
    await gc.create(owned(cm("dep"), owner))
    await gc.create(owned(pod("p"), owner))
    other = await gc.create(cm("other"))
    await gc.create(owned(owned(cm("two-owners"), owner), other))
    await gc.delete(core_pb2.ConfigMap, "owner")  # default: Background
    assert await gone(gc, core_pb2.ConfigMap, "owner")  # the owner goes at once
    await eventually("dependents deleted", lambda: _all_gone(
        gc, [(core_pb2.ConfigMap, "dep"), (core_pb2.Pod, "p")]))
    # A dependent with another live owner stays; only the dangling reference goes.
    async def released() -> bool:
        two = await gc.get(core_pb2.ConfigMap, "two-owners")
        return [r.name for r in two.metadata.owner_references] == ["other"]
    await eventually("dangling reference dropped", released)


async def _all_gone(c: AsyncClient, objs: list[tuple[type[Any], str]]) -> bool:
    for kind, name in objs:
        if not await gone(c, kind, name):
            return False
    return True


async def test_foreground_waits_for_blocking_dependents(gc: AsyncClient) -> None:
    owner = await gc.create(cm("fg-owner"))
    await gc.create(owned(cm("fg-blocker", HOLD), owner, block=True))
    await gc.create(owned(cm("fg-free"), owner))
    marked = await gc.delete(core_pb2.ConfigMap, "fg-owner", propagation_policy="Foreground")
    assert marked.metadata.HasField("deletion_timestamp")
    assert "foregroundDeletion" in marked.metadata.finalizers
    # Dependents are deleted first; the blocker is held by its own finalizer.
    async def blocker_terminating() -> bool:
        b = await gc.get(core_pb2.ConfigMap, "fg-blocker")
        return b.metadata.HasField("deletion_timestamp")
    await eventually("blocker marked for deletion", blocker_terminating)
    await eventually("free dependent deleted", lambda: gone(gc, core_pb2.ConfigMap, "fg-free"))
    await asyncio.sleep(0.5)
    still = await gc.get(core_pb2.ConfigMap, "fg-owner")  # waits for the blocker
    assert "foregroundDeletion" in still.metadata.finalizers
    b = await gc.get(core_pb2.ConfigMap, "fg-blocker")
    b.metadata.finalizers.remove(HOLD)
    await gc.update(b)
    await eventually("owner gone after its blocker",
                     lambda: gone(gc, core_pb2.ConfigMap, "fg-owner"))


async def test_foreground_chain_goes_bottom_up(gc: AsyncClient) -> None:
    top = await gc.create(cm("chain-top"))
    mid = await gc.create(owned(cm("chain-mid"), top, block=True))
    await gc.create(owned(cm("chain-leaf", HOLD), mid, block=True))
    await gc.delete(core_pb2.ConfigMap, "chain-top", propagation_policy="Foreground")

    async def mid_waits() -> bool:
        m = await gc.get(core_pb2.ConfigMap, "chain-mid")
        return "foregroundDeletion" in m.metadata.finalizers  # deleted with Foreground itself
    await eventually("middle deleted in the foreground", mid_waits)
    leaf = await eventually("leaf marked", lambda: _terminating(gc, "chain-leaf"))
    assert not await gone(gc, core_pb2.ConfigMap, "chain-top")
    leaf.metadata.finalizers.remove(HOLD)
    await gc.update(leaf)
    await eventually("whole chain gone", lambda: _all_gone(
        gc, [(core_pb2.ConfigMap, n) for n in ("chain-leaf", "chain-mid", "chain-top")]))


async def _terminating(c: AsyncClient, name: str) -> Any:
    obj = await c.get(core_pb2.ConfigMap, name)
    return obj if obj.metadata.HasField("deletion_timestamp") else None


async def test_orphan_releases_dependents(gc: AsyncClient) -> None:
    owner = await gc.create(cm("or-owner"))
    await gc.create(owned(cm("or-a"), owner, block=True))
    await gc.create(owned(pod("or-p"), owner))
    marked = await gc.delete(core_pb2.ConfigMap, "or-owner", propagation_policy="Orphan")
    assert "orphan" in marked.metadata.finalizers
    await eventually("owner gone", lambda: gone(gc, core_pb2.ConfigMap, "or-owner"))
    a = await gc.get(core_pb2.ConfigMap, "or-a")
    p = await gc.get(core_pb2.Pod, "or-p")
    assert not a.metadata.owner_references and not p.metadata.owner_references
    await asyncio.sleep(0.3)
    assert not await gone(gc, core_pb2.ConfigMap, "or-a")


async def test_owner_recreated_under_the_same_name_is_not_the_owner(gc: AsyncClient) -> None:
    first = await gc.create(cm("again"))
    await gc.delete(core_pb2.ConfigMap, "again", propagation_policy="Orphan")
    await eventually("first owner gone", lambda: gone(gc, core_pb2.ConfigMap, "again"))
    await gc.create(cm("again"))  # same name, new uid
    await gc.create(owned(cm("again-dep"), first))  # names the old uid
    await eventually("dependent of the old uid deleted",
                     lambda: gone(gc, core_pb2.ConfigMap, "again-dep"))
    assert not await gone(gc, core_pb2.ConfigMap, "again")


async def test_node_owns_its_lease(gc: AsyncClient) -> None:
    node = core_pb2.Node()
    node.metadata.name = f"gc-node-{id(gc) % 100000}"
    node = await gc.create(node)
    lease = coordination_pb2.Lease()
    lease.metadata.name, lease.metadata.namespace = node.metadata.name, "kube-node-lease"
    owned(lease, node, kind="Node")
    await gc.create(lease)
    await gc.delete(core_pb2.Node, node.metadata.name)

    async def lease_gone() -> bool:
        try:
            await gc.get(coordination_pb2.Lease, node.metadata.name, namespace="kube-node-lease")
        except errors.NotFound:
            return True
        return False
    await eventually("lease of a deleted node collected", lease_gone)


async def test_delete_policy_sets_and_swaps_gc_finalizers(client: AsyncClient,
                                                          namespace: str) -> None:
    """The apiserver's part alone (no collector running here)."""
    await client.create(cm("plain"))
    fg = await client.delete(core_pb2.ConfigMap, "plain", propagation_policy="Foreground")
    assert fg.metadata.HasField("deletion_timestamp")
    assert list(fg.metadata.finalizers) == ["foregroundDeletion"]
    gone_now = await client.delete(core_pb2.ConfigMap, "plain", propagation_policy="Background")
    assert not gone_now.metadata.finalizers  # Background dropped the last finalizer
    assert await gone(client, core_pb2.ConfigMap, "plain")

    await client.create(cm("swap", HOLD))
    first = await client.delete(core_pb2.ConfigMap, "swap", propagation_policy="Foreground")
    assert sorted(first.metadata.finalizers) == sorted(["foregroundDeletion", HOLD])
    second = await client.delete(core_pb2.ConfigMap, "swap", propagation_policy="Orphan")
    assert sorted(second.metadata.finalizers) == sorted([HOLD, "orphan"])
    third = await client.delete(core_pb2.ConfigMap, "swap")  # no policy: keeps what is there
    assert sorted(third.metadata.finalizers) == sorted([HOLD, "orphan"])
    fourth = await client.delete(core_pb2.ConfigMap, "swap", propagation_policy="Background")
    assert list(fourth.metadata.finalizers) == [HOLD]
    held = await client.get(core_pb2.ConfigMap, "swap")
    held.metadata.finalizers.remove(HOLD)
    await client.update(held)
    assert await gone(client, core_pb2.ConfigMap, "swap")
