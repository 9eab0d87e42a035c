"""Object semantics on top of revisioned storage: what create, update, delete mean.

This is where Kubernetes' rules for a stored object live:

- the server owns ``uid``, ``creationTimestamp``, ``resourceVersion``,
  ``generation`` and ``deletionTimestamp``;
- ``resourceVersion`` is the storage ``mod_revision``; an update that carries one
  is a compare-and-swap (stale -> ``Conflict``); one without it retries its
  read-modify-write on conflict by itself;
- ``Update`` never changes status and ``UpdateStatus`` changes only status;
  ``generation`` goes up when anything outside metadata and status changes;
- an update that changes nothing writes nothing (same resourceVersion);
- a Pod is bound by an update that sets an empty ``spec.nodeName``; naming
  another node once it is set is a ``Conflict`` (never bound twice);
- ``Delete`` of an object with finalizers only sets ``deletionTimestamp``; the
  update that removes the last finalizer of such an object deletes it;
- every object is defaulted and validated before it is written, so a write is
  either whole or absent; ``dry_run`` does everything but the write.

Deletion lifecycle::

    live --Delete, no finalizers----------------------------> gone
    live --Delete, finalizers--> terminating (deletionTimestamp set)
    terminating --Update removing the last finalizer--------> gone
    terminating --Delete again--> terminating (no-op, idempotent)

Propagation policy (Kubernetes' rules; the garbage collector in
``apiserver.controllers.garbagecollector`` does the rest):

- ``Foreground`` adds the ``foregroundDeletion`` finalizer and ``Orphan`` the
  ``orphan`` finalizer, so even an object without finalizers of its own
  becomes terminating; the collector removes the finalizer once the
  dependents are gone (foreground) or released (orphan).
- ``Background`` and ``""`` (the default for every kind) add nothing: the
  object goes at once and the collector deletes its dependents afterwards.
- A Delete of a terminating object with a different policy swaps the GC
  finalizer (``Background`` drops both); ``""`` keeps what is there. If that
  leaves no finalizer, the object goes.
"""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from apiserver.serviceips import ServiceIPAllocator, service_ips, wants_ip
from apiserver.storage import Store
from shoal import errors, validation
from shoal.kinds import Kind, KindTable
from shoal.selectors import FieldSelector, LabelSelector

# etcd refuses values above 1.5 MiB by default; Kubernetes uses the same limit.
MAX_OBJECT_BYTES = 1_572_864
PROTECTED_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
PROPAGATION_POLICIES = frozenset({"", "Orphan", "Background", "Foreground"})
# The garbage collector's finalizers, added by Delete's propagation policy.
ORPHAN_FINALIZER = "orphan"
FOREGROUND_FINALIZER = "foregroundDeletion"
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_UPDATE_ATTEMPTS = 16


@dataclass(frozen=True)
class Page:
    items: list[any_pb2.Any]
    revision: int
    continue_token: str
    remaining: int | None


def revision_of(obj: Any) -> int:
    rv = obj.metadata.resource_version
    if not rv:
        return 0
    try:
        value = int(rv)
    except ValueError:
        raise errors.BadRequest(f"invalid resourceVersion {rv!r}: must be a number") from None
    if value < 0:
        raise errors.BadRequest(f"invalid resourceVersion {rv!r}")
    return value


def _serialize(obj: Any) -> bytes:
    """Stored form: the message without its resourceVersion."""
    rv = obj.metadata.resource_version
    obj.metadata.resource_version = ""
    try:
        return bytes(obj.SerializeToString(deterministic=True))
    finally:
        obj.metadata.resource_version = rv


def _body_bytes(obj: Any) -> bytes:
    """Everything but metadata and status: a change here bumps generation."""
    copy: Any = type(obj)()
    copy.CopyFrom(obj)
    copy.ClearField("metadata")
    if "status" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("status")
    return bytes(copy.SerializeToString(deterministic=True))


def _check_unknown_fields(obj: Message, type_name: str) -> None:
    before = obj.ByteSize()
    probe = type(obj)()
    probe.CopyFrom(obj)
    probe.DiscardUnknownFields()
    if probe.ByteSize() != before:
        raise errors.BadRequest(
            f"the {type_name} object has fields this server does not know "
            "(is the client newer than the server?)"
        )


class ObjectStore:
    """Kubernetes object rules over a :class:`Store`. See the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        kinds: KindTable,
        clock: Callable[[], float] = time.time,
        max_object_bytes: int = MAX_OBJECT_BYTES,
        service_ips: ServiceIPAllocator | None = None,
    ) -> None:
        self.store = store
        self.kinds = kinds
        self.clock = clock
        self.max_object_bytes = max_object_bytes
        # ClusterIP allocation for Services (None: addresses are left as given).
        self.service_ips = service_ips
        self._namespace_kind = kinds.by_resource("", "namespaces")

    # -- decoding ---------------------------------------------------------------

    def decode_any(self, packed: any_pb2.Any) -> tuple[Kind, Any]:
        """The kind and typed object inside a request's Any."""
        if not packed.type_url:
            raise errors.BadRequest("the request carries no object")
        kind = self.kinds.by_type_url(packed.type_url)
        if len(packed.value) > self.max_object_bytes:
            raise errors.RequestEntityTooLarge(
                f"{kind.kind} is {len(packed.value)} bytes; the limit is "
                f"{self.max_object_bytes} bytes", kind=kind.kind)
        obj = kind.new()
        try:
            obj.ParseFromString(packed.value)
        except DecodeError as e:
            raise errors.BadRequest(f"cannot decode {kind.kind}: {e}") from e
        _check_unknown_fields(obj, kind.kind)
        return kind, obj

    def _load(self, kind: Kind, raw: bytes, revision: int) -> Any:
        obj = kind.new()
        obj.ParseFromString(raw)
        obj.metadata.resource_version = str(revision)
        return obj

    def _now(self) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=int(self.clock()))

    def _invalid(self, kind: Kind, obj: Any, problems: list[errors.FieldError]) -> errors.Invalid:
        name = obj.metadata.name or obj.metadata.generate_name
        return errors.Invalid(f'{kind.kind} "{name}" is invalid', kind=kind.kind,
                              name=obj.metadata.name, group=kind.group, causes=problems)

    def _check_size(self, kind: Kind, data: bytes) -> None:
        if len(data) > self.max_object_bytes:
            raise errors.RequestEntityTooLarge(
                f"{kind.kind} would be {len(data)} bytes stored; the limit is "
                f"{self.max_object_bytes} bytes", kind=kind.kind)

    async def _require_namespace(self, kind: Kind, namespace: str) -> None:
        if not kind.namespaced:
            return
        kv = await self.store.get(self._namespace_kind.key("", namespace))
        if kv is None:
            raise errors.NotFound(f'namespaces "{namespace}" not found', kind="Namespace",
                                  name=namespace)
        ns: Any = self._namespace_kind.new()
        ns.ParseFromString(kv.value)
        if ns.metadata.HasField("deletion_timestamp"):
            raise errors.Forbidden(
                f'unable to create new content in namespace {namespace} because it is '
                "being terminated", kind="Namespace", name=namespace)

    # -- reads ------------------------------------------------------------------

    async def get(self, kind: Kind, *, namespace: str, name: str) -> Any:
        return (await self._read(kind, namespace=namespace, name=name))[0]

    async def _read(self, kind: Kind, *, namespace: str, name: str) -> tuple[Any, bool]:
        """The object and whether storage holds it under an old encryption key."""
        kv = await self.store.get(kind.key(namespace, name))
        if kv is None:
            raise errors.NotFound(f'{kind.qualified_resource} "{name}" not found',
                                  kind=kind.kind, name=name, group=kind.group)
        return self._load(kind, kv.value, kv.mod_revision), kv.stale

    async def list_page(
        self,
        kind: Kind,
        *,
        namespace: str,
        labels: LabelSelector,
        fields: FieldSelector,
        limit: int,
        continue_token: str,
    ) -> Page:
        """One page of a paged list, read from storage at one pinned revision.

        ``limit`` 0 reads every matching object (one page, no token)."""
        prefix = kind.prefix(namespace)
        revision, start = 0, prefix
        if continue_token:
            revision, start = _decode_continue(continue_token, prefix)
        items: list[any_pb2.Any] = []
        filtered = not labels.empty or bool(fields.requirements)
        getters = kind.fields
        while True:
            try:
                res = await self.store.range(prefix, start=start,
                                             limit=max(limit, 50) if limit else 1000,
                                             revision=revision)
            except errors.Expired:
                raise errors.Expired(
                    "the continue token has expired: the list's revision was compacted; "
                    "start the list again", kind=kind.kind) from None
            revision = res.revision
            for i, kv in enumerate(res.kvs):
                obj = self._load(kind, kv.value, kv.mod_revision)
                if filtered:
                    if not labels.matches(obj.metadata.labels):
                        continue
                    if not fields.matches({p: g(obj) for p, g in getters.items()}):
                        continue
                items.append(any_pb2.Any(type_url=kind.type_url,
                                         value=obj.SerializeToString()))
                if len(items) == limit:
                    more = res.more or i + 1 < len(res.kvs)
                    if not more:
                        return Page(items, revision, "", None)
                    remaining = None if filtered else res.count - (i + 1)
                    token = _encode_continue(revision, kv.key + "\x00")
                    return Page(items, revision, token, remaining)
            if not res.more or not res.kvs:
                return Page(items, revision, "", None)
            start = res.kvs[-1].key + "\x00"

    # -- writes -----------------------------------------------------------------

    async def create(self, kind: Kind, obj: Any, *, dry_run: bool = False) -> Any:
        meta = obj.metadata
        if not kind.namespaced:
            meta.namespace = ""
        elif not meta.namespace:
            raise self._invalid(kind, obj, [errors.FieldError(
                "metadata.namespace", "Required value", "FieldValueRequired")])
        generated = not meta.name and bool(meta.generate_name)
        meta.uid = str(uuid.uuid4())
        meta.resource_version = ""
        meta.generation = 1
        meta.creation_timestamp.CopyFrom(self._now())
        meta.ClearField("deletion_timestamp")
        meta.ClearField("deletion_grace_period_seconds")
        if kind.has_status and kind.kind != "Node":
            obj.ClearField("status")
        if kind.kind == "Secret":
            _merge_string_data(obj)
        if kind.kind == "Namespace" and "kubernetes" not in obj.spec.finalizers:
            obj.spec.finalizers.append("kubernetes")
        if kind.kind == "Service" and self.service_ips is not None:
            return await self._create_service(kind, obj, self.service_ips, generated=generated,
                                              dry_run=dry_run)
        return await self._create(kind, obj, generated=generated, dry_run=dry_run)

    async def _create_service(self, kind: Kind, obj: Any, ips: ServiceIPAllocator, *,
                              generated: bool, dry_run: bool) -> Any:
        """Create a Service holding a reserved ClusterIP (``apiserver.serviceips``).

        The address is reserved after validation and before the write; a write
        that surely did not happen frees it at once (one that may have, e.g.
        storage unavailable, is left to the allocator's repair pass)."""
        if generated:
            obj.metadata.name = _generated_name(obj.metadata.generate_name)
        validation.apply_defaults(kind, obj)
        problems = validation.validate(kind, obj)
        if problems:
            raise self._invalid(kind, obj, problems)
        await self._require_namespace(kind, obj.metadata.namespace)
        reserved = await ips.allocate(obj, dry_run=dry_run)
        try:
            return await self._create(kind, obj, generated=generated, dry_run=dry_run,
                                      namespace_checked=True)
        except errors.ShoalError as e:
            if reserved and not isinstance(e, errors.TemporaryError):
                await ips.release(reserved, obj.metadata.uid)
            raise

    async def _create(self, kind: Kind, obj: Any, *, generated: bool, dry_run: bool,
                      namespace_checked: bool = False) -> Any:
        meta = obj.metadata
        for attempt in range(8):
            if generated and (attempt or not meta.name):
                meta.name = _generated_name(meta.generate_name)
            validation.apply_defaults(kind, obj)
            problems = validation.validate(kind, obj)
            if problems:
                raise self._invalid(kind, obj, problems)
            if not namespace_checked:       # the namespace is read once per create
                await self._require_namespace(kind, meta.namespace)
                namespace_checked = True
            data = _serialize(obj)
            self._check_size(kind, data)
            key = kind.key(meta.namespace, meta.name)
            if dry_run:
                if await self.store.get(key) is not None:
                    raise self._exists(kind, meta.name)
                return obj
            try:
                revision = await self.store.create(key, data)
            except errors.AlreadyExists:
                if generated and attempt < 7:
                    continue
                raise self._exists(kind, meta.name) from None
            meta.resource_version = str(revision)
            return obj
        raise self._exists(kind, meta.name)  # pragma: no cover - loop always returns

    def _exists(self, kind: Kind, name: str) -> errors.AlreadyExists:
        return errors.AlreadyExists(f'{kind.qualified_resource} "{name}" already exists',
                                    kind=kind.kind, name=name, group=kind.group)

    async def update(
        self, kind: Kind, obj: Any, *, status_only: bool = False, dry_run: bool = False
    ) -> Any:
        """Update (or UpdateStatus). See the module docstring for the rules."""
        ips = self.service_ips
        if kind.kind != "Service" or status_only or ips is None:
            return await self._update(kind, obj, status_only=status_only, dry_run=dry_run)
        # A Service that had no ClusterIP (ExternalName turned ClusterIP) gets one here.
        reserved: list[tuple[str, str]] = []  # (address, owner uid)
        try:
            return await self._update(kind, obj, status_only=False, dry_run=dry_run,
                                      reserved=reserved)
        except errors.ShoalError as e:
            if reserved and not isinstance(e, errors.TemporaryError):
                await ips.release(*reserved[0])
            raise

    async def update_ephemeral_containers(self, kind: Kind, obj: Any) -> Any:
        """The pods/ephemeralcontainers subresource: only the pod's
        spec.ephemeralContainers is taken from ``obj`` (see
        ``validation.validate_ephemeral_containers``)."""
        return await self._update(kind, obj, status_only=False, dry_run=False,
                                  ephemeral=True)

    async def _update(self, kind: Kind, obj: Any, *, status_only: bool, dry_run: bool,
                      reserved: list[tuple[str, str]] | None = None,
                      ephemeral: bool = False) -> Any:
        if status_only and not kind.has_status:
            raise errors.MethodNotAllowed(f"{kind.kind} has no status to update",
                                          kind=kind.kind)
        meta = obj.metadata
        if not kind.namespaced:
            meta.namespace = ""
        if not meta.name:
            raise self._invalid(kind, obj, [errors.FieldError(
                "metadata.name", "Required value", "FieldValueRequired")])
        wanted_rv = revision_of(obj)
        key = kind.key(meta.namespace, meta.name)
        for _ in range(_UPDATE_ATTEMPTS):
            current, stale = await self._read(kind, namespace=meta.namespace, name=meta.name)
            cur_rv = int(current.metadata.resource_version)
            if wanted_rv and wanted_rv != cur_rv:
                raise self._conflict(kind, meta.name)
            if meta.uid and meta.uid != current.metadata.uid:
                raise errors.Conflict(
                    f'Precondition failed: UID in object meta: {meta.uid}, UID in storage: '
                    f'{current.metadata.uid}', kind=kind.kind, name=meta.name)
            if ephemeral:
                new = kind.new()
                new.CopyFrom(current)
                new.spec.ClearField("ephemeral_containers")
                new.spec.ephemeral_containers.extend(obj.spec.ephemeral_containers)
                problems = validation.validate_ephemeral_containers(new, current)
                if problems:
                    raise self._invalid(kind, new, problems)
            if kind.kind == "Pod" and not status_only and not ephemeral:
                _check_rebinding(obj, current)
            if not ephemeral:
                new = self._merge_for_update(kind, obj, current, status_only=status_only)
            problems = validation.validate_update(kind, new, current) if not ephemeral else []
            if problems:
                raise self._invalid(kind, new, problems)
            if (reserved is not None and self.service_ips is not None and not reserved
                    and wants_ip(new) and not service_ips(current)):
                ip = await self.service_ips.allocate(new, dry_run=dry_run)
                if ip:
                    reserved.append((ip, new.metadata.uid))
                    obj.spec.cluster_ip, obj.spec.cluster_ips[:] = ip, [ip]
            data = _serialize(new)
            self._check_size(kind, data)
            if data == _serialize(current) and not stale:
                return current  # no change, no write (a stale one is re-encrypted)
            if dry_run:
                return new
            if current.metadata.HasField("deletion_timestamp") and not _finalizers(kind, new):
                try:
                    revision = await self.store.delete(key, expected_revision=cur_rv)
                except errors.Conflict:
                    if wanted_rv:
                        raise self._conflict(kind, meta.name) from None
                    continue
                except errors.NotFound:
                    raise self._gone(kind, meta.name) from None
                new.metadata.resource_version = str(revision)
                return new
            try:
                revision = await self.store.update(key, data, expected_revision=cur_rv)
            except errors.Conflict:
                if wanted_rv:
                    raise self._conflict(kind, meta.name) from None
                continue
            except errors.NotFound:
                raise self._gone(kind, meta.name) from None
            new.metadata.resource_version = str(revision)
            return new
        raise self._conflict(kind, meta.name)

    def _merge_for_update(self, kind: Kind, obj: Any, current: Any, *, status_only: bool) -> Any:
        if status_only:
            new: Any = kind.new()
            new.CopyFrom(current)
            new.ClearField("status")
            if obj.HasField("status"):
                new.status.CopyFrom(obj.status)
            return new
        new = kind.new()
        new.CopyFrom(obj)
        meta, cur = new.metadata, current.metadata
        meta.uid = cur.uid
        meta.creation_timestamp.CopyFrom(cur.creation_timestamp)
        meta.generate_name = cur.generate_name
        meta.ClearField("deletion_timestamp")
        meta.ClearField("deletion_grace_period_seconds")
        if cur.HasField("deletion_timestamp"):
            meta.deletion_timestamp.CopyFrom(cur.deletion_timestamp)
        if cur.HasField("deletion_grace_period_seconds"):
            meta.deletion_grace_period_seconds = cur.deletion_grace_period_seconds
        meta.resource_version = cur.resource_version
        if kind.has_status:
            new.ClearField("status")
            if current.HasField("status"):
                new.status.CopyFrom(current.status)
        if kind.kind == "Secret":
            _merge_string_data(new)
        if kind.kind == "Service" and not new.spec.cluster_ip \
                and new.spec.type != "ExternalName":
            # As Kubernetes: an update that leaves clusterIP out keeps the allocated one
            # (turning into ExternalName gives it up: the allocator frees it).
            new.spec.cluster_ip = current.spec.cluster_ip
            new.spec.cluster_ips[:] = current.spec.cluster_ips
        validation.apply_defaults(kind, new)
        meta.generation = cur.generation
        if _body_bytes(new) != _body_bytes(current):
            meta.generation = cur.generation + 1
        return new

    def _conflict(self, kind: Kind, name: str) -> errors.Conflict:
        return errors.Conflict(
            f'Operation cannot be fulfilled on {kind.qualified_resource} "{name}": the object '
            "has been modified; please apply your changes to the latest version and try again",
            kind=kind.kind, name=name, group=kind.group)

    def _gone(self, kind: Kind, name: str) -> errors.NotFound:
        return errors.NotFound(f'{kind.qualified_resource} "{name}" not found',
                               kind=kind.kind, name=name, group=kind.group)

    async def delete(
        self,
        kind: Kind,
        *,
        namespace: str,
        name: str,
        uid: str = "",
        resource_version: str = "",
        grace_period: int | None = None,
        propagation: str = "",
        dry_run: bool = False,
    ) -> Any:
        """Delete, or start a graceful deletion when finalizers remain."""
        if propagation not in PROPAGATION_POLICIES:
            raise errors.BadRequest(
                f'propagationPolicy "{propagation}" is not supported: supported values: '
                '"Orphan", "Background", "Foreground"')
        if grace_period is not None and grace_period < 0:
            raise errors.BadRequest("gracePeriodSeconds must be >= 0")
        if not kind.namespaced:
            namespace = ""
        if kind.kind == "Namespace" and name in PROTECTED_NAMESPACES:
            raise errors.Forbidden(f'namespace "{name}" is protected and cannot be deleted',
                                   kind=kind.kind, name=name)
        key = kind.key(namespace, name)
        wanted_rv = int(resource_version) if resource_version else 0
        for _ in range(_UPDATE_ATTEMPTS):
            current = await self.get(kind, namespace=namespace, name=name)
            cur_rv = int(current.metadata.resource_version)
            if uid and uid != current.metadata.uid:
                raise errors.Conflict(
                    f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                    f"{current.metadata.uid}", kind=kind.kind, name=name)
            if wanted_rv and wanted_rv != cur_rv:
                raise errors.Conflict(
                    f"Precondition failed: ResourceVersion in precondition: {wanted_rv}, "
                    f"ResourceVersion in object meta: {cur_rv}", kind=kind.kind, name=name)
            finalizers = gc_finalizers(list(current.metadata.finalizers), propagation)
            if current.metadata.HasField("deletion_timestamp"):
                if finalizers == list(current.metadata.finalizers):
                    return current
                # A new policy for an object already terminating: swap the GC finalizer.
                changed: Any = kind.new()
                changed.CopyFrom(current)
                changed.metadata.finalizers[:] = finalizers
                if dry_run:
                    return changed
                try:
                    if _finalizers(kind, changed):
                        revision = await self.store.update(key, _serialize(changed),
                                                           expected_revision=cur_rv)
                    else:
                        revision = await self.store.delete(key, expected_revision=cur_rv)
                except errors.Conflict:
                    if wanted_rv:
                        raise self._conflict(kind, name) from None
                    continue
                changed.metadata.resource_version = str(revision)
                return changed
            probe: Any = kind.new()
            probe.CopyFrom(current)
            probe.metadata.finalizers[:] = finalizers
            if _finalizers(kind, probe):
                marked: Any = probe
                marked.metadata.deletion_timestamp.CopyFrom(self._now())
                marked.metadata.deletion_grace_period_seconds = self._grace(
                    kind, current, grace_period)
                if kind.kind == "Namespace":
                    marked.status.phase = "Terminating"
                if dry_run:
                    return marked
                try:
                    revision = await self.store.update(key, _serialize(marked),
                                                       expected_revision=cur_rv)
                except errors.Conflict:
                    if wanted_rv:
                        raise self._conflict(kind, name) from None
                    continue
                marked.metadata.resource_version = str(revision)
                return marked
            if dry_run:
                return current
            try:
                await self.store.delete(key, expected_revision=cur_rv)
            except errors.Conflict:
                if wanted_rv:
                    raise self._conflict(kind, name) from None
                continue
            return current
        raise self._conflict(kind, name)

    @staticmethod
    def _grace(kind: Kind, obj: Any, requested: int | None) -> int:
        if requested is not None:
            return requested
        if kind.kind == "Pod" and obj.spec.HasField("termination_grace_period_seconds"):
            return int(obj.spec.termination_grace_period_seconds)
        return 30 if kind.kind == "Pod" else 0


def _generated_name(prefix: str) -> str:
    return prefix[: 63 - 5] + "".join(random.choices(_NAME_ALPHABET, k=5))


def _check_rebinding(pod: Any, current: Any) -> None:
    """Binding sets ``spec.nodeName`` once; naming another node later is a ``Conflict``
    (Kubernetes' binding: "pod ... is already assigned to node ...")."""
    bound = current.spec.node_name
    if bound and pod.spec.node_name and pod.spec.node_name != bound:
        raise errors.Conflict(f'pod {current.metadata.name} is already assigned to node '
                              f'"{bound}"', kind="Pod", name=current.metadata.name)


def gc_finalizers(finalizers: list[str], propagation: str) -> list[str]:
    """The finalizers an object has after a Delete with ``propagation`` (pure).

    Kubernetes' ``deletionFinalizersForGarbageCollection``: both GC finalizers
    are taken out, then the one the policy asks for is put back; with no
    policy, the GC finalizer already there stays."""
    orphan = propagation == "Orphan" or (not propagation and ORPHAN_FINALIZER in finalizers)
    foreground = propagation == "Foreground" or (
        not propagation and FOREGROUND_FINALIZER in finalizers)
    out = [f for f in finalizers if f not in (ORPHAN_FINALIZER, FOREGROUND_FINALIZER)]
    if orphan:
        out.append(ORPHAN_FINALIZER)
    if foreground:
        out.append(FOREGROUND_FINALIZER)
    return list(finalizers) if set(out) == set(finalizers) else out


def _finalizers(kind: Kind, obj: Any) -> bool:
    """Does anything still hold this object? (A Namespace also has spec.finalizers.)"""
    if obj.metadata.finalizers:
        return True
    return kind.kind == "Namespace" and bool(obj.spec.finalizers)


def _merge_string_data(secret: Any) -> None:
    """Secret.stringData is write-only: fold it into data (it wins) and drop it."""
    for k, v in secret.string_data.items():
        secret.data[k] = v.encode()
    secret.ClearField("string_data")


def _encode_continue(revision: int, start: str) -> str:
    raw = json.dumps({"v": 1, "rv": revision, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str, prefix: str) -> tuple[int, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        revision, start = int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError) as e:
        raise errors.BadRequest(f"invalid continue token: {e}") from None
    if not start.startswith(prefix) or revision <= 0:
        raise errors.BadRequest("invalid continue token: it belongs to another list")
    return revision, start
