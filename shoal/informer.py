"""Informer: list + watch + a local indexed cache + event handlers.

Every controller and agent in Shoal reads the cluster through one of these, as
client-go's shared informers are used in Kubernetes::

    informer = Informer(client, Pod, field_selector=f"spec.nodeName={node}")
    informer.add_handlers(on_add=queue.add_obj, on_update=..., on_delete=...)
    tg.create_task(informer.run())
    await informer.synced.wait()
    pod = informer.get("default", "web-0")

Lifecycle (the reflector loop inside ``run()``)::

    LIST (paged, one revision) -> replace cache, diff -> handlers   [synced set]
      -> WATCH from the list's revision -> apply each event -> handlers
           transport failure: the SDK watch resumes from the last version
           Expired (history gone): LIST again; the diff turns what changed
                                   meanwhile into add/update/delete calls
           other error: back-off, LIST again

Contract:
- Handlers run on the event loop, in order, and must not block: they should
  only enqueue keys (see ``shoal.queueing``).
- An object is handed to ``on_update`` only when its resourceVersion changed,
  or on a periodic resync (old is new then).
- ``on_delete`` gets the last state the informer knew.
- Cached objects are shared: treat them as read-only, copy before changing.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from shoal import errors
from shoal.backoff import Backoff
from shoal.client import AsyncClient

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Message)
AddHandler = Callable[[T], None]
UpdateHandler = Callable[[T, T], None]
DeleteHandler = Callable[[T], None]
IndexFunc = Callable[[T], Iterable[str]]

NAMESPACE_INDEX = "namespace"


def key_of(obj: Any) -> str:
    """``namespace/name`` (or ``name`` for cluster-scoped objects)."""
    meta = obj.metadata
    return f"{meta.namespace}/{meta.name}" if meta.namespace else str(meta.name)


class Informer(Generic[T]):
    def __init__(
        self,
        client: AsyncClient,
        kind: type[T],
        *,
        namespace: str = "",
        label_selector: str = "",
        field_selector: str = "",
        resync_period: float = 0.0,
        indexers: dict[str, IndexFunc[T]] | None = None,
        page_size: int = 500,
    ) -> None:
        self.client = client
        self.kind = kind
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.resync_period = resync_period
        self.page_size = page_size
        self.synced = asyncio.Event()
        self.resource_version = ""
        self._items: dict[str, T] = {}
        self._indexers: dict[str, IndexFunc[T]] = {
            NAMESPACE_INDEX: lambda o: [o.metadata.namespace],  # type: ignore[attr-defined]
            **(indexers or {}),
        }
        self._indices: dict[str, dict[str, set[str]]] = {n: {} for n in self._indexers}
        self._on_add: list[AddHandler[T]] = []
        self._on_update: list[UpdateHandler[T]] = []
        self._on_delete: list[DeleteHandler[T]] = []

    # -- handlers -----------------------------------------------------------

    def add_handlers(
        self,
        *,
        on_add: AddHandler[T] | None = None,
        on_update: UpdateHandler[T] | None = None,
        on_delete: DeleteHandler[T] | None = None,
    ) -> None:
        """Register handlers. Added after sync, ``on_add`` is replayed for the cache."""
        if on_add:
            self._on_add.append(on_add)
            for obj in builtins.list(self._items.values()):
                self._call(on_add, obj)
        if on_update:
            self._on_update.append(on_update)
        if on_delete:
            self._on_delete.append(on_delete)

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("informer handler %r failed", fn)

    # -- cache reads --------------------------------------------------------

    def get(self, namespace: str, name: str) -> T | None:
        return self._items.get(f"{namespace}/{name}" if namespace else name)

    def get_by_key(self, key: str) -> T | None:
        return self._items.get(key)

    def list(self) -> builtins.list[T]:
        return builtins.list(self._items.values())

    def keys(self) -> builtins.list[str]:
        return builtins.list(self._items)

    def by_index(self, index: str, value: str) -> builtins.list[T]:
        keys = self._indices[index].get(value, set())
        return [self._items[k] for k in sorted(keys) if k in self._items]

    def __len__(self) -> int:
        return len(self._items)

    # -- cache writes -------------------------------------------------------

    def _index(self, key: str, obj: T | None, old: T | None) -> None:
        for name, fn in self._indexers.items():
            table = self._indices[name]
            if old is not None:
                for v in fn(old):
                    members = table.get(v)
                    if members is not None:
                        members.discard(key)
                        if not members:
                            del table[v]
            if obj is not None:
                for v in fn(obj):
                    table.setdefault(v, set()).add(key)

    def _upsert(self, obj: T) -> None:
        key = key_of(obj)
        old = self._items.get(key)
        if old is not None and _rv(old) == _rv(obj):
            return
        self._items[key] = obj
        self._index(key, obj, old)
        if old is None:
            for add in self._on_add:
                self._call(add, obj)
        else:
            for update in self._on_update:
                self._call(update, old, obj)

    def _remove(self, obj: T) -> None:
        key = key_of(obj)
        old = self._items.pop(key, None)
        if old is None:
            return
        self._index(key, None, old)
        for fn in self._on_delete:
            self._call(fn, obj)

    def _replace(self, items: builtins.list[T]) -> None:
        fresh = {key_of(o): o for o in items}
        for key in [k for k in self._items if k not in fresh]:
            self._remove(self._items[key])
        for obj in items:
            self._upsert(obj)

    # -- the reflector ------------------------------------------------------

    async def run(self) -> None:
        """List and watch until cancelled. Never returns on its own."""
        backoff = Backoff(base=0.2, cap=10.0)
        resync = (asyncio.create_task(self._resync_loop(), name="informer-resync")
                  if self.resync_period > 0 else None)
        try:
            while True:
                try:
                    await self._list_and_watch(backoff)
                except errors.Expired:
                    log.info("informer %s: resourceVersion %s expired; relisting",
                             self.kind.DESCRIPTOR.name, self.resource_version)
                except errors.ShoalError as e:
                    delay = backoff.next()
                    log.warning("informer %s: %s; relisting in %.1fs",
                                self.kind.DESCRIPTOR.name, e, delay)
                    await asyncio.sleep(delay)
        finally:
            if resync is not None:
                resync.cancel()

    async def _list_and_watch(self, backoff: Backoff) -> None:
        scope: dict[str, Any] = (
            {"namespace": self.namespace} if self.namespace else {"all_namespaces": True})
        listed = await self.client.list_all(
            self.kind, label_selector=self.label_selector, field_selector=self.field_selector,
            page_size=self.page_size, **scope)
        self._replace(listed.items)
        self.resource_version = listed.resource_version
        self.synced.set()
        backoff.reset()
        async for ev in self.client.watch(
            self.kind, label_selector=self.label_selector, field_selector=self.field_selector,
            resource_version=self.resource_version, bookmarks=True, **scope,
        ):
            self.resource_version = ev.resource_version or self.resource_version
            if ev.object is None:
                continue
            if ev.type == "DELETED":
                self._remove(ev.object)
            else:
                self._upsert(ev.object)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for obj in builtins.list(self._items.values()):
                for fn in self._on_update:
                    self._call(fn, obj, obj)


def _rv(obj: Any) -> str:
    return str(obj.metadata.resource_version)
