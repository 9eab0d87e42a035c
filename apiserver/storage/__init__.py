"""Storage: the one small interface the apiserver keeps its objects behind.

Two backends implement :class:`Store` with the same semantics:

- ``apiserver.storage.etcd.EtcdStore``: etcd v3 through ``aetcd`` (its channel and
  generated stubs; the watch stream is driven directly so progress requests work).
- ``apiserver.storage.sqlite.SqliteStore``: an embedded SQLite file (or ``:memory:``)
  holding every revision of every key, in the way k3s' kine does, for a
  one-process dev server.

Semantics (etcd's, which the SQLite backend copies):

- One cluster-wide, strictly increasing ``revision``. Every successful write
  (create, update, delete) creates exactly one new revision.
- A key's ``mod_revision`` is the revision of its last write; its
  ``create_revision`` the revision that created it. The apiserver exposes
  ``mod_revision`` as ``metadata.resourceVersion``.
- ``range`` reads keys under a prefix in byte order, optionally at a past
  ``revision`` (``Expired`` when that revision has been compacted).
- ``watch`` yields every change under a prefix from ``from_revision`` on, in
  revision order, grouped in :class:`WatchBatch` per revision. A batch with no
  events is a progress notice: every event up to ``batch.revision`` has been
  delivered. ``request_progress`` asks for one.
- ``compact(revision)`` forgets history before ``revision``; reads and watches
  asking for older revisions get ``Expired``.

Errors are Shoal's own (``shoal.errors``): ``NotFound``, ``AlreadyExists``,
``Conflict``, ``Expired``, ``Unavailable``. No backend exception escapes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    # Read through an old encryption key (see apiserver.storage.encrypting): the
    # object store rewrites it on the next update even if nothing changed.
    stale: bool = False


class EventType(Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class StorageEvent:
    type: EventType
    key: str
    # The new value for PUT; empty for DELETE.
    value: bytes
    # The value before this event (None when the key was created by it).
    prev_value: bytes | None
    revision: int
    create_revision: int

    @property
    def is_create(self) -> bool:
        return self.type is EventType.PUT and self.create_revision == self.revision


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events of one revision, or (no events) a progress notice up to ``revision``."""

    revision: int
    events: tuple[StorageEvent, ...]


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: tuple[KeyValue, ...]
    # The revision the read reflects (the store's revision when revision=0 was asked).
    revision: int
    # More keys remain after the last one returned (limit was hit).
    more: bool
    # Number of keys in [start, end of prefix) at that revision, including those returned.
    count: int


class StoreWatch(Protocol):
    """A running watch. Iterate it; close it when done."""

    def __aiter__(self) -> AsyncIterator[WatchBatch]: ...

    async def request_progress(self) -> None:
        """Ask for a progress notice (an empty batch) once every pending event is out."""

    async def close(self) -> None:
        """Stop the watch. Idempotent."""


class Store(Protocol):
    """Revisioned key-value storage. Keys are ``/registry/...`` paths."""

    name: str

    async def start(self) -> None:
        """Connect (or open the file). Raises Unavailable when storage cannot be reached."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def current_revision(self) -> int:
        """The store's latest revision (a linearizable read)."""

    async def get(self, key: str) -> KeyValue | None:
        """The latest value of ``key``, or None."""

    async def range(
        self, prefix: str, *, start: str = "", limit: int = 0, revision: int = 0
    ) -> RangeResult:
        """Keys beginning with ``prefix`` and >= ``start``, in key order.

        ``limit`` 0 means no limit. ``revision`` 0 means latest; otherwise read
        as of that revision (``Expired`` if compacted, ``BadRequest`` if in the future).
        """

    async def create(self, key: str, value: bytes) -> int:
        """Write ``key`` only if absent. Returns the new revision. ``AlreadyExists`` otherwise."""

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> int:
        """Write ``key`` only if its mod_revision equals ``expected_revision``.

        Returns the new revision. ``NotFound`` if absent, ``Conflict`` if changed.
        """

    async def delete(self, key: str, *, expected_revision: int) -> int:
        """Delete ``key`` only if its mod_revision equals ``expected_revision``.

        ``expected_revision`` 0 deletes unconditionally. Returns the revision of
        the delete. ``NotFound`` if absent, ``Conflict`` if changed.
        """

    def watch(self, prefix: str, *, from_revision: int) -> StoreWatch:
        """Changes under ``prefix`` with revision >= ``from_revision``.

        Iterating raises ``Expired`` if ``from_revision`` has been compacted and
        ``Unavailable`` if the storage connection is lost.
        """

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision``. Compacting to an already compacted
        revision is a no-op."""

    async def compacted_revision(self) -> int:
        """The revision history was last compacted to (0 if never)."""
