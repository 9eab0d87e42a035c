"""Client certificate expiry and renewal (kubelet's certificate rotation).

    valid ----(70-90% of lifetime, jittered)----> due --Renew(new key CSR)--> valid
      ^                                            |                            (new cert,
      |                                            | refused / unreachable       same identity)
      +------- keep the current cert, retry with back-off until it expires ----+

``renew_due`` is pure (the clock is passed in). ``renew`` asks the apiserver's
``Certificates/Renew`` over mTLS with the current certificate and returns a
new ``ClientConfig``; it never writes files (the caller saves the result
atomically, then switches its clients to it). A failed renewal keeps the
current certificate: nothing changes until a new one is in hand.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, replace

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal import errors
from shoal.api.certificates.v1 import certificates_pb2 as pb
from shoal.client import AsyncClient, classify
from shoal.config import ClientConfig

# kubelet renews when 70-90% (jittered) of the certificate's lifetime has passed.
RENEW_FRACTION = (0.7, 0.9)
# `shoal certs` (and `shoal status`) warn this long before an expiry.
WARN_BEFORE = dt.timedelta(days=30)
RENEW_METHOD = "/shoal.certificates.v1.Certificates/Renew"


@dataclass(frozen=True)
class CertInfo:
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def of(cls, pem: bytes) -> CertInfo:
        cert = x509.load_pem_x509_certificate(pem)
        return cls(subject=cert.subject.rfc4514_string(),
                   not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc)

    def remaining(self, now: dt.datetime) -> dt.timedelta:
        return self.not_after - now

    def warning(self, now: dt.datetime, *, warn_before: dt.timedelta = WARN_BEFORE) -> str:
        """'' when fine; else what is wrong ('expired 2 days ago', 'expires in 12 days')."""
        left = self.not_after - now
        if left <= dt.timedelta(0):
            return f"EXPIRED {_span(-left)} ago"
        if left <= warn_before:
            return f"expires in {_span(left)}"
        return ""


def _span(d: dt.timedelta) -> str:
    if d >= dt.timedelta(days=2):
        return f"{d.days} days"
    if d >= dt.timedelta(hours=2):
        return f"{int(d.total_seconds() // 3600)} hours"
    return f"{max(1, int(d.total_seconds() // 60))} minutes"


def renew_due(info: CertInfo, *, fraction: float) -> dt.datetime:
    """When a certificate should be renewed: ``fraction`` of its lifetime in."""
    return info.not_before + (info.not_after - info.not_before) * fraction


def jittered_fraction(rng: random.Random | None = None) -> float:
    lo, hi = RENEW_FRACTION
    return (rng or random.Random()).uniform(lo, hi)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_like(cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR with the subject (CN, O) of the current certificate."""
    subject = x509.load_pem_x509_certificate(cert_pem).subject
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(a.value))
             for a in subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, str(a.value))
              for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Renewed:
    config: ClientConfig
    serving_certificate_pem: bytes = b""


async def renew(client: AsyncClient, *, key: ec.EllipticCurvePrivateKey | None = None,
                serving_csr_pem: bytes = b"", timeout: float = 30.0) -> Renewed:
    """Renew the client certificate ``client`` (an AsyncClient) authenticates with."""
    cfg = client.config
    if not cfg.cert_pem:
        raise errors.BadRequest("this client config has no client certificate to renew "
                                "(a token cannot be renewed)")
    key = key or new_key()
    rpc = client.channel.unary_unary(
        RENEW_METHOD, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.JoinResponse.FromString)
    try:
        resp: pb.JoinResponse = await rpc(pb.JoinRequest(
            csr_pem=csr_like(cfg.cert_pem, key), serving_csr_pem=serving_csr_pem),
            timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise classify(e) from e
    return Renewed(config=replace(cfg, cert_pem=resp.certificate_pem, key_pem=key_pem(key),
                                  ca_pem=resp.ca_pem or cfg.ca_pem),
                   serving_certificate_pem=resp.serving_certificate_pem)
