"""Ownership, as the garbage collector sees it, and what to do about it (pure).

Every object may name owners in ``metadata.ownerReferences`` (by uid). The
:class:`OwnerGraph` keeps, for each uid the collector has seen, a small
:class:`Item` (identity, owner links, deletion state) and the reverse index
owner uid -> dependent uids. It does no I/O: the controller feeds it informer
events and gets back the uids worth looking at again.

The decisions are Kubernetes' (``garbagecollector.attemptToDeleteItem``,
``processDeletingDependentsItem``, ``attemptToOrphan``)::

    dependent, owners classified (each by uid):
      solid    -- exists, not waiting for its dependents
      dangling -- gone (or its uid differs: a new object with the old name)
      waiting  -- exists, terminating with the foregroundDeletion finalizer

      some solid              -> keep; drop the refs to dangling/waiting owners
      none solid, some waiting, has dependents of its own
                              -> delete it with Foreground (its own dependents first)
      otherwise               -> delete it (Orphan/Foreground if it already
                                 carries that finalizer, else Background)

    owner terminating with "orphan":
      remove this owner's ref from every dependent -> drop the finalizer
    owner terminating with "foregroundDeletion":
      look at every dependent again (they now see a waiting owner and go);
      once no dependent with blockOwnerDeletion is left -> drop the finalizer

An owner the collector cannot resolve (a kind this server does not serve) is
treated as solid: when in doubt, nothing is deleted.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from apiserver.objectstore import FOREGROUND_FINALIZER, ORPHAN_FINALIZER


@dataclass(frozen=True)
class Identity:
    """Which object: enough to find it through the API."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


@dataclass(frozen=True)
class OwnerLink:
    """One ``ownerReference``."""

    api_version: str
    kind: str
    name: str
    uid: str
    block: bool = False


@dataclass(frozen=True)
class Item:
    """What the collector knows of one object."""

    identity: Identity
    owners: tuple[OwnerLink, ...] = ()
    deleting: bool = False
    finalizers: tuple[str, ...] = ()

    @property
    def uid(self) -> str:
        return self.identity.uid

    @property
    def waiting_for_dependents(self) -> bool:
        return self.deleting and FOREGROUND_FINALIZER in self.finalizers

    @property
    def orphaning(self) -> bool:
        return self.deleting and ORPHAN_FINALIZER in self.finalizers

    @property
    def gc_pending(self) -> bool:
        """Terminating and held by one of the collector's own finalizers."""
        return self.waiting_for_dependents or self.orphaning

    def link_to(self, owner_uid: str) -> OwnerLink | None:
        return next((o for o in self.owners if o.uid == owner_uid), None)


def item_of(obj: Any, *, api_version: str, kind: str) -> Item:
    """The collector's record of an API object."""
    meta = obj.metadata
    owners = tuple(
        OwnerLink(api_version=r.api_version, kind=r.kind, name=r.name, uid=r.uid,
                  block=r.HasField("block_owner_deletion") and r.block_owner_deletion)
        for r in meta.owner_references)
    return Item(
        identity=Identity(api_version=api_version, kind=kind, namespace=meta.namespace,
                          name=meta.name, uid=meta.uid),
        owners=owners, deleting=meta.HasField("deletion_timestamp"),
        finalizers=tuple(meta.finalizers))


class OwnerState(enum.Enum):
    SOLID = "solid"
    DANGLING = "dangling"
    WAITING = "waiting"


# -- the graph -------------------------------------------------------------------


class OwnerGraph:
    """uid -> Item, and owner uid -> dependent uids. Not thread-safe; no I/O.

    ``upsert`` and ``remove`` return the uids whose decision may have changed,
    for the caller to enqueue."""

    def __init__(self) -> None:
        self._items: dict[str, Item] = {}
        self._dependents: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, uid: str) -> Item | None:
        return self._items.get(uid)

    def items(self) -> list[Item]:
        return list(self._items.values())

    def dependents(self, owner_uid: str) -> list[Item]:
        """Objects naming ``owner_uid`` as an owner, in a stable order."""
        uids = sorted(self._dependents.get(owner_uid, ()))
        return [self._items[u] for u in uids if u in self._items]

    def has_dependents(self, owner_uid: str) -> bool:
        return bool(self._dependents.get(owner_uid))

    def _link(self, item: Item) -> None:
        for o in item.owners:
            self._dependents.setdefault(o.uid, set()).add(item.uid)

    def _unlink(self, item: Item) -> None:
        for o in item.owners:
            deps = self._dependents.get(o.uid)
            if deps is not None:
                deps.discard(item.uid)
                if not deps:
                    del self._dependents[o.uid]

    def _gc_owners(self, item: Item) -> set[str]:
        out = set()
        for o in item.owners:
            owner = self._items.get(o.uid)
            if owner is not None and owner.gc_pending:
                out.add(o.uid)
        return out

    def upsert(self, item: Item) -> set[str]:
        old = self._items.get(item.uid)
        if old is not None:
            self._unlink(old)
        self._items[item.uid] = item
        self._link(item)
        touched: set[str] = set()
        if (item.owners and not item.deleting) or item.gc_pending:
            touched.add(item.uid)
        touched |= self._gc_owners(item)
        if old is not None:
            touched |= self._gc_owners(old)
        if item.gc_pending and (old is None or not old.gc_pending):
            touched |= {d.uid for d in self.dependents(item.uid)}
        return touched

    def remove(self, uid: str) -> set[str]:
        item = self._items.pop(uid, None)
        if item is None:
            return set()
        self._unlink(item)
        touched = {d.uid for d in self.dependents(uid)}
        touched |= self._gc_owners(item)
        return touched

    def suspects(self) -> list[str]:
        """Items worth a periodic second look: terminating with a GC finalizer,
        or naming an owner the graph does not hold (or holds as terminating)."""
        out = []
        for item in self._items.values():
            if item.gc_pending:
                out.append(item.uid)
                continue
            if item.deleting:
                continue
            for o in item.owners:
                owner = self._items.get(o.uid)
                if owner is None or owner.deleting:
                    out.append(item.uid)
                    break
        return out


# -- decisions -----------------------------------------------------------------


@dataclass(frozen=True)
class DependentPlan:
    """What to do with an object that has owners."""

    # Delete it, with this propagation policy ("" when not deleting).
    delete_policy: str = ""
    # Owner uids whose references to remove from it.
    drop_owner_refs: tuple[str, ...] = ()
    # Owner uids whose references lose blockOwnerDeletion (breaks foreground cycles).
    unblock: tuple[str, ...] = ()
    reason: str = ""

    @property
    def delete(self) -> bool:
        return bool(self.delete_policy)


KEEP = DependentPlan(reason="has a live owner")


def plan_dependent(item: Item, owners: Mapping[str, OwnerState], *, has_dependents: bool,
                   dependents_waiting: bool = False) -> DependentPlan:
    """Decide for ``item`` given the state of each of its owners (by uid).

    ``has_dependents``: something names ``item`` as owner;
    ``dependents_waiting``: one of those is itself waiting for its dependents
    (a foreground cycle, broken by unblocking ``item``'s own references)."""
    if item.deleting or not item.owners:
        return DependentPlan(reason="already deleting" if item.deleting else "has no owners")
    by_state: dict[OwnerState, list[str]] = {s: [] for s in OwnerState}
    for link in item.owners:
        by_state[owners.get(link.uid, OwnerState.SOLID)].append(link.uid)
    solid, dangling = by_state[OwnerState.SOLID], by_state[OwnerState.DANGLING]
    waiting = by_state[OwnerState.WAITING]
    if solid:
        if not dangling and not waiting:
            return KEEP
        return DependentPlan(drop_owner_refs=tuple(dangling + waiting),
                             reason="an owner is still there; dropping references to "
                                    "owners that are gone or being deleted")
    if waiting and has_dependents:
        unblock = tuple(o.uid for o in item.owners if o.block) if dependents_waiting else ()
        return DependentPlan(delete_policy="Foreground", unblock=unblock,
                             reason="its owner waits for its dependents to go")
    if item.orphaning or ORPHAN_FINALIZER in item.finalizers:
        policy = "Orphan"
    elif FOREGROUND_FINALIZER in item.finalizers:
        policy = "Foreground"
    else:
        policy = "Background"
    why = "its owner waits for its dependents to go" if waiting else "every owner is gone"
    return DependentPlan(delete_policy=policy, reason=why)


@dataclass(frozen=True)
class OwnerPlan:
    """What to do for an owner held by a GC finalizer."""

    # Dependents whose references to this owner must be removed (orphan).
    orphan: tuple[Identity, ...] = ()
    # Dependents to look at again (foreground: they should now go).
    recheck: tuple[str, ...] = ()
    # The finalizer that can be removed now ("" = not yet).
    remove_finalizer: str = ""
    # Dependents still holding the owner (blockOwnerDeletion), for messages.
    blocking: tuple[Identity, ...] = field(default=())


def plan_owner(owner: Item, dependents: Sequence[Item]) -> OwnerPlan:
    """Decide for an owner that is terminating with ``orphan`` or ``foregroundDeletion``.

    Orphaning wins when both are present (as in Kubernetes, where the two are
    never set together by the API)."""
    if owner.orphaning:
        return OwnerPlan(orphan=tuple(d.identity for d in dependents),
                         remove_finalizer=ORPHAN_FINALIZER)
    if not owner.waiting_for_dependents:
        return OwnerPlan()
    blocking = [d for d in dependents
                if (link := d.link_to(owner.uid)) is not None and link.block]
    recheck = tuple(d.uid for d in dependents if not d.deleting)
    if not blocking:
        return OwnerPlan(recheck=recheck, remove_finalizer=FOREGROUND_FINALIZER)
    return OwnerPlan(recheck=recheck, blocking=tuple(d.identity for d in blocking))


def without_owner_refs(refs: Iterable[Any], uids: Iterable[str]) -> list[Any]:
    """The owner references left after removing those with ``uids``."""
    gone = set(uids)
    return [r for r in refs if r.uid not in gone]
