"""The mTLS tunnel between meshagents (port 15008): HTTP/2 CONNECT over TLS 1.3.

This is the shape of Istio's HBONE. One TLS connection carries many TCP
connections, each as an HTTP/2 CONNECT stream whose ``:authority`` is the
destination ``podIP:port``::

    source node                                   destination node
    pod --captured--> outbound 15001              15008 <--(PREROUTING: -d POD --dport 15008)
                      Pool.open(src identity,       |  accept; original dst = POD:15008
                            POD, expected peer)     |  -> the local pod's identity -> its cert
                      --TLS 1.3, mutual, ALPN h2--> |  client cert chain checked, SPIFFE ID read
                      CONNECT POD:port              |  admit(peer, pod, port)? 200 : 403
                      <---------- 200 ------------  |  connect POD:port -> relay
                      relay(local conn, stream)

The client presents the *source workload's* certificate and checks that the
server's SPIFFE ID is the destination workload's. The server presents the
*destination workload's* certificate, chosen by the original destination of
the accepted socket (read before the handshake: the TLS layer is put on the
accepted socket only then, so no ClientHello byte is read too early).

Pooling: connections are keyed by (source identity, destination pod IP) and
shared by every stream between them, up to the peer's MAX_CONCURRENT_STREAMS;
an idle connection is closed after ``idle_timeout``. Concurrent opens for one
key wait for the same handshake. Handshake time and failures are measured.

A stream is a :class:`meshagent.relay.End`: the relay hands a local socket's
bytes to it and its bytes to the socket by callbacks, the connection being the
TLS transport's protocol (no task or queue per chunk). HTTP/2 flow control
gives back-pressure: received data is acknowledged only once handed on, and a
stream out of send window makes the relay pause the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshagent import identity, relay
from shoal import errors, spiffe

log = logging.getLogger(__name__)

TUNNEL_PORT = 15008
STREAM_WINDOW = 1 << 20  # per-stream receive window
CONNECTION_WINDOW = 1 << 24
MAX_FRAME = 1 << 16
MAX_STREAMS = 1000
REASON_HEADER = b"shoal-reason"

Address = tuple[str, int]


class TunnelError(Exception):
    """The tunnel could not be set up; ``flag`` is Envoy's response flag for it."""

    def __init__(self, message: str, *, flag: str = "UF", status: int = 0) -> None:
        super().__init__(message)
        self.flag = flag
        self.status = status


@dataclass(frozen=True)
class TLSInfo:
    """What the handshake showed, for metrics and ``shoal mesh tls``."""

    local: str  # our SPIFFE ID
    peer: str  # the peer's verified SPIFFE ID
    version: str
    cipher: str
    peer_cert_sha256: str = ""  # hex, for x-forwarded-client-cert's Hash


def tls_info(ssl_object: ssl.SSLObject, local: spiffe.SpiffeId) -> TLSInfo:
    cipher = ssl_object.cipher()
    return TLSInfo(local=str(local), peer=str(identity.peer_spiffe_id(ssl_object)),
                   version=ssl_object.version() or "", cipher=cipher[0] if cipher else "",
                   peer_cert_sha256=identity.peer_cert_sha256(ssl_object))


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.handshakes = Counter(
            "shoal_mesh_tls_handshakes", "mTLS handshakes of the tunnel, by direction and "
            "result (ok, or why it failed)", ("direction", "result"), registry=registry)
        self.setup = Histogram(
            "shoal_mesh_tunnel_setup_seconds", "time to connect and complete the TLS "
            "handshake of a new tunnel connection", ("direction",), registry=registry,
            buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.streams = Counter(
            "shoal_mesh_tunnel_streams", "CONNECT streams opened in tunnel connections",
            ("direction", "pooled"), registry=registry)


# -- contexts, cached per certificate and trust bundle -------------------------------


class Contexts:
    """TLS contexts for workload certificates (building one costs about a millisecond)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, bytes, bool], ssl.SSLContext] = {}

    def get(self, cert: identity.WorkloadCert, roots_pem: bytes, *,
            server: bool) -> ssl.SSLContext:
        key = (str(cert.spiffe_id), cert.serial, hashlib.sha256(roots_pem).digest(), server)
        ctx = self._cache.get(key)
        if ctx is None:
            ctx = identity.tls_context(cert, roots_pem, server=server)
            ctx.set_alpn_protocols(["h2"])
            # Old entries of this identity are for a previous certificate or bundle.
            for old in [k for k in self._cache if k[0] == key[0] and k[3] == server]:
                del self._cache[old]
            self._cache[key] = ctx
        return ctx


class Identities:
    """What the tunnel needs of :class:`identity.IdentityManager`."""

    def __init__(self, manager: identity.IdentityManager) -> None:
        self.manager = manager
        self.contexts = Contexts()

    async def context(self, namespace: str, service_account: str, *,
                      server: bool) -> tuple[spiffe.SpiffeId, ssl.SSLContext]:
        cert = await self.manager.get(namespace, service_account)
        return cert.spiffe_id, self.contexts.get(cert, self.manager.roots_pem, server=server)


# -- one HTTP/2 connection and its streams ----------------------------------------------


class Stream:
    """One CONNECT stream, a :class:`meshagent.relay.End`.

    Data that arrives before the relay starts (or while it has paused us) is
    kept and acknowledged only when handed on, so HTTP/2 flow control bounds
    it to the stream window. Writes go out as far as the send window allows;
    the rest waits for WINDOW_UPDATE and the relay pauses the other end."""

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: dict[bytes, bytes] = {}
        # The answer to our CONNECT: client streams only (set by open_stream).
        self.response: asyncio.Future[dict[bytes, bytes]] | None = None
        self._relay: relay.Relay | None = None
        self._side = 0
        self._paused = False
        self._in = bytearray()  # received, not yet handed on
        self._unacked = 0  # flow-controlled bytes received and not acknowledged
        self._in_eof = False
        self._error: str | None = None
        self._out = bytearray()  # written, waiting for send window
        self._out_eof = False
        self._full = False  # told the relay we cannot take more
        self._sent_all = asyncio.Event()
        self._sent_all.set()
        self._closed = False

    @property
    def tls(self) -> TLSInfo:
        return self.conn.tls

    # -- fed by the connection --

    def _data(self, data: bytes, flow_length: int) -> None:
        if self._relay is not None and not self._paused and not self._in:
            self._relay.data(self._side, data)
            self.conn.ack(self.id, flow_length, flush=False)
            return
        self._in += data
        self._unacked += flow_length

    def _eof(self) -> None:
        self._in_eof = True
        if self._relay is not None and not self._paused and not self._in:
            self._relay.eof(self._side)

    def _fail(self, why: str) -> None:
        if self._error is None:
            self._error = why
        self._sent_all.set()
        if self.response is not None and not self.response.done():
            self.response.set_exception(TunnelError(why))
        if self._relay is not None:
            self._relay.lost(self._side, why)

    def _window_opened(self) -> None:
        if self._out or self._out_eof:
            self._send()
        self._update_full()

    def _update_full(self) -> None:
        full = bool(self._out) or self.conn.paused
        if full != self._full and self._relay is not None:
            self._full = full
            if full:
                self._relay.full(self._side)
            else:
                self._relay.drained(self._side)

    def _send(self) -> None:
        h2c = self.conn.h2
        try:
            while self._out:
                size = min(h2c.local_flow_control_window(self.id), len(self._out),
                           h2c.max_outbound_frame_size)
                if size <= 0:
                    break
                if size == len(self._out):
                    chunk, self._out = bytes(self._out), bytearray()
                else:
                    chunk = bytes(self._out[:size])
                    del self._out[:size]
                h2c.send_data(self.id, chunk)
            if not self._out and self._out_eof:
                self._out_eof = False
                h2c.end_stream(self.id)
        except h2.exceptions.ProtocolError as e:  # the stream was reset meanwhile
            self._out.clear()
            self._fail(f"stream {self.id}: {e}")
        self.conn.flush()
        if not self._out:
            self._sent_all.set()

    # -- relay.End --

    def start(self, relay_: relay.Relay, side: int) -> None:
        self._relay, self._side = relay_, side
        self._deliver()
        if self._error is not None:
            relay_.lost(side, self._error)
        else:
            self._update_full()

    def _deliver(self) -> None:
        assert self._relay is not None
        if self._in:
            data, self._in = bytes(self._in), bytearray()
            self._relay.data(self._side, data)
        if self._unacked:
            self.conn.ack(self.id, self._unacked, flush=True)
            self._unacked = 0
        if self._in_eof:
            self._relay.eof(self._side)

    def write(self, data: bytes) -> None:
        if self._error is not None or self._closed:
            return
        if not self._out:  # the common case: it fits the window, send it as is
            h2c = self.conn.h2
            if len(data) <= min(h2c.local_flow_control_window(self.id),
                                h2c.max_outbound_frame_size):
                try:
                    h2c.send_data(self.id, data)
                except h2.exceptions.ProtocolError as e:
                    self._fail(f"stream {self.id}: {e}")
                    return
                self.conn.flush()
                return
        self._out += data
        self._sent_all.clear()
        self._send()
        self._update_full()

    def write_eof(self) -> None:
        if self._error is not None or self._closed:
            return
        self._out_eof = True
        self._send()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._relay is not None:
                self._deliver()

    async def flushed(self) -> None:
        await self._sent_all.wait()

    def close(self) -> None:
        """Done with the stream: reset it if either side is still open."""
        if self._closed:
            return
        self._closed = True
        self.conn.release(self)


class Connection(asyncio.Protocol):
    """An HTTP/2 connection over TLS, the client or the server side: the TLS
    transport's protocol. ``local`` is our SPIFFE ID; the handshake's result is
    read in ``connection_made`` (a peer without a valid one is dropped there,
    before any of its bytes is read: ``failed`` says why)."""

    def __init__(self, *, client: bool, local: spiffe.SpiffeId,
                 on_request: Callable[[Stream], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.local = local
        self.on_request = on_request
        self.tls = TLSInfo(local=str(local), peer="", version="", cipher="")
        self.failed = ""
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client, header_encoding=None))
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self.paused = False
        self.idle_since = time.monotonic()
        self.transport: asyncio.Transport | None = None
        self.context: ssl.SSLContext | None = None  # client side: what it was made with
        self._tasks: set[asyncio.Task[None]] = set()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        try:
            self.tls = tls_info(transport.get_extra_info("ssl_object"), self.local)
        except identity.PeerIdentityError as e:
            self.failed = str(e)
            self.closed = True
            self.transport.abort()
            return
        self.h2.initiate_connection()
        self.h2.update_settings({
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        })
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            why = f"HTTP/2 protocol error: {e}"
            log.warning("tunnel with %s: %s", self.tls.peer, why)
            with contextlib.suppress(Exception):
                self.h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                self.flush()
            self._shut(why)
            return
        for ev in events:
            self._event(ev)
        self.flush()

    def eof_received(self) -> bool:
        return False  # close: TLS has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut(f"tunnel connection failed: {exc}" if exc is not None
                   else "the peer closed the tunnel connection")
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        for s in list(self.streams.values()):
            s._update_full()

    def resume_writing(self) -> None:
        self.paused = False
        for s in list(self.streams.values()):
            s._update_full()

    # -- I/O --

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def ack(self, stream_id: int, size: int, *, flush: bool) -> None:
        if self.closed or size <= 0:
            return
        self.h2.acknowledge_received_data(size, stream_id)
        if flush:
            self.flush()

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            s = self.streams.get(ev.stream_id)
            if s is not None and ev.data is not None:
                s._data(ev.data, ev.flow_controlled_length or 0)
            else:
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0,
                                                  ev.stream_id or 0)
        elif isinstance(ev, h2.events.RequestReceived):
            self._request(ev)
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None and s.response is not None and not s.response.done():
                s.response.set_result(dict(ev.headers or ()))
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None:
                s._eof()
        elif isinstance(ev, h2.events.StreamReset):
            s = self.streams.get(ev.stream_id or 0)
            if s is not None:
                s._fail(f"the peer reset the stream ({ev.error_code!r})")
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = (self.streams.values() if not ev.stream_id
                       else [s for s in [self.streams.get(ev.stream_id)] if s is not None])
            for s in list(targets):
                s._window_opened()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            for s in list(self.streams.values()):
                s._window_opened()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._shut(f"the peer ended the tunnel connection ({ev.error_code!r})")

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id or 0
        if self.on_request is None:  # a server pushing requests at a client
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        s = Stream(self, sid)
        s.headers = dict(ev.headers or ())
        self.streams[sid] = s
        self.idle_since = 0.0
        task = asyncio.create_task(self._serve(s), name="tunnel-stream")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, s: Stream) -> None:
        assert self.on_request is not None
        try:
            await self.on_request(s)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("tunnel stream from %s failed", self.tls.peer)
        finally:
            s.close()

    # -- streams --

    @property
    def capacity(self) -> int:
        remote = self.h2.remote_settings.max_concurrent_streams
        return (remote if remote is not None else 100) - self.h2.open_outbound_streams

    async def open_stream(self, authority: str, timeout: float, *,
                          source_ip: str = "") -> Stream:
        """A CONNECT stream to ``authority``; TunnelError when refused."""
        if self.closed:
            raise TunnelError("tunnel connection closed")
        sid = self.h2.get_next_available_stream_id()
        s = Stream(self, sid)
        s.response = asyncio.get_running_loop().create_future()
        self.streams[sid] = s
        self.idle_since = 0.0
        headers = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
        if source_ip:  # the original client, as HBONE's Forwarded header
            headers.append((b"forwarded", f"for={source_ip}".encode()))
        self.h2.send_headers(sid, headers)
        self.flush()
        try:
            answer = await asyncio.wait_for(s.response, timeout)
        except TimeoutError:
            s.close()
            raise TunnelError(f"no answer to CONNECT {authority} in {timeout:g}s") from None
        except TunnelError:
            s.close()
            raise
        status = int(answer.get(b":status", b"0"))
        if status != 200:
            s.close()
            reason = answer.get(REASON_HEADER, b"").decode(errors="replace")
            flag = "UAEX" if status == 403 else "UF"
            raise TunnelError(f"CONNECT {authority} refused: {status} {reason}".rstrip(),
                              flag=flag, status=status)
        return s

    def respond(self, s: Stream, status: int, reason: str = "") -> None:
        headers = [(b":status", str(status).encode())]
        if reason:
            headers.append((REASON_HEADER, reason.encode()))
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.send_headers(s.id, headers, end_stream=status != 200)
            self.flush()

    def release(self, s: Stream) -> None:
        self.streams.pop(s.id, None)
        if not self.closed:
            stream = self.h2.streams.get(s.id)
            if stream is not None and not stream.closed:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.reset_stream(s.id, h2.errors.ErrorCodes.CANCEL)
            self.flush()
        if not self.streams:
            self.idle_since = time.monotonic()

    # -- shutting down --

    def _shut(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        for s in list(self.streams.values()):
            s._fail(why)
        if self.transport is not None:
            self.transport.close()

    async def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self.flush()
            self._shut("tunnel connection closed")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.lost), 5.0)


# -- the client side: a pool --------------------------------------------------------------


@dataclass
class _Entry:
    conns: list[Connection] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Pool:
    """Tunnel connections from this node's workloads to peer pods' agents."""

    def __init__(self, *, identities: Identities, metrics: Metrics,
                 port: int = TUNNEL_PORT, connect_timeout: float = 5.0,
                 idle_timeout: float = 60.0) -> None:
        self.identities = identities
        self.metrics = metrics
        self.port = port
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def open(self, *, source: tuple[str, str], destination: Address,
                   expected: spiffe.SpiffeId, source_ip: str = "") -> Stream:
        """A stream from the workload ``source`` (namespace, service account) to
        ``destination`` (a pod IP and port), whose agent must prove ``expected``."""
        key = (source[0], source[1], destination[0])
        entry = self._entries.setdefault(key, _Entry())
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name="tunnel-pool-reaper")
        authority = f"{destination[0]}:{destination[1]}"
        try:
            local, ctx = await self.identities.context(*source, server=False)
        except errors.ShoalError as e:
            self.metrics.handshakes.labels("outbound", "no_certificate").inc()
            raise TunnelError(f"no certificate for {source[0]}/{source[1]}: {e}") from None
        conn = self._usable(entry, expected, ctx)
        pooled = conn is not None
        if conn is None:
            async with entry.lock:
                conn = self._usable(entry, expected, ctx)
                pooled = conn is not None
                if conn is None:
                    conn = await self._connect(local, ctx, destination[0], expected)
                    entry.conns.append(conn)
        self.metrics.streams.labels("outbound", str(pooled).lower()).inc()
        return await conn.open_stream(authority, self.connect_timeout, source_ip=source_ip)

    @staticmethod
    def _usable(entry: _Entry, expected: spiffe.SpiffeId,
                ctx: ssl.SSLContext) -> Connection | None:
        """A pooled connection for a new stream: open, with room, to the expected
        peer, and made with the current certificate and trust bundle (``ctx``:
        after a rotation, new streams go to a new connection and the old one
        drains, then closes when idle)."""
        entry.conns = [c for c in entry.conns if not c.closed]
        for c in entry.conns:
            if c.capacity > 0 and c.tls.peer == str(expected) and c.context is ctx:
                return c
        return None

    async def _connect(self, local: spiffe.SpiffeId, ctx: ssl.SSLContext, ip: str,
                       expected: spiffe.SpiffeId) -> Connection:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: Connection(client=True, local=local), ip, self.port, ssl=ctx),
                self.connect_timeout)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            result = "tls_failed" if isinstance(e, ssl.SSLError) else "connect_failed"
            self.metrics.handshakes.labels("outbound", result).inc()
            raise TunnelError(f"tunnel to {ip}:{self.port}: {e or type(e).__name__}"
                              ) from None
        if conn.failed:
            self.metrics.handshakes.labels("outbound", "bad_peer_identity").inc()
            raise TunnelError(f"tunnel to {ip}: {conn.failed}")
        if conn.tls.peer != str(expected):
            await conn.close()
            self.metrics.handshakes.labels("outbound", "wrong_peer_identity").inc()
            raise TunnelError(
                f"tunnel to {ip}: the peer is {conn.tls.peer}, expected {expected}")
        conn.context = ctx
        self.metrics.setup.labels("outbound").observe(time.monotonic() - started)
        self.metrics.handshakes.labels("outbound", "ok").inc()
        return conn

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_timeout / 4))
            now = time.monotonic()
            for key, entry in list(self._entries.items()):
                for c in list(entry.conns):
                    if c.closed or (c.idle_since and now - c.idle_since >= self.idle_timeout):
                        entry.conns.remove(c)
                        await c.close()
                if not entry.conns and not entry.lock.locked():
                    del self._entries[key]

    def connections(self) -> list[Connection]:
        return [c for e in self._entries.values() for c in e.conns if not c.closed]

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for c in self.connections():
            await c.close()
        self._entries.clear()


# -- the server side ----------------------------------------------------------------------

# original destination IP -> the local pod's (namespace, service account), or None
LocalIdentity = Callable[[str], "tuple[str, str] | None"]
# (stream, its destination pod IP, port) -> None; serves one CONNECT
StreamHandler = Callable[[Stream, str, int], Awaitable[None]]


def parse_authority(value: bytes) -> Address | None:
    host, sep, port = value.decode(errors="replace").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    return host, int(port)


class Server:
    """Accepts tunnel connections for this node's pods (port 15008)."""

    def __init__(self, *, host: str, port: int, identities: Identities, metrics: Metrics,
                 local_identity: LocalIdentity, handle: StreamHandler,
                 original_dst: Callable[[socket.socket], Address],
                 handshake_timeout: float = 5.0,
                 ready: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.host = host
        self.port = port
        self.identities = identities
        self.metrics = metrics
        self.local_identity = local_identity
        self.handle = handle
        self.original_dst = original_dst
        self.handshake_timeout = handshake_timeout
        self.ready = ready  # False: the agent does not know its pods yet
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.conns: set[Connection] = set()

    async def start(self) -> None:
        # IPPROTO_TCP explicitly: accepted sockets inherit the protocol number, and
        # asyncio sets TCP_NODELAY only on sockets whose ``proto`` says TCP. With
        # proto 0, Nagle's algorithm held each small write for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(1024)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop(), name="tunnel-accept")

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _addr = await loop.sock_accept(self._sock)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._handshake(conn), name="tunnel-handshake")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        peer = "?"
        try:
            peer = sock.getpeername()[0]
            dst_ip, _ = self.original_dst(sock)
            if self.ready is not None and not await self.ready():
                log.warning("tunnel from %s to %s closed: the agent has not synced yet",
                            peer, dst_ip)
                sock.close()
                return
            owner = self.local_identity(dst_ip)
            if owner is None:
                self.metrics.handshakes.labels("inbound", "unknown_destination").inc()
                log.info("tunnel from %s to %s: not a pod of this node", peer, dst_ip)
                sock.close()
                return
            local, ctx = await self.identities.context(*owner, server=True)
        except (OSError, errors.ShoalError) as e:
            self.metrics.handshakes.labels("inbound", "no_certificate").inc()
            log.warning("tunnel from %s: %s", peer, e)
            sock.close()
            return
        started = time.monotonic()
        loop = asyncio.get_running_loop()

        async def on_request(s: Stream) -> None:
            await self._stream(s.conn, s, dst_ip)

        conn = Connection(client=False, local=local, on_request=on_request)
        try:
            # The protocol is the one made here, not the returned one: with ssl,
            # uvloop returns its own TLS protocol in place of the application's.
            await loop.connect_accepted_socket(
                lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            self.metrics.handshakes.labels("inbound", "tls_failed").inc()
            log.info("tunnel from %s to %s: TLS handshake failed: %s", peer, dst_ip, e)
            sock.close()
            return
        if conn.failed:
            self.metrics.handshakes.labels("inbound", "bad_peer_identity").inc()
            log.info("tunnel from %s: %s", peer, conn.failed)
            return
        self.metrics.setup.labels("inbound").observe(time.monotonic() - started)
        self.metrics.handshakes.labels("inbound", "ok").inc()
        self.conns.add(conn)
        try:
            await asyncio.shield(conn.lost)
        finally:
            self.conns.discard(conn)
            await conn.close()

    async def _stream(self, conn: Connection, s: Stream, dst_ip: str) -> None:
        if s.headers.get(b":method") != b"CONNECT":
            conn.respond(s, 405, "only CONNECT")
            return
        target = parse_authority(s.headers.get(b":authority", b""))
        if target is None or target[0] != dst_ip:
            conn.respond(s, 400, f"the authority must be {dst_ip}:<port>")
            return
        self.metrics.streams.labels("inbound", "true").inc()
        await self.handle(s, *target)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for t in list(self._pending):
            t.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        for c in list(self.conns):
            await c.close()
