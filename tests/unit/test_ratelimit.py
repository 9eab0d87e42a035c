"""Per-user token buckets (apiserver.ratelimit) on a fake clock."""

from __future__ import annotations

import pytest

from apiserver.pki import Identity
from apiserver.ratelimit import RateLimiter, RateLimits, TokenBucket
from shoal import errors


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ALICE = Identity("alice", ("devs",))
BOB = Identity("bob", ())
ADMIN = Identity("admin", ("system:masters",))
NODE = Identity("system:node:n1", ("system:nodes",))


@pytest.mark.parametrize(("rate", "burst", "steps", "expected"), [
    # A full bucket gives `burst` calls at once, then refuses.
    (1.0, 3, [0, 0, 0, 0], [0.0, 0.0, 0.0, 1.0]),
    # Refilled at `rate` a second, never above `burst`.
    (2.0, 2, [0, 0, 0, 0.5, 0, 100, 0, 0, 0], [0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.5, 0.5]),
    # The wait is the time to the next whole token.
    (4.0, 1, [0, 0.1, 0.15], [0.0, 0.15, 0.0]),
])
def test_token_bucket(rate: float, burst: int, steps: list[float],
                      expected: list[float]) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
    got = []
    for step in steps:
        clock.now += step
        got.append(round(bucket.take(), 6))
    assert got == expected


def test_refused_take_takes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.take() == 0.0
    for _ in range(5):
        assert bucket.take() > 0
    clock.now += 1.0
    assert bucket.take() == 0.0


def test_bucket_is_per_user_and_says_when_to_retry() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(qps=0.5, burst=2), clock=clock)
    limiter.check(ALICE)
    limiter.check(ALICE)
    with pytest.raises(errors.TooManyRequests, match=r'user "alice".*retry after 2s') as info:
        limiter.check(ALICE)
    assert info.value.retry_after == 2
    limiter.check(BOB)  # bob has his own bucket
    limiter.check(BOB)
    clock.now += 2.0
    limiter.check(ALICE)


def test_exempt_groups_and_the_node_class() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(qps=1, burst=1, node_qps=1, node_burst=5), clock=clock)
    for _ in range(100):
        limiter.check(ADMIN)
    for _ in range(5):
        limiter.check(NODE)
    with pytest.raises(errors.TooManyRequests):
        limiter.check(NODE)
    limiter.check(ALICE)
    with pytest.raises(errors.TooManyRequests):
        limiter.check(ALICE)


def test_off_when_qps_is_zero() -> None:
    limiter = RateLimiter(RateLimits(qps=0), clock=FakeClock())
    for _ in range(1000):
        limiter.check(ALICE)


def test_full_buckets_are_forgotten_when_there_are_too_many() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(qps=1, burst=1), clock=clock, max_buckets=2)
    limiter.check(Identity("u1", ()))
    limiter.check(Identity("u2", ()))
    clock.now += 5  # both full again
    limiter.check(Identity("u3", ()))
    assert len(limiter._buckets) == 1
    with pytest.raises(errors.TooManyRequests):  # u3 still remembered as empty
        limiter.check(Identity("u3", ()))
