"""What every gRPC service of the apiserver shares: error mapping, metrics,
authentication of the caller.

- A Shoal error becomes its gRPC status code plus a ``shoal.meta.v1.Status`` in the
  ``shoal-status-bin`` trailer (the SDK turns it back into the same class).
- Callers are authenticated by their TLS client certificate, verified against
  the cluster CA during the handshake: CN is the user, O entries the groups.
  Only the join service accepts callers without one (they bring a token).
- Every call is then authorized (``Guard``: the method's ``describe`` turns the
  request into authorizer attributes, ``apiserver.authz`` decides) and audited
  (``apiserver.authz.audit``), unary and streaming calls alike (``Call``).
- Once the caller is known, their rate limit is checked (``apiserver.ratelimit``):
  over it, ``TooManyRequests`` with a ``retry-after`` trailer (seconds).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

from apiserver.authz.access import AccessControl
from apiserver.authz.attributes import Attributes, forbidden_message
from apiserver.authz.audit import AuditLog, AuditRecord
from apiserver.authz.escalation import EscalationCheck
from apiserver.metrics import Metrics
from apiserver.pki import Identity, identity_of
from apiserver.ratelimit import RateLimiter
from shoal import errors
from shoal.nodeaccess import peer_certificate_pem

log = logging.getLogger(__name__)

# Who the current call is, once ``Call.admit`` has authenticated it.
_CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "shoal_rpc_caller", default=None)


def current_caller() -> Identity:
    """The authenticated caller of the RPC being handled (set by :func:`unary`)."""
    ident = _CALLER.get()
    if ident is None:
        raise errors.InternalError("no authenticated caller: the method is not "
                                   "wrapped by @unary with authentication")
    return ident

STATUS_TRAILER = "shoal-status-bin"

GRPC_CODES: dict[type[errors.ShoalError], grpc.StatusCode] = {
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Invalid: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    errors.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.MethodNotAllowed: grpc.StatusCode.UNIMPLEMENTED,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.Expired: grpc.StatusCode.OUT_OF_RANGE,
    errors.RequestEntityTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooManyRequests: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}


def grpc_code(error: errors.ShoalError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = GRPC_CODES.get(cls)  # type: ignore[call-overload,unused-ignore]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


RETRY_AFTER_TRAILER = "retry-after"


async def abort_with(context: grpc.aio.ServicerContext[Any, Any],
                     error: errors.ShoalError) -> None:
    """End the call with ``error``: its gRPC code and message, the Status in the
    ``shoal-status-bin`` trailer and, for a temporary error, ``retry-after``
    (whole seconds, like HTTP's Retry-After header)."""
    trailers: tuple[tuple[str, str | bytes], ...] = (
        (STATUS_TRAILER, error.status().SerializeToString()),)
    if isinstance(error, errors.TemporaryError):
        seconds = max(1, math.ceil(error.retry_after))
        trailers += ((RETRY_AFTER_TRAILER, str(seconds)),)
    await context.abort(grpc_code(error), error.message, trailing_metadata=trailers)


class TokenAuthenticator(Protocol):
    def authenticate(self, token: str) -> Identity:
        """The identity a bearer token stands for; ``errors.Unauthorized`` saying why not."""


class Authenticator:
    """Who is calling: the identity in the caller's verified client certificate, else
    (when ``tokens`` is set) the bearer token in the ``authorization`` metadata."""

    def __init__(self, *, cache_size: int = 4096,
                 tokens: TokenAuthenticator | None = None) -> None:
        self._cache: dict[bytes, Identity] = {}
        self._cache_size = cache_size
        self.tokens = tokens

    def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
        pem = peer_certificate_pem(context)
        if pem is None:
            return self._bearer(context)
        ident = self._cache.get(pem)
        if ident is None:
            ident = identity_of(pem)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[pem] = ident
        return ident

    def _bearer(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
        """A bearer token's identity; None when the call carries none. A token that
        does not authenticate is refused with the reason (never treated as anonymous)."""
        if self.tokens is None:
            return None
        for key, value in context.invocation_metadata() or ():
            if key != "authorization":
                continue
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.Unauthorized("the authorization metadata must be "
                                          "`Bearer <token>`")
            return self.tokens.authenticate(token.strip())
        return None

    def require(self, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        ident = self.identify(context)
        if ident is None or not ident.user:
            raise errors.Unauthorized(
                "a client certificate signed by the cluster CA (or a service-account "
                "bearer token) is required")
        return ident


AUTHENTICATED_GROUP = "system:authenticated"


class Guard:
    """Authorization and audit, one per server, shared by every service."""

    def __init__(self, *, access: AccessControl, audit: AuditLog | None = None,
                 render: Callable[[Any], Any] | None = None,
                 escalation: EscalationCheck | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.access = access
        # Per-user rate limits (apiserver.ratelimit), checked once the caller is known.
        self.limiter = limiter
        self.audit = audit
        # RBAC writes that would grant more than the caller holds are refused.
        self.escalation = escalation
        # The JSON form of a request, for audit events at level Request.
        self.render = render


class Service(Protocol):
    metrics: Metrics
    authn: Authenticator


_S = TypeVar("_S", bound=Service)
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Unary = Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]
# What a request asks to do, given the caller; None: any authenticated caller may.
Describe = Callable[[Any, Any, Identity], Attributes | None]
# Checks after authorization that need the request's content (RBAC escalation);
# raise to refuse.
Admit = Callable[[Any, Any, Identity], Awaitable[None]]


def attributes(ident: Identity, verb: str, *, group: str = "", resource: str = "",
               subresource: str = "", namespace: str = "", name: str = "") -> Attributes:
    """Authorizer attributes for an authenticated caller (who is in system:authenticated)."""
    groups = ident.groups if AUTHENTICATED_GROUP in ident.groups else (
        *ident.groups, AUTHENTICATED_GROUP)
    return Attributes(user=ident.user, groups=groups, verb=verb, group=group,
                      resource=resource, subresource=subresource, namespace=namespace,
                      name=name)


class Call:
    """One call's authentication, authorization, metrics and audit record.

    ``admit`` raises (Unauthorized, Forbidden, BadRequest) before the handler
    does anything; ``finish`` is idempotent and writes the ResponseComplete
    audit line and the request metrics.
    """

    def __init__(self, service: Any, method: str, request: Any = None) -> None:
        self.service = service
        self.method = method
        self.resource = resource_of(request) if request is not None else "-"
        self.start = time.perf_counter()
        self.guard: Guard | None = getattr(service, "guard", None)
        audit = self.guard.audit if self.guard is not None else None
        self.record: AuditRecord | None = audit.begin(method) if audit else None
        self.ident: Identity | None = None
        self.attrs: Attributes | None = None
        self._done = False
        self._counted = False

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any], request: Any,
                    describe: Describe | None, *, authenticate: bool = True,
                    authorize: bool = True, admit: Admit | None = None) -> Identity | None:
        authn: Authenticator = self.service.authn
        if self.record is not None and self.guard is not None and self.guard.render:
            render = self.guard.render
            self.record.request_object = lambda: render(request)
        self.ident = authn.require(context) if authenticate else None
        _CALLER.set(self.ident)
        if self.ident is not None and self.record is not None:
            self.record.user, self.record.groups = self.ident.user, self.ident.groups
        if (self.ident is not None and self.guard is not None
                and self.guard.limiter is not None):
            self.guard.limiter.check(self.ident)
        if describe is None:
            return self.ident
        self.attrs = describe(self.service, request,
                              self.ident or Identity("system:anonymous", ()))
        if self.record is not None:
            self.record.attrs = self.attrs
        if self.attrs is None or not authorize:
            return self.ident
        if self.guard is None:
            raise errors.InternalError(f"{self.method}: no authorizer is configured")
        decision = await self.guard.access.decide(self.attrs)
        if self.record is not None:
            self.record.decision = "allow" if decision.allowed else "forbid"
            self.record.reason = decision.reason
        if not decision.allowed:
            a = self.attrs
            log.info("%s: forbidden: user %r %s %s/%s %s/%s%s", self.method, a.user, a.verb,
                     a.group, a.full_resource, a.namespace, a.name,
                     f" ({decision.reason})" if decision.reason else "")
            raise errors.Forbidden(forbidden_message(a, decision.reason), kind=a.resource,
                                   name=a.name, group=a.group)
        if admit is not None and self.ident is not None:
            await admit(self.service, request, self.ident)
        return self.ident

    def started(self) -> None:
        """A stream was admitted: the ResponseStarted audit line."""
        if self.record is not None and self.guard is not None and self.guard.audit:
            self.guard.audit.write(self.record, stage="ResponseStarted", code="OK")

    def count(self, code: str = "OK") -> None:
        """The request metrics, once (a stream counts when it starts)."""
        if self._counted:
            return
        self._counted = True
        m: Metrics = self.service.metrics
        m.requests.labels(self.method, self.resource, code).inc()
        m.latency.labels(self.method, self.resource).observe(time.perf_counter() - self.start)

    def finish(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        code, message = "OK", ""
        if isinstance(error, errors.ShoalError):
            code, message = grpc_code(error).name, error.message
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
        elif error is not None:
            code, message = "INTERNAL", str(error)
        self.count(code)
        if self.record is not None and self.guard is not None and self.guard.audit:
            self.guard.audit.write(self.record, stage="ResponseComplete", code=code,
                                   message=message)


def resource_of(request: Any) -> str:
    obj = getattr(request, "object", None)
    if obj is not None and obj.type_url:
        return str(obj.type_url.rsplit(".", 1)[-1]).lower()
    res = getattr(request, "resource", "")
    return str(res) or "-"


def unary(method: str, *, authenticate: bool = True, describe: Describe | None = None,
          authorize: bool = True, admit: Admit | None = None
          ) -> Callable[[Unary[_S, _Req, _Resp]], Unary[_S, _Req, _Resp]]:
    """Authentication, authorization (``describe`` says what the request does;
    without one any authenticated caller may), ``admit`` (checks of the request's
    content once authorized), error mapping, metrics and audit around one unary
    method. ``authorize=False`` describes for the audit only."""

    def wrap(fn: Unary[_S, _Req, _Resp]) -> Unary[_S, _Req, _Resp]:
        @functools.wraps(fn)
        async def handler(self: _S, request: _Req,
                          context: grpc.aio.ServicerContext[Any, Any]) -> _Resp:
            call = Call(self, method, request)
            error: BaseException | None = None
            try:
                await call.admit(context, request, describe, authenticate=authenticate,
                                 authorize=authorize, admit=admit)
                return await fn(self, request, context)
            except errors.ShoalError as e:
                error = e
                await abort_with(context, e)
                raise  # pragma: no cover - abort raises
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
                    raise
                error = e
                log.exception("%s failed", method)
                await abort_with(context, errors.InternalError(f"internal error: {e}"))
                raise  # pragma: no cover
            finally:
                call.finish(error)

        return handler

    return wrap


def passthrough(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())




class _Undecodable:
    """What a request that does not decode becomes (the handler never sees it)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, or a deserializer's own check
            return _Undecodable(e)

    return decode


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], bad: _Undecodable) -> None:
    await abort_with(context, errors.BadRequest(f"cannot decode the request: {bad.error}"))


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.aio.ServerInterceptor


class DecodeRequests(_Interceptor):
    """A request message that does not decode is answered INVALID_ARGUMENT naming
    why, on every method (gRPC itself answers UNKNOWN, from an exception raised
    before any handler runs)."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _safe(handler.request_deserializer)
        if handler.request_streaming:
            behaviour = handler.stream_stream or handler.stream_unary
            wrapped = _checked_stream(behaviour)
            field = "stream_stream" if handler.stream_stream else "stream_unary"
        else:
            behaviour = handler.unary_stream or handler.unary_unary
            wrapped = _checked_unary(behaviour)
            field = "unary_stream" if handler.unary_stream else "unary_unary"
        return handler._replace(request_deserializer=decode, **{field: wrapped})


def _checked_unary(fn: Any) -> Any:
    if inspect.isasyncgenfunction(fn):
        async def gen(request: Any, context: Any) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            async for item in fn(request, context):
                yield item
        return gen

    async def call(request: Any, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(context, request)
        return await fn(request, context)
    return call


def _checked_stream(fn: Any) -> Any:
    async def checked(requests: Any, context: Any) -> Any:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await _refuse(context, request)
            yield request

    if inspect.isasyncgenfunction(fn):
        async def gen(requests: Any, context: Any) -> Any:
            async for item in fn(checked(requests, context), context):
                yield item
        return gen

    async def call(requests: Any, context: Any) -> Any:
        return await fn(checked(requests, context), context)
    return call
