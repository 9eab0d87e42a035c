"""The data path: what happens to a captured connection.

    outbound (15001), a local pod connects out:
        original destination (SO_ORIGINAL_DST) -> routing.decide(): a service port ->
        Balancer.pick() of its ready endpoints; a pod IP -> as is; else close (NR)
        -> the destination pod:
             on this node            admit(source identity, pod, port) here, then connect
                                     straight to it ("local")
             in the mesh elsewhere   tunnel.Pool.open(source identity, pod, its expected
                                     SPIFFE ID): mTLS to the peer agent ("mTLS")
             not in the mesh         connect as is ("plaintext")
    inbound tunnel (15008), a CONNECT stream from a peer agent:
        admit(the peer's verified identity, pod, port) ? 200 and relay : 403
    inbound plaintext (15006), a connection to a local pod from outside the mesh:
        admit(no identity, pod, port): refused under STRICT PeerAuthentication,
        else by AuthorizationPolicy, then connect

``admit`` is the agent's policy decision (PeerAuthentication and
AuthorizationPolicy); a refused connection is closed, counted in
``shoal_mesh_connections_denied_total`` and in the TCP metrics with the response
flag ``DENY``.

Bytes are carried by :class:`meshagent.relay.Relay`, by callbacks: half-close
aware (EOF one way is passed on and the other way keeps flowing), with
back-pressure from whichever end cannot write, and a connection idle in both
directions for ``idle_timeout`` is closed. Listeners are bound in ``start()`` so
a bad port fails at start-up.

HTTP ports (``shoal.meshprotocol``) take the L7 path instead, given ``l7``
(:class:`L7`): outbound, a connection to an HTTP service port goes to
:meth:`meshagent.l7.engine.Engine.outbound` (per request: VirtualService,
DestinationRule, retries...); inbound (tunnel and plaintext), a connection to a
pod port some Service exposes as HTTP goes to ``Engine.inbound`` (policy per
request, with the request's attributes). Everything else stays on this L4 path.

Metrics use Istio's names and labels: istio_tcp_connections_opened_total,
istio_tcp_connections_closed_total, istio_tcp_sent_bytes_total (client to
server) and istio_tcp_received_bytes_total (server to client). Live
connections are kept in ``DataPath.live`` for ``shoal mesh tls``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from meshagent import relay, tunnel
from meshagent.egress import Egress
from meshagent.l7 import engine as l7engine
from meshagent.routing import Address, Balancer, Decision, Route, decide
from shoal import spiffe
from shoal.queueing import wait_set

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80

OriginalDst = Callable[[socket.socket], Address]
Routes = Callable[[], dict[Address, Route]]
EgressDecide = Callable[["Workload | None", Address], Egress]

LOCAL, MTLS, PLAINTEXT = "local", "mTLS", "plaintext"


def original_dst(sock: socket.socket) -> Address:
    """The pre-REDIRECT destination of an accepted IPv4 connection."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), int(port)


@dataclass(frozen=True)
class Workload:
    """A pod as the data path sees it."""

    ip: str
    name: str
    namespace: str
    service_account: str
    workload: str  # the app's name (app.kubernetes.io/name, app) or the pod's
    node: str
    meshed: bool  # captured: its traffic goes through an agent
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    def spiffe_id(self, trust_domain: str) -> spiffe.SpiffeId:
        return spiffe.SpiffeId(trust_domain, self.namespace, self.service_account)


def principal(spiffe_id: str) -> str:
    """Istio's principal form of a SPIFFE ID: ``td/ns/NS/sa/SA``."""
    return spiffe_id.removeprefix(spiffe.SCHEME)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""  # why not (names the policy)


class Admit(Protocol):
    """The policy decision for a connection to ``dst``:``port``. ``principal`` is
    the source's Istio principal ("" for plaintext), ``mtls`` whether the source
    is an authenticated mesh workload."""

    def __call__(self, *, principal: str, namespace: str, ip: str, dst: Workload,
                 port: int, mtls: bool) -> Verdict: ...


def admit_all(*, principal: str, namespace: str, ip: str, dst: Workload, port: int,
              mtls: bool) -> Verdict:
    return Verdict(True)


LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal",
          "destination_workload", "destination_workload_namespace", "destination_principal",
          "destination_service", "connection_security_policy", "response_flags")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened",
                              LABELS, registry=registry)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed",
                              LABELS, registry=registry)
        self.sent = Counter("istio_tcp_sent_bytes", "bytes sent from client to server",
                            LABELS, registry=registry)
        self.received = Counter("istio_tcp_received_bytes",
                                "bytes received by the client from the server", LABELS,
                                registry=registry)
        self.denied = Counter(
            "shoal_mesh_connections_denied", "connections refused by policy: STRICT mTLS "
            "for plaintext, or an AuthorizationPolicy", ("reporter", "destination_workload",
                                                         "destination_workload_namespace",
                                                         "source_principal", "reason"),
            registry=registry)
        self.egress_blocked = Counter(
            "shoal_mesh_egress_blocked", "connections out of the cluster refused by the "
            "outbound traffic policy REGISTRY_ONLY (no ServiceEntry names the destination)",
            ("source_workload_namespace", "destination"), registry=registry)
        self.tunnel = tunnel.Metrics(registry)


# -- splicing ---------------------------------------------------------------------------


# -- live connections ------------------------------------------------------------------


@dataclass
class Live:
    """One connection the agent is carrying, as ``shoal mesh tls`` shows it."""

    id: int
    direction: str  # outbound | inbound
    mode: str  # mTLS | local | plaintext
    source_ip: str
    source_workload: str
    source_namespace: str
    source_principal: str
    destination: Address  # the endpoint connected to
    destination_service: str
    destination_workload: str
    destination_namespace: str
    peer_principal: str = ""  # what the TLS handshake proved about the peer
    tls_version: str = ""
    cipher: str = ""
    original: Address | None = None  # what the client dialled, when not the endpoint
    sent: int = 0
    received: int = 0
    opened: float = field(default_factory=time.time)


_ids = itertools.count(1)


# -- the data path ---------------------------------------------------------------------

Workloads = Callable[[str], Workload | None]


class L7Engine(Protocol):
    """What serves HTTP connections: :class:`meshagent.l7.engine.Engine`, or
    :class:`meshagent.l7.http2.Dispatch` (HTTP/1.1 and HTTP/2 by the first bytes)."""

    async def outbound(self, client: relay.End, *, source: l7engine.Peer,
                       service: l7engine.Service) -> None: ...

    async def inbound(self, end: relay.End, *, source: l7engine.Peer, dst: l7engine.Pod,
                      port: int, mtls: bool) -> None: ...


@dataclass(frozen=True)
class L7:
    """The L7 path: the engine, and which destinations are HTTP."""

    engine: L7Engine
    # ClusterIP:port -> the HTTP service port there (None: not an HTTP port)
    service: Callable[[Address], l7engine.Service | None]
    # pod IP:port -> whether a Service exposes it as an HTTP port
    http_port: Callable[[Address], bool]
    # a TCP service connection: the endpoint its VirtualService's weighted
    # ``tcp`` route picks (None: no tcp route, the L4 balancer decides)
    tcp_pick: Callable[[Route, Address, Workload | None], Address | None] | None = None
    # (pod IP, port, the pod's namespace, the client's namespace) -> "namespace/name"
    # of the Service a connection to it is for ("" when none or unknown): the
    # destination reporter's destination_service (l7 destservice, without a Host)
    served: Callable[[str, int, str, str], str] | None = None


def service_label(service: str, domain: str) -> str:
    """destination_service as Istio reports it: a Service's FQDN (the data path keys
    Services by namespace/name), else as is (a ServiceEntry host,
    PassthroughCluster, BlackHoleCluster); "unknown" for none."""
    ns, sep, name = service.partition("/")
    if sep:
        return f"{name}.{ns}.svc.{domain}"
    return service or "unknown"


class DataPath:
    """Everything the listeners share; see the module docstring."""

    def __init__(self, *, node: str, trust_domain: str, routes: Routes, pod_cidr: str,
                 workload: Workloads, metrics: Metrics, pool: tunnel.Pool | None = None,
                 admit: Admit = admit_all, balancer: Balancer | None = None,
                 connect_timeout: float = 5.0, idle_timeout: float = 3600.0,
                 ready: asyncio.Event | None = None, ready_timeout: float = 10.0,
                 egress: EgressDecide | None = None, l7: L7 | None = None,
                 cluster_domain: str = "cluster.local") -> None:
        self.node = node
        self.cluster_domain = cluster_domain
        self.trust_domain = trust_domain
        self.routes = routes
        self.pod_cidr = pod_cidr
        self.workload = workload
        self.metrics = metrics
        self.pool = pool
        self.admit = admit
        self.balancer = balancer or Balancer()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.live: dict[int, Live] = {}
        self.egress = egress  # destinations outside the cluster (meshagent.egress)
        self.l7 = l7

    async def wait_ready(self) -> bool:
        """Wait until the agent knows the cluster (``ready``, set once its
        informers have synced); False after ``ready_timeout``. Until then nothing
        is decided: a connection captured by rules a previous agent left would
        otherwise find no workload and leave in plaintext."""
        if self.ready is None or self.ready.is_set():
            return True
        return await wait_set(self.ready, self.ready_timeout)

    def _principal_of(self, w: Workload | None) -> str:
        return principal(str(w.spiffe_id(self.trust_domain))) if w is not None else ""

    def _labels(self, reporter: str, rec: Live, dst_principal: str,
                flag: str) -> dict[str, str]:
        return {"reporter": reporter,
                "source_workload": rec.source_workload or "unknown",
                "source_workload_namespace": rec.source_namespace or "unknown",
                "source_principal": rec.source_principal or "unknown",
                "destination_workload": rec.destination_workload or "unknown",
                "destination_workload_namespace": rec.destination_namespace or "unknown",
                "destination_principal": dst_principal or "unknown",
                "destination_service": service_label(rec.destination_service,
                                                     self.cluster_domain),
                "connection_security_policy": "mutual_tls" if rec.mode != PLAINTEXT else "none",
                "response_flags": flag}

    def _served(self, ip: str, port: int, dst: Workload | None, source_namespace: str
                ) -> str:
        """The Service (namespace/name) an inbound connection to a local pod's port
        is for, as the L7 destination reporter finds it without a Host: the one
        Service of the pod's namespace with it as an endpoint there ("" if not one)."""
        if self.l7 is None or self.l7.served is None or dst is None:
            return ""
        return self.l7.served(ip, port, dst.namespace, source_namespace)

    def _refused(self, labels: dict[str, str]) -> None:
        self.metrics.opened.labels(**labels).inc()
        self.metrics.closed.labels(**labels).inc()

    def _denied(self, labels: dict[str, str], reason: str) -> None:
        labels["response_flags"] = "DENY"
        self._refused(labels)
        self.metrics.denied.labels(labels["reporter"], labels["destination_workload"],
                                   labels["destination_workload_namespace"],
                                   labels["source_principal"], reason).inc()

    async def _connect(self, target: Address) -> relay.SocketEnd:
        loop = asyncio.get_running_loop()
        _, end = await asyncio.wait_for(loop.create_connection(relay.SocketEnd, *target),
                                        timeout=self.connect_timeout)
        return end

    async def _carry(self, rec: Live, labels: dict[str, str], a: relay.End,
                     b: relay.End) -> None:
        self.live[rec.id] = rec
        self.metrics.opened.labels(**labels).inc()
        sent_c = self.metrics.sent.labels(**labels)
        recv_c = self.metrics.received.labels(**labels)

        def sent(n: int) -> None:
            rec.sent += n
            sent_c.inc(n)

        def received(n: int) -> None:
            rec.received += n
            recv_c.inc(n)

        try:
            await relay.Relay(a, b, sent=sent, received=received).run(self.idle_timeout)
        finally:
            self.live.pop(rec.id, None)
            self.metrics.closed.labels(**labels).inc()

    # -- outbound: a local pod connects out --

    def peer(self, ip: str, w: Workload | None) -> l7engine.Peer:
        """A request's source for the L7 engine."""
        if w is None:
            return l7engine.Peer(ip=ip)
        return l7engine.Peer(ip=ip, workload=w.workload, namespace=w.namespace,
                             principal=self._principal_of(w),
                             service_account=w.service_account, labels=w.labels,
                             meshed=True)

    def pod(self, w: Workload) -> l7engine.Pod:
        return l7engine.Pod(ip=w.ip, name=w.name, namespace=w.namespace, workload=w.workload,
                            principal=self._principal_of(w), node_local=w.node == self.node,
                            meshed=w.meshed, labels=w.labels)

    async def outbound(self, client: relay.SocketEnd, peer_ip: str, dst: Address) -> None:
        src = self.workload(peer_ip)
        if self.l7 is not None and (svc := self.l7.service(dst)) is not None:
            await self.l7.engine.outbound(client, source=self.peer(peer_ip, src), service=svc)
            return
        d = decide(self.routes(), dst, pod_cidr=self.pod_cidr)
        service = d.route.service if d.route is not None else ""
        target: Address | None = None
        if d.kind == "service" and d.route is not None:
            if self.l7 is not None and self.l7.tcp_pick is not None:
                target = self.l7.tcp_pick(d.route, dst, src)
            if target is None:
                target = self.balancer.pick(d.route)
        elif d.kind == "passthrough":
            target = dst
        elif d.route is None and self.egress is not None:
            # Outside the cluster: a ServiceEntry, or the outbound traffic policy.
            e = self.egress(src, dst)
            target, service = e.target, e.service
            if not e.allowed:
                d = Decision("refuse", reason=e.reason)
                self.metrics.egress_blocked.labels(
                    src.namespace if src else "unknown", f"{dst[0]}:{dst[1]}").inc()
        dst_wl = self.workload(target[0]) if target is not None else None
        if dst_wl is not None and dst_wl.node == self.node:
            mode = LOCAL
        elif dst_wl is not None and dst_wl.meshed and src is not None and self.pool:
            mode = MTLS
        else:
            mode = PLAINTEXT
        rec = Live(id=next(_ids), direction="outbound", mode=mode, source_ip=peer_ip,
                   source_workload=src.workload if src else "",
                   source_namespace=src.namespace if src else "",
                   source_principal=self._principal_of(src),
                   destination=target or dst, original=dst, destination_service=service,
                   destination_workload=dst_wl.workload if dst_wl else "",
                   destination_namespace=dst_wl.namespace if dst_wl else "")
        dst_principal = self._principal_of(dst_wl) if mode != PLAINTEXT else ""
        labels = self._labels("source", rec, dst_principal, "")
        if target is None:
            log.info("outbound: refused %s:%d: %s", dst[0], dst[1], d.reason)
            labels["response_flags"] = "NR"  # no route, as Envoy's response flag
            self._refused(labels)
            return
        if mode == LOCAL:
            assert dst_wl is not None
            verdict = self.admit(principal=rec.source_principal,
                                 namespace=rec.source_namespace, ip=peer_ip, dst=dst_wl,
                                 port=target[1], mtls=src is not None)
            if not verdict.allowed:
                log.info("outbound: %s -> %s:%d denied: %s", peer_ip, *target, verdict.reason)
                self._denied(labels, verdict.reason)
                return
            rec.peer_principal = dst_principal
        upstream: relay.End
        try:
            if mode == MTLS:
                assert src is not None and dst_wl is not None and self.pool is not None
                stream = await self.pool.open(
                    source=(src.namespace, src.service_account), destination=target,
                    expected=dst_wl.spiffe_id(self.trust_domain), source_ip=peer_ip)
                rec.peer_principal = principal(stream.tls.peer)
                rec.tls_version, rec.cipher = stream.tls.version, stream.tls.cipher
                upstream = stream
            else:
                upstream = await self._connect(target)
        except tunnel.TunnelError as e:
            log.info("outbound: %s -> %s:%d: %s", peer_ip, *target, e)
            if e.status == 403:
                self._denied(labels, str(e))
            else:
                labels["response_flags"] = e.flag
                self._refused(labels)
            return
        except (OSError, TimeoutError) as e:
            log.info("outbound: connect to %s:%d failed: %s", *target, e)
            labels["response_flags"] = "UF"  # upstream connection failure
            self._refused(labels)
            return
        self.balancer.opened(target)
        try:
            await self._carry(rec, labels, client, upstream)
        finally:
            self.balancer.closed(target)
            upstream.close()

    # -- inbound through the tunnel: a stream from a peer agent --

    async def inbound_tunnel(self, stream: tunnel.Stream, ip: str, port: int) -> None:
        conn = stream.conn
        dst_wl = self.workload(ip)
        peer_id = stream.tls.peer
        try:
            src = spiffe.parse(peer_id)
        except spiffe.InvalidSpiffeId:  # the handshake checked it already
            conn.respond(stream, 403, "bad peer identity")
            return
        source_ip = stream.headers.get(b"forwarded", b"").decode().removeprefix("for=")
        rec = Live(id=next(_ids), direction="inbound", mode=MTLS, source_ip=source_ip,
                   source_workload="", source_namespace=src.namespace,
                   source_principal=principal(peer_id), destination=(ip, port),
                   destination_service=self._served(ip, port, dst_wl, src.namespace),
                   destination_workload=dst_wl.workload if dst_wl else "",
                   destination_namespace=dst_wl.namespace if dst_wl else "",
                   peer_principal=principal(peer_id), tls_version=stream.tls.version,
                   cipher=stream.tls.cipher)
        labels = self._labels("destination", rec, principal(stream.tls.local), "")
        if dst_wl is None or dst_wl.node != self.node:
            conn.respond(stream, 404, f"{ip} is not a pod of node {self.node}")
            labels["response_flags"] = "NR"
            self._refused(labels)
            return
        if self.l7 is not None and self.l7.http_port((ip, port)):
            # Policy is decided per request, with the request's attributes.
            conn.respond(stream, 200)
            src_wl = self.workload(source_ip)
            peer = l7engine.Peer(ip=source_ip, cert_sha256=stream.tls.peer_cert_sha256,
                                 workload=src_wl.workload if src_wl else "",
                                 namespace=src.namespace, principal=principal(peer_id),
                                 service_account=src.service_account,
                                 labels=src_wl.labels if src_wl else {}, meshed=True)
            await self.l7.engine.inbound(stream, source=peer, dst=self.pod(dst_wl),
                                         port=port, mtls=True)
            return
        verdict = self.admit(principal=rec.source_principal, namespace=src.namespace,
                             ip=source_ip, dst=dst_wl, port=port, mtls=True)
        if not verdict.allowed:
            log.info("inbound: %s -> %s:%d denied: %s", peer_id, ip, port, verdict.reason)
            conn.respond(stream, 403, verdict.reason)
            self._denied(labels, verdict.reason)
            return
        try:
            pod = await self._connect((ip, port))
        except (OSError, TimeoutError) as e:
            conn.respond(stream, 503, f"connect to {ip}:{port} failed: {e}")
            labels["response_flags"] = "UF"
            self._refused(labels)
            return
        conn.respond(stream, 200)
        try:
            await self._carry(rec, labels, stream, pod)
        finally:
            pod.close()

    # -- inbound plaintext: from outside the mesh to a local pod --

    async def inbound_plain(self, client: relay.SocketEnd, peer_ip: str,
                            dst: Address) -> None:
        dst_wl = self.workload(dst[0])
        src = self.workload(peer_ip)
        rec = Live(id=next(_ids), direction="inbound", mode=PLAINTEXT, source_ip=peer_ip,
                   source_workload=src.workload if src else "",
                   source_namespace=src.namespace if src else "", source_principal="",
                   destination=dst, destination_service=self._served(
                       dst[0], dst[1], dst_wl, src.namespace if src else ""),
                   destination_workload=dst_wl.workload if dst_wl else "",
                   destination_namespace=dst_wl.namespace if dst_wl else "")
        labels = self._labels("destination", rec, "", "")
        if self.l7 is not None and dst_wl is not None and self.l7.http_port(dst):
            # PeerAuthentication and AuthorizationPolicy per request.
            peer = self.peer(peer_ip, src)
            await self.l7.engine.inbound(
                client, source=l7engine.Peer(ip=peer_ip, workload=peer.workload,
                                             namespace=peer.namespace, labels=peer.labels),
                dst=self.pod(dst_wl), port=dst[1], mtls=False)
            return
        if dst_wl is not None:
            verdict = self.admit(principal="", namespace="", ip=peer_ip, dst=dst_wl,
                                 port=dst[1], mtls=False)
            if not verdict.allowed:
                log.info("inbound: plaintext %s -> %s:%d denied: %s", peer_ip, *dst,
                         verdict.reason)
                self._denied(labels, verdict.reason)
                return
        try:
            pod = await self._connect(dst)
        except (OSError, TimeoutError) as e:
            log.info("inbound: connect to %s:%d failed: %s", *dst, e)
            labels["response_flags"] = "UF"
            self._refused(labels)
            return
        try:
            await self._carry(rec, labels, client, pod)
        finally:
            pod.close()


# -- listeners ------------------------------------------------------------------------


class Listener:
    """One capture listener; ``direction`` is "outbound" (15001) or "inbound" (15006)."""

    def __init__(self, *, direction: str, host: str, port: int, path: DataPath,
                 original_dst: OriginalDst = original_dst) -> None:
        self.direction = direction
        self.host = host
        self.port = port
        self.path = path
        self.original_dst = original_dst
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: relay.SocketEnd(self._accepted), self.host, self.port,
            reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        # Wait for them: their sockets close and their metrics are counted.
        await asyncio.gather(*conns, return_exceptions=True)

    def _accepted(self, client: relay.SocketEnd) -> None:
        task = asyncio.create_task(self._serve(client), name=f"{self.direction}-conn")
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, client: relay.SocketEnd) -> None:
        assert client.transport is not None
        try:
            sock = client.transport.get_extra_info("socket")
            peer = client.transport.get_extra_info("peername")
            try:
                dst = self.original_dst(sock)
            except OSError as e:
                log.warning("%s: no original destination for %s: %s", self.direction, peer, e)
                return
            if not await self.path.wait_ready():
                log.warning("%s: %s -> %s:%d closed: the agent has not synced yet",
                            self.direction, peer[0], *dst)
                return
            if self.direction == "inbound":
                await self.path.inbound_plain(client, peer[0], dst)
            else:
                await self.path.outbound(client, peer[0], dst)
        except asyncio.CancelledError:
            pass  # shutting down
        except Exception:
            log.exception("%s connection failed", self.direction)
        finally:
            client.close()
