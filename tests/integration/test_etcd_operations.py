"""etcd operations on a real etcd: snapshot save + restore, and compaction by the apiserver."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from apiserver.storage import etcdadmin
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.etcd import EtcdServer, etcd_binary

NS = "ops"


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    with EtcdServer(unsafe_no_fsync=True, progress_notify_interval=0.5) as server:
        yield server


def _cm(name: str, value: str) -> core_pb2.ConfigMap:
    return core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name=name, namespace=NS),
                              data={"v": value})


async def test_a_snapshot_restored_into_a_new_etcd_holds_every_object(
        tmp_path: Path, etcd: EtcdServer) -> None:
    async with InProcessAPIServer(tmp_path / "api", etcd_endpoint=etcd.endpoint) as api, \
            api.client() as c:
        await c.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
        for i in range(20):
            await c.create(_cm(f"cm-{i}", str(i)))
        await c.delete(core_pb2.ConfigMap, "cm-3", namespace=NS)
        before = await c.list(core_pb2.ConfigMap, namespace=NS)

    snapshot = tmp_path / "etcd.snapshot"
    member, size = await etcdadmin.snapshot_save([etcd.endpoint], snapshot)
    assert member == etcd.endpoint and size == snapshot.stat().st_size > 0
    assert not snapshot.with_name("etcd.snapshot.part").exists()

    restored = tmp_path / "restored"
    etcdadmin.snapshot_restore(snapshot, data_dir=restored, name="shoal-test",
                               peer_url="http://127.0.0.1:2380")
    with pytest.raises(errors.BadRequest, match="new directory"):
        etcdadmin.snapshot_restore(snapshot, data_dir=restored, name="shoal-test",
                                   peer_url="http://127.0.0.1:2380")
    etcd.stop()  # the original is gone; only the restored copy remains

    with EtcdServer(data_dir=restored, unsafe_no_fsync=True,
                    progress_notify_interval=0.5) as again:
        async with InProcessAPIServer(tmp_path / "api", etcd_endpoint=again.endpoint,
                                      port=api.port) as api2, api2.client() as c:
            after = await c.list(core_pb2.ConfigMap, namespace=NS)
            assert [(o.metadata.name, o.data["v"], o.metadata.resource_version)
                    for o in after.items] == [
                (o.metadata.name, o.data["v"], o.metadata.resource_version)
                for o in before.items]
            assert len(after.items) == 19
            await c.create(_cm("cm-new", "x"))  # and it takes writes


async def test_a_missing_snapshot_is_named(tmp_path: Path) -> None:
    with pytest.raises(errors.BadRequest, match="no snapshot file"):
        etcdadmin.snapshot_restore(tmp_path / "none", data_dir=tmp_path / "d", name="m",
                                   peer_url="http://127.0.0.1:2380")
    with pytest.raises(errors.Unavailable, match="no etcd member gave a snapshot"):
        await etcdadmin.snapshot_save(["127.0.0.1:1"], tmp_path / "s")


async def test_the_apiserver_compacts_history_older_than_its_retention(
        tmp_path: Path, etcd: EtcdServer) -> None:
    async with InProcessAPIServer(tmp_path / "api", etcd_endpoint=etcd.endpoint,
                                  etcd_compaction_interval=2.0) as api, api.client() as c:
        await c.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
        first = await c.create(_cm("a", "1"))
        old_rv = first.metadata.resource_version
        for i in range(5):
            cm = await c.get(core_pb2.ConfigMap, "a", namespace=NS)
            cm.data["v"] = str(i)
            await c.update(cm)
        assert api.server is not None
        async with asyncio.timeout(30):
            while await api.server.store.compacted_revision() <= int(old_rv):
                await asyncio.sleep(0.2)
        # etcd's history before the compaction is gone: a read at that revision is
        # Expired (an informer that far behind relists).
        with pytest.raises(errors.Expired):
            await api.server.store.range("/registry/", revision=int(old_rv))
        status = await etcdadmin.member_status(etcd.endpoint)
        assert status.is_leader and status.revision > int(old_rv)
        await etcdadmin.defragment(etcd.endpoint)
        assert (await c.get(core_pb2.ConfigMap, "a", namespace=NS)).data["v"] == "4"


def test_the_cli_saves_restores_and_reports(tmp_path: Path, etcd: EtcdServer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from shoal.cli.main import main

    snapshot = tmp_path / "snap.db"
    assert main(["etcd", "snapshot", "save", str(snapshot), "--endpoints",
                 etcd.endpoint]) == 0
    assert f"saved a snapshot of etcd member {etcd.endpoint}" in capsys.readouterr().out
    assert main(["etcd", "snapshot", "restore", str(snapshot), "--data-dir",
                 str(tmp_path / "new"), "--name", "m", "--initial-advertise-peer-urls",
                 "http://127.0.0.1:2380"]) == 0
    assert (tmp_path / "new" / "member").is_dir()
    assert main(["etcd", "snapshot", "restore", str(snapshot), "--data-dir",
                 str(tmp_path / "new"), "--name", "m", "--initial-advertise-peer-urls",
                 "http://127.0.0.1:2380"]) == 2
    assert "new directory" in capsys.readouterr().err
    assert main(["etcd", "status", "--endpoints", etcd.endpoint]) == 0
    out = capsys.readouterr().out
    assert "ETCD MEMBER" in out and "FSYNC P99" in out and "yes" in out
    assert main(["etcd", "defrag", "--endpoints", etcd.endpoint]) == 0
