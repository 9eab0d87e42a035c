"""etcd v3 backend for :class:`apiserver.storage.Store`, over ``aetcd``'s channel and stubs.

``aetcd.Client`` opens the gRPC channel; every request is built here from the
generated messages (``aetcd.rpc``) and sent through ``KVStub``/``WatchStub``
directly, so ranges carry ``limit``/``revision``/``count``, writes are single
``Txn`` compare-and-swaps, and the watch stream is ours to drive.

Contract (on top of the ``Store`` docstring):

- ``start()`` tries ``endpoints`` in order and keeps the first that answers within
  ``dial_timeout``; none answering is ``Unavailable``. When the member in use
  stops answering (a request or the watch stream fails with ``UNAVAILABLE``),
  the store dials the other members in order, from the next one, and moves to
  the first that answers; the failed request is not retried (it may have been
  applied) and raises ``Unavailable`` as before, so its caller retries. Watches
  opened after the move use the new member (the watch cache re-watches from
  its last revision, and revisions are the cluster's, the same on every member).
  Every unary request has a ``request_timeout``; only ``Range`` is retried, by
  the channel's service config, and only on ``UNAVAILABLE``.
- Errors are classified once, in :func:`_classify`: ``UNAVAILABLE``,
  ``DEADLINE_EXCEEDED`` and lost connections are ``Unavailable(retry_after)``;
  "required revision has been compacted" is ``Expired``; "required revision is a
  future revision" is ``BadRequest``. Nothing from grpc or aetcd escapes.
- ``compact(rev)`` compacts etcd, then records ``rev`` under ``compact_rev_key``
  (outside ``/registry``, as Kubernetes does; etcd has no API for the compacted
  revision). That record is a write: it takes a revision of its own.
- Each watch has its own bidi ``Watch`` stream, created on first use (iteration or
  ``request_progress``). ``from_revision=0`` means "after the highest revision
  this store has seen" (from any response, including its own writes), fixed when
  ``watch()`` is called, so a watch never misses a write that returned before it
  was opened; it may replay a few older writes of other clients. The stream
  requires a leader (``hasleader``), asks for ``prev_kv``, fragments large
  revisions (reassembled here) and periodic progress notices. Events are grouped
  one :class:`WatchBatch` per revision. A response without events is a progress
  notice, whatever its ``watch_id`` (etcd 3.4 answers a progress request with
  ``watch_id`` -1; periodic notices carry the watcher's id).
- Back-pressure, not loss: a reader task moves responses into a bounded queue;
  when the consumer is slow the reader stops reading, gRPC flow control pushes
  back, and etcd holds (or, if compacted meanwhile, cancels) the watcher.

Progress notices and etcd before 3.4.25 / 3.5.8 (etcd-io/etcd#15220; this
project's Debian etcd is 3.4.23): such a server answers a progress request at
once, on a side channel, with its current revision. Measured here, that notice
arrives before a new watcher's replayed history, overtakes live events still
queued for a busy watcher, and can even name a revision below an event already
sent. On such a server a requested notice (``watch_id`` -1) is therefore
reported at the last revision delivered to this watch (true, but it does not
advance a quiet watch); periodic notices travel in order with the events and are
trusted: run such an etcd with ``--experimental-watch-progress-notify-interval``
well below its 10-minute default (e.g. 1s) so quiet watches still advance. Which
kind of server this is comes from the version ``Status`` reports at ``start()``;
on fixed servers requested notices are trusted. Either way a notice never goes
backwards.

Lifecycle::

    new --start()--> connected --close()--> closed
                        (open watches end with Unavailable("etcd store closed");
                         start()/close() again are no-ops)

    watch: new --first use--> streaming --close()--> closed (iteration stops)
                                  |
                                  +--> failed (Expired / Unavailable raised to the consumer)
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from aetcd import rpc
from aetcd.rpc import kv_pb2, rpc_pb2

from apiserver.storage import EventType, KeyValue, RangeResult, StorageEvent, WatchBatch
from shoal.errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Expired,
    InternalError,
    NotFound,
    RequestEntityTooLarge,
    ShoalError,
    Unavailable,
)

log = logging.getLogger(__name__)

# Where the last compaction is recorded (outside /registry, as in Kubernetes).
# Under /registry/ so the apiserver's one watch on that prefix sees the write,
# and its idea of "caught up with storage" stays exact after a compaction.
COMPACT_REV_KEY = b"/registry/compact_rev_key"

_RETRY_AFTER = 1.0

# The end-of-stream marker of grpc.aio reads (missing from grpc-stubs).
_GRPC_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.max_receive_message_length": 2**31 - 1,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.enable_retries": 1,
    # Transport retries live here, for UNAVAILABLE only, and only for reads.
    "grpc.service_config": json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": "etcdserverpb.KV", "method": "Range"}],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    ),
}


def _classify(e: grpc.aio.AioRpcError) -> ShoalError:
    """The one place etcd/gRPC failures become Shoal errors."""
    code = e.code()
    details = e.details() or ""
    if "required revision has been compacted" in details:
        return Expired(f"etcd: {details}")
    if "required revision is a future revision" in details:
        return BadRequest(f"etcd: {details}")
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        return Unavailable(f"etcd: {code.name}: {details}", retry_after=_RETRY_AFTER)
    if code is grpc.StatusCode.INVALID_ARGUMENT and "request is too large" in details:
        return RequestEntityTooLarge(f"etcd: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(f"etcd: {details}")
    return InternalError(f"etcd: {code.name}: {details}")


def _key(key: str) -> bytes:
    return key.encode(errors="surrogateescape")


def _name(key: bytes) -> str:
    """etcd keys are bytes; keys not written by Shoal may not be UTF-8."""
    return key.decode(errors="surrogateescape")


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix" (b"\\0": no upper bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadRequest(f"etcd endpoint {endpoint!r} is not host:port")
    return host, int(port)


def progress_is_ordered(version: str) -> bool:
    """Whether an etcd of ``version`` keeps requested progress notices behind pending events.

    Fixed by etcd-io/etcd#15237 in 3.4.25 and 3.5.8.
    """
    try:
        major, minor, patch = (int(p) for p in version.split("-", maxsplit=1)[0].split(".")[:3])
    except ValueError:
        return False
    if (major, minor) == (3, 4):
        return patch >= 25
    if (major, minor) == (3, 5):
        return patch >= 8
    return (major, minor) > (3, 5)


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=_name(kv.key),
        value=kv.value,
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
    )


def _event(ev: Any) -> StorageEvent:
    kv = ev.kv
    prev = ev.prev_kv if ev.HasField("prev_kv") else None
    if ev.type == kv_pb2.Event.DELETE:
        return StorageEvent(
            type=EventType.DELETE,
            key=_name(kv.key),
            value=b"",
            prev_value=prev.value if prev is not None else None,
            revision=kv.mod_revision,
            create_revision=prev.create_revision if prev is not None else 0,
        )
    return StorageEvent(
        type=EventType.PUT,
        key=_name(kv.key),
        value=kv.value,
        prev_value=prev.value if prev is not None else None,
        revision=kv.mod_revision,
        create_revision=kv.create_revision,
    )


def _batches(events: Sequence[Any]) -> list[WatchBatch]:
    """Group etcd events (in revision order) into one batch per revision."""
    batches: list[WatchBatch] = []
    group: list[StorageEvent] = []
    for ev in events:
        event = _event(ev)
        if group and group[-1].revision != event.revision:
            batches.append(WatchBatch(revision=group[-1].revision, events=tuple(group)))
            group = []
        group.append(event)
    if group:
        batches.append(WatchBatch(revision=group[-1].revision, events=tuple(group)))
    return batches


@dataclass(frozen=True, slots=True)
class _Connection:
    client: Any  # aetcd.Client
    kv: Any  # rpc.KVStub
    watch: Any  # rpc.WatchStub
    metadata: tuple[tuple[str, str], ...]
    endpoint: str
    version: str


class EtcdStore:
    """:class:`apiserver.storage.Store` over etcd v3."""

    name = "etcd"

    def __init__(
        self,
        endpoints: list[str],
        *,
        dial_timeout: float = 5.0,
        request_timeout: float = 10.0,
        watch_queue_limit: int = 10_000,
    ) -> None:
        if not endpoints:
            raise BadRequest("EtcdStore needs at least one endpoint")
        self._endpoints = [(endpoint, _split_endpoint(endpoint)) for endpoint in endpoints]
        self._dial_timeout = dial_timeout
        self._request_timeout = request_timeout
        self._watch_queue_limit = watch_queue_limit
        self._conn: _Connection | None = None
        self._closed = False
        self._watches: set[_EtcdWatch] = set()
        self._failover_lock = asyncio.Lock()
        # Clients of members moved away from, closed with the store.
        self._retired: list[Any] = []
        # The highest revision any response has shown this store: watch(from_revision=0)
        # starts after it, so it covers every write this store made or saw before.
        self._seen_revision = 0

    @property
    def endpoint(self) -> str:
        """The endpoint in use (empty before start)."""
        return self._conn.endpoint if self._conn else ""

    async def start(self) -> None:
        if self._conn is not None:
            return
        if self._closed:
            raise Unavailable("etcd store is closed")
        failures: list[str] = []
        last_error: BaseException | None = None
        for endpoint, (host, port) in self._endpoints:
            try:
                self._conn, self._seen_revision = await self._dial(endpoint, host=host, port=port)
                return
            except TimeoutError as e:
                failures.append(f"{endpoint}: no answer within {self._dial_timeout}s")
                last_error = e
            except (grpc.aio.AioRpcError, aetcd.ClientError) as e:
                failures.append(f"{endpoint}: {type(e).__name__}: {e}")
                last_error = e
        raise Unavailable(
            "no etcd endpoint answered: " + "; ".join(failures), retry_after=_RETRY_AFTER
        ) from last_error

    async def _dial(self, endpoint: str, *, host: str, port: int) -> tuple[_Connection, int]:
        """Connect to ``endpoint``; the connection and the store's revision."""
        client = aetcd.Client(
            host=host, port=port, timeout=self._request_timeout, options=_CHANNEL_OPTIONS
        )
        try:
            async with asyncio.timeout(self._dial_timeout):
                await client.connect()
                await client.channel.channel_ready()
                status = await rpc.MaintenanceStub(client.channel).Status(
                    rpc_pb2.StatusRequest(), metadata=client.metadata
                )
        except BaseException:
            await client.close()
            raise
        conn = _Connection(
            client=client,
            kv=rpc.KVStub(client.channel),
            watch=rpc.WatchStub(client.channel),
            metadata=tuple(client.metadata or ()),
            endpoint=endpoint,
            version=status.version,
        )
        return conn, int(status.header.revision)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches):
            await watch._shutdown(Unavailable("etcd store closed", retry_after=_RETRY_AFTER))
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.client.close()
        for client in self._retired:
            await client.close()
        self._retired = []

    def _connection(self) -> _Connection:
        if self._conn is None:
            state = "closed" if self._closed else "not started"
            raise Unavailable(f"etcd store is {state}", retry_after=_RETRY_AFTER)
        return self._conn

    async def _failover(self, failed: _Connection) -> None:
        """``failed`` stopped answering: move to the next member that answers (once
        per failure, however many requests saw it); stay if none does."""
        async with self._failover_lock:
            if self._closed or self._conn is not failed or len(self._endpoints) < 2:
                return
            at = next((i for i, (e, _) in enumerate(self._endpoints) if e == failed.endpoint), 0)
            others = self._endpoints[at + 1:] + self._endpoints[:at]
            for endpoint, (host, port) in others:
                try:
                    conn, revision = await self._dial(endpoint, host=host, port=port)
                except (TimeoutError, grpc.aio.AioRpcError, aetcd.ClientError):
                    continue
                self._conn = conn
                self._seen_revision = max(self._seen_revision, revision)
                log.warning("etcd member %s does not answer; now using %s", failed.endpoint,
                            endpoint)
                # Closed later (at the next move, or with the store): closing a
                # channel cancels the requests still on it, and those must end with
                # their own (Unavailable) answer.
                for client in self._retired:
                    await client.close()
                self._retired = [failed.client]
                return

    async def _unary(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        conn = self._connection()
        try:
            response = await method(request, timeout=self._request_timeout, metadata=conn.metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                await self._failover(conn)
            raise _classify(e) from e
        except grpc.aio.UsageError as e:  # the channel was closed under us
            raise Unavailable(f"etcd: {e}", retry_after=_RETRY_AFTER) from e
        self._seen_revision = max(self._seen_revision, int(response.header.revision))
        return response

    async def _txn(self, *, compare: Any, success: Any, failure: Any = ()) -> Any:
        conn = self._connection()
        request = rpc_pb2.TxnRequest(compare=[compare], success=[success], failure=list(failure))
        return await self._unary(conn.kv.Txn, request)

    async def current_revision(self) -> int:
        conn = self._connection()
        request = rpc_pb2.RangeRequest(key=COMPACT_REV_KEY, count_only=True)
        response = await self._unary(conn.kv.Range, request)
        return int(response.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        conn = self._connection()
        response = await self._unary(conn.kv.Range, rpc_pb2.RangeRequest(key=_key(key)))
        return _key_value(response.kvs[0]) if response.kvs else None

    async def range(
        self, prefix: str, *, start: str = "", limit: int = 0, revision: int = 0
    ) -> RangeResult:
        if limit < 0 or revision < 0:
            raise BadRequest("limit and revision must not be negative")
        conn = self._connection()
        low = max(_key(prefix), _key(start))
        high = _prefix_end(_key(prefix))
        if high != b"\0" and low >= high:
            at = revision or await self.current_revision()
            return RangeResult(kvs=(), revision=at, more=False, count=0)
        request = rpc_pb2.RangeRequest(
            key=low,
            range_end=high,
            limit=limit,
            revision=revision,
            sort_order=rpc_pb2.RangeRequest.ASCEND,
            sort_target=rpc_pb2.RangeRequest.KEY,
        )
        response = await self._unary(conn.kv.Range, request)
        return RangeResult(
            kvs=tuple(_key_value(kv) for kv in response.kvs),
            revision=revision or int(response.header.revision),
            more=bool(response.more),
            count=int(response.count),
        )

    async def create(self, key: str, value: bytes) -> int:
        k = _key(key)
        response = await self._txn(
            compare=rpc_pb2.Compare(
                key=k,
                target=rpc_pb2.Compare.CREATE,
                result=rpc_pb2.Compare.EQUAL,
                create_revision=0,
            ),
            success=rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=value)),
        )
        if not response.succeeded:
            raise AlreadyExists(f"{key} already exists", name=key)
        return int(response.header.revision)

    async def update(self, key: str, value: bytes, *, expected_revision: int) -> int:
        if expected_revision <= 0:
            raise BadRequest(f"update of {key} needs an expected revision > 0")
        k = _key(key)
        response = await self._txn(
            compare=_mod_revision_is(k, expected_revision),
            success=rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=value)),
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k))],
        )
        if not response.succeeded:
            raise _precondition_failed(key, expected_revision, response)
        return int(response.header.revision)

    async def delete(self, key: str, *, expected_revision: int) -> int:
        if expected_revision < 0:
            raise BadRequest(f"delete of {key}: expected revision must not be negative")
        k = _key(key)
        conn = self._connection()
        if expected_revision == 0:
            request = rpc_pb2.DeleteRangeRequest(key=k, prev_kv=True)
            deleted = await self._unary(conn.kv.DeleteRange, request)
            if deleted.deleted == 0:
                raise NotFound(f"{key} not found", name=key)
            return int(deleted.header.revision)
        response = await self._txn(
            compare=_mod_revision_is(k, expected_revision),
            success=rpc_pb2.RequestOp(
                request_delete_range=rpc_pb2.DeleteRangeRequest(key=k, prev_kv=True)
            ),
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=k))],
        )
        if not response.succeeded:
            raise _precondition_failed(key, expected_revision, response)
        return int(response.header.revision)

    def watch(self, prefix: str, *, from_revision: int) -> _EtcdWatch:
        if from_revision < 0:
            raise BadRequest("from_revision must not be negative")
        watch = _EtcdWatch(
            self,
            prefix=prefix,
            from_revision=from_revision or self._seen_revision + 1,
            queue_limit=self._watch_queue_limit,
        )
        if self._conn is None:
            # Not started (or closed): "from now" would mean nothing; fail on use.
            watch._error = Unavailable("etcd store is not connected", retry_after=_RETRY_AFTER)
        else:
            self._watches.add(watch)
        return watch

    async def compact(self, revision: int) -> None:
        recorded, record_mod = await self._compact_record()
        if revision <= recorded:
            return
        conn = self._connection()
        try:
            await self._unary(conn.kv.Compact, rpc_pb2.CompactionRequest(revision=revision))
        except Expired:
            pass  # etcd was already compacted past it (by someone else): record ours anyway
        # Record the high-water mark with a CAS; a concurrent compactor may win, and
        # then only a higher value of ours is worth writing.
        for _ in range(3):
            response = await self._txn(
                compare=_mod_revision_is(COMPACT_REV_KEY, record_mod),
                success=rpc_pb2.RequestOp(
                    request_put=rpc_pb2.PutRequest(
                        key=COMPACT_REV_KEY, value=str(revision).encode()
                    )
                ),
            )
            if response.succeeded:
                return
            recorded, record_mod = await self._compact_record()
            if revision <= recorded:
                return
        raise Unavailable("etcd: compact_rev_key keeps changing", retry_after=_RETRY_AFTER)

    async def _compact_record(self) -> tuple[int, int]:
        """The recorded compacted revision and the record's mod_revision (0, 0 if none)."""
        conn = self._connection()
        response = await self._unary(conn.kv.Range, rpc_pb2.RangeRequest(key=COMPACT_REV_KEY))
        if not response.kvs:
            return 0, 0
        kv = response.kvs[0]
        try:
            return int(kv.value.decode()), int(kv.mod_revision)
        except ValueError as e:
            raise InternalError(f"etcd: {COMPACT_REV_KEY!r} holds {kv.value!r}") from e

    async def compacted_revision(self) -> int:
        return (await self._compact_record())[0]


def _mod_revision_is(key: bytes, revision: int) -> Any:
    return rpc_pb2.Compare(
        key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=revision
    )


def _precondition_failed(key: str, expected_revision: int, response: Any) -> ShoalError:
    kvs = response.responses[0].response_range.kvs if response.responses else []
    if not kvs:
        return NotFound(f"{key} not found", name=key)
    return Conflict(
        f"{key} is at revision {kvs[0].mod_revision}, not {expected_revision}", name=key
    )


_END = None


class _EtcdWatch:
    """One watch: its own bidi Watch stream, a reader task and a bounded queue."""

    def __init__(
        self, store: EtcdStore, *, prefix: str, from_revision: int, queue_limit: int
    ) -> None:
        self._store = store
        self._prefix = _key(prefix)
        self._from = from_revision
        self._queue: asyncio.Queue[WatchBatch | ShoalError | None] = asyncio.Queue(queue_limit)
        self._start_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._call: Any = None  # grpc.aio.StreamStreamCall
        self._conn: _Connection | None = None  # the member this watch streams from
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # The error that ended the watch, raised again to any later iteration.
        self._error: ShoalError | None = None
        # Progress bookkeeping (see the module docstring).
        # Every event up to this revision has been queued for the consumer.
        self._delivered = max(from_revision - 1, 0)
        self._trust_requested_progress = True

    def __aiter__(self) -> AsyncIterator[WatchBatch]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WatchBatch]:
        if self._error is not None:
            raise self._error
        if not await self._ensure_started():
            return
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, ShoalError):
                self._error = item
                raise item
            yield item

    async def _ensure_started(self) -> bool:
        """Open the stream and send the create request once. False when closed."""
        async with self._start_lock:
            if self._closed:
                return False
            if self._call is not None:
                return True
            conn = self._store._connection()
            self._conn = conn
            self._trust_requested_progress = progress_is_ordered(conn.version)
            create = rpc_pb2.WatchCreateRequest(
                key=self._prefix,
                range_end=_prefix_end(self._prefix),
                start_revision=self._from,
                progress_notify=True,
                prev_kv=True,
                fragment=True,
            )
            # A partitioned member must end the watch rather than go quiet.
            self._call = conn.watch.Watch(metadata=(*conn.metadata, ("hasleader", "true")))
            try:
                await self._call.write(rpc_pb2.WatchRequest(create_request=create))
            except grpc.aio.AioRpcError as e:
                self._call.cancel()
                self._call = None
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    await self._store._failover(conn)
                raise _classify(e) from e
            self._reader = asyncio.get_running_loop().create_task(
                self._read(), name=f"etcd-watch {_name(self._prefix)}"
            )
            return True

    async def _read(self) -> None:
        """Move responses from the stream into the queue; end with an error or _END."""
        error: ShoalError
        try:
            await self._pump()
            error = Unavailable("etcd ended the watch stream", retry_after=_RETRY_AFTER)
        except grpc.aio.AioRpcError as e:
            error = _classify(e)
            error.__cause__ = e
            if e.code() == grpc.StatusCode.UNAVAILABLE and self._conn is not None:
                await self._store._failover(self._conn)
        except ShoalError as e:
            error = e
        except Exception as e:  # never leave the consumer waiting on a dead reader
            error = InternalError(f"etcd watch of {self._prefix!r} failed: {e!r}")
            error.__cause__ = e
        await self._queue.put(error)

    async def _pump(self) -> None:
        fragments: list[Any] = []
        while True:
            response = await self._call.read()
            if response is _GRPC_EOF:
                return
            if response.compact_revision:
                raise Expired(
                    f"etcd: watch from revision {self._from} of {_name(self._prefix)}: "
                    f"history compacted to {response.compact_revision}"
                )
            if response.created:
                if response.canceled:
                    raise InternalError(f"etcd refused the watch: {response.cancel_reason}")
                self._on_created(int(response.header.revision))
                continue
            if response.canceled:
                raise Unavailable(
                    f"etcd canceled the watch: {response.cancel_reason}",
                    retry_after=_RETRY_AFTER,
                )
            if response.fragment:
                fragments.extend(response.events)
                continue
            events = [*fragments, *response.events]
            fragments = []
            if not events:
                await self._progress(response)
                continue
            batches = _batches(events)
            for batch in batches:
                await self._queue.put(batch)
            self._delivered = max(self._delivered, batches[-1].revision)

    def _on_created(self, revision: int) -> None:
        # Nothing before from_revision is this watch's to deliver; and a notice
        # never names a revision beyond the store's.
        self._delivered = min(self._from - 1, revision)

    async def _progress(self, response: Any) -> None:
        revision = int(response.header.revision)
        if response.watch_id == -1 and not self._trust_requested_progress:
            # A requested notice from an etcd with etcd#15220: it may have overtaken
            # events still queued for this watcher, so claim only what was delivered.
            revision = self._delivered
        # Never backwards (etcd#15220 again: a notice can trail the last event).
        revision = max(revision, self._delivered)
        self._delivered = revision
        await self._queue.put(WatchBatch(revision=revision, events=()))

    async def request_progress(self) -> None:
        if not await self._ensure_started():
            return
        async with self._write_lock:
            try:
                await self._call.write(
                    rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())
                )
            except grpc.aio.AioRpcError as e:
                raise _classify(e) from e
            except (asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                raise Unavailable("etcd watch stream is closed", retry_after=_RETRY_AFTER) from e

    async def close(self) -> None:
        await self._shutdown(_END)

    async def _shutdown(self, final: ShoalError | None) -> None:
        # Under the start lock: a start in flight completes first, then is undone.
        async with self._start_lock:
            if self._closed:
                return
            self._closed = True
        self._store._watches.discard(self)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])
        if self._call is not None:
            self._call.cancel()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(final)
