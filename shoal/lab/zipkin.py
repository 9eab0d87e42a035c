"""A small Zipkin v2 API collector for the lab: tests read the mesh's spans back.

    python -m shoal.lab.zipkin --listen 10.77.0.1:9411 [--max-spans 50000]

    POST /api/v2/spans                      a JSON list of Zipkin v2 spans -> 202
    GET  /api/v2/traces?serviceName=&spanName=&limit=
                                            traces (lists of spans), newest first
    GET  /api/v2/trace/{traceId}            one trace's spans (404 when unknown)
    GET  /api/v2/services                   the service names seen
    GET  /health                            200 once serving (the lab's readiness)

Only the parts of Zipkin's API the lab needs; everything is kept in memory, at
most ``--max-spans`` spans: the oldest traces are forgotten first. As Zipkin
does, service names are lower-cased and ids are lower-case hex; a 64-bit trace
id is widened to 128 bits with leading zeros so both forms find the trace.
A span without a valid ``traceId`` or ``id`` is refused (400, nothing stored
of that POST). The lab runs it on the bridge address (``shoal lab up --mesh``),
reachable from the host and the nodes, nowhere else.

``SpanStore`` is the pure part; ``serve`` puts it behind HTTP (a threading
``http.server``: the lab's span rate is small).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 9411
DEFAULT_MAX_SPANS = 50_000
MAX_BODY = 16 * 1024 * 1024
_HEX = frozenset("0123456789abcdef")

Span = dict[str, Any]


class BadSpans(ValueError):
    """A POST the collector refuses (the message says why)."""


def _hex_id(value: Any, lengths: tuple[int, ...]) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.lower()
    if len(text) not in lengths or not set(text) <= _HEX or not text.strip("0"):
        return None
    return text


def normalize(raw: Any, *, index: int = 0) -> Span:
    """One span as stored: checked ids, lower-cased names (raises BadSpans)."""
    if not isinstance(raw, dict):
        raise BadSpans(f"span {index}: must be an object")
    trace_id = _hex_id(raw.get("traceId"), (16, 32))
    if trace_id is None:
        raise BadSpans(f"span {index}: traceId must be 16 or 32 hex digits, not zero")
    span_id = _hex_id(raw.get("id"), (16,))
    if span_id is None:
        raise BadSpans(f"span {index}: id must be 16 hex digits, not zero")
    span = dict(raw)
    span["traceId"] = trace_id.rjust(32, "0")
    span["id"] = span_id
    if "parentId" in span:
        parent = _hex_id(span["parentId"], (16,))
        if parent is None:
            raise BadSpans(f"span {index}: parentId must be 16 hex digits")
        span["parentId"] = parent
    for key in ("localEndpoint", "remoteEndpoint"):
        ep = span.get(key)
        if isinstance(ep, dict) and isinstance(ep.get("serviceName"), str):
            span[key] = {**ep, "serviceName": ep["serviceName"].lower()}
    if isinstance(span.get("name"), str):
        span["name"] = span["name"].lower()
    return span


def _services(spans: Iterable[Span]) -> set[str]:
    out = set()
    for span in spans:
        ep = span.get("localEndpoint")
        if isinstance(ep, dict) and ep.get("serviceName"):
            out.add(str(ep["serviceName"]))
    return out


class SpanStore:
    """Traces in memory, bounded by a span count (oldest traces dropped first).
    Thread-safe: the HTTP server calls it from its handler threads."""

    def __init__(self, *, max_spans: int = DEFAULT_MAX_SPANS) -> None:
        if max_spans < 1:
            raise ValueError("max_spans must be at least 1")
        self.max_spans = max_spans
        self._traces: OrderedDict[str, list[Span]] = OrderedDict()  # by last write
        self._count = 0
        self._lock = threading.Lock()
        self.accepted = 0
        self.evicted = 0

    def add(self, raw_spans: Any) -> int:
        """Store a POSTed list of spans; all or nothing. Returns how many."""
        if not isinstance(raw_spans, list):
            raise BadSpans("the body must be a JSON list of spans")
        spans = [normalize(s, index=i) for i, s in enumerate(raw_spans)]
        with self._lock:
            for span in spans:
                trace = self._traces.setdefault(span["traceId"], [])
                trace.append(span)
                self._traces.move_to_end(span["traceId"])
                self._count += 1
            while self._count > self.max_spans and self._traces:
                _, dropped = self._traces.popitem(last=False)
                self._count -= len(dropped)
                self.evicted += len(dropped)
            self.accepted += len(spans)
        return len(spans)

    def trace(self, trace_id: str) -> list[Span] | None:
        key = trace_id.lower().rjust(32, "0")
        with self._lock:
            spans = self._traces.get(key)
            return sorted(spans, key=_start) if spans else None

    def traces(self, *, service: str = "", span_name: str = "", limit: int = 10
               ) -> list[list[Span]]:
        """Traces with a span of ``service`` (and named ``span_name``), newest first."""
        service, span_name = service.lower(), span_name.lower()
        out: list[list[Span]] = []
        with self._lock:
            for spans in reversed(self._traces.values()):
                if len(out) >= limit:
                    break
                if service and service not in _services(spans):
                    continue
                if span_name and not any(s.get("name") == span_name for s in spans):
                    continue
                out.append(sorted(spans, key=_start))
        return out

    def services(self) -> list[str]:
        with self._lock:
            found: set[str] = set()
            for spans in self._traces.values():
                found |= _services(spans)
        return sorted(found)

    def __len__(self) -> int:
        with self._lock:
            return self._count


def _start(span: Span) -> tuple[int, str]:
    ts = span.get("timestamp")
    return (ts if isinstance(ts, int) else 0, str(span.get("id")))


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._reply(status, {"error": message})

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/api/v2/spans":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path}")
            return
        length_text = self.headers.get("Content-Length", "")
        if not length_text.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return
        length = int(length_text)
        if length > MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body over {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        try:
            n = self.server.store.add(json.loads(body))
        except json.JSONDecodeError as e:
            self._error(HTTPStatus.BAD_REQUEST, f"not JSON: {e}")
            return
        except BadSpans as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        log.debug("stored %d spans", n)
        self.send_response(HTTPStatus.ACCEPTED)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        store = self.server.store
        if url.path == "/health":
            self._reply(HTTPStatus.OK, {"status": "UP", "spans": len(store)})
        elif url.path == "/api/v2/services":
            self._reply(HTTPStatus.OK, store.services())
        elif url.path == "/api/v2/traces":
            limit_text = query.get("limit", ["10"])[0]
            if not limit_text.isdigit() or int(limit_text) < 1:
                self._error(HTTPStatus.BAD_REQUEST, f"limit must be a positive integer, "
                            f"not {limit_text!r}")
                return
            self._reply(HTTPStatus.OK, store.traces(
                service=query.get("serviceName", [""])[0],
                span_name=query.get("spanName", [""])[0], limit=int(limit_text)))
        elif url.path.startswith("/api/v2/trace/"):
            trace_id = url.path.removeprefix("/api/v2/trace/")
            spans = store.trace(trace_id)
            if spans is None:
                self._error(HTTPStatus.NOT_FOUND, f"trace {trace_id} not found")
            else:
                self._reply(HTTPStatus.OK, spans)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {url.path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: SpanStore) -> None:
        self.store = store
        super().__init__(address, _Handler)


def serve(host: str, port: int, store: SpanStore) -> _Server:
    """A bound server (port 0: any free one); call ``serve_forever`` on it."""
    return _Server((host, port), store)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: want HOST:PORT")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.lab.zipkin",
                                 description="The lab's in-memory Zipkin v2 collector.")
    ap.add_argument("--listen", type=_listen, default=("127.0.0.1", DEFAULT_PORT),
                    metavar="HOST:PORT")
    ap.add_argument("--max-spans", type=int, default=DEFAULT_MAX_SPANS)
    ns = ap.parse_args(argv)
    if ns.max_spans < 1:
        ap.error("--max-spans must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        host, port = ns.listen
        server = serve(host, port, SpanStore(max_spans=ns.max_spans))
    except OSError as e:
        print(f"zipkin: cannot listen on {ns.listen[0]}:{ns.listen[1]}: {e}", file=sys.stderr)
        return 1

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("zipkin collector listening on %s:%s (at most %d spans)",
             *server.server_address[:2], ns.max_spans)
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
