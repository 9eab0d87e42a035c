"""Admission checks on pod specs: allowed image registries and hostPath.

Run on Create and Update of Pods and of every kind that carries a pod template
(Deployments, ReplicaSets, StatefulSets, DaemonSets), after authorization and
before anything is stored, so a bad template is refused at apply time rather
than when its controller stamps out pods.

- **Images.** With ``--allowed-registries`` set, every image of every
  container (init, regular, ephemeral) must come from a listed registry. A
  reference is normalised the way containerd and docker do (``busybox`` is
  ``docker.io/library/busybox:latest``; ``index.docker.io`` is ``docker.io``).
  An entry is a registry host (``docker.io``, ``10.77.0.1:5000``) or a
  repository prefix (``docker.io/library``). An empty list allows every image.
- **hostPath.** A pod (or template) with a hostPath volume needs the caller
  to be allowed ``use`` on ``podsecuritypolicies.policy`` named
  ``privileged`` in the object's namespace (PodSecurityPolicy's ``use`` verb,
  granted by RBAC; ``system:masters`` always holds it).

An update that leaves the pod spec unchanged (a finalizer, a label, a scale)
is not checked again, as with Pod Security Admission: a node can still
finish a hostPath pod, and a list tightened later does not block the
objects already there. Both are pure checks over the object plus one
authorizer question; refusal is
``Forbidden`` naming what was refused and why. Nothing is stored on refusal
(the check runs before the write).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from apiserver.authz.access import AccessControl
from apiserver.authz.attributes import Attributes
from shoal import errors
from shoal.kinds import Kind

DEFAULT_REGISTRY = "docker.io"
# What PodSecurityPolicy called the permission: `use` on a policy by name.
PRIVILEGED_GROUP = "policy"
PRIVILEGED_RESOURCE = "podsecuritypolicies"
PRIVILEGED_NAME = "privileged"
PRIVILEGED_VERB = "use"
_TEMPLATE_KINDS = frozenset({"Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"})


@dataclass(frozen=True)
class ImageName:
    """A normalised image reference: registry host, repository path, tag/digest."""

    registry: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def normalize_image(ref: str) -> ImageName:
    """Docker's reference normalisation (distribution/reference's ParseNormalizedNamed).

    The first path component is a registry host when it holds a ``.`` or a
    ``:`` or is ``localhost``; otherwise the registry is docker.io, and a
    single-component name there lives under ``library/``. No tag and no digest
    means ``:latest``.
    """
    text = ref.strip()
    if not text:
        raise errors.BadRequest("an image reference is empty")
    name, _, digest = text.partition("@")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first.lower(), rest
    else:
        registry, path = DEFAULT_REGISTRY, name
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if not path:
        raise errors.BadRequest(f"image {ref!r} names no repository")
    if not tag and not digest:
        tag = "latest"
    return ImageName(registry=registry, path=path, tag=tag, digest=digest)


def normalize_registries(entries: Sequence[str]) -> tuple[str, ...]:
    """The --allowed-registries entries, trimmed ("index.docker.io" -> "docker.io")."""
    out: list[str] = []
    for raw in entries:
        e = raw.strip().rstrip("/")
        if not e:
            continue
        if "://" in e:
            raise errors.BadRequest(
                f"--allowed-registries: {raw!r}: give a registry host or repository prefix, "
                "not a URL")
        host, sep, rest = e.partition("/")
        host = host.lower()
        if host == "index.docker.io":
            host = DEFAULT_REGISTRY
        out.append(f"{host}{sep}{rest}")
    return tuple(out)


def image_allowed(image: ImageName, allowed: Sequence[str]) -> bool:
    if not allowed:
        return True
    return any(image.registry == a or image.repository.startswith(a + "/") for a in allowed)


def pod_spec_of(kind: Kind, obj: Any) -> Any | None:
    """The pod spec an object carries (a Pod's own, a workload's template), or None."""
    if kind.group == "" and kind.kind == "Pod":
        return obj.spec
    if kind.kind in _TEMPLATE_KINDS and kind.group == "apps":
        return obj.spec.template.spec
    return None


def images_of(spec: Any) -> Iterator[tuple[str, str]]:
    """(container name, image) of every container in a pod spec."""
    for c in (*spec.init_containers, *spec.containers, *spec.ephemeral_containers):
        yield c.name, c.image


def host_path_volumes(spec: Any) -> list[str]:
    return [v.name for v in spec.volumes if v.HasField("host_path")]


class PodAdmission:
    """The checks above, for ``ResourceAPI.admit_write``."""

    def __init__(self, *, access: AccessControl, allowed_registries: Sequence[str] = ()
                 ) -> None:
        self.access = access
        self.allowed = normalize_registries(allowed_registries)

    def check_images(self, kind: Kind, obj: Any, spec: Any) -> None:
        if not self.allowed:
            return
        for container, ref in images_of(spec):
            if not ref:
                continue  # validation names a missing image
            image = normalize_image(ref)
            if not image_allowed(image, self.allowed):
                raise errors.Forbidden(
                    f'{kind.resource} "{obj.metadata.name}" is forbidden: container '
                    f'"{container}" image "{ref}" ({image}) is not from an allowed registry '
                    f"(allowed: {', '.join(self.allowed)})",
                    kind=kind.resource, name=obj.metadata.name, group=kind.group)

    async def check_host_path(self, kind: Kind, obj: Any, spec: Any, *, user: str,
                              groups: tuple[str, ...]) -> None:
        volumes = host_path_volumes(spec)
        if not volumes:
            return
        attrs = Attributes(user=user, groups=groups, verb=PRIVILEGED_VERB,
                           group=PRIVILEGED_GROUP, resource=PRIVILEGED_RESOURCE,
                           namespace=obj.metadata.namespace, name=PRIVILEGED_NAME)
        decision = await self.access.decide(attrs)
        if decision.allowed:
            return
        raise errors.Forbidden(
            f'{kind.resource} "{obj.metadata.name}" is forbidden: hostPath volume '
            f'"{volumes[0]}" needs a privileged user: User "{user}" cannot '
            f'{PRIVILEGED_VERB} {PRIVILEGED_RESOURCE}.{PRIVILEGED_GROUP} '
            f'"{PRIVILEGED_NAME}" in the namespace "{obj.metadata.namespace}"',
            kind=kind.resource, name=obj.metadata.name, group=kind.group)

    def applies_to(self, kind: Kind) -> bool:
        return (kind.group == "" and kind.kind == "Pod") or (
            kind.group == "apps" and kind.kind in _TEMPLATE_KINDS)

    async def admit(self, kind: Kind, obj: Any, *, user: str, groups: tuple[str, ...],
                    old: Any | None = None) -> None:
        """Check a create, or an update of ``old`` (skipped when the pod spec
        is unchanged, as Pod Security Admission does)."""
        spec = pod_spec_of(kind, obj)
        if spec is None:
            return
        if old is not None and pod_spec_of(kind, old) == spec:
            return
        self.check_images(kind, obj, spec)
        await self.check_host_path(kind, obj, spec, user=user, groups=groups)
