"""Small OCI images built without a registry or Docker, and loaded into containerd.

``build_busybox_image`` writes an OCI image-layout archive (a tar holding
``oci-layout``, ``index.json`` and ``blobs/sha256/...``) whose single layer is
the host's static ``/bin/busybox`` (Debian's ``busybox-static``) with symlinks
for the common applets, a minimal ``/etc`` and the usual empty directories,
plus any ``files`` given. The same inputs give the same bytes, hence the same
digests: every tar entry has a fixed mtime, owner and order, and gzip carries
no timestamp or file name.

Images described by a spec (``shoal image build``)::

    # shoal-image.yaml (or any file given with -f)
    name: hello:1                      # optional; -t overrides it
    base: busybox                      # the only base there is
    files:
      /var/www/index.html: "<h1>hi</h1>"
      /bin/serve: {from: serve.sh}     # relative to the spec's directory
      /etc/app.conf: {content: "x=1", mode: "0600"}
    env: {PORT: "8080"}
    entrypoint: ["/bin/serve"]
    cmd: ["--verbose"]
    workingDir: /var/www
    user: "65534"
    labels: {org.example.team: web}

``parse_spec`` checks such a mapping and reports every bad field by its path
(``SpecError``); ``tree_files`` turns a directory into image files (its tree
becomes the image's root); ``build_from_spec`` builds the archive.

``OCIArchive`` reads an archive back (index, manifests, blobs, each checked
against its digest): ``shoal image push`` and ``import`` use it.

``import_image`` loads such an archive into a containerd namespace with
``ctr images import`` and checks that every image containerd now has under the
archive's names is the very manifest the archive holds.

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
import os
import platform
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from shoal import errors

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (MEDIA_MANIFEST, MEDIA_DOCKER_MANIFEST)
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
# containerd reads the full image name from this one when importing.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SANDBOX_CMD = ("sleep", "2147483647")
SANDBOX_IMAGE = "shoal/pause:1"
# The spec a directory given to ``shoal image build DIR`` may hold.
SPEC_FILE = "shoal-image.yaml"
BASES = ("busybox",)

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
_READ_CHUNK = 1 << 20

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


@dataclass(frozen=True)
class ImageFile:
    """One entry an image adds to (or replaces in) its base.

    A regular file holds ``data``; ``mode`` None means 0755 for a ``#!`` script
    or anything under ``/bin`` and ``/usr/bin``, else 0644. ``link`` makes a
    symlink to that target instead, ``directory`` an (empty) directory.
    """

    data: bytes = b""
    mode: int | None = None
    link: str = ""
    directory: bool = False


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


def _image_path(raw: str) -> str:
    """``/a/b`` or ``a/b`` -> ``a/b``; BadRequest for the root or a path with ``..``."""
    rel = PurePosixPath("/", raw).relative_to("/")
    if not rel.parts or ".." in rel.parts:
        raise errors.BadRequest(f"bad file path in image: {raw!r}")
    return str(rel)


def _layer_tar(busybox: bytes, files: Mapping[str, bytes | ImageFile]) -> bytes:
    """The rootfs layer, uncompressed; entries sorted by path."""
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def add_dir(path: str, mode: int | None = None) -> None:
        mode = mode if mode is not None else (0o1777 if path == "tmp" else 0o755)
        entries.setdefault(path, (_info(path, tarfile.DIRTYPE, mode=mode), None))

    for d in _DIRS:
        add_dir(d)
    entries["bin/busybox"] = (_info("bin/busybox", tarfile.REGTYPE, mode=0o755,
                                    size=len(busybox)), busybox)
    for applet in APPLETS:
        entries[f"bin/{applet}"] = (_info(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777,
                                          linkname="busybox"), None)
    user_files: dict[str, bytes | ImageFile] = {
        "etc/passwd": _PASSWD, "etc/group": _GROUP, "etc/hostname": b"localhost\n"}
    for raw, content in files.items():
        user_files[_image_path(raw)] = content
    leaves = {n for n, c in user_files.items()
              if not (isinstance(c, ImageFile) and c.directory)}
    for name in user_files:
        for parent in PurePosixPath(name).parents[:-1]:
            if str(parent) in leaves:
                raise errors.BadRequest(
                    f"image path /{parent} is a file, yet /{name} is inside it")
    for name, content in user_files.items():
        for parent in reversed(PurePosixPath(name).parents[:-1]):
            add_dir(str(parent))
        if isinstance(content, ImageFile):
            if content.directory:
                if content.mode is not None:
                    entries.pop(name, None)
                add_dir(name, content.mode)
                continue
            if content.link:
                entries[name] = (_info(name, tarfile.SYMTYPE, mode=0o777,
                                       linkname=content.link), None)
                continue
            body, mode = content.data, content.mode
        else:
            body, mode = content, None
        if mode is None:
            executable = body.startswith(b"#!") or name.startswith(("bin/", "usr/bin/"))
            mode = 0o755 if executable else 0o644
        entries[name] = (_info(name, tarfile.REGTYPE, mode=mode, size=len(body)), body)
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
                        files: Mapping[str, bytes | ImageFile] | None = None,
                        working_dir: str = "/",
                        user: str = "",
                        labels: Mapping[str, str] | None = None,
                        busybox: Path = Path("/bin/busybox")) -> ImageRef:
    """Write a one-layer busybox image as an OCI image-layout tar at ``out``.

    ``name`` is normalized (``local/busybox:1`` -> ``docker.io/local/busybox:1``),
    as containerd would. ``env`` adds to ``PATH``; ``files`` maps absolute paths
    in the image to their contents (bytes, or an :class:`ImageFile`; a ``#!``
    script or anything under ``/bin`` is made executable). ``user`` and
    ``labels`` go into the image config only when given. Deterministic: the
    same arguments give the same digests. ``out`` is replaced atomically.
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
    if user:
        image_config["User"] = user
    if labels:
        image_config["Labels"] = dict(labels)
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


def build_sandbox_image(out: Path, *, name: str = SANDBOX_IMAGE) -> ImageRef:
    """The pod sandbox ("pause") image: busybox sleeping for ever."""
    return build_busybox_image(out, name=name, cmd=list(SANDBOX_CMD))


# -- image specs ----------------------------------------------------------------


class SpecError(errors.BadRequest):
    """An image spec (or the files it names) cannot be used. ``problems`` holds
    one line per bad field, each starting with the spec's name and the field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class ImageSpec:
    """What ``shoal image build`` makes, checked (see the module docstring)."""

    name: str = ""
    base: str = "busybox"
    files: Mapping[str, ImageFile] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = "/"
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


_SPEC_FIELDS = ("name", "base", "files", "env", "entrypoint", "cmd", "workingDir", "user",
                "labels")


def _spec_mode(value: object, where: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            problems.append(f"{where}: {value!r} is not an octal mode such as \"0755\"")
            return None
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        problems.append(f"{where}: must be an octal string such as \"0755\"")
        return None
    if not 0 <= mode <= 0o7777:
        problems.append(f"{where}: {oct(mode)} is out of range (0 to 07777)")
        return None
    return mode


def _spec_file(path: str, value: object, *, base_dir: Path, where: str,
               problems: list[str]) -> ImageFile | None:
    if isinstance(value, str):
        return ImageFile(data=value.encode())
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be the file's text, or a mapping with "
                        "content or from (and mode)")
        return None
    unknown = sorted(set(map(str, value)) - {"content", "from", "mode"})
    if unknown:
        problems.append(f"{where}: unknown field {unknown[0]!r} (known: content, from, mode)")
    mode = _spec_mode(value.get("mode"), f"{where}.mode", problems)
    has_content, has_from = "content" in value, "from" in value
    if has_content == has_from:
        problems.append(f"{where}: give exactly one of content or from")
        return None
    if has_content:
        content = value["content"]
        if not isinstance(content, str):
            problems.append(f"{where}.content: must be a string")
            return None
        return ImageFile(data=content.encode(), mode=mode)
    source = value["from"]
    if not isinstance(source, str) or not source:
        problems.append(f"{where}.from: must be a path relative to the spec's directory")
        return None
    if Path(source).is_absolute():
        problems.append(f"{where}.from: {source} must be relative to the spec's directory "
                        f"({base_dir})")
        return None
    local = base_dir / source
    try:
        data = local.read_bytes()
    except IsADirectoryError:
        problems.append(f"{where}.from: {local} is a directory (give a file)")
        return None
    except OSError as e:
        problems.append(f"{where}.from: cannot read {local}: {e.strerror or e}")
        return None
    if mode is None and os.access(local, os.X_OK):
        mode = 0o755
    return ImageFile(data=data, mode=mode)


def _string_list(value: object, where: str, problems: list[str]) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f'{where}: must be a list of strings, e.g. ["sh", "-c", "echo hi"]')
        return None
    return tuple(value)


def _string_map(value: object, where: str, problems: list[str], *,
                numbers: bool) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            problems.append(f"{where}: key {k!r} must be a non-empty string")
            continue
        if isinstance(v, str):
            out[k] = v
        elif numbers and isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = str(v)
        else:
            problems.append(f"{where}.{k}: must be a string, not {type(v).__name__}")
    return out


def parse_spec(data: object, *, base_dir: Path, source: str = SPEC_FILE) -> ImageSpec:
    """Check a decoded spec (a mapping) and read the files it names.

    ``from:`` paths are relative to ``base_dir`` (the spec's directory).
    Raises :class:`SpecError` listing every problem as ``SOURCE: FIELD: what``;
    nothing is half-accepted.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError([f"{source}: the spec must be a mapping of fields "
                         f"({', '.join(_SPEC_FIELDS)})"])
    for key in data:
        if key not in _SPEC_FIELDS:
            problems.append(f"unknown field {key!r} (known: {', '.join(_SPEC_FIELDS)})")
    name = data.get("name", "")
    if not isinstance(name, str):
        problems.append("name: must be a string such as hello:1")
        name = ""
    elif name:
        try:
            normalize_reference(name)
        except errors.BadRequest:
            problems.append(f"name: {name!r} is not an image reference")
    base = data.get("base", "busybox")
    if base not in BASES:
        problems.append(f"base: {base!r} is not supported (supported: {', '.join(BASES)})")
    files: dict[str, ImageFile] = {}
    raw_files = data.get("files") or {}
    if not isinstance(raw_files, Mapping):
        problems.append("files: must be a mapping of image paths to contents")
        raw_files = {}
    for path, value in raw_files.items():
        where = f"files[{json.dumps(str(path))}]"
        if not isinstance(path, str) or not path.startswith("/"):
            problems.append(f"{where}: the path must be absolute, e.g. /bin/app")
            continue
        try:
            rel = _image_path(path)
        except errors.BadRequest:
            problems.append(f"{where}: not a path inside the image")
            continue
        got = _spec_file(rel, value, base_dir=base_dir, where=where, problems=problems)
        if got is not None:
            files[rel] = got
    env = _string_map(data.get("env"), "env", problems, numbers=True)
    for key in env:
        if "=" in key:
            problems.append(f"env.{key}: a variable name cannot contain '='")
    labels = _string_map(data.get("labels"), "labels", problems, numbers=True)
    entrypoint = _string_list(data.get("entrypoint"), "entrypoint", problems)
    cmd = _string_list(data.get("cmd"), "cmd", problems)
    working_dir = data.get("workingDir", "/")
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        problems.append("workingDir: must be an absolute path such as /app")
        working_dir = "/"
    user = data.get("user", "")
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)
    if not isinstance(user, str):
        problems.append('user: must be a string such as "65534" or "nobody:nogroup"')
        user = ""
    if problems:
        raise SpecError([f"{source}: {p}" for p in problems])
    return ImageSpec(name=name, base=str(base), files=files, env=env, entrypoint=entrypoint,
                     cmd=cmd, working_dir=working_dir, user=user, labels=labels)


def tree_files(root: Path, *, exclude: Sequence[Path] = ()) -> dict[str, ImageFile]:
    """The files, symlinks and directories under ``root`` as image files at the
    same paths below ``/``. Modes keep the owner's execute bit (0755 or 0644;
    directories 0755); owners and times are not kept, so the result depends
    only on the tree's content. Directories keep the base's mode where the base
    has them (``/tmp`` stays 1777), else 0755. ``exclude`` names files to leave out (the spec).
    Raises SpecError for what an image cannot hold (sockets, devices...).
    """
    if not root.is_dir():
        raise SpecError([f"{root}: not a directory"])
    skip = {p.resolve() for p in exclude}
    out: dict[str, ImageFile] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for entry in sorted(dirnames) + sorted(filenames):
            path = here / entry
            if path.resolve() in skip and not path.is_symlink():
                continue
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ImageFile(link=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ImageFile(directory=True)
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                out[rel] = ImageFile(data=path.read_bytes(), mode=mode)
            else:
                problems.append(f"{path}: not a regular file, directory or symlink")
    if problems:
        raise SpecError(problems)
    return out


def build_from_spec(out: Path, spec: ImageSpec, *, name: str = "",
                    tree: Mapping[str, ImageFile] | None = None,
                    busybox: Path = Path("/bin/busybox")) -> ImageRef:
    """Build ``spec`` (its files over ``tree``, the copied directory) at ``out``.

    ``name`` overrides the spec's; one of them must be set. With neither
    ``cmd`` nor ``entrypoint`` the image runs ``sh``.
    """
    image = name or spec.name
    if not image:
        raise SpecError(["no image name: pass -t NAME[:TAG] or set name in the spec"])
    files: dict[str, bytes | ImageFile] = dict(tree or {})
    files.update(spec.files)
    cmd: Sequence[str] = spec.cmd if spec.cmd is not None else (
        () if spec.entrypoint is not None else ("sh",))
    return build_busybox_image(out, name=image, cmd=cmd, entrypoint=spec.entrypoint,
                               env=spec.env, files=files, working_dir=spec.working_dir,
                               user=spec.user, labels=spec.labels, busybox=busybox)


# -- reading archives -----------------------------------------------------------


@dataclass(frozen=True)
class ArchiveImage:
    """One image an archive's index.json lists."""

    name: str          # the io.containerd.image.name / ref.name annotation ("" if none)
    digest: str        # its manifest digest
    media_type: str
    size: int


class OCIArchive:
    """An OCI image-layout tar opened for reading. Use as a context manager.

    Opening checks the layout (``oci-layout``, ``index.json``).
    :meth:`read_blob` checks the blob it returns against its digest;
    :meth:`open_blob` streams one unchecked, so call :meth:`verify` (which
    hashes every blob of every image once) before trusting streamed blobs.
    Problems are ``BadRequest`` naming the archive and what is wrong with it
    (``NotFound`` for a missing file).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tar = tarfile.open(path)  # noqa: SIM115 - closed by close()
        except (OSError, tarfile.TarError) as e:
            if isinstance(e, FileNotFoundError):
                raise errors.NotFound(f"image archive {path} not found") from e
            raise errors.BadRequest(f"{path} is not a tar archive: {e}") from e
        try:
            self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()
                             if m.isfile()}
            self.images = self._read_index()
        except BaseException:
            self._tar.close()
            raise

    def _member_bytes(self, name: str) -> bytes:
        member = self._members.get(name)
        handle = self._tar.extractfile(member) if member is not None else None
        if handle is None:
            raise errors.BadRequest(f"{self.path} is not an OCI image layout: no {name}")
        with handle:
            return handle.read()

    def _read_index(self) -> tuple[ArchiveImage, ...]:
        try:
            layout = json.loads(self._member_bytes("oci-layout"))
            index = json.loads(self._member_bytes("index.json"))
        except ValueError as e:
            raise errors.BadRequest(f"{self.path}: bad JSON in its layout: {e}") from e
        if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
            raise errors.BadRequest(f"{self.path}: oci-layout has no imageLayoutVersion")
        found = []
        for m in index.get("manifests", []) if isinstance(index, dict) else []:
            ann = m.get("annotations") or {}
            name = ann.get(ANNOTATION_CONTAINERD_NAME) or ann.get(ANNOTATION_REF_NAME) or ""
            found.append(ArchiveImage(name=str(name), digest=str(m.get("digest", "")),
                                      media_type=str(m.get("mediaType", "")),
                                      size=int(m.get("size", 0))))
        if not found:
            raise errors.BadRequest(f"{self.path}: index.json lists no image")
        return tuple(found)

    def _blob_member(self, digest: str) -> tarfile.TarInfo:
        algo, _, hexdigest = digest.partition(":")
        member = self._members.get(f"blobs/{algo}/{hexdigest}")
        if member is None:
            raise errors.BadRequest(f"{self.path}: blob {digest} is missing")
        return member

    def blob_size(self, digest: str) -> int:
        return self._blob_member(digest).size

    def open_blob(self, digest: str) -> IO[bytes]:
        """A file object on one blob (the caller closes it)."""
        handle = self._tar.extractfile(self._blob_member(digest))
        if handle is None:  # pragma: no cover - members are regular files
            raise errors.BadRequest(f"{self.path}: blob {digest} is not a file")
        return handle

    def read_blob(self, digest: str) -> bytes:
        """One blob, checked against its digest."""
        with self.open_blob(digest) as handle:
            data = handle.read()
        if _digest(data) != digest:
            raise errors.BadRequest(f"{self.path}: blob {digest} does not match its digest")
        return data

    def manifest(self, image: ArchiveImage) -> dict[str, Any]:
        """The image's manifest, parsed (its bytes checked against the digest)."""
        if image.media_type not in MANIFEST_TYPES:
            raise errors.BadRequest(
                f"{self.path}: {image.digest} is a {image.media_type or 'untyped'} "
                "entry, not an image manifest (nested indexes are not supported)")
        data = json.loads(self.read_blob(image.digest))
        if not isinstance(data, dict):
            raise errors.BadRequest(f"{self.path}: manifest {image.digest} is not an object")
        return data

    def blob_digests(self, image: ArchiveImage) -> list[str]:
        """The config and layer digests an image's manifest names, config first."""
        manifest = self.manifest(image)
        try:
            return [manifest["config"]["digest"]] + [
                layer["digest"] for layer in manifest.get("layers", [])]
        except (KeyError, TypeError) as e:
            raise errors.BadRequest(
                f"{self.path}: manifest {image.digest} lacks config or layer digests") from e

    def verify(self) -> None:
        """Check that every blob each image needs is present and matches its digest."""
        for image in self.images:
            for digest in self.blob_digests(image):
                h = hashlib.sha256()
                with self.open_blob(digest) as handle:
                    while chunk := handle.read(_READ_CHUNK):
                        h.update(chunk)
                if "sha256:" + h.hexdigest() != digest:
                    raise errors.BadRequest(
                        f"{self.path}: blob {digest} does not match its digest")

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> OCIArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect_archive(path: Path) -> tuple[ArchiveImage, ...]:
    """The images an archive holds, after checking every blob's digest."""
    with OCIArchive(path) as archive:
        archive.verify()
        return archive.images


# -- containerd -----------------------------------------------------------------


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
    return the image's manifest digest.

    Every image the archive names must then be in containerd at the manifest
    digest the archive gives it (else ``InternalError``); given an
    :class:`ImageRef`, that image's. Idempotent: importing the same archive
    again is a no-op.
    """
    if isinstance(archive, ImageRef):
        ref: ImageRef | None = archive
        path = archive.archive
    else:
        ref, path = None, Path(archive)
    if not path.is_file():
        raise errors.NotFound(f"image archive {path} not found")
    with OCIArchive(path) as opened:
        expected = {i.name: i.digest for i in opened.images if i.name}
    if ref is not None:
        expected[ref.name] = ref.digest
    if not expected:
        raise errors.BadRequest(f"{path}: index.json names no image (no "
                                f"{ANNOTATION_CONTAINERD_NAME} annotation)")
    _ctr(address, namespace, "images", "import", "--all-platforms", str(path),
         timeout=timeout)
    found = image_digests(address=address, namespace=namespace, timeout=timeout)
    for name, digest in expected.items():
        got = found.get(name)
        if got != digest:
            raise errors.InternalError(
                f"after importing {path}, containerd has {name} at {got or 'nothing'}, "
                f"not {digest}")
    return ref.digest if ref is not None else next(iter(expected.values()))


def archive_names(path: Path) -> list[str]:
    """The image names an OCI archive's index.json announces."""
    with OCIArchive(path) as archive:
        return [i.name for i in archive.images if i.name]
