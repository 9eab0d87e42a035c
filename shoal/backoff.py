"""Exponential back-off with jitter and a cap, reset on success.

One policy, used wherever Shoal retries: per work-queue key, per watch
reconnect, per storage reconnect. Time is not read here; callers sleep the
returned delay with whatever clock they use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``next()`` gives base, base*factor, ... up to cap, each with +-jitter."""

    base: float = 0.2
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    _attempt: int = field(default=0, init=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next(self) -> float:
        raw = min(self.cap, self.base * self.factor**self._attempt)
        self._attempt += 1
        if self.jitter:
            raw *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(raw, self.cap))

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt
