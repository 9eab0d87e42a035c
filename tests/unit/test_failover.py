"""The client's apiserver failover policy (shoal.failover), on a fake clock."""

from __future__ import annotations

import pytest

from shoal import errors
from shoal.backoff import Backoff
from shoal.failover import Failover

A, B, C = "10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(*servers: str, clock: Clock | None = None) -> Failover:
    return Failover(servers, clock=clock or Clock(),
                    backoff=Backoff(base=1.0, cap=8.0, jitter=0.0))


@pytest.mark.parametrize(("failures", "current", "delay"), [
    ([], A, 0.0),
    ([A], B, 0.0),                 # the next server, at once
    ([A, B], C, 0.0),
    ([A, B, C], A, 1.0),           # a whole round failed: back off
    ([A, B, C, A, B, C], A, 2.0),  # and longer each round
    ([A, A, A], B, 0.0),           # concurrent reports of one outage move once
    ([A, C], B, 0.0),              # a stale report about C (not current) is ignored
])
def test_rotation_and_backoff(failures: list[str], current: str, delay: float) -> None:
    f = policy(A, B, C)
    for server in failures:
        f.failed(server)
    assert (f.current(), f.delay()) == (current, delay)


def test_delay_runs_down_with_the_clock() -> None:
    clock = Clock()
    f = policy(A, B, clock=clock)
    f.failed(A)
    f.failed(B)
    assert f.delay() == 1.0
    clock.now += 0.75
    assert f.delay() == pytest.approx(0.25)
    clock.now += 1.0
    assert f.delay() == 0.0


def test_success_ends_the_round_and_resets_backoff() -> None:
    f = policy(A, B)
    for s in (A, B, A, B):
        f.failed(s)
    assert f.delay() == 2.0
    f.succeeded(A)
    assert (f.current(), f.delay()) == (A, 0.0)
    f.failed(A)
    assert (f.current(), f.delay()) == (B, 0.0)  # a new round: no wait
    f.failed(B)
    assert f.delay() == 1.0                      # back-off starts again from base


def test_success_of_a_server_left_behind_changes_nothing() -> None:
    f = policy(A, B)
    f.failed(A)
    f.succeeded(A)  # a call that started on A before the move
    assert f.current() == B


def test_a_single_server_backs_off_alone() -> None:
    f = policy(A)
    assert f.failed(A) == A
    assert f.delay() == 1.0


def test_no_servers_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match="at least one apiserver"):
        Failover(())
