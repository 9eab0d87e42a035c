"""The monitoring port every Shoal daemon serves: metrics and health over HTTP.

    GET /metrics   Prometheus text format from the daemon's own registry, plus
                   ``shoal_asyncio_tasks`` (tasks of the serving event loop, for
                   leak checks such as the soak in tests/chaos)
    GET /livez     200 while the process runs its event loop
    GET /readyz    200 once every named readiness signal is set, else 503 with
                   the names of those still missing
    GET /healthz   same as /readyz (Kubernetes' older name)

Bound in ``MonitoringServer.start()`` (so a bad port fails at start-up), served
until ``close()``. Requests are parsed with httptools; responses close the
connection. A request must arrive whole, at most 16 KiB, within
``request_timeout`` (10 s): a client that trickles its bytes (slowloris) is
cut off then, however often it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_MAX_REQUEST = 16 * 1024


def asyncio_tasks_gauge() -> bytes:
    """``shoal_asyncio_tasks``: the running loop's unfinished tasks (this
    request's own included), in the text format."""
    return (b"# HELP shoal_asyncio_tasks Unfinished asyncio tasks of the daemon's event loop.\n"
            b"# TYPE shoal_asyncio_tasks gauge\n"
            b"shoal_asyncio_tasks %d\n" % len(asyncio.all_tasks()))


class Readiness:
    """Named readiness signals; ready when all are set."""

    def __init__(self, *names: str) -> None:
        self._signals: dict[str, asyncio.Event] = {n: asyncio.Event() for n in names}

    def signal(self, name: str) -> asyncio.Event:
        return self._signals.setdefault(name, asyncio.Event())

    def set(self, name: str) -> None:
        self.signal(name).set()

    def clear(self, name: str) -> None:
        self.signal(name).clear()

    def missing(self) -> list[str]:
        return sorted(n for n, e in self._signals.items() if not e.is_set())

    @property
    def ready(self) -> bool:
        return not self.missing()

    async def wait(self) -> None:
        """Return once every signal is set at the same time."""
        while not self.ready:
            for event in list(self._signals.values()):
                await event.wait()

    def snapshot(self) -> Mapping[str, bool]:
        return {n: e.is_set() for n, e in self._signals.items()}


class _Request:
    def __init__(self) -> None:
        self.url = b""
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.done = True


class MonitoringServer:
    def __init__(self, *, host: str, port: int, registry: CollectorRegistry,
                 readiness: Readiness, request_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.registry = registry
        self.readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def _respond(self, path: str, method: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry) + asyncio_tasks_gauge()
        if path == "/livez":
            return 200, "text/plain", b"ok\n"
        if path in ("/readyz", "/healthz"):
            missing = self.readiness.missing()
            if missing:
                body = "".join(f"[-]{n} not ready\n" for n in missing).encode()
                return 503, "text/plain", body + b"readyz check failed\n"
            return 200, "text/plain", b"ok\n"
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = _Request()
        parser = httptools.HttpRequestParser(req)
        try:
            total = 0
            async with asyncio.timeout(self.request_timeout):  # the whole request
                while not req.done:
                    chunk = await reader.read(4096)
                    if not chunk:
                        return
                    total += len(chunk)
                    if total > _MAX_REQUEST:
                        break
                    try:
                        parser.feed_data(chunk)
                    except httptools.HttpParserError:
                        break
            if total > _MAX_REQUEST:
                status, ctype, body = 431, "text/plain", b"request too large\n"
            elif not req.done:
                status, ctype, body = 400, "text/plain", b"malformed request\n"
            else:
                try:  # an absolute URL ("http://host") has no path: "/"
                    path = (httptools.parse_url(req.url).path or b"/").decode("latin-1")
                except httptools.HttpParserError:
                    path = ""
                method = parser.get_method().decode("latin-1")
                status, ctype, body = self._respond(path, method)
                if method == "HEAD":
                    body = b""
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                      405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                      503: "Service Unavailable"}.get(status, "")
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
