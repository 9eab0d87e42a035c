"""Workers that take keys from a WorkQueue and retry failures, in one place.

    queue --key--> handle(key) --ok--------> forget(key) (back-off reset)
                              \\--ShoalError--> add_rate_limited(key)  (per-key back-off)
                               \\--bug-------> logged, add_rate_limited(key)

Contract: ``handle`` reads the current state itself (level-triggered) and is
idempotent; it may ask to be called again later by returning a delay in
seconds (``None``: nothing to wait for). At most one worker handles a key at
a time (the queue guarantees it). An unexpected exception never kills the
other workers or the controller: it is logged with its traceback and the key
is retried with back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shoal import errors
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[float | None]]


async def _work(queue: WorkQueue, handle: Handler, what: str) -> None:
    async for key in queue.worker():
        try:
            again = await handle(key)
        except errors.ShoalError as e:
            delay = queue.add_rate_limited(key)
            log.info("%s %s: %s; retrying in %.2fs", what, key, e, delay)
            continue
        except Exception:
            delay = queue.add_rate_limited(key)
            log.exception("%s %s failed; retrying in %.2fs", what, key, delay)
            continue
        queue.forget(key)
        if again is not None:
            queue.add_after(key, again)


async def run_workers(queue: WorkQueue, handle: Handler, *, count: int, what: str) -> None:
    """Run ``count`` workers on ``queue`` until cancelled."""
    async with asyncio.TaskGroup() as tg:
        for i in range(max(1, count)):
            tg.create_task(_work(queue, handle, what), name=f"{what}-worker-{i}")


async def every(period: float, fn: Callable[[], None]) -> None:
    """Call ``fn`` every ``period`` seconds until cancelled (periodic resync)."""
    while True:
        await asyncio.sleep(period)
        fn()
