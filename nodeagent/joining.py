"""``shoal-nodeagent join``: trade a bootstrap token for a node certificate.

    1. TLS to the apiserver's join port without trusting anything yet; read the
       certificate chain it presents and keep the CA whose public-key hash equals
       ``--ca-cert-hash`` (the pin from ``shoal token create --print-join-command``).
       The server certificate must be signed by that CA. Otherwise: refuse.
    2. Load or make the node key (``<data-dir>/pki/node.key``; it never leaves the
       machine) and a CSR for CN=system:node:<name>, O=system:nodes.
    3. Call Certificates/Join over TLS now pinned to that CA.
    4. Write ``node.crt``, ``ca.crt`` and the node's client config ``node.conf``.

Idempotent: when ``node.conf`` already holds a certificate for this node name,
from a CA with the pinned hash, valid for more than ``renew_before``, nothing
is done (no token is spent). Running it again otherwise re-joins with the same
key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal import config as configmod
from shoal import errors, tokens
from shoal.api.certificates.v1 import certificates_pb2 as pb
from shoal.client import classify
from shoal.config import ClientConfig

NODE_GROUP = "system:nodes"
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class JoinResult:
    config_path: Path
    node_name: str
    expires: dt.datetime
    joined: bool  # False: an existing, valid identity was kept


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise errors.BadRequest(f"--server must be HOST:PORT, not {address!r}")
    return host.strip("[]"), int(port)


def fetch_chain(address: str, *, timeout: float = 10.0) -> list[x509.Certificate]:
    """The certificates the server presents, unverified (verification is ours)."""
    host, port = _split(address)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            # Public from Python 3.13; the same method on the SSL object before that.
            target: Any = tls if hasattr(tls, "get_unverified_chain") else tls._sslobj  # type: ignore[attr-defined]
            chain: Any = target.get_unverified_chain()
    except OSError as e:
        raise errors.Unavailable(f"cannot reach {address}: {e}", retry_after=2.0) from e
    out = []
    for item in chain or ():
        der = item if isinstance(item, bytes) else item.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
        out.append(x509.load_der_x509_certificate(der))
    return out


def pinned_ca(chain: list[x509.Certificate], ca_cert_hash: str) -> x509.Certificate:
    """The CA in ``chain`` with the pinned hash; it must have signed the leaf."""
    if not ca_cert_hash.startswith("sha256:"):
        raise errors.BadRequest("--ca-cert-hash must look like sha256:<64 hex digits>")
    for cert in chain:
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if tokens.ca_cert_hash(pem) == ca_cert_hash.lower():
            if chain:
                try:
                    chain[0].verify_directly_issued_by(cert)
                except (ValueError, TypeError, Exception) as e:
                    raise errors.Forbidden(
                        f"the server certificate is not signed by the pinned CA: {e}") from e
            return cert
    raise errors.Forbidden(
        "the apiserver did not present a CA matching --ca-cert-hash "
        f"{ca_cert_hash}; refusing to join (wrong cluster, or a man in the middle?)")


def _key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return key


def csr_for(key: ec.EllipticCurvePrivateKey, node_name: str, *,
            ips: tuple[str, ...] = ()) -> bytes:
    """A CSR for the node's identity; with ``ips``, for its serving certificate."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODE_GROUP),
        x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{node_name}")]))
    if ips:
        names: list[x509.GeneralName] = [x509.DNSName(node_name)]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _existing(conf: Path, *, node_name: str, ca_cert_hash: str,
              now: dt.datetime) -> dt.datetime | None:
    """Expiry of a still-good identity in ``conf``, else None."""
    if not conf.exists():
        return None
    try:
        cfg = configmod.load(conf)
        cert = x509.load_pem_x509_certificate(cfg.cert_pem)
    except (errors.ShoalError, ValueError):
        return None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != f"system:node:{node_name}":
        return None
    if tokens.ca_cert_hash(cfg.ca_pem) != ca_cert_hash.lower():
        return None
    expires = cert.not_valid_after_utc
    return expires if expires - now > RENEW_BEFORE else None


async def join(
    *,
    server: str,
    token: str,
    ca_cert_hash: str,
    node_name: str,
    data_dir: Path,
    api_servers: tuple[str, ...] = (),
    node_ips: tuple[str, ...] = (),
    now: dt.datetime | None = None,
) -> JoinResult:
    """Join (or confirm membership). See the module docstring."""
    now = now or dt.datetime.now(dt.UTC)
    conf = data_dir / "node.conf"
    expires = _existing(conf, node_name=node_name, ca_cert_hash=ca_cert_hash, now=now)
    if expires is not None:
        return JoinResult(conf, node_name, expires, joined=False)
    parsed = tokens.parse(token)
    chain = fetch_chain(server)
    ca = pinned_ca(chain, ca_cert_hash)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    key = _key(data_dir / "pki" / "node.key")
    serving_key = _key(data_dir / "pki" / "serving.key")
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(server, creds) as channel:
        rpc = channel.unary_unary("/shoal.certificates.v1.Certificates/Join",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=pb.JoinResponse.FromString)
        try:
            resp = await rpc(pb.JoinRequest(
                token=str(parsed), csr_pem=csr_for(key, node_name), node_name=node_name,
                serving_csr_pem=csr_for(serving_key, node_name,
                                        ips=("127.0.0.1", *node_ips))), timeout=30)
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e
    cert = x509.load_pem_x509_certificate(resp.certificate_pem)
    pki = data_dir / "pki"
    (pki / "node.crt").write_bytes(resp.certificate_pem)
    (pki / "ca.crt").write_bytes(resp.ca_pem)
    (pki / "serving.crt").write_bytes(resp.serving_certificate_pem)
    servers = api_servers or tuple(resp.servers) or (server,)
    ClientConfig(
        servers=servers, ca_pem=resp.ca_pem, cert_pem=resp.certificate_pem,
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        user=f"system:node:{node_name}",
    ).save(conf)
    return JoinResult(conf, node_name, cert.not_valid_after_utc, joined=True)
