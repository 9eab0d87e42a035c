"""Pod volumes on the node: emptyDir, configMap, secret, hostPath, downwardAPI,
projected.

Layout: ``<root>/pods/<uid>/volumes/<kind>/<name>``, where kind is
``empty-dir``, ``configmap``, ``secret``, ``downward-api`` or ``projected``
(hostPath volumes are the host's own paths).

- ``emptyDir``: a directory; ``medium: Memory`` is a tmpfs (``sizeLimit``).
- ``secret``: always a tmpfs, so secret bytes never reach the disk.
- ``configMap``/``secret``/``downwardAPI``/``projected``: files written atomically
  (temp file + rename) with ``items``/``mode``/``defaultMode``; ``setup`` is
  idempotent and refreshes changed content when called again.
- ``hostPath``: the ``type`` is checked (``DirectoryOrCreate`` creates it).

Lifecycle per pod::

    setup (every sync; idempotent) --> mounts() for each container --> teardown
    teardown: unmount tmpfs, remove the pod's directory; idempotent

Service-account tokens (``nodeagent.satokens`` requests and rotates them):

- a projected ``serviceAccountToken`` source writes a token bound to the pod,
  for its ``audience`` and ``expirationSeconds``; a projected volume holding
  one is a tmpfs, like a secret;
- a pod with ``automountServiceAccountToken: true`` gets Kubernetes'
  ``kube-api-access`` volume: ``token``, ``ca.crt`` (the cluster CA) and
  ``namespace``, mounted read-only at
  ``/var/run/secrets/kubernetes.io/serviceaccount`` in every container that
  mounts nothing there itself. Unlike Kubernetes (which mounts it unless told
  not to), Shoal mounts it only when the pod asks; the ServiceAccount's own
  ``automountServiceAccountToken`` is not consulted.

Every sync rewrites a token file that is due for rotation.

A missing ConfigMap or Secret (not optional) raises ``ConfigError`` (the pod
shows ``CreateContainerConfigError``). Mounting goes through a small
``Mounter`` so unit tests need no root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nodeagent.environment import ConfigError, PodFacts, field_value, resource_value
from nodeagent.satokens import ServiceAccountTokens, TokenKey
from shoal import errors

Lookup = Callable[[str, str], Awaitable[Any | None]]
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The automounted token volume's key in setup()'s paths (no user volume can be named so).
AUTOMOUNT = "kube-api-access/automount"
AUTOMOUNT_EXPIRATION = 3607  # Kubernetes' value for the automounted token


def wants_token(pod: Any) -> bool:
    """Whether the pod asked for the automounted service-account token."""
    spec = pod.spec
    return bool(spec.HasField("automount_service_account_token")
                and spec.automount_service_account_token)


class Mounter(Protocol):
    def mount_tmpfs(self, path: Path, *, size: str = "") -> None: ...

    def unmount(self, path: Path) -> None: ...

    def is_mount(self, path: Path) -> bool: ...


class SystemMounter:
    """tmpfs through mount(8)/umount(8); needs CAP_SYS_ADMIN."""

    def mount_tmpfs(self, path: Path, *, size: str = "") -> None:
        opts = "mode=0755" + (f",size={size}" if size else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True,
                       capture_output=True, timeout=30)

    def unmount(self, path: Path) -> None:
        subprocess.run(["umount", str(path)], check=True, capture_output=True, timeout=30)

    def is_mount(self, path: Path) -> bool:
        return os.path.ismount(path)


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    readonly: bool
    propagation: str = ""


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe_rel(path: str) -> str:
    rel = os.path.normpath(path)
    if rel.startswith("..") or os.path.isabs(rel) or rel in (".", ""):
        raise ConfigError(f"volume item path {path!r} must be relative and stay inside")
    return rel


def _files_from(data: dict[str, bytes], items: Any, default_mode: int) -> dict[str, tuple[bytes,
                                                                                         int]]:
    out: dict[str, tuple[bytes, int]] = {}
    if items:
        for item in items:
            if item.key not in data:
                raise ConfigError(f"configured key {item.key!r} not found")
            mode = item.mode if item.HasField("mode") else default_mode
            out[_safe_rel(item.path)] = (data[item.key], mode)
    else:
        out = {_safe_rel(k): (v, default_mode) for k, v in data.items()}
    return out


def _sync_dir(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for rel, (data, mode) in files.items():
        _write_atomic(directory / rel, data, mode)
    for p in sorted(directory.rglob("*"), reverse=True):
        rel = str(p.relative_to(directory))
        if p.is_file() and rel not in files:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


class VolumeManager:
    def __init__(self, *, root: Path, mounter: Mounter | None = None) -> None:
        self.root = root
        self.mounter: Mounter = mounter or SystemMounter()

    def pod_dir(self, uid: str) -> Path:
        return self.root / "pods" / uid

    def _dir(self, uid: str, kind: str, name: str) -> Path:
        return self.pod_dir(uid) / "volumes" / kind / name

    def _tmpfs(self, path: Path, *, size: str = "") -> None:
        path.mkdir(parents=True, exist_ok=True)
        if not self.mounter.is_mount(path):
            self.mounter.mount_tmpfs(path, size=size)

    async def _data(self, lookup: Lookup, kind: str, namespace: str, name: str,
                    optional: bool) -> dict[str, bytes] | None:
        obj = await lookup(namespace, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{kind} "{name}" not found')
        data = {k: (v if isinstance(v, bytes) else v.encode()) for k, v in obj.data.items()}
        if kind == "configmap":
            data.update({k: bytes(v) for k, v in obj.binary_data.items()})
        return data

    async def setup(self, pod: Any, *, configmaps: Lookup, secrets: Lookup,
                    facts: PodFacts, tokens: ServiceAccountTokens | None = None
                    ) -> dict[str, Path]:
        """Make every volume of ``pod`` ready; returns volume name -> host path."""
        uid, ns = pod.metadata.uid, pod.metadata.namespace
        paths: dict[str, Path] = {}
        if wants_token(pod):
            d = self._dir(uid, "projected", "kube-api-access")
            self._tmpfs(d)
            token = await _token(tokens, pod, audience="",
                                 expiration_seconds=AUTOMOUNT_EXPIRATION)
            assert tokens is not None
            _sync_dir(d, {"token": (token.encode(), 0o644), "ca.crt": (tokens.ca_pem, 0o644),
                          "namespace": (ns.encode(), 0o644)})
            paths[AUTOMOUNT] = d
        for vol in pod.spec.volumes:
            if vol.HasField("host_path"):
                paths[vol.name] = self._host_path(vol.host_path)
            elif vol.HasField("config_map"):
                src = vol.config_map
                d = self._dir(uid, "configmap", vol.name)
                data = await self._data(configmaps, "configmap", ns, src.name,
                                        src.HasField("optional") and src.optional)
                mode = src.default_mode if src.HasField("default_mode") else 0o644
                _sync_dir(d, _files_from(data or {}, src.items, mode))
                paths[vol.name] = d
            elif vol.HasField("secret"):
                src = vol.secret
                d = self._dir(uid, "secret", vol.name)
                self._tmpfs(d)
                data = await self._data(secrets, "secret", ns, src.secret_name,
                                        src.HasField("optional") and src.optional)
                mode = src.default_mode if src.HasField("default_mode") else 0o644
                _sync_dir(d, _files_from(data or {}, src.items, mode))
                paths[vol.name] = d
            elif vol.HasField("downward_api"):
                d = self._dir(uid, "downward-api", vol.name)
                mode = vol.downward_api.default_mode if vol.downward_api.HasField(
                    "default_mode") else 0o644
                _sync_dir(d, self._downward(pod, vol.downward_api.items, mode, facts))
                paths[vol.name] = d
            elif vol.HasField("projected"):
                d = self._dir(uid, "projected", vol.name)
                if any(src.HasField("service_account_token") for src in vol.projected.sources):
                    self._tmpfs(d)  # a token is a secret: keep it off the disk
                _sync_dir(d, await self._projected(pod, vol.projected, configmaps=configmaps,
                                                   secrets=secrets, facts=facts,
                                                   tokens=tokens))
                paths[vol.name] = d
            elif vol.HasField("persistent_volume_claim"):
                raise ConfigError(f"volume {vol.name}: persistentVolumeClaim volumes are not "
                                  "supported by this node")
            else:  # emptyDir, also the default when no source is set
                d = self._dir(uid, "empty-dir", vol.name)
                ed = vol.empty_dir
                if ed.medium == "Memory":
                    self._tmpfs(d, size=_tmpfs_size(ed.size_limit.value
                                                    if ed.HasField("size_limit") else ""))
                else:
                    d.mkdir(parents=True, exist_ok=True)
                    os.chmod(d, 0o777)
                paths[vol.name] = d
        return paths

    def _downward(self, pod: Any, items: Any, mode: int, facts: PodFacts
                  ) -> dict[str, tuple[bytes, int]]:
        out: dict[str, tuple[bytes, int]] = {}
        for item in items:
            m = item.mode if item.HasField("mode") else mode
            if item.HasField("field_ref"):
                path = item.field_ref.field_path
                if path in ("metadata.labels", "metadata.annotations"):
                    src = pod.metadata.labels if path.endswith("labels") else \
                        pod.metadata.annotations
                    text = "\n".join(f'{k}="{v}"' for k, v in sorted(src.items()))
                else:
                    text = field_value(pod, path, facts)
            elif item.HasField("resource_field_ref"):
                ref = item.resource_field_ref
                spec = next((c for c in pod.spec.containers if c.name == ref.container_name),
                            None)
                if spec is None:
                    raise ConfigError(f"downwardAPI: no container {ref.container_name!r}")
                text = resource_value(spec, ref)
            else:
                continue
            out[_safe_rel(item.path)] = (text.encode(), m)
        return out

    async def _projected(self, pod: Any, proj: Any, *, configmaps: Lookup, secrets: Lookup,
                         facts: PodFacts, tokens: ServiceAccountTokens | None = None,
                         ) -> dict[str, tuple[bytes, int]]:
        mode = proj.default_mode if proj.HasField("default_mode") else 0o644
        ns = pod.metadata.namespace
        out: dict[str, tuple[bytes, int]] = {}
        for src in proj.sources:
            if src.HasField("config_map"):
                c = src.config_map
                data = await self._data(configmaps, "configmap", ns, c.name,
                                        c.HasField("optional") and c.optional)
                out.update(_files_from(data or {}, c.items, mode))
            elif src.HasField("secret"):
                s = src.secret
                data = await self._data(secrets, "secret", ns, s.name,
                                        s.HasField("optional") and s.optional)
                out.update(_files_from(data or {}, s.items, mode))
            elif src.HasField("downward_api"):
                out.update(self._downward(pod, src.downward_api.items, mode, facts))
            elif src.HasField("service_account_token"):
                t = src.service_account_token
                token = await _token(tokens, pod, audience=t.audience,
                                     expiration_seconds=t.expiration_seconds
                                     if t.HasField("expiration_seconds") else 3600)
                out[_safe_rel(t.path)] = (token.encode(), mode)
        return out

    def _host_path(self, hp: Any) -> Path:
        path = Path(hp.path)
        kind = hp.type if hp.HasField("type") else ""
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
        elif kind == "FileOrCreate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        elif kind == "Directory" and not path.is_dir():
            raise ConfigError(f"hostPath type check failed: {path} is not a directory")
        elif kind == "File" and not path.is_file():
            raise ConfigError(f"hostPath type check failed: {path} is not a file")
        elif kind == "Socket" and not path.is_socket():
            raise ConfigError(f"hostPath type check failed: {path} is not a socket")
        return path

    @staticmethod
    def mounts(container: Any, paths: dict[str, Path]) -> list[Mount]:
        out = []
        for vm in container.volume_mounts:
            host = paths.get(vm.name)
            if host is None:
                raise ConfigError(f"volume mount {vm.name!r} has no matching volume")
            if vm.sub_path:
                host = host / _safe_rel(vm.sub_path)
                if not host.exists():
                    host.mkdir(parents=True, exist_ok=True)
            out.append(Mount(container_path=vm.mount_path, host_path=str(host),
                             readonly=vm.read_only,
                             propagation=vm.mount_propagation
                             if vm.HasField("mount_propagation") else ""))
        auto = paths.get(AUTOMOUNT)
        if auto is not None and not any(m.container_path.rstrip("/") == SERVICE_ACCOUNT_DIR
                                        for m in out):
            out.append(Mount(container_path=SERVICE_ACCOUNT_DIR, host_path=str(auto),
                             readonly=True))
        return out

    def teardown(self, uid: str) -> None:
        """Unmount and remove everything of the pod. Idempotent."""
        base = self.pod_dir(uid)
        if not base.exists():
            return
        vols = base / "volumes"
        if vols.exists():
            for kind_dir in vols.iterdir():
                for d in kind_dir.iterdir():
                    if self.mounter.is_mount(d):
                        self.mounter.unmount(d)
        shutil.rmtree(base, ignore_errors=True)

    def known_pods(self) -> list[str]:
        d = self.root / "pods"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def _token(tokens: ServiceAccountTokens | None, pod: Any, *, audience: str,
                 expiration_seconds: int) -> str:
    sa = pod.spec.service_account_name or "default"
    if tokens is None:
        raise ConfigError("this node cannot get service-account tokens")
    key = TokenKey(namespace=pod.metadata.namespace, service_account=sa,
                   pod_name=pod.metadata.name, pod_uid=pod.metadata.uid, audience=audience,
                   expiration_seconds=expiration_seconds)
    try:
        return await tokens.get(key)
    except errors.ShoalError as e:
        raise ConfigError(f"cannot get a token for service account {sa!r}: {e}") from None


def _tmpfs_size(limit: str) -> str:
    if not limit:
        return ""
    from shoal import quantity

    return str(quantity.to_int(limit))
