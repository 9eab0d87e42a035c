"""Which apiserver a client talks to, and when it moves to the next one.

A client config lists several apiservers (``servers:``; Kubernetes' kubeconfig
has one URL per cluster and puts a load balancer in front of several
apiservers, Shoal's clients take the list themselves). The SDK sends every call
to the *current* server; when that server is unavailable (the connection is
lost or refused, or it answers ``UNAVAILABLE``) the caller reports it and the
policy moves to the next server in the list::

    current = servers[i] --failed(servers[i])--> current = servers[i+1 mod n]
         ^                                            |
         +------- succeeded(s): round over, back-off reset

Within a round (the failures since the last success) moving on costs no wait:
the next server is tried at once. When every server has failed in one round,
the next try waits a back-off delay (exponential with jitter and a cap, see
:class:`shoal.backoff.Backoff`), and a new round starts.

Contract:
- Pure: no I/O, and time comes from ``clock``; callers sleep :meth:`delay`.
- ``failed(s)`` for a server that is no longer current (several calls failed
  on the same server at once) does not move again: each outage moves once.
- A single server never rotates; its delays are the back-off alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal import errors
from shoal.backoff import Backoff


@dataclass
class Failover:
    servers: tuple[str, ...]
    clock: Callable[[], float] = time.monotonic
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.2, cap=5.0))
    _index: int = field(default=0, init=False)
    _round: set[str] = field(default_factory=set, init=False)
    _not_before: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not self.servers:
            raise errors.BadRequest("a client needs at least one apiserver")

    def current(self) -> str:
        return self.servers[self._index]

    def delay(self) -> float:
        """Seconds to wait before the next try of :meth:`current` (0 = now)."""
        return max(0.0, self._not_before - self.clock())

    def failed(self, server: str) -> str:
        """``server`` was unavailable; returns the server to try next."""
        if server != self.current():
            return self.current()  # already moved on for this outage
        self._round.add(server)
        self._index = (self._index + 1) % len(self.servers)
        if len(self._round) >= len(set(self.servers)):
            self._not_before = self.clock() + self.backoff.next()
            self._round.clear()
        return self.current()

    def succeeded(self, server: str) -> None:
        """A call through ``server`` worked: the round is over."""
        if server == self.current():
            self._round.clear()
            self.backoff.reset()
            self._not_before = 0.0
