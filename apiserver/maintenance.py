"""Storage maintenance run by the leading apiserver: compaction and defragmentation.

etcd keeps every revision until it is compacted, and a compacted database keeps
its size on disk until each member is defragmented. Kubernetes' apiserver
compacts every ``--etcd-compaction-interval`` (5 minutes); defragmenting is left
to operators, because a member blocks reads and writes while it defragments.
Shoal does both, from the apiserver that holds the controller Lease (only one
compacts, however many apiservers run)::

    every tick (retention / 5, at least 1 s):
        observe(now, current revision)
        target(now) -> the newest revision seen at least ``retention`` ago
                       (None: nothing older than that, or already compacted)
        -> store.compact(target)          history younger than retention is kept

    every defrag check (1 min), when defrag_due(now, last, interval, window):
        for each etcd member in turn:  Maintenance.Defragment   (one at a time, so
                                       at most one member is stalled at once)

A watcher (or an informer) behind the compacted revision gets ``Expired`` and
relists; with retention of minutes, only a client that was away that long does.

Contract: the schedules are pure (time is passed in) and tested on a fake
clock; the loops only do what the schedules say, log failures and go on (a
failed compaction is tried again at the next tick).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from apiserver.storage import Store
from shoal import errors

log = logging.getLogger(__name__)

DEFRAG_CHECK = 60.0


@dataclass
class CompactionSchedule:
    """Which revision to compact to, so that ``retention`` seconds of history stay."""

    retention: float
    _samples: deque[tuple[float, int]] = field(default_factory=deque, init=False)
    _compacted: int = field(default=0, init=False)

    @property
    def tick(self) -> float:
        return max(1.0, self.retention / 5)

    def observe(self, now: float, revision: int) -> None:
        if not self._samples or revision > self._samples[-1][1]:
            self._samples.append((now, revision))

    def target(self, now: float) -> int | None:
        """The newest revision observed at least ``retention`` ago, if not yet
        compacted to; samples older than it are dropped."""
        best: int | None = None
        while self._samples and self._samples[0][0] <= now - self.retention:
            best = self._samples.popleft()[1]
        if best is None or best <= self._compacted:
            return None
        return best

    def compacted(self, revision: int) -> None:
        self._compacted = max(self._compacted, revision)


def parse_window(text: str) -> tuple[dt.time, dt.time] | None:
    """``"02:00-05:00"`` (UTC; may wrap midnight) or ``""`` for any time."""
    if not text:
        return None
    try:
        start, end = (dt.time.fromisoformat(p.strip()) for p in text.split("-"))
    except ValueError:
        raise errors.BadRequest(f"defrag window {text!r}: want HH:MM-HH:MM (UTC), e.g. "
                                "02:00-05:00") from None
    return start, end


def defrag_due(now: dt.datetime, *, last: dt.datetime | None, interval: float,
               window: tuple[dt.time, dt.time] | None) -> bool:
    """Whether to defragment now: ``interval`` seconds since ``last`` (0 = never
    defragment), and inside the off-peak ``window`` when one is set."""
    if interval <= 0:
        return False
    if last is not None and (now - last).total_seconds() < interval:
        return False
    if window is None:
        return True
    start, end = window
    t = now.time()
    return start <= t < end if start <= end else (t >= start or t < end)


class Maintenance:
    """The leader's loops over one store (and, for etcd, its members)."""

    def __init__(self, *, store: Store, retention: float, defrag_interval: float = 0.0,
                 defrag_window: str = "",
                 defragment: Callable[[], Awaitable[Sequence[str]]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.schedule = CompactionSchedule(retention) if retention > 0 else None
        self.defrag_interval = defrag_interval
        self.defrag_window = parse_window(defrag_window)
        self.defragment = defragment
        self.clock = clock
        self.last_defrag: dt.datetime | None = None

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            if self.schedule is not None:
                tg.create_task(self._compaction(self.schedule), name="compaction")
            if self.defragment is not None and self.defrag_interval > 0:
                tg.create_task(self._defragmentation(), name="defragmentation")

    async def _compaction(self, schedule: CompactionSchedule) -> None:
        while True:
            try:
                schedule.observe(self.clock(), await self.store.current_revision())
                target = schedule.target(self.clock())
                if target is not None:
                    await self.store.compact(target)
                    schedule.compacted(target)
                    log.info("compacted storage history to revision %d (keeping %.0f s)",
                             target, schedule.retention)
            except errors.ShoalError as e:
                log.warning("compaction: %s; trying again in %.0f s", e, schedule.tick)
            await asyncio.sleep(schedule.tick)

    async def _defragmentation(self) -> None:
        assert self.defragment is not None
        while True:
            now = dt.datetime.now(dt.UTC)
            if defrag_due(now, last=self.last_defrag, interval=self.defrag_interval,
                          window=self.defrag_window):
                self.last_defrag = now
                try:
                    done = await self.defragment()
                    log.info("defragmented etcd members %s", ", ".join(done))
                except errors.ShoalError as e:
                    log.warning("defragmentation: %s", e)
            await asyncio.sleep(DEFRAG_CHECK)
