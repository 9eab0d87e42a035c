"""SQLite backend for :class:`apiserver.storage.Store`, with etcd's semantics (kine-style).

One table holds one row per revision: ``id`` (the revision), the key, whether the
write created or deleted the key, the key's ``create_revision``, the value, and the
value before the write. A key's state at revision N is its latest row with
``id <= N``; the key is absent at N when that row is a deletion (or there is none).

Contract (on top of the ``Store`` docstring):

- Writes are compare-and-swap inside one ``BEGIN IMMEDIATE`` transaction. Every
  write creates exactly one row, so one revision carries exactly one event.
- All SQLite work runs in one dedicated worker thread (the connection never leaves
  it), so the event loop never blocks and writes are totally ordered.
- After a write commits, the worker hands its event to the event loop with
  ``call_soon_threadsafe``; because there is one worker, live watchers receive
  events in revision order, and before the writer's ``await`` returns.
- ``watch(prefix, from_revision=N)`` registers its live queue at once and remembers
  the store's revision S at that moment. Iterating replays rows ``N <= id <= S``
  from the table, then yields live batches, dropping any with revision <= S: no
  gap, no duplicate. ``from_revision=0`` means "after S".
- Each watcher's live queue is bounded (``watch_queue_limit`` batches). When a
  consumer falls that far behind, its buffered batches are dropped and iteration
  raises ``Unavailable("watch too slow")``; it should re-watch from the last
  revision it saw, plus one.
- ``compact(rev)`` removes rows that no revision >= ``rev`` needs: rows superseded
  by a newer row of the same key with ``id <= rev``, and deletions older than
  ``rev``. Rows at ``rev`` itself are kept, so ``watch(from_revision=rev)`` still
  sees the event at ``rev``. Reads and watches below ``rev`` raise ``Expired``.
- One process owns the file. Revisions are never reused (``AUTOINCREMENT``),
  even when compaction removes the newest row.

Lifecycle::

    new --start()--> open --close()--> closed
                      |                 (watchers end with Unavailable("store closed");
                      |                  every later call raises Unavailable)
                      +-- start() again: no-op;  close() again: no-op
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from apiserver.storage import EventType, KeyValue, RangeResult, StorageEvent, WatchBatch
from shoal.errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Expired,
    InternalError,
    NotFound,
    ShoalError,
    Unavailable,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the revision of this write
    name BLOB NOT NULL,                    -- the key, UTF-8
    created INTEGER NOT NULL,              -- 1: this write created the key
    deleted INTEGER NOT NULL,              -- 1: this write deleted the key
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,        -- id of the key's previous row, 0 if none
    value BLOB NOT NULL,                   -- empty for deletions
    prev_value BLOB                        -- value before this write, NULL if created
);
CREATE INDEX IF NOT EXISTS kv_name_id ON kv (name, id);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_ROW_COLUMNS = "id, name, created, deleted, create_revision, value, prev_value"

# How many rows one replay step reads from the table.
_REPLAY_PAGE = 500


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    name: bytes
    created: bool
    deleted: bool
    create_revision: int
    value: bytes
    prev_value: bytes | None

    def event(self) -> StorageEvent:
        return StorageEvent(
            type=EventType.DELETE if self.deleted else EventType.PUT,
            key=self.name.decode(),
            value=b"" if self.deleted else self.value,
            prev_value=None if self.created else self.prev_value,
            revision=self.id,
            create_revision=self.create_revision,
        )


class _Database:
    """The SQLite connection and every query. Used only from the worker thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: str) -> _Database:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        return cls(conn)

    def close(self) -> None:
        self._conn.close()

    # Reads.

    def revision(self) -> int:
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'kv'").fetchone()
        return int(row[0]) if row else 0

    def compacted(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'compact_rev'").fetchone()
        return int(row[0]) if row else 0

    def _latest(self, name: bytes) -> _Row | None:
        row = self._conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM kv WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        return _to_row(row) if row else None

    def get(self, key: str) -> KeyValue | None:
        row = self._latest(key.encode())
        if row is None or row.deleted:
            return None
        return KeyValue(
            key=key, value=row.value, create_revision=row.create_revision, mod_revision=row.id
        )

    def range(self, prefix: str, *, start: str, limit: int, revision: int) -> RangeResult:
        current = self.revision()
        if revision > current:
            raise BadRequest(f"revision {revision} is in the future (current {current})")
        at = revision or current
        compacted = self.compacted()
        if at < compacted:
            raise Expired(f"revision {at} has been compacted (compacted to {compacted})")
        low = max(prefix.encode(), start.encode())
        high = _prefix_end(prefix.encode())
        bound, args = ("AND name < ?", [high]) if high is not None else ("", [])
        # For each key in [low, high): its latest row with id <= at.
        latest = f"SELECT MAX(id) AS id FROM kv WHERE name >= ? {bound} AND id <= ? GROUP BY name"
        params = [low, *args, at]
        count = self._conn.execute(
            f"SELECT COUNT(*) FROM kv JOIN ({latest}) m ON kv.id = m.id WHERE kv.deleted = 0",
            params,
        ).fetchone()[0]
        query = (
            f"SELECT kv.name, kv.value, kv.create_revision, kv.id FROM kv "
            f"JOIN ({latest}) m ON kv.id = m.id WHERE kv.deleted = 0 ORDER BY kv.name"
        )
        if limit > 0:
            query += " LIMIT ?"
            params.append(limit)
        kvs = tuple(
            KeyValue(key=name.decode(), value=value, create_revision=cr, mod_revision=mod)
            for name, value, cr, mod in self._conn.execute(query, params)
        )
        return RangeResult(kvs=kvs, revision=at, more=len(kvs) < count, count=int(count))

    def history(self, prefix: str, *, first: int, last: int) -> list[StorageEvent]:
        """Events under ``prefix`` with ``first <= revision <= last``, at most one page."""
        compacted = self.compacted()
        if first < compacted:
            raise Expired(f"revision {first} has been compacted (compacted to {compacted})")
        high = _prefix_end(prefix.encode())
        bound, args = ("AND name < ?", [high]) if high is not None else ("", [])
        rows = self._conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM kv WHERE name >= ? {bound} AND id >= ? AND id <= ? "
            f"ORDER BY id LIMIT {_REPLAY_PAGE}",
            [prefix.encode(), *args, first, last],
        ).fetchall()
        return [_to_row(row).event() for row in rows]

    # Writes: each one BEGIN IMMEDIATE ... COMMIT, one new row.

    def _write(
        self, check: Callable[[_Row | None], None], *, key: str, value: bytes | None
    ) -> StorageEvent:
        """Append a row for ``key`` if ``check(latest row)`` passes; None value: a deletion."""
        name = key.encode()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            prev = self._latest(name)
            check(prev)
            live = prev if prev is not None and not prev.deleted else None
            revision = self.revision() + 1
            row = _Row(
                id=revision,
                name=name,
                created=live is None,
                deleted=value is None,
                create_revision=live.create_revision if live else revision,
                value=value if value is not None else b"",
                prev_value=live.value if live else None,
            )
            self._conn.execute(
                "INSERT INTO kv (id, name, created, deleted, create_revision, prev_revision, "
                "value, prev_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.name,
                    int(row.created),
                    int(row.deleted),
                    row.create_revision,
                    prev.id if prev else 0,
                    row.value,
                    row.prev_value,
                ),
            )
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        return row.event()

    def create(self, key: str, value: bytes) -> StorageEvent:
        def absent(prev: _Row | None) -> None:
            if prev is not None and not prev.deleted:
                raise AlreadyExists(f"{key} already exists", name=key)

        return self._write(absent, key=key, value=value)

    def update(self, key: str, value: bytes, *, expected_revision: int) -> StorageEvent:
        return self._write(_expect(key, expected_revision), key=key, value=value)

    def delete(self, key: str, *, expected_revision: int) -> StorageEvent:
        return self._write(_expect(key, expected_revision), key=key, value=None)

    def compact(self, revision: int) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            current = self.revision()
            if revision > current:
                raise BadRequest(
                    f"cannot compact to future revision {revision} (current {current})"
                )
            if revision > self.compacted():
                # Superseded: a newer row of the same key at or before `revision`.
                # Deletions before `revision`: the key is absent there (or re-created).
                self._conn.execute(
                    "DELETE FROM kv WHERE id < :rev AND (deleted = 1 OR id < ("
                    " SELECT MAX(newer.id) FROM kv AS newer"
                    " WHERE newer.name = kv.name AND newer.id <= :rev))",
                    {"rev": revision},
                )
                self._conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('compact_rev', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                    (revision,),
                )
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise


def _to_row(row: tuple[int, bytes, int, int, int, bytes, bytes | None]) -> _Row:
    id_, name, created, deleted, create_revision, value, prev_value = row
    return _Row(
        id=id_,
        name=bytes(name),
        created=bool(created),
        deleted=bool(deleted),
        create_revision=create_revision,
        value=bytes(value),
        prev_value=None if prev_value is None else bytes(prev_value),
    )


def _expect(key: str, expected_revision: int) -> Callable[[_Row | None], None]:
    def check(prev: _Row | None) -> None:
        if prev is None or prev.deleted:
            raise NotFound(f"{key} not found", name=key)
        if expected_revision and prev.id != expected_revision:
            raise Conflict(f"{key} is at revision {prev.id}, not {expected_revision}", name=key)

    return check


class SqliteStore:
    """:class:`apiserver.storage.Store` over an SQLite file (or ``":memory:"``)."""

    name = "sqlite"

    def __init__(self, path: str, *, watch_queue_limit: int = 10_000) -> None:
        self._path = path
        self._watch_queue_limit = watch_queue_limit
        self._executor: ThreadPoolExecutor | None = None
        self._db: _Database | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The revision of the last write published to watchers (event-loop side).
        self._revision = 0
        self._watchers: set[_SqliteWatch] = set()

    async def start(self) -> None:
        if self._db is not None:
            return
        if self._closed:
            raise Unavailable("sqlite store is closed")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            self._db = await self._loop.run_in_executor(self._executor, _Database.open, self._path)
        except sqlite3.Error as e:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise Unavailable(f"cannot open sqlite store {self._path}: {e}") from e
        self._revision = await self._run(lambda db: db.revision())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watcher in list(self._watchers):
            watcher._end(Unavailable("sqlite store closed"))
        self._watchers.clear()
        if self._db is not None and self._executor is not None and self._loop is not None:
            db = self._db
            with contextlib.suppress(sqlite3.Error):  # nothing left to save
                await self._loop.run_in_executor(self._executor, db.close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._db = None
        self._executor = None

    async def _run(self, job: Callable[[_Database], T]) -> T:
        """Run ``job`` on the worker thread; classify SQLite errors once, here."""
        db, executor, loop = self._db, self._executor, self._loop
        if self._closed or db is None or executor is None or loop is None:
            raise Unavailable("sqlite store is not open")
        try:
            future = loop.run_in_executor(executor, job, db)
        except RuntimeError as e:  # the executor was shut down under us
            raise Unavailable("sqlite store is closed") from e
        try:
            return await future
        except ShoalError:
            raise
        except sqlite3.OperationalError as e:
            # Locked database, I/O error, disk full: may pass.
            raise Unavailable(f"sqlite: {e}") from e
        except sqlite3.Error as e:
            raise InternalError(f"sqlite: {e}") from e

    async def _write(self, job: Callable[[_Database], StorageEvent]) -> int:
        loop = self._loop

        def write_and_publish(db: _Database) -> StorageEvent:
            event = job(db)
            # One worker thread: these callbacks run in commit (= revision) order,
            # and before the writer's await returns.
            assert loop is not None
            loop.call_soon_threadsafe(self._publish, event)
            return event

        return (await self._run(write_and_publish)).revision

    def _publish(self, event: StorageEvent) -> None:
        self._revision = event.revision
        batch = WatchBatch(revision=event.revision, events=(event,))
        for watcher in list(self._watchers):
            if event.key.startswith(watcher.prefix):
                watcher._offer(batch)

    async def current_revision(self) -> int:
        if self._closed or self._db is None:
            raise Unavailable("sqlite store is not open")
        return self._revision

    async def get(self, key: str) -> KeyValue | None:
        return await self._run(lambda db: db.get(key))

    async def range(
        self, prefix: str, *, start: str = "", limit: int = 0, revision: int = 0
    ) -> RangeResult:
        if limit < 0 or revision < 0:
            raise BadRequest("limit and revision must not be negative")
        return await self._run(
            lambda db: db.range(prefix, start=start, limit=limit, revision=revision)
        )

    async def create(self, key: str, value: bytes) -> int:
        return await self._write(lambda db: db.create(key, value))

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> int:
        if expected_revision <= 0:
            raise BadRequest(f"update of {key} needs an expected revision > 0")
        return await self._write(
            lambda db: db.update(key, value, expected_revision=expected_revision)
        )

    async def delete(self, key: str, *, expected_revision: int) -> int:
        if expected_revision < 0:
            raise BadRequest(f"delete of {key}: expected revision must not be negative")
        return await self._write(lambda db: db.delete(key, expected_revision=expected_revision))

    def watch(self, prefix: str, *, from_revision: int) -> _SqliteWatch:
        if from_revision < 0:
            raise BadRequest("from_revision must not be negative")
        watcher = _SqliteWatch(
            self,
            prefix=prefix,
            from_revision=from_revision,
            snapshot=self._revision,
            queue_limit=self._watch_queue_limit,
        )
        if self._closed or self._db is None:
            watcher._end(Unavailable("sqlite store is not open"))
        else:
            self._watchers.add(watcher)
        return watcher

    async def compact(self, revision: int) -> None:
        await self._run(lambda db: db.compact(revision))

    async def compacted_revision(self) -> int:
        return await self._run(lambda db: db.compacted())

    async def _history(self, prefix: str, *, first: int, last: int) -> list[StorageEvent]:
        return await self._run(lambda db: db.history(prefix, first=first, last=last))


class _SqliteWatch:
    """One watcher: replay from the table up to ``snapshot``, then the live queue.

    States::

        registered --__aiter__--> replaying --> live --close()--> closed
             |                        |          |
             +------------------------+----------+--> ended (error raised once the
                                                      consumer reaches it)
    """

    def __init__(
        self,
        store: SqliteStore,
        *,
        prefix: str,
        from_revision: int,
        snapshot: int,
        queue_limit: int,
    ) -> None:
        self._store = store
        self.prefix = prefix
        self._from = from_revision
        # Every write with revision <= snapshot was published before this watcher
        # was registered; every later one reaches its live queue.
        self._snapshot = snapshot
        self._limit = queue_limit
        self._live: deque[WatchBatch] = deque()
        self._wakeup = asyncio.Event()
        self._error: ShoalError | None = None
        self._closed = False

    def _offer(self, batch: WatchBatch) -> None:
        if self._error is not None or self._closed:
            return
        if len(self._live) >= self._limit:
            self._end(Unavailable("watch too slow"))
            return
        self._live.append(batch)
        self._wakeup.set()

    def _end(self, error: ShoalError) -> None:
        """End the watch with ``error``; buffered batches are dropped."""
        if self._error is None:
            self._error = error
        self._live.clear()
        self._store._watchers.discard(self)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WatchBatch]:
        if self._closed:
            return
        if self._error is not None:
            raise self._error
        # Replay: rows from_revision..snapshot, read from the table a page at a time.
        if 0 < self._from <= self._snapshot:
            first = self._from
            while first <= self._snapshot:
                events = await self._store._history(self.prefix, first=first, last=self._snapshot)
                if not events or self._closed:
                    break
                for event in events:
                    yield WatchBatch(revision=event.revision, events=(event,))
                    if self._closed:
                        return
                first = events[-1].revision + 1
        # Live.
        while not self._closed:
            if self._live:
                batch = self._live.popleft()
                if batch.events and (
                    batch.revision <= self._snapshot or batch.revision < self._from
                ):
                    continue
                yield batch
                continue
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            await self._wakeup.wait()

    async def request_progress(self) -> None:
        if self._closed or self._error is not None:
            return
        # Everything published so far is already queued ahead of this notice.
        self._offer(WatchBatch(revision=self._store._revision, events=()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._live.clear()
        self._store._watchers.discard(self)
        self._wakeup.set()
