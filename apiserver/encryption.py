"""Encryption at rest: Kubernetes' EncryptionConfiguration, AES-GCM and identity.

The config file (``shoal-apiserver serve --encryption-provider-config FILE``)::

    apiVersion: apiserver.config.k8s.io/v1
    kind: EncryptionConfiguration
    resources:
      - resources: [secrets]          # plural resources, "deployments.apps" for groups
        providers:                    # the FIRST provider encrypts every write
          - aesgcm:
              keys:                   # the first key encrypts; every key decrypts
                - name: key2
                  secret: <base64 of 16, 24 or 32 random bytes>
                - name: key1
                  secret: <base64>
          - identity: {}              # reads values written before encryption

Stored form of an encrypted value, as Kubernetes writes it::

    k8s:enc:aesgcm:v1:<key name>:<12-byte random nonce><ciphertext + 16-byte tag>

The storage key (``/registry/secrets/<ns>/<name>``) is the AES-GCM additional
data, so a value copied under another key does not decrypt. Reading picks the
provider by the value's prefix; a value read through anything but the first
provider (or key) is *stale*: the next write of the object rewrites it under
the current key (``shoal secrets reencrypt`` writes every Secret once).

Rotation (every apiserver must know a key before any of them writes with it):
1. add the new key second in the list, restart every apiserver (all can read it);
2. move it first, restart (new writes use it);
3. ``shoal secrets reencrypt`` (every Secret rewritten under the new key);
4. remove the old key, restart.

A bad file is refused as a whole at start, naming the field
(``resources[0].providers[0].aesgcm.keys[1].secret: ...``).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets as pysecrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shoal import errors

API_VERSION = "apiserver.config.k8s.io/v1"
KIND = "EncryptionConfiguration"
ENCRYPTED_PREFIX = b"k8s:enc:"
NONCE_BYTES = 12
KEY_SIZES = (16, 24, 32)
SUPPORTED_PROVIDERS = ("aesgcm", "identity")
# Kubernetes' other providers: named in the refusal so the message is useful.
KNOWN_UNSUPPORTED = ("aescbc", "secretbox", "kms")


class DecryptError(Exception):
    """A stored value cannot be turned back into plaintext."""


class Provider(Protocol):
    """One way of storing values. ``prefix`` marks the values it wrote."""

    name: str
    prefix: bytes

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes: ...

    def decrypt(self, stored: bytes, *, aad: bytes) -> bytes: ...


class Identity:
    """Plain bytes. Reads anything that is not marked as encrypted."""

    name = "identity"
    prefix = b""

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        return plaintext

    def decrypt(self, stored: bytes, *, aad: bytes) -> bytes:
        if stored.startswith(ENCRYPTED_PREFIX):
            raise DecryptError("the value is encrypted, but no configured key matches its "
                               f"prefix {_prefix_of(stored)!r}")
        return stored


class AESGCMKey:
    """AES-GCM with one key: random 96-bit nonce per write, storage key as AAD."""

    def __init__(self, *, name: str, secret: bytes) -> None:
        self.name = f"aesgcm:{name}"
        self.key_name = name
        self.prefix = f"k8s:enc:aesgcm:v1:{name}:".encode()
        self._aead = AESGCM(secret)

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return self.prefix + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, stored: bytes, *, aad: bytes) -> bytes:
        body = stored[len(self.prefix):]
        if len(body) < NONCE_BYTES + 16:
            raise DecryptError(f"the value is too short for {self.name}")
        try:
            return self._aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptError(f"{self.name} does not authenticate the value (wrong key, "
                               "tampered, or moved from another storage key)") from None


def _prefix_of(stored: bytes) -> str:
    parts = stored.split(b":", 5)
    return b":".join(parts[:5]).decode(errors="replace") + ":"


@dataclass(frozen=True)
class Read:
    plaintext: bytes
    # Read through a provider other than the one that writes: rewrite it.
    stale: bool


class Transformer:
    """The providers of one set of resources, in config order."""

    def __init__(self, providers: Iterable[Provider]) -> None:
        self.providers = tuple(providers)
        if not self.providers:
            raise ValueError("a transformer needs at least one provider")
        self.writer = self.providers[0]
        # Longest prefixes first: identity (b"") is the fallback.
        self._readers = sorted(self.providers, key=lambda p: -len(p.prefix))

    def to_storage(self, plaintext: bytes, *, key: str) -> bytes:
        return self.writer.encrypt(plaintext, aad=key.encode())

    def from_storage(self, stored: bytes, *, key: str) -> Read:
        for p in self._readers:
            if stored.startswith(p.prefix):
                return Read(p.decrypt(stored, aad=key.encode()), stale=p is not self.writer)
        raise DecryptError(f"no configured key matches the prefix {_prefix_of(stored)!r}")


@dataclass(frozen=True)
class EncryptionConfig:
    """Which storage prefixes are transformed, and how. Empty: nothing is."""

    by_prefix: Mapping[str, Transformer]
    source: str = ""

    def transformer_for(self, key: str) -> Transformer | None:
        for prefix, t in self.by_prefix.items():
            if key.startswith(prefix):
                return t
        return None

    @property
    def resources(self) -> tuple[str, ...]:
        return tuple(p.strip("/").split("/", 1)[1] for p in self.by_prefix)


# -- the config file -----------------------------------------------------------


def _fail(path: str, message: str, source: str) -> errors.BadRequest:
    where = f"{source}: " if source else ""
    return errors.BadRequest(f"encryption config {where}{path}: {message}")


def _aesgcm(path: str, spec: Any, source: str, names: set[str]) -> list[Provider]:
    if not isinstance(spec, Mapping) or set(spec) - {"keys"}:
        raise _fail(path, "must be a mapping with only `keys`", source)
    keys = spec.get("keys")
    if not isinstance(keys, list) or not keys:
        raise _fail(f"{path}.keys", "must list at least one key", source)
    out: list[Provider] = []
    for i, k in enumerate(keys):
        kp = f"{path}.keys[{i}]"
        if not isinstance(k, Mapping) or set(k) != {"name", "secret"}:
            raise _fail(kp, "must have exactly `name` and `secret`", source)
        name, secret = k["name"], k["secret"]
        if not isinstance(name, str) or not name or ":" in name:
            raise _fail(f"{kp}.name", "must be a non-empty string without ':'", source)
        if name in names:
            raise _fail(f"{kp}.name", f"duplicate key name {name!r}", source)
        names.add(name)
        if not isinstance(secret, str):
            raise _fail(f"{kp}.secret", "must be a base64 string", source)
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise _fail(f"{kp}.secret", "is not valid base64", source) from None
        if len(raw) not in KEY_SIZES:
            raise _fail(f"{kp}.secret", f"the key is {len(raw)} bytes; AES-GCM keys are "
                        "16, 24 or 32 bytes", source)
        out.append(AESGCMKey(name=name, secret=raw))
    return out


def _providers(path: str, items: Any, source: str) -> list[Provider]:
    if not isinstance(items, list) or not items:
        raise _fail(path, "must list at least one provider", source)
    out: list[Provider] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        pp = f"{path}[{i}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise _fail(pp, "must name exactly one provider (aesgcm or identity)", source)
        (which, spec), = item.items()
        if which == "identity":
            if spec not in (None, {}):
                raise _fail(f"{pp}.identity", "takes no settings ({})", source)
            out.append(Identity())
        elif which == "aesgcm":
            out.extend(_aesgcm(f"{pp}.aesgcm", spec, source, names))
        elif which in KNOWN_UNSUPPORTED:
            raise _fail(pp, f"provider {which!r} is not supported here (supported: "
                        f"{', '.join(SUPPORTED_PROVIDERS)})", source)
        else:
            raise _fail(pp, f"unknown provider {which!r} (supported: "
                        f"{', '.join(SUPPORTED_PROVIDERS)})", source)
    return out


def parse_config(text: str, *, source: str = "",
                 known_resources: Iterable[str] | None = None) -> EncryptionConfig:
    """The config in ``text``; ``errors.BadRequest`` naming the first bad field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _fail("(file)", f"not valid YAML: {e}", source) from None
    if not isinstance(doc, Mapping):
        raise _fail("(file)", "must be a YAML mapping", source)
    unknown = sorted(set(doc) - {"apiVersion", "kind", "resources"})
    if unknown:
        raise _fail(unknown[0], "unknown field", source)
    if doc.get("apiVersion") != API_VERSION:
        raise _fail("apiVersion", f"must be {API_VERSION}, not {doc.get('apiVersion')!r}",
                    source)
    if doc.get("kind") != KIND:
        raise _fail("kind", f"must be {KIND}, not {doc.get('kind')!r}", source)
    entries = doc.get("resources")
    if not isinstance(entries, list) or not entries:
        raise _fail("resources", "must list at least one entry", source)
    known = set(known_resources) if known_resources is not None else None
    by_prefix: dict[str, Transformer] = {}
    for i, entry in enumerate(entries):
        ep = f"resources[{i}]"
        if not isinstance(entry, Mapping) or set(entry) - {"resources", "providers"}:
            raise _fail(ep, "must have only `resources` and `providers`", source)
        names = entry.get("resources")
        if not isinstance(names, list) or not names:
            raise _fail(f"{ep}.resources", "must list at least one resource", source)
        transformer = Transformer(_providers(f"{ep}.providers", entry.get("providers"),
                                             source))
        for j, name in enumerate(names):
            rp = f"{ep}.resources[{j}]"
            if not isinstance(name, str) or not name or "/" in name or "*" in name:
                raise _fail(rp, f"{name!r} must be a plural resource such as secrets or "
                            "deployments.apps (wildcards are not supported)", source)
            if known is not None and name not in known:
                raise _fail(rp, f"unknown resource {name!r}", source)
            prefix = f"/registry/{name}/"
            if prefix in by_prefix:
                raise _fail(rp, f"{name!r} is configured twice", source)
            by_prefix[prefix] = transformer
    return EncryptionConfig(by_prefix=by_prefix, source=source)


def load_config(path: Path | str, *,
                known_resources: Iterable[str] | None = None) -> EncryptionConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise errors.BadRequest(f"encryption config {p}: cannot read: "
                                f"{e.strerror or e}") from None
    return parse_config(text, source=str(p), known_resources=known_resources)


def new_key_secret() -> str:
    """A fresh 32-byte AES key, base64 (what ``head -c 32 /dev/urandom | base64`` makes)."""
    return base64.b64encode(pysecrets.token_bytes(32)).decode()


def default_config_text(*, key_name: str = "key1", secret: str = "") -> str:
    """Secrets under one new AES-GCM key, identity to read older plaintext."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "resources": [{
            "resources": ["secrets"],
            "providers": [
                {"aesgcm": {"keys": [{"name": key_name, "secret": secret or new_key_secret()}]}},
                {"identity": {}},
            ],
        }],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def ensure_config_file(path: Path) -> bool:
    """Write :func:`default_config_text` to ``path`` (mode 0600) unless it exists.
    Returns whether it wrote one."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(default_config_text())
    return True
