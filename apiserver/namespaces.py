"""Namespace deletion: a Terminating namespace is emptied, then removed.

As in Kubernetes, every namespace is created with the ``kubernetes`` entry in
``spec.finalizers``. Deleting it only marks it (``deletionTimestamp``, phase
``Terminating``); new objects are refused in it. This loop then deletes every
object in it (each honouring its own finalizers and grace period), and once
nothing is left it drops the ``kubernetes`` finalizer, which lets the
namespace itself go::

    Active --Delete--> Terminating --(contents deleted, all gone)--> removed
                          ^   |
                          +---+ objects still finalizing: look again later

Contract: ``finalize(name)`` is idempotent and safe to run on several
apiservers at once (deletes of gone objects are ignored; the finalizer is
removed with a compare-and-swap). The work queue retries with back-off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from apiserver.objectstore import ObjectStore
from apiserver.watchcache import CacheEvent, WatchCache
from shoal import errors
from shoal.kinds import KindTable
from shoal.queueing import WorkQueue
from shoal.selectors import EVERYTHING, FieldSelector

log = logging.getLogger(__name__)

FINALIZER = "kubernetes"
RECHECK_SECONDS = 1.0


class NamespaceFinalizer:
    def __init__(self, *, objects: ObjectStore, cache: WatchCache, kinds: KindTable) -> None:
        self.objects = objects
        self.cache = cache
        self.kinds = kinds
        self.ns_kind = kinds.by_resource("", "namespaces")
        self.queue = WorkQueue(base_delay=0.5, max_delay=30.0)
        self.cache.cache_for(self.ns_kind).listeners.append(self._on_event)

    def _on_event(self, ev: CacheEvent) -> None:
        ns: Any = self.ns_kind.new()
        ns.ParseFromString(ev.obj.raw)
        if ns.metadata.HasField("deletion_timestamp"):
            self.queue.add(ns.metadata.name)

    async def run(self) -> None:
        await self.cache.ready.wait()
        for obj in self.cache.cache_for(self.ns_kind).objects.values():
            self._on_event(CacheEvent(0, obj, None, obj.revision))
        async for name in self.queue.worker():
            try:
                done = await self.finalize(name)
            except errors.ShoalError as e:
                delay = self.queue.add_rate_limited(name)
                log.warning("namespace %s: %s; retrying in %.1fs", name, e, delay)
                continue
            self.queue.forget(name)
            if not done:
                self.queue.add_after(name, RECHECK_SECONDS)

    async def finalize(self, name: str) -> bool:
        """One pass. True when the namespace is gone or not terminating."""
        try:
            ns = await self.objects.get(self.ns_kind, namespace="", name=name)
        except errors.NotFound:
            return True
        if not ns.metadata.HasField("deletion_timestamp"):
            return True
        remaining = 0
        no_fields = FieldSelector()
        for kind in self.kinds:
            if not kind.namespaced:
                continue
            for obj in self.cache.cache_for(kind).select(name, EVERYTHING, no_fields):
                remaining += 1
                try:
                    await self.objects.delete(kind, namespace=name, name=obj.name)
                except errors.NotFound:
                    remaining -= 1
        if remaining:
            log.info("namespace %s: waiting for %d objects to go", name, remaining)
            return False
        if FINALIZER in ns.spec.finalizers:
            ns.spec.finalizers.remove(FINALIZER)
            try:
                await self.objects.update(self.ns_kind, ns)
            except (errors.NotFound, errors.Conflict):
                return False
        log.info("namespace %s: emptied and finalized", name)
        await asyncio.sleep(0)
        return True
