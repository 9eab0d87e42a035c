"""The mesh CA: workload certificates (SPIFFE X.509 SVIDs) for node agents.

    meshagent on node N                      apiserver
    key (stays on N) + CSR          --Sign(csr, ns, sa)-->  caller is system:node:N?
      SAN = spiffe://td/ns/NS/sa/SA                         a pod with spec.nodeName N,
                                                            namespace NS, not finished,
                                                            runs as SA?  (watch cache)
                                                            CSR: valid signature, P-256,
                                                            exactly that one URI SAN?
                <--(chain, trust bundle)--------------  sign: 24 h, no CA,
                                                        serverAuth + clientAuth

This is the node authorization istiod gives ztunnel: a node gets identities
only for workloads it runs. The request is authorized like any other, as
``create serviceaccounts/workloadcertificate`` on the service account: the node
authorizer answers from the same pods-bound-to-node graph it reads Secrets by
(``apiserver.authz.nodegraph``), system:masters (the admin, tools, tests) may
get any identity, and RBAC may grant it to others. Refusals: PermissionDenied
for the wrong caller or a service account with no running pod on that node;
InvalidArgument naming what is wrong with the CSR or the names.

Signer and trust bundle (files in ``<data-dir>/pki``, re-read when they change):

- ``mesh-ca.crt`` + ``mesh-ca.key`` if present sign workload certificates;
  otherwise the cluster CA (``ca.crt``/``ca.key``) does. A mesh CA that is an
  intermediate under the cluster CA is sent along in the chain.
- The trust bundle is the signer's root plus every certificate in
  ``mesh-trust-bundle.pem`` (optional, extra roots).

Root rotation without an outage (see docs/ARCHITECTURE.md, "Workload identity"):
1. make the new root and append it to ``mesh-trust-bundle.pem``;
2. wait until every agent has fetched the bundle (it comes with each certificate
   and from GetTrustBundle) -- peers now accept both roots;
3. install the new key pair as ``mesh-ca.crt``/``mesh-ca.key`` and keep the old
   root in ``mesh-trust-bundle.pem``: new certificates chain to the new root;
4. after one certificate lifetime (24 h) every old certificate has expired or
   been rotated; remove the old root from ``mesh-trust-bundle.pem``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from apiserver.authz.attributes import Attributes
from apiserver.authz.nodes import WORKLOAD_CERTIFICATE
from apiserver.metrics import Metrics
from apiserver.pki import CertificateAuthority, Identity, cert_pem
from apiserver.rpc import Authenticator, Guard, attributes, passthrough, unary
from shoal import errors, spiffe
from shoal.api.certificates.v1 import workload_pb2 as pb

SERVICE = "shoal.certificates.v1.WorkloadCertificates"
DEFAULT_LIFETIME = dt.timedelta(hours=24)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- decisions (pure) ---------------------------------------------------------


def check_csr(pem: bytes, want: spiffe.SpiffeId) -> x509.CertificateSigningRequest:
    """A valid, self-signed P-256 CSR whose only SAN is ``want``; else BadRequest."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise errors.BadRequest(f"the CSR is not a PEM certificate request: {e}") from None
    if not csr.is_signature_valid:
        raise errors.BadRequest("the CSR's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise errors.BadRequest("the CSR's key must be ECDSA P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise errors.BadRequest(f"the CSR has no SAN; it must name {want}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        raise errors.BadRequest(f"the CSR may name only the SPIFFE URI {want}, not also "
                                f"{[str(getattr(n, 'value', n)) for n in others]}")
    if uris != [str(want)]:
        raise errors.BadRequest(f"the CSR must carry exactly one URI SAN, {want}, not {uris}")
    return csr


# -- signer and bundle from files ----------------------------------------------


class MeshCA:
    """Signer and trust bundle read from ``pki/`` (re-read when a file changes)."""

    def __init__(self, pki_dir: Path) -> None:
        self.pki = pki_dir
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._signer: CertificateAuthority | None = None
        self._intermediates: bytes = b""
        self._roots: bytes = b""

    def _files(self) -> tuple[Path, ...]:
        return tuple(self.pki / n for n in ("ca.crt", "ca.key", "mesh-ca.crt", "mesh-ca.key",
                                             "mesh-trust-bundle.pem"))

    def _load(self) -> None:
        stamp = tuple(_stamp(p) for p in self._files())
        if stamp == self._stamp and self._signer is not None:
            return
        cluster = x509.load_pem_x509_certificate((self.pki / "ca.crt").read_bytes())
        if (self.pki / "mesh-ca.crt").exists() and (self.pki / "mesh-ca.key").exists():
            signer = _load_pair(self.pki / "mesh-ca.crt", self.pki / "mesh-ca.key")
        else:
            signer = CertificateAuthority.load(self.pki)
        self_signed = signer.cert.issuer == signer.cert.subject
        root = signer.cert if self_signed else cluster
        roots = [cert_pem(root)]
        extra = self.pki / "mesh-trust-bundle.pem"
        if extra.exists():
            for c in x509.load_pem_x509_certificates(extra.read_bytes()):
                if cert_pem(c) not in roots:
                    roots.append(cert_pem(c))
        self._signer = signer
        self._intermediates = b"" if self_signed else cert_pem(signer.cert)
        self._roots = b"".join(roots)
        self._stamp = stamp

    def signer(self) -> tuple[CertificateAuthority, bytes]:
        self._load()
        assert self._signer is not None
        return self._signer, self._intermediates

    def roots_pem(self) -> bytes:
        self._load()
        return self._roots


def _stamp(path: Path) -> tuple[int, int, int]:
    """Changes when the file is written, replaced or removed (mtime alone is coarse)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (-1, -1, -1)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _load_pair(cert_path: Path, key_path: Path) -> CertificateAuthority:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise errors.InternalError(f"{key_path} must hold an EC key")
    return CertificateAuthority(cert, key)


def issue_workload(ca: CertificateAuthority, key: ec.EllipticCurvePublicKey,
                   ident: spiffe.SpiffeId, *, now: dt.datetime,
                   lifetime: dt.timedelta) -> x509.Certificate:
    """An X.509 SVID: empty subject, the SPIFFE URI as only (critical) SAN."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(min(now + lifetime, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, key_cert_sign=False,
            crl_sign=False, content_commitment=False, data_encipherment=False,
            key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(str(ident))]), critical=True)
        .sign(ca.key, hashes.SHA256())
    )


# -- the gRPC service ------------------------------------------------------------


class WorkloadCertificateService:
    def __init__(
        self,
        *,
        pki_dir: Path,
        metrics: Metrics,
        authn: Authenticator,
        guard: Guard,
        trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN,
        lifetime: dt.timedelta = DEFAULT_LIFETIME,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        problems = spiffe.check_trust_domain(trust_domain)
        if problems:
            raise errors.BadRequest(f"invalid mesh trust domain: {problems[0]}")
        self.ca = MeshCA(pki_dir)
        self.metrics = metrics
        self.authn = authn
        self.guard = guard
        self.trust_domain = trust_domain
        self.lifetime = lifetime
        self.clock = clock

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Sign": grpc.unary_unary_rpc_method_handler(
                self.sign, request_deserializer=pb.WorkloadSignRequest.FromString,
                response_serializer=passthrough),
            "GetTrustBundle": grpc.unary_unary_rpc_method_handler(
                self.trust_bundle, request_deserializer=pb.TrustBundleRequest.FromString,
                response_serializer=passthrough),
        })

    def _bundle(self) -> pb.TrustBundle:
        return pb.TrustBundle(trust_domain=self.trust_domain, roots_pem=self.ca.roots_pem())

    def _want(self, request: pb.WorkloadSignRequest) -> spiffe.SpiffeId:
        try:
            return spiffe.SpiffeId.of(trust_domain=self.trust_domain,
                                      namespace=request.namespace,
                                      service_account=request.service_account)
        except spiffe.InvalidSpiffeId as e:
            raise errors.BadRequest(str(e)) from None

    def describe_sign(self, request: pb.WorkloadSignRequest, ident: Identity) -> Attributes:
        want = self._want(request)  # a malformed name is a BadRequest, before authorization
        return attributes(ident, "create", resource="serviceaccounts",
                          subresource=WORKLOAD_CERTIFICATE, namespace=want.namespace,
                          name=want.service_account)

    @unary("WorkloadSign", describe=describe_sign)
    async def sign(self, request: pb.WorkloadSignRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> pb.WorkloadSignResponse:
        want = self._want(request)
        csr = check_csr(request.csr_pem, want)
        lifetime = self.lifetime
        if request.ttl_seconds < 0:
            raise errors.BadRequest(f"ttl_seconds must not be negative, not "
                                    f"{request.ttl_seconds}")
        if request.ttl_seconds:
            lifetime = min(lifetime, dt.timedelta(seconds=request.ttl_seconds))
        signer, intermediates = self.ca.signer()
        cert = issue_workload(signer, csr.public_key(),  # type: ignore[arg-type]
                              want, now=self.clock(), lifetime=lifetime)
        return pb.WorkloadSignResponse(certificate_chain_pem=cert_pem(cert) + intermediates,
                                       trust_bundle=self._bundle(), spiffe_id=str(want))

    @unary("GetTrustBundle")
    async def trust_bundle(self, request: pb.TrustBundleRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.TrustBundle:
        return self._bundle()
