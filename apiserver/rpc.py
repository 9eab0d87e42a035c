"""What every gRPC service of the apiserver shares: error mapping, metrics,
authentication of the caller.

- A Shoal error becomes its gRPC status code plus a ``shoal.meta.v1.Status`` in the
  ``shoal-status-bin`` trailer (the SDK turns it back into the same class).
- Callers are authenticated by their TLS client certificate, verified against
  the cluster CA during the handshake: CN is the user, O entries the groups.
  Only the join service accepts callers without one (they bring a token).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from apiserver.metrics import Metrics
from apiserver.pki import Identity, identity_of
from shoal import errors

log = logging.getLogger(__name__)

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


async def abort_with(context: grpc.aio.ServicerContext[Any, Any],
                     error: errors.ShoalError) -> None:
    await context.abort(
        grpc_code(error), error.message,
        trailing_metadata=((STATUS_TRAILER, error.status().SerializeToString()),))


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
        try:
            props = context.auth_context()
        except Exception:  # no TLS context at all
            return None
        pems = props.get("x509_pem_cert") if props else None
        if not pems:
            return self._bearer(context)
        pem = next(iter(pems))
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


class Service(Protocol):
    metrics: Metrics
    authn: Authenticator


_S = TypeVar("_S", bound=Service)
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
Unary = Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]


def resource_of(request: Any) -> str:
    obj = getattr(request, "object", None)
    if obj is not None and obj.type_url:
        return str(obj.type_url.rsplit(".", 1)[-1]).lower()
    res = getattr(request, "resource", "")
    return str(res) or "-"


def unary(method: str, *, authenticate: bool = True
          ) -> Callable[[Unary[_S, _Req, _Resp]], Unary[_S, _Req, _Resp]]:
    """Authentication, error mapping and metrics around one unary method."""

    def wrap(fn: Unary[_S, _Req, _Resp]) -> Unary[_S, _Req, _Resp]:
        @functools.wraps(fn)
        async def handler(self: _S, request: _Req,
                          context: grpc.aio.ServicerContext[Any, Any]) -> _Resp:
            start = time.perf_counter()
            resource = resource_of(request)
            code = "OK"
            try:
                if authenticate:
                    self.authn.require(context)
                return await fn(self, request, context)
            except errors.ShoalError as e:
                code = grpc_code(e).name
                await abort_with(context, e)
                raise  # pragma: no cover - abort raises
            except Exception as e:
                if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
                    raise
                code = "INTERNAL"
                log.exception("%s failed", method)
                await abort_with(context, errors.InternalError(f"internal error: {e}"))
                raise  # pragma: no cover
            finally:
                self.metrics.requests.labels(method, resource, code).inc()
                self.metrics.latency.labels(method, resource).observe(
                    time.perf_counter() - start)

        return handler

    return wrap


def passthrough(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


