"""Tables derived from the informer caches, rebuilt off the connection path: one
rebuild per burst of changes, soon after it.

    tables = Rebuilder(build, delay=0.005)
    informer handlers: tables.mark()       # dirty; a rebuild due ``delay`` from now
    after the informers synced: tables.start()   # builds now; later marks schedule
    the data path:     tables.current()    # O(1): reads what is built

    clean --mark()--> dirty, due = now + delay, one timer
      ^                 | mark() again: nothing more (the burst waits for the same timer)
      |                 v
      +--- build() <--- the timer fires, or current() is called at or after ``due``

Contract:
- ``build`` runs at most once per burst: marks while dirty add nothing, and a
  timer is only armed when none is pending.
- ``current()`` never sees a table older than ``delay`` behind the newest mark: once
  the rebuild is due and the timer has not run yet (a busy loop), it rebuilds
  inline, once. Before ``due`` it reads the previous tables.
- Before ``start()`` (informers still listing) marks only set dirty, and
  ``current()`` rebuilds inline whenever dirty, as a lazy rebuild would.
- A failing ``build`` is logged (when the timer ran it) and the tables keep what
  it left; the next mark tries again. Nobody else retries.

Time and timers come from a :class:`Timer`: the running event loop (bound at
``start()``) unless one is given; tests pass ``shoal.testing.timers.FakeTimer``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Timer(Protocol):
    """What a Rebuilder needs of an event loop (``asyncio.AbstractEventLoop`` is one)."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None], /) -> object: ...


class Rebuilder:
    def __init__(self, build: Callable[[], None], *, delay: float,
                 timer: Timer | None = None, name: str = "tables") -> None:
        self._build_fn = build
        self.delay = delay
        self.name = name
        self._timer = timer
        self.dirty = True
        self.builds = 0  # how many times build ran (tests, logs)
        self._started = False
        self._due = 0.0
        self._timer_pending = False
        self._listeners: list[Callable[[], None]] = []

    def on_built(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` after every build (bench/hollow_meshagent.py reports from it)."""
        self._listeners.append(fn)

    def start(self) -> None:
        """From now on a mark schedules a rebuild; what is dirty is built now."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop()
        self._started = True
        if self.dirty:
            self._build()

    def mark(self) -> None:
        """Something the tables derive from changed (an informer handler)."""
        if self.dirty:
            return
        self.dirty = True
        if not self._started:
            return
        assert self._timer is not None  # started
        self._due = self._timer.time() + self.delay
        if not self._timer_pending:
            self._timer_pending = True
            self._timer.call_later(self.delay, self._fire)

    def current(self) -> None:
        """Called before the data path reads the tables: O(1) unless a rebuild is due
        and its timer has not run yet."""
        if self.dirty and (self._timer is None or not self._started
                           or self._timer.time() >= self._due):
            self._build()

    def _fire(self) -> None:
        self._timer_pending = False
        if self.dirty:
            try:
                self._build()
            except Exception:  # keep serving what was built; the next mark retries
                log.exception("rebuilding the %s failed", self.name)

    def _build(self) -> None:
        self.dirty = False
        self.builds += 1
        self._build_fn()
        for fn in self._listeners:
            fn()
