"""A Store wrapper that encrypts configured resources on the way in and decrypts
them on the way out (Kubernetes' storage transformers).

Only values are transformed; keys, revisions and every other semantic of the
inner store are unchanged. Reads (get, range, watch events and their previous
values) come back as plaintext, so the watch cache, lists and watches see what
they always saw. A value read through an old key is returned with
``KeyValue.stale`` set, so an update of the object writes it again even when
nothing in it changed (see ``apiserver.encryption`` for rotation).

A value that cannot be decrypted (key removed from the config, tampered) is an
``InternalError`` naming the storage key; nothing is guessed. A live watch
event carrying one is logged and left out (the watch cache keeps the last
readable state, every direct read refuses it): one bad value must not stop
the apiserver. History is the
exception: a read pinned at a past revision, or a watch event from before this
server started, may hold values under a key since retired (after a rotation
dropped it). Those are ``Expired``, as if compacted, and from then on
``compacted_revision()`` reports the newest such revision seen, so the watch
cache lists the current revision instead of replaying them again, and a paged
list starts again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from apiserver.encryption import DecryptError, EncryptionConfig
from apiserver.storage import KeyValue, RangeResult, StorageEvent, Store, StoreWatch, WatchBatch
from shoal import errors

log = logging.getLogger(__name__)


class EncryptingStore:
    def __init__(self, inner: Store, config: EncryptionConfig) -> None:
        self.inner = inner
        self.config = config
        self.name = inner.name
        # The storage revision when this server started; older watch events are history.
        self._started_at = 0
        # The newest revision whose history could not be decrypted: treated as compacted.
        self._unreadable_until = 0

    # -- transforms ------------------------------------------------------------

    def _encrypt(self, key: str, value: bytes) -> bytes:
        t = self.config.transformer_for(key)
        return value if t is None else t.to_storage(value, key=key)

    def _decrypt(self, key: str, value: bytes, *, history: int = 0) -> tuple[bytes, bool]:
        """``history``: the past revision being read (0: a current read)."""
        t = self.config.transformer_for(key)
        if t is None:
            return value, False
        try:
            read = t.from_storage(value, key=key)
        except DecryptError as e:
            if history:
                self._unreadable_until = max(self._unreadable_until, history)
                raise errors.Expired(f"history of {key} is under an encryption key this "
                                     f"server no longer has ({e}); read the current "
                                     "revision") from None
            raise errors.InternalError(f"cannot decrypt {key}: {e}") from None
        return read.plaintext, read.stale

    def _kv(self, kv: KeyValue, *, history: int = 0) -> KeyValue:
        value, stale = self._decrypt(kv.key, kv.value, history=history)
        return KeyValue(key=kv.key, value=value, create_revision=kv.create_revision,
                        mod_revision=kv.mod_revision, stale=stale)

    def _event(self, ev: StorageEvent) -> StorageEvent | None:
        if self.config.transformer_for(ev.key) is None:
            return ev
        history = ev.revision if ev.revision <= self._started_at else 0
        try:
            value = (self._decrypt(ev.key, ev.value, history=history)[0] if ev.value
                     else ev.value)
        except errors.InternalError as e:
            log.error("watch: left out the event at revision %d: %s", ev.revision, e)
            return None
        try:
            prev = (self._decrypt(ev.key, ev.prev_value, history=history)[0]
                    if ev.prev_value else ev.prev_value)
        except errors.InternalError:
            prev = None
        return StorageEvent(type=ev.type, key=ev.key, value=value, prev_value=prev,
                            revision=ev.revision, create_revision=ev.create_revision)

    # -- Store -------------------------------------------------------------------

    async def start(self) -> None:
        await self.inner.start()
        self._started_at = await self.inner.current_revision()

    async def close(self) -> None:
        await self.inner.close()

    async def current_revision(self) -> int:
        return await self.inner.current_revision()

    async def get(self, key: str) -> KeyValue | None:
        kv = await self.inner.get(key)
        return None if kv is None else self._kv(kv)

    async def range(
        self, prefix: str, *, start: str = "", limit: int = 0, revision: int = 0
    ) -> RangeResult:
        res = await self.inner.range(prefix, start=start, limit=limit, revision=revision)
        if 0 < revision <= self._unreadable_until:
            raise errors.Expired(f"revision {revision} holds values under a retired "
                                 "encryption key; read the current revision")
        return RangeResult(kvs=tuple(self._kv(kv, history=res.revision if revision else 0)
                                     for kv in res.kvs),
                           revision=res.revision,
                           more=res.more, count=res.count)

    async def create(self, key: str, value: bytes) -> int:
        return await self.inner.create(key, self._encrypt(key, value))

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> int:
        return await self.inner.update(key, self._encrypt(key, value),
                                       expected_revision=expected_revision)

    async def delete(self, key: str, *, expected_revision: int) -> int:
        return await self.inner.delete(key, expected_revision=expected_revision)

    def watch(self, prefix: str, *, from_revision: int) -> StoreWatch:
        return _DecryptingWatch(self, self.inner.watch(prefix, from_revision=from_revision))

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def compacted_revision(self) -> int:
        return max(await self.inner.compacted_revision(), self._unreadable_until)


class _DecryptingWatch:
    def __init__(self, store: EncryptingStore, inner: StoreWatch) -> None:
        self._store = store
        self._inner = inner

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WatchBatch]:
        async for batch in self._inner:
            if batch.events:
                events = (self._store._event(e) for e in batch.events)
                batch = WatchBatch(revision=batch.revision,
                                   events=tuple(e for e in events if e is not None))
            yield batch

    async def request_progress(self) -> None:
        await self._inner.request_progress()

    async def close(self) -> None:
        await self._inner.close()
