"""ControllerRevisions: the pod template history of DaemonSets and StatefulSets (pure).

    template --hash (FNV-32a of its deterministic bytes, + collisionCount)--> "7c9f8d5b6"
    ControllerRevision <owner>-<hash>: data = the template's bytes, revision = 1, 2, ...
    pods carry label controller-revision-hash=<hash>; status names <owner>-<hash>

``plan_revisions`` finds the revision equal to the current template (a
rollback to an old template re-uses, and renumbers, its old revision, as
Kubernetes does) or asks for a new one, and names the old revisions past
``revisionHistoryLimit`` that no pod still uses, oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from apiserver.controllers.replicasets import owner_reference
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2

REVISION_HASH_LABEL = "controller-revision-hash"
_SAFE = "bcdf2456789ghjklmnpqrstvwxz"  # Kubernetes' SafeEncodeString alphabet, no vowels


def fnv32a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def safe_encode(text: str, alphabet: str = _SAFE) -> str:
    return "".join(alphabet[ord(ch) % len(alphabet)] for ch in text)


def template_bytes(template: core_pb2.PodTemplateSpec) -> bytes:
    return template.SerializeToString(deterministic=True)


def template_hash(template: core_pb2.PodTemplateSpec, collision_count: int = 0, *,
                  alphabet: str = _SAFE) -> str:
    """FNV-1a (32 bit) over the template's deterministic encoding plus the collision
    count, in decimal, mapped onto ``alphabet`` (callers keep the alphabet their
    labels were written with, so existing hashes stay stable)."""
    data = template_bytes(template)
    if collision_count:
        data += int(collision_count).to_bytes(4, "little")
    return safe_encode(str(fnv32a(data)), alphabet)


def revision_name(owner: str, hash_: str) -> str:
    return f"{owner[:63 - len(hash_) - 1]}-{hash_}"


def template_of(rev: apps_pb2.ControllerRevision) -> core_pb2.PodTemplateSpec:
    return core_pb2.PodTemplateSpec.FromString(rev.data)


def hash_of(rev: apps_pb2.ControllerRevision) -> str:
    return rev.metadata.labels.get(REVISION_HASH_LABEL, "")


@dataclass(frozen=True)
class RevisionPlan:
    update_name: str               # the revision of the current template
    update_hash: str
    create: apps_pb2.ControllerRevision | None      # write this first (new template)
    renumber: apps_pb2.ControllerRevision | None    # re-used old revision, now the newest
    prune: tuple[str, ...]                          # revisions to delete


def new_revision(owner: Any, *, kind: str, template: core_pb2.PodTemplateSpec,
                 hash_: str, number: int) -> apps_pb2.ControllerRevision:
    rev = apps_pb2.ControllerRevision()
    rev.metadata.name = revision_name(owner.metadata.name, hash_)
    rev.metadata.namespace = owner.metadata.namespace
    rev.metadata.labels.update(template.metadata.labels)
    rev.metadata.labels[REVISION_HASH_LABEL] = hash_
    rev.metadata.owner_references.append(owner_reference(owner, kind=kind))
    rev.data = template_bytes(template)
    rev.revision = number
    return rev


def plan_revisions(owner: Any, *, kind: str, revisions: Sequence[apps_pb2.ControllerRevision],
                   collision_count: int, history_limit: int,
                   in_use: Iterable[str] = ()) -> RevisionPlan:
    """``revisions``: those the owner controls; ``in_use``: hashes live pods carry."""
    template = owner.spec.template
    data = template_bytes(template)
    newest = max((r.revision for r in revisions), default=0)
    same = [r for r in revisions if r.data == data]
    create = renumber = None
    if same:
        found = max(same, key=lambda r: r.revision)
        name, hash_ = found.metadata.name, hash_of(found) or found.metadata.name.rsplit("-")[-1]
        if found.revision != newest:
            renumber = apps_pb2.ControllerRevision()
            renumber.CopyFrom(found)
            renumber.revision = newest + 1
    else:
        hash_ = template_hash(template, collision_count)
        create = new_revision(owner, kind=kind, template=template, hash_=hash_,
                              number=newest + 1)
        name = create.metadata.name
    keep = set(in_use) | {hash_}
    old = sorted((r for r in revisions if r.metadata.name != name
                  and hash_of(r) not in keep), key=lambda r: r.revision)
    excess = len(old) - max(0, history_limit)
    prune = tuple(r.metadata.name for r in old[:excess]) if excess > 0 else ()
    return RevisionPlan(update_name=name, update_hash=hash_, create=create,
                        renumber=renumber, prune=prune)
