"""Leader election on a Lease object, as client-go's leaderelection does.

    candidate --(Lease free, expired, or ours)--> acquire (CAS) --> LEADER
       ^                                                  |  renew every retry_period
       |                                                  |  (CAS on resourceVersion)
       +---- lost: renew failed for renew_deadline, ------+
             or someone else holds an unexpired Lease

A Lease ``<namespace>/<name>`` records ``holderIdentity``, ``renewTime`` and
``leaseDurationSeconds``. A candidate takes it when it is unheld or its
``renewTime + leaseDurationSeconds`` has passed; every write is a
compare-and-swap on the Lease's resourceVersion, so two candidates can never
both believe they hold it. A leader that cannot renew within
``renew_deadline`` (shorter than the lease duration) steps down before anyone
else may take over, so there is never a moment with two leaders.

``run(lead)`` calls ``lead()`` while leading and cancels it the moment
leadership is lost; then it campaigns again. Time is passed in (``clock``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import timestamp_pb2

from shoal import errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.client import AsyncClient

log = logging.getLogger(__name__)


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


class LeaderElector:
    def __init__(
        self,
        *,
        client: AsyncClient,
        name: str,
        identity: str,
        namespace: str = "kube-system",
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise errors.BadRequest("leader election needs retry_period < renew_deadline < "
                                    "lease_duration")
        self.client = client
        self.name = name
        self.identity = identity
        self.namespace = namespace
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.leading = asyncio.Event()
        self.observed_holder = ""

    async def try_acquire_or_renew(self) -> bool:
        """One attempt. True if we hold the Lease afterwards."""
        now = self.clock()
        try:
            lease = await self.client.get(coordination_pb2.Lease, self.name,
                                          namespace=self.namespace)
        except errors.NotFound:
            lease = coordination_pb2.Lease()
            lease.metadata.name = self.name
            lease.metadata.namespace = self.namespace
            self._claim(lease, now, transition=False)
            try:
                await self.client.create(lease)
                return True
            except errors.AlreadyExists:
                return False
        spec = lease.spec
        holder = spec.holder_identity if spec.HasField("holder_identity") else ""
        self.observed_holder = holder
        duration = spec.lease_duration_seconds if spec.HasField(
            "lease_duration_seconds") else self.lease_duration
        expired = _seconds(spec.renew_time) + duration <= now
        if holder and holder != self.identity and not expired:
            return False
        self._claim(lease, now, transition=holder != self.identity)
        try:
            await self.client.update(lease)  # CAS: carries the resourceVersion we read
        except errors.Conflict:
            return False
        return True

    def _claim(self, lease: coordination_pb2.Lease, now: float, *, transition: bool) -> None:
        spec = lease.spec
        if transition or not spec.HasField("holder_identity"):
            spec.acquire_time.CopyFrom(_ts(now))
            spec.lease_transitions = (spec.lease_transitions if spec.HasField(
                "lease_transitions") else 0) + (1 if transition else 0)
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = int(self.lease_duration)
        spec.renew_time.CopyFrom(_ts(now))

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except errors.ShoalError as e:
            log.warning("leader election %s: %s", self.name, e)
            return False

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign, lead (running ``lead``), step down when renewal fails; repeat."""
        while True:
            while True:  # campaign: a poll of the Lease every retry_period
                if await self._attempt():
                    break
                await asyncio.sleep(self.retry_period)
            log.info("%s is now the leader of %s", self.identity, self.name)
            self.leading.set()
            task = asyncio.create_task(lead(), name=f"lead-{self.name}")
            try:
                await self._keep(task)
            finally:
                self.leading.clear()
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("%s: the leader's work failed", self.name)
            log.warning("%s lost the leadership of %s", self.identity, self.name)

    async def _keep(self, task: asyncio.Task[None]) -> None:
        last_renew = self.clock()
        while not task.done():
            await asyncio.sleep(self.retry_period)
            if await self._attempt():
                last_renew = self.clock()
            elif self.clock() - last_renew >= self.renew_deadline:
                return
