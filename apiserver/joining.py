"""Node join: a bootstrap token and a CSR in, a node client certificate out.

    node                                   apiserver
    key + CSR (CN=system:node:N,  --Join(token, csr)-->  token Secret valid, unexpired,
               O=system:nodes)                          usage-bootstrap-signing?
                                                        CSR signature, subject, name ok?
                <--(cert, CA, servers)---------------   sign with the cluster CA

The only RPC served without a client certificate. Every refusal says why
(unknown token, expired, wrong usage, wrong subject) and signs nothing.
Joining again with a valid token is allowed: the node gets a fresh certificate
(idempotent rejoin).

Renewal (kubelet's client certificate rotation, for users too):

    caller (mTLS, current cert)  --Renew(csr[, serving csr])-->  CSR subject == the
                                                                 caller's CN and O?
                                 <--(cert, CA, servers)-------   sign, same lifetime as
                                                                 the current cert (<= 1y)

Only a caller with a client certificate may renew (a bearer token cannot), and
only into the identity it already has: no new name, no new group. The new key
is the caller's choice (a fresh key per renewal is recommended).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from apiserver.authz.attributes import Attributes
from apiserver.authz.nodes import NODE_GROUP, NODE_PREFIX
from apiserver.metrics import Metrics
from apiserver.objectstore import ObjectStore
from apiserver.pki import CertificateAuthority, Identity, cert_pem
from apiserver.rpc import Authenticator, Guard, attributes, current_caller, passthrough, unary
from shoal import errors, naming, tokens
from shoal.api.certificates.v1 import certificates_pb2 as pb
from shoal.kinds import KindTable
from shoal.nodeaccess import peer_certificate_pem

SERVICE = "shoal.certificates.v1.Certificates"
NODE_CERT_LIFETIME = dt.timedelta(days=365)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class JoinService:
    def __init__(
        self,
        *,
        objects: ObjectStore,
        kinds: KindTable,
        ca: CertificateAuthority,
        servers: tuple[str, ...],
        metrics: Metrics,
        authn: Authenticator,
        guard: Guard,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.objects = objects
        self.guard = guard
        self.secrets = kinds.by_resource("", "secrets")
        self.ca = ca
        self.servers = servers
        self.metrics = metrics
        self.authn = authn
        self.clock = clock

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Join": grpc.unary_unary_rpc_method_handler(
                self.join, request_deserializer=pb.JoinRequest.FromString,
                response_serializer=passthrough),
            # Renew reuses Join's messages; the token field is unused.
            "Renew": grpc.unary_unary_rpc_method_handler(
                self.renew, request_deserializer=pb.JoinRequest.FromString,
                response_serializer=passthrough),
        })

    @staticmethod
    def describe_renew(service: object, request: pb.JoinRequest, ident: Identity
                       ) -> Attributes:
        # For the audit only: the current certificate is the authorization.
        return attributes(ident, "create", group="certificates.k8s.io",
                          resource="certificatesigningrequests", name=ident.user)

    @unary("Renew", describe=describe_renew, authorize=False)
    async def renew(self, request: pb.JoinRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> pb.JoinResponse:
        current = _client_certificate(context)
        ident = current_caller()
        csr = _load_csr(request.csr_pem)
        cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        orgs = sorted(str(a.value) for a in
                      csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
        if cns != [ident.user] or orgs != sorted(ident.groups):
            raise errors.Forbidden(
                f"a renewal CSR must keep the caller's identity CN={ident.user}, "
                f"O={','.join(sorted(ident.groups))}, not CN={','.join(cns)}, "
                f"O={','.join(orgs)}")
        # The CA backdates not-before by 5 minutes (clock skew): take that off so
        # a certificate does not grow with each renewal.
        span = current.not_valid_after_utc - current.not_valid_before_utc
        lifetime = min(max(span - dt.timedelta(minutes=5), dt.timedelta(minutes=5)),
                       NODE_CERT_LIFETIME)
        cert = self.ca.issue(csr.public_key(),  # type: ignore[arg-type]
                             common_name=ident.user, organizations=list(ident.groups),
                             client=True, lifetime=lifetime)
        resp = pb.JoinResponse(certificate_pem=cert_pem(cert), ca_pem=cert_pem(self.ca.cert),
                               servers=list(self.servers))
        if request.serving_csr_pem:
            node = ident.user.removeprefix(NODE_PREFIX)
            if not ident.user.startswith(NODE_PREFIX) or NODE_GROUP not in ident.groups:
                raise errors.Forbidden("only a node may renew a serving certificate")
            resp.serving_certificate_pem = cert_pem(self._serving(
                pb.JoinRequest(node_name=node, serving_csr_pem=request.serving_csr_pem),
                lifetime=lifetime))
        return resp

    @staticmethod
    def describe_join(service: object, request: pb.JoinRequest, ident: Identity) -> Attributes:
        # For the audit only: the bootstrap token is the authorization.
        return attributes(ident, "create", group="certificates.k8s.io",
                          resource="certificatesigningrequests", name=request.node_name)

    @unary("Join", authenticate=False, describe=describe_join, authorize=False)
    async def join(self, request: pb.JoinRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> pb.JoinResponse:
        token = tokens.parse(request.token)
        try:
            secret = await self.objects.get(self.secrets, namespace=tokens.NAMESPACE,
                                            name=token.secret_name)
        except errors.NotFound:
            raise errors.Unauthorized(f"bootstrap token {token.id} not found (revoked?)"
                                      ) from None
        tokens.check(token, secret, now=self.clock(), usage="signing")
        csr = self._check_csr(request)
        cert = self.ca.issue(
            csr.public_key(),  # type: ignore[arg-type]
            common_name=NODE_PREFIX + request.node_name, organizations=[NODE_GROUP],
            client=True, lifetime=NODE_CERT_LIFETIME)
        resp = pb.JoinResponse(certificate_pem=cert_pem(cert), ca_pem=cert_pem(self.ca.cert),
                               servers=list(self.servers))
        if request.serving_csr_pem:
            resp.serving_certificate_pem = cert_pem(self._serving(request))
        return resp

    def _serving(self, request: pb.JoinRequest, *,
                 lifetime: dt.timedelta = NODE_CERT_LIFETIME) -> x509.Certificate:
        """The node agent's serving certificate: names and IPs of the node only."""
        csr = _load_csr(request.serving_csr_pem)
        want = NODE_PREFIX + request.node_name
        cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [want]:
            raise errors.Forbidden(f"a serving CSR must have CN={want}, not {cns}")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise errors.BadRequest("a serving CSR must name the node's IPs") from None
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        dns = san.get_values_for_type(x509.DNSName)
        bad = [d for d in dns if d != request.node_name]
        if bad:
            raise errors.Forbidden(f"a serving CSR may name only the node itself, not {bad}")
        return self.ca.issue(csr.public_key(),  # type: ignore[arg-type]
                             common_name=want, organizations=[NODE_GROUP], dns_names=dns,
                             ips=ips, server=True, lifetime=lifetime)

    def _check_csr(self, request: pb.JoinRequest) -> x509.CertificateSigningRequest:
        problems = naming.check_dns1123_subdomain(request.node_name)
        if not request.node_name or problems:
            raise errors.BadRequest(f"invalid node name {request.node_name!r}: "
                                    f"{problems[0] if problems else 'Required value'}")
        csr = _load_csr(request.csr_pem)
        cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        orgs = [str(a.value) for a in
                csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        want = NODE_PREFIX + request.node_name
        if cns != [want]:
            raise errors.Forbidden(f"a join CSR must have CN={want}, not {cns}")
        if orgs != [NODE_GROUP]:
            raise errors.Forbidden(f"a join CSR must have O={NODE_GROUP} only, not {orgs}")
        return csr


def _client_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> x509.Certificate:
    """The certificate the caller presented (verified by TLS), or Forbidden."""
    pem = peer_certificate_pem(context)
    if pem is None:
        raise errors.Forbidden("renewing a certificate needs the current client certificate "
                               "(a bearer token cannot renew one)")
    return x509.load_pem_x509_certificate(pem)


def _load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise errors.BadRequest(f"the CSR is not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise errors.BadRequest("the CSR's signature does not verify")
    if not isinstance(csr.public_key(), (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise errors.BadRequest("the CSR's key must be ECDSA or RSA")
    return csr
