"""Conformance suite for ``apiserver.storage.Store``: one set of tests, every backend.

Each test gets a fresh, started store and a key prefix of its own:

- ``sqlite-memory``: ``SqliteStore(":memory:")``;
- ``sqlite-file``: ``SqliteStore`` on a file in the test's tmp dir (WAL mode);
- ``etcd``: ``EtcdStore`` against one real etcd per test session (``EtcdServer``),
  marked ``etcd`` and skipped when no ``etcd`` binary is on PATH. Tests share that
  etcd (tests/conftest.py's ``etcd`` when present), so they stay inside their own
  ``/registry/tN/`` prefix and never assume that revisions start at 1.

Every wait is bounded by ``asyncio.timeout`` so a broken backend fails, not hangs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apiserver.storage import EventType, Store, StoreWatch, WatchBatch
from apiserver.storage.etcd import EtcdStore
from apiserver.storage.sqlite import SqliteStore
from shoal.errors import AlreadyExists, Conflict, Expired, NotFound, Unavailable
from shoal.testing.etcd import EtcdServer, etcd_binary

# Generous for slow CI machines; a healthy run finishes each test in well under a second.
TIMEOUT = 15.0

BACKENDS = [
    pytest.param("sqlite-memory", id="sqlite-memory"),
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param(
        "etcd",
        id="etcd",
        marks=[
            pytest.mark.etcd,
            pytest.mark.skipif(
                etcd_binary() is None,
                reason="no etcd binary on PATH (Debian package etcd-server)",
            ),
        ],
    ),
]

_test_numbers = itertools.count()


@dataclass
class Subject:
    store: Store
    prefix: str

    def key(self, name: str) -> str:
        return self.prefix + name


@pytest.fixture(scope="session")
def etcd_server(request: pytest.FixtureRequest) -> Iterator[EtcdServer]:
    """The session's shared etcd (``etcd`` in tests/conftest.py), or one of our own."""
    try:
        shared: EtcdServer | None = request.getfixturevalue("etcd")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    backend: str = request.param
    if backend == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        return lambda: EtcdStore([server.endpoint], dial_timeout=5.0, request_timeout=5.0)
    if backend == "sqlite-file":
        return lambda: SqliteStore(str(tmp_path / "store.db"))
    return lambda: SqliteStore(":memory:")


@pytest.fixture
async def subject(new_store: Callable[[], Store]) -> AsyncIterator[Subject]:
    store = new_store()
    async with asyncio.timeout(TIMEOUT):
        await store.start()
    try:
        yield Subject(store=store, prefix=f"/registry/t{next(_test_numbers)}/")
    finally:
        async with asyncio.timeout(TIMEOUT):
            await store.close()


async def next_batch(it: AsyncIterator[WatchBatch]) -> WatchBatch:
    return await anext(it)


async def event_batches(it: AsyncIterator[WatchBatch], n: int) -> list[WatchBatch]:
    """The next ``n`` batches that carry events (progress notices are skipped)."""
    batches: list[WatchBatch] = []
    while len(batches) < n:
        batch = await anext(it)
        if batch.events:
            batches.append(batch)
    return batches


async def progress_after(watch: StoreWatch, it: AsyncIterator[WatchBatch]) -> WatchBatch:
    """Request progress and return the next batch, which must be the (empty) notice."""
    await watch.request_progress()
    batch = await anext(it)
    assert batch.events == (), f"expected a progress notice, got {batch}"
    return batch


# Create, get, update, delete.


async def test_create_then_get_and_already_exists(subject: Subject) -> None:
    store, key = subject.store, subject.key("a")
    async with asyncio.timeout(TIMEOUT):
        rev = await store.create(key, b"v1")
        kv = await store.get(key)
        assert kv is not None
        assert (kv.key, kv.value, kv.create_revision, kv.mod_revision) == (key, b"v1", rev, rev)
        with pytest.raises(AlreadyExists):
            await store.create(key, b"v2")
        assert (await store.get(key)) == kv
        assert await store.get(subject.key("missing")) is None


async def test_update_is_compare_and_swap(subject: Subject) -> None:
    store, key = subject.store, subject.key("a")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(key, b"v1")
        r2 = await store.update(key, b"v2", expected_revision=r1)
        assert r2 > r1
        kv = await store.get(key)
        assert kv is not None
        assert (kv.value, kv.create_revision, kv.mod_revision) == (b"v2", r1, r2)
        with pytest.raises(Conflict):
            await store.update(key, b"stale", expected_revision=r1)
        with pytest.raises(NotFound):
            await store.update(subject.key("missing"), b"x", expected_revision=r1)
        assert (await store.get(key)) == kv


async def test_delete_conditional_unconditional_and_not_found(subject: Subject) -> None:
    store = subject.store
    a, b = subject.key("a"), subject.key("b")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(a, b"v1")
        r2 = await store.update(a, b"v2", expected_revision=r1)
        with pytest.raises(Conflict):
            await store.delete(a, expected_revision=r1)
        r3 = await store.delete(a, expected_revision=r2)
        assert r3 > r2
        assert await store.get(a) is None
        with pytest.raises(NotFound):
            await store.delete(a, expected_revision=r2)
        with pytest.raises(NotFound):
            await store.delete(a, expected_revision=0)

        await store.create(b, b"x")
        r5 = await store.delete(b, expected_revision=0)
        assert await store.get(b) is None
        assert await store.current_revision() == r5

        # A re-created key starts a new life.
        r6 = await store.create(a, b"again")
        kv = await store.get(a)
        assert kv is not None
        assert (kv.create_revision, kv.mod_revision) == (r6, r6)


async def test_revisions_strictly_increase_one_per_write(subject: Subject) -> None:
    store = subject.store
    a, b = subject.key("a"), subject.key("b")
    async with asyncio.timeout(TIMEOUT):
        before = await store.current_revision()
        revs = [await store.create(a, b"1")]
        revs.append(await store.create(b, b"1"))
        revs.append(await store.update(a, b"2", expected_revision=revs[0]))
        revs.append(await store.delete(b, expected_revision=revs[1]))
        revs.append(await store.delete(a, expected_revision=0))
        assert revs == list(range(before + 1, before + 6))
        # Failed writes create no revision.
        with pytest.raises(NotFound):
            await store.update(a, b"3", expected_revision=revs[2])
        assert await store.current_revision() == revs[-1]


# Range.


async def test_range_by_prefix_sorted_with_start_limit_more_count(subject: Subject) -> None:
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        for name in ["d", "b", "e", "a", "c"]:
            await store.create(subject.key(name), name.encode())
        # Siblings outside the prefix must not show up.
        await store.create(subject.prefix.rstrip("/") + "x", b"outside")
        await store.create(subject.prefix.rstrip("/"), b"outside")
        current = await store.current_revision()

        everything = await store.range(subject.prefix)
        assert [kv.key for kv in everything.kvs] == [subject.key(n) for n in "abcde"]
        assert [kv.value for kv in everything.kvs] == [n.encode() for n in "abcde"]
        assert (everything.more, everything.count, everything.revision) == (False, 5, current)

        first = await store.range(subject.prefix, limit=2)
        assert [kv.key for kv in first.kvs] == [subject.key("a"), subject.key("b")]
        assert (first.more, first.count) == (True, 5)

        page = await store.range(subject.prefix, start=subject.key("c"), limit=2)
        assert [kv.key for kv in page.kvs] == [subject.key("c"), subject.key("d")]
        assert (page.more, page.count) == (True, 3)

        rest = await store.range(subject.prefix, start=subject.key("c"))
        assert [kv.key for kv in rest.kvs] == [subject.key(n) for n in "cde"]
        assert (rest.more, rest.count) == (False, 3)

        last = await store.range(subject.prefix, start=subject.key("e"), limit=1)
        assert [kv.key for kv in last.kvs] == [subject.key("e")]
        assert (last.more, last.count) == (False, 1)

        assert (await store.range(subject.key("zzz"))).kvs == ()


async def test_range_at_past_revision(subject: Subject) -> None:
    store = subject.store
    a, b = subject.key("a"), subject.key("b")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(a, b"v1")
        r2 = await store.update(a, b"v2", expected_revision=r1)
        await store.create(b, b"b1")

        at_r1 = await store.range(subject.prefix, revision=r1)
        assert [(kv.key, kv.value, kv.mod_revision) for kv in at_r1.kvs] == [(a, b"v1", r1)]
        assert (at_r1.revision, at_r1.count, at_r1.more) == (r1, 1, False)

        at_r2 = await store.range(subject.prefix, revision=r2)
        assert [(kv.key, kv.value) for kv in at_r2.kvs] == [(a, b"v2")]

        now = await store.range(subject.prefix)
        assert [(kv.key, kv.value) for kv in now.kvs] == [(a, b"v2"), (b, b"b1")]


async def test_range_sees_deleted_key_at_older_revision(subject: Subject) -> None:
    store, key = subject.store, subject.key("a")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(key, b"v1")
        r2 = await store.delete(key, expected_revision=r1)
        old = await store.range(subject.prefix, revision=r1)
        assert [(kv.key, kv.value, kv.mod_revision) for kv in old.kvs] == [(key, b"v1", r1)]
        assert (await store.range(subject.prefix, revision=r2)).kvs == ()
        assert (await store.range(subject.prefix)).kvs == ()


# Watch.


async def test_watch_replays_then_continues_live_without_gap_or_duplicate(
    subject: Subject,
) -> None:
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        revs = [await store.create(subject.key(f"k{i}"), b"x") for i in range(5)]
        watch = store.watch(subject.prefix, from_revision=revs[1])
        it = aiter(watch)
        consumer = asyncio.create_task(event_batches(it, 9))
        # Live writes race with the replay.
        for i in range(5, 10):
            revs.append(await store.create(subject.key(f"k{i}"), b"x"))
            await asyncio.sleep(0)
        batches = await consumer

        events = [e for b in batches for e in b.events]
        assert [e.key for e in events] == [subject.key(f"k{i}") for i in range(1, 10)]
        assert [e.revision for e in events] == revs[1:]
        assert [b.revision for b in batches] == revs[1:]
        # Nothing else is pending: the next batch is the progress notice.
        progress = await progress_after(watch, it)
        assert progress.revision >= revs[-1]
        await watch.close()


async def test_watch_put_and_delete_carry_prev_value(subject: Subject) -> None:
    store, key = subject.store, subject.key("a")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(key, b"v1")
        watch = store.watch(subject.prefix, from_revision=r1 + 1)
        it = aiter(watch)
        r2 = await store.update(key, b"v2", expected_revision=r1)
        r3 = await store.delete(key, expected_revision=r2)
        r4 = await store.create(key, b"v3")
        update, delete, create = (b.events[0] for b in await event_batches(it, 3))

        assert (update.type, update.key, update.value, update.prev_value) == (
            EventType.PUT, key, b"v2", b"v1",
        )  # fmt: skip
        assert (update.revision, update.create_revision, update.is_create) == (r2, r1, False)

        assert (delete.type, delete.key, delete.value, delete.prev_value) == (
            EventType.DELETE, key, b"", b"v2",
        )  # fmt: skip
        assert (delete.revision, delete.is_create) == (r3, False)

        assert (create.type, create.value, create.prev_value) == (EventType.PUT, b"v3", None)
        assert (create.revision, create.create_revision, create.is_create) == (r4, r4, True)
        await watch.close()


async def test_watch_groups_events_per_revision(subject: Subject) -> None:
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        start = await store.current_revision() + 1
        watch = store.watch(subject.prefix, from_revision=start)
        it = aiter(watch)
        revs = [await store.create(subject.key(n), n.encode()) for n in "abc"]
        revs.append(await store.delete(subject.key("b"), expected_revision=revs[1]))
        batches = await event_batches(it, 4)
        assert [b.revision for b in batches] == revs
        for batch in batches:
            assert len(batch.events) == 1
            assert all(e.revision == batch.revision for e in batch.events)
        assert [b.events[0].key for b in batches] == [subject.key(n) for n in "abcb"]
        await watch.close()


async def test_watch_from_zero_sees_every_write_made_after_it_was_opened(
    subject: Subject,
) -> None:
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        before = await store.create(subject.key("before"), b"x")
        watch = store.watch(subject.prefix, from_revision=0)
        after = await store.create(subject.key("after"), b"x")  # before iterating
        batches = await event_batches(aiter(watch), 1)
        assert [(b.revision, b.events[0].key) for b in batches] == [(after, subject.key("after"))]
        assert before < after
        await watch.close()


async def test_request_progress_yields_empty_batch_at_or_after_last_write(
    subject: Subject,
) -> None:
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        # A watch that replayed history and caught up.
        revs = [await store.create(subject.key(f"k{i}"), b"x") for i in range(3)]
        replaying = store.watch(subject.prefix, from_revision=revs[0])
        it = aiter(replaying)
        await event_batches(it, 3)
        assert (await progress_after(replaying, it)).revision >= revs[-1]
        # A live write, then another notice.
        last = await store.create(subject.key("later"), b"x")
        assert [b.revision for b in await event_batches(it, 1)] == [last]
        assert (await progress_after(replaying, it)).revision >= last
        await replaying.close()

        # A watch with nothing to deliver still answers, at the store's revision.
        other_write = await store.create("/registry/elsewhere/" + subject.prefix, b"x")
        quiet = store.watch(subject.prefix, from_revision=other_write + 1)
        quiet_it = aiter(quiet)
        assert (await progress_after(quiet, quiet_it)).revision >= other_write
        await quiet.close()


async def test_progress_notices_never_run_ahead_of_events(subject: Subject) -> None:
    """A notice at revision R promises every event <= R is out: none may follow it."""
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        history = [await store.create(subject.key(f"h{i:03}"), b"x") for i in range(100)]
        watch = store.watch(subject.prefix, from_revision=history[0])
        it = aiter(watch)
        await watch.request_progress()  # before the replay is out
        done = asyncio.Event()

        async def write() -> None:
            for i in range(100):
                await store.create(subject.key(f"l{i:03}"), b"x")
            done.set()

        async def request() -> None:
            while not done.is_set():
                await watch.request_progress()
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(write()), asyncio.create_task(request())]
        promised = 0  # highest progress revision seen so far
        events = 0
        while events < 200:
            batch = await anext(it)
            if batch.events:
                assert batch.revision > promised, f"event {batch.revision} after notice {promised}"
                events += len(batch.events)
            else:
                assert batch.revision >= promised, "a progress notice went backwards"
                promised = batch.revision
        await asyncio.gather(*tasks)
        await watch.close()


async def test_watch_close_stops_iteration(subject: Subject) -> None:
    store = subject.store
    async with asyncio.timeout(TIMEOUT):
        watch = store.watch(subject.prefix, from_revision=await store.current_revision() + 1)
        seen: list[WatchBatch] = []
        first = asyncio.Event()

        async def consume() -> None:
            async for batch in watch:
                seen.append(batch)
                first.set()

        consumer = asyncio.create_task(consume())
        await store.create(subject.key("a"), b"x")
        await first.wait()
        await watch.close()
        await consumer  # ends cleanly, without an error
        assert len(seen) == 1
        await watch.close()  # idempotent
        assert [b async for b in watch] == []


async def test_store_close_ends_watch_with_unavailable(new_store: Callable[[], Store]) -> None:
    store = new_store()
    prefix = f"/registry/t{next(_test_numbers)}/"
    async with asyncio.timeout(TIMEOUT):
        await store.start()
        watch = store.watch(prefix, from_revision=0)
        it = aiter(watch)
        pending = asyncio.create_task(next_batch(it))
        await store.create(prefix + "a", b"x")
        assert (await pending).events[0].key == prefix + "a"
        pending = asyncio.create_task(next_batch(it))
        await asyncio.sleep(0)
        await store.close()
        with pytest.raises(Unavailable):
            await pending
        await store.close()  # idempotent


# Compaction.


async def test_compact_expires_old_revisions_and_keeps_current_data(subject: Subject) -> None:
    store = subject.store
    a, b, c = subject.key("a"), subject.key("b"), subject.key("c")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(a, b"v1")
        r2 = await store.update(a, b"v2", expected_revision=r1)
        r3 = await store.create(b, b"b1")
        r4 = await store.delete(b, expected_revision=r3)
        r5 = await store.create(c, b"c1")

        await store.compact(r3)
        assert await store.compacted_revision() == r3
        with pytest.raises(Expired):
            await store.range(subject.prefix, revision=r1)
        with pytest.raises(Expired):
            await store.range(subject.prefix, revision=r2)
        with pytest.raises(Expired):
            async for _ in store.watch(subject.prefix, from_revision=r1):
                pass

        # The compaction revision itself is still readable and watchable.
        at_r3 = await store.range(subject.prefix, revision=r3)
        assert [(kv.key, kv.value) for kv in at_r3.kvs] == [(a, b"v2"), (b, b"b1")]
        watch = store.watch(subject.prefix, from_revision=r3)
        events = [e for batch in await event_batches(aiter(watch), 3) for e in batch.events]
        assert [(e.type, e.key, e.revision) for e in events] == [
            (EventType.PUT, b, r3),
            (EventType.DELETE, b, r4),
            (EventType.PUT, c, r5),
        ]
        await watch.close()

        now = await store.range(subject.prefix)
        assert [(kv.key, kv.value, kv.mod_revision) for kv in now.kvs] == [
            (a, b"v2", r2),
            (c, b"c1", r5),
        ]
        a_kv = await store.get(a)
        assert a_kv is not None
        assert (a_kv.create_revision, a_kv.mod_revision) == (r1, r2)

        # Compacting again, or to an older revision, is a no-op.
        await store.compact(r3)
        await store.compact(r2)
        assert await store.compacted_revision() == r3
        # Writes go on.
        r6 = await store.update(a, b"v3", expected_revision=r2)
        assert r6 > r5


# Concurrency.


async def test_concurrent_updates_exactly_one_wins(subject: Subject) -> None:
    store, key = subject.store, subject.key("hot")
    async with asyncio.timeout(TIMEOUT):
        r1 = await store.create(key, b"v0")
        results = await asyncio.gather(
            *(store.update(key, f"v{i}".encode(), expected_revision=r1) for i in range(20)),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, int)]
        conflicts = [r for r in results if isinstance(r, Conflict)]
        assert len(wins) == 1, results
        assert len(conflicts) == 19, results
        kv = await store.get(key)
        assert kv is not None
        assert kv.mod_revision == wins[0]


# Backend-specific limits.


async def test_sqlite_slow_watcher_is_ended_not_buffered_without_bound() -> None:
    store = SqliteStore(":memory:", watch_queue_limit=5)
    async with asyncio.timeout(TIMEOUT):
        await store.start()
        try:
            slow = store.watch("/registry/slow/", from_revision=0)
            fast = store.watch("/registry/slow/", from_revision=0)
            fast_it = aiter(fast)
            for i in range(10):
                await store.create(f"/registry/slow/k{i}", b"x")
                assert (await anext(fast_it)).events[0].key == f"/registry/slow/k{i}"
            with pytest.raises(Unavailable, match="watch too slow"):
                async for _ in slow:
                    pass
            # The store and the other watcher carry on.
            await store.create("/registry/slow/after", b"x")
            assert (await anext(fast_it)).events[0].key == "/registry/slow/after"
        finally:
            await store.close()
