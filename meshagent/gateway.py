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
      -> per server port one Listener: HTTP (protocol HTTP, HTTP2 or GRPC), or
         HTTPS with TLS mode SIMPLE, MUTUAL or OPTIONAL_MUTUAL (ALPN http/1.1,
         then h2; the certificate from the Secret
         ``credentialName``, type kubernetes.io/tls, in the gateway pod's
         namespace; for MUTUAL the client's certificate is checked against
         the Secret's ``ca.crt``, or that of ``<credentialName>-cacert``, and
         against ``subjectAltNames`` when given; SNI picks the server when
         several share the port)
      -> a bad server (unknown protocol, no credential, a port already used
         with another protocol) is left out alone and reported

Per client connection: ``http2.Dispatch.outbound`` with this gateway as its
``front``: HTTP/2 (h2 by ALPN, or h2c with prior knowledge: gRPC clients) to its
HTTP/2 proxy, per stream, and anything else to the L7 engine's HTTP/1.1 client
side, so keep-alive, and per request everything the agents' client side does
after routing. The gateway routes (``decide``, then ``_route``)::

    Host (port dropped) matches a server's hosts (exact, "*", "*.suffix")?
      no -> 404 NR
    the server says httpsRedirect and this is not TLS -> 301 to https://
    the VirtualService bound to that Gateway (``gateways: [ns/name]``) for the
    host, routed by meshagent.l7.routes (the agents' own routing code)
      none / no route matched -> 404 NR;  redirect -> 301
    the destination (weighted) chosen; the gateway's SERVER span (a child of
    the incoming context, else a new root) injected; x-forwarded-for appended

and the engine carries it out: fault delay/abort, connection pool (503 UO),
mirror, tries with retries/perTryTimeout within the route timeout, the
cluster's endpoint (meshagent.l7.upstream: subsets, LB, outlier detection),
pooled keep-alive upstream connections over mTLS tunnel streams to the
endpoint's agent as the gateway's identity (plain TCP to a pod outside the
mesh), x-forwarded-proto and x-request-id, x-forwarded-client-cert as Istio's gateways
set it (SANITIZE_SET: a client's own is dropped; a verified client certificate's
Hash, Subject, URI and DNS names are set), the response streamed back, and the
request's record (reporter=source, source workload istio-ingressgateway), which
the gateway completes with its span (``_finish``) before it is kept. Local
replies name their response flag in ``x-shoal-response-flags``.

TLS for the listeners is the ``ssl`` module's; nothing here loads
``cryptography`` (a unit test guards the process's imports).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import socket
import ssl
import sys
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from meshagent import identity, relay, tunnel
from meshagent.l7 import engine, http2, routes, telemetry, upstream
from meshagent.l7.routes import RouteTable
from shoal import argtypes, errors, eventloop, logs, meshnames, spiffe
from shoal import config as configmod
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as tpb
from shoal.client import AsyncClient
from shoal.informer import Informer, key_of
from shoal.monitoring import MonitoringServer, Readiness
from shoal.signals import until_stopped

log = logging.getLogger(__name__)

HTTP, HTTPS, HTTP2, GRPC = "HTTP", "HTTPS", "HTTP2", "GRPC"
# Plaintext server protocols, all served by one kind of listener: HTTP/1.1, or HTTP/2
# with prior knowledge (h2c, as gRPC clients speak it), told apart by the first bytes.
PLAINTEXT_HTTP = (HTTP, HTTP2, GRPC)
# What an HTTPS listener offers, in its order of preference: OpenSSL takes the first of
# ours the client also offers, so browsers and curl (h2 and http/1.1) get HTTP/1.1,
# which every destination speaks (HTTP/2 streams are not converted to HTTP/1.1
# upstream), and gRPC clients (h2 alone) get HTTP/2.
ALPN = ["http/1.1", "h2"]
SIMPLE, MUTUAL, OPTIONAL_MUTUAL = "SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"
TLS_MODES = (SIMPLE, MUTUAL, OPTIONAL_MUTUAL)  # what an HTTPS server may say
TLS_SECRET_TYPE = "kubernetes.io/tls"
FLAGS_HEADER = "x-shoal-response-flags"  # a local reply's response flag, for the client


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
class Tls:
    """How an HTTPS server's handshakes go: one server context per distinct Tls."""

    credential: str  # the Secret
    mode: str  # SIMPLE, MUTUAL or OPTIONAL_MUTUAL
    subject_alt_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Server:
    gateway: str  # namespace/name of the Gateway
    index: int  # position in spec.servers
    name: str
    port: int
    protocol: str  # HTTP (HTTP2 and GRPC servers too) | HTTPS
    hosts: tuple[ServerHost, ...]
    credential: str = ""  # the Secret (HTTPS), in the gateway pod's namespace
    https_redirect: bool = False
    mode: str = ""  # HTTPS: SIMPLE, MUTUAL or OPTIONAL_MUTUAL
    subject_alt_names: tuple[str, ...] = ()  # MUTUAL: one must be the client's

    @property
    def tls(self) -> Tls | None:
        return Tls(self.credential, self.mode, self.subject_alt_names) \
            if self.credential else None

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
    protocol: str  # HTTP (HTTP2 and GRPC servers too) | HTTPS
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
    def credentials(self) -> tuple[Tls, ...]:
        return tuple(dict.fromkeys(t for s in self.servers if (t := s.tls) is not None))


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
            if protocol in PLAINTEXT_HTTP:
                protocol = HTTP  # one listener kind: HTTP/1.1 and h2c alike
            server = Server(gateway=gkey, index=i, name=s.name, port=int(s.port.number),
                            protocol=protocol,
                            hosts=tuple(ServerHost.parse(h, gw.metadata.namespace)
                                        for h in s.hosts),
                            credential=s.tls.credential_name if s.HasField("tls") else "",
                            https_redirect=s.HasField("tls") and s.tls.https_redirect,
                            mode=(s.tls.mode or SIMPLE).upper()
                            if protocol == HTTPS and s.HasField("tls") else "",
                            subject_alt_names=tuple(s.tls.subject_alt_names)
                            if s.HasField("tls") else ())
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
        return (f"protocol {s.port.protocol!r} is not served (HTTP, HTTP2, GRPC and HTTPS "
                f"are)")
    mode = (s.tls.mode or SIMPLE).upper() if s.HasField("tls") else ""
    if mode not in TLS_MODES:
        return (f"HTTPS with TLS mode {mode or 'unset'} is not served (SIMPLE, MUTUAL "
                f"and OPTIONAL_MUTUAL are)")
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


def credential_context(secret: core_pb2.Secret, *, mode: str = SIMPLE,
                       ca_secret: core_pb2.Secret | None = None) -> ssl.SSLContext:
    """A server TLS context presenting the Secret's ``tls.crt`` (chain) and
    ``tls.key``; for MUTUAL (OPTIONAL_MUTUAL) one that asks for (takes) a client
    certificate signed by the Secret's ``ca.crt``, else ``ca_secret``'s (Istio's
    ``<credentialName>-cacert``). Invalid naming what is wrong with the Secret."""
    name = key_of(secret)
    crt, key = secret.data.get("tls.crt", b""), secret.data.get("tls.key", b"")
    if not crt or not key:
        raise errors.Invalid(f"secret {name}: needs tls.crt and tls.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    try:
        with _memory_file(bytes(crt) + b"\n" + bytes(key)) as path:
            ctx.load_cert_chain(path)
    except ssl.SSLError as e:
        raise errors.Invalid(f"secret {name}: tls.crt/tls.key unusable: {e.reason or e}"
                             ) from None
    if mode in (MUTUAL, OPTIONAL_MUTUAL):
        ca = bytes(secret.data.get("ca.crt", b"")) or (
            bytes(ca_secret.data.get("ca.crt", b"")) if ca_secret is not None else b"")
        if not ca:
            raise errors.Invalid(f"secret {name}: TLS mode {mode} needs ca.crt (in it, or "
                                 f"in secret {name}-cacert)")
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as e:
            raise errors.Invalid(f"secret {name}: ca.crt unusable: "
                                 f"{getattr(e, 'reason', None) or e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == MUTUAL else ssl.CERT_OPTIONAL
    return ctx


class Credentials:
    """TLS contexts of the listeners' Secrets, one per :class:`Tls`, rebuilt when
    a Secret (or its ``-cacert``) changes."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        # Tls -> (the Secrets' resource versions, the context)
        self._ctx: dict[Tls, tuple[tuple[str, str], ssl.SSLContext]] = {}
        # context -> what it was made for; a context replaced by a Secret's update
        # stays known while a connection still holds it
        self._tls: weakref.WeakKeyDictionary[ssl.SSLContext, Tls] = \
            weakref.WeakKeyDictionary()
        self.problems: dict[str, str] = {}

    def update(self, secrets: Mapping[str, core_pb2.Secret], wanted: Iterable[Tls]) -> None:
        fresh: dict[Tls, tuple[tuple[str, str], ssl.SSLContext]] = {}
        problems: dict[str, str] = {}
        for tls in dict.fromkeys(wanted):
            name = tls.credential
            secret = secrets.get(f"{self.namespace}/{name}")
            if secret is None:
                problems[name] = f"secret {self.namespace}/{name} not found"
                continue
            ca_secret = secrets.get(f"{self.namespace}/{name}-cacert") \
                if tls.mode != SIMPLE else None
            rv = (secret.metadata.resource_version,
                  ca_secret.metadata.resource_version if ca_secret is not None else "")
            old = self._ctx.get(tls)
            if old is not None and old[0] == rv:
                fresh[tls] = old
                continue
            try:
                fresh[tls] = (rv, credential_context(secret, mode=tls.mode,
                                                     ca_secret=ca_secret))
            except errors.Invalid as e:
                problems[name] = str(e)
                if old is not None:  # keep serving the last good certificate
                    fresh[tls] = old
        for name, why in problems.items():
            if self.problems.get(name) != why:
                log.warning("gateway credential %s: %s", name, why)
        self._ctx, self.problems = fresh, problems
        for tls, (_, ctx) in fresh.items():
            self._tls[ctx] = tls

    def get(self, tls: Tls) -> ssl.SSLContext | None:
        found = self._ctx.get(tls)
        return found[1] if found is not None else None

    def tls_of(self, ctx: ssl.SSLContext) -> Tls | None:
        """What the context a handshake ended with was made for."""
        return self._tls.get(ctx)


_SHORT_RDN = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
              "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L"}


def client_cert_details(obj: Any) -> tuple[str, set[str]]:
    """A TLS connection's verified client certificate (``obj``: its SSLObject or
    SSLSocket, or None) as Istio's gateways put it in x-forwarded-client-cert
    (Envoy's Hash, Subject, URI and DNS fields), and its subjectAltNames;
    ("", set()) without one."""
    cert_hash = identity.peer_cert_sha256(obj) if obj is not None else ""
    if not cert_hash:
        return "", set()
    cert = obj.getpeercert() or {}
    rdns = [f"{_SHORT_RDN.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    sans = cert.get("subjectAltName", ())
    return engine.client_cert_element(
        cert_hash=cert_hash, subject=",".join(reversed(rdns)),
        uris=[v for k, v in sans if k == "URI"], dns=[v for k, v in sans if k == "DNS"]
    ), {str(v) for _, v in sans}


# --------------------------------------------------------------------------- what goes upstream


def forwarded_headers(headers: Iterable[tuple[str, str]], *, client_ip: str,
                      ctx: telemetry.TraceContext, client_cert: str = ""
                      ) -> list[tuple[str, str]]:
    """The gateway's additions to the headers the engine sends on (pure): the
    trace context of the gateway's span in place of the incoming one, the
    client's address appended to x-forwarded-for, and x-forwarded-client-cert
    sanitized and set (``client_cert``: the client certificate's details, "" for
    none), as Istio's gateways' SANITIZE_SET."""
    xff = ""
    rest: list[tuple[str, str]] = []
    for n, v in headers:
        low = n.lower()
        if low == "x-forwarded-for":
            xff = f"{xff}, {v}" if xff else v
        elif low != engine.XFCC:
            rest.append((n, v))
    out = telemetry.with_trace(rest, ctx)
    out.append(("x-forwarded-for", f"{xff}, {client_ip}" if xff else client_ip))
    if client_cert:
        out.append((engine.XFCC, client_cert))
    return out


def destination_service(dest: routes.Destination) -> engine.Service:
    """The service a destination names, for telemetry (name and namespace of a
    cluster Service's FQDN ``name.ns.svc.<domain>``)."""
    parts = dest.host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return engine.Service(host=dest.host, port=dest.port, name=parts[0],
                              namespace=parts[1])
    return engine.Service(host=dest.host, port=dest.port)


def engine_pods(pods: Iterable[core_pb2.Pod], *, trust_domain: str) -> dict[str, engine.Pod]:
    """The pods requests may go to, by IP, as the engine sees them (a running
    pod wins over a finished one with its IP); none is local: the gateway is
    nobody's server side."""
    out: dict[str, engine.Pod] = {}
    for p in pods:
        ip = p.status.pod_ip
        if not ip or (ip in out and p.status.phase in ("Succeeded", "Failed")):
            continue
        ns, labels = p.metadata.namespace, dict(p.metadata.labels)
        out[ip] = engine.Pod(
            ip=ip, name=p.metadata.name, namespace=ns,
            workload=meshnames.workload_name(labels, p.metadata.name),
            principal=f"{trust_domain}/ns/{ns}/sa/{p.spec.service_account_name or 'default'}",
            node_local=False, meshed=_meshed(p), labels=labels)
    return out


def _meshed(pod: core_pb2.Pod) -> bool:
    labels = pod.metadata.labels
    return labels.get("shoal.dev/mesh") != "disabled" and \
        labels.get("istio.io/dataplane-mode") != "none"


def _no_route(why: str) -> routes.Action:
    return routes.Action(origin=why, destinations=(), retries=routes.NO_RETRIES)


# --------------------------------------------------------------------------- the data path


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


class _TlsClientEnd(relay.SocketEnd):
    """A client's TLS connection as an End: asyncio's TLS transport cannot keep
    a half-closed connection open (and warns when asked), so the client's EOF
    ends it."""

    def eof_received(self) -> bool:
        super().eof_received()
        return False


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tunnel = tunnel.Metrics(registry)
        self.rejected = Counter("shoal_gateway_rejected_connections",
                                "client TLS handshakes refused: no credential for the "
                                "server the name picks", ("port", "reason"),
                                registry=registry)


class Gateway:
    """Listeners per the plan; each client connection is served by the L7
    engine's client side, with :meth:`decide` routing its requests (see the
    module docstring)."""

    def __init__(self, *, me: Workload, trust_domain: str, listen_host: str,
                 pool: tunnel.Pool | None, registry: CollectorRegistry,
                 tracer: telemetry.Tracer | None = None, connect_timeout: float = 5.0,
                 rng: random.Random | None = None) -> None:
        self.me = me
        self.trust_domain = trust_domain
        self.listen_host = listen_host
        self.pool = pool
        self.tracer = tracer
        self.telemetry = telemetry.RequestTelemetry(registry)  # spans: self.tracer
        self.metrics = Metrics(registry)
        self.rng = rng or random.Random()
        self.plan = Plan()
        self.routes = RouteTable()
        self.clusters = upstream.Clusters()
        self.credentials = Credentials(me.namespace)
        self._pods: dict[str, engine.Pod] = {}  # by IP
        self.engine = engine.Engine(
            node=f"router~{me.ip}~{me.name}.{me.namespace}", route_table=lambda: self.routes,
            clusters=lambda: self.clusters, pod=self._pods_get, record=self.telemetry.record,
            open_tunnel=self._open_tunnel, rng=self.rng, connect_timeout=connect_timeout,
            flags_header=FLAGS_HEADER)
        # HTTP/1.1 to the engine, HTTP/2 (h2 by ALPN, or h2c) to its HTTP/2 proxy.
        self.dispatch = http2.Dispatch(self.engine)
        self._servers: dict[int, tuple[str, asyncio.Server]] = {}  # port -> (protocol, srv)
        self._bases: dict[int, ssl.SSLContext] = {}  # HTTPS port -> its listener's context
        self._connections: set[asyncio.Task[None]] = set()

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
        svcs, pod_list = list(services), list(pods)
        self.routes.update(list(virtual_services), svcs)
        self.clusters.update(services=svcs, endpoints=list(endpoints),
                             pods={key_of(p): p for p in pod_list},
                             destination_rules=list(destination_rules))
        self._pods = engine_pods(pod_list, trust_domain=self.trust_domain)
        self.credentials.update(secrets, (c for lst in new.listeners.values()
                                          for c in lst.credentials))
        for port in self._bases:
            self._ask_client_certs(port)

    async def apply(self) -> None:
        """Bind the plan's listeners that are not bound, close the others."""
        want = {p: lst.protocol for p, lst in self.plan.listeners.items()}
        for port, (protocol, srv) in list(self._servers.items()):
            if want.get(port) != protocol:
                srv.close()
                del self._servers[port]
                self._bases.pop(port, None)
                log.info("gateway: listener %d closed", port)
        loop = asyncio.get_running_loop()
        for port, protocol in want.items():
            if port in self._servers:
                continue
            end = _TlsClientEnd if protocol == HTTPS else relay.SocketEnd
            try:
                srv = await loop.create_server(
                    functools.partial(end, functools.partial(self._accepted, port=port)),
                    self.listen_host, port,
                    ssl=self._tls_for(port) if protocol == HTTPS else None,
                    reuse_address=True)
            except OSError as e:
                log.error("gateway: cannot listen on %s:%d: %s", self.listen_host, port, e)
                continue
            self._servers[port] = (protocol, srv)
            log.info("gateway: listening on %s:%d (%s)", self.listen_host, port, protocol)

    def _ask_client_certs(self, port: int) -> None:
        base, lst = self._bases.get(port), self.plan.listeners.get(port)
        if base is None or lst is None:
            return
        modes = {s.mode for s in lst.servers}
        base.verify_mode = ssl.CERT_REQUIRED if modes == {MUTUAL} else \
            ssl.CERT_OPTIONAL if modes & {MUTUAL, OPTIONAL_MUTUAL} else ssl.CERT_NONE

    def listening(self) -> dict[int, str]:
        return {port: protocol for port, (protocol, _) in self._servers.items()}

    def _tls_for(self, port: int) -> ssl.SSLContext:
        """The listener's context: its SNI callback hands each handshake the
        context of the server the name picks (the first server's without SNI)."""
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.minimum_version = ssl.TLSVersion.TLSv1_2
        base.set_alpn_protocols(ALPN)  # the same as every credential's context
        # OpenSSL keeps the verify mode of the context a handshake starts with
        # (switching contexts by name changes the certificate and the trusted
        # CAs, not whether a client certificate is asked for): the listener's
        # asks when a server of its port wants one (see _client_refused).
        self._bases[port] = base
        self._ask_client_certs(port)

        def pick(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            lst = self.plan.listeners.get(port)
            if lst is None or not lst.servers:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            found = lst.server_for(name) if name else None
            server = found[0] if found is not None else lst.servers[0]
            tls = server.tls
            ctx = self.credentials.get(tls) if tls is not None else None
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
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.dispatch.close()

    # -- the engine's views --

    def _pods_get(self, ip: str) -> engine.Pod | None:
        return self._pods.get(ip)

    async def _open_tunnel(self, source: engine.Peer, dst: engine.Pod, port: int
                           ) -> relay.End:
        """A tunnel stream to ``dst``'s agent, as the gateway's identity."""
        if self.pool is None:
            raise tunnel.TunnelError("no tunnel pool (the gateway has no identity)")
        return await self.pool.open(source=(source.namespace, source.service_account),
                                    destination=(dst.ip, port),
                                    expected=spiffe.parse(spiffe.SCHEME + dst.principal),
                                    source_ip=self.me.ip)

    # -- client connections: keep-alive, each request routed by decide() --

    def _accepted(self, end: relay.SocketEnd, *, port: int) -> None:
        task = asyncio.ensure_future(self._serve(end, port))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, end: relay.SocketEnd, port: int) -> None:
        t = end.transport
        peer = t.get_extra_info("peername") if t is not None else None
        client_ip = str(peer[0]) if peer else ""
        obj = t.get_extra_info("ssl_object") if t is not None else None
        client_cert, names = client_cert_details(obj)
        refused = self._client_refused(obj, client_cert, names)
        if refused is not None:
            reason, why = refused
            log.info("gateway: a client on port %d refused: %s", port, why)
            self.metrics.rejected.labels(str(port), reason).inc()
            end.close()
            return
        source = engine.Peer(ip=client_ip, workload=self.me.workload,
                             namespace=self.me.namespace, principal=self._principal(),
                             service_account=self.me.service_account, labels=self.me.labels,
                             meshed=True)
        front = functools.partial(self._route, port=port, tls=obj is not None,
                                  client_ip=client_ip,
                                  client_cert=client_cert)
        try:
            await self.dispatch.outbound(end, source=source, front=front,
                                         service=engine.Service(host="", port=port))
        except Exception:
            log.exception("gateway: a client connection on port %d failed", port)
            end.close()

    def _client_refused(self, obj: Any, client_cert: str, names: set[str]
                        ) -> tuple[str, str] | None:
        """(metric reason, why) a TLS client must go, None if it may stay: the
        server its name picked is MUTUAL and it showed no certificate (when the
        port also has servers that do not require one, the handshake only asked
        for it), or none of its names is one of the server's subjectAltNames."""
        picked = self.credentials.tls_of(obj.context) if obj is not None else None
        if picked is None:
            return None
        if picked.mode == MUTUAL and not client_cert:
            return "no_client_certificate", "TLS mode MUTUAL and no client certificate"
        want = set(picked.subject_alt_names)
        if want and client_cert and not names & want:
            return "subject_alt_names", ("the client certificate names none of "
                                         + ", ".join(sorted(want)))
        return None

    def _principal(self) -> str:
        return f"{self.trust_domain}/ns/{self.me.namespace}/sa/{self.me.service_account}"

    def decide(self, req: routes.Request, *, r: float) -> routes.Action:
        """The route a request to listener ``req.port`` takes, its destination
        chosen by ``r`` (the one left in ``destinations``); none left means 404
        NR, and ``origin`` says why (pure but for the tables)."""
        lst = self.plan.listeners.get(req.port)
        host = bare_host(req.authority)
        found = lst.server_for(host) if lst is not None else None
        if found is None:
            return _no_route(f"no server of port {req.port} serves host {host!r}")
        server, server_host = found
        if server.https_redirect and req.scheme != "https":
            return routes.Action(origin=f"{server.label} httpsRedirect", destinations=(),
                                 redirect=routes.Redirect(scheme="https", authority=host),
                                 retries=routes.NO_RETRIES)
        vs = self.routes.virtual_service(host, gateway=server.gateway)
        if vs is None or not server_host.admits(vs.namespace):
            return _no_route(f"no VirtualService bound to {server.gateway} for {host!r}")
        action = self.routes.route(req, host, req.port, gateway=server.gateway)
        if action.redirect is not None:
            return action
        dest = action.choose(r)
        return dataclasses.replace(action, destinations=(dest,) if dest is not None else ())

    def _route(self, req: routes.Request, headers: list[tuple[str, str]], *, port: int,
               tls: bool, client_ip: str, client_cert: str = "") -> engine.Routed:
        """The engine's front: route by :meth:`decide`, open the gateway's span
        (a child of the incoming context, else a new root), and add the
        forwarding headers."""
        if tls:
            req = dataclasses.replace(req, scheme="https")
        action = self.decide(req, r=self.rng.random())
        dest = action.destinations[0] if action.destinations else None
        if dest is None and action.redirect is None:
            log.info("gateway: %s %s%s: 404 NR (%s)", req.method, req.authority, req.path,
                     action.origin)
        span = telemetry.hop_context(telemetry.TraceContext.from_headers(req.headers),
                                     self.tracer)
        return engine.Routed(
            request=req, action=action,
            service=destination_service(dest) if dest is not None else
            engine.Service(host="", port=port),
            headers=forwarded_headers(headers, client_ip=client_ip, ctx=span,
                                      client_cert=client_cert),
            finish=functools.partial(self._finish, span=span, port=port, scheme=req.scheme))

    def _finish(self, rec: telemetry.RequestRecord, *, span: telemetry.TraceContext,
                port: int, scheme: str) -> None:
        """A request's record, completed with the gateway's span (then sent)."""
        rec.trace_id, rec.span_id = span.trace_id, span.span_id
        rec.source_app = self.me.labels.get("app", telemetry.UNKNOWN)
        dst = self._pods.get(rec.upstream.rsplit(":", 1)[0]) if rec.upstream else None
        if dst is not None:
            rec.destination_app = dst.labels.get("app", telemetry.UNKNOWN)
            rec.destination_version = dst.labels.get("version", telemetry.UNKNOWN)
        if self.tracer is None:
            return
        tags = {"http.method": rec.method, "http.url": f"{scheme}://{rec.authority}{rec.path}",
                "http.status_code": str(rec.response_code),
                "response_flags": rec.response_flags or "-",
                "istio.canonical_service": self.me.workload,
                "istio.namespace": self.me.namespace, "guid:x-request-id": rec.request_id,
                "upstream_cluster": rec.upstream_cluster or "-", "node_id": self.engine.node}
        self.tracer.finish(span, name=f"{bare_host(rec.authority)}:{port}"
                           f"{rec.path.partition('?')[0]}", kind="SERVER",
                           start=rec.start_time, duration_s=rec.duration_s, tags=tags,
                           service=f"{self.me.workload}.{self.me.namespace}")


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
    r.add_argument("--trace-sampling", type=argtypes.percent, default=1.0,
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
