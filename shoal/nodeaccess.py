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
from cryptography import x509
from cryptography.x509.oid import NameOID

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


def caller(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, set[str]]:
    """The user (CN) and groups (O) of the caller's verified client certificate."""
    props = context.auth_context() or {}
    pems = props.get("x509_pem_cert")
    if not pems:
        raise errors.Unauthorized("a client certificate from the cluster CA is required")
    cert = x509.load_pem_x509_certificate(next(iter(pems)))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return (str(cn[0].value) if cn else ""), {str(o.value) for o in orgs}


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
