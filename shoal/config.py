"""The client config file: where the apiservers are and who the client is.

Found at ``$SHOAL_CONFIG``, else ``~/.shoal/config``. YAML::

    apiVersion: shoal.dev/v1
    kind: Config
    servers: ["127.0.0.1:6443"]          # tried in order
    namespace: default                   # used when a command names none
    user: admin                          # informational; the certificate decides
    certificateAuthorityData: <base64 PEM>   # or certificateAuthority: /path/ca.crt
    clientCertificateData: <base64 PEM>      # or clientCertificate: /path
    clientKeyData: <base64 PEM>              # or clientKey: /path
    tlsServerName: localhost             # optional override for the TLS name check
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from shoal import errors

API_VERSION = "shoal.dev/v1"
KIND = "Config"
_FIELDS = {
    "apiVersion", "kind", "servers", "namespace", "user", "certificateAuthorityData",
    "certificateAuthority", "clientCertificateData", "clientCertificate", "clientKeyData",
    "clientKey", "tlsServerName",
}


def default_path() -> Path:
    env = os.environ.get("SHOAL_CONFIG")
    if env:
        return Path(env)
    return Path.home() / ".shoal" / "config"


@dataclass(frozen=True)
class ClientConfig:
    servers: tuple[str, ...]
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    namespace: str = "default"
    user: str = ""
    tls_server_name: str = ""
    source: str = field(default="", compare=False)

    def with_namespace(self, namespace: str) -> ClientConfig:
        return replace(self, namespace=namespace)

    def to_yaml(self, *, redact: bool = False) -> str:
        def b64(data: bytes) -> str:
            return "DATA+OMITTED" if redact else base64.b64encode(data).decode()

        doc: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "servers": list(self.servers),
            "namespace": self.namespace,
        }
        if self.user:
            doc["user"] = self.user
        if self.tls_server_name:
            doc["tlsServerName"] = self.tls_server_name
        doc["certificateAuthorityData"] = b64(self.ca_pem)
        doc["clientCertificateData"] = b64(self.cert_pem)
        doc["clientKeyData"] = "REDACTED" if redact else b64(self.key_pem)
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: Path) -> None:
        """Write the file readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_yaml())
        os.replace(tmp, path)


def _pem(doc: Mapping[str, Any], name: str, base: Path) -> bytes:
    data, ref = doc.get(f"{name}Data"), doc.get(name)
    if data:
        try:
            return base64.b64decode(str(data), validate=True)
        except ValueError:
            raise errors.BadRequest(f"{name}Data is not valid base64") from None
    if ref:
        p = Path(str(ref))
        p = p if p.is_absolute() else base / p
        try:
            return p.read_bytes()
        except OSError as e:
            raise errors.BadRequest(f"{name}: cannot read {p}: {e.strerror}") from None
    raise errors.BadRequest(f"the config sets neither {name}Data nor {name}")


def parse(text: str, *, source: str = "", base: Path | None = None) -> ClientConfig:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.BadRequest(f"{source}: not valid YAML: {e}") from None
    if not isinstance(doc, Mapping):
        raise errors.BadRequest(f"{source}: a client config must be a YAML mapping")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise errors.BadRequest(f"{source}: unknown field(s): {', '.join(unknown)}")
    if doc.get("kind", KIND) != KIND:
        raise errors.BadRequest(f"{source}: kind must be {KIND}")
    servers = doc.get("servers") or []
    if isinstance(servers, str):
        servers = [servers]
    if not servers or not all(isinstance(s, str) and s for s in servers):
        raise errors.BadRequest(f"{source}: servers must list at least one host:port")
    base = base or Path(".")
    return ClientConfig(
        servers=tuple(servers),
        ca_pem=_pem(doc, "certificateAuthority", base),
        cert_pem=_pem(doc, "clientCertificate", base),
        key_pem=_pem(doc, "clientKey", base),
        namespace=str(doc.get("namespace") or "default"),
        user=str(doc.get("user") or ""),
        tls_server_name=str(doc.get("tlsServerName") or ""),
        source=source,
    )


def load(path: Path | str | None = None) -> ClientConfig:
    """Read the client config from ``path``, ``$SHOAL_CONFIG`` or ``~/.shoal/config``."""
    p = Path(path) if path else default_path()
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise errors.BadRequest(
            f"no client config at {p} (set SHOAL_CONFIG, or run `shoal-apiserver init` "
            "and copy its admin.conf there)") from None
    except OSError as e:
        raise errors.BadRequest(f"cannot read client config {p}: {e.strerror}") from None
    return parse(text, source=str(p), base=p.parent)
