"""Restart back-off per container, as the kubelet does it.

The first restart of a container is immediate; the next waits 10 s, then 20 s,
40 s ... capped at 5 minutes. While a container waits, its status says
``CrashLoopBackOff`` with a message a person can read. A container that stays
up for twice the cap (10 minutes) starts again from no delay.

Pure bookkeeping: time is passed in, nothing sleeps here.
"""

from __future__ import annotations

from dataclasses import dataclass

INITIAL = 10.0
CAP = 300.0


@dataclass
class _Entry:
    delay: float
    last_restart: float


@dataclass(frozen=True)
class Verdict:
    """May the container restart now? If not, how long to wait, and why."""

    wait: float
    reason: str = ""
    message: str = ""

    @property
    def go(self) -> bool:
        return self.wait <= 0


class RestartTracker:
    def __init__(self, *, initial: float = INITIAL, cap: float = CAP) -> None:
        self.initial = initial
        self.cap = cap
        self._entries: dict[str, _Entry] = {}

    def check(self, key: str, *, finished_at: float, now: float) -> Verdict:
        """Verdict for restarting ``key`` whose last instance ended at ``finished_at``."""
        entry = self._entries.get(key)
        if entry is None:
            return Verdict(0.0)
        if now - entry.last_restart > 2 * self.cap:
            del self._entries[key]
            return Verdict(0.0)
        ready_at = max(finished_at, entry.last_restart) + entry.delay
        if now >= ready_at:
            return Verdict(0.0)
        return Verdict(ready_at - now, "CrashLoopBackOff",
                       f"back-off {int(entry.delay)}s restarting failed container")

    def restarted(self, key: str, *, now: float) -> None:
        """Record a restart issued now; the next one waits longer."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(self.initial, now)
        else:
            entry.delay = min(self.cap, entry.delay * 2)
            entry.last_restart = now

    def delay(self, key: str) -> float:
        entry = self._entries.get(key)
        return entry.delay if entry else 0.0

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def forget_pod(self, uid: str) -> None:
        for key in [k for k in self._entries if k.startswith(uid + "/")]:
            del self._entries[key]


def key(uid: str, container: str) -> str:
    return f"{uid}/{container}"
