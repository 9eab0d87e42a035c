"""Service-account tokens for the pods on this node: requested, cached, rotated.

The kubelet's token manager, in small:

    get(key) --cached and fresh?--> the cached token
             --otherwise--> TokenRequest (bound to the pod) --> cache --> token
             --request fails, the cached one still valid--> the cached token (logged)

A token is *fresh* until 80 % of its lifetime has passed (or 24 h, whichever is
sooner), so the file in the pod is rewritten well before it expires; the pod
sync calls ``get`` on every sync (at least every resync period), which is what
rotates it. ``forget(pod_uid)`` drops a pod's tokens when it is torn down.
Time is passed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shoal import errors

log = logging.getLogger(__name__)

REFRESH_FRACTION = 0.8
MAX_AGE = 24 * 3600.0


@dataclass(frozen=True)
class TokenKey:
    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str
    audience: str  # "" = the apiserver's own
    expiration_seconds: int


@dataclass(frozen=True)
class IssuedToken:
    token: str
    issued_at: float
    expires_at: float


def needs_refresh(token: IssuedToken, *, now: float) -> bool:
    """Kubernetes' rule: older than 80 % of its lifetime, or than 24 h."""
    age = now - token.issued_at
    lifetime = token.expires_at - token.issued_at
    return now >= token.expires_at or age >= REFRESH_FRACTION * lifetime or age >= MAX_AGE


# (key) -> (token, expiry as a unix time)
Requester = Callable[[TokenKey], Awaitable[tuple[str, float]]]


class ServiceAccountTokens:
    def __init__(self, *, request: Requester, ca_pem: bytes,
                 clock: Callable[[], float] = time.time) -> None:
        self.request = request
        # The cluster CA, written beside the token as ca.crt.
        self.ca_pem = ca_pem
        self.clock = clock
        self._tokens: dict[TokenKey, IssuedToken] = {}

    async def get(self, key: TokenKey) -> str:
        """A valid token for ``key``. ``errors.ShoalError`` when none can be had."""
        now = self.clock()
        cached = self._tokens.get(key)
        if cached is not None and not needs_refresh(cached, now=now):
            return cached.token
        try:
            token, expires_at = await self.request(key)
        except errors.ShoalError as e:
            if cached is not None and now < cached.expires_at:
                log.warning("token for %s/%s (pod %s): refresh failed (%s); keeping the "
                            "current one until it expires", key.namespace,
                            key.service_account, key.pod_name, e)
                return cached.token
            raise
        self._tokens[key] = IssuedToken(token=token, issued_at=now, expires_at=expires_at)
        return token

    def forget(self, pod_uid: str) -> None:
        for key in [k for k in self._tokens if k.pod_uid == pod_uid]:
            del self._tokens[key]
