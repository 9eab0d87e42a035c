"""The L7 engine's pool of idle upstream connections (meshagent.l7.engine.UpstreamPool).

Found by the soak (tests/chaos/test_soak.py): with pods churning, each
meshagent kept FDs of keep-alive connections to endpoints that had gone away,
because an expired idle connection was closed only when its own key (mode,
source, endpoint) was taken again, which never happens for a deleted pod. The
pool now sweeps every key.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

import pytest

from meshagent.l7.engine import Upstream, UpstreamPool

IDLE = 60.0


@dataclass
class FakeUpstream:
    key: tuple[str, ...]
    usable: bool = True
    idle_since: float = field(default_factory=time.monotonic)
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        self.usable = False


def _up(endpoint: str, **kw: object) -> FakeUpstream:
    return FakeUpstream(key=("tcp", "spiffe://a", endpoint, "8080"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("idle_for", "peer_closed", "kept"), [
    (0.0, False, True),           # fresh: kept for reuse
    (IDLE / 2, False, True),
    (IDLE + 1, False, False),     # past the idle timeout
    (0.0, True, False),           # its peer closed it (the pod went away)
])
def test_sweep_closes_what_take_would_never_reach(idle_for: float, peer_closed: bool,
                                                  kept: bool) -> None:
    pool = UpstreamPool(idle_timeout=IDLE)
    up = _up("10.244.1.5")
    pool.give_back(cast(Upstream, up))
    up.idle_since -= idle_for
    up.usable = not peer_closed
    closed = pool.sweep()
    assert (pool.idle(), closed, up.closed) == ((1, 0, False) if kept else (0, 1, True))


def test_sweep_covers_every_key_and_keeps_the_fresh() -> None:
    pool = UpstreamPool(idle_timeout=IDLE)
    gone = [_up(f"10.244.1.{i}") for i in range(5)]  # endpoints never used again
    fresh = _up("10.244.2.9")
    for up in [*gone, fresh]:
        pool.give_back(cast(Upstream, up))
    for up in gone:
        up.idle_since -= IDLE + 1
    assert pool.sweep() == 5
    assert all(up.closed for up in gone) and not fresh.closed
    assert pool.take(fresh.key) is cast(Upstream, fresh)


def test_a_sweep_is_scheduled_while_connections_are_idle_and_cancelled_on_close() -> None:
    async def main() -> None:
        pool = UpstreamPool(idle_timeout=IDLE)
        assert pool._sweeper is None
        pool.give_back(cast(Upstream, _up("10.244.1.5")))
        timer = pool._sweeper
        assert timer is not None
        assert timer.when() - asyncio.get_running_loop().time() <= IDLE / 4
        pool.give_back(cast(Upstream, _up("10.244.1.6")))
        assert pool._sweeper is timer  # one timer, not one per connection
        pool.close()
        assert pool._sweeper is None and timer.cancelled() and pool.idle() == 0

    asyncio.run(main())
