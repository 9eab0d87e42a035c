"""The garbage collector: dependents follow their owners out of the cluster.

    informers (every kind but Event) --> OwnerGraph (ownership.py, pure)
         each change -> the uids whose decision may have changed -> WorkQueue
    worker(uid):
      terminating with "orphan"             -> release dependents, drop finalizer
      terminating with "foregroundDeletion" -> dependents go first, then the finalizer
      has owners                            -> plan_dependent: keep / drop refs / delete
    every 30 s: terminating owners and objects whose owner the graph lacks, again

Deletion, by the policy given to Delete (``apiserver/objectstore.py`` adds the
finalizers)::

    Background: owner gone at once --> dependents deleted (each with its own policy)
    Foreground: owner terminating (foregroundDeletion) --> dependents deleted
                --> blocking dependents (blockOwnerDeletion) gone --> owner gone
    Orphan:     owner terminating (orphan) --> refs removed from dependents --> owner gone

Contract: every step is idempotent and re-reads what it changes; deletes carry
the dependent's uid as a precondition, so an object re-created under the same
name is never touched. Before deleting because an owner is gone, the owner is
looked up live when the informer cache does not hold it (the cache may lag).
Failures go back to the queue with per-key back-off (``keyworkers``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import every, run_workers
from apiserver.controllers.ownership import (
    Identity,
    Item,
    OwnerGraph,
    OwnerLink,
    OwnerState,
    item_of,
    plan_dependent,
    plan_owner,
)
from apiserver.objectstore import FOREGROUND_FINALIZER
from shoal import errors
from shoal.client import AsyncClient
from shoal.kinds import Kind, KindTable
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
_UPDATE_ATTEMPTS = 5
# Events are many, short-lived and never owned in practice; watching them would
# only cost memory.
_UNWATCHED = frozenset({"Event"})


def watched_kinds(kinds: KindTable) -> list[Kind]:
    return [k for k in kinds if k.kind not in _UNWATCHED]


class GarbageCollector:
    name = "garbagecollector"

    def __init__(self, *, resync_period: float = RESYNC_SECONDS) -> None:
        self.graph = OwnerGraph()
        self.queue = WorkQueue(base_delay=0.05, max_delay=30.0)
        self.resync_period = resync_period
        self._client: AsyncClient | None = None
        self._kinds: KindTable | None = None

    # -- wiring -----------------------------------------------------------------

    def setup(self, ctx: ControllerContext) -> None:
        self._client = ctx.client
        self._kinds = ctx.client.kinds
        for kind in watched_kinds(ctx.client.kinds):
            inf = ctx.informers.get(kind.message)
            inf.add_handlers(on_add=self._on_change(kind),
                             on_update=self._on_update(kind),
                             on_delete=self._on_delete)

    def _on_change(self, kind: Kind) -> Any:
        def handler(obj: Any) -> None:
            self._enqueue(self.graph.upsert(
                item_of(obj, api_version=kind.api_version, kind=kind.kind)))
        return handler

    def _on_update(self, kind: Kind) -> Any:
        change = self._on_change(kind)

        def handler(old: Any, new: Any) -> None:
            if old.metadata.uid != new.metadata.uid:
                self._enqueue(self.graph.remove(old.metadata.uid))
            change(new)
        return handler

    def _on_delete(self, obj: Any) -> None:
        self._enqueue(self.graph.remove(obj.metadata.uid))

    def _enqueue(self, uids: set[str]) -> None:
        for uid in uids:
            self.queue.add(uid)

    def _resync(self) -> None:
        for uid in self.graph.suspects():
            self.queue.add(uid)

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        log.info("garbage collector: %d objects in the graph", len(self.graph))
        self._resync()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_workers(self.queue, self.sync, count=ctx.settings.workers,
                                           what="garbagecollector"))
                tg.create_task(every(self.resync_period, self._resync))
        finally:
            self.queue.close()

    # -- one object ---------------------------------------------------------------

    @property
    def client(self) -> AsyncClient:
        assert self._client is not None, "setup() first"
        return self._client

    @property
    def kinds(self) -> KindTable:
        assert self._kinds is not None, "setup() first"
        return self._kinds

    async def sync(self, uid: str) -> float | None:
        item = self.graph.get(uid)
        if item is None:
            return None
        if item.gc_pending:
            await self._finalize_owner(item)
        if item.owners and not item.deleting:
            await self._attempt_delete(item)
        return None

    async def _attempt_delete(self, item: Item) -> None:
        states = {link.uid: await self._owner_state(item, link) for link in item.owners}
        deps = self.graph.dependents(item.uid)
        plan = plan_dependent(item, states, has_dependents=bool(deps),
                              dependents_waiting=any(d.waiting_for_dependents for d in deps))
        if plan.drop_owner_refs or plan.unblock:
            log.info("garbage collector: %s: %s", item.identity, plan.reason)
            await self._edit_refs(item.identity, drop=plan.drop_owner_refs,
                                  unblock=plan.unblock)
        if plan.delete:
            log.info("garbage collector: deleting %s (%s), propagation %s", item.identity,
                     plan.reason, plan.delete_policy)
            await self._delete(item.identity, plan.delete_policy)

    async def _finalize_owner(self, owner: Item) -> None:
        plan = plan_owner(owner, self.graph.dependents(owner.uid))
        for dep in plan.orphan:
            await self._edit_refs(dep, drop=(owner.uid,))
        for uid in plan.recheck:
            self.queue.add(uid)
        if plan.remove_finalizer:
            log.info("garbage collector: %s: dependents handled; removing %s", owner.identity,
                     plan.remove_finalizer)
            await self._remove_finalizer(owner.identity, plan.remove_finalizer)
        elif plan.blocking:
            log.debug("garbage collector: %s waits for %s", owner.identity,
                      ", ".join(map(str, plan.blocking)))

    # -- reads and writes -----------------------------------------------------------

    def _kind(self, api_version: str, kind: str) -> Kind | None:
        try:
            return self.kinds.by_gvk(api_version, kind)
        except errors.BadRequest:
            return None

    async def _owner_state(self, item: Item, link: OwnerLink) -> OwnerState:
        owner = self.graph.get(link.uid)
        if owner is not None:
            return OwnerState.WAITING if owner.waiting_for_dependents else OwnerState.SOLID
        kind = self._kind(link.api_version, link.kind)
        if kind is None:
            return OwnerState.SOLID  # cannot tell: never delete on a guess
        if kind.namespaced and not item.identity.namespace:
            return OwnerState.DANGLING  # a cluster-scoped object cannot have a namespaced owner
        namespace = item.identity.namespace if kind.namespaced else ""
        try:
            live: Any = await self.client.get(kind.message, link.name, namespace=namespace)
        except errors.NotFound:
            return OwnerState.DANGLING
        if live.metadata.uid != link.uid:
            return OwnerState.DANGLING
        waiting = (live.metadata.HasField("deletion_timestamp")
                   and FOREGROUND_FINALIZER in live.metadata.finalizers)
        return OwnerState.WAITING if waiting else OwnerState.SOLID

    async def _fresh(self, ident: Identity) -> tuple[Kind, Any] | None:
        kind = self._kind(ident.api_version, ident.kind)
        if kind is None:
            return None
        try:
            obj: Any = await self.client.get(kind.message, ident.name,
                                             namespace=ident.namespace)
        except errors.NotFound:
            return None
        if obj.metadata.uid != ident.uid:
            return None
        return kind, obj

    async def _delete(self, ident: Identity, policy: str) -> None:
        kind = self._kind(ident.api_version, ident.kind)
        if kind is None:
            return
        try:
            await self.client.delete(kind.message, ident.name, namespace=ident.namespace,
                                     uid=ident.uid, propagation_policy=policy)
        except errors.NotFound:
            pass
        except errors.Conflict:
            pass  # the uid precondition failed: another object has the name now

    async def _edit_refs(self, ident: Identity, *, drop: tuple[str, ...] = (),
                         unblock: tuple[str, ...] = ()) -> None:
        gone, loosen = set(drop), set(unblock)
        for _ in range(_UPDATE_ATTEMPTS):
            found = await self._fresh(ident)
            if found is None:
                return
            _, obj = found
            refs = [r for r in obj.metadata.owner_references if r.uid not in gone]
            changed = len(refs) != len(obj.metadata.owner_references)
            for r in refs:
                if r.uid in loosen and r.block_owner_deletion:
                    r.block_owner_deletion = False
                    changed = True
            if not changed:
                return
            kept = [type(r)() for r in refs]
            for dst, src in zip(kept, refs, strict=True):
                dst.CopyFrom(src)
            del obj.metadata.owner_references[:]
            obj.metadata.owner_references.extend(kept)
            try:
                await self.client.update(obj)
                return
            except errors.NotFound:
                return
            except errors.Conflict:
                continue
        raise errors.Conflict(f"{ident}: owner references kept changing")

    async def _remove_finalizer(self, ident: Identity, finalizer: str) -> None:
        for _ in range(_UPDATE_ATTEMPTS):
            found = await self._fresh(ident)
            if found is None:
                return
            _, obj = found
            if finalizer not in obj.metadata.finalizers:
                return
            obj.metadata.finalizers.remove(finalizer)
            try:
                await self.client.update(obj)
                return
            except errors.NotFound:
                return
            except errors.Conflict:
                continue
        raise errors.Conflict(f"{ident}: could not remove finalizer {finalizer}")
