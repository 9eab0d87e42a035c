"""The ingress gateway: a meshagent mode serving Istio ``Gateway`` objects.

    python -m meshagent.gateway run --node-name N --config node.conf \\
        --pod istio-system/istio-ingressgateway [--zipkin-endpoint URL]
        [--trace-sampling PERCENT] [--event-loop uvloop|asyncio]

Shape (Istio's ingress gateway; see docs/ARCHITECTURE.md, "Ingress gateway"):
the gateway runs as the workload of a pod (``--pod``): its labels are what
``Gateway.spec.selector`` matches, its service account is the gateway's
identity (``spiffe://<td>/ns/istio-system/sa/istio-ingressgateway``). The
process runs in that pod's network namespace, with the node's credentials:
its certificate comes from the mesh CA through the node authorization every
mesh pod's does (a node gets identities only for service accounts of pods it
runs), its key is made by ``meshagent.keygen`` and never leaves the process.
The pod is opted out of capture: the gateway is its own proxy. Its traffic to
pods crosses the node's netns like any pod's, so a peer agent's tunnel
listener takes it (also on the gateway's own node). ``shoal lab up --mesh``
runs one on node-1 and publishes its listeners to the host.

What it serves (``plan()``, pure)::

    Gateways whose selector matches our pod's labels
      -> per server port one Listener: HTTP, or HTTPS with TLS mode SIMPLE
         (the certificate from the Secret ``credentialName``, type
         kubernetes.io/tls, in the gateway pod's namespace; SNI picks the
         server when several share the port)
      -> a bad server (unknown protocol, no credential, a port already used
         with another protocol) is left out alone and reported

Per request (one request per client connection; the reply says
``Connection: close``)::

    Host (port dropped) matches a server's hosts (exact, "*", "*.suffix")?
      no -> 404 NR
    the VirtualService bound to that Gateway (``gateways: [ns/name]``) for the
    host, routed by meshagent.l7.routes (the agents' own routing code)
      none / no route matched -> 404 NR;  redirect -> 301;  fault abort -> FI
    destination (weighted) -> cluster (meshagent.l7.upstream: subsets, LB,
    connection pool, outlier reports) -> endpoint -> mTLS tunnel stream to the
    endpoint's agent as the gateway's identity (plain TCP to a pod outside the
    mesh) -> request with the trace context of the gateway's own SERVER span
    (a child of the incoming one, else a new root), x-request-id,
    x-forwarded-for/-proto -> response relayed back

TLS for the listeners is the ``ssl`` module's; nothing here loads
``cryptography`` (a unit test guards the process's imports).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools
from prometheus_client import CollectorRegistry, Counter

from meshagent import identity, tunnel
from meshagent.l7 import routes, telemetry, upstream
from meshagent.l7.routes import RouteTable
from shoal import config as configmod
from shoal import errors, eventloop, logs, spiffe
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as tpb
from shoal.client import AsyncClient
from shoal.informer import Informer, key_of
from shoal.monitoring import MonitoringServer, Readiness
from shoal.signals import until_stopped

log = logging.getLogger(__name__)

HTTP, HTTPS = "HTTP", "HTTPS"
SIMPLE = "SIMPLE"
MAX_HEAD = 64 * 1024  # request/response head limit (431 / 502 beyond)
TLS_SECRET_TYPE = "kubernetes.io/tls"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "upgrade",
                        "trailer", "proxy-authenticate", "proxy-authorization"})
REASONS = {200: "OK", 301: "Moved Permanently", 400: "Bad Request", 404: "Not Found",
           431: "Request Header Fields Too Large", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


# --------------------------------------------------------------------------- the plan (pure)


def host_matches(pattern: str, host: str) -> bool:
    """Istio's host match: ``*`` any host, ``*.example.com`` any name ending in
    ``.example.com`` (not ``example.com`` itself), else equal (case-insensitive)."""
    pattern, host = pattern.lower(), host.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def host_rank(pattern: str) -> int:
    """How specific a matching pattern is: an exact host beats any wildcard, a
    longer wildcard beats a shorter one."""
    if pattern == "*":
        return 0
    if pattern.startswith("*."):
        return len(pattern)
    return 1 << 16


def bare_host(authority: str) -> str:
    """``authority`` without its port (IPv6 literals keep their brackets)."""
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


@dataclass(frozen=True)
class ServerHost:
    namespace: str  # "*" any, "." the Gateway's, or a namespace VirtualServices must be in
    host: str

    @classmethod
    def parse(cls, text: str, gateway_namespace: str) -> ServerHost:
        ns, sep, host = text.partition("/")
        if not sep:
            return cls("*", text.lower())
        return cls(gateway_namespace if ns == "." else ns, host.lower())

    def admits(self, vs_namespace: str) -> bool:
        return self.namespace in ("*", vs_namespace)


@dataclass(frozen=True)
class Server:
    gateway: str  # namespace/name of the Gateway
    index: int  # position in spec.servers
    name: str
    port: int
    protocol: str  # HTTP | HTTPS
    hosts: tuple[ServerHost, ...]
    credential: str = ""  # the Secret (HTTPS), in the gateway pod's namespace
    https_redirect: bool = False

    @property
    def label(self) -> str:
        return f"Gateway {self.gateway} servers[{self.index}]" + (
            f" ({self.name})" if self.name else "")

    def host_match(self, host: str) -> ServerHost | None:
        """The most specific of our hosts matching ``host``, if any."""
        best = [h for h in self.hosts if host_matches(h.host, host)]
        return max(best, key=lambda h: host_rank(h.host)) if best else None


@dataclass(frozen=True)
class Listener:
    port: int
    protocol: str  # HTTP | HTTPS
    servers: tuple[Server, ...]

    def server_for(self, host: str) -> tuple[Server, ServerHost] | None:
        """The server whose hosts match ``host`` most specifically (first on a tie)."""
        best: tuple[int, Server, ServerHost] | None = None
        for s in self.servers:
            m = s.host_match(host)
            if m is not None and (best is None or host_rank(m.host) > best[0]):
                best = (host_rank(m.host), s, m)
        return (best[1], best[2]) if best is not None else None

    @property
    def credentials(self) -> tuple[str, ...]:
        return tuple(sorted({s.credential for s in self.servers if s.credential}))


@dataclass(frozen=True)
class Plan:
    listeners: Mapping[int, Listener] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()  # namespace/name of the Gateways that select us
    rejected: tuple[str, ...] = ()  # "<server label>: why", one per server left out


def selects(gw: tpb.Gateway, labels: Mapping[str, str]) -> bool:
    """Whether the Gateway's selector picks a workload with ``labels`` (an empty
    selector picks every gateway workload)."""
    return all(labels.get(k) == v for k, v in gw.spec.selector.items())


def plan(gateways: Iterable[tpb.Gateway], *, labels: Mapping[str, str]) -> Plan:
    """What a gateway workload with ``labels`` serves (pure). Gateways are taken
    oldest first; a server whose port another protocol already holds is left out."""
    chosen = sorted((g for g in gateways if selects(g, labels)),
                    key=lambda g: (g.metadata.creation_timestamp.seconds,
                                   g.metadata.creation_timestamp.nanos, key_of(g)))
    by_port: dict[int, list[Server]] = {}
    rejected: list[str] = []
    for gw in chosen:
        gkey = key_of(gw)
        for i, s in enumerate(gw.spec.servers):
            protocol = (s.port.protocol or "").upper()
            server = Server(gateway=gkey, index=i, name=s.name, port=int(s.port.number),
                            protocol=protocol,
                            hosts=tuple(ServerHost.parse(h, gw.metadata.namespace)
                                        for h in s.hosts),
                            credential=s.tls.credential_name if s.HasField("tls") else "",
                            https_redirect=s.HasField("tls") and s.tls.https_redirect)
            why = _server_problem(s, protocol)
            if why:
                rejected.append(f"{server.label}: {why}")
                continue
            held = by_port.get(server.port)
            if held and held[0].protocol != protocol:
                rejected.append(f"{server.label}: port {server.port} already serves "
                                f"{held[0].protocol} ({held[0].label})")
                continue
            by_port.setdefault(server.port, []).append(server)
    listeners = {port: Listener(port=port, protocol=servers[0].protocol,
                                servers=tuple(servers))
                 for port, servers in sorted(by_port.items())}
    return Plan(listeners=listeners, gateways=tuple(key_of(g) for g in chosen),
                rejected=tuple(rejected))


def _server_problem(s: tpb.Server, protocol: str) -> str:
    if not 0 < s.port.number < 65536:
        return f"port {s.port.number} out of range"
    if not s.hosts:
        return "no hosts"
    if protocol == HTTP:
        return ""
    if protocol != HTTPS:
        return f"protocol {s.port.protocol!r} is not served (HTTP and HTTPS are)"
    mode = (s.tls.mode or SIMPLE).upper() if s.HasField("tls") else ""
    if mode != SIMPLE:
        return f"HTTPS with TLS mode {mode or 'unset'} is not served (SIMPLE is)"
    if not s.tls.credential_name:
        return "HTTPS needs tls.credentialName (a kubernetes.io/tls Secret)"
    return ""


# --------------------------------------------------------------------------- TLS from Secrets


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("gateway-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def credential_context(secret: core_pb2.Secret) -> ssl.SSLContext:
    """A server TLS context presenting the Secret's ``tls.crt`` (chain) and
    ``tls.key``; Invalid naming what is wrong with the Secret."""
    name = key_of(secret)
    crt, key = secret.data.get("tls.crt", b""), secret.data.get("tls.key", b"")
    if not crt or not key:
        raise errors.Invalid(f"secret {name}: needs tls.crt and tls.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        with _memory_file(bytes(crt) + b"\n" + bytes(key)) as path:
            ctx.load_cert_chain(path)
    except ssl.SSLError as e:
        raise errors.Invalid(f"secret {name}: tls.crt/tls.key unusable: {e.reason or e}"
                             ) from None
    return ctx


class Credentials:
    """TLS contexts of the listeners' Secrets, rebuilt when a Secret changes."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._ctx: dict[str, tuple[str, ssl.SSLContext]] = {}  # name -> (rv, ctx)
        self.problems: dict[str, str] = {}

    def update(self, secrets: Mapping[str, core_pb2.Secret], names: Iterable[str]) -> None:
        fresh: dict[str, tuple[str, ssl.SSLContext]] = {}
        problems: dict[str, str] = {}
        for name in sorted(set(names)):
            secret = secrets.get(f"{self.namespace}/{name}")
            if secret is None:
                problems[name] = f"secret {self.namespace}/{name} not found"
                continue
            rv = secret.metadata.resource_version
            old = self._ctx.get(name)
            if old is not None and old[0] == rv:
                fresh[name] = old
                continue
            try:
                fresh[name] = (rv, credential_context(secret))
            except errors.Invalid as e:
                problems[name] = str(e)
                if old is not None:  # keep serving the last good certificate
                    fresh[name] = old
        for name, why in problems.items():
            if self.problems.get(name) != why:
                log.warning("gateway credential %s: %s", name, why)
        self._ctx, self.problems = fresh, problems

    def get(self, name: str) -> ssl.SSLContext | None:
        found = self._ctx.get(name)
        return found[1] if found is not None else None


# --------------------------------------------------------------------------- HTTP heads


@dataclass
class Head:
    """A parsed request or response head; ``headers`` keep their order and case."""

    method: str = ""
    target: str = ""
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False  # the whole message (head and body) was parsed

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for n, v in self.headers if n.lower() == name), None)

    def lower(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for n, v in self.headers:
            out[n.lower()] = f"{out[n.lower()]},{v}" if n.lower() in out else v
        return out


class _Parsing:
    """httptools callbacks filling a :class:`Head` (and counting body bytes)."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self.url = bytearray()
        self._name = bytearray()
        self._value = bytearray()
        self._in_value = False
        self.headers_done = False
        self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.head.complete = True


def parse_request_head(data: bytes) -> tuple[Head, Any, _Parsing]:
    """The request head in ``data`` (which ends at its blank line) and the parser,
    to be fed the body; ValueError when it is not HTTP/1.x."""
    head = Head()
    cb = _Parsing(head)
    parser = httptools.HttpRequestParser(cb)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as e:
        raise ValueError(f"malformed request: {e}") from None
    if not cb.headers_done:
        raise ValueError("incomplete request head")
    head.method = parser.get_method().decode("latin-1")
    head.target = cb.url.decode("latin-1")
    return head, parser, cb


def render_request(head: Head) -> bytes:
    lines = [f"{head.method} {head.target} HTTP/1.1"]
    lines += [f"{n}: {v}" for n, v in head.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def simple_response(status: int, body: str, *, flag: str = "",
                    headers: Iterable[tuple[str, str]] = ()) -> bytes:
    data = body.encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             "content-type: text/plain", f"content-length: {len(data)}",
             "server: istio-envoy", "connection: close", *(f"{n}: {v}" for n, v in headers)]
    if flag:
        lines.append(f"x-shoal-response-flags: {flag}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def forwarded_headers(head: Head, *, authority: str, client_ip: str, scheme: str,
                      ctx: telemetry.TraceContext, request_id: str) -> list[tuple[str, str]]:
    """The request's headers as the gateway sends them on: hop-by-hop ones (and
    those ``Connection`` names) dropped, ``host`` the (rewritten) authority,
    ``connection: close``, x-forwarded-for/-proto, x-request-id, and the trace
    context of the gateway's span (pure)."""
    named = {t.strip().lower() for t in (head.get("connection") or "").split(",") if t.strip()}
    drop = HOP_BY_HOP | named | {"host", "x-forwarded-proto", "x-request-id"}
    out = [(n, v) for n, v in head.headers if n.lower() not in drop]
    trace: dict[str, str] = {n.lower(): v for n, v in out}
    ctx.inject(trace)
    trace_names = {"traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                   "x-b3-sampled", "x-b3-flags", "b3"}
    out = [(n, v) for n, v in out if n.lower() not in trace_names]
    out += [(n, trace[n]) for n in sorted(trace) if n in trace_names]
    xff = head.get("x-forwarded-for")
    out = [(n, v) for n, v in out if n.lower() != "x-forwarded-for"]
    out.insert(0, ("host", authority))
    out += [("x-forwarded-for", f"{xff}, {client_ip}" if xff else client_ip),
            ("x-forwarded-proto", scheme), ("x-request-id", request_id),
            ("connection", "close")]
    return out


# --------------------------------------------------------------------------- the data path


class _StreamReader:
    """A tunnel stream's incoming bytes as an ``asyncio.StreamReader`` (the
    stream calls us as its relay)."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader(limit=MAX_HEAD)
        self.error = ""

    def data(self, side: int, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof(self, side: int) -> None:
        if not self.reader.at_eof():
            self.reader.feed_eof()

    def lost(self, side: int, why: str) -> None:
        self.error = why
        self.eof(side)

    def full(self, side: int) -> None:
        pass  # our writes wait on stream.flushed()

    def drained(self, side: int) -> None:
        pass


class _SocketReader(asyncio.Protocol):
    """A plain TCP upstream (a pod outside the mesh) as reader + writer."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader(limit=MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self.error = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.error = str(exc)
        if not self.reader.at_eof():
            self.reader.feed_eof()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    write: Any  # Callable[[bytes], None]
    close: Any  # Callable[[], None]
    mtls: bool
    peer: str  # the destination's principal ("" plaintext)


@dataclass
class _Call:
    """One request in flight at the gateway."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    port: int
    head: Head
    headers: dict[str, str]  # lower-case names
    parser: Any  # httptools.HttpRequestParser, fed the body
    parsing: _Parsing
    rec: telemetry.RequestRecord
    span: telemetry.TraceContext
    request_id: str
    client_ip: str
    tls: bool


@dataclass(frozen=True)
class Workload:
    """The gateway's own pod."""

    namespace: str
    name: str
    service_account: str
    ip: str
    labels: Mapping[str, str]

    @property
    def workload(self) -> str:
        return self.labels.get("app") or self.labels.get("istio") or self.name


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tunnel = tunnel.Metrics(registry)
        self.rejected = Counter("shoal_gateway_rejected_connections",
                                "client connections closed before a request: TLS "
                                "handshake failed, no credential, malformed request",
                                ("port", "reason"), registry=registry)


class Gateway:
    """Listeners per the plan, and the request path; see the module docstring."""

    def __init__(self, *, me: Workload, trust_domain: str, listen_host: str,
                 pool: tunnel.Pool | None, registry: CollectorRegistry,
                 tracer: telemetry.Tracer | None = None, connect_timeout: float = 5.0,
                 request_timeout: float = 60.0, rng: random.Random | None = None) -> None:
        self.me = me
        self.trust_domain = trust_domain
        self.listen_host = listen_host
        self.pool = pool
        self.tracer = tracer
        self.telemetry = telemetry.RequestTelemetry(registry)  # spans: self.tracer
        self.metrics = Metrics(registry)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.rng = rng or random.Random()
        self.plan = Plan()
        self.routes = RouteTable()
        self.clusters = upstream.Clusters()
        self.pods: dict[str, core_pb2.Pod] = {}  # namespace/name
        self.credentials = Credentials(me.namespace)
        self._servers: dict[int, tuple[str, asyncio.Server]] = {}  # port -> (protocol, srv)

    # -- configuration --

    def update(self, *, gateways: Iterable[tpb.Gateway],
               virtual_services: Iterable[tpb.VirtualService],
               destination_rules: Iterable[tpb.DestinationRule],
               services: Iterable[core_pb2.Service], endpoints: Iterable[core_pb2.Endpoints],
               pods: Iterable[core_pb2.Pod], secrets: Mapping[str, core_pb2.Secret]) -> None:
        """Take the current objects (synchronously: listeners change in ``apply``)."""
        new = plan(gateways, labels=self.me.labels)
        for why in set(new.rejected) - set(self.plan.rejected):
            log.warning("gateway: %s", why)
        self.plan = new
        svcs = list(services)
        self.pods = {key_of(p): p for p in pods}
        self.routes.update(list(virtual_services), svcs)
        self.clusters.update(services=svcs, endpoints=list(endpoints),
                             pods=self.pods, destination_rules=list(destination_rules))
        self.credentials.update(secrets, (c for lst in new.listeners.values()
                                          for c in lst.credentials))

    async def apply(self) -> None:
        """Bind the plan's listeners that are not bound, close the others."""
        want = {p: lst.protocol for p, lst in self.plan.listeners.items()}
        for port, (protocol, srv) in list(self._servers.items()):
            if want.get(port) != protocol:
                srv.close()
                del self._servers[port]
                log.info("gateway: listener %d closed", port)
        for port, protocol in want.items():
            if port in self._servers:
                continue
            try:
                srv = await asyncio.start_server(
                    functools.partial(self._serve, port=port), self.listen_host, port,
                    ssl=self._tls_for(port) if protocol == HTTPS else None,
                    limit=MAX_HEAD, reuse_address=True)
            except OSError as e:
                log.error("gateway: cannot listen on %s:%d: %s", self.listen_host, port, e)
                continue
            self._servers[port] = (protocol, srv)
            log.info("gateway: listening on %s:%d (%s)", self.listen_host, port, protocol)

    def listening(self) -> dict[int, str]:
        return {port: protocol for port, (protocol, _) in self._servers.items()}

    def _tls_for(self, port: int) -> ssl.SSLContext:
        """The listener's context: its SNI callback hands each handshake the
        context of the server the name picks (the first server's without SNI)."""
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.minimum_version = ssl.TLSVersion.TLSv1_2

        def pick(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            lst = self.plan.listeners.get(port)
            if lst is None or not lst.servers:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            found = lst.server_for(name) if name else None
            server = found[0] if found is not None else lst.servers[0]
            ctx = self.credentials.get(server.credential)
            if ctx is None:
                self.metrics.rejected.labels(str(port), "no_credential").inc()
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            sock.context = ctx
            return None

        base.sni_callback = pick
        return base

    async def close(self) -> None:
        for _, srv in self._servers.values():
            srv.close()
        for _, srv in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2)
        self._servers.clear()

    # -- one client connection: one request --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                     port: int) -> None:
        try:
            await self._request(reader, writer, port)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception:
            log.exception("gateway: request on port %d failed", port)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       port: int) -> None:
        started, wall = time.monotonic(), time.time()
        peer = writer.get_extra_info("peername") or ("", 0)
        client_ip = str(peer[0])
        tls = writer.get_extra_info("ssl_object") is not None
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            writer.write(simple_response(431, "request head too large\n"))
            self.metrics.rejected.labels(str(port), "head_too_large").inc()
            return
        except asyncio.IncompleteReadError:
            self.metrics.rejected.labels(str(port), "no_request").inc()
            return
        try:
            head, parser, parsing = parse_request_head(raw)
        except ValueError as e:
            writer.write(simple_response(400, f"{e}\n"))
            self.metrics.rejected.labels(str(port), "malformed").inc()
            return
        headers = head.lower()
        authority = headers.get("host", "")
        host = bare_host(authority)
        incoming = telemetry.TraceContext.from_headers(headers)
        span = telemetry.hop_context(incoming, self.tracer)
        request_id = headers.get("x-request-id") or str(uuid.uuid4())
        rec = telemetry.RequestRecord(
            reporter="source", source_workload=self.me.workload,
            source_workload_namespace=self.me.namespace,
            source_principal=self._principal(), method=head.method, path=head.target,
            authority=authority, start_time=wall, trace_id=span.trace_id,
            span_id=span.span_id, request_id=request_id,
            user_agent=headers.get("user-agent", ""), downstream_remote_address=client_ip,
            source_app=self.me.labels.get("app", telemetry.UNKNOWN))
        call = _Call(reader=reader, writer=writer, port=port, head=head, headers=headers,
                     parser=parser, parsing=parsing, rec=rec, span=span,
                     request_id=request_id, client_ip=client_ip, tls=tls)
        try:
            status, flag = await asyncio.wait_for(self._route_and_forward(call),
                                                  self.request_timeout)
        except TimeoutError:
            status, flag = 504, "UT"
            writer.write(simple_response(504, "upstream request timeout\n", flag=flag))
        rec.response_code, rec.response_flags = status, flag
        rec.duration_s = time.monotonic() - started
        self.telemetry.record(rec)
        if self.tracer is not None:
            tags = {"http.method": head.method, "http.url": f"{'https' if tls else 'http'}://"
                    f"{authority}{head.target}", "http.status_code": str(status),
                    "response_flags": flag or "-", "istio.canonical_service": self.me.workload,
                    "istio.namespace": self.me.namespace, "guid:x-request-id": request_id,
                    "upstream_cluster": rec.upstream_cluster or "-",
                    "node_id": f"router~{self.me.ip}~{self.me.name}.{self.me.namespace}"}
            self.tracer.finish(span, name=f"{host}:{port}{head.target.partition('?')[0]}",
                               kind="SERVER", start=wall, duration_s=rec.duration_s,
                               tags=tags, service=f"{self.me.workload}.{self.me.namespace}")

    def _principal(self) -> str:
        return f"{self.trust_domain}/ns/{self.me.namespace}/sa/{self.me.service_account}"

    def decide(self, *, port: int, head: Head, headers: Mapping[str, str], tls: bool,
               r: float) -> tuple[routes.Action | None, routes.Destination | None, str]:
        """Which route and destination a request takes: (action, destination,
        why-not); no action means 404 NR (pure but for the tables)."""
        lst = self.plan.listeners.get(port)
        host = bare_host(headers.get("host", ""))
        found = lst.server_for(host) if lst is not None else None
        if found is None:
            return None, None, f"no server of port {port} serves host {host!r}"
        server, server_host = found
        vs = self.routes.virtual_service(host, gateway=server.gateway)
        if vs is None or not server_host.admits(vs.namespace):
            return None, None, f"no VirtualService bound to {server.gateway} for {host!r}"
        req = routes.Request(method=head.method, path=head.target,
                             authority=headers.get("host", ""), headers=headers, port=port,
                             source_labels=self.me.labels, source_namespace=self.me.namespace,
                             scheme="https" if tls else "http")
        action = self.routes.route(req, host, port, gateway=server.gateway)
        if action.redirect is not None:
            return action, None, ""
        dest = action.choose(r)
        if dest is None:
            return action, None, f"{action.origin}"
        return action, dest, ""

    async def _route_and_forward(self, call: _Call) -> tuple[int, str]:
        writer, port, head, headers = call.writer, call.port, call.head, call.headers
        tls, rec = call.tls, call.rec
        lst = self.plan.listeners.get(port)
        host = bare_host(headers.get("host", ""))
        found = lst.server_for(host) if lst is not None else None
        if found is not None and found[0].https_redirect and not tls:
            loc = f"https://{host}{head.target}"
            writer.write(simple_response(301, "", headers=[("location", loc)]))
            return 301, ""
        action, dest, why = self.decide(port=port, head=head, headers=headers, tls=tls,
                                        r=self.rng.random())
        if action is not None:
            rec.route = action.origin
        if action is not None and action.redirect is not None:
            loc = action.redirect.location(scheme="https" if tls else "http",
                                           authority=headers.get("host", ""),
                                           path=head.target)
            code = action.redirect.code
            writer.write(simple_response(code, "", headers=[("location", loc)]))
            return code, ""
        if dest is None:
            log.info("gateway: %s %s%s: 404 NR (%s)", head.method, host, head.target, why)
            writer.write(simple_response(404, "", flag="NR"))
            return 404, "NR"
        assert action is not None
        fault = action.fault
        if fault is not None and fault.delay and self.rng.random() * 100 < fault.delay_percent:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.abort_status and \
                self.rng.random() * 100 < fault.abort_percent:
            writer.write(simple_response(fault.abort_status, "fault filter abort", flag="FI"))
            return fault.abort_status, "FI"
        rec.destination_service = dest.host
        parts = dest.host.split(".")
        if len(parts) >= 3 and parts[2] == "svc":
            rec.destination_service_name, rec.destination_service_namespace = parts[0], parts[1]
        cluster = self.clusters.get(dest.host, dest.port, dest.subset)
        rec.upstream_cluster = upstream.cluster_name(host=dest.host, port=dest.port,
                                                     subset=dest.subset)
        if cluster is None:
            writer.write(simple_response(503, "no healthy upstream", flag="UH"))
            return 503, "UH"
        try:
            ticket = await cluster.acquire()
        except upstream.Overflow:
            writer.write(simple_response(503, "upstream connect error or disconnect/reset "
                                              "before headers. reset reason: overflow",
                                         flag="UO"))
            return 503, "UO"
        with ticket:
            return await self._forward(call, action, dest, cluster)

    async def _forward(self, call: _Call, action: routes.Action, dest: routes.Destination,
                       cluster: upstream.Cluster) -> tuple[int, str]:
        writer, head, headers, rec = call.writer, call.head, call.headers, call.rec
        tried: list[upstream.Endpoint] = []
        up: Upstream | None = None
        ep: upstream.Endpoint | None = None
        for _ in range(1 + max(0, action.retries.attempts)):
            ep = cluster.pick(headers=headers, source_ip=call.client_ip, exclude=tried,
                              path=head.target)
            if ep is None:
                writer.write(simple_response(503, "no healthy upstream", flag="UH"))
                return 503, "UH"
            tried.append(ep)
            try:
                up = await self._connect(ep)
                break
            except (tunnel.TunnelError, OSError, TimeoutError, errors.ShoalError) as e:
                log.info("gateway: connect to %s (%s) failed: %s", ep.address, ep.pod, e)
                cluster.report(ep, status=None)
                if not action.retries.retriable(None):
                    break
        if up is None or ep is None:
            writer.write(simple_response(503, "upstream connect error or disconnect/reset "
                                              "before headers. reset reason: connection "
                                              "failure", flag="UF"))
            return 503, "UF"
        rec.upstream = ep.address
        rec.connection_security_policy = "mutual_tls" if up.mtls else "none"
        rec.destination_principal = up.peer
        pod = self.pods.get(ep.pod)
        if pod is not None:
            rec.destination_workload = pod.metadata.labels.get("app") or pod.metadata.name
            rec.destination_workload_namespace = pod.metadata.namespace
            rec.destination_app = pod.metadata.labels.get("app", telemetry.UNKNOWN)
            rec.destination_version = pod.metadata.labels.get("version", telemetry.UNKNOWN)
        cluster.started(ep)
        try:
            status, flag = await self._exchange(call, action, dest, up)
            cluster.report(ep, status=None if flag else status)  # UC, UT: gateway errors
            return status, flag
        finally:
            cluster.finished(ep)
            up.close()

    async def _connect(self, ep: upstream.Endpoint) -> Upstream:
        pod = self.pods.get(ep.pod)
        meshed = pod is not None and _meshed(pod)
        if meshed and self.pool is not None and pod is not None:
            expected = spiffe.SpiffeId(self.trust_domain, pod.metadata.namespace,
                                       pod.spec.service_account_name or "default")
            stream = await self.pool.open(
                source=(self.me.namespace, self.me.service_account),
                destination=(ep.ip, ep.port), expected=expected, source_ip=self.me.ip)
            sr = _StreamReader()
            stream.start(sr, 1)  # type: ignore[arg-type]
            return Upstream(reader=sr.reader, write=stream.write, close=stream.close,
                            mtls=True, peer=stream.tls.peer.removeprefix(spiffe.SCHEME))
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(_SocketReader, ep.ip, ep.port), self.connect_timeout)
        return Upstream(reader=proto.reader, write=proto.write, close=proto.close,
                        mtls=False, peer="")

    async def _exchange(self, call: _Call, action: routes.Action, dest: routes.Destination,
                        up: Upstream) -> tuple[int, str]:
        """Send the request, relay the response: (status, response flag). The
        route's timeout covers the wait for the response head (504 UT)."""
        writer, head, rec, parsing = call.writer, call.head, call.rec, call.parsing
        authority = head.get("host") or ""
        out = Head(method=head.method, target=head.target, headers=list(head.headers))
        if action.rewrite is not None:
            out.target = action.rewrite.path(head.target)
            if action.rewrite.authority:
                authority = action.rewrite.authority
        out.headers = forwarded_headers(out, authority=authority, client_ip=call.client_ip,
                                        scheme="https" if call.tls else "http", ctx=call.span,
                                        request_id=call.request_id)
        ops = action.request_headers.merged(dest.request_headers)
        if ops:
            out.headers = ops.apply(out.headers)
        up.write(render_request(out))
        # The body, as it came (its framing headers were kept): until the parser
        # says the message is complete.
        while not parsing.head.complete:
            chunk = await call.reader.read(65536)
            if not chunk:
                break
            try:
                call.parser.feed_data(chunk)
            except httptools.HttpParserError:
                break
            up.write(chunk)
        rec.request_bytes = parsing.body_bytes
        # The response: its head (response header ops, hop-by-hop handled), then
        # its body as it comes, until complete or the upstream closes.
        try:
            async with asyncio.timeout(action.timeout):
                raw = await up.reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            writer.write(simple_response(504, "upstream request timeout", flag="UT"))
            return 504, "UT"
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.write(simple_response(503, "upstream connect error or disconnect/reset "
                                              "before headers. reset reason: connection "
                                              "termination", flag="UC"))
            return 503, "UC"
        resp = Head()
        rcb = _Parsing(resp)
        rparser = httptools.HttpResponseParser(rcb)
        if head.method == "HEAD":
            rcb.head.complete = True
        try:
            rparser.feed_data(raw)
            resp.status = int(rparser.get_status_code())
        except httptools.HttpParserError:
            writer.write(simple_response(503, "malformed upstream response\n", flag="UC"))
            return 503, "UC"
        resp_ops = action.response_headers.merged(dest.response_headers)
        resp_headers = [(n, v) for n, v in resp.headers if n.lower() not in HOP_BY_HOP]
        if resp_ops:
            resp_headers = resp_ops.apply(resp_headers)
        resp_headers.append(("connection", "close"))
        reason = raw.split(b"\r\n", 1)[0].split(b" ", 2)[2:] or [b""]
        status_line = f"HTTP/1.1 {resp.status} {reason[0].decode('latin-1')}".rstrip()
        writer.write((status_line + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in resp_headers)
                      + "\r\n").encode("latin-1"))
        while not resp.complete and resp.status not in (204, 304):
            chunk = await up.reader.read(65536)
            if not chunk:
                break
            try:
                rparser.feed_data(chunk)
            except httptools.HttpParserError:
                break
            writer.write(chunk)
            await writer.drain()
        rec.response_bytes = rcb.body_bytes
        await writer.drain()
        return resp.status, ""


def _meshed(pod: core_pb2.Pod) -> bool:
    labels = pod.metadata.labels
    return labels.get("shoal.dev/mesh") != "disabled" and \
        labels.get("istio.io/dataplane-mode") != "none"


# --------------------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class GatewayConfig:
    node_name: str
    pod: str  # namespace/name of the gateway's pod
    client_config: Path
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN
    listen_host: str = "0.0.0.0"
    metrics_listen: str = "0.0.0.0:15021"
    zipkin_endpoint: str = ""
    trace_sampling: float = 100.0  # percent of new traces sampled (the CLI's default: 1)
    tunnel_port: int = tunnel.TUNNEL_PORT


class GatewayAgent:
    """Informers -> :class:`Gateway` (plan, routes, clusters, credentials) ->
    listeners. Readiness: ``informers``, ``identity`` (the gateway's certificate)."""

    def __init__(self, config: GatewayConfig, client: AsyncClient, me: Workload) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.readiness = Readiness("informers", "identity")
        host, _, port = config.metrics_listen.rpartition(":")
        self.monitoring = MonitoringServer(host=host or "0.0.0.0", port=int(port),
                                           registry=self.registry, readiness=self.readiness)
        self.identities = identity.IdentityManager(
            signer=identity.GrpcSigner(client.channel), trust_domain=config.trust_domain)
        self.tracer = (telemetry.Tracer(config.zipkin_endpoint,
                                        local_service=f"{me.workload}.{me.namespace}",
                                        registry=self.registry,
                                        sampling=config.trace_sampling)
                       if config.zipkin_endpoint else None)
        self.gateway = Gateway(me=me, trust_domain=config.trust_domain,
                               listen_host=config.listen_host, pool=None,
                               registry=self.registry, tracer=self.tracer)
        self.pool = tunnel.Pool(identities=tunnel.Identities(self.identities),
                                metrics=self.gateway.metrics.tunnel, port=config.tunnel_port)
        self.gateway.pool = self.pool
        self.informers: list[Informer[Any]] = [
            Informer(client, tpb.Gateway), Informer(client, tpb.VirtualService),
            Informer(client, tpb.DestinationRule), Informer(client, core_pb2.Service),
            Informer(client, core_pb2.Endpoints), Informer(client, core_pb2.Pod),
            Informer(client, core_pb2.Secret, namespace=me.namespace)]
        self._changed = asyncio.Event()
        for inf in self.informers:
            inf.add_handlers(on_add=self._on_change, on_update=self._on_change2,
                             on_delete=self._on_change)

    def _on_change(self, _obj: object) -> None:
        self._changed.set()

    def _on_change2(self, _old: object, _new: object) -> None:
        self._changed.set()

    def _objects(self, kind: type[Any]) -> list[Any]:
        return next(i for i in self.informers if i.kind is kind).list()

    async def _reconcile(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            self.gateway.update(
                gateways=self._objects(tpb.Gateway),
                virtual_services=self._objects(tpb.VirtualService),
                destination_rules=self._objects(tpb.DestinationRule),
                services=self._objects(core_pb2.Service),
                endpoints=self._objects(core_pb2.Endpoints),
                pods=self._objects(core_pb2.Pod),
                secrets={key_of(s): s for s in self._objects(core_pb2.Secret)})
            await self.gateway.apply()
            await asyncio.sleep(0.05)  # coalesce bursts of events

    async def _identity(self) -> None:
        me = self.gateway.me
        while True:
            try:
                await self.identities.get(me.namespace, me.service_account)
                self.readiness.set("identity")
                log.info("gateway identity %s ready", self._spiffe())
                return
            except errors.ShoalError as e:
                log.info("gateway identity %s: %s; retrying", self._spiffe(), e)
                await asyncio.sleep(1.0)

    def _spiffe(self) -> str:
        me = self.gateway.me
        return str(spiffe.SpiffeId(self.config.trust_domain, me.namespace, me.service_account))

    async def run(self) -> None:
        await self.monitoring.start()
        try:
            async with asyncio.TaskGroup() as tg:
                for inf in self.informers:
                    tg.create_task(inf.run(), name=f"informer-{inf.kind.__name__}")
                for inf in self.informers:
                    await inf.synced.wait()
                self.readiness.set("informers")
                self._changed.set()
                tg.create_task(self._reconcile(), name="gateway-config")
                tg.create_task(self.identities.run(), name="identities")
                tg.create_task(self._identity(), name="gateway-identity")
                if self.tracer is not None:
                    tg.create_task(self.tracer.run(), name="zipkin")
        finally:
            await self.gateway.close()
            await self.pool.close()
            if self.tracer is not None:
                await self.tracer.close()
            await self.monitoring.close()


async def _own_pod(client: AsyncClient, key: str, *, timeout: float = 120.0) -> Workload:
    ns, _, name = key.partition("/")
    deadline = time.monotonic() + timeout
    while True:
        try:
            pod = await client.get(core_pb2.Pod, name, namespace=ns)
            if pod.status.pod_ip:
                return Workload(namespace=ns, name=name,
                                service_account=pod.spec.service_account_name or "default",
                                ip=pod.status.pod_ip, labels=dict(pod.metadata.labels))
        except errors.NotFound:
            pass
        if time.monotonic() > deadline:
            raise errors.Unavailable(f"gateway pod {key} has no IP after {timeout:g}s")
        await asyncio.sleep(1.0)


async def run(config: GatewayConfig) -> None:
    client_cfg = configmod.load(config.client_config)
    async with AsyncClient(client_cfg) as client:
        me = await _own_pod(client, config.pod)
        log.info("gateway %s (%s, labels %s) on node %s", config.pod, me.ip,
                 ",".join(f"{k}={v}" for k, v in sorted(me.labels.items())), config.node_name)
        await GatewayAgent(config, client, me).run()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshagent.gateway", description="Shoal's ingress "
                                "gateway: serves Istio Gateways selecting its pod.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the gateway")
    r.add_argument("--node-name", default=socket.gethostname().lower())
    r.add_argument("--pod", required=True, help="NAMESPACE/NAME of the gateway's own pod "
                   "(its labels, service account and IP)")
    r.add_argument("--config", type=Path, default=Path("/var/lib/shoal/nodeagent/node.conf"),
                   help="client config: the node's")
    r.add_argument("--trust-domain", default=spiffe.DEFAULT_TRUST_DOMAIN)
    r.add_argument("--listen-host", default="0.0.0.0")
    r.add_argument("--metrics-listen", default="0.0.0.0:15021")
    r.add_argument("--zipkin-endpoint", default="",
                   help="http://HOST:PORT of a Zipkin v2 collector (empty: no spans)")
    r.add_argument("--trace-sampling", type=telemetry.sampling_percent, default=1.0,
                   metavar="PERCENT", help="the share of new traces sampled, in percent "
                   "(default 1, as Istio)")
    r.add_argument("--event-loop", choices=eventloop.LOOPS, default=eventloop.DEFAULT)
    r.add_argument("--log-level", default="info")
    r.add_argument("--log-format", choices=["json", "text"], default="json")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logs.setup(level=ns.log_level, fmt=ns.log_format)
    if "/" not in ns.pod:
        print(f"meshagent.gateway: --pod {ns.pod!r}: want NAMESPACE/NAME", file=sys.stderr)
        return 2
    if ns.zipkin_endpoint:
        try:
            telemetry.parse_endpoint(ns.zipkin_endpoint)
        except errors.ShoalError as e:
            print(f"meshagent.gateway: {e}", file=sys.stderr)
            return 2
    config = GatewayConfig(node_name=ns.node_name, pod=ns.pod, client_config=ns.config,
                           trust_domain=ns.trust_domain, listen_host=ns.listen_host,
                           metrics_listen=ns.metrics_listen,
                           zipkin_endpoint=ns.zipkin_endpoint,
                           trace_sampling=ns.trace_sampling)
    try:
        eventloop.run(until_stopped(run(config)), ns.event_loop)
    except (errors.ShoalError, OSError) as e:
        print(f"meshagent.gateway: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
