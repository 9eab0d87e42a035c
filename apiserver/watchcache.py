"""The watch cache: one storage watch feeds every list and every client watch.

However many clients watch, the apiserver holds exactly one storage watch, on
``/registry/``. Its events update an in-memory copy of every object (per kind)
and a bounded history of recent events (per kind), and are fanned out to the
client watchers whose namespace and selectors they match.

Lifecycle::

    start -> INITIALIZING --(listed at S, replayed to R)--> READY
                 ^                                             |
                 |  storage watch Expired (history compacted)  |
                 +---------------------------------------------+
                    storage Unavailable: re-watch from last revision + 1
                    (with back-off), state kept, watchers kept

History across restarts: on start the cache lists at a *past* revision S (up to
``history_revisions`` back, never before the compacted revision) and replays
the storage history from S+1. So a client that watched an earlier apiserver
resumes from its last resourceVersion on a new one without losing or repeating
an event, as long as that version is inside the window.

Consistent reads: ``wait_fresh(R)`` returns once every event up to revision R
has been applied; when storage is quiet it asks the storage watch for a
progress notice rather than waiting for the next write.

Contract:
- ``watch()`` registers and replays atomically (single event loop, no await
  between replay and registration): no gap, no duplicate.
- A watcher whose queue overflows (a client too slow to read) is ended; the
  client resumes from its last resourceVersion.
- ``run()`` never returns until cancelled; it retries storage failures itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2

from apiserver.storage import EventType, Store, StoreWatch, WatchBatch
from shoal import errors
from shoal.api.resources.v1 import resources_pb2
from shoal.backoff import Backoff
from shoal.kinds import Kind, KindTable
from shoal.selectors import FieldSelector, LabelSelector

log = logging.getLogger(__name__)

REGISTRY_PREFIX = "/registry/"
# Not a kind: a key each apiserver writes when its cache starts (see _sync_marker).
SYNC_KEY = "/registry/apiserver-sync"
ADDED = resources_pb2.ADDED
MODIFIED = resources_pb2.MODIFIED
DELETED = resources_pb2.DELETED
BOOKMARK = resources_pb2.BOOKMARK


@dataclass(slots=True)
class CachedObject:
    """One stored object as the cache keeps it: raw bytes plus what filters need."""

    key: str
    namespace: str
    name: str
    revision: int
    raw: bytes
    labels: Mapping[str, str]
    fields: Mapping[str, str]


@dataclass(slots=True)
class CacheEvent:
    type: int
    obj: CachedObject
    prev: CachedObject | None
    revision: int
    _encoded: dict[tuple[int, bool], bytes] = field(default_factory=dict)


class Watcher:
    """One client watch: filters, a bounded queue of encoded events, and a wake-up."""

    def __init__(
        self,
        *,
        kind_cache: KindCache,
        namespace: str,
        labels: LabelSelector,
        fields: FieldSelector,
        bookmarks: bool,
        max_queue: int,
    ) -> None:
        self.kind_cache = kind_cache
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.bookmarks = bookmarks
        self.max_queue = max_queue
        self.pending: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.ended: errors.ShoalError | None = None
        # Events at or below this revision were already seen by the client.
        self.after = 0

    def _matches(self, obj: CachedObject) -> bool:
        if self.namespace and obj.namespace != self.namespace:
            return False
        return self.labels.matches(obj.labels) and self.fields.matches(obj.fields)

    def offer(self, ev: CacheEvent) -> None:
        if self.ended is not None or ev.revision <= self.after:
            return
        if ev.type == ADDED:
            kind = ADDED if self._matches(ev.obj) else 0
            use_prev = False
        elif ev.type == DELETED:
            kind = DELETED if self._matches(ev.obj) else 0
            use_prev = False
        else:
            now = self._matches(ev.obj)
            before = ev.prev is not None and self._matches(ev.prev)
            if now and before:
                kind, use_prev = MODIFIED, False
            elif now:
                kind, use_prev = ADDED, False
            elif before:
                kind, use_prev = DELETED, True
            else:
                kind, use_prev = 0, False
        if not kind:
            return
        data = self.kind_cache.encode(ev, kind, use_prev)
        self.push(data)

    def push(self, data: bytes) -> None:
        if len(self.pending) >= self.max_queue:
            self.end(errors.Unavailable(
                "watch ended: the client reads too slowly; resume from the last "
                "resourceVersion seen", retry_after=0.1))
            return
        self.pending.append(data)
        self.wake.set()

    def end(self, error: errors.ShoalError) -> None:
        if self.ended is None:
            self.ended = error
            self.pending.clear()
            self.wake.set()

    async def next_batch(self) -> list[bytes]:
        """Wait for encoded events; raises the error that ended the watch."""
        while not self.pending:
            if self.ended is not None:
                raise self.ended
            self.wake.clear()
            await self.wake.wait()
        if self.ended is not None:
            raise self.ended
        out = list(self.pending)
        self.pending.clear()
        return out


class KindCache:
    """Objects, recent history and watchers of one kind."""

    def __init__(self, kind: Kind, *, history: int) -> None:
        self.kind = kind
        self.objects: dict[str, CachedObject] = {}
        self.by_namespace: dict[str, dict[str, CachedObject]] = {}
        self.history: deque[CacheEvent] = deque()
        self.history_limit = history
        # Every event with revision > window_start is in self.history.
        self.window_start = 0
        self.watchers: set[Watcher] = set()
        # In-process observers of every applied event (e.g. namespace finalization).
        self.listeners: list[Callable[[CacheEvent], None]] = []
        self._suffixes: dict[int, bytes] = {}
        self._getters = kind.fields

    # -- decoding and encoding --------------------------------------------

    def make(self, key: str, raw: bytes, revision: int) -> CachedObject:
        msg: Any = self.kind.new()
        msg.ParseFromString(raw)
        meta = msg.metadata
        fields = {path: get(msg) for path, get in self._getters.items()}
        return CachedObject(
            key=key, namespace=meta.namespace, name=meta.name, revision=revision,
            raw=raw, labels=dict(meta.labels), fields=fields,
        )

    def rv_suffix(self, revision: int) -> bytes:
        """Serialized {metadata: {resourceVersion: revision}}; appended to stored
        bytes it sets the version without decoding (protobuf merge semantics)."""
        suffix = self._suffixes.get(revision)
        if suffix is None:
            msg: Any = self.kind.new()
            msg.metadata.resource_version = str(revision)
            suffix = msg.SerializeToString()
            if len(self._suffixes) > 4096:
                self._suffixes.clear()
            self._suffixes[revision] = suffix
        return suffix

    def wire(self, obj: CachedObject, revision: int | None = None) -> bytes:
        return obj.raw + self.rv_suffix(obj.revision if revision is None else revision)

    def to_any(self, obj: CachedObject) -> any_pb2.Any:
        return any_pb2.Any(type_url=self.kind.type_url, value=self.wire(obj))

    def encode(self, ev: CacheEvent, event_type: int, use_prev: bool) -> bytes:
        cache_key = (event_type, use_prev)
        data = ev._encoded.get(cache_key)
        if data is None:
            src = ev.prev if use_prev and ev.prev is not None else ev.obj
            data = self.event_bytes(event_type, src, object_revision=ev.revision,
                                    stream_revision=ev.revision)
            ev._encoded[cache_key] = data
        return data

    def event_bytes(self, event_type: int, obj: CachedObject, *, object_revision: int,
                    stream_revision: int) -> bytes:
        return bytes(resources_pb2.WatchEvent(
            type=event_type,  # type: ignore[arg-type]
            object=any_pb2.Any(type_url=self.kind.type_url,
                               value=self.wire(obj, object_revision)),
            resource_version=str(stream_revision),
        ).SerializeToString())

    # -- state -------------------------------------------------------------

    def reset(self, objects: Iterable[CachedObject], revision: int) -> None:
        self.objects = {o.key: o for o in objects}
        self.by_namespace = {}
        for o in self.objects.values():
            self.by_namespace.setdefault(o.namespace, {})[o.key] = o
        self.history.clear()
        self.window_start = revision

    def apply(self, ev: CacheEvent) -> None:
        o = ev.obj
        if ev.type == DELETED:
            self.objects.pop(o.key, None)
            ns = self.by_namespace.get(o.namespace)
            if ns is not None:
                ns.pop(o.key, None)
                if not ns:
                    del self.by_namespace[o.namespace]
        else:
            self.objects[o.key] = o
            self.by_namespace.setdefault(o.namespace, {})[o.key] = o
        self.history.append(ev)
        while len(self.history) > self.history_limit:
            dropped = self.history.popleft()
            self.window_start = dropped.revision
        for w in list(self.watchers):
            w.offer(ev)
        for listener in self.listeners:
            try:
                listener(ev)
            except Exception:
                log.exception("watch cache listener failed")

    def select(self, namespace: str, labels: LabelSelector,
               fields: FieldSelector) -> list[CachedObject]:
        pool = (self.by_namespace.get(namespace, {}) if namespace and self.kind.namespaced
                else self.objects)
        out = [o for o in pool.values()
               if labels.matches(o.labels) and fields.matches(o.fields)]
        out.sort(key=lambda o: o.key)
        return out


class WatchCache:
    """All kinds' caches behind one storage watch. See the module docstring."""

    def __init__(
        self,
        *,
        store: Store,
        kinds: KindTable,
        history_events: int = 10_000,
        history_revisions: int = 20_000,
        max_watcher_queue: int = 20_000,
        page_size: int = 2_000,
        on_watchers_changed: Callable[[str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.kinds = kinds
        self.history_revisions = history_revisions
        self.max_watcher_queue = max_watcher_queue
        self.page_size = page_size
        self.caches = {k.qualified_resource: KindCache(k, history=history_events) for k in kinds}
        self.revision = 0
        self.ready = asyncio.Event()
        self._fresh_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._watch: StoreWatch | None = None
        self._progress_asked = 0.0
        self._on_watchers_changed = on_watchers_changed
        self._ready_at = 0

    def cache_for(self, kind: Kind) -> KindCache:
        return self.caches[kind.qualified_resource]

    # -- the storage side --------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        need_init = True
        while True:
            try:
                if need_init:
                    await self._initialize()
                    need_init = False
                self._watch = self.store.watch(REGISTRY_PREFIX, from_revision=self.revision + 1)
                async for batch in self._watch:
                    self._apply_batch(batch)
                    backoff.reset()
            except errors.Expired as e:
                log.warning("watch cache: history compacted under us (%s); relisting", e)
                need_init = True
                self._end_all_watchers(errors.Expired(
                    "the watch cache was rebuilt; relist and watch again"))
            except errors.Unavailable as e:
                delay = backoff.next()
                log.warning("watch cache: storage unavailable (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
            finally:
                if self._watch is not None:
                    watch, self._watch = self._watch, None
                    with contextlib.suppress(Exception):
                        await watch.close()

    async def _initialize(self) -> None:
        self.ready.clear()
        latest = await self.store.current_revision()
        compacted = await self.store.compacted_revision()
        start = max(latest - self.history_revisions, compacted, 1)
        if latest < 1 or start >= latest:
            kvs, revision = await self._list_all(0)
        else:
            try:
                kvs, revision = await self._list_all(start)
            except errors.Expired:
                kvs, revision = await self._list_all(0)
        grouped: dict[str, list[CachedObject]] = {name: [] for name in self.caches}
        for key, raw, rev in kvs:
            kc = self._cache_for_key(key)
            if kc is not None:
                grouped[kc.kind.qualified_resource].append(kc.make(key, raw, rev))
        for name, kc in self.caches.items():
            kc.reset(grouped[name], revision)
        self.revision = revision
        gc.collect()
        gc.freeze()  # the listed objects live long: keep them out of young-GC scans
        log.info("watch cache: listed %d objects at revision %d (latest %d)",
                 len(kvs), revision, latest)
        # Ready once the replay has reached a write made now: the watch is sure
        # to deliver it, whatever else (outside /registry/) storage holds.
        self._ready_at = await self._sync_marker()
        if revision >= self._ready_at:
            self.ready.set()

    async def _sync_marker(self) -> int:
        """Write the apiserver's sync key; its revision is where the cache is current."""
        data = str(time.time()).encode()
        for _ in range(5):
            kv = await self.store.get(SYNC_KEY)
            try:
                if kv is None:
                    return await self.store.create(SYNC_KEY, data)
                return await self.store.update(SYNC_KEY, data,
                                               expected_revision=kv.mod_revision)
            except (errors.AlreadyExists, errors.Conflict, errors.NotFound):
                continue
        return await self.store.current_revision()

    async def _list_all(self, revision: int) -> tuple[list[tuple[str, bytes, int]], int]:
        out: list[tuple[str, bytes, int]] = []
        start = ""
        at = revision
        while True:
            res = await self.store.range(REGISTRY_PREFIX, start=start, limit=self.page_size,
                                         revision=at)
            at = res.revision
            out.extend((kv.key, kv.value, kv.mod_revision) for kv in res.kvs)
            if not res.more or not res.kvs:
                return out, at
            start = res.kvs[-1].key + "\x00"

    def _cache_for_key(self, key: str) -> KindCache | None:
        if not key.startswith(REGISTRY_PREFIX):
            return None
        resource = key[len(REGISTRY_PREFIX):].split("/", 1)[0]
        return self.caches.get(resource)

    def _apply_batch(self, batch: WatchBatch) -> None:
        for sev in batch.events:
            kc = self._cache_for_key(sev.key)
            if kc is None:
                continue
            if sev.type is EventType.DELETE:
                prev = kc.objects.get(sev.key)
                if prev is None and sev.prev_value is not None:
                    prev = kc.make(sev.key, sev.prev_value, sev.revision)
                if prev is None:
                    continue
                gone = CachedObject(prev.key, prev.namespace, prev.name, sev.revision,
                                    prev.raw, prev.labels, prev.fields)
                kc.apply(CacheEvent(DELETED, gone, prev, sev.revision))
            else:
                obj = kc.make(sev.key, sev.value, sev.revision)
                prev = kc.objects.get(sev.key)
                kind = ADDED if prev is None else MODIFIED
                kc.apply(CacheEvent(kind, obj, prev, sev.revision))
        self.revision = max(self.revision, batch.revision)
        if not self.ready.is_set() and self.revision >= self._ready_at:
            self.ready.set()
        if self._fresh_waiters:
            still = []
            for rev, fut in self._fresh_waiters:
                if rev <= self.revision:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((rev, fut))
            self._fresh_waiters = still

    def _end_all_watchers(self, error: errors.ShoalError) -> None:
        for kc in self.caches.values():
            for w in list(kc.watchers):
                w.end(error)

    # -- the client side ---------------------------------------------------

    async def wait_ready(self, timeout: float) -> None:
        if self.ready.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            raise errors.Unavailable("the apiserver's cache is still starting",
                                     retry_after=1.0) from None

    async def wait_fresh(self, revision: int, *, timeout: float = 3.0) -> bool:
        """Wait until every event up to ``revision`` is applied. False on timeout."""
        if self.revision >= revision:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fresh_waiters.append((revision, fut))
        deadline = time.monotonic() + timeout
        try:
            while not fut.done():
                await self._ask_progress()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=min(left, 0.25))
                except TimeoutError:
                    continue
            return True
        finally:
            if not fut.done():
                fut.cancel()
            self._fresh_waiters = [(r, f) for r, f in self._fresh_waiters if f is not fut]

    async def _ask_progress(self) -> None:
        now = time.monotonic()
        if self._watch is None or now - self._progress_asked < 0.05:
            return
        self._progress_asked = now
        with contextlib.suppress(errors.ShoalError):
            await self._watch.request_progress()

    async def caught_up(self, *, timeout: float = 1.0) -> bool:
        """True once the cache holds every write storage had when this was called;
        False if that takes longer than ``timeout`` (read storage instead then)."""
        latest = await self.store.current_revision()
        return await self.wait_fresh(latest, timeout=timeout)

    def list(self, kind: Kind, *, namespace: str, labels: LabelSelector,
             fields: FieldSelector) -> tuple[list[any_pb2.Any], int]:
        kc = self.cache_for(kind)
        return [kc.to_any(o) for o in kc.select(namespace, labels, fields)], self.revision

    def watch(
        self,
        kind: Kind,
        *,
        namespace: str,
        labels: LabelSelector,
        fields: FieldSelector,
        resource_version: int | None,
        bookmarks: bool,
    ) -> Watcher:
        """Register a watcher. ``resource_version`` None sends the current state
        as ADDED events first. Raises Expired when the version is older than the
        kept history."""
        kc = self.cache_for(kind)
        w = Watcher(kind_cache=kc, namespace=namespace, labels=labels, fields=fields,
                    bookmarks=bookmarks, max_queue=self.max_watcher_queue)
        if resource_version is None:
            # The current state as ADDED events. Each carries the cache's revision
            # as the stream position, so resuming from any of them is exact.
            for o in kc.select(namespace, labels, fields):
                w.push(kc.event_bytes(ADDED, o, object_revision=o.revision,
                                      stream_revision=self.revision))
            w.after = self.revision
            if bookmarks:
                w.push(self.bookmark(kc))
        else:
            if resource_version < kc.window_start:
                raise errors.Expired(
                    f"too old resource version: {resource_version} (oldest kept: "
                    f"{kc.window_start + 1})", kind=kind.kind)
            # A version ahead of this cache (seen through another apiserver) replays
            # nothing, and the events up to it are skipped when they arrive here.
            w.after = resource_version
            for ev in kc.history:
                if ev.revision > resource_version:
                    w.offer(ev)
        kc.watchers.add(w)
        if self._on_watchers_changed:
            self._on_watchers_changed(kind.qualified_resource, len(kc.watchers))
        return w

    def unwatch(self, w: Watcher) -> None:
        kc = w.kind_cache
        kc.watchers.discard(w)
        if self._on_watchers_changed:
            self._on_watchers_changed(kc.kind.qualified_resource, len(kc.watchers))

    def bookmark(self, kc: KindCache) -> bytes:
        msg: Any = resources_pb2.WatchEvent(type=BOOKMARK,
                                            resource_version=str(self.revision))
        return bytes(msg.SerializeToString())

    def send_bookmarks(self) -> None:
        """Give every bookmark-asking watcher the revision it is current to."""
        for kc in self.caches.values():
            if not kc.watchers:
                continue
            data = self.bookmark(kc)
            for w in kc.watchers:
                if w.bookmarks and w.ended is None and w.after <= self.revision:
                    w.push(data)

    def watcher_count(self) -> int:
        return sum(len(kc.watchers) for kc in self.caches.values())
