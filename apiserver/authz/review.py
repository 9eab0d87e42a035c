"""``shoal.authorization.v1.Authorization``: "may this user do that?"

Kubernetes' SelfSubjectAccessReview: any authenticated caller may ask about
itself. Asking about someone else (``shoal auth can-i --as``) needs the right to
impersonate them, as ``kubectl --as`` does: verb ``impersonate`` on ``users``
(or, for a service account, on ``serviceaccounts`` in its namespace), and on
``groups`` for each group asked about. The answer comes from the same
authorizer chain every request goes through.
"""

from __future__ import annotations

from typing import Any

import grpc

from apiserver.authz.rbac import SERVICE_ACCOUNT_PREFIX
from apiserver.metrics import Metrics
from apiserver.pki import Identity
from apiserver.rpc import Authenticator, Guard, attributes, current_caller, passthrough, unary
from shoal import errors
from shoal.api.authorization.v1 import authorization_pb2 as pb

SERVICE = "shoal.authorization.v1.Authorization"


class AccessReviewService:
    def __init__(self, *, metrics: Metrics, authn: Authenticator, guard: Guard) -> None:
        self.metrics = metrics
        self.authn = authn
        self.guard = guard

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "AccessReview": grpc.unary_unary_rpc_method_handler(
                self.review, request_deserializer=pb.AccessReviewRequest.FromString,
                response_serializer=passthrough),
        })

    async def _impersonate(self, caller: Identity, user: str, groups: list[str]) -> None:
        checks = []
        if user.startswith(SERVICE_ACCOUNT_PREFIX) and user.count(":") == 3:
            _, _, ns, name = user.split(":")
            checks.append(attributes(caller, "impersonate", resource="serviceaccounts",
                                     namespace=ns, name=name))
        else:
            checks.append(attributes(caller, "impersonate", resource="users", name=user))
        checks += [attributes(caller, "impersonate", resource="groups", name=g)
                   for g in groups]
        for attrs in checks:
            await self.guard.access.check(attrs)

    @unary("AccessReview")
    async def review(self, request: pb.AccessReviewRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.AccessReviewResponse:
        caller = current_caller()
        if not request.verb:
            raise errors.BadRequest("an access review needs a verb")
        if not request.resource:
            raise errors.BadRequest("an access review needs a resource")
        subject = caller
        if request.groups and not request.user:
            raise errors.BadRequest("asking as groups needs a user too (--as with --as-group)")
        if request.user:
            await self._impersonate(caller, request.user, list(request.groups))
            subject = Identity(user=request.user, groups=tuple(request.groups))
        attrs = attributes(subject, request.verb, group=request.group,
                           resource=request.resource, subresource=request.subresource,
                           namespace=request.namespace, name=request.name)
        decision = await self.guard.access.decide(attrs)
        return pb.AccessReviewResponse(allowed=decision.allowed, reason=decision.reason,
                                       user=subject.user, groups=list(attrs.groups))
