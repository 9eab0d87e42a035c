"""A Store wrapper that times every storage operation into the apiserver's metrics."""

from __future__ import annotations

from apiserver.metrics import Metrics
from apiserver.storage import KeyValue, RangeResult, Store, StoreWatch


class InstrumentedStore:
    """Delegates to ``inner``; records latency and errors per operation."""

    def __init__(self, inner: Store, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.name = inner.name

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def current_revision(self) -> int:
        async with self.metrics.storage_op("current_revision"):
            return await self.inner.current_revision()

    async def get(self, key: str) -> KeyValue | None:
        async with self.metrics.storage_op("get"):
            return await self.inner.get(key)

    async def range(
        self, prefix: str, *, start: str = "", limit: int = 0, revision: int = 0
    ) -> RangeResult:
        async with self.metrics.storage_op("range"):
            return await self.inner.range(prefix, start=start, limit=limit, revision=revision)

    async def create(self, key: str, value: bytes) -> int:
        async with self.metrics.storage_op("create"):
            return await self.inner.create(key, value)

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> int:
        async with self.metrics.storage_op("update"):
            return await self.inner.update(key, value, expected_revision=expected_revision)

    async def delete(self, key: str, *, expected_revision: int) -> int:
        async with self.metrics.storage_op("delete"):
            return await self.inner.delete(key, expected_revision=expected_revision)

    def watch(self, prefix: str, *, from_revision: int) -> StoreWatch:
        return self.inner.watch(prefix, from_revision=from_revision)

    async def compact(self, revision: int) -> None:
        async with self.metrics.storage_op("compact"):
            await self.inner.compact(revision)

    async def compacted_revision(self) -> int:
        return await self.inner.compacted_revision()
