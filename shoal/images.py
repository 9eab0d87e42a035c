"""Small OCI images built without a registry or Docker, and loaded into containerd.

``build_busybox_image`` writes an OCI image-layout archive (a tar holding
``oci-layout``, ``index.json`` and ``blobs/sha256/...``) whose single layer is
the host's static ``/bin/busybox`` (Debian's ``busybox-static``) with symlinks
for the common applets, a minimal ``/etc`` and the usual empty directories,
plus any ``files`` given. The same inputs give the same bytes, hence the same
digests: every tar entry has a fixed mtime, owner and order, and gzip carries
no timestamp or file name.

``import_image`` loads such an archive into a containerd namespace with
``ctr images import`` and checks that the image containerd now has is the one
that was built (same manifest digest).

A pod sandbox ("pause") image is just this image with
``cmd=["sleep", "2147483647"]``: containerd needs the sandbox's process to stay
alive, since the pod's namespaces live as long as it does.

``normalize_reference`` spells an image reference the way containerd's CRI
stores it (``busybox`` -> ``docker.io/library/busybox:latest``), so callers
can compare a pod's image with what the runtime lists.

Only the standard library is used. ``import_image`` blocks (it runs a
process); call it through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from shoal import errors

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# containerd reads the full image name from this one when importing.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_CMD = ("sleep", "2147483647")

# Applets linked into /bin. Every one is in Debian's busybox-static 1.35.
APPLETS = (
    "[", "awk", "basename", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df",
    "dirname", "du", "echo", "env", "expr", "false", "find", "free", "grep", "head",
    "hostname", "httpd", "id", "ifconfig", "ip", "kill", "ln", "ls", "mkdir", "mktemp",
    "mount", "mv", "nc", "netstat", "nslookup", "ping", "printenv", "printf", "ps", "pwd",
    "readlink", "rm", "rmdir", "sed", "seq", "sh", "sleep", "sort", "stat", "tail", "tee",
    "test", "timeout", "top", "touch", "tr", "true", "uname", "uniq", "uptime", "usleep",
    "wc", "wget", "which", "whoami", "xargs", "yes",
)
_DIRS = ("bin", "dev", "etc", "home", "proc", "root", "sys", "tmp", "usr", "usr/bin",
         "var", "var/www")
_PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
           b"nobody:x:65534:65534:nobody:/home:/bin/false\n")
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
# A fixed, valid timestamp for every entry (2000-01-01T00:00:00Z).
_EPOCH = 946684800
_CREATED = "2000-01-01T00:00:00Z"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class ImageRef:
    """A built image archive and the digests that identify it."""

    name: str              # normalized reference, e.g. docker.io/shoal/busybox:1
    archive: Path          # the OCI image-layout tar
    digest: str            # manifest digest: what containerd lists for the image
    config_digest: str     # the image ID CRI reports (ImageStatus.id, image_ref)
    layer_digest: str
    diff_id: str           # digest of the uncompressed layer

    @property
    def ref_by_digest(self) -> str:
        """``name@digest`` without the tag."""
        repo = self.name.rsplit(":", 1)[0] if _has_tag(self.name) else self.name
        return f"{repo}@{self.digest}"


def _has_tag(ref: str) -> bool:
    last = ref.rsplit("/", 1)[-1]
    return ":" in last and "@" not in ref


def normalize_reference(ref: str) -> str:
    """Docker-style normalization: default registry ``docker.io``, ``library/``
    for single-name Docker Hub images, tag ``latest`` when there is neither a
    tag nor a digest."""
    if not ref or ref != ref.strip():
        raise errors.BadRequest(f"invalid image reference {ref!r}")
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", ref
    if registry == "docker.io" and "/" not in path.split("@", 1)[0]:
        path = "library/" + path
    if "@" not in path and ":" not in path.rsplit("/", 1)[-1]:
        path += ":latest"
    return f"{registry}/{path}"


def host_architecture() -> str:
    """The OCI architecture name of this machine (``amd64``, ``arm64``...)."""
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _info(name: str, kind: bytes, *, mode: int, size: int = 0,
          linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = linkname
    ti.mtime = _EPOCH
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def _layer_tar(busybox: bytes, files: Mapping[str, bytes]) -> bytes:
    """The rootfs layer, uncompressed; entries sorted by path."""
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add_dir(path: str) -> None:
        mode = 0o1777 if path == "tmp" else 0o755
        entries.setdefault(path, (_info(path, tarfile.DIRTYPE, mode=mode), None))

    for d in _DIRS:
        add_dir(d)
    entries["bin/busybox"] = (_info("bin/busybox", tarfile.REGTYPE, mode=0o755,
                                    size=len(busybox)), busybox)
    for applet in APPLETS:
        entries[f"bin/{applet}"] = (_info(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777,
                                          linkname="busybox"), None)
    user_files = {"etc/passwd": _PASSWD, "etc/group": _GROUP,
                  "etc/hostname": b"localhost\n"}
    for raw, content in files.items():
        rel = PurePosixPath("/", raw).relative_to("/")
        if not rel.parts or ".." in rel.parts:
            raise errors.BadRequest(f"bad file path in image: {raw!r}")
        user_files[str(rel)] = content
    for name, content in user_files.items():
        for parent in reversed(PurePosixPath(name).parents[:-1]):
            add_dir(str(parent))
        executable = content.startswith(b"#!") or name.startswith(("bin/", "usr/bin/"))
        entries[name] = (_info(name, tarfile.REGTYPE, mode=0o755 if executable else 0o644,
                               size=len(content)), content)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            info, data = entries[path]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def build_busybox_image(out: Path, *, name: str, cmd: Sequence[str],
                        entrypoint: Sequence[str] | None = None,
                        env: Mapping[str, str] | None = None,
                        files: Mapping[str, bytes] | None = None,
                        working_dir: str = "/",
                        busybox: Path = Path("/bin/busybox")) -> ImageRef:
    """Write a one-layer busybox image as an OCI image-layout tar at ``out``.

    ``name`` is normalized (``local/busybox:1`` -> ``docker.io/local/busybox:1``),
    as containerd would. ``env`` adds to ``PATH``; ``files`` maps absolute paths
    in the image to their contents (a ``#!`` script or anything under ``/bin`` is
    made executable). Deterministic: the same arguments give the same digests.
    """
    if not busybox.is_file():
        raise errors.BadRequest(f"{busybox} not found (install Debian's busybox-static)")
    ref = normalize_reference(name)
    layer_raw = _layer_tar(busybox.read_bytes(), files or {})
    layer = _gzip(layer_raw)
    diff_id = _digest(layer_raw)
    arch = host_architecture()
    env_list = [f"PATH={DEFAULT_PATH}"] + [f"{k}={v}" for k, v in (env or {}).items()
                                           if k != "PATH"]
    if env and "PATH" in env:
        env_list[0] = f"PATH={env['PATH']}"
    image_config: dict[str, object] = {"Env": env_list, "Cmd": list(cmd),
                                       "WorkingDir": working_dir}
    if entrypoint is not None:
        image_config["Entrypoint"] = list(entrypoint)
    config = _json({
        "architecture": arch,
        "os": "linux",
        "created": _CREATED,
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": _CREATED, "created_by": "shoal.images.build_busybox_image"}],
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": _digest(layer),
                    "size": len(layer)}],
    })
    index = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": _digest(manifest),
            "size": len(manifest),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {ANNOTATION_REF_NAME: ref, ANNOTATION_CONTAINERD_NAME: ref},
        }],
    })
    blobs = {_digest(b): b for b in (layer, config, manifest)}
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_info("blobs", tarfile.DIRTYPE, mode=0o755), None),
        (_info("blobs/sha256", tarfile.DIRTYPE, mode=0o755), None),
    ]
    for digest in sorted(blobs):
        blob = blobs[digest]
        path = "blobs/sha256/" + digest.removeprefix("sha256:")
        members.append((_info(path, tarfile.REGTYPE, mode=0o644, size=len(blob)), blob))
    layout = _json({"imageLayoutVersion": "1.0.0"})
    members.append((_info("index.json", tarfile.REGTYPE, mode=0o644, size=len(index)), index))
    members.append((_info("oci-layout", tarfile.REGTYPE, mode=0o644, size=len(layout)),
                    layout))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    tmp.replace(out)
    return ImageRef(name=ref, archive=out, digest=_digest(manifest),
                    config_digest=_digest(config), layer_digest=_digest(layer),
                    diff_id=diff_id)


def build_sandbox_image(out: Path, *, name: str) -> ImageRef:
    """The pod sandbox ("pause") image: busybox sleeping for ever."""
    return build_busybox_image(out, name=name, cmd=list(SANDBOX_CMD))


def _ctr(address: str, namespace: str, *args: str, timeout: float) -> str:
    ctr = shutil.which("ctr")
    if ctr is None:
        raise errors.InternalError("ctr is not installed (it ships with Debian's containerd)")
    try:
        done = subprocess.run([ctr, "--address", address, "-n", namespace, *args],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise errors.Unavailable(f"ctr {' '.join(args[:2])} timed out after {timeout:g}s",
                                 retry_after=1.0) from e
    if done.returncode != 0:
        raise errors.InternalError(
            f"ctr {' '.join(args[:2])} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


def image_digests(*, address: str, namespace: str = "k8s.io",
                  timeout: float = 30.0) -> dict[str, str]:
    """Image name -> target (manifest or index) digest, as ``ctr images ls`` lists."""
    out = _ctr(address, namespace, "images", "ls", timeout=timeout)
    found: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[2].startswith("sha256:"):
            found[cols[0]] = cols[2]
    return found


def import_image(archive: Path | ImageRef, *, address: str, namespace: str = "k8s.io",
                 timeout: float = 120.0) -> str:
    """Import an OCI archive into containerd at ``address`` (its socket path) and
    return the image's manifest digest. Given an :class:`ImageRef`, also check
    that containerd now holds that very image under its name (else
    ``InternalError``). Idempotent: importing the same archive again is a no-op.
    """
    if isinstance(archive, ImageRef):
        ref: ImageRef | None = archive
        path = archive.archive
    else:
        ref, path = None, Path(archive)
    if not path.is_file():
        raise errors.NotFound(f"image archive {path} not found")
    _ctr(address, namespace, "images", "import", "--all-platforms", str(path),
         timeout=timeout)
    names = _archive_names(path)
    found = image_digests(address=address, namespace=namespace, timeout=timeout)
    if ref is not None:
        got = found.get(ref.name)
        if got != ref.digest:
            raise errors.InternalError(
                f"after importing {path}, containerd has {ref.name} at {got or 'nothing'}, "
                f"not {ref.digest}")
        return ref.digest
    for name in names:
        if name in found:
            return found[name]
    raise errors.InternalError(f"after importing {path}, containerd lists none of {names}")


def _archive_names(path: Path) -> list[str]:
    """The image names an OCI archive's index.json announces."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise errors.BadRequest(f"{path} has no index.json")
        index = json.loads(member.read())
    names = []
    for m in index.get("manifests", []):
        ann = m.get("annotations") or {}
        name = ann.get(ANNOTATION_CONTAINERD_NAME) or ann.get(ANNOTATION_REF_NAME)
        if name:
            names.append(name)
    return names
