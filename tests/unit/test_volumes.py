"""Pod volumes with a fake mounter: files, modes, refresh, checks, teardown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodeagent.environment import ConfigError, PodFacts
from nodeagent.volumes import VolumeManager
from shoal.api.core.v1 import core_pb2

FACTS = PodFacts(pod_ip="10.244.0.9", host_ip="192.168.0.1")


class FakeMounter:
    def __init__(self) -> None:
        self.mounted: dict[Path, str] = {}

    def mount_tmpfs(self, path: Path, *, size: str = "") -> None:
        self.mounted[path] = size

    def unmount(self, path: Path) -> None:
        del self.mounted[path]

    def is_mount(self, path: Path) -> bool:
        return path in self.mounted


CMS = {("ns", "conf"): core_pb2.ConfigMap(data={"app.ini": "a=1", "other": "x"})}
SECRETS = {("ns", "creds"): core_pb2.Secret(data={"password": b"hunter2"})}


async def configmaps(ns: str, name: str) -> Any:
    return CMS.get((ns, name))


async def secrets(ns: str, name: str) -> Any:
    return SECRETS.get((ns, name))


def pod() -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace, p.metadata.uid = "web", "ns", "uid-9"
    p.metadata.labels["app"] = "web"
    return p


async def test_every_volume_kind(tmp_path: Path) -> None:
    m = FakeMounter()
    vm = VolumeManager(root=tmp_path / "root", mounter=m)
    p = pod()
    p.spec.volumes.add(name="scratch").empty_dir.SetInParent()
    mem = p.spec.volumes.add(name="fast")
    mem.empty_dir.medium = "Memory"
    mem.empty_dir.size_limit.value = "64Mi"
    cm = p.spec.volumes.add(name="conf").config_map
    cm.name = "conf"
    cm.items.add(key="app.ini", path="etc/app.ini", mode=0o600)
    sec = p.spec.volumes.add(name="creds").secret
    sec.secret_name = "creds"
    dapi = p.spec.volumes.add(name="info").downward_api
    dapi.items.add(path="name").field_ref.field_path = "metadata.name"
    dapi.items.add(path="labels").field_ref.field_path = "metadata.labels"
    hp = p.spec.volumes.add(name="host").host_path
    hp.path, hp.type = str(tmp_path / "hostdir"), "DirectoryOrCreate"
    paths = await vm.setup(p, configmaps=configmaps, secrets=secrets, facts=FACTS)

    assert paths["scratch"].is_dir()
    assert m.mounted[paths["fast"]] == str(64 * 1024 * 1024)
    assert paths["creds"] in m.mounted  # secrets always live on tmpfs
    assert (paths["creds"] / "password").read_bytes() == b"hunter2"
    ini = paths["conf"] / "etc" / "app.ini"
    assert ini.read_text() == "a=1" and (ini.stat().st_mode & 0o777) == 0o600
    assert not (paths["conf"] / "other").exists()  # items select keys
    assert (paths["info"] / "name").read_text() == "web"
    assert (paths["info"] / "labels").read_text() == 'app="web"'
    assert paths["host"] == tmp_path / "hostdir" and paths["host"].is_dir()

    c = core_pb2.Container(name="app", image="x")
    c.volume_mounts.add(name="conf", mount_path="/etc/conf", read_only=True)
    c.volume_mounts.add(name="scratch", mount_path="/data", sub_path="sub")
    mounts = vm.mounts(c, paths)
    assert mounts[0].readonly and mounts[0].host_path == str(paths["conf"])
    assert mounts[1].host_path == str(paths["scratch"] / "sub")

    # A changed ConfigMap is picked up by the next setup.
    CMS[("ns", "conf")] = core_pb2.ConfigMap(data={"app.ini": "a=2"})
    await vm.setup(p, configmaps=configmaps, secrets=secrets, facts=FACTS)
    assert ini.read_text() == "a=2"

    vm.teardown("uid-9")
    assert not m.mounted and not vm.pod_dir("uid-9").exists()
    vm.teardown("uid-9")  # idempotent


def _conf_item(p: core_pb2.Pod, key: str, path: str) -> None:
    cm = p.spec.volumes.add(name="v").config_map
    cm.name = "conf"
    cm.items.add(key=key, path=path)


def _host(p: core_pb2.Pod, path: str, kind: str) -> None:
    hp = p.spec.volumes.add(name="v").host_path
    hp.path, hp.type = path, kind


@pytest.mark.parametrize(("build", "message"), [
    (lambda p: setattr(p.spec.volumes.add(name="v").config_map, "name", "missing"),
     'configmap "missing" not found'),
    (lambda p: setattr(p.spec.volumes.add(name="v").secret, "secret_name", "missing"),
     'secret "missing" not found'),
    (lambda p: _conf_item(p, "nope", "x"), "configured key 'nope' not found"),
    (lambda p: _conf_item(p, "other", "../x"), "must be relative"),
    (lambda p: _host(p, "/nonexistent/dir", "Directory"), "is not a directory"),
    (lambda p: setattr(p.spec.volumes.add(name="v").persistent_volume_claim, "claim_name",
                       "c"), "not supported"),
])
async def test_bad_volumes_are_config_errors(tmp_path: Path, build: Any, message: str) -> None:
    CMS[("ns", "conf")] = core_pb2.ConfigMap(data={"app.ini": "a=1", "other": "x"})
    p = pod()
    build(p)
    vm = VolumeManager(root=tmp_path, mounter=FakeMounter())
    with pytest.raises(ConfigError, match=message):
        await vm.setup(p, configmaps=configmaps, secrets=secrets, facts=FACTS)


async def test_optional_missing_source_is_empty(tmp_path: Path) -> None:
    p = pod()
    cm = p.spec.volumes.add(name="v").config_map
    cm.name, cm.optional = "missing", True
    vm = VolumeManager(root=tmp_path, mounter=FakeMounter())
    paths = await vm.setup(p, configmaps=configmaps, secrets=secrets, facts=FACTS)
    assert list(paths["v"].iterdir()) == []
