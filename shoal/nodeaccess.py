"""Who may call the APIs a node's agents serve, and how they answer with an error.

The nodeagent (10250) and the meshagent (15000) serve gRPC with TLS using the
node's serving certificate (from join). A caller must present a client
certificate from the cluster CA (the TLS handshake checks the chain) whose
subject is the apiserver's kubelet client (CN ``shoal-apiserver-kubelet-client``)
or whose groups (O) include ``system:masters``. Users come in through the
apiserver's proxies, which authenticate them.

A refusal is a gRPC status plus a ``shoal.meta.v1.Status`` in the
``shoal-status-bin`` trailer, which the SDK turns back into the Shoal error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from shoal import errors

STATUS_TRAILER = "shoal-status-bin"
ALLOWED_USERS = frozenset({"shoal-apiserver-kubelet-client"})
ALLOWED_GROUPS = frozenset({"system:masters"})
GRPC_CODES = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RequestEntityTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MethodNotAllowed: grpc.StatusCode.UNIMPLEMENTED,
}


def peer_certificate_pem(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    """The PEM of the client certificate the caller presented (verified by TLS);
    None on a call without one or without TLS."""
    try:
        props = context.auth_context()
    except Exception:  # no TLS context at all
        return None
    pems = props.get("x509_pem_cert") if props else None
    return next(iter(pems)) if pems else None


def caller(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, set[str]]:
    """The user (CN) and groups (O) of the caller's verified client certificate, as
    gRPC's TLS layer reports them (no certificate parsing here: the meshagent
    serves this API and does not load ``cryptography``)."""
    if peer_certificate_pem(context) is None:
        raise errors.Unauthorized("a client certificate from the cluster CA is required")
    props = context.auth_context()
    cns = props.get("x509_common_name") or [b""]
    subject = b"".join(props.get("x509_subject") or [b""]).decode(errors="replace")
    return next(iter(cns)).decode(errors="replace"), set(rdn_values(subject, "O"))


def rdn_values(subject: str, attribute: str) -> list[str]:
    """The values of ``attribute`` in an RFC 4514 subject string such as OpenSSL
    prints (``CN=al\\,ice,O=g\\+2,O=system:masters``): split on unescaped ``,``
    and ``+``, then undo backslash escapes (``\\,`` and hex pairs ``\\2C``)."""
    values: list[str] = []
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(subject):
        ch = subject[i]
        if ch == "\\" and i + 1 < len(subject):
            current.append(subject[i:i + 2])
            i += 2
            continue
        if ch in ",+":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    for part in parts:
        key, sep, raw = part.partition("=")
        if sep and key.strip().upper() == attribute.upper():
            values.append(_unescape(raw))
    return values


def _unescape(raw: str) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            pair = raw[i + 1:i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += raw[i + 1].encode()
            i += 2
            continue
        out += raw[i].encode()
        i += 1
    return out.decode(errors="replace")


def authorize(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Raise Unauthorized/Forbidden unless the caller may use a node's agent API."""
    user, groups = caller(context)
    if user not in ALLOWED_USERS and not groups & ALLOWED_GROUPS:
        raise errors.Forbidden(f'user "{user}" may not use the API of this node')


async def abort(context: grpc.aio.ServicerContext[Any, Any], e: errors.ShoalError) -> None:
    """End the call with ``e`` (raises, as ``context.abort`` does)."""
    code = next((c for cls, c in GRPC_CODES.items() if isinstance(e, cls)),
                grpc.StatusCode.INTERNAL)
    await context.abort(code, e.message,
                        trailing_metadata=((STATUS_TRAILER, e.status().SerializeToString()),))


def server_credentials(pki_dir: Path) -> grpc.ServerCredentials:
    """TLS for a node agent's API: the node's serving certificate (``serving.crt``,
    ``serving.key`` from join) and client certificates required from the cluster
    CA (``ca.crt``)."""
    return grpc.ssl_server_credentials(
        [((pki_dir / "serving.key").read_bytes(), (pki_dir / "serving.crt").read_bytes())],
        root_certificates=(pki_dir / "ca.crt").read_bytes(), require_client_auth=True)
