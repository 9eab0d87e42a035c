"""Watches and informers across apiserver restarts, expiry and compaction."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient, WatchEvent
from shoal.informer import Informer
from shoal.testing.apiserver import InProcessAPIServer


def configmap(name: str, namespace: str = "default", **data: str) -> core_pb2.ConfigMap:
    cm = core_pb2.ConfigMap()
    cm.metadata.name = name
    cm.metadata.namespace = namespace
    cm.data.update(data)
    return cm


async def _collect(stream: Any, sink: list[WatchEvent[Any]]) -> None:
    async for ev in stream:
        sink.append(ev)


async def _wait_for(pred: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def test_watch_resumes_across_apiserver_restart_without_loss_or_duplicates(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    endpoint = request.getfixturevalue("etcd").endpoint if backend == "etcd" else ""
    ns = f"resume-{backend}"
    api = InProcessAPIServer(tmp_path / "a", etcd_endpoint=endpoint)
    await api.start()
    other: InProcessAPIServer | None = None
    seen: list[WatchEvent[Any]] = []
    async with api.client() as c:
        namespace = core_pb2.Namespace()
        namespace.metadata.name = ns
        await c.create(namespace)
        start = await c.list(core_pb2.ConfigMap, namespace=ns)
        watcher = asyncio.create_task(_collect(
            c.watch(core_pb2.ConfigMap, namespace=ns, resource_version=start.resource_version),
            seen))
        for i in range(5):
            await c.create(configmap(f"cm-{i:02d}", ns))
        await _wait_for(lambda: len(seen) >= 5)

        await api.stop()
        expected = 5
        if backend == "etcd":
            # Writes land through a second apiserver while the first is down.
            other = InProcessAPIServer(tmp_path / "b", etcd_endpoint=endpoint)
            await other.start()
            async with other.client() as c2:
                for i in range(5, 10):
                    await c2.create(configmap(f"cm-{i:02d}", ns))
                cm = await c2.get(core_pb2.ConfigMap, "cm-00", namespace=ns)
                cm.data["changed"] = "while-down"
                await c2.update(cm)
                await c2.delete(core_pb2.ConfigMap, "cm-01", namespace=ns)
            expected = 12
        await api.start()
        for i in range(10, 15):
            await c.create(configmap(f"cm-{i:02d}", ns))
        await _wait_for(lambda: len(seen) >= expected + 5)
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would arrive now
        watcher.cancel()
    await api.stop()
    if other is not None:
        await other.stop()

    revisions = [int(e.resource_version) for e in seen]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions), revisions
    names = [(e.type, e.object.metadata.name) for e in seen if e.object is not None]
    want = [("ADDED", f"cm-{i:02d}") for i in range(5)]
    if backend == "etcd":
        want += [("ADDED", f"cm-{i:02d}") for i in range(5, 10)]
        want += [("MODIFIED", "cm-00"), ("DELETED", "cm-01")]
    want += [("ADDED", f"cm-{i:02d}") for i in range(10, 15)]
    assert names == want


async def test_too_old_resource_version_is_expired(tmp_path: Path) -> None:
    async with InProcessAPIServer(tmp_path, history_events=5) as api, api.client() as c:
        first = await c.create(configmap("cm-0"))
        for i in range(1, 12):
            await c.create(configmap(f"cm-{i}"))
        stream = c.watch(core_pb2.ConfigMap, resource_version=first.metadata.resource_version)
        with pytest.raises(errors.Expired, match="too old resource version"):
            async with asyncio.timeout(10):
                await anext(stream)  # type: ignore[arg-type]
        await stream.aclose()


async def test_compacted_continue_token_is_expired(tmp_path: Path) -> None:
    async with InProcessAPIServer(tmp_path) as api, api.client() as c:
        for i in range(6):
            await c.create(configmap(f"cm-{i}"))
        page = await c.list(core_pb2.ConfigMap, limit=2)
        assert page.continue_token
        await c.create(configmap("later"))
        assert api.server is not None
        await api.server.store.compact(await api.server.store.current_revision())
        with pytest.raises(errors.Expired, match="continue token has expired"):
            await c.list(core_pb2.ConfigMap, limit=2, continue_token=page.continue_token)


async def test_informer_syncs_handles_events_and_relists_on_expiry(
        apiserver: InProcessAPIServer, client: AsyncClient, namespace: str) -> None:
    for name in ("a", "b"):
        await client.create(configmap(name, namespace))
    calls: list[tuple[str, str]] = []
    inf: Informer[core_pb2.ConfigMap] = Informer(
        client, core_pb2.ConfigMap, namespace=namespace,
        indexers={"by-x": lambda o: [o.data.get("x", "")]})
    inf.add_handlers(
        on_add=lambda o: calls.append(("add", o.metadata.name)),
        on_update=lambda old, new: calls.append(("update", new.metadata.name)),
        on_delete=lambda o: calls.append(("delete", o.metadata.name)))
    task = asyncio.create_task(inf.run())
    try:
        async with asyncio.timeout(10):
            await inf.synced.wait()
        assert sorted(calls) == [("add", "a"), ("add", "b")]
        assert inf.get(namespace, "a") is not None
        calls.clear()

        a = await client.get(core_pb2.ConfigMap, "a")
        a.data["x"] = "1"
        await client.update(a)
        await client.delete(core_pb2.ConfigMap, "b")
        await client.create(configmap("c", namespace, x="1"))
        await _wait_for(lambda: len(calls) >= 3)
        assert calls == [("update", "a"), ("delete", "b"), ("add", "c")]
        assert [o.metadata.name for o in inf.by_index("by-x", "1")] == ["a", "c"]
        calls.clear()

        # The server drops every watch as Expired (its cache was rebuilt); changes
        # made meanwhile reach the handlers through the relist's diff.
        assert apiserver.server is not None
        await client.delete(core_pb2.ConfigMap, "a")
        apiserver.server.cache._end_all_watchers(errors.Expired("cache rebuilt"))
        await client.create(configmap("d", namespace))
        await _wait_for(lambda: {("delete", "a"), ("add", "d")} <= set(calls))
        assert sorted(o.metadata.name for o in inf.list()) == ["c", "d"]
        assert ("add", "c") not in calls  # unchanged objects are not re-announced
    finally:
        task.cancel()
