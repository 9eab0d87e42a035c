"""The event loop a data-path daemon runs on.

The mesh agent and the gateway move every request through Python callbacks, and
uvloop's transports (libuv, Cython) make each of those steps cheaper than
asyncio's selector loop: the agents spend about an eighth less CPU per request
(BENCHMARKS.md). asyncio's own loop stays selectable (``--event-loop asyncio``),
and the in-process tests run the agents on it.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

LOOPS = ("uvloop", "asyncio")
DEFAULT = "uvloop"


def run(main: Coroutine[Any, Any, None], loop: str = DEFAULT) -> None:
    """``asyncio.run(main)`` on the named event loop."""
    if loop == "uvloop":
        import uvloop  # only the daemons that choose it import it

        uvloop.run(main)
    elif loop == "asyncio":
        asyncio.run(main)
    else:
        main.close()
        raise ValueError(f"event loop {loop!r}: want one of {', '.join(LOOPS)}")


# Buckets for pauses of the event loop: a data-path request takes about 0.3 ms of
# an agent's time, so a pause of a millisecond or more is a latency spike.
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class PauseMetrics:
    """How long the event loop was held, and by the garbage collector, as metrics.

    - ``shoal_event_loop_lag_seconds``: how late a timer set ``interval`` ahead
      fired: a callback that holds the loop delays every connection by as much.
    - ``python_gc_pause_seconds{generation}``: each collection's duration (Go's
      ``go_gc_duration_seconds`` for Python).

    The lag is sampled: one timer every ``interval`` (100 ms), so a hold of the
    loop shows with the chance that it covers a sample's due time. Every 10 ms
    would catch more, but each wakeup of an idle agent costs about 0.15 ms of
    CPU: 1.5 % of a core per idle agent, a disturbance of its own on a small node.
    """

    def __init__(self, registry: CollectorRegistry, *, interval: float = 0.1) -> None:
        self.interval = interval
        self.lag = Histogram("shoal_event_loop_lag_seconds",
                             "how late the event loop ran a timer (a callback held it)",
                             buckets=PAUSE_BUCKETS, registry=registry)
        self.gc = Histogram("python_gc_pause_seconds",
                            "how long each garbage collection held the process",
                            ("generation",), buckets=PAUSE_BUCKETS, registry=registry)
        self._gc_children = [self.gc.labels(generation=str(g)) for g in range(3)]
        self._gc_start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lag.observe(max(0.0, now - self._due))
        self._due = now + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self._gc_children[info["generation"]].observe(time.perf_counter() - self._gc_start)
