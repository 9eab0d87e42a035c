"""Bootstrap join tokens, stored as Kubernetes stores them.

A token is ``<id>.<secret>``: 6 and 16 characters of ``[a-z0-9]``. It lives in
the Secret ``kube-system/bootstrap-token-<id>`` of type
``bootstrap.kubernetes.io/token`` with the data keys ``token-id``,
``token-secret``, ``expiration`` (RFC 3339), ``description`` and
``usage-bootstrap-signing`` ("true": the token may be traded for a node
certificate). Deleting the Secret revokes the token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from shoal import errors
from shoal.api.core.v1 import core_pb2

NAMESPACE = "kube-system"
SECRET_TYPE = "bootstrap.kubernetes.io/token"
SECRET_PREFIX = "bootstrap-token-"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")


@dataclass(frozen=True)
class Token:
    id: str
    secret: str

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}"

    @property
    def secret_name(self) -> str:
        return SECRET_PREFIX + self.id


def generate() -> Token:
    return Token("".join(secrets.choice(_ALPHABET) for _ in range(6)),
                 "".join(secrets.choice(_ALPHABET) for _ in range(16)))


def parse(text: str) -> Token:
    m = _TOKEN_RE.match(text.strip())
    if m is None:
        raise errors.BadRequest(
            "a bootstrap token must look like [a-z0-9]{6}.[a-z0-9]{16}")
    return Token(m.group(1), m.group(2))


def to_secret(token: Token, *, ttl: dt.timedelta | None, description: str = "",
              now: dt.datetime | None = None) -> core_pb2.Secret:
    """The Secret that makes ``token`` valid (for ``ttl``; None never expires)."""
    s = core_pb2.Secret()
    s.metadata.name = token.secret_name
    s.metadata.namespace = NAMESPACE
    s.type = SECRET_TYPE
    s.data["token-id"] = token.id.encode()
    s.data["token-secret"] = token.secret.encode()
    s.data["usage-bootstrap-signing"] = b"true"
    if description:
        s.data["description"] = description.encode()
    if ttl is not None:
        when = (now or dt.datetime.now(dt.UTC)) + ttl
        s.data["expiration"] = when.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    return s


def expiration(secret: core_pb2.Secret) -> dt.datetime | None:
    raw = secret.data.get("expiration")
    if not raw:
        return None
    try:
        return dt.datetime.fromisoformat(raw.decode().replace("Z", "+00:00"))
    except ValueError:
        raise errors.Invalid(f"bootstrap token {secret.metadata.name}: bad expiration "
                             f"{raw!r}") from None


def check(token: Token, secret: core_pb2.Secret, *, now: dt.datetime,
          usage: str = "signing") -> None:
    """Raise Unauthorized unless ``secret`` makes ``token`` valid for ``usage`` now."""
    if secret.type != SECRET_TYPE:
        raise errors.Unauthorized("bootstrap token not found")
    stored = secret.data.get("token-secret", b"")
    if not hmac.compare_digest(stored, token.secret.encode()):
        raise errors.Unauthorized("bootstrap token not found")
    when = expiration(secret)
    if when is not None and when <= now:
        raise errors.Unauthorized(
            f"bootstrap token {token.id} expired at {when.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    if secret.data.get(f"usage-bootstrap-{usage}") != b"true":
        raise errors.Unauthorized(f"bootstrap token {token.id} may not be used for {usage}")


def ca_cert_hash(ca_pem: bytes) -> str:
    """``sha256:<hex>`` of the CA certificate's public key (SubjectPublicKeyInfo), the
    pin a joining node checks the cluster it reaches against (as kubeadm does)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()
