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
    token: <service-account token>       # instead of a client certificate:
    tokenFile: /path/token               #   sent as "authorization: Bearer"; the
                                         #   file is re-read as it is rotated

Inside a pod, :func:`in_cluster` builds a config from the mounted service-account
token (``/var/run/secrets/kubernetes.io/serviceaccount``) and
``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``, as client-go does. Token
callers use the apiserver's port for callers without client certificates
(``--join-listen``).
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
from shoal.files import write_atomic

API_VERSION = "shoal.dev/v1"
KIND = "Config"
_FIELDS = {
    "apiVersion", "kind", "servers", "namespace", "user", "certificateAuthorityData",
    "certificateAuthority", "clientCertificateData", "clientCertificate", "clientKeyData",
    "clientKey", "tlsServerName", "token", "tokenFile",
}
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


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
    # A bearer token (or a file holding one) instead of a client certificate.
    token: str = field(default="", repr=False)
    token_file: str = ""
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
        if self.cert_pem:
            doc["clientCertificateData"] = b64(self.cert_pem)
            doc["clientKeyData"] = "REDACTED" if redact else b64(self.key_pem)
        if self.token:
            doc["token"] = "REDACTED" if redact else self.token
        if self.token_file:
            doc["tokenFile"] = self.token_file
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: Path) -> None:
        """Write the file readable by its owner only."""
        write_atomic(path, self.to_yaml().encode(), mode=0o600)


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
    token, token_file = str(doc.get("token") or ""), str(doc.get("tokenFile") or "")
    if token_file and not Path(token_file).is_absolute():
        token_file = str(base / token_file)
    with_cert = not (token or token_file) or any(
        doc.get(f) for f in ("clientCertificateData", "clientCertificate"))
    return ClientConfig(
        servers=tuple(servers),
        ca_pem=_pem(doc, "certificateAuthority", base),
        cert_pem=_pem(doc, "clientCertificate", base) if with_cert else b"",
        key_pem=_pem(doc, "clientKey", base) if with_cert else b"",
        token=token, token_file=token_file,
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


def in_cluster(*, directory: Path = SERVICE_ACCOUNT_DIR,
               environ: Mapping[str, str] | None = None) -> ClientConfig:
    """A config from inside a pod: the mounted token, CA and namespace, and the
    apiserver from KUBERNETES_SERVICE_HOST/PORT (client-go's in-cluster config)."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise errors.BadRequest("not in a cluster: KUBERNETES_SERVICE_HOST and "
                                "KUBERNETES_SERVICE_PORT must be set")
    token = directory / "token"
    if not token.is_file():
        raise errors.BadRequest(f"not in a cluster: no service-account token at {token}")
    try:
        ca = (directory / "ca.crt").read_bytes()
        ns_file = directory / "namespace"
        namespace = ns_file.read_text().strip() if ns_file.exists() else "default"
    except OSError as e:
        raise errors.BadRequest(f"cannot read {directory}: {e.strerror or e}") from None
    server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ClientConfig(servers=(server,), ca_pem=ca, cert_pem=b"", key_pem=b"",
                        namespace=namespace or "default", token_file=str(token),
                        source=f"in-cluster ({directory})")
