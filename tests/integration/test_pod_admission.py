"""Pod admission against a live apiserver started with --allowed-registries:
images from other registries and hostPath from unprivileged users are refused
at create (pods and Deployment templates), and nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.rbac.v1 import rbac_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.waiting import eventually

RBAC = "rbac.authorization.k8s.io"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessAPIServer]:
    async with InProcessAPIServer(
            tmp_path, allowed_registries=("docker.io", "10.77.0.1:5000")) as api:
        yield api


def _pod(name: str, *, image: str = "busybox", host_path: str = "") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, "default"
    p.spec.containers.add(name="main", image=image)
    if host_path:
        p.spec.volumes.add(name="host").host_path.path = host_path
    return p


def _deployment(name: str, pod: core_pb2.Pod) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, "default"
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    d.spec.template.spec.CopyFrom(pod.spec)
    return d


async def _grant(admin: AsyncClient, *, user: str, role: str, verbs: list[str],
                 group: str, resource: str, names: tuple[str, ...] = ()) -> None:
    cr = rbac_pb2.ClusterRole()
    cr.metadata.name = role
    cr.rules.add(verbs=verbs, api_groups=[group], resources=[resource],
                 resource_names=list(names))
    await admin.create(cr)
    rb = rbac_pb2.RoleBinding()
    rb.metadata.name, rb.metadata.namespace = role, "default"
    rb.role_ref.CopyFrom(rbac_pb2.RoleRef(api_group=RBAC, kind="ClusterRole", name=role))
    rb.subjects.add(kind="User", api_group=RBAC, name=user)
    await admin.create(rb)


async def test_images_outside_the_allowed_registries_are_refused(
        server: InProcessAPIServer) -> None:
    async with server.client() as admin:
        await admin.create(_pod("ok-hub", image="busybox:1.36"))
        await admin.create(_pod("ok-mirror", image="10.77.0.1:5000/team/app:v1"))
        with pytest.raises(errors.Forbidden) as err:
            await admin.create(_pod("bad", image="quay.io/evil/miner"))
        assert err.value.message == (
            'pods "bad" is forbidden: container "main" image "quay.io/evil/miner" '
            "(quay.io/evil/miner:latest) is not from an allowed registry "
            "(allowed: docker.io, 10.77.0.1:5000)")
        with pytest.raises(errors.Forbidden, match="not from an allowed registry"):
            await admin.create(_deployment("bad", _pod("x", image="ghcr.io/o/r:1")))
        # An update that swaps in a foreign image is refused too.
        ok = await admin.create(_deployment("good", _pod("x")))
        ok.spec.template.spec.containers[0].image = "evil.io/x"
        with pytest.raises(errors.Forbidden, match='image "evil.io/x"'):
            await admin.update(ok)
        pods = await admin.list(core_pb2.Pod, namespace="default")
        assert sorted(p.metadata.name for p in pods.items) == ["ok-hub", "ok-mirror"]
        deps = await admin.list(apps_pb2.Deployment, namespace="default")
        assert [d.metadata.name for d in deps.items] == ["good"]
        assert deps.items[0].spec.template.spec.containers[0].image == "busybox"


async def test_host_path_needs_a_privileged_user(server: InProcessAPIServer) -> None:
    async with server.client() as admin, AsyncClient(
            server.user_client_config("dana", ["devs"])) as dana:
        await _grant(admin, user="dana", role="pod-writer", verbs=["create", "get", "list"],
                     group="", resource="pods")
        await _grant(admin, user="dana", role="deploy-writer", verbs=["create"],
                     group="apps", resource="deployments")

        async def can_create() -> bool:
            try:
                await dana.create(_pod("plain"))
            except errors.Forbidden:
                return False
            return True
        await eventually("dana may create pods", can_create)
        await eventually("dana may create deployments", lambda: _try(
            dana, _deployment("plain", _pod("x"))))

        with pytest.raises(errors.Forbidden) as err:
            await dana.create(_pod("host", host_path="/etc"))
        assert err.value.message == (
            'pods "host" is forbidden: hostPath volume "host" needs a privileged user: '
            'User "dana" cannot use podsecuritypolicies.policy "privileged" in the '
            'namespace "default"')
        with pytest.raises(errors.Forbidden, match="hostPath"):
            await dana.create(_deployment("host", _pod("x", host_path="/etc")))
        # system:masters may; so may a user granted `use` on the privileged policy.
        await admin.create(_pod("admin-host", host_path="/etc"))
        await _grant(admin, user="dana", role="privileged-user", verbs=["use"],
                     group="policy", resource="podsecuritypolicies", names=("privileged",))
        await eventually("dana may use hostPath", lambda: _try(
            dana, _pod("host", host_path="/etc")))
        # Dana may relabel the admin's hostPath pod (its spec stays), not change it.
        await _grant(admin, user="dana", role="pod-updater", verbs=["update"],
                     group="", resource="pods")

        async def relabel() -> bool:
            pod = await dana.get(core_pb2.Pod, "admin-host", namespace="default")
            pod.metadata.labels["seen"] = "yes"
            try:
                await dana.update(pod)
            except errors.Forbidden as e:
                assert "cannot update" in e.message  # RBAC not seen yet, not admission
                return False
            return True
        await eventually("dana may relabel the hostPath pod", relabel)
        await admin.delete(rbac_pb2.RoleBinding, "privileged-user", namespace="default")

        deadlines = iter(range(60, 10_000))

        async def refused() -> bool:
            fresh = await dana.get(core_pb2.Pod, "admin-host", namespace="default")
            fresh.spec.active_deadline_seconds = next(deadlines)  # a change every time
            try:
                await dana.update(fresh)
            except errors.Forbidden as e:
                return "hostPath" in e.message
            return False
        await eventually("a spec change to the hostPath pod is refused", refused)
        names = sorted(p.metadata.name
                       for p in (await admin.list(core_pb2.Pod, namespace="default")).items)
        assert names == ["admin-host", "host", "plain"]


async def _try(c: AsyncClient, obj: object) -> bool:
    try:
        await c.create(obj)
    except errors.Forbidden:
        return False
    return True
