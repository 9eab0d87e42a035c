"""Registries for tests and the lab: a real ``docker-registry``, and an in-process fake.

``RegistryServer`` runs Debian's ``docker-registry serve CONFIG`` (package
docker-registry, the CNCF distribution registry 2.8) on one address::

    new --start()--> serving --stop()--> stopped
           |  write the config (plain HTTP, filesystem storage, no auth);
           |  spawn; return once GET /v2/ answers 200, polling until
           |  start_timeout (never a fixed sleep); exited early or never
           |  answered: RegistryStartError with the log's tail
           v
        RegistryNotInstalled (no binary: names the Debian package)

Contract:

- ``address`` is ``HOST:PORT``; port 0 (the default, on 127.0.0.1) picks a
  free port, and a port taken between picking and binding is retried with a
  new one, a few times. The lab passes its bridge address (``10.77.0.1:5000``).
  An address another process already listens on is a ``RegistryStartError``
  at once (its answers must not pass for ours).
- ``storage_dir`` holds the registry's data. Without one, a temporary directory
  is made and removed by ``stop()``; a given one is kept (the lab's images
  survive a restart).
- ``stop()`` signals exactly the PID this object started (SIGTERM, then
  SIGKILL after ``stop_timeout``), never a process found by name. It is
  idempotent, and also runs at interpreter exit if forgotten.
- ``render_config`` and ``wait_serving`` are usable alone, by a supervisor that
  starts the process itself.

``FakeRegistry`` is a scriptable stand-in for unit tests: a tiny HTTP/1.1
server on 127.0.0.1 in a thread that speaks enough of the distribution API for
a push (blob HEAD/GET, monolithic and chunked uploads, manifest HEAD/GET/PUT),
checks digests as a real registry does, and records every request. Script it
with ``require_auth`` (every request gets 401) and ``fail`` (``{(METHOD,
"blob"|"upload"|"manifest"|"base"): status}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

DEBIAN_PACKAGE = "docker-registry"
_PORT_ATTEMPTS = 3
# Registry addresses are local: never send them through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryNotInstalled(RuntimeError):
    """No ``docker-registry`` binary on PATH."""


class RegistryStartError(RuntimeError):
    """The registry exited, or did not answer GET /v2/ in time."""


def render_config(*, address: str, storage_dir: Path) -> str:
    """docker-registry's config (JSON, which is YAML): plain HTTP on ``address``,
    filesystem storage in ``storage_dir``, deletes allowed, no auth, quiet logs."""
    return json.dumps({
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True},
                "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": address, "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }, indent=2) + "\n"


def wait_serving(url: str, *, timeout: float, alive: Callable[[], bool] = lambda: True,
                 interval: float = 0.05) -> None:
    """Return once ``GET {url}/v2/`` answers 200. Raises RegistryStartError when
    ``alive()`` turns false first, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not alive():
            raise RegistryStartError(f"the registry exited before serving ({last})")
        try:
            with _OPENER.open(f"{url}/v2/", timeout=1.0) as answer:
                if answer.status == 200:
                    return
                last = f"HTTP {answer.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(interval)
    raise RegistryStartError(f"the registry did not serve {url}/v2/ within {timeout:g}s "
                             f"({last})")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RegistryStartError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (address already in "
                "use by another process?)") from e


def _terminate(proc: subprocess.Popen[bytes], workdir: str | None, grace: float) -> None:
    """Stop exactly ``proc``; remove ``workdir`` if we made it. Safe to call twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class RegistryServer:
    """One ``docker-registry`` process (see the module docstring)."""

    def __init__(self, *, address: str = "127.0.0.1:0", storage_dir: Path | None = None,
                 binary: str = "docker-registry", start_timeout: float = 30.0,
                 stop_timeout: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"registry address {address!r} must be HOST:PORT")
        self.host = host
        self._port = int(port)
        self.port = self._port
        self._storage_dir = storage_dir
        self._binary = binary
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._finalizer: weakref.finalize[..., RegistryServer] | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT``, what image references name (``HOST:PORT/library/x:1``)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the registry is not running")
        return self._proc.pid

    @property
    def storage_dir(self) -> Path:
        if self._storage_dir is not None:
            return self._storage_dir
        if self._workdir is None:
            raise RuntimeError("the registry is not running")
        return Path(self._workdir) / "storage"

    def start(self) -> None:
        """Start the registry and return once it serves (idempotent)."""
        if self._proc is not None:
            return
        binary = shutil.which(self._binary)
        if binary is None:
            raise RegistryNotInstalled(
                f"{self._binary!r} is not on PATH; install the Debian package "
                f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})")
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._start_once(binary)
                return
            except RegistryStartError as e:
                if (self._port or attempt == _PORT_ATTEMPTS
                        or "address already in use" not in str(e)):
                    raise

    def _start_once(self, binary: str) -> None:
        self.port = self._port or _free_port(self.host)
        # Another server on the address would answer GET /v2/ for us: refuse it
        # up front rather than take its answer for our registry's.
        _check_free(self.host, self.port)
        workdir = tempfile.mkdtemp(prefix="shoal-registry-")
        storage = self._storage_dir or Path(workdir) / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = Path(workdir) / "config.yml"
        config.write_text(render_config(address=self.address, storage_dir=storage))
        log_path = Path(workdir) / "registry.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([binary, "serve", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        self._proc, self._workdir = proc, workdir
        self._finalizer = weakref.finalize(self, _terminate, proc, workdir,
                                           self._stop_timeout)
        try:
            wait_serving(self.url, timeout=self._start_timeout,
                         alive=lambda: proc.poll() is None)
        except RegistryStartError as e:
            tail = _tail(log_path)
            self.stop()
            raise RegistryStartError(f"{e}:\n{tail}") from None
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the process this object started (and remove its temp dir). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc = None
        self._workdir = None
        self._finalizer = None

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _tail(path: Path, *, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- an in-process fake ---------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str                      # with the query string
    headers: Mapping[str, str]     # lower-case names
    body: bytes


@dataclass
class _State:
    blobs: dict[str, dict[str, bytes]] = field(default_factory=dict)       # repo -> digest
    uploads: dict[str, bytearray] = field(default_factory=dict)            # uuid -> data
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)


_UPLOAD = re.compile(r"^/v2/(?P<repo>.+)/blobs/uploads/(?P<id>[^/]*)$")
_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """A distribution-API registry in a thread (see the module docstring).

    ``requests`` lists what was asked, in order; ``blobs``/``manifests`` hold
    what was stored. Use as a context manager (``start()``/``stop()``).
    """

    def __init__(self, *, require_auth: bool = False,
                 fail: Mapping[tuple[str, str], int] | None = None,
                 absolute_locations: bool = False) -> None:
        self.require_auth = require_auth
        self.fail = dict(fail or {})
        self.absolute_locations = absolute_locations
        self._state = _State()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake registry is not running")
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._state.requests.clear()

    def blobs(self, repo: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._state.blobs.get(repo, {}))

    def manifest(self, repo: str, tag: str) -> tuple[str, bytes] | None:
        """(media type, bytes) stored under ``repo:tag``."""
        with self._lock:
            return self._state.manifests.get((repo, tag))

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, *, body: bytes = b"",
                        headers: Mapping[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                length = (headers or {}).get("Content-Length", str(len(body)))
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD" and body:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                self._answer(status, body=json.dumps(
                    {"errors": [{"code": code, "message": message}]}).encode(),
                    headers={"Content-Type": "application/json"})

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake._lock:
                    fake._state.requests.append(RecordedRequest(
                        method=self.command, path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()}, body=body))
                if fake.require_auth:
                    self._answer(401, headers={
                        "WWW-Authenticate": 'Basic realm="fake"'})
                    return
                fake._dispatch(self, body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02},
                                        name="fake-registry", daemon=True)
        self._thread.start()

    def _location(self, path: str) -> str:
        return f"http://{self.address}{path}" if self.absolute_locations else path

    def _dispatch(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        answer = h._answer  # type: ignore[attr-defined]
        error = h._error  # type: ignore[attr-defined]
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        method, path = h.command, url.path
        kind = ("base" if path == "/v2/" else "upload" if _UPLOAD.match(path)
                else "blob" if _BLOB.match(path) else "manifest" if _MANIFEST.match(path)
                else "")
        if (method, kind) in self.fail:
            error(self.fail[(method, kind)], "SCRIPTED", f"{method} {kind} fails")
            return
        st = self._state
        if kind == "base" and method == "GET":
            answer(200, body=b"{}", headers={"Content-Type": "application/json"})
            return
        if m := _UPLOAD.match(path):
            repo, upload = m["repo"], m["id"]
            if method == "POST" and not upload:
                new = uuid.uuid4().hex
                with self._lock:
                    st.uploads[new] = bytearray()
                answer(202, headers={
                    "Location": self._location(f"/v2/{repo}/blobs/uploads/{new}?_state=s0"),
                    "Range": "0-0", "Docker-Upload-UUID": new})
                return
            with self._lock:
                data = st.uploads.get(upload)
            if data is None:
                error(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload} unknown")
                return
            if method == "PATCH":
                start = int((h.headers.get("Content-Range") or "0-0").split("-")[0])
                if start != len(data):
                    error(416, "BLOB_UPLOAD_INVALID", f"range starts at {start}, "
                          f"upload holds {len(data)}")
                    return
                data.extend(body)
                answer(202, headers={
                    "Location": self._location(
                        f"/v2/{repo}/blobs/uploads/{upload}?_state=s{len(data)}"),
                    "Range": f"0-{len(data) - 1}", "Docker-Upload-UUID": upload})
                return
            if method == "PUT":
                data.extend(body)
                digest = (query.get("digest") or [""])[0]
                if _sha(bytes(data)) != digest:
                    error(400, "DIGEST_INVALID", f"content is {_sha(bytes(data))}, "
                          f"not {digest}")
                    return
                with self._lock:
                    st.blobs.setdefault(repo, {})[digest] = bytes(data)
                    del st.uploads[upload]
                answer(201, headers={"Location": f"/v2/{repo}/blobs/{digest}",
                                     "Docker-Content-Digest": digest})
                return
        if m := _BLOB.match(path):
            with self._lock:
                blob = st.blobs.get(m["repo"], {}).get(m["digest"])
            if method in ("GET", "HEAD"):
                if blob is None:
                    error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                else:
                    answer(200, body=blob, headers={
                        "Content-Length": str(len(blob)),
                        "Docker-Content-Digest": m["digest"],
                        "Content-Type": "application/octet-stream"})
                return
        if m := _MANIFEST.match(path):
            repo, ref = m["repo"], m["ref"]
            if method in ("GET", "HEAD"):
                with self._lock:
                    found = st.manifests.get((repo, ref))
                if found is None:
                    error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                else:
                    answer(200, body=found[1], headers={
                        "Content-Type": found[0], "Content-Length": str(len(found[1])),
                        "Docker-Content-Digest": _sha(found[1])})
                return
            if method == "PUT":
                try:
                    doc = json.loads(body)
                    needed = [doc["config"]["digest"]] + [
                        layer["digest"] for layer in doc.get("layers", [])]
                except (ValueError, KeyError, TypeError):
                    error(400, "MANIFEST_INVALID", "manifest invalid")
                    return
                with self._lock:
                    have = st.blobs.get(repo, {})
                    missing = [d for d in needed if d not in have]
                    if not missing:
                        media = h.headers.get("Content-Type") or ""
                        st.manifests[(repo, ref)] = (media, body)
                        st.manifests[(repo, _sha(body))] = (media, body)
                if missing:
                    error(400, "MANIFEST_BLOB_UNKNOWN", f"blob unknown: {missing[0]}")
                    return
                answer(201, headers={"Location": f"/v2/{repo}/manifests/{_sha(body)}",
                                     "Docker-Content-Digest": _sha(body)})
                return
        error(405, "UNSUPPORTED", f"{method} {path} is not supported by the fake")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
