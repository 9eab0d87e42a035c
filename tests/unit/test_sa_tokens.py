"""Service-account tokens on the node: rotation rule, the token cache, and the
automounted and projected token volumes (fake mounter, fake TokenRequest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodeagent.environment import ConfigError, PodFacts
from nodeagent.satokens import IssuedToken, ServiceAccountTokens, TokenKey, needs_refresh
from nodeagent.volumes import SERVICE_ACCOUNT_DIR, VolumeManager
from shoal import errors
from shoal.api.core.v1 import core_pb2

FACTS = PodFacts(pod_ip="10.244.0.9", host_ip="192.168.0.1")
KEY = TokenKey(namespace="ns", service_account="robot", pod_name="web", pod_uid="uid-9",
               audience="", expiration_seconds=3600)


@pytest.mark.parametrize(("age", "lifetime", "refresh"), [
    (0, 3600, False),
    (2879, 3600, False),      # just under 80 %
    (2880, 3600, True),       # 80 % of an hour
    (600, 600, True),         # expired
    (24 * 3600, 7 * 24 * 3600, True),  # a week-long token is renewed daily
])
def test_a_token_is_renewed_at_80_percent_of_its_life_or_after_a_day(
        age: float, lifetime: float, refresh: bool) -> None:
    t = IssuedToken(token="t", issued_at=1000.0, expires_at=1000.0 + lifetime)
    assert needs_refresh(t, now=1000.0 + age) is refresh


class FakeTokenRequest:
    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.calls: list[TokenKey] = []
        self.fail: errors.ShoalError | None = None

    async def __call__(self, key: TokenKey) -> tuple[str, float]:
        self.calls.append(key)
        if self.fail is not None:
            raise self.fail
        return f"token-{len(self.calls)}", self.clock[0] + key.expiration_seconds


async def test_the_cache_rotates_keeps_a_valid_token_on_failure_and_forgets_pods() -> None:
    now = [1000.0]
    request = FakeTokenRequest(now)
    tokens = ServiceAccountTokens(request=request, ca_pem=b"CA", clock=lambda: now[0])
    assert await tokens.get(KEY) == "token-1"
    now[0] += 60
    assert await tokens.get(KEY) == "token-1" and len(request.calls) == 1
    now[0] = 1000.0 + 2900  # past 80 %
    assert await tokens.get(KEY) == "token-2"
    now[0] += 2900
    request.fail = errors.Unavailable("apiserver down")
    assert await tokens.get(KEY) == "token-2"  # still valid: kept
    now[0] += 1000  # now expired, and the refresh still fails
    with pytest.raises(errors.Unavailable):
        await tokens.get(KEY)
    request.fail = None
    tokens.forget("uid-9")
    assert await tokens.get(KEY) == f"token-{len(request.calls)}"


class FakeMounter:
    def __init__(self) -> None:
        self.mounted: dict[Path, str] = {}

    def mount_tmpfs(self, path: Path, *, size: str = "") -> None:
        self.mounted[path] = size

    def unmount(self, path: Path) -> None:
        del self.mounted[path]

    def is_mount(self, path: Path) -> bool:
        return path in self.mounted


async def _none(ns: str, name: str) -> Any:
    return None


def _pod(*, automount: bool | None) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace, p.metadata.uid = "web", "ns", "uid-9"
    p.spec.service_account_name = "robot"
    if automount is not None:
        p.spec.automount_service_account_token = automount
    c = p.spec.containers.add(name="app", image="busybox")
    c.volume_mounts.add(name="ext", mount_path="/ext")
    p.spec.containers.add(name="own", image="busybox").volume_mounts.add(
        name="ext", mount_path=SERVICE_ACCOUNT_DIR)
    p.spec.volumes.add(name="ext").empty_dir.SetInParent()
    return p


@pytest.mark.parametrize("automount", [True, False, None])
async def test_the_automounted_token_volume_only_when_the_pod_asks(
        tmp_path: Path, automount: bool | None) -> None:
    now = [1000.0]
    request = FakeTokenRequest(now)
    tokens = ServiceAccountTokens(request=request, ca_pem=b"CA PEM", clock=lambda: now[0])
    m = FakeMounter()
    vm = VolumeManager(root=tmp_path, mounter=m)
    p = _pod(automount=automount)
    paths = await vm.setup(p, configmaps=_none, secrets=_none, facts=FACTS, tokens=tokens)
    app, own = (vm.mounts(c, paths) for c in p.spec.containers)
    sa_mounts = [x for x in app if x.container_path == SERVICE_ACCOUNT_DIR]
    if not automount:
        assert not sa_mounts and not request.calls
        return
    (mount,) = sa_mounts
    d = Path(mount.host_path)
    assert mount.readonly and d in m.mounted  # read-only, on a tmpfs
    assert (d / "token").read_text() == "token-1"
    assert (d / "ca.crt").read_bytes() == b"CA PEM"
    assert (d / "namespace").read_text() == "ns"
    assert request.calls[0].pod_uid == "uid-9" and request.calls[0].expiration_seconds == 3607
    # A container that mounts its own volume there keeps it.
    assert [x.host_path for x in own if x.container_path == SERVICE_ACCOUNT_DIR] == \
        [str(paths["ext"])]
    # Rotation: a sync after 80 % of the lifetime rewrites the file.
    now[0] += 0.81 * 3607
    await vm.setup(p, configmaps=_none, secrets=_none, facts=FACTS, tokens=tokens)
    assert (d / "token").read_text() == "token-2"


async def test_a_projected_token_volume_and_its_failure(tmp_path: Path) -> None:
    now = [1000.0]
    request = FakeTokenRequest(now)
    tokens = ServiceAccountTokens(request=request, ca_pem=b"CA", clock=lambda: now[0])
    vm = VolumeManager(root=tmp_path, mounter=FakeMounter())
    p = _pod(automount=None)
    proj = p.spec.volumes.add(name="vault-token").projected
    src = proj.sources.add().service_account_token
    src.audience, src.expiration_seconds, src.path = "vault", 7200, "vault/token"
    paths = await vm.setup(p, configmaps=_none, secrets=_none, facts=FACTS, tokens=tokens)
    assert (paths["vault-token"] / "vault" / "token").read_text() == "token-1"
    assert request.calls[0].audience == "vault" and request.calls[0].expiration_seconds == 7200
    request.fail = errors.NotFound('serviceaccounts "robot" not found')
    tokens.forget("uid-9")
    with pytest.raises(ConfigError, match="cannot get a token for service account 'robot'"):
        await vm.setup(p, configmaps=_none, secrets=_none, facts=FACTS, tokens=tokens)
