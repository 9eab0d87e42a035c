"""HTTP/2 (h2c with prior knowledge) and gRPC through the mesh, with ``h2``, beside the
HTTP/1.1 engine and on its parts.

:class:`H2Proxy` wraps an :class:`~meshagent.l7.engine.Engine` and uses what it holds: the
route table, the clusters, the pod lookup, the tunnel opener and TCP connect, the
authorization callable, telemetry and the tracer. Its ``outbound`` / ``inbound`` take the same
arguments as the engine's, so the agent hands a connection to an HTTP/2 port (appProtocol
``http2``/``grpc``, or a ``http2-``/``grpc-`` port name) to it instead::

    client side, per stream of the client's connection:
      route (VirtualService) -> redirect 301 / no route 404 NR / no cluster 503 NC
      fault delay (DI) -> acquire (connectionPool: Overflow 503 UO)
      mirror (mirrorPercentage): a copy to the mirror cluster once the body is all here
        and kept, authority "<host>-shadow", its answer dropped (fire and forget)
      tries: 1 + retries.attempts, within the route timeout (504 UT):
        fault abort (FI; per try, as the HTTP/1.1 engine) -> pick, excluding endpoints
        tried (none healthy: 503 UH) -> a stream on the endpoint's pooled HTTP/2
        connection (a tunnel stream to a meshed pod elsewhere, else TCP; a local pod:
        this agent does the server side too) -> the request body goes up as it comes
        while the response head is awaited, within the per-try timeout:
          connect failure UF, reset before the head UC, per-try timeout UT: report(None);
          tried again when retryOn says so (Retries.retriable)
          the head: report(status; a trailers-only gRPC answer's grpc-status as HTTP,
          HTTP_FOR_GRPC); tried again when retryOn says so for its :status or
          its grpc-status (Retries.retriable_grpc: cancelled, deadline-exceeded, internal,
          resource-exhausted, unavailable)
        -> the answer is relayed (head, body, trailers as they come); exhausted: URX
      record (source)

    A try can be followed by another only while the request body is replayable: every
    byte the client sent is kept, up to RETRY_BUFFER (Envoy's per-request buffer limit);
    past it, or after a client reset, the body streams through once. A retry sends what
    is kept and goes on with what the client still sends. Nothing is tried again once
    the response head went to the client: for a gRPC request that may still be retried
    (retryOn names a gRPC status) a head without grpc-status is held until the next
    event, so that trailers right after it decide too (a gRPC error after initial
    metadata); the first message, the end, or the try's timeout sends it on.

    server side, per stream: authorize -> 403 (gRPC: ``grpc-status: 7``) or the pod, over one
    HTTP/2 connection per inbound connection, with the trace context of this agent's span
    -> record (destination) and the SERVER span

A request whose ``content-type`` starts with ``application/grpc`` is recorded as
``request_protocol="grpc"`` with ``grpc_response_status`` from the response's trailers (or
its trailers-only head). Replies the mesh makes itself to a gRPC request are trailers-only
(``:status`` 200 and ``grpc-status``, HTTP status mapped as gRPC's HTTP mapping does: 403 -> 7,
404 -> 12, 429/502/503/504 -> 14, else 2), as Envoy sends them; the metric's response_code is
the HTTP status the mesh decided. The route and per-try timeouts run until the response
head (a held head: until it is sent on).

:class:`Dispatch` puts both behind the engine's signatures: it looks at a connection's first
bytes (:class:`Sniffed`) and hands it to :class:`H2Proxy` when they are the HTTP/2 preface,
else to the HTTP/1.1 engine, so every HTTP port (http, http2, grpc) can be given to it.

Hop-by-hop headers (``connection``, ``keep-alive``, ``proxy-connection``,
``transfer-encoding``, ``upgrade``) are dropped; ``te: trailers`` is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from meshagent import relay
from meshagent.l7 import routes, telemetry, upstream
from meshagent.l7.engine import (
    LOCAL,
    Engine,
    Front,
    HttpRequest,
    Peer,
    Pod,
    Service,
    TryFailed,
    try_timeout,
    with_client_cert,
)
from meshagent.l7.http1 import Channel, ChannelClosed

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                        "upgrade", "http2-settings"})
GRPC_FOR_HTTP = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14",
                 504: "14"}
# The HTTP status a gRPC status counts as for outlier detection, as Envoy's router
# reports a trailers-only gRPC answer (grpc-status in its head): UNAVAILABLE is a 503,
# INTERNAL a 500, and so on; a code not listed is a 500.
HTTP_FOR_GRPC = {"0": 200, "1": 499, "2": 500, "3": 400, "4": 504, "5": 404, "6": 409,
                 "7": 403, "8": 429, "9": 400, "10": 409, "11": 400, "12": 501, "13": 500,
                 "14": 503, "15": 500, "16": 401}
WINDOW = 1 << 20
# Request bytes kept per stream so that a retry or a mirror can send them again (Envoy's
# per-request buffer limit); past it the body streams through once and is not retried.
RETRY_BUFFER = 64 * 1024
MIRROR_TIMEOUT = 10.0  # a mirrored request, from its stream opening to its answer's end

Headers = list[tuple[str, str]]


class StreamReset(ConnectionError):
    """The peer reset the stream (or the connection went away)."""


# --------------------------------------------------------------------------- connection


@dataclass
class _Stream:
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    window: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


class H2Connection:
    """One HTTP/2 connection over a relay End, either side; streams read as event queues:
    ("headers", Headers), ("data", bytes), ("trailers", Headers), ("end", None),
    ("reset", error code)."""

    def __init__(self, end: relay.End, *, client: bool) -> None:
        self.channel = Channel(end)
        cfg = h2.config.H2Configuration(client_side=client, header_encoding="utf-8",
                                        validate_inbound_headers=False,
                                        normalize_inbound_headers=False)
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.client = client
        self.streams: dict[int, _Stream] = {}
        self.incoming: asyncio.Queue[int | None] = asyncio.Queue()
        self.closed = False
        self.error = ""
        self.h2.initiate_connection()
        wanted: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW}
        if client:
            wanted[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.update_settings(wanted)
        self.h2.increment_flow_control_window(WINDOW)
        self._flush()
        self._reader = asyncio.ensure_future(self._read_loop())

    @property
    def usable(self) -> bool:
        return not self.closed and not self.channel.error and not self.channel.closed

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.channel.closed:
            with contextlib.suppress(ChannelClosed):
                self.channel.write(data)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.channel.read()
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    self.error = f"HTTP/2 protocol error: {e}"
                    self._flush()
                    break
                for ev in events:
                    self._dispatch(ev)
                self._flush()
        except ChannelClosed as e:
            self.error = str(e) or "connection reset"
        finally:
            self._shut()

    def _dispatch(self, ev: Any) -> None:
        st: _Stream | None
        if isinstance(ev, h2.events.RequestReceived):
            self.streams[ev.stream_id] = fresh = _Stream()
            fresh.events.put_nowait(("headers", _decoded(ev.headers)))
            self.incoming.put_nowait(ev.stream_id)
        elif isinstance(ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            if isinstance(ev, h2.events.InformationalResponseReceived):
                return
            if (st := self.streams.get(ev.stream_id)) is not None:
                st.events.put_nowait(("headers", _decoded(ev.headers)))
        elif isinstance(ev, h2.events.TrailersReceived):
            if (st := self.streams.get(ev.stream_id)) is not None:
                st.events.put_nowait(("trailers", _decoded(ev.headers)))
        elif isinstance(ev, h2.events.DataReceived):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.events.put_nowait(("data", (ev.data, ev.flow_controlled_length)))
            elif ev.flow_controlled_length:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            if (st := self.streams.get(ev.stream_id)) is not None:
                st.events.put_nowait(("end", None))
        elif isinstance(ev, h2.events.StreamReset):
            if (st := self.streams.get(ev.stream_id)) is not None:
                st.closed = True
                st.events.put_nowait(("reset", ev.error_code))
                st.window.set()
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = (self.streams.values() if ev.stream_id == 0
                       else [s for i, s in self.streams.items() if i == ev.stream_id])
            for s in targets:
                s.window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.error = f"GOAWAY ({ev.error_code})"
            self.closed = True

    def _shut(self) -> None:
        self.closed = True
        for s in self.streams.values():
            if not s.closed:
                s.closed = True
                s.events.put_nowait(("reset", h2.errors.ErrorCodes.CONNECT_ERROR))
                s.window.set()
        self.incoming.put_nowait(None)
        self.channel.close()

    # -- streams --

    def open_stream(self) -> int:
        if not self.usable:
            raise StreamReset(self.error or "connection closed")
        sid = self.h2.get_next_available_stream_id()
        self.streams[sid] = _Stream()
        return sid

    async def next_event(self, sid: int) -> tuple[str, Any]:
        kind, value = await self.streams[sid].events.get()
        if kind == "data":
            data, flow = value
            if flow and not self.closed:
                with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                    self.h2.acknowledge_received_data(flow, sid)
                self._flush()
            return "data", data
        return kind, value

    def send_headers(self, sid: int, headers: Headers, *, end_stream: bool = False) -> None:
        if self.closed:
            raise StreamReset(self.error or "connection closed")
        try:
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as e:
            raise StreamReset(str(e)) from None
        self._flush()

    async def send_data(self, sid: int, data: bytes, *, end_stream: bool = False) -> None:
        s = self.streams[sid]
        view = memoryview(data)
        while view:
            if self.closed or s.closed:
                raise StreamReset(self.error or "stream reset")
            try:
                room = min(self.h2.local_flow_control_window(sid),
                           self.h2.max_outbound_frame_size)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                raise StreamReset(str(e)) from None
            if room <= 0:
                s.window.clear()
                await s.window.wait()
                continue
            piece, view = view[:room], view[room:]
            self.h2.send_data(sid, bytes(piece), end_stream=end_stream and not view)
            self._flush()
            await self.channel.drain()
        if end_stream and not data:
            self.end_stream(sid)

    def end_stream(self, sid: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.h2.end_stream(sid)
        self._flush()

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Reset stream ``sid``; whoever waits on its events sees ("reset", code)."""
        s = self.streams.get(sid)
        if s is not None and not s.closed:
            s.closed = True
            s.events.put_nowait(("reset", code))
            s.window.set()
        with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self.h2.reset_stream(sid, error_code=code)
        self._flush()

    def forget(self, sid: int) -> None:
        self.streams.pop(sid, None)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self._flush()
        self.closed = True
        self.channel.close()
        self._reader.cancel()


def _decoded(headers: Any) -> Headers:
    out: Headers = []
    for k, v in headers:
        k = k.decode() if isinstance(k, bytes) else k
        v = v.decode(errors="replace") if isinstance(v, bytes) else v
        out.append((k, v))
    return out


def _get(headers: Headers, name: str) -> str:
    return next((v for k, v in headers if k == name), "")


def _forward(headers: Headers) -> Headers:
    """Headers minus the hop-by-hop ones (``te: trailers`` stays)."""
    return [(k, v) for k, v in headers
            if k not in HOP_BY_HOP and not (k == "te" and v.strip().lower() != "trailers")]


def _is_grpc(headers: Headers) -> bool:
    return _get(headers, "content-type").startswith("application/grpc")


def local_reply(status: int, text: str, *, grpc: bool,
                extra: Headers | None = None) -> tuple[Headers, bytes]:
    """The head (and body) of a reply the mesh makes itself."""
    if grpc:
        return [(":status", "200"), ("content-type", "application/grpc"),
                ("grpc-status", GRPC_FOR_HTTP.get(status, "2")), ("grpc-message", text),
                *(extra or [])], b""
    body = text.encode()
    return [(":status", str(status)), ("content-type", "text/plain"),
            ("content-length", str(len(body))), *(extra or [])], body


# --------------------------------------------------------------------------- the proxy


@dataclass
class _Result:
    status: int = 0
    flags: list[str] = field(default_factory=list)
    grpc_status: str = ""
    response_bytes: int = 0
    upstream: str = ""
    cluster: str = ""
    details: str = ""


class _RequestBody:
    """A client stream's request body as the tries send it.

    Everything the client sent is kept while it fits ``limit`` (``RETRY_BUFFER``), so that
    a retry or a mirror can send it again (``replayable``); past the limit, or once the
    client reset its stream, the body only streams through and the request is not tried
    again. Only one :meth:`send` reads the client at a time: a try's is stopped before the
    next try starts (a mirror's only replays, after the body ``ended``)."""

    def __init__(self, conn: H2Connection, sid: int, *, limit: int) -> None:
        self.conn, self.sid, self.limit = conn, sid, limit
        self.kept: list[bytes] = []
        self.size = 0
        self.trailers: Headers | None = None
        self.ended = False  # the client's END_STREAM (or its trailers) came
        self.lost = False  # the client reset its stream
        self.replayable = limit > 0
        self.settled = asyncio.Event()  # ended, or not replayable any more (or no one reads)

    @property
    def complete(self) -> bool:
        """The whole body is here, and kept."""
        return self.ended and self.replayable

    def _unkeep(self) -> None:
        self.replayable = False
        self.kept.clear()
        self.settled.set()

    async def send(self, up: H2Connection, usid: int) -> None:
        """What is kept, then the rest as the client sends it, then the end (or the
        client's trailers), to ``up``'s stream ``usid``."""
        for piece in self.kept:
            await up.send_data(usid, piece)
        while not self.ended:
            kind, value = await self.conn.next_event(self.sid)
            if kind == "data":
                self.size += len(value)
                if self.replayable and self.size <= self.limit:
                    self.kept.append(value)
                elif self.replayable:
                    self._unkeep()
                await up.send_data(usid, value)
            elif kind in ("trailers", "end"):
                self.trailers = value if kind == "trailers" else None
                self.ended = True
                self.settled.set()
            else:
                self.lost = True
                self._unkeep()
                up.reset(usid)
                raise StreamReset("client reset")
        if self.trailers is not None:
            up.send_headers(usid, self.trailers, end_stream=True)
        else:
            up.end_stream(usid)


@dataclass
class _Answer:
    """A try's response as far as it was read before the try was judged: its head and,
    after a held gRPC head, the event that came next."""

    up: H2Connection
    usid: int
    head: Headers
    pump: asyncio.Future[None]  # the request body going up
    server: _ServerSide | None
    pending: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(_get(self.head, ":status") or 0)

    @property
    def outlier_status(self) -> int:
        """The status outlier detection counts: a trailers-only gRPC answer's
        grpc-status as HTTP (HTTP_FOR_GRPC), else ``:status``. A gRPC error in
        trailers after a 200 head counts as the 200, as in Envoy."""
        code = _get(self.head, "grpc-status")
        return HTTP_FOR_GRPC.get(code, 500) if code else self.status

    @property
    def grpc_status(self) -> str:
        for kind, value in self.pending:
            if kind == "trailers":
                return _get(value, "grpc-status")
        return _get(self.head, "grpc-status")


async def _stopped(task: asyncio.Future[None]) -> None:
    """``task`` cancelled unless done, and over; how it ended is seen elsewhere."""
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


async def _abandon(opened: tuple[H2Connection, int, _ServerSide | None] | None,
                   pump: asyncio.Future[None] | None, *, status: int, flag: str,
                   grpc_status: str = "") -> None:
    """A try given up (failed, timed out, or answered and retried): its upstream stream
    reset, its pump stopped, and for a local pod the server side recorded."""
    if opened is None:
        return
    up, usid, server = opened
    up.reset(usid)
    if pump is not None:
        await _stopped(pump)
    up.forget(usid)
    if server is not None:
        server.done(status, flag, 0, grpc_status=grpc_status)


async def _reply(conn: H2Connection, sid: int, status: int, text: str, *,
                 grpc: bool) -> int:
    """A reply the mesh makes itself on the server side; the body's length."""
    head, body = local_reply(status, text, grpc=grpc)
    conn.send_headers(sid, head, end_stream=not body)
    if body:
        await conn.send_data(sid, body, end_stream=True)
    return len(body)


class H2Proxy:
    """HTTP/2 streams through the engine's routing, clusters and telemetry."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pool: dict[tuple[str, ...], H2Connection] = {}
        self._mirrors: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for t in list(self._mirrors):
            t.cancel()
        await asyncio.gather(*self._mirrors, return_exceptions=True)
        for c in list(self._pool.values()):
            c.close()
        self._pool.clear()

    # ================================================================ client side

    async def outbound(self, client: relay.End, *, source: Peer, service: Service,
                       front: Front | None = None) -> None:
        """Serve one client HTTP/2 connection to an HTTP service port until it closes;
        with ``front`` (the ingress gateway's), each stream is routed by it instead of
        by the route table, as ``Engine.outbound`` does for HTTP/1.1."""
        conn = H2Connection(client, client=False)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while (sid := await conn.incoming.get()) is not None:
                t = asyncio.ensure_future(self._client_stream(conn, sid, source, service,
                                                              front))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        finally:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            conn.close()

    async def _client_stream(self, conn: H2Connection, sid: int, source: Peer,
                             service: Service, front: Front | None = None) -> None:
        started, t0 = time.time(), time.monotonic()
        _, head = await conn.next_event(sid)
        headers: Headers = head
        lower = {k: v for k, v in headers if not k.startswith(":")}
        if "x-request-id" not in lower:
            lower["x-request-id"] = telemetry.new_request_id()
            headers = [*headers, ("x-request-id", lower["x-request-id"])]
        method, path = _get(headers, ":method"), _get(headers, ":path")
        authority = _get(headers, ":authority") or lower.get("host", "")
        grpc = _is_grpc(headers)
        req = routes.Request(method=method, path=path, authority=authority, headers=lower,
                             port=service.port, source_labels=source.labels,
                             source_namespace=source.namespace)
        routed = None
        if front is not None:
            pseudo = [(k, v) for k, v in headers if k.startswith(":")]
            routed = front(req, [(k, v) for k, v in headers if not k.startswith(":")])
            req, action, service = routed.request, routed.action, routed.service
            headers = pseudo + [(k.lower(), v) for k, v in routed.headers]
        else:
            action = self.engine.route_table().route(req, service.host, service.port)
        body = _RequestBody(conn, sid, limit=RETRY_BUFFER)
        res = _Result()
        try:
            await self._carry_out(conn, sid, headers=headers, req=req, action=action,
                                  source=source, res=res, grpc=grpc, body=body)
        except (StreamReset, ChannelClosed) as err:
            res.flags.append("DC" if not res.status else "UC")
            res.details = f"stream reset: {err}"
        finally:
            body.settled.set()  # a mirror still waiting for the body gives up
            conn.forget(sid)
            e = self.engine
            rec = telemetry.RequestRecord(
                reporter="source", source_workload=source.workload,
                source_workload_namespace=source.namespace, source_principal=source.principal,
                destination_service=service.host, destination_service_name=service.name,
                destination_service_namespace=service.namespace,
                request_protocol="grpc" if grpc else "http", response_code=res.status,
                response_flags=",".join(res.flags), grpc_response_status=res.grpc_status,
                connection_security_policy="unknown", method=method, path=path,
                authority=authority, duration_s=time.monotonic() - t0,
                request_bytes=body.size, response_bytes=res.response_bytes,
                upstream=res.upstream, route=action.origin, start_time=started,
                protocol="HTTP/2", request_id=lower.get("x-request-id", ""),
                user_agent=lower.get("user-agent", ""), downstream_remote_address=source.ip,
                upstream_cluster=res.cluster, response_code_details=res.details)
            ctx = telemetry.TraceContext.from_headers(lower)
            if ctx is not None:
                rec.trace_id = ctx.trace_id
            if res.upstream:
                dst = e.pod(res.upstream.rsplit(":", 1)[0])
                if dst is not None:
                    rec.destination_workload = dst.workload
                    rec.destination_workload_namespace = dst.namespace
                    rec.destination_principal = dst.principal
                    rec.connection_security_policy = \
                        "mutual_tls" if dst.meshed and source.meshed else "none"
            if routed is not None:
                routed.finish(rec)
            e.record(rec)

    async def _carry_out(self, conn: H2Connection, sid: int, *, headers: Headers,
                         req: routes.Request, action: routes.Action, source: Peer,
                         res: _Result, grpc: bool, body: _RequestBody) -> None:
        def respond(status: int, text: str, flag: str = "",
                    extra: Headers | None = None) -> None:
            res.status = status
            if flag:
                res.flags.append(flag)
            if flag and self.engine.flags_header:
                extra = [*(extra or []), (self.engine.flags_header, flag)]
            head, payload = local_reply(status, text, grpc=grpc, extra=extra)
            if grpc:
                res.grpc_status = _get(head, "grpc-status")
            conn.send_headers(sid, action.response_headers.apply(head), end_stream=not payload)
            if payload:
                conn.h2.send_data(sid, payload, end_stream=True)
                conn._flush()
            res.response_bytes = len(payload)

        e = self.engine
        if action.redirect is not None:
            loc = action.redirect.location(scheme=req.scheme, authority=req.authority,
                                           path=req.path)
            respond(action.redirect.code, "", extra=[("location", loc)])
            return
        dest = action.choose(e.rng.random())
        if dest is None:
            res.details = "route_not_found"
            respond(404, "no route matched", "NR")
            return
        cluster = e.clusters().get(dest.host, dest.port, dest.subset)
        if cluster is None:
            res.details = "cluster_not_found"
            respond(503, f"no cluster for {dest.host}", "NC")
            return
        res.cluster = cluster.name
        fault = action.fault
        if fault is not None and fault.delay and e.rng.random() * 100 < fault.delay_percent:
            res.flags.append("DI")
            await asyncio.sleep(fault.delay)
        out = self._upstream_headers(headers, action, dest, scheme=req.scheme)
        try:
            ticket = await cluster.acquire()
        except upstream.Overflow:
            res.details = "upstream_reset_before_response_started{overflow}"
            respond(503, "upstream connect error or disconnect/reset before headers. "
                         "reset reason: overflow", "UO")
            return
        try:
            if action.mirror is not None and e.rng.random() * 100 < action.mirror_percent:
                task = asyncio.ensure_future(self._mirror(action.mirror, out, body=body,
                                                          source=source))
                self._mirrors.add(task)
                task.add_done_callback(self._mirrors.discard)
            await self._forward(conn, sid, out=out, req=req, action=action, cluster=cluster,
                                source=source, res=res, respond=respond, grpc=grpc,
                                body=body,
                                response_ops=action.response_headers.merged(
                                    dest.response_headers))
        finally:
            ticket.release()

    @staticmethod
    def _upstream_headers(headers: Headers, action: routes.Action,
                          dest: routes.Destination, *, scheme: str) -> Headers:
        """The request's headers as the upstream gets them: header operations, rewrite,
        and x-forwarded-proto (the client's scheme), as the HTTP/1.1 engine sends."""
        pseudo = [(k, v) for k, v in headers if k.startswith(":")]
        regular = action.request_headers.merged(dest.request_headers).apply(
            _forward([(k, v) for k, v in headers if not k.startswith(":")]))
        regular = [(k, v) for k, v in regular if k.lower() != "x-forwarded-proto"] + \
            [("x-forwarded-proto", scheme)]
        path = _get(pseudo, ":path")
        if action.rewrite is not None:
            path = action.rewrite.path(path)
            if action.rewrite.authority:
                pseudo = [(k, action.rewrite.authority if k == ":authority" else v)
                          for k, v in pseudo]
        pseudo = [(k, path if k == ":path" else v) for k, v in pseudo]
        return pseudo + [(k.lower(), v) for k, v in regular]

    async def _forward(self, conn: H2Connection, sid: int, *, out: Headers,
                       req: routes.Request, action: routes.Action, cluster: Any,
                       source: Peer, res: _Result, respond: Any, grpc: bool,
                       body: _RequestBody, response_ops: routes.HeaderOps) -> None:
        """The tries (see the module docstring); the first answer not to be tried again
        goes to the client, with the route's response header operations done."""
        retries, fault, e = action.retries, action.fault, self.engine
        tries = 1 + retries.attempts
        tried: list[upstream.Endpoint] = []
        deadline = (time.monotonic() + action.timeout) if action.timeout else None
        for n in range(tries):
            left = n < tries - 1  # a retry is left, if the body allows one
            urx = ["URX"] if n and not left else []  # retries exhausted
            if fault is not None and fault.abort_status and \
                    e.rng.random() * 100 < fault.abort_percent:
                if left and retries.retriable(fault.abort_status):
                    continue
                res.details = "fault_filter_abort"
                respond(fault.abort_status, "fault filter abort", "FI")
                res.flags += urx
                return
            ep = cluster.pick(headers=req.headers, source_ip=source.ip, exclude=tuple(tried),
                              path=req.path)
            if ep is None:
                res.details = "no_healthy_upstream"
                respond(503, "no healthy upstream", "UH")
                return
            tried.append(ep)
            res.upstream = ep.address
            timeout = try_timeout(retries.per_try_timeout, deadline)
            if timeout is not None and timeout <= 0:
                respond(504, "upstream request timeout", "UT")
                return
            cluster.started(ep)
            try:
                answer = await self._try(ep, out, source=source, body=body, timeout=timeout,
                                         hold=grpc and left and retries.on_grpc)
            except _Denied as d:
                cluster.finished(ep)
                res.details = f"rbac_access_denied: {d}"
                respond(403, "RBAC: access denied")
                return
            except TryFailed as f:
                cluster.report(ep, status=None)
                cluster.finished(ep)
                if left and body.replayable and \
                        retries.retriable_failure(f.flag, refused=f.refused):
                    continue
                res.details = str(f)
                if f.flag == "UT" or (deadline is not None and
                                      time.monotonic() >= deadline - 0.001):
                    respond(504, "upstream request timeout", "UT")
                else:
                    respond(f.status, f"upstream connect error or disconnect/reset before "
                                      f"headers. reset reason: {f}", f.flag)
                res.flags += urx
                return
            except BaseException:
                cluster.finished(ep)
                raise
            cluster.report(ep, status=answer.outlier_status)
            again = retries.retriable(answer.status) or (
                grpc and retries.retriable_grpc(answer.grpc_status))
            if again and left and body.replayable:
                cluster.finished(ep)
                await _abandon((answer.up, answer.usid, answer.server), answer.pump,
                               status=answer.status, flag="", grpc_status=answer.grpc_status)
                continue
            try:
                await self._relay(conn, sid, answer, res=res, body=body, ops=response_ops)
            finally:
                cluster.finished(ep)
            res.flags += urx if again else []
            return

    async def _try(self, ep: upstream.Endpoint, headers: Headers, *, source: Peer,
                   body: _RequestBody, timeout: float | None, hold: bool) -> _Answer:
        """One try at ``ep``: a stream opened, the request sent (its body by a pump, as it
        comes), the response head read, all within ``timeout``. With ``hold`` (a gRPC
        request that may be tried again) a head without ``grpc-status`` is held until the
        next event, so that trailers right after it (no message) decide too; once the head
        is in, the timeout no longer fails the try. TryFailed: UF, UC or UT."""
        opened: tuple[H2Connection, int, _ServerSide | None] | None = None
        pump: asyncio.Future[None] | None = None
        answer: _Answer | None = None
        try:
            async with asyncio.timeout(timeout):
                opened = up, usid, server = await self._open_stream(ep, headers, source)
                pump = asyncio.ensure_future(body.send(up, usid))
                kind, head = await up.next_event(usid)
                if kind == "reset" and head == h2.errors.ErrorCodes.REFUSED_STREAM:
                    raise TryFailed("UC", "remote refused stream", refused=True)
                if kind != "headers":
                    raise TryFailed("UC", "remote reset")
                answer = _Answer(up, usid, head, pump, server)
                if hold and not _get(head, "grpc-status"):
                    answer.pending.append(await up.next_event(usid))
        except TimeoutError:
            if answer is not None:
                return answer
            await _abandon(opened, pump, status=504, flag="UT")
            raise TryFailed("UT", "per-try timeout", status=504) from None
        except BaseException:
            await _abandon(opened, pump, status=503, flag="UC")
            raise
        if answer.pending and answer.pending[0][0] == "reset":
            await _abandon(opened, pump, status=503, flag="UC")
            raise TryFailed("UC", "remote reset after the response head")
        return answer

    async def _open_stream(self, ep: upstream.Endpoint, headers: Headers,
                           source: Peer) -> tuple[H2Connection, int, _ServerSide | None]:
        e = self.engine
        dst = e.pod(ep.ip)
        mode = e.mode_to(dst, source)
        server: _ServerSide | None = None
        if mode == LOCAL:
            assert dst is not None
            server = _ServerSide(e, source=source, dst=dst, port=ep.port, mtls=True,
                                 headers=headers)
            why = server.check()
            if why is not None:
                server.done(403, "DENY", 0, grpc_status="7" if _is_grpc(headers) else "")
                raise _Denied(why)
            headers = server.headers
        key = (mode, source.namespace, source.service_account, ep.ip, str(ep.port))
        up = self._pool.get(key)
        if up is None or not up.usable:
            up = H2Connection(await e.open_end(mode, ep, dst, source), client=True)
            self._pool[key] = up
        try:
            usid = up.open_stream()
            up.send_headers(usid, headers)
        except StreamReset as err:
            up.close()
            raise TryFailed("UC", f"connection termination: {err}") from None
        return up, usid, server

    async def _relay(self, conn: H2Connection, sid: int, answer: _Answer, *, res: _Result,
                     body: _RequestBody, ops: routes.HeaderOps | None = None) -> None:
        """The answer to the client stream ``sid``: its head (with ``ops``, the route's
        response header operations, done), what was read after it, then the rest as it
        comes, trailers included; then the try's stream is done with."""
        up, usid = answer.up, answer.usid
        res.status, res.details = answer.status, "via_upstream"
        res.grpc_status = _get(answer.head, "grpc-status")
        forwarded = _forward(answer.head)
        if ops:
            forwarded = [(k, v) for k, v in forwarded if k.startswith(":")] + [
                (k.lower(), v) for k, v in ops.apply(
                    [(k, v) for k, v in forwarded if not k.startswith(":")])]
        head: Headers | None = forwarded
        pending = answer.pending
        try:
            while True:
                kind, value = pending.pop(0) if pending else await up.next_event(usid)
                if kind == "end" and head is not None:
                    conn.send_headers(sid, head, end_stream=True)
                    break
                if head is not None:
                    conn.send_headers(sid, head)
                    head = None
                if kind == "data":
                    res.response_bytes += len(value)
                    await conn.send_data(sid, value)
                elif kind == "trailers":
                    res.grpc_status = _get(value, "grpc-status") or res.grpc_status
                    conn.send_headers(sid, value, end_stream=True)
                    break
                elif kind == "end":
                    conn.end_stream(sid)
                    break
                else:
                    res.flags.append("DC" if body.lost else "UC")
                    conn.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
                    break
            if answer.server is not None:
                answer.server.done(res.status, "UC" if "UC" in res.flags else "",
                                   res.response_bytes, grpc_status=res.grpc_status,
                                   request_bytes=body.size)
        finally:
            if not answer.pump.done():  # the answer ended before the request
                up.reset(usid)
            await _stopped(answer.pump)
            up.forget(usid)

    async def _mirror(self, dest: routes.Destination, headers: Headers, *,
                      body: _RequestBody, source: Peer) -> None:
        """A copy of the request to the mirror destination, its authority suffixed
        ``-shadow``, once the client's body is all here and kept (else none is sent); its
        answer is read and dropped. The request itself never waits for it."""
        cluster = self.engine.clusters().get(dest.host, dest.port, dest.subset)
        ep = None if cluster is None else cluster.pick(headers={}, source_ip=source.ip)
        if ep is None:
            return
        await body.settled.wait()
        if not body.complete:
            log.debug("mirror to %s: the request body was not kept", ep.address)
            return
        headers = [(k, routes.shadow_authority(v) if k in (":authority", "host") else v)
                   for k, v in headers]
        opened: tuple[H2Connection, int, _ServerSide | None] | None = None
        status, grpc_status = 0, ""
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                opened = up, usid, _ = await self._open_stream(ep, headers, source)
                await body.send(up, usid)
                while (ev := await up.next_event(usid))[0] not in ("end", "reset"):
                    if ev[0] in ("headers", "trailers"):
                        status = status or int(_get(ev[1], ":status") or 0)
                        grpc_status = _get(ev[1], "grpc-status") or grpc_status
        except (TryFailed, StreamReset, ChannelClosed, TimeoutError) as err:
            log.debug("mirror to %s: %s", ep.address, err or type(err).__name__)
        finally:
            await _abandon(opened, None, status=status, flag="", grpc_status=grpc_status)

    # ================================================================ server side

    async def inbound(self, end: relay.End, *, source: Peer, dst: Pod, port: int,
                      mtls: bool) -> None:
        """Serve one inbound HTTP/2 connection to ``dst``:``port`` until it closes."""
        conn = H2Connection(end, client=False)
        pod: H2Connection | None = None
        tasks: set[asyncio.Task[None]] = set()
        lock = asyncio.Lock()

        async def to_pod() -> H2Connection:
            nonlocal pod
            async with lock:
                if pod is None or not pod.usable:
                    pod = H2Connection(await self.engine.connect(dst.ip, port), client=True)
                return pod

        try:
            while (sid := await conn.incoming.get()) is not None:
                t = asyncio.ensure_future(self._server_stream(conn, sid, source=source,
                                                              dst=dst, port=port, mtls=mtls,
                                                              to_pod=to_pod))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        finally:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if pod is not None:
                pod.close()
            conn.close()

    async def _server_stream(self, conn: H2Connection, sid: int, *, source: Peer, dst: Pod,
                             port: int, mtls: bool, to_pod: Any) -> None:
        _, headers = await conn.next_event(sid)
        grpc = _is_grpc(headers)
        server = _ServerSide(self.engine, source=source, dst=dst, port=port, mtls=mtls,
                             headers=headers)
        res = _Result()
        body = _RequestBody(conn, sid, limit=0)  # one try: nothing kept
        try:
            why = server.check()
            if why is not None:
                sent = await _reply(conn, sid, 403, "RBAC: access denied", grpc=grpc)
                server.done(403, "DENY", sent, grpc_status="7" if grpc else "",
                            details="rbac_access_denied")
                return
            try:
                pod = await to_pod()
                usid = pod.open_stream()
                pod.send_headers(usid, server.headers)
            except (OSError, TimeoutError, StreamReset) as err:
                sent = await _reply(conn, sid, 503, f"upstream connect error: {err}",
                                    grpc=grpc)
                server.done(503, "UF", sent, grpc_status=GRPC_FOR_HTTP[503] if grpc else "")
                return
            pump = asyncio.ensure_future(body.send(pod, usid))
            try:
                kind, head = await pod.next_event(usid)
            except BaseException:  # cancelled: the inbound connection is closing
                await _abandon((pod, usid, None), pump, status=0, flag="")
                raise
            if kind != "headers":
                await _abandon((pod, usid, None), pump, status=503, flag="UC")
                sent = await _reply(conn, sid, 503, "upstream connect error or disconnect/"
                                    "reset before headers. reset reason: remote reset",
                                    grpc=grpc)
                server.done(503, "UC", sent, grpc_status=GRPC_FOR_HTTP[503] if grpc else "",
                            request_bytes=body.size)
                return
            await self._relay(conn, sid, _Answer(pod, usid, head, pump, server), res=res,
                              body=body)
        except (StreamReset, ChannelClosed) as err:
            server.done(res.status or 0, "UC", res.response_bytes, grpc_status=res.grpc_status,
                        details=f"stream reset: {err}")
        finally:
            conn.forget(sid)


class _Denied(TryFailed):
    def __init__(self, why: str) -> None:
        super().__init__("DENY", why, status=403)


class _ServerSide:
    """The server side of one stream to a local pod: policy, trace, telemetry."""

    def __init__(self, engine: Engine, *, source: Peer, dst: Pod, port: int, mtls: bool,
                 headers: Headers) -> None:
        self.engine, self.source, self.dst, self.port, self.mtls = (
            engine, source, dst, port, mtls)
        self.started, self.t0 = time.time(), time.monotonic()
        self.method, self.path = _get(headers, ":method"), _get(headers, ":path")
        self.authority = _get(headers, ":authority")
        self.grpc = _is_grpc(headers)
        self.lower: Mapping[str, str] = {k: v for k, v in headers if not k.startswith(":")}
        parent = telemetry.TraceContext.from_headers(self.lower)
        self.ctx = telemetry.hop_context(parent, engine.tracer)
        self.headers = telemetry.with_trace(headers, self.ctx)
        if mtls:
            self.headers = with_client_cert(self.headers, source, dst)
        self._done = False

    def check(self) -> str | None:
        req = HttpRequest(method=self.method, path=self.path,
                          host=self.authority or self.lower.get("host", ""),
                          headers=dict(self.lower))
        allowed, why = self.engine.authorize(source=self.source, dst=self.dst, port=self.port,
                                             mtls=self.mtls, request=req)
        return None if allowed else (why or "denied")

    def done(self, status: int, flag: str, response_bytes: int, *, grpc_status: str = "",
             details: str = "", request_bytes: int = 0) -> None:
        if self._done:
            return
        self._done = True
        e, s, d = self.engine, self.source, self.dst
        duration = time.monotonic() - self.t0
        svc = e.service_of(dst=d, port=self.port,
                           host=self.authority or self.lower.get("host", ""),
                           source_namespace=s.namespace)
        e.record(telemetry.RequestRecord(
            reporter="destination", source_workload=s.workload,
            source_workload_namespace=s.namespace, source_principal=s.principal,
            destination_workload=d.workload, destination_workload_namespace=d.namespace,
            destination_principal=d.principal, destination_service=svc.host,
            destination_service_name=svc.name, destination_service_namespace=svc.namespace,
            request_protocol="grpc" if self.grpc else "http", response_code=status,
            response_flags=flag, grpc_response_status=grpc_status,
            connection_security_policy="mutual_tls" if self.mtls else "none",
            method=self.method, path=self.path, authority=self.authority,
            duration_s=duration, request_bytes=request_bytes, response_bytes=response_bytes,
            upstream=f"{d.ip}:{self.port}", trace_id=self.ctx.trace_id,
            span_id=self.ctx.span_id, start_time=self.started, protocol="HTTP/2",
            request_id=self.lower.get("x-request-id", ""),
            user_agent=self.lower.get("user-agent", ""), downstream_remote_address=s.ip,
            response_code_details=details or flag or "via_upstream"))
        if e.tracer is not None and self.ctx.sampled:
            tags = {"http.method": self.method, "http.url": self.path,
                    "http.status_code": str(status), "response_flags": flag or "-",
                    "node_id": e.node, "upstream_cluster": f"inbound|{self.port}||",
                    "peer.address": s.ip, "istio.namespace": d.namespace,
                    "istio.canonical_service": d.workload}
            if self.grpc:
                tags["grpc.status_code"] = grpc_status
            e.tracer.finish(self.ctx, name=f"{self.authority or d.name}"
                            f"{self.path.split('?', 1)[0]}", kind="SERVER",
                            start=self.started, duration_s=duration, tags=tags,
                            service=f"{d.workload}.{d.namespace}")


# --------------------------------------------------------------------------- dispatch


class Sniffed(relay.Relay):
    """A relay End whose first bytes can be looked at before a codec takes it: it takes the
    relay's place for the wrapped End, keeps what arrives until :meth:`start`, then hands
    everything on (like Channel, nothing of Relay's own state is used)."""

    def __init__(self, end: relay.End) -> None:  # no super(): see the docstring
        self.end = end
        self._buf = bytearray()
        self._eof = [False, False]
        self._lost: str | None = None
        self._target: relay.Relay | None = None
        self._side = 0
        self._changed = asyncio.Event()
        end.start(self, 0)

    # -- the wrapped End's callbacks --

    def data(self, side: int, data: bytes) -> None:
        if self._target is not None:
            self._target.data(self._side, data)
        else:
            self._buf += data
            self._changed.set()

    def eof(self, side: int) -> None:
        if self._target is not None:
            self._target.eof(self._side)
        else:
            self._eof[0] = True
            self._changed.set()

    def lost(self, side: int, why: str) -> None:
        if self._target is not None:
            self._target.lost(self._side, why)
        else:
            self._lost = why
            self._changed.set()

    def full(self, side: int) -> None:
        if self._target is not None:
            self._target.full(self._side)

    def drained(self, side: int) -> None:
        if self._target is not None:
            self._target.drained(self._side)

    # -- looking --

    async def is_h2(self, *, timeout: float = 10.0) -> bool:
        """Whether the connection opens with the HTTP/2 preface (prior knowledge). Decided
        as soon as the bytes differ from it (an HTTP/1.1 request line does at once)."""
        async with asyncio.timeout(timeout):
            while True:
                have = bytes(self._buf[:len(PREFACE)])
                if not PREFACE.startswith(have):
                    return False
                if len(have) == len(PREFACE):
                    return True
                if self._eof[0] or self._lost is not None:
                    return False
                self._changed.clear()
                await self._changed.wait()

    # -- End, for the codec --

    def start(self, relay: relay.Relay, side: int) -> None:
        self._target, self._side = relay, side
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            relay.data(side, data)
        if self._eof[0]:
            relay.eof(side)
        if self._lost is not None:
            relay.lost(side, self._lost)

    def write(self, data: bytes) -> None:
        self.end.write(data)

    def write_eof(self) -> None:
        self.end.write_eof()

    def pause_reading(self) -> None:
        self.end.pause_reading()

    def resume_reading(self) -> None:
        self.end.resume_reading()

    async def flushed(self) -> None:
        await self.end.flushed()

    def close(self) -> None:
        self.end.close()


class Dispatch:
    """The engine for HTTP/1.1 and :class:`H2Proxy` for connections that open with the
    HTTP/2 preface, behind the engine's ``outbound``/``inbound`` signatures: an agent can
    hand every HTTP port (http, http2 and grpc alike) to this. ``close`` closes both."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.h2 = H2Proxy(engine)

    async def outbound(self, client: relay.End, *, source: Peer, service: Service,
                       front: Front | None = None) -> None:
        end = Sniffed(client)
        try:  # a client may open a connection well before its first request
            h2c = await end.is_h2(timeout=self.engine.idle_timeout)
        except TimeoutError:
            end.close()
            return
        if h2c:
            await self.h2.outbound(end, source=source, service=service, front=front)
        else:
            await self.engine.outbound(end, source=source, service=service, front=front)

    async def inbound(self, end: relay.End, *, source: Peer, dst: Pod, port: int,
                      mtls: bool) -> None:
        sniffed = Sniffed(end)
        try:
            h2c = await sniffed.is_h2(timeout=self.engine.idle_timeout)
        except TimeoutError:
            sniffed.close()
            return
        if h2c:
            await self.h2.inbound(sniffed, source=source, dst=dst, port=port, mtls=mtls)
        else:
            await self.engine.inbound(sniffed, source=source, dst=dst, port=port, mtls=mtls)

    async def close(self) -> None:
        await self.h2.close()
        await self.engine.close()
