"""Authorization of every request: the authorizer chain and its verdict.

    request -> Attributes -> MastersAuthorizer -> NodeAuthorizer -> RBACAuthorizer
                               (system:masters)    (system:node:N)    (bindings)

The first authorizer with an opinion decides; when none allows, the request is
refused with Kubernetes' message (``errors.Forbidden``, gRPC PERMISSION_DENIED),
including the reason the node authorizer gave, if any. Like
``--authorization-mode=Node,RBAC`` plus the privileged system:masters group.

A node's request refused by the graph is checked once more after the watch
cache has caught up with storage: a pod bound a moment ago may not be in the
graph yet (the mesh CA has always done this).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from apiserver.authz.attributes import (
    Attributes,
    Decision,
    Verdict,
    allow,
    deny,
    forbidden_message,
    no_opinion,
)
from apiserver.authz.nodes import node_name
from shoal import errors

MASTERS_GROUP = "system:masters"


class Authorizer(Protocol):
    def authorize(self, attrs: Attributes) -> Decision: ...


class MastersAuthorizer:
    """system:masters may do anything (the admin certificate and the control plane)."""

    def authorize(self, attrs: Attributes) -> Decision:
        if MASTERS_GROUP in attrs.groups:
            return allow(f"member of {MASTERS_GROUP}")
        return no_opinion()


class AlwaysAllow:
    """For servers run without TLS (tests of storage only): no identities at all."""

    def authorize(self, attrs: Attributes) -> Decision:
        return allow("authorization is off")


class Chain:
    def __init__(self, authorizers: Sequence[Authorizer]) -> None:
        self.authorizers = tuple(authorizers)

    def authorize(self, attrs: Attributes) -> Decision:
        reasons = []
        for a in self.authorizers:
            d = a.authorize(attrs)
            if d.verdict is not Verdict.NO_OPINION:
                return d
            if d.reason:
                reasons.append(d.reason)
        return deny("; ".join(reasons))


class AccessControl:
    """Decide a request, or raise Forbidden. ``catch_up`` waits until the cache
    holds every write made so far (used once, for refused node requests)."""

    def __init__(self, authorizer: Authorizer,
                 catch_up: Callable[[], Awaitable[object]] | None = None) -> None:
        self.authorizer = authorizer
        self.catch_up = catch_up

    async def decide(self, attrs: Attributes) -> Decision:
        d = self.authorizer.authorize(attrs)
        if not d.allowed and self.catch_up is not None and node_name(
                attrs.user, attrs.groups) is not None:
            await self.catch_up()
            d = self.authorizer.authorize(attrs)
        return d

    async def check(self, attrs: Attributes) -> Decision:
        d = await self.decide(attrs)
        if not d.allowed:
            raise errors.Forbidden(forbidden_message(attrs, d.reason), kind=attrs.resource,
                                   name=attrs.name, group=attrs.group)
        return d
