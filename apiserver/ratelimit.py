"""Per-user rate limits: one token bucket per authenticated user.

Kubernetes shares its apiserver out with API Priority and Fairness (priority
levels and fair queues). Shoal keeps a simpler rule with the same intent:

- Each user (the CN of their certificate, or a service account) has a bucket
  of ``burst`` tokens refilled at ``qps`` tokens a second; a call takes one.
- Users in an *exempt* group (default ``system:masters``: the admin, the
  in-process controllers and scheduler) are never limited, like kube's
  ``exempt`` priority level.
- Nodes (``system:nodes``) have a class of their own with a larger bucket,
  like kube's ``system-nodes`` priority level: a busy user cannot starve the
  kubelets' status updates, and a node is still limited.

A call over the limit is refused before it does anything:
``errors.TooManyRequests`` (gRPC ``RESOURCE_EXHAUSTED``) whose ``retry_after``
is when the bucket will hold a token again (whole seconds, at least 1).
Long-running calls (Watch, logs, exec) take one token when they start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from apiserver.authz.nodes import NODE_GROUP
from apiserver.pki import Identity
from shoal import errors

DEFAULT_EXEMPT_GROUPS = ("system:masters",)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` a second on ``clock``."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self) -> float:
        """Take a token: 0.0 when taken, else the seconds until one is there
        (nothing taken then)."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst


@dataclass(frozen=True)
class RateLimits:
    """``qps`` 0 turns limiting off."""

    qps: float = 50.0
    burst: int = 100
    node_qps: float = 200.0
    node_burst: int = 400
    exempt_groups: tuple[str, ...] = DEFAULT_EXEMPT_GROUPS


class RateLimiter:
    def __init__(self, limits: RateLimits, *, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = 10_000) -> None:
        self.limits = limits
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.limits.qps > 0

    def _bucket(self, ident: Identity) -> TokenBucket:
        bucket = self._buckets.get(ident.user)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                # Forget users whose bucket is full again: they lose nothing.
                self._buckets = {u: b for u, b in self._buckets.items() if not b.full()}
            node = NODE_GROUP in ident.groups
            bucket = TokenBucket(
                rate=self.limits.node_qps if node else self.limits.qps,
                burst=self.limits.node_burst if node else self.limits.burst,
                clock=self.clock)
            self._buckets[ident.user] = bucket
        return bucket

    def check(self, ident: Identity) -> None:
        """Take one of ``ident``'s tokens, or raise ``TooManyRequests``."""
        if not self.enabled or any(g in self.limits.exempt_groups for g in ident.groups):
            return
        bucket = self._bucket(ident)
        wait = bucket.take()
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise errors.TooManyRequests(
                f'too many requests from user "{ident.user}" (limit {bucket.rate:g}/s, '
                f"burst {bucket.burst}); retry after {seconds}s", retry_after=seconds)
