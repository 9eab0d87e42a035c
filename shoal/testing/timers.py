"""A scriptable stand-in for an event loop's clock and timers (``time()`` and
``call_later()``, as ``meshagent.rebuilding.Timer`` asks): time moves only when the
test says, and due callbacks run only when it says so."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    callback: Callable[[], None] = field(compare=False)


class FakeTimer:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._pending: list[_Pending] = []
        self._seq = 0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None], /) -> object:
        self._seq += 1
        entry = _Pending(self.now + delay, self._seq, callback)
        self._pending.append(entry)
        return entry

    @property
    def pending(self) -> int:
        """How many callbacks wait to run."""
        return len(self._pending)

    def advance(self, seconds: float, *, run: bool = True) -> int:
        """Move the clock; with ``run``, run what is due by then (in due order).
        Returns how many callbacks ran."""
        self.now += seconds
        return self.run_due() if run else 0

    def run_due(self) -> int:
        due = sorted(p for p in self._pending if p.due <= self.now)
        self._pending = [p for p in self._pending if p.due > self.now]
        for p in due:
            p.callback()
        return len(due)
