"""``shoal image push``: an OCI image archive to a registry over the distribution API.

The requests, in order (the OCI distribution spec's "push" flow)::

    GET  /v2/                                  the API is there; 401 -> auth is unsupported
    for the config, then each layer:
      HEAD /v2/<name>/blobs/<digest>           200: already there, skipped
      POST /v2/<name>/blobs/uploads/           202, Location: the upload session
      PUT  <location>?digest=<digest>          monolithic: the whole blob; 201
      (blobs over ``chunk_size``: PATCH <location> with Content-Range, one chunk
       at a time, each answered 202 with the next Location; then the PUT with
       an empty body)
    HEAD /v2/<name>/manifests/<tag>            Docker-Content-Digest is ours: skipped
    PUT  /v2/<name>/manifests/<tag>            Content-Type: the manifest's media type; 201

Contract:

- Idempotent: a blob the registry has is never uploaded again, and a tag that
  already names this manifest is not written again. A push that failed half
  way is finished by running it again.
- Every blob is checked against its digest before anything is sent, so a
  damaged archive is refused locally (``BadRequest``).
- Each request is bounded by ``timeout`` seconds (connect, and each read or
  write). One connection is kept alive; a connection the registry closed
  between requests is opened again once.
- Errors name the step and the HTTP status: ``Unauthorized``/``Forbidden``
  when the registry wants credentials (not supported), ``Unavailable`` when it
  cannot be reached, :class:`RegistryError` for any other refusal (with the
  registry's own error codes).
- Blocking (``http.client``): call it through ``asyncio.to_thread`` from async code.
  Only the standard library is used.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shoal import errors
from shoal.images import ArchiveImage, OCIArchive

DEFAULT_CHUNK_SIZE = 16 << 20
DEFAULT_TIMEOUT = 30.0
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$")


class RegistryError(errors.InternalError):
    """The registry refused a step; ``step`` and ``http_status`` say which and how
    (``http_status`` 0: not an HTTP status, e.g. an upload sent elsewhere)."""

    def __init__(self, message: str, *, step: str, http_status: int) -> None:
        super().__init__(message)
        self.step = step
        self.http_status = http_status


@dataclass(frozen=True)
class Target:
    """Where an image goes: ``registry/repository:tag``."""

    registry: str      # host[:port]
    repository: str    # e.g. library/hello
    tag: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


@dataclass(frozen=True)
class PushResult:
    reference: str                 # registry/repository:tag
    digest: str                    # the manifest's digest
    pushed: tuple[str, ...]        # blobs uploaded
    skipped: tuple[str, ...]       # blobs the registry had
    manifest_pushed: bool          # False: the tag already named this manifest

    @property
    def reference_by_digest(self) -> str:
        return f"{self.reference.rsplit(':', 1)[0]}@{self.digest}"


def parse_target(target: str) -> Target:
    """``REGISTRY/NAME[:TAG]`` (tag ``latest`` by default). The registry part
    is required: a host with a dot or a port, or ``localhost``."""
    usage = "use REGISTRY/NAME:TAG, e.g. 127.0.0.1:5000/library/hello:1"
    registry, _, rest = target.partition("/")
    if not rest or not ("." in registry or ":" in registry or registry == "localhost"):
        raise errors.BadRequest(f"{target!r} names no registry: {usage}")
    if "@" in rest:
        raise errors.BadRequest(f"{target!r}: push to a tag, not a digest: {usage}")
    repository, tag = rest, "latest"
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = rest.rpartition(":")
    bad = [c for c in repository.split("/") if not _COMPONENT.match(c)]
    if bad:
        raise errors.BadRequest(
            f"{target!r}: {bad[0]!r} is not a valid repository name component "
            "(lowercase letters, digits, and . _ - between them)")
    if not _TAG.match(tag):
        raise errors.BadRequest(f"{target!r}: {tag!r} is not a valid tag")
    return Target(registry=registry, repository=repository, tag=tag)


def _registry_errors(body: bytes) -> str:
    """The registry's ``{"errors": [{"code", "message"}]}`` as text, if any."""
    try:
        doc = json.loads(body)
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".strip()
                 for e in doc.get("errors", [])]
        if parts:
            return "; ".join(parts)
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


class _Connection:
    """One kept-alive HTTP(S) connection to the registry."""

    def __init__(self, target: Target, *, insecure: bool, timeout: float) -> None:
        self.target = target
        self.scheme = "http" if insecure else "https"
        self.base = f"{self.scheme}://{target.registry}"
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _open(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "http":
                self._conn = http.client.HTTPConnection(self.target.registry,
                                                        timeout=self.timeout)
            else:
                self._conn = http.client.HTTPSConnection(
                    self.target.registry, timeout=self.timeout,
                    context=ssl.create_default_context())
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def path_of(self, location: str, step: str) -> str:
        """The request path for a Location header (relative or absolute)."""
        url = urllib.parse.urlsplit(urllib.parse.urljoin(self.base + "/", location))
        if (url.scheme, url.netloc) != (self.scheme, self.target.registry):
            raise RegistryError(
                f"{step}: the registry sent the upload to {url.scheme}://{url.netloc}, "
                "another host; shoal image push supports only uploads to the same host",
                step=step, http_status=0)
        return url.path + (f"?{url.query}" if url.query else "")

    def request(self, method: str, path: str, *, step: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None) -> _Response:
        sent = {"Content-Length": str(len(body)), **(headers or {})}
        for attempt in (1, 2):
            conn = self._open()
            try:
                conn.request(method, path, body=body, headers=sent)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                self.close()
                if attempt == 2:
                    raise errors.Unavailable(
                        f"{step}: registry {self.base} closed the connection: {e}",
                        retry_after=1.0) from e
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise errors.Unavailable(
                    f"{step}: cannot reach registry {self.base}: {e}", retry_after=1.0) from e
        result = _Response(status=resp.status, reason=resp.reason,
                           headers={k.lower(): v for k, v in resp.getheaders()}, body=data)
        if result.status in (401, 403):
            cls = errors.Unauthorized if result.status == 401 else errors.Forbidden
            raise cls(f"{step}: registry {self.base} answered HTTP {result.status} "
                      f"{result.reason}: it wants credentials, and shoal image push does "
                      "not support registry authentication")
        return result


def _refused(step: str, resp: _Response) -> RegistryError:
    detail = _registry_errors(resp.body)
    return RegistryError(f"{step}: HTTP {resp.status} {resp.reason}"
                         + (f": {detail}" if detail else ""), step=step, http_status=resp.status)


def _choose(archive: OCIArchive) -> ArchiveImage:
    if len(archive.images) != 1:
        names = ", ".join(i.name or i.digest for i in archive.images)
        raise errors.BadRequest(f"{archive.path} holds {len(archive.images)} images "
                                f"({names}); push needs an archive of exactly one")
    return archive.images[0]


def push_archive(archive_path: Path, target: str | Target, *, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 progress: Callable[[str], None] | None = None,
                 on_bytes: Callable[[int, int], None] | None = None) -> PushResult:
    """Push the one image in ``archive_path`` to ``target`` (see the module
    docstring for the requests and the contract). ``insecure`` means plain
    HTTP; without it, HTTPS with the system's trusted CAs. ``progress`` gets
    one line per blob and for the manifest; ``on_bytes(done, total)`` is called
    as each chunk of a blob is sent (a blob already there counts as done)."""
    dest = target if isinstance(target, Target) else parse_target(target)
    if chunk_size <= 0:
        raise errors.BadRequest("chunk_size must be positive")
    say = progress or (lambda _line: None)
    pushed: list[str] = []
    skipped: list[str] = []
    with OCIArchive(archive_path) as archive:
        image = _choose(archive)
        manifest = archive.manifest(image)
        manifest_bytes = archive.read_blob(image.digest)
        media_type = str(manifest.get("mediaType") or image.media_type)
        archive.verify()
        conn = _Connection(dest, insecure=insecure, timeout=timeout)
        try:
            step = "checking the registry API (GET /v2/)"
            resp = conn.request("GET", "/v2/", step=step)
            if resp.status != 200:
                raise _refused(step, resp)
            digests = list(archive.blob_digests(image))
            total = sum(archive.blob_size(d) for d in digests)
            done = 0

            def sent(n: int) -> None:
                nonlocal done
                done += n
                if on_bytes is not None:
                    on_bytes(done, total)

            for digest in digests:
                before = done
                if _push_blob(conn, archive, dest, digest, chunk_size=chunk_size, sent=sent):
                    pushed.append(digest)
                    say(f"blob {digest[:19]}: pushed ({archive.blob_size(digest)} bytes)")
                else:
                    skipped.append(digest)
                    say(f"blob {digest[:19]}: already there")
                rest = archive.blob_size(digest) - (done - before)
                if rest:
                    sent(rest)
            manifest_pushed = _push_manifest(conn, dest, image.digest, manifest_bytes,
                                             media_type)
            say(f"manifest {image.digest[:19]}: "
                + ("pushed" if manifest_pushed else f"{dest.tag} already names it"))
        finally:
            conn.close()
    return PushResult(reference=str(dest), digest=image.digest, pushed=tuple(pushed),
                      skipped=tuple(skipped), manifest_pushed=manifest_pushed)


def _with_digest(path: str, digest: str) -> str:
    sep = "&" if "?" in path else "?"
    return f"{path}{sep}digest={urllib.parse.quote(digest, safe=':')}"


def _push_blob(conn: _Connection, archive: OCIArchive, dest: Target, digest: str, *,
               chunk_size: int, sent: Callable[[int], None]) -> bool:
    """Upload one blob unless the registry has it; True when uploaded."""
    short = digest[:19]
    step = f"checking blob {short} (HEAD)"
    resp = conn.request("HEAD", f"/v2/{dest.repository}/blobs/{digest}", step=step)
    if resp.status == 200:
        return False
    if resp.status != 404:
        raise _refused(step, resp)
    step = f"starting the upload of blob {short} (POST)"
    resp = conn.request("POST", f"/v2/{dest.repository}/blobs/uploads/", step=step)
    if resp.status != 202 or "location" not in resp.headers:
        raise _refused(step, resp)
    location = conn.path_of(resp.headers["location"], step)
    size = archive.blob_size(digest)
    octets = {"Content-Type": "application/octet-stream"}
    with archive.open_blob(digest) as blob:
        if size <= chunk_size:
            step = f"uploading blob {short} (PUT)"
            resp = conn.request("PUT", _with_digest(location, digest), step=step,
                                body=blob.read(), headers=octets)
        else:
            offset = 0
            while offset < size:
                chunk = blob.read(chunk_size)
                step = f"uploading blob {short} bytes {offset}-{offset + len(chunk) - 1} (PATCH)"
                resp = conn.request("PATCH", location, step=step, body=chunk, headers={
                    **octets, "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
                if resp.status != 202 or "location" not in resp.headers:
                    raise _refused(step, resp)
                location = conn.path_of(resp.headers["location"], step)
                offset += len(chunk)
                sent(len(chunk))
            step = f"finishing the upload of blob {short} (PUT)"
            resp = conn.request("PUT", _with_digest(location, digest), step=step,
                                headers=octets)
    if resp.status != 201:
        raise _refused(step, resp)
    return True


def _push_manifest(conn: _Connection, dest: Target, digest: str, body: bytes,
                   media_type: str) -> bool:
    """Tag the manifest unless the tag already names it; True when written."""
    path = f"/v2/{dest.repository}/manifests/{dest.tag}"
    step = f"checking tag {dest.tag} (HEAD manifest)"
    resp = conn.request("HEAD", path, step=step, headers={"Accept": media_type})
    if resp.status == 200 and resp.headers.get("docker-content-digest") == digest:
        return False
    if resp.status not in (200, 404):
        raise _refused(step, resp)
    step = f"putting manifest {digest[:19]} as {dest.tag} (PUT)"
    resp = conn.request("PUT", path, step=step, body=body,
                        headers={"Content-Type": media_type})
    if resp.status != 201:
        raise _refused(step, resp)
    stored = resp.headers.get("docker-content-digest")
    if stored and stored != digest:
        raise RegistryError(f"{step}: the registry stored the manifest as {stored}, "
                            f"not {digest}", step=step, http_status=resp.status)
    return True
