"""Pod admission: image reference normalisation, allowed registries, hostPath."""

from __future__ import annotations

from typing import Any

import pytest

from apiserver.admission import (
    PodAdmission,
    image_allowed,
    normalize_image,
    normalize_registries,
)
from apiserver.authz.access import AccessControl
from apiserver.authz.attributes import Attributes, Decision, Verdict
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.kinds import builtin_kinds


@pytest.mark.parametrize(("ref", "want"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
    ("docker.io/nginx", "docker.io/library/nginx:latest"),
    ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
    ("quay.io/coreos/etcd:v3.5", "quay.io/coreos/etcd:v3.5"),
    ("10.77.0.1:5000/app", "10.77.0.1:5000/app:latest"),
    ("10.77.0.1:5000/team/app:v2", "10.77.0.1:5000/team/app:v2"),
    ("localhost/app", "localhost/app:latest"),
    ("ghcr.io/o/r@sha256:abc", "ghcr.io/o/r@sha256:abc"),
    ("nginx:1@sha256:abc", "docker.io/library/nginx:1@sha256:abc"),
])
def test_image_references_normalise_like_docker(ref: str, want: str) -> None:
    assert str(normalize_image(ref)) == want


@pytest.mark.parametrize(("ref", "allowed", "ok"), [
    ("busybox", (), True),
    ("busybox", ("docker.io",), True),
    ("busybox", ("index.docker.io",), True),
    ("quay.io/x/y", ("docker.io",), False),
    ("10.77.0.1:5000/app", ("docker.io", "10.77.0.1:5000"), True),
    ("10.77.0.1:5001/app", ("10.77.0.1:5000",), False),
    ("busybox", ("docker.io/library",), True),
    ("bitnami/redis", ("docker.io/library",), False),
    # A prefix matches whole path components only.
    ("docker.io/libraryx/y", ("docker.io/library",), False),
    ("evil.docker.io/x", ("docker.io",), False),
])
def test_allowed_registries(ref: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert image_allowed(normalize_image(ref), normalize_registries(allowed)) is ok


def test_a_url_is_not_a_registry() -> None:
    with pytest.raises(errors.BadRequest, match="not a URL"):
        normalize_registries(["https://docker.io"])


class _Authorizer:
    """Allows `use` on the privileged policy to the users listed."""

    def __init__(self, privileged: set[str]) -> None:
        self.privileged = privileged
        self.asked: list[Attributes] = []

    def authorize(self, a: Attributes) -> Decision:
        self.asked.append(a)
        return Decision(Verdict.ALLOW if a.user in self.privileged else Verdict.NO_OPINION)


KINDS = builtin_kinds()


def _pod(*, image: str = "busybox", host_path: bool = False, init_image: str = "") -> Any:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = "p", "dev"
    p.spec.containers.add(name="main", image=image)
    if init_image:
        p.spec.init_containers.add(name="init", image=init_image)
    if host_path:
        v = p.spec.volumes.add(name="root")
        v.host_path.path = "/"
    return p


def _deployment(pod: Any) -> Any:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = "d", "dev"
    d.spec.template.spec.CopyFrom(pod.spec)
    return d


@pytest.mark.parametrize(("obj", "user", "refusal"), [
    (_pod(), "alice", None),
    (_pod(image="quay.io/x/y:1"), "alice",
     'container "main" image "quay.io/x/y:1" (quay.io/x/y:1) is not from an allowed '
     "registry (allowed: docker.io, 10.77.0.1:5000)"),
    (_pod(init_image="evil.io/x"), "alice", 'container "init" image "evil.io/x"'),
    (_deployment(_pod(image="evil.io/x")), "alice", 'deployments "d" is forbidden'),
    (_pod(host_path=True), "alice",
     'hostPath volume "root" needs a privileged user: User "alice" cannot use '
     'podsecuritypolicies.policy "privileged" in the namespace "dev"'),
    (_deployment(_pod(host_path=True)), "alice", "hostPath"),
    (_pod(host_path=True), "root", None),
    (_deployment(_pod(host_path=True)), "root", None),
])
async def test_pod_admission(obj: Any, user: str, refusal: str | None) -> None:
    authz = _Authorizer({"root"})
    adm = PodAdmission(access=AccessControl(authz),
                       allowed_registries=("docker.io", "10.77.0.1:5000"))
    kind = KINDS.by_type_url("type.googleapis.com/" + obj.DESCRIPTOR.full_name)
    if refusal is None:
        await adm.admit(kind, obj, user=user, groups=())
        return
    with pytest.raises(errors.Forbidden) as err:
        await adm.admit(kind, obj, user=user, groups=())
    assert refusal in err.value.message


async def test_objects_without_pod_specs_are_not_checked() -> None:
    authz = _Authorizer(set())
    adm = PodAdmission(access=AccessControl(authz), allowed_registries=("docker.io",))
    cm = core_pb2.ConfigMap()
    cm.data["image"] = "evil.io/x"
    kind = KINDS.by_type_url("type.googleapis.com/" + cm.DESCRIPTOR.full_name)
    await adm.admit(kind, cm, user="alice", groups=())
    assert authz.asked == []


async def test_an_update_that_keeps_the_pod_spec_is_not_checked_again() -> None:
    authz = _Authorizer(set())
    adm = PodAdmission(access=AccessControl(authz), allowed_registries=("quay.io",))
    old = _pod(host_path=True)  # stored before the list, or by a privileged user
    kind = KINDS.by_type_url("type.googleapis.com/" + old.DESCRIPTOR.full_name)
    relabelled = core_pb2.Pod()
    relabelled.CopyFrom(old)
    relabelled.metadata.labels["x"] = "y"
    relabelled.metadata.finalizers.append("shoal.io/node-agent")
    await adm.admit(kind, relabelled, user="alice", groups=(), old=old)
    assert authz.asked == []
    changed = core_pb2.Pod()
    changed.CopyFrom(relabelled)
    changed.spec.containers[0].image = "quay.io/x/y"
    with pytest.raises(errors.Forbidden, match="hostPath"):
        await adm.admit(kind, changed, user="alice", groups=(), old=old)
