"""Workload keys and certificates with ``cryptography``, run in a helper process.

The meshagent does not load ``cryptography`` itself: the library's code and
Python modules are about 9 MB of a long-running agent's memory, for work done
once per workload identity every half-life. Instead, :class:`HelperKeys` (in
:mod:`meshagent.identity`) runs ``python -m meshagent.keygen`` for each step,
one JSON request on stdin and one JSON answer on stdout, and the process ends::

    {"op": "new", "spiffe_id": ID}
        -> {"key_pem": PEM, "csr_pem": PEM}          a fresh P-256 key and its CSR
    {"op": "accept", "spiffe_id": ID, "key_pem": PEM, "chain_pem": PEM}
        -> {"not_before": S, "not_after": S, "serial": N}   the CA's answer checked
        -> {"error": WHY}                                  not for our key or identity

The key goes from the helper to the agent through a pipe; neither writes it to
disk. Tests and tools may call the functions here directly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoal import spiffe


class RejectedCertificate(Exception):
    """What the CA sent back is unreadable, or not for our key or identity."""


@dataclass(frozen=True)
class CertFacts:
    not_before: float  # unix seconds
    not_after: float
    serial: int


def make_csr(ident: spiffe.SpiffeId) -> tuple[bytes, bytes]:
    """A fresh P-256 key (PKCS#8 PEM) and a CSR whose only SAN is the SPIFFE URI."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier(str(ident))]), critical=True)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(spiffe.SCHEME)]


def accept(chain_pem: bytes, key_pem: bytes, ident: spiffe.SpiffeId) -> CertFacts:
    """Check the CA's chain is for our key and identity; the leaf's validity."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise RejectedCertificate(f"the CA sent an unreadable chain: {e}") from None
    leaf = certs[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    if leaf.public_key() != key.public_key():
        raise RejectedCertificate("the CA's certificate is not for our key")
    if spiffe_ids_of(leaf) != [str(ident)]:
        raise RejectedCertificate(
            f"the CA's certificate names {spiffe_ids_of(leaf)}, not {ident}")
    return CertFacts(not_before=leaf.not_valid_before_utc.timestamp(),
                     not_after=leaf.not_valid_after_utc.timestamp(),
                     serial=leaf.serial_number)


def answer(request: dict[str, str]) -> dict[str, object]:
    """One request of the helper protocol (see the module docstring)."""
    ident = spiffe.parse(request["spiffe_id"])
    if request["op"] == "new":
        key_pem, csr_pem = make_csr(ident)
        return {"key_pem": key_pem.decode(), "csr_pem": csr_pem.decode()}
    if request["op"] == "accept":
        try:
            facts = accept(request["chain_pem"].encode(), request["key_pem"].encode(), ident)
        except RejectedCertificate as e:
            return {"error": str(e)}
        return {"not_before": facts.not_before, "not_after": facts.not_after,
                "serial": facts.serial}
    raise ValueError(f"unknown op {request['op']!r}")


def main() -> int:
    json.dump(answer(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
