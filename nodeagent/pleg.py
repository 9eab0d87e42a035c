"""The pod lifecycle event generator: relist the runtime, turn differences into work.

Every ``interval`` seconds (and whenever a worker asks) the runtime is listed
whole. The result replaces ``records``; every pod UID whose record differs
from the previous listing is handed to ``on_change``. Comparing two states and
nothing else, as the kubelet's ``generateEvents`` does: a container that died
while nobody watched is noticed at the next relist, even after an agent
restart.

Contract: ``relist()`` is safe to call from any worker at any time (calls
are serialised); a runtime outage raises ``Unavailable`` to the caller, and the
loop in ``run()`` logs it and keeps going.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nodeagent.podruntime import PodRuntime
from nodeagent.runtimestate import PodRecord
from shoal import errors

log = logging.getLogger(__name__)


class Relister:
    def __init__(self, *, runtime: PodRuntime, on_change: Callable[[str], None],
                 interval: float = 1.0) -> None:
        self.runtime = runtime
        self.on_change = on_change
        self.interval = interval
        self.records: dict[str, PodRecord] = {}
        self.healthy = asyncio.Event()
        self._lock = asyncio.Lock()

    async def relist(self) -> dict[str, PodRecord]:
        async with self._lock:
            fresh = await self.runtime.relist()
            old = self.records
            self.records = fresh
        for uid in set(old) | set(fresh):
            if old.get(uid) != fresh.get(uid):
                self.on_change(uid)
        self.healthy.set()
        return fresh

    async def run(self) -> None:
        while True:
            try:
                await self.relist()
            except errors.ShoalError as e:
                self.healthy.clear()
                log.warning("relist failed: %s", e)
            await asyncio.sleep(self.interval)
