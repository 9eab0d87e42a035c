"""Clients fail over between apiservers that share one etcd.

Two in-process apiservers (real gRPC and TLS, one CA) over one real etcd. A
client whose config lists both keeps working when the one it talks to goes
away: its writes move to the other, and an informer watching through the lost
one re-watches from its last resourceVersion on the other, seeing every write
exactly once, in order, without a relist.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer
from shoal.testing.apiserver import InProcessAPIServer, free_port
from shoal.testing.etcd import EtcdServer, etcd_binary

NS = "failover"


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    with EtcdServer(unsafe_no_fsync=True, progress_notify_interval=0.5) as server:
        yield server


def _members(tmp_path: Path, etcd: EtcdServer, count: int) -> list[InProcessAPIServer]:
    """``count`` apiservers, one CA: the first makes the PKI, the others copy it
    (as a joining control-plane member does), valid for every member's address."""
    ports = [free_port() for _ in range(count)]
    first = tmp_path / "api-0"
    members = [InProcessAPIServer(first, etcd_endpoint=etcd.endpoint, port=ports[0])]
    for i, port in enumerate(ports[1:], start=1):
        shutil.copytree(first / "pki", tmp_path / f"api-{i}" / "pki")
        members.append(InProcessAPIServer(tmp_path / f"api-{i}",
                                          etcd_endpoint=etcd.endpoint, port=port))
    return members


def _client(members: list[InProcessAPIServer]) -> AsyncClient:
    cfg = members[0].client_config
    return AsyncClient(replace(cfg, servers=tuple(f"127.0.0.1:{m.port}" for m in members)),
                       timeout=10.0)


def _cm(name: str, value: str) -> core_pb2.ConfigMap:
    return core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name=name, namespace=NS),
                              data={"v": value})


async def test_an_informer_resumes_on_another_apiserver_with_every_event_once(
        tmp_path: Path, etcd: EtcdServer) -> None:
    a, b = _members(tmp_path, etcd, 2)
    await a.start()
    await b.start()
    try:
        async with _client([a, b]) as writer, _client([a, b]) as reader:
            await writer.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
            seen: list[tuple[str, str, str]] = []
            informer = Informer(reader, core_pb2.ConfigMap, namespace=NS)
            informer.add_handlers(
                on_add=lambda o: seen.append(("ADDED", o.metadata.name, o.data["v"])),
                on_update=lambda old, o: seen.append(("MODIFIED", o.metadata.name,
                                                      o.data["v"])),
                on_delete=lambda o: seen.append(("DELETED", o.metadata.name, "")))
            lists = 0
            list_all = reader.list_all

            async def counting_list_all(*args, **kw):  # type: ignore[no-untyped-def]
                nonlocal lists
                lists += 1
                return await list_all(*args, **kw)

            reader.list_all = counting_list_all  # type: ignore[method-assign]
            run = asyncio.create_task(informer.run())
            await asyncio.wait_for(informer.synced.wait(), 10)
            assert reader.server == f"127.0.0.1:{a.port}"

            expected: list[tuple[str, str, str]] = []
            for i in range(5):
                await writer.create(_cm(f"cm-{i}", "1"))
                expected.append(("ADDED", f"cm-{i}", "1"))
            await _until(lambda: len(seen) >= 5)

            await a.stop()  # the apiserver both clients use goes away

            for i in range(5, 10):
                await writer.create(_cm(f"cm-{i}", "1"))  # acknowledged through b
                expected.append(("ADDED", f"cm-{i}", "1"))
            for i in range(0, 10, 2):
                cm = await writer.get(core_pb2.ConfigMap, f"cm-{i}", namespace=NS)
                cm.data["v"] = "2"
                await writer.update(cm)
                expected.append(("MODIFIED", f"cm-{i}", "2"))
            for i in range(1, 10, 3):
                await writer.delete(core_pb2.ConfigMap, f"cm-{i}", namespace=NS)
                expected.append(("DELETED", f"cm-{i}", ""))
            assert writer.server == f"127.0.0.1:{b.port}"

            await _until(lambda: len(seen) >= len(expected))
            await asyncio.sleep(0)  # nothing more is pending on the loop
            assert seen == expected
            assert reader.server == f"127.0.0.1:{b.port}"
            assert lists == 1, "the informer relisted instead of resuming its watch"
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    finally:
        await a.stop()
        await b.stop()


async def test_writes_go_back_to_a_restarted_apiserver_when_the_other_one_goes(
        tmp_path: Path, etcd: EtcdServer) -> None:
    a, b = _members(tmp_path, etcd, 2)
    await a.start()
    await b.start()
    try:
        async with _client([a, b]) as client:
            await client.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
            await a.stop()
            await client.create(_cm("one", "1"))
            assert client.server == f"127.0.0.1:{b.port}"
            await a.start()
            await b.stop()
            await client.create(_cm("two", "1"))
            assert client.server == f"127.0.0.1:{a.port}"
            names = [c.metadata.name for c in
                     (await client.list(core_pb2.ConfigMap, namespace=NS)).items]
            assert names == ["one", "two"]
    finally:
        await a.stop()
        await b.stop()


async def _until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
