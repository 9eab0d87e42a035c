"""The L7 request engine: HTTP/1.1 requests through the mesh, Istio sidecar semantics.

Client side (the outbound agent, a pod's connection to an HTTP service port), per
request on the connection (keep-alive; one at a time, as HTTP/1.1 has them)::

    parse (http1) -> route (routes.RouteTable: VirtualService -> Action)
      redirect?                          301 Location, done
      no destination                     404 NR
      cluster (upstream.Clusters)        none: 503 NC
      fault delay (percentage)           sleep, flag DI
      acquire (connectionPool)           Overflow: 503 UO
      mirror (mirrorPercentage)          a copy to the mirror cluster, authority
                                         "<host>-shadow", response dropped
      tries: 1 + retries.attempts, within the route timeout (504 UT):
        fault abort (percentage)         that status, flag FI (a try of its own:
                                         retryOn decides whether it is retried)
        pick (excluding endpoints tried) none healthy: 503 UH
        upstream connection              pooled per endpoint and source identity:
                                         a tunnel stream (meshed pod elsewhere), or
                                         TCP (a local pod: this agent serves the
                                         server side too; or a pod outside the mesh)
          connect failure                flag UF   } report(None) to the cluster;
          reset before a response        flag UC   } retried on connect-failure,
          per-try timeout                flag UT   } reset, 5xx, gateway-error
        the response head                report(status); retried when retryOn says so
      the response streams back          header ops; exhausted retries: flag URX
    record the request (reporter=source)

The ingress gateway serves its clients with this client side too, as the
``front`` of ``outbound``: it routes each request itself (its Gateway servers and
the VirtualServices bound to them, ``Routed``) in place of the route table, and
completes the request's record with its own span; the rest is as above.

Server side (the inbound agent, a tunnel stream or a plaintext connection to an
HTTP port of a local pod; also the local half of a local->local request)::

    parse -> authorize(request) -> 403 "RBAC: access denied" (flag DENY)
          -> trace: a child of the incoming context (or a new root), injected
             into the request the pod gets; this agent's SERVER span
          -> the pod (one connection per inbound connection) -> response back
          -> record (reporter=destination; destination_service from the Host and
             the pod's Services: ``service_of``, see destservice) and the span

Request bodies up to ``RETRY_BUFFER`` bytes are kept so that a retry or a mirror
can send them again; a longer body streams through and is not retried (as
Envoy's buffer limit does). Response bodies always stream. The route timeout
and per-try timeout run until the response head arrives.

Fault aborts are decided per try, so a retry policy can recover from an
injected abort (Envoy aborts in its fault filter, before the router, so there
it is never retried; the per-try reading is what makes a "50% abort + retries"
policy testable at one hop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meshagent import relay
from meshagent.l7 import destservice, http1, routes, telemetry, upstream
from meshagent.l7.http1 import END, Channel, ChannelClosed, Head, HttpError, Reader

log = logging.getLogger(__name__)

RETRY_BUFFER = 1 << 20
IDLE_TIMEOUT = 60.0  # pooled upstream connections idle longer are closed
MAX_IDLE_PER_KEY = 64
DENIED_BODY = b"RBAC: access denied"
LOCAL, MTLS, PLAINTEXT = "local", "mTLS", "plaintext"


@dataclass(frozen=True)
class Peer:
    """The workload a request comes from (as far as known)."""

    ip: str
    workload: str = ""
    namespace: str = ""
    principal: str = ""  # Istio form td/ns/NS/sa/SA; "" = none
    service_account: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    meshed: bool = False
    cert_sha256: str = ""  # the certificate it proved over mTLS (hex), if any


XFCC = "x-forwarded-client-cert"


def client_cert_element(*, by: str = "", cert_hash: str = "", subject: str = "",
                        uris: Iterable[str] = (), dns: Iterable[str] = ()) -> str:
    """One element of x-forwarded-client-cert, Envoy's fields in Envoy's order
    (By and Hash only when known; Subject always, quoted)."""
    parts = [f"By={by}"] if by else []
    parts += [f"Hash={cert_hash}"] if cert_hash else []
    parts.append('Subject="{}"'.format(subject.replace('"', '\\"')))
    parts += [f"URI={u}" for u in uris] + [f"DNS={d}" for d in dns]
    return ";".join(parts)


def with_client_cert(headers: list[tuple[str, str]], source: Peer, dst: Pod
                     ) -> list[tuple[str, str]]:
    """``headers`` with the mTLS client's identity in x-forwarded-client-cert, as
    Istio's sidecars add it for the app (APPEND_FORWARD: after any the request
    already had): By our pod's SPIFFE ID, the client certificate's Hash, its
    URI (the source's SPIFFE ID). Unchanged without a source principal."""
    if not source.principal:
        return headers
    mine = client_cert_element(by=f"spiffe://{dst.principal}", cert_hash=source.cert_sha256,
                               uris=[f"spiffe://{source.principal}"])
    out, seen = [], False
    for k, v in headers:
        if not seen and k.lower() == XFCC:
            v, seen = f"{v},{mine}", True
        out.append((k, v))
    if not seen:
        out.append((XFCC, mine))
    return out


@dataclass(frozen=True)
class Pod:
    """A destination pod as the engine needs it."""

    ip: str
    name: str
    namespace: str
    workload: str
    principal: str
    node_local: bool
    meshed: bool
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Service:
    """The HTTP service port a client connection was made to."""

    host: str  # FQDN
    port: int
    name: str = ""
    namespace: str = ""


@dataclass(frozen=True)
class HttpRequest:
    """A request for the L7 authorization decision."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str]


class Authorize(Protocol):
    """``(allowed, reason)`` for a request from ``source`` to ``dst``:``port``."""

    def __call__(self, *, source: Peer, dst: Pod, port: int, mtls: bool,
                 request: HttpRequest) -> tuple[bool, str]: ...


def allow_all(*, source: Peer, dst: Pod, port: int, mtls: bool,
              request: HttpRequest) -> tuple[bool, str]:
    return True, ""


# Opens a tunnel stream from ``source`` to ``(ip, port)`` whose agent proves ``dst``.
OpenTunnel = Callable[[Peer, Pod, int], Awaitable[relay.End]]
Connect = Callable[[str, int], Awaitable[relay.End]]
PodLookup = Callable[[str], "Pod | None"]


class ServiceOf(Protocol):
    """The Service a request to local pod ``dst``:``port`` with this Host /
    :authority was for (the destination reporter's destination_service; see
    :mod:`meshagent.l7.destservice`)."""

    def __call__(self, *, dst: Pod, port: int, host: str,
                 source_namespace: str) -> destservice.ServiceName: ...


def service_unknown(*, dst: Pod, port: int, host: str,
                    source_namespace: str) -> destservice.ServiceName:
    return destservice.UNKNOWN


class ClusterLike(Protocol):
    name: str

    def pick(self, *, headers: Mapping[str, str], source_ip: str,
             exclude: tuple[upstream.Endpoint, ...] = (),
             path: str = "") -> upstream.Endpoint | None: ...

    async def acquire(self) -> upstream.Ticket: ...

    def started(self, ep: upstream.Endpoint) -> None: ...

    def finished(self, ep: upstream.Endpoint) -> None: ...

    def report(self, ep: upstream.Endpoint, *, status: int | None) -> None: ...


class ClustersLike(Protocol):
    def get(self, host: str, port: int, subset: str = "") -> ClusterLike | None: ...


@dataclass(frozen=True)
class Routed:
    """A request routed in front of the engine (the ingress gateway's: its own
    servers and the VirtualServices bound to them); the engine carries it out
    from there as any client request: faults, pool, mirror, tries, response."""

    request: routes.Request
    action: routes.Action
    service: Service  # the destination service (telemetry's destination_service)
    headers: list[tuple[str, str]]  # the request's headers as they go upstream
    finish: Callable[[telemetry.RequestRecord], None]  # sees the record before it is kept


class Front(Protocol):
    """Routes a client request in the engine's place (``Engine.outbound(front=)``):
    ``req`` as the engine parsed it, ``headers`` the ones it would send."""

    def __call__(self, req: routes.Request, headers: list[tuple[str, str]]) -> Routed: ...


# --------------------------------------------------------------------------- upstreams


class Upstream:
    """One HTTP/1.1 connection to an endpoint (over TCP or a tunnel stream)."""

    def __init__(self, key: tuple[str, ...], end: relay.End) -> None:
        self.key = key
        self.channel = Channel(end)
        self.reader = Reader(self.channel, request=False)
        self.idle_since = time.monotonic()
        self.uses = 0

    @property
    def usable(self) -> bool:
        return not (self.channel.closed or self.channel.error or self.channel.at_eof)

    def close(self) -> None:
        self.channel.close()


class UpstreamPool:
    """Idle keep-alive connections, by (mode, source identity, endpoint)."""

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, ...], list[Upstream]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0
        self.reused = 0

    def take(self, key: tuple[str, ...]) -> Upstream | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            up = conns.pop()
            if up.usable and now - up.idle_since < self.idle_timeout:
                self.reused += 1
                return up
            up.close()
        self._idle.pop(key, None)
        return None

    def give_back(self, up: Upstream) -> None:
        conns = self._idle.setdefault(up.key, [])
        if not up.usable or len(conns) >= MAX_IDLE_PER_KEY:
            up.close()
            return
        up.idle_since = time.monotonic()
        conns.append(up)
        self._schedule()

    def sweep(self) -> int:
        """Close idle connections past ``idle_timeout`` or closed by their peer,
        under every key: an endpoint that went away (its pod deleted) is never
        taken from again, so ``take`` alone would keep them open for good.
        Returns how many were closed."""
        self._sweeper = None
        now, closed = time.monotonic(), 0
        for key, conns in list(self._idle.items()):
            keep = [up for up in conns if up.usable and now - up.idle_since < self.idle_timeout]
            for up in conns:
                if up not in keep:
                    up.close()
                    closed += 1
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self._schedule()
        return closed

    def _schedule(self) -> None:
        """A sweep every quarter of ``idle_timeout`` while anything is idle."""
        if self._sweeper is not None or not self._idle:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweeper = loop.call_later(self.idle_timeout / 4, self.sweep)

    def idle(self) -> int:
        return sum(len(c) for c in self._idle.values())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for up in conns:
                up.close()
        self._idle.clear()


# --------------------------------------------------------------------------- pieces


class TryFailed(Exception):
    """A try that got no response: ``flag`` UF (connect), UC (reset), UT (timeout);
    ``refused``: a reset with HTTP/2's REFUSED_STREAM (the request was not processed)."""

    def __init__(self, flag: str, why: str, *, status: int = 503,
                 refused: bool = False) -> None:
        super().__init__(why)
        self.flag = flag
        self.status = status
        self.refused = refused


@dataclass
class Body:
    """A request body: kept (replayable) while it fits RETRY_BUFFER, else streamed."""

    reader: Reader | None
    kept: list[bytes] = field(default_factory=list)
    complete: bool = True
    size: int = 0

    @classmethod
    async def read(cls, reader: Reader, head: Head) -> Body:
        body = cls(reader, complete=False)
        while body.size <= RETRY_BUFFER:
            ev = await reader.next()
            if ev is END:
                body.complete = True
                body.reader = None
                break
            if not isinstance(ev, bytes):
                raise ChannelClosed("the request body ended early")
            body.kept.append(ev)
            body.size += len(ev)
        return body

    async def send(self, ch: Channel, *, chunked: bool) -> None:
        """Write the body to ``ch`` (the rest of a streamed one too: once). What
        is kept goes out with whatever the caller wrote before (the head) in one
        write, at the caller's next ``drain``."""
        for piece in self.kept:
            ch.write(http1.chunk(piece) if chunked else piece, more=True)
        if self.reader is not None:
            await ch.drain()
            while True:
                ev = await self.reader.next()
                if ev is END:
                    break
                if not isinstance(ev, bytes):
                    raise ChannelClosed("the request body ended early")
                self.size += len(ev)
                ch.write(http1.chunk(ev) if chunked else ev)
                await ch.drain()
            self.reader = None
            self.complete = True
        if chunked:
            ch.write(http1.LAST_CHUNK, more=True)

    @property
    def replayable(self) -> bool:
        return self.complete and self.reader is None


@dataclass
class Outcome:
    """How a request ended, for telemetry."""

    status: int = 0
    flags: list[str] = field(default_factory=list)
    response_bytes: int = 0
    upstream: str = ""
    cluster: str = ""
    details: str = ""
    close: bool = False  # the client connection cannot carry another request
    pod: Pod | None = None  # the pod behind ``upstream`` as the last try looked it up


def try_timeout(per_try: float | None, deadline: float | None) -> float | None:
    """How long a try may take: the per-try timeout, cut to what is left of the route's
    (zero or less: nothing is)."""
    if deadline is None:
        return per_try
    left = deadline - time.monotonic()
    return min(per_try, left) if per_try else left


def _framing(head: Head, client_version: str) -> tuple[list[tuple[str, str]], bool, bool]:
    """Response headers to send, whether to chunk the body, and whether the
    connection must close after it (an HTTP/1.0 client and no length)."""
    headers = http1.forward_headers(head)
    if head.status in (204, 304) or 100 <= head.status < 200:
        return headers, False, False
    if head.length is not None:
        return headers, False, False
    if client_version == "1.0":
        return headers, False, True
    return [*headers, ("transfer-encoding", "chunked")], True, False


def _simple(status: int, body: bytes, *, close: bool,
            extra: list[tuple[str, str]] | None = None) -> bytes:
    headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
    headers += extra or []
    if close:
        headers.append(("connection", "close"))
    return http1.status_line(status, http1.reason(status), headers) + body


def _with_header(headers: list[tuple[str, str]], name: str,
                 value: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != name] + [(name, value)]


# --------------------------------------------------------------------------- the engine


# ``async with`` for a try without a deadline: no Timeout object per request.
_NO_DEADLINE = contextlib.nullcontext()


class IdleTimer:
    """Ends a connection left idle between requests for ``timeout`` s: one timer per
    connection, re-armed only when it fires (asyncio.timeout around each wait for a
    request made and cancelled a timer per request). Between ``busy()`` and
    ``idle()`` a request is in: the connection is not idle then, however long."""

    def __init__(self, timeout: float, expire: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.expire = expire
        self.since: float | None = self.loop.time()  # idle since; None while busy
        self.handle = self.loop.call_at(self.since + timeout, self._check)

    def busy(self) -> None:
        self.since = None

    def idle(self) -> None:
        self.since = self.loop.time()

    def _check(self) -> None:
        left = self.timeout if self.since is None else \
            self.since + self.timeout - self.loop.time()
        if left > 0:
            self.handle = self.loop.call_later(left, self._check)
        else:
            self.expire()

    def cancel(self) -> None:
        self.handle.cancel()


class Engine:
    """See the module docstring. One per agent; everything it reads of the cluster
    comes through the callables it is given (the agent's informer views)."""

    def __init__(self, *, node: str, route_table: Callable[[], routes.RouteTable],
                 clusters: Callable[[], ClustersLike], pod: PodLookup,
                 record: Callable[[telemetry.RequestRecord], None],
                 open_tunnel: OpenTunnel | None = None, connect: Connect | None = None,
                 authorize: Authorize = allow_all, tracer: telemetry.Tracer | None = None,
                 rng: random.Random | None = None, connect_timeout: float = 5.0,
                 idle_timeout: float = 3600.0, service_of: ServiceOf = service_unknown,
                 flags_header: str = "") -> None:
        self.node = node
        self.route_table = route_table
        self.clusters = clusters
        self.pod = pod
        self.record = record
        self.open_tunnel = open_tunnel
        self.connect = connect or self._tcp
        self.authorize = authorize
        self.service_of = service_of  # the destination reporter's destination_service
        # When set, local replies (404 NR, 503 UO/UH, 504 UT, ...) name their response
        # flag in this header: the ingress gateway's, for clients outside the mesh.
        self.flags_header = flags_header
        self.tracer = tracer
        self.rng = rng or random.Random()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout  # a client connection idle between requests
        self.pool = UpstreamPool()
        self._tasks: set[asyncio.Task[None]] = set()

    async def _tcp(self, ip: str, port: int) -> relay.End:
        loop = asyncio.get_running_loop()
        _, end = await asyncio.wait_for(loop.create_connection(relay.SocketEnd, ip, port),
                                        self.connect_timeout)
        return end

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pool.close()

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ================================================================ client side

    async def outbound(self, client: relay.End, *, source: Peer, service: Service,
                       front: Front | None = None) -> None:
        """Serve one client connection to an HTTP service port until it closes;
        with ``front``, each request is routed by it (a gateway's listener port
        as ``service``) instead of by the route table."""
        ch = Channel(client)
        reader = Reader(ch, request=True)
        idle = IdleTimer(self.idle_timeout, lambda: ch.lost(0, "idle timeout"))
        try:
            while True:
                try:
                    ev = await reader.next()
                except HttpError as e:
                    ch.write(_simple(e.status, str(e).encode(), close=True))
                    return
                if ev is None:
                    return
                if not isinstance(ev, Head):
                    return
                idle.busy()
                if not await self._client_request(ch, reader, ev, source, service,
                                                  front=front):
                    return
                idle.idle()
        except (ChannelClosed, TimeoutError, HttpError):
            return
        finally:
            idle.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.drain(), 1.0)
            ch.close()

    async def _client_request(self, ch: Channel, reader: Reader, head: Head, source: Peer,
                              service: Service, *, front: Front | None = None) -> bool:
        """One request; False when the client connection must close."""
        started, t0 = time.time(), time.monotonic()
        lower = head.lower()
        headers = http1.forward_headers(head)
        if lower.get("expect", "").lower() == "100-continue":
            ch.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        if "x-request-id" not in lower:
            rid = telemetry.new_request_id()
            headers.append(("x-request-id", rid))
            lower["x-request-id"] = rid
        authority = lower.get("host", "")
        req = routes.Request(method=head.method, path=head.target, authority=authority,
                             headers=lower, port=service.port, source_labels=source.labels,
                             source_namespace=source.namespace)
        routed = front(req, headers) if front is not None else None
        if routed is not None:
            req, action, service, headers = (routed.request, routed.action, routed.service,
                                             routed.headers)
        else:
            action = self.route_table().route(req, service.host, service.port)
        body = await Body.read(reader, head)
        out = Outcome()
        try:
            await self._carry_out(ch, head, headers=headers, body=body, req=req,
                                  action=action, source=source, out=out)
        finally:
            rec = telemetry.RequestRecord(
                reporter="source", source_workload=source.workload,
                source_workload_namespace=source.namespace,
                source_principal=source.principal,
                destination_service=service.host, destination_service_name=service.name,
                destination_service_namespace=service.namespace,
                response_code=out.status, response_flags=",".join(out.flags),
                connection_security_policy="unknown", method=head.method,
                path=head.target, authority=authority,
                duration_s=time.monotonic() - t0, request_bytes=body.size,
                response_bytes=out.response_bytes, upstream=out.upstream,
                route=action.origin, start_time=started, protocol=f"HTTP/{head.version}",
                request_id=lower.get("x-request-id", ""),
                user_agent=lower.get("user-agent", ""),
                downstream_remote_address=source.ip, upstream_cluster=out.cluster,
                response_code_details=out.details)
            ctx = telemetry.TraceContext.from_headers(lower)
            if ctx is not None:
                rec.trace_id = ctx.trace_id
            if out.upstream:
                ip = out.upstream.rsplit(":", 1)[0]
                dst = out.pod if out.pod is not None and out.pod.ip == ip else self.pod(ip)
                if dst is not None:
                    rec.destination_workload = dst.workload
                    rec.destination_workload_namespace = dst.namespace
                    rec.destination_principal = dst.principal
                    rec.connection_security_policy = \
                        "mutual_tls" if dst.meshed and source.meshed else "none"
            if routed is not None:
                routed.finish(rec)
            self.record(rec)
        if not body.replayable:  # what the client sent is not all read: cannot go on
            return False
        return head.keep_alive and not out.close

    async def _carry_out(self, ch: Channel, head: Head, *, headers: list[tuple[str, str]],
                         body: Body, req: routes.Request, action: routes.Action,
                         source: Peer, out: Outcome) -> None:
        def respond(status: int, text: bytes, flag: str = "",
                    extra: list[tuple[str, str]] | None = None) -> None:
            out.status = status
            if flag:
                out.flags.append(flag)
            ops = action.response_headers
            hdrs = ops.apply([("content-type", "text/plain"),
                              ("content-length", str(len(text)))] + (extra or []))
            if flag and self.flags_header:
                hdrs.append((self.flags_header, flag))
            if not head.keep_alive:
                hdrs.append(("connection", "close"))
            ch.write(http1.status_line(status, http1.reason(status), hdrs)
                     + (b"" if head.method == "HEAD" else text))
            out.response_bytes = len(text)

        if action.redirect is not None:
            loc = action.redirect.location(scheme=req.scheme, authority=req.authority,
                                           path=req.path)
            respond(action.redirect.code, b"", extra=[("location", loc)])
            return
        dest = action.choose(self.rng.random())
        if dest is None:
            respond(404, b"no route matched", "NR")
            out.details = "route_not_found"
            return
        cluster = self.clusters().get(dest.host, dest.port, dest.subset)
        if cluster is None:
            respond(503, b"no cluster for " + dest.host.encode(), "NC")
            out.details = "cluster_not_found"
            return
        out.cluster = cluster.name
        fault = action.fault
        if fault is not None and fault.delay and \
                self.rng.random() * 100 < fault.delay_percent:
            out.flags.append("DI")
            await asyncio.sleep(fault.delay)
        # The request as the upstream gets it.
        headers = action.request_headers.merged(dest.request_headers).apply(headers)
        path = head.target
        if action.rewrite is not None:
            path = action.rewrite.path(path)
            if action.rewrite.authority:
                headers = _with_header(headers, "host", action.rewrite.authority)
        headers = _with_header(headers, "x-forwarded-proto", req.scheme)
        try:
            ticket = await cluster.acquire()
        except upstream.Overflow:
            respond(503, b"upstream connect error or disconnect/reset before headers. "
                         b"reset reason: overflow", "UO")
            out.details = "upstream_reset_before_response_started{overflow}"
            return
        try:
            if action.mirror is not None and body.replayable and \
                    self.rng.random() * 100 < action.mirror_percent:
                self._spawn(self._mirror(action.mirror, head, headers=headers, path=path,
                                         body=body, source=source), "mirror")
            deadline = (time.monotonic() + action.timeout) if action.timeout else None
            await self._tries(ch, head, headers=headers, path=path, body=body, req=req,
                              action=action, cluster=cluster, dest=dest, source=source,
                              out=out, respond=respond, deadline=deadline)
        finally:
            ticket.release()

    async def _tries(self, ch: Channel, head: Head, *, headers: list[tuple[str, str]],
                     path: str, body: Body, req: routes.Request, action: routes.Action,
                     cluster: ClusterLike, dest: routes.Destination, source: Peer,
                     out: Outcome, respond: Callable[..., None],
                     deadline: float | None) -> None:
        retries = action.retries
        tries = 1 + (retries.attempts if body.replayable else 0)
        tried: list[upstream.Endpoint] = []
        fault = action.fault
        for n in range(tries):
            last = n == tries - 1
            exhausted = ["URX"] if last and n > 0 else []
            if fault is not None and fault.abort_status and \
                    self.rng.random() * 100 < fault.abort_percent:
                if not last and retries.retriable(fault.abort_status):
                    continue
                out.details = "fault_filter_abort"
                respond(fault.abort_status, b"fault filter abort", "FI")
                out.flags += exhausted
                return
            ep = cluster.pick(headers=req.headers, source_ip=source.ip, exclude=tuple(tried),
                              path=path)
            if ep is None:
                out.details = "no_healthy_upstream"
                respond(503, b"no healthy upstream", "UH")
                return
            tried.append(ep)
            out.upstream = ep.address
            timeout = try_timeout(retries.per_try_timeout, deadline)
            if timeout is not None and timeout <= 0:
                respond(504, b"upstream request timeout", "UT")
                return
            cluster.started(ep)
            try:
                got = await self._try(ep, head, headers=headers, path=path, body=body,
                                      source=source, timeout=timeout, out=out)
            except asyncio.CancelledError:
                cluster.finished(ep)
                raise
            except _Denied as e:
                cluster.finished(ep)
                out.details = f"rbac_access_denied: {e}"
                respond(403, DENIED_BODY)
                return
            except TryFailed as e:
                cluster.report(ep, status=None)
                cluster.finished(ep)
                if not last and retries.retriable_failure(e.flag, refused=e.refused) \
                        and body.replayable:
                    continue
                out.details = str(e)
                overall = deadline is not None and time.monotonic() >= deadline - 0.001
                if e.flag == "UT" or overall:
                    respond(504, b"upstream request timeout", "UT")
                else:
                    respond(e.status, f"upstream connect error or disconnect/reset before "
                                      f"headers. reset reason: {e}".encode(), e.flag)
                out.flags += exhausted
                return
            up, resp, server = got
            cluster.report(ep, status=resp.status)
            if not last and retries.retriable(resp.status) and body.replayable:
                cluster.finished(ep)
                up.close()  # drop the response; a fresh connection next time
                if server is not None:
                    server.done(resp.status, "", 0)
                continue
            try:
                await self._stream_response(ch, head, up=up, resp=resp, action=action,
                                            dest=dest, out=out, server=server)
            finally:
                cluster.finished(ep)
            out.flags += exhausted if resp.status >= 500 else []
            return

    def mode_to(self, dst: Pod | None, source: Peer) -> str:
        """How a request reaches ``dst``: LOCAL (this agent is its server side too),
        MTLS (through the tunnel to its node's agent) or PLAINTEXT."""
        if dst is not None and dst.node_local:
            return LOCAL
        if dst is not None and dst.meshed and source.meshed and self.open_tunnel:
            return MTLS
        return PLAINTEXT

    async def _try(self, ep: upstream.Endpoint, head: Head, *,
                   headers: list[tuple[str, str]], path: str, body: Body, source: Peer,
                   timeout: float | None, out: Outcome | None = None
                   ) -> tuple[Upstream, Head, _ServerHalf | None]:
        """Send the request to ``ep``; the response head (its body not read yet)."""
        dst = self.pod(ep.ip)
        if out is not None:
            out.pod = dst  # for the request's telemetry: looked up once
        mode = self.mode_to(dst, source)
        server: _ServerHalf | None = None
        if mode == LOCAL:
            assert dst is not None
            # This agent is the server side too: policy, trace, telemetry.
            server = _ServerHalf(self, source=source, dst=dst, port=ep.port, mtls=True,
                                 head=head, path=path, headers=headers)
            denied = server.check()
            if denied is not None:
                server.done(403, "DENY", len(DENIED_BODY), details="rbac_access_denied")
                raise _Denied(denied)
            headers = server.headers
        key = (mode, source.namespace, source.service_account, ep.ip, str(ep.port))
        up: Upstream | None = None
        try:
            async with asyncio.timeout(timeout) if timeout is not None else _NO_DEADLINE:
                for fresh in (False, True):
                    up = None if fresh else self.pool.take(key)
                    reused = up is not None
                    if up is None:
                        up = await self._open(key, mode, ep, dst, source)
                    try:
                        resp = await self._exchange(up, head, headers, path, body)
                    except (ChannelClosed, HttpError) as e:
                        up.close()
                        if reused and body.replayable:
                            continue  # a stale pooled connection: once more, fresh
                        raise TryFailed("UC", f"connection termination: {e}") from None
                    up.uses += 1
                    if server is not None:
                        server.upstream = up
                    return up, resp, server
        except TimeoutError:
            if up is not None:  # half-way through an exchange: not reusable
                up.close()
            if server is not None:
                server.done(504, "UT", 0)
            raise TryFailed("UT", "per-try timeout", status=504) from None
        except BaseException:  # cancelled (the client went), or a failure above
            if up is not None:
                up.close()
            raise
        raise TryFailed("UC", "connection termination")

    async def open_end(self, mode: str, ep: upstream.Endpoint, dst: Pod | None,
                       source: Peer) -> relay.End:
        """A new connection to ``ep`` the way ``mode`` says (a tunnel stream for MTLS,
        else TCP); TryFailed (UF, or the tunnel's flag) or _Denied (403) if none."""
        try:
            if mode == MTLS:
                assert self.open_tunnel is not None and dst is not None
                return await self.open_tunnel(source, dst, ep.port)
            return await self.connect(ep.ip, ep.port)
        except (OSError, TimeoutError) as e:
            raise TryFailed("UF", f"connect to {ep.address}: {e or type(e).__name__}"
                            ) from None
        except Exception as e:  # tunnel errors: refused by the peer agent, no certificate
            status = int(getattr(e, "status", 0) or 0)
            if status == 403:
                raise _Denied(str(e)) from None
            raise TryFailed(getattr(e, "flag", "UF"), str(e)) from None

    async def _open(self, key: tuple[str, ...], mode: str, ep: upstream.Endpoint,
                    dst: Pod | None, source: Peer) -> Upstream:
        end = await self.open_end(mode, ep, dst, source)
        self.pool.opened += 1
        return Upstream(key, end)

    async def _exchange(self, up: Upstream, head: Head, headers: list[tuple[str, str]],
                        path: str, body: Body) -> Head:
        ch = up.channel
        hdrs = [(k, v) for k, v in headers if k.lower() not in ("content-length",)]
        chunked = False
        if head.chunked or (head.length is not None and not body.replayable):
            if head.length is not None and not head.chunked:
                hdrs.append(("content-length", str(head.length)))
            else:
                hdrs.append(("transfer-encoding", "chunked"))
                chunked = True
        elif body.size or head.length is not None:
            hdrs.append(("content-length", str(body.size if body.replayable
                                               else head.length or 0)))
        ch.write(http1.request_line(head.method, path, hdrs), more=True)
        await body.send(ch, chunked=chunked)
        await ch.drain()  # sends the head with the body kept
        if head.method == "HEAD":
            up.reader.skip_body()
        while True:
            ev = await up.reader.next()
            if ev is None:
                raise ChannelClosed("closed before a response")
            if isinstance(ev, Head):
                if 100 <= ev.status < 200 and ev.status != 101:
                    while (await up.reader.next()) is not END:  # 1xx: no body
                        pass
                    continue
                return ev
            raise ChannelClosed("a response body before its head")

    async def _stream_response(self, ch: Channel, head: Head, *, up: Upstream, resp: Head,
                               action: routes.Action, dest: routes.Destination,
                               out: Outcome, server: _ServerHalf | None) -> None:
        hdrs, chunked, close = _framing(resp, head.version)
        hdrs = action.response_headers.merged(dest.response_headers).apply(hdrs)
        if not head.keep_alive or close:
            hdrs.append(("connection", "close"))
            out.close = True
        out.status = resp.status
        out.details = "via_upstream"
        # What the upstream sent in one read (head, body, end) leaves in one
        # write; anything not at hand yet is waited for only after a flush.
        reader = up.reader
        ch.write(http1.status_line(resp.status, resp.reason, hdrs), more=bool(reader.events))
        clean = False
        try:
            while True:
                try:
                    ev = await reader.next()
                except (ChannelClosed, HttpError):
                    out.flags.append("UC")  # the upstream connection ended mid-response
                    out.close = True
                    break
                if ev is END:
                    clean = True
                    break
                if not isinstance(ev, bytes):
                    break
                out.response_bytes += len(ev)
                try:
                    more = bool(reader.events)
                    ch.write(http1.chunk(ev) if chunked else ev, more=more)
                    if not more:
                        await ch.drain()
                except ChannelClosed:
                    out.flags.append("DC")  # the client went
                    out.close = True
                    break
            if clean and chunked:
                ch.write(http1.LAST_CHUNK)
        except ChannelClosed:
            out.flags.append("DC")
            out.close = True
        finally:
            ch.flush()
            if server is not None:
                server.done(resp.status, out.flags[-1] if out.flags else "",
                            out.response_bytes)
            if clean and resp.keep_alive and not resp.body_until_close:
                self.pool.give_back(up)
            else:
                up.close()

    async def _mirror(self, mirror: routes.Destination, head: Head, *,
                      headers: list[tuple[str, str]], path: str, body: Body,
                      source: Peer) -> None:
        """A copy of the request to the mirror cluster; its response is dropped."""
        cluster = self.clusters().get(mirror.host, mirror.port, mirror.subset)
        if cluster is None:
            return
        host = next((v for k, v in headers if k.lower() == "host"), mirror.host)
        name, sep, port = host.partition(":")
        headers = _with_header(headers, "host", f"{name}-shadow{sep}{port}")
        ep = cluster.pick(headers={}, source_ip=source.ip)
        if ep is None:
            return
        copy = Body(None, kept=list(body.kept), complete=True, size=body.size)
        try:
            up, resp, server = await self._try(ep, head, headers=headers, path=path,
                                               body=copy, source=source, timeout=10.0)
        except (TryFailed, _Denied) as e:
            log.debug("mirror to %s: %s", ep.address, e)
            return
        clean = False
        try:
            while True:
                ev = await up.reader.next()
                if ev is END or ev is None or isinstance(ev, Head):
                    clean = ev is END
                    break
        except (ChannelClosed, HttpError):
            pass
        finally:
            if server is not None:
                server.done(resp.status, "", 0)
            if clean and resp.keep_alive:
                self.pool.give_back(up)
            else:
                up.close()

    # ================================================================ server side

    async def inbound(self, end: relay.End, *, source: Peer, dst: Pod, port: int,
                      mtls: bool) -> None:
        """Serve one inbound connection (a tunnel stream or plaintext) to ``dst``:
        ``port``, an HTTP port of a local pod, until it closes."""
        ch = Channel(end)
        reader = Reader(ch, request=True)
        pod: Upstream | None = None
        idle = IdleTimer(self.idle_timeout, lambda: ch.lost(0, "idle timeout"))
        try:
            while True:
                idle.idle()
                try:
                    ev = await reader.next()
                except HttpError as e:
                    ch.write(_simple(e.status, str(e).encode(), close=True))
                    return
                if not isinstance(ev, Head):
                    return
                idle.busy()
                head = ev
                server = _ServerHalf(self, source=source, dst=dst, port=port, mtls=mtls,
                                     head=head, path=head.target,
                                     headers=http1.forward_headers(head))
                denied = server.check()
                body = await Body.read(reader, head)
                if denied is not None:
                    ch.write(_simple(403, DENIED_BODY, close=not head.keep_alive))
                    server.done(403, "DENY", len(DENIED_BODY), details="rbac_access_denied",
                                request_bytes=body.size)
                    if not body.replayable or not head.keep_alive:
                        return
                    continue
                if pod is None or not pod.usable:
                    try:
                        pod = Upstream(("inbound",), await self.connect(dst.ip, port))
                    except (OSError, TimeoutError) as e:
                        text = f"upstream connect error: {e}".encode()
                        ch.write(_simple(503, text, close=True))
                        server.done(503, "UF", len(text), request_bytes=body.size)
                        return
                try:
                    resp = await self._exchange(pod, head, server.headers, head.target, body)
                except (ChannelClosed, HttpError) as e:
                    text = f"upstream reset before response: {e}".encode()
                    ch.write(_simple(503, text, close=True))
                    server.done(503, "UC", len(text), request_bytes=body.size)
                    return
                out = Outcome()
                hdrs, chunked, close = _framing(resp, head.version)
                if not head.keep_alive or close:
                    hdrs.append(("connection", "close"))
                answer = pod.reader
                ch.write(http1.status_line(resp.status, resp.reason, hdrs),
                         more=bool(answer.events))
                clean = False
                try:
                    while True:
                        piece = await answer.next()
                        if piece is END:
                            clean = True
                            break
                        if not isinstance(piece, bytes):
                            break
                        out.response_bytes += len(piece)
                        more = bool(answer.events)
                        ch.write(http1.chunk(piece) if chunked else piece, more=more)
                        if not more:
                            await ch.drain()
                    if chunked:
                        ch.write(http1.LAST_CHUNK)
                finally:
                    ch.flush()
                    server.done(resp.status, "" if clean else "UC", out.response_bytes,
                                request_bytes=body.size)
                if not (clean and resp.keep_alive and not resp.body_until_close):
                    pod.close()
                    pod = None
                if not head.keep_alive or close or not body.replayable:
                    return
        except (ChannelClosed, TimeoutError, HttpError):
            return
        finally:
            idle.cancel()
            if pod is not None:
                pod.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.drain(), 1.0)
            ch.close()


class _Denied(TryFailed):
    def __init__(self, why: str) -> None:
        super().__init__("DENY", why, status=403)


class _ServerHalf:
    """The server side of one request to a local pod: policy, trace, telemetry."""

    def __init__(self, engine: Engine, *, source: Peer, dst: Pod, port: int, mtls: bool,
                 head: Head, path: str, headers: list[tuple[str, str]]) -> None:
        self.engine = engine
        self.source = source
        self.dst = dst
        self.port = port
        self.mtls = mtls
        self.head = head
        self.path = path
        self.started, self.t0 = time.time(), time.monotonic()
        lower: dict[str, str] = {}
        for k, v in headers:
            lower[k.lower()] = v
        self.lower = lower
        parent = telemetry.TraceContext.from_headers(lower)
        self.ctx = telemetry.hop_context(parent, engine.tracer)
        self.headers = telemetry.with_trace(headers, self.ctx)
        if mtls:
            self.headers = with_client_cert(self.headers, source, dst)
        self.upstream: Upstream | None = None
        self._done = False

    def check(self) -> str | None:
        """None when allowed, else why not."""
        req = HttpRequest(method=self.head.method, path=self.path,
                          host=self.lower.get("host", ""), headers=self.lower)
        allowed, why = self.engine.authorize(source=self.source, dst=self.dst, port=self.port,
                                             mtls=self.mtls, request=req)
        return None if allowed else (why or "denied")

    def done(self, status: int, flag: str, response_bytes: int, *, details: str = "",
             request_bytes: int = 0) -> None:
        if self._done:
            return
        self._done = True
        e, s, d = self.engine, self.source, self.dst
        duration = time.monotonic() - self.t0
        svc = e.service_of(dst=d, port=self.port, host=self.lower.get("host", ""),
                           source_namespace=s.namespace)
        rec = telemetry.RequestRecord(
            reporter="destination", source_workload=s.workload,
            source_workload_namespace=s.namespace, source_principal=s.principal,
            destination_workload=d.workload, destination_workload_namespace=d.namespace,
            destination_principal=d.principal, destination_service=svc.host,
            destination_service_name=svc.name, destination_service_namespace=svc.namespace,
            response_code=status, response_flags=flag,
            connection_security_policy="mutual_tls" if self.mtls else "none",
            method=self.head.method, path=self.path, authority=self.lower.get("host", ""),
            duration_s=duration, request_bytes=request_bytes, response_bytes=response_bytes,
            upstream=f"{d.ip}:{self.port}", trace_id=self.ctx.trace_id,
            span_id=self.ctx.span_id, start_time=self.started,
            protocol=f"HTTP/{self.head.version}",
            request_id=self.lower.get("x-request-id", ""),
            user_agent=self.lower.get("user-agent", ""), downstream_remote_address=s.ip,
            response_code_details=details or flag or "via_upstream")
        e.record(rec)
        if e.tracer is not None and self.ctx.sampled:
            e.tracer.finish(self.ctx, name=f"{self.lower.get('host', d.name)}"
                            f"{self.path.split('?', 1)[0]}", kind="SERVER",
                            start=self.started, duration_s=duration,
                            tags={"http.method": self.head.method,
                                  "http.url": self.path,
                                  "http.status_code": str(status),
                                  "response_flags": flag or "-",
                                  "node_id": e.node,
                                  "upstream_cluster": f"inbound|{self.port}||",
                                  "peer.address": s.ip,
                                  "istio.namespace": d.namespace,
                                  "istio.canonical_service": d.workload},
                            service=f"{d.workload}.{d.namespace}")
