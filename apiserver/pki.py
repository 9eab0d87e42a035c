"""The cluster CA and the certificates ``shoal-apiserver init`` makes.

Layout of ``--data-dir`` (``pki/``)::

    ca.crt ca.key          cluster CA (ECDSA P-256, 10 years)
    server.crt server.key  apiserver serving certificate (SANs: localhost,
                           127.0.0.1, ::1, the host name, and any --san)
    admin.crt admin.key    client certificate CN=admin, O=system:masters
    ../admin.conf          client config for the admin (see shoal.config)

Identity follows Kubernetes: a client certificate's CN is the user name and
its O entries are the groups. ``init`` is idempotent: what exists is kept.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.config import ClientConfig
from shoal.tokens import ca_cert_hash

CA_DAYS = 3650
KUBELET_CLIENT_CN = "shoal-apiserver-kubelet-client"
CONTROLLER_MANAGER_CN = "system:kube-controller-manager"
CERT_DAYS = 365


@dataclass(frozen=True)
class Identity:
    """Who a client certificate says the caller is."""

    user: str
    groups: tuple[str, ...]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, orgs: Iterable[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """Signs certificates with the cluster CA key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, common_name: str = "shoal-ca") -> CertificateAuthority:
        key = new_key()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an EC key")
        return cls(cert, key)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        common_name: str,
        organizations: Iterable[str] = (),
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = (),
        uris: Iterable[str] = (),
        server: bool = False,
        client: bool = False,
        lifetime: dt.timedelta = dt.timedelta(days=CERT_DAYS),
    ) -> x509.Certificate:
        now = _now()
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + lifetime, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False,
                crl_sign=False, content_commitment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def cert_hash(self) -> str:
        """``sha256:<hex>`` of the CA's public key, as ``kubeadm join`` pins it."""
        return ca_cert_hash(cert_pem(self.cert))


def identity_of(pem: bytes) -> Identity:
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return Identity(user=str(cn[0].value) if cn else "",
                    groups=tuple(str(o.value) for o in orgs))


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class InitResult:
    pki_dir: Path
    admin_config: Path
    created: tuple[str, ...]


def init(
    data_dir: Path,
    *,
    server_addresses: Iterable[str] = ("127.0.0.1:6443",),
    extra_sans: Iterable[str] = (),
) -> InitResult:
    """Create whatever is missing of the CA, server and admin certificates, and
    the admin client config. Existing files are kept as they are."""
    pki = data_dir / "pki"
    created: list[str] = []
    if (pki / "ca.crt").exists() and (pki / "ca.key").exists():
        ca = CertificateAuthority.load(pki)
    else:
        ca = CertificateAuthority.create()
        _write(pki / "ca.key", key_pem(ca.key), private=True)
        _write(pki / "ca.crt", cert_pem(ca.cert), private=False)
        created += ["ca.crt", "ca.key"]
    if not (pki / "server.crt").exists():
        dns = {"localhost", socket.gethostname()}
        ips = {"127.0.0.1", "::1"}
        for san in extra_sans:
            try:
                ipaddress.ip_address(san)
                ips.add(san)
            except ValueError:
                dns.add(san)
        for addr in server_addresses:
            host = addr.rsplit(":", 1)[0].strip("[]")
            try:
                ipaddress.ip_address(host)
                ips.add(host)
            except ValueError:
                dns.add(host)
        key = new_key()
        cert = ca.issue(key.public_key(), common_name="shoal-apiserver", dns_names=sorted(dns),
                        ips=sorted(ips), server=True)
        _write(pki / "server.key", key_pem(key), private=True)
        # The chain includes the CA so a joining node can find it (and pin its hash).
        _write(pki / "server.crt", cert_pem(cert) + cert_pem(ca.cert), private=False)
        created += ["server.crt", "server.key"]
    if not (pki / "admin.crt").exists():
        key = new_key()
        cert = ca.issue(key.public_key(), common_name="admin",
                        organizations=["system:masters"], client=True)
        _write(pki / "admin.key", key_pem(key), private=True)
        _write(pki / "admin.crt", cert_pem(cert), private=False)
        created += ["admin.crt", "admin.key"]
    if not (pki / "apiserver-kubelet-client.crt").exists():
        # The apiserver's identity towards node agents (logs, exec).
        key = new_key()
        cert = ca.issue(key.public_key(), common_name=KUBELET_CLIENT_CN,
                        organizations=["system:masters"], client=True)
        _write(pki / "apiserver-kubelet-client.key", key_pem(key), private=True)
        _write(pki / "apiserver-kubelet-client.crt", cert_pem(cert), private=False)
        created += ["apiserver-kubelet-client.crt", "apiserver-kubelet-client.key"]
    if not (pki / "controller-manager.crt").exists():
        # The in-process controllers' identity when they call the API (loopback).
        key = new_key()
        cert = ca.issue(key.public_key(), common_name=CONTROLLER_MANAGER_CN,
                        organizations=["system:masters"], client=True)
        _write(pki / "controller-manager.key", key_pem(key), private=True)
        _write(pki / "controller-manager.crt", cert_pem(cert), private=False)
        created += ["controller-manager.crt", "controller-manager.key"]
    conf_path = data_dir / "admin.conf"
    if not conf_path.exists() or created:
        ClientConfig(
            servers=tuple(server_addresses),
            ca_pem=(pki / "ca.crt").read_bytes(),
            cert_pem=(pki / "admin.crt").read_bytes(),
            key_pem=(pki / "admin.key").read_bytes(),
            user="admin",
        ).save(conf_path)
        created.append("admin.conf")
    return InitResult(pki_dir=pki, admin_config=conf_path, created=tuple(created))
