"""A level-triggered work queue of keys, as client-go's "stingy" queue.

    queue = WorkQueue()
    informer.add_handlers(on_add=lambda o: queue.add(key_of(o)), ...)
    async for key in queue.worker():      # or: key = await queue.get(); ...; queue.done(key)
        ...                               # read current state from the informer cache

Guarantees:
- A key is handed to at most one worker at a time.
- Adding a key that is already waiting does nothing (adds collapse into one).
- Adding a key while it is being worked on makes it come back once ``done``
  is called, so no change is missed.
- ``add_rate_limited`` re-adds after a per-key exponential back-off with
  jitter (reset by ``forget`` after a success); ``add_after`` after a delay.

Time comes from the event loop, so tests can drive it with a fake loop clock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable

from shoal.backoff import Backoff


class WorkQueue:
    def __init__(self, *, base_delay: float = 0.005, max_delay: float = 60.0) -> None:
        self._queue: deque[str] = deque()
        self._waiting: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._backoffs: dict[str, Backoff] = {}
        self._base = base_delay
        self._cap = max_delay
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str) -> None:
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._waiting:
            return
        self._waiting.add(key)
        self._queue.append(key)
        self._ready.set()

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        old = self._timers.get(key)
        if old is not None:
            if old.when() <= loop.time() + delay:
                return  # an earlier wake-up is already planned
            old.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def add_rate_limited(self, key: str) -> float:
        """Re-add after this key's next back-off delay; returns the delay."""
        backoff = self._backoffs.setdefault(key, Backoff(base=self._base, cap=self._cap))
        delay = backoff.next()
        self.add_after(key, delay)
        return delay

    def retries(self, key: str) -> int:
        b = self._backoffs.get(key)
        return b.attempts if b else 0

    def forget(self, key: str) -> None:
        """Reset the key's back-off (call after it was handled successfully)."""
        self._backoffs.pop(key, None)

    async def get(self) -> str:
        while not self._queue:
            if self._closed:
                raise asyncio.CancelledError("queue closed")
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._waiting.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    async def worker(self) -> AsyncIterator[str]:
        """Yield keys forever; each is marked done when the loop body finishes."""
        while True:
            key = await self.get()
            try:
                yield key
            finally:
                self.done(key)

    def close(self) -> None:
        self._closed = True
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        self._ready.set()


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True if it was set.

    For loops that wake on an event or on a timer. Not ``asyncio.wait_for``:
    on Python 3.11, when the event is set at the moment the task is cancelled,
    ``wait_for`` returns normally and swallows the cancellation, so a loop
    around it never stops. ``asyncio.timeout`` tells its own cancellation from
    the caller's."""
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def wait_any(events: Iterable[asyncio.Event], timeout: float) -> bool:
    """``wait_set`` for several events: True as soon as one of them is set."""
    events = list(events)
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=max(0.0, timeout),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return bool(done)
