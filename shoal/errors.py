"""Shoal's own errors, raised above the storage, gRPC and CRI boundaries.

Code above those boundaries catches these, never a ``grpc.StatusCode`` or an
etcd exception. Each error knows its Kubernetes-style ``reason`` and HTTP-like
``code``, and ``status()`` renders the ``shoal.meta.v1.Status`` body that the
apiserver sends and the SDK turns back into the same exception class.

Kinds of error:

- ``TemporaryError``: retry later (``Unavailable``, ``TooManyRequests``); carries
  ``retry_after`` seconds.
- everything else is permanent for the request as made.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shoal.api.meta.v1 import meta_pb2


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of an object."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""

    reason = "InternalError"
    code = 500

    def __init__(
        self,
        message: str,
        *,
        kind: str = "",
        name: str = "",
        group: str = "",
        causes: Iterable[FieldError] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.name = name
        self.group = group
        self.causes: tuple[FieldError, ...] = tuple(causes)

    def status(self) -> meta_pb2.Status:
        details = meta_pb2.StatusDetails(
            name=self.name,
            group=self.group,
            kind=self.kind,
            causes=[
                meta_pb2.StatusCause(reason=c.reason, message=c.message, field=c.field)
                for c in self.causes
            ],
            retry_after_seconds=int(getattr(self, "retry_after", 0) or 0),
        )
        return meta_pb2.Status(
            code=self.code, reason=self.reason, message=self.message, details=details
        )


class BadRequest(ShoalError):
    """The request itself is malformed (unknown kind, bad selector, bad token)."""

    reason = "BadRequest"
    code = 400


class Unauthorized(ShoalError):
    reason = "Unauthorized"
    code = 401


class Forbidden(ShoalError):
    reason = "Forbidden"
    code = 403


class NotFound(ShoalError):
    reason = "NotFound"
    code = 404


class MethodNotAllowed(ShoalError):
    reason = "MethodNotAllowed"
    code = 405


class AlreadyExists(ShoalError):
    reason = "AlreadyExists"
    code = 409


class Conflict(ShoalError):
    """A precondition failed: a stale resourceVersion, or a uid that changed."""

    reason = "Conflict"
    code = 409


class Expired(ShoalError):
    """A resourceVersion or continue token is older than the kept history."""

    reason = "Expired"
    code = 410


class RequestEntityTooLarge(ShoalError):
    reason = "RequestEntityTooLarge"
    code = 413


class Invalid(ShoalError):
    """The object breaks a rule; ``causes`` names each offending field."""

    reason = "Invalid"
    code = 422

    def __str__(self) -> str:
        if not self.causes:
            return self.message
        return self.message + ": " + "; ".join(str(c) for c in self.causes)


class TemporaryError(ShoalError):
    """Retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class TooManyRequests(TemporaryError):
    reason = "TooManyRequests"
    code = 429


class Unavailable(TemporaryError):
    """Storage or a server cannot be reached; the request may be retried."""

    reason = "ServiceUnavailable"
    code = 503


class InternalError(ShoalError):
    reason = "InternalError"
    code = 500


_BY_REASON: dict[str, type[ShoalError]] = {
    cls.reason: cls
    for cls in (
        BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, AlreadyExists,
        Conflict, Expired, RequestEntityTooLarge, Invalid, TooManyRequests, Unavailable,
        InternalError,
    )
}


def from_status(status: meta_pb2.Status) -> ShoalError:
    """Rebuild the error a server described in a Status body."""
    cls = _BY_REASON.get(status.reason, InternalError)
    d = status.details
    causes = [FieldError(field=c.field, message=c.message, reason=c.reason) for c in d.causes]
    if issubclass(cls, TemporaryError):
        return cls(
            status.message,
            retry_after=float(d.retry_after_seconds or 1),
            kind=d.kind,
            name=d.name,
            group=d.group,
            causes=causes,
        )
    return cls(status.message, kind=d.kind, name=d.name, group=d.group, causes=causes)
