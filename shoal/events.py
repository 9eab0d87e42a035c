"""Events: what controllers, the scheduler and node agents tell people.

    recorder = EventRecorder(client, component="deployment-controller")
    recorder.event(deploy, "Normal", "ScalingReplicaSet", "Scaled up replica set web-7d9 to 3")

Kubernetes' core/v1 Event: ``involvedObject``, ``reason``, ``message``,
``type`` (Normal or Warning), ``source``, ``count``, ``firstTimestamp`` and
``lastTimestamp``. The same (object, type, reason, message) seen again bumps
``count`` and ``lastTimestamp`` of the existing Event instead of making a new
one, as the kubelet's correlator does.

``event()`` never blocks its caller and never raises: it queues the write and
a background task sends it (``run()``); events are best-effort by design, and
a full queue drops the oldest. Clock passed in.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.kinds import KindTable

log = logging.getLogger(__name__)

_QUEUE = 1000
_REMEMBERED = 4096


def _ts(now: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(now))


class EventRecorder:
    def __init__(self, client: AsyncClient, *, component: str, host: str = "",
                 kinds: KindTable | None = None, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.component = component
        self.host = host
        self.kinds = kinds or client.kinds
        self.clock = clock
        self._pending: deque[tuple[tuple[str, ...], core_pb2.Event]] = deque(maxlen=_QUEUE)
        self._wake = asyncio.Event()
        # (uid, type, reason, message) -> the Event that counts it, as last written
        self._seen: OrderedDict[tuple[str, ...], core_pb2.Event] = OrderedDict()

    def event(self, obj: Any, type_: str, reason: str, message: str) -> None:
        """Record that ``reason`` happened to ``obj``. Never raises."""
        try:
            kind = self.kinds.by_message(obj)
        except errors.ShoalError:
            return
        meta = obj.metadata
        ev = core_pb2.Event(reason=reason, message=message[:1024], type=type_)
        ev.metadata.namespace = meta.namespace or "default"
        ref = ev.involved_object
        ref.kind, ref.api_version = kind.kind, kind.api_version
        ref.name, ref.namespace, ref.uid = meta.name, meta.namespace, meta.uid
        ref.resource_version = meta.resource_version
        ev.source.component, ev.source.host = self.component, self.host
        ev.reporting_component = self.component
        ev.reporting_instance = self.host or self.component
        now = _ts(self.clock())
        ev.first_timestamp.CopyFrom(now)
        ev.last_timestamp.CopyFrom(now)
        ev.count = 1
        self._pending.append(((meta.uid, type_, reason, message), ev))
        self._wake.set()

    async def flush(self) -> None:
        """Send every queued event now (tests, shutdown)."""
        while self._pending:
            key, ev = self._pending.popleft()
            await self._send(key, ev)

    async def _send(self, key: tuple[str, ...], ev: core_pb2.Event) -> None:
        last = self._seen.get(key)
        try:
            if last is not None:
                # Only we write this Event: bump the copy we wrote last, one request
                # (the kubelet's correlator does the same); if it is gone or someone
                # else changed it, start a new one.
                bumped = core_pb2.Event()
                bumped.CopyFrom(last)
                bumped.count += 1
                bumped.last_timestamp.CopyFrom(ev.last_timestamp)
                try:
                    self._seen[key] = await self.client.update(bumped)
                    self._seen.move_to_end(key)
                    return
                except (errors.NotFound, errors.Conflict):
                    pass
            ev.metadata.name = (f"{ev.involved_object.name}."
                                f"{int(self.clock() * 1e9):x}{secrets.token_hex(2)}")
            self._seen[key] = await self.client.create(ev)
            while len(self._seen) > _REMEMBERED:
                self._seen.popitem(last=False)
        except errors.ShoalError as e:
            log.debug("event %s on %s dropped: %s", ev.reason, ev.involved_object.name, e)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()
