"""An apiserver over a 3-member etcd cluster keeps serving when its member dies.

The store moves to the next member that answers; a write that failed meanwhile
is Unavailable (the client tries it again); the apiserver's watch cache
re-watches from its last revision on the new member, so an informer sees every
write exactly once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.etcd import EtcdCluster, etcd_binary

NS = "members"


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    with EtcdCluster(3) as c:
        yield c


async def _create(client: AsyncClient, name: str) -> int:
    """Create until acknowledged; returns the Unavailable answers on the way."""
    failed = 0
    async with asyncio.timeout(30):
        while True:
            try:
                await client.create(core_pb2.ConfigMap(
                    metadata=meta_pb2.ObjectMeta(name=name, namespace=NS)))
                return failed
            except errors.AlreadyExists:
                return failed  # an earlier try was applied
            except errors.Unavailable:
                failed += 1
                await asyncio.sleep(0.2)


async def test_the_apiserver_moves_to_another_member_and_loses_no_event(
        tmp_path: Path, cluster: EtcdCluster) -> None:
    async with InProcessAPIServer(tmp_path, etcd_endpoint=",".join(cluster.endpoints)) as api, \
            api.client(timeout=10.0) as client:
        await client.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
        seen: list[str] = []
        informer = Informer(client, core_pb2.ConfigMap, namespace=NS)
        informer.add_handlers(on_add=lambda o: seen.append(o.metadata.name),
                              on_update=lambda old, o: seen.append(f"update {o.metadata.name}"),
                              on_delete=lambda o: seen.append(f"delete {o.metadata.name}"))
        run = asyncio.create_task(informer.run())
        await asyncio.wait_for(informer.synced.wait(), 10)
        names = [f"cm-{i}" for i in range(10)]
        for name in names[:5]:
            assert await _create(client, name) == 0

        cluster.kill(0)  # the member the store dialled first

        failed = 0
        for name in names[5:]:
            failed += await _create(client, name)
        async with asyncio.timeout(30):
            while len(seen) < len(names):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything repeated would arrive now
        assert seen == names
        assert failed <= 2, f"{failed} writes failed before the store moved"
        listed = await client.list(core_pb2.ConfigMap, namespace=NS)
        assert [o.metadata.name for o in listed.items] == names
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
