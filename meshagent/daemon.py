"""``shoal-meshagent run``: one mesh agent per node, beside the nodeagent.

    start: the node's client config (the nodeagent's node.conf) -> listeners bound
           (outbound 15001, inbound 15006, tunnel 15008, DNS 15053, monitoring
           15020: a bad port fails here) -> informers (Pods, Services, Endpoints,
           Namespaces) synced -> ready -> per local pod: its workload certificate
           (signed by the apiserver's CA for this node), then its capture rules
           (with --capture), kept on a loop
    stop (SIGTERM): capture rules removed (unless --keep-rules-on-exit), listeners
           and tunnel connections closed.

Every pod is watched, not only this node's: a connection to a pod elsewhere
needs that pod's node and service account (the SPIFFE ID its agent must
prove). A pod is captured only once the agent holds a certificate for its
service account, so its first connection never waits for signing.

Readiness (/readyz): ``listeners``, ``informers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Gauge

from meshagent import (
    admin,
    capture,
    dns,
    egress,
    identity,
    meshhost,
    policy,
    proxy,
    rebuilding,
    relay,
    tunnel,
)
from meshagent.l7 import destservice, telemetry
from meshagent.l7 import engine as l7engine
from meshagent.l7 import http2 as l7http2
from meshagent.l7 import routes as l7routes
from meshagent.l7 import upstream as l7upstream
from meshagent.routing import Address, Route, build_routes
from shoal import config as configmod
from shoal import errors, eventloop, meshnames, meshprotocol, netfilter, sdnotify, spiffe
from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer, key_of
from shoal.kinds import builtin_kinds
from shoal.monitoring import MonitoringServer, Readiness
from shoal.queueing import wait_set

log = logging.getLogger(__name__)


_KINDS = builtin_kinds()
DEFAULT_CLIENT_CONFIG = Path("/var/lib/shoal/nodeagent/node.conf")
WORKLOAD_CACHE = 4096  # addresses whose workload lookups are kept (see MeshAgent)
_T = TypeVar("_T")


def _memo(cache: dict[str, _T], key: str, make: Callable[[str], _T]) -> _T:
    """``cache[key]``, made by ``make`` the first time (the cache is emptied when
    it holds WORKLOAD_CACHE keys)."""
    try:
        return cache[key]
    except KeyError:
        pass
    found = make(key)
    if len(cache) >= WORKLOAD_CACHE:
        cache.clear()
    cache[key] = found
    return found


@dataclass(frozen=True)
class MeshConfig:
    node_name: str
    client_config: Path = DEFAULT_CLIENT_CONFIG
    listen_host: str = "0.0.0.0"
    outbound_port: int = capture.OUTBOUND_PORT
    inbound_port: int = capture.INBOUND_PORT
    dns_port: int = capture.DNS_PORT
    tunnel_port: int = capture.TUNNEL_PORT
    trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN
    root_namespace: str = policy.DEFAULT_ROOT_NAMESPACE  # mesh-wide policies live here
    metrics_listen: str = "0.0.0.0:15020"
    admin_listen: str = f"0.0.0.0:{admin.ADMIN_PORT}"  # "" = no admin API
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    cluster_domain: str = dns.DEFAULT_DOMAIN
    dns_ip: str = ""  # the node IP pods send DNS to; "" = no DNS capture
    upstream_dns: str = ""
    capture: bool = False
    iptables: str = ""  # binary; "" = detect
    keep_rules_on_exit: bool = False
    reconcile_interval: float = 5.0  # drift checks of the capture rules
    zipkin_endpoint: str = ""  # http://HOST:PORT of a Zipkin v2 collector; "" = no spans
    # One JSON line per L7 request on the logger "meshagent.access". Off by default,
    # as Istio's default profile (meshConfig.accessLogFile empty); the lab turns it on.
    access_log: bool = False
    trace_sampling: float = 100.0  # percent of new traces sampled (the CLI's default: 1)
    # meshagent.egress: ALLOW_ANY or REGISTRY_ONLY (a namespace label overrides it)
    outbound_traffic_policy: str = egress.ALLOW_ANY
    egress_capture: bool = True  # capture pods' TCP to any address, not only the CIDRs
    # A mesh-only host (meshagent.meshhost): no pods; its workloads are the
    # WorkloadEntries labelled shoal.dev/mesh-host: <node_name>.
    mesh_host: bool = False
    # After a change of what the routing tables derive from, they are rebuilt this
    # much later, once for a burst of changes (meshagent.rebuilding); a connection
    # meanwhile reads the previous tables, never older than this.
    rebuild_delay: float = 0.005


def captured(pod: core_pb2.Pod, namespaces: Mapping[str, core_pb2.Namespace]) -> bool:
    """Whether this pod's traffic is captured (by its node's agent) (pure)."""
    if pod.spec.host_network or not pod.status.pod_ip:
        return False
    if pod.status.phase in ("Succeeded", "Failed") or pod.metadata.deletion_timestamp.seconds:
        return False
    ns = namespaces.get(pod.metadata.namespace)
    ns_labels = dict(ns.metadata.labels) if ns is not None else {}
    return not capture.opted_out(dict(pod.metadata.labels)) and not capture.opted_out(ns_labels)


def service_account(pod: core_pb2.Pod) -> str:
    return str(pod.spec.service_account_name or "default")


def workload_name(pod: core_pb2.Pod) -> str:
    return meshnames.workload_name(pod.metadata.labels, pod.metadata.name)


class MeshAgent:
    def __init__(self, config: MeshConfig, client: AsyncClient, *,
                 signer: identity.Signer | None = None,
                 original_dst: proxy.OriginalDst = proxy.original_dst,
                 rebuild_timer: rebuilding.Timer | None = None) -> None:
        self.config = config
        self.client = client
        self.registry = CollectorRegistry()
        self.readiness = Readiness("listeners", "informers")
        # Set once every informer has synced: the listeners are bound from start(),
        # but decide nothing before (see DataPath.wait_ready).
        self.synced = asyncio.Event()
        host, _, port = config.metrics_listen.rpartition(":")
        self.monitoring = MonitoringServer(host=host or "0.0.0.0", port=int(port),
                                           registry=self.registry, readiness=self.readiness)
        self.pauses = eventloop.PauseMetrics(self.registry)
        self.pods = Informer(client, core_pb2.Pod, indexers={
            "ip": lambda p: [p.status.pod_ip] if p.status.pod_ip else [],
            "node": lambda p: [p.spec.node_name] if p.spec.node_name else []})
        self.services = Informer(client, core_pb2.Service)
        self.endpoints = Informer(client, core_pb2.Endpoints)
        self.namespaces = Informer(client, core_pb2.Namespace)
        self.peer_auths = Informer(client, security_pb2.PeerAuthentication)
        self.authz = Informer(client, security_pb2.AuthorizationPolicy)
        self.service_entries = Informer(client, traffic_pb2.ServiceEntry)
        self.workload_entries = Informer(client, traffic_pb2.WorkloadEntry, indexers={
            "ip": lambda w: [w.spec.address] if w.spec.address else []})
        self._registry = egress.Registry()
        self._resolved: dict[str, tuple[str, ...]] = {}
        self.authz.add_handlers(on_add=self._check_policy,
                                on_update=lambda _old, new: self._check_policy(new))
        # workload(ip) and l7_pod(ip) are asked for on every connection and request:
        # kept until a pod, namespace or WorkloadEntry changes (at most
        # WORKLOAD_CACHE addresses, for the egress traffic's many non-pod ones).
        self._workloads: dict[str, proxy.Workload | None] = {}
        self._l7_pods: dict[str, l7engine.Pod | None] = {}
        for who in (self.pods, self.namespaces, self.workload_entries):
            who.add_handlers(on_add=self._forget_workloads, on_update=self._forget_workloads,
                             on_delete=self._forget_workloads)
        self._routes: dict[Address, Route] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        self.l4_tables = rebuilding.Rebuilder(self._rebuild, delay=config.rebuild_delay,
                                              timer=rebuild_timer, name="L4 routes")
        for inf in (self.services, self.endpoints, self.service_entries,
                    self.workload_entries):
            inf.add_handlers(on_add=self._changed, on_update=self._changed2,
                             on_delete=self._changed)
        # L7: VirtualServices (routes), DestinationRules (clusters), and which
        # service and pod ports speak HTTP; rebuilt soon after a change.
        self.virtual_services = Informer(client, traffic_pb2.VirtualService)
        self.destination_rules = Informer(client, traffic_pb2.DestinationRule)
        self.route_table = l7routes.RouteTable(domain=config.cluster_domain)
        self.clusters = l7upstream.Clusters(root_namespace=config.root_namespace,
                                            domain=config.cluster_domain)
        self._http_services: dict[Address, l7engine.Service] = {}
        self._http_pod_ports: set[Address] = set()
        # (pod IP, target port) -> its Services: the destination reporter's
        # destination_service (l7 destservice).
        self._dest_services = destservice.Index()
        self.l7_tables = rebuilding.Rebuilder(self._l7_rebuild, delay=config.rebuild_delay,
                                              timer=rebuild_timer, name="L7 tables")
        self._rng = random.Random()
        l7_sources: list[Informer[Any]] = [self.services, self.endpoints,
                                           self.service_entries, self.pods,
                                           self.workload_entries,
                                           self.virtual_services, self.destination_rules]
        for l7_inf in l7_sources:
            l7_inf.add_handlers(on_add=self._l7_changed, on_update=self._l7_changed2,
                             on_delete=self._l7_changed)
        self.identities = identity.IdentityManager(
            signer=signer or identity.GrpcSigner(client.channel),
            trust_domain=config.trust_domain)
        self.metrics = proxy.Metrics(self.registry)
        # L7 requests: Istio's request metrics, the access log, and spans when a
        # collector is configured (the engine records through self.telemetry).
        self.tracer = (telemetry.Tracer(config.zipkin_endpoint,
                                        local_service=f"meshagent.{config.node_name}",
                                        registry=self.registry,
                                        sampling=config.trace_sampling)
                       if config.zipkin_endpoint else None)
        self.telemetry = telemetry.RequestTelemetry(self.registry, tracer=self.tracer,
                                                    access_log=config.access_log)
        ids = tunnel.Identities(self.identities)
        self.pool = tunnel.Pool(identities=ids, metrics=self.metrics.tunnel,
                                port=config.tunnel_port)
        self.engine = l7engine.Engine(node=config.node_name, route_table=self.l7_routes,
                                      clusters=self.l7_clusters, pod=self.l7_pod,
                                      record=self.telemetry.record,
                                      open_tunnel=self._open_tunnel,
                                      authorize=self.authorize_http, tracer=self.tracer,
                                      service_of=self.destination_service)
        # HTTP/1.1 to the engine, HTTP/2 (h2c, gRPC) to its HTTP/2 proxy, by the first bytes.
        self.http = l7http2.Dispatch(self.engine)
        self.path = proxy.DataPath(node=config.node_name, trust_domain=config.trust_domain,
                                   routes=self.routes, pod_cidr=config.pod_cidr,
                                   workload=self.workload, metrics=self.metrics,
                                   pool=self.pool, admit=self.admit, ready=self.synced,
                                   egress=self.egress, cluster_domain=config.cluster_domain,
                                   l7=proxy.L7(engine=self.http, service=self.http_service,
                                               http_port=self.http_pod_port,
                                               tcp_pick=self.tcp_pick, served=self.served))
        self.outbound = proxy.Listener(direction="outbound", host=config.listen_host,
                                       port=config.outbound_port, path=self.path,
                                       original_dst=original_dst)
        self.inbound = proxy.Listener(direction="inbound", host=config.listen_host,
                                      port=config.inbound_port, path=self.path,
                                      original_dst=original_dst)
        self.tunnel = tunnel.Server(host=config.listen_host, port=config.tunnel_port,
                                    identities=ids, metrics=self.metrics.tunnel,
                                    local_identity=self.local_identity,
                                    handle=self.path.inbound_tunnel,
                                    original_dst=original_dst, ready=self.path.wait_ready)
        # On a mesh-only host the capture redirects the host's own queries (OUTPUT):
        # answered from 127.0.0.1, the address they were redirected to, so the
        # replies match the connection tracking and reach the asking process.
        self.dns = dns.DNSServer(host="127.0.0.1" if config.mesh_host else config.listen_host,
                                 port=config.dns_port,
                                 names=self.names, namespace_of=self.namespace_of,
                                 domain=config.cluster_domain, upstream=config.upstream_dns,
                                 ready=self.path.wait_ready)
        self.captured_pods = Gauge("shoal_mesh_captured_pods",
                                   "pods whose traffic this agent captures",
                                   registry=self.registry)
        self.capture_rewrites = Gauge(
            "shoal_mesh_capture_rewrites", "times the capture rules were (re)written: "
            "changes of the captured pods, and drift (a flushed chain, a moved jump)",
            registry=self.registry)
        self.cert_expiry = Gauge(
            "shoal_mesh_certificate_expiry_seconds", "when each workload certificate "
            "expires (unix time)", ("spiffe_id",), registry=self.registry)
        generation = Gauge("shoal_mesh_config_generation", "the config generation applied: "
                           "the lowest resourceVersion up to which every watched resource's "
                           "events are applied", registry=self.registry)
        generation.set_function(lambda: float(self.generations().overall))
        self.capture: capture.Capture | None = None
        self.admin = (admin.AdminServer(source=self, node_name=config.node_name,
                                        pki_dir=config.client_config.parent / "pki",
                                        listen=config.admin_listen)
                      if config.admin_listen else None)
        self._applied_at = 0.0
        self._resources = {inf: _KINDS.by_message(inf.kind()).qualified_resource
                           for inf in self.informers()}
        for inf in self.informers():
            inf.add_handlers(on_add=self._applied, on_update=lambda _a, _b: self._applied(_a),
                             on_delete=self._applied)

    # -- views for the data path ---------------------------------------------
    # Informer handlers mark them dirty; meshagent.rebuilding rebuilds them once per
    # burst of changes, off the connection path, which reads what is built.

    def mark_synced(self) -> None:
        """Every informer has listed: build the tables, rebuild them as changes come
        from now on, and let the data path decide."""
        self.l4_tables.start()
        self.l7_tables.start()
        self.synced.set()

    def _changed(self, _obj: object) -> None:
        self.l4_tables.mark()

    def _changed2(self, _old: object, _new: object) -> None:
        self.l4_tables.mark()

    def _rebuild(self) -> None:
        eps = {key_of(e): e for e in self.endpoints.list()}
        services = self.services.list()
        self._routes = meshhost.with_workload_entries(
            build_routes(services, eps), services, self.workload_entries.list())
        names = dns.build_names(services, eps, domain=self.config.cluster_domain)
        ses = self.service_entries.list()
        for host, ips in egress.service_entry_names(ses).items():
            names.setdefault(host, ips)
        self._names = names
        self._registry = egress.build_registry(ses, self._resolved,
                                               self.workload_entries.list())

    def routes(self) -> dict[Address, Route]:
        self.l4_tables.current()
        return self._routes

    # -- the L7 views --

    def _l7_changed(self, _obj: object) -> None:
        self.l7_tables.mark()

    def _l7_changed2(self, _old: object, _new: object) -> None:
        self.l7_tables.mark()

    def _l7_rebuild(self) -> None:
        services = self.services.list()
        endpoints = self.endpoints.list()
        entries, ses = self.workload_entries.list(), self.service_entries.list()
        self.route_table.update(self.virtual_services.list(), services, ses)
        for key, why in self.route_table.errors.items():
            log.warning("VirtualService %s left out: %s", key, why)
        self.clusters.update(services=services, endpoints=endpoints, pods=self.pods.list(),
                             destination_rules=self.destination_rules.list(),
                             workload_entries=entries, service_entries=ses,
                             resolved=self._resolved)
        http_services, self._http_pod_ports = http_ports(
            services, endpoints, domain=self.config.cluster_domain,
            workload_entries=entries)
        for dst, svc in service_entry_http_ports(ses, self._resolved, entries).items():
            http_services.setdefault(dst, svc)
        self._http_services = http_services
        self._dest_services = destservice.build_index(
            services, endpoints, domain=self.config.cluster_domain, service_entries=ses,
            workload_entries=entries)

    def l7_routes(self) -> l7routes.RouteTable:
        self.l7_tables.current()
        return self.route_table

    def l7_clusters(self) -> l7upstream.Clusters:
        self.l7_tables.current()
        return self.clusters

    def http_service(self, dst: Address) -> l7engine.Service | None:
        """The HTTP service port (HTTP/1.1, HTTP/2 or gRPC) at ClusterIP:port."""
        self.l7_tables.current()
        return self._http_services.get(dst)

    def http_pod_port(self, dst: Address) -> bool:
        self.l7_tables.current()
        return dst in self._http_pod_ports

    def destination_service(self, *, dst: l7engine.Pod, port: int, host: str,
                            source_namespace: str) -> destservice.ServiceName:
        """The Service a request to local pod ``dst``:``port`` was for (the
        destination reporter's destination_service)."""
        self.l7_tables.current()
        return destservice.resolve(self._dest_services, ip=dst.ip, port=port,
                                   namespace=dst.namespace, host=host,
                                   source_namespace=source_namespace)

    def served(self, ip: str, port: int, namespace: str, source_namespace: str) -> str:
        """The Service ("namespace/name") a TCP connection to local pod ``ip``:``port``
        is for: the L4 destination reporter's destination_service."""
        self.l7_tables.current()
        found = destservice.resolve(self._dest_services, ip=ip, port=port,
                                    namespace=namespace, host="",
                                    source_namespace=source_namespace)
        return f"{found.namespace}/{found.name}" if found.host else ""

    def tcp_pick(self, route: Route, dst: Address, src: proxy.Workload | None
                 ) -> Address | None:
        """A TCP service connection's endpoint by its VirtualService's weighted ``tcp``
        route (None when there is none: the L4 balancer picks)."""
        table = self.l7_routes()
        if not table.has_tcp_routes:
            return None
        host = f"{route.name}.{route.namespace}.svc.{self.config.cluster_domain}"
        action = table.tcp_route(host, dst[1], source_labels=src.labels if src else {},
                                 source_namespace=src.namespace if src else "")
        dest = action.choose(self._rng.random()) if action is not None else None
        if dest is None:
            return None
        cluster = self.clusters.get(dest.host, dest.port, dest.subset)
        ep = cluster.pick(headers={}, source_ip=src.ip if src else "") if cluster else None
        return (ep.ip, ep.port) if ep is not None else None

    def _forget_workloads(self, *_objs: object) -> None:
        self._workloads.clear()
        self._l7_pods.clear()

    def l7_pod(self, ip: str) -> l7engine.Pod | None:
        return _memo(self._l7_pods, ip, self._l7_pod)

    def _l7_pod(self, ip: str) -> l7engine.Pod | None:
        w = self.workload(ip)
        return self.path.pod(w) if w is not None else None

    async def _open_tunnel(self, source: l7engine.Peer, dst: l7engine.Pod,
                           port: int) -> relay.End:
        return await self.pool.open(source=(source.namespace, source.service_account),
                                    destination=(dst.ip, port),
                                    expected=spiffe.parse(spiffe.SCHEME + dst.principal),
                                    source_ip=source.ip)

    def authorize_http(self, *, source: l7engine.Peer, dst: l7engine.Pod, port: int,
                       mtls: bool, request: l7engine.HttpRequest) -> tuple[bool, str]:
        """An HTTP request to a local pod: PeerAuthentication (STRICT refuses
        plaintext), then AuthorizationPolicy with the request's attributes."""
        root = self.config.root_namespace
        target = policy.Target(namespace=dst.namespace, labels=dst.labels, port=port,
                               ip=dst.ip)
        reason = ""
        if not mtls and policy.mtls_mode(self.peer_auths.list(), target,
                                         root_namespace=root) == policy.STRICT:
            reason = "STRICT mTLS: plaintext refused"
        else:
            peer = policy.Peer(source.principal if mtls else "",
                               source.namespace if mtls else "", source.ip)
            v = policy.authorize(self.authz.list(), peer, target, root_namespace=root,
                                 request=policy.HttpRequest(
                                     method=request.method, path=request.path,
                                     host=request.host, headers=request.headers))
            if v.allowed:
                return True, ""
            reason = v.reason
        self.metrics.denied.labels("destination", dst.workload, dst.namespace,
                                   source.principal or "unknown", reason).inc()
        return False, reason

    def names(self) -> dict[str, tuple[str, ...]]:
        self.l4_tables.current()
        return self._names

    def egress(self, src: proxy.Workload | None, dst: Address) -> egress.Egress:
        """A connection out of the cluster: a ServiceEntry's, or the outbound
        traffic policy of the source's namespace decides."""
        self.l4_tables.current()
        if self._entry_by_ip(dst[0]) is not None:  # a WorkloadEntry: in the mesh
            return egress.Egress(True, dst)
        mode = self.config.outbound_traffic_policy
        if src is not None and (ns := self._namespace(src.namespace)) is not None:
            mode = egress.policy_for(mode, dict(ns.metadata.labels))
        return egress.decide_egress(self._registry, mode, dst)

    async def _keep_resolved(self) -> None:
        """DNS ServiceEntries' hosts, resolved through the upstream DNS every 30 s."""
        while True:
            hosts = sorted({h for se in self.service_entries.list()
                            for h in egress.dns_hosts(se)})
            resolved = await egress.resolve(hosts, upstream=self.config.upstream_dns)
            if resolved != self._resolved:
                self._resolved = resolved
                self.l4_tables.mark()
                self.l7_tables.mark()
            await asyncio.sleep(30.0)

    def _pod_by_ip(self, ip: str) -> core_pb2.Pod | None:
        # Several pods may have had this IP; the running one counts.
        pods = [p for p in self.pods.by_index("ip", ip)
                if p.status.phase not in ("Succeeded", "Failed")]
        return pods[0] if pods else None

    def _entry_by_ip(self, ip: str) -> traffic_pb2.WorkloadEntry | None:
        entries = sorted(self.workload_entries.by_index("ip", ip), key=key_of)
        return entries[0] if entries else None

    def namespace_of(self, ip: str) -> str | None:
        pod = self._pod_by_ip(ip)
        if pod is None:
            we = self._entry_by_ip(ip)
            return str(we.metadata.namespace) if we is not None else None
        return str(pod.metadata.namespace)

    def _namespace(self, name: str) -> core_pb2.Namespace | None:
        return self.namespaces.get("", name)

    def workload(self, ip: str) -> proxy.Workload | None:
        return _memo(self._workloads, ip, self._workload)

    def _workload(self, ip: str) -> proxy.Workload | None:
        pod = self._pod_by_ip(ip)
        if pod is None:
            we = self._entry_by_ip(ip)
            if we is None:
                return None
            host = meshhost.mesh_host_of(we)
            return proxy.Workload(ip=ip, name=we.metadata.name, namespace=we.metadata.namespace,
                                  service_account=meshhost.service_account_of(we),
                                  workload=meshhost.workload_name_of(we), node=host,
                                  meshed=bool(host), labels=dict(we.spec.labels))
        ns = pod.metadata.namespace
        nss = {ns: n} if (n := self._namespace(ns)) is not None else {}
        return proxy.Workload(ip=ip, name=pod.metadata.name, namespace=ns,
                              service_account=service_account(pod),
                              workload=workload_name(pod), node=pod.spec.node_name,
                              meshed=captured(pod, nss), labels=dict(pod.metadata.labels))

    def local_identity(self, ip: str) -> tuple[str, str] | None:
        """(namespace, service account) of this node's pod at ``ip``, for the tunnel."""
        w = self.workload(ip)
        if w is None or w.node != self.config.node_name:
            return None
        return w.namespace, w.service_account

    def admit(self, *, principal: str, namespace: str, ip: str, dst: proxy.Workload,
              port: int, mtls: bool) -> proxy.Verdict:
        """PeerAuthentication (STRICT refuses plaintext), then AuthorizationPolicy."""
        root = self.config.root_namespace
        target = policy.Target(namespace=dst.namespace, labels=dst.labels, port=port,
                               ip=dst.ip)
        if not mtls and policy.mtls_mode(self.peer_auths.list(), target,
                                         root_namespace=root) == policy.STRICT:
            return proxy.Verdict(False, "STRICT mTLS: plaintext refused")
        v = policy.authorize(self.authz.list(), policy.Peer(principal, namespace, ip), target,
                             root_namespace=root)
        return proxy.Verdict(v.allowed, "" if v.allowed else v.reason)

    @staticmethod
    def _check_policy(p: security_pb2.AuthorizationPolicy) -> None:
        for note in policy.enforcement_notes(p):
            (log.warning if note.warning else log.info)(
                "AuthorizationPolicy %s: %s", key_of(p), note.text)

    def local_entries(self) -> list[traffic_pb2.WorkloadEntry]:
        """On a mesh-only host: the WorkloadEntries naming it."""
        if not self.config.mesh_host:
            return []
        return [w for w in self.workload_entries.list()
                if meshhost.mesh_host_of(w) == self.config.node_name and w.spec.address]

    def local_pods(self) -> list[core_pb2.Pod]:
        """This node's pods whose traffic goes through the mesh."""
        nss = {n.metadata.name: n for n in self.namespaces.list()}
        return [p for p in self.pods.by_index("node", self.config.node_name)
                if captured(p, nss)]

    def captured_ips(self) -> list[str]:
        """Every local mesh workload with an address is captured, whether or not its
        certificate is signed yet: as ztunnel does, a connection waits for the
        certificate (signed on demand) and fails closed if none can be had, so
        nothing reaches a pod, or leaves it, around the mesh meanwhile."""
        if self.config.mesh_host:
            return sorted(w.spec.address for w in self.local_entries() if w.spec.address)
        return sorted(p.status.pod_ip for p in self.local_pods() if p.status.pod_ip)

    # -- what the admin API reports (admin.AdminSource) -----------------------

    def _applied(self, _obj: object) -> None:
        self._applied_at = time.time()

    def generations(self) -> admin.Generations:
        """Config is applied as it arrives (policy is read from the caches per
        connection, the routing tables are rebuilt within ``rebuild_delay`` of a
        change; capture follows pod events), so an informer's resourceVersion is
        what this agent has applied of that resource."""
        return admin.generations_from(
            {self._resources[inf]: inf.resource_version for inf in self.informers()},
            applied_at=self._applied_at)

    def certificate_rows(self) -> list[identity.CertRow]:
        return identity.certificate_rows(self.identities)

    async def netfilter_report(self) -> admin.NetfilterReport:
        cap = self.capture
        if cap is None:
            return admin.NetfilterReport(backend="", error="capture is off")
        return admin.netfilter_report(backend=cap.iptables.commands.binary,
                                      want=capture.plan_rules(cap.pod_ips, cap.config),
                                      save=await cap.iptables.save())

    def connections(self) -> list[admin.ConnectionRow]:
        def addr(a: Address) -> str:
            return f"{a[0]}:{a[1]}"
        return [admin.ConnectionRow(
            direction=c.direction, source_ip=c.source_ip,
            destination=addr(c.original or c.destination), mode=c.mode,
            source_workload=c.source_workload, source_namespace=c.source_namespace,
            source_principal=c.source_principal, destination_service=c.destination_service,
            endpoint=addr(c.destination), destination_workload=c.destination_workload,
            destination_namespace=c.destination_namespace, peer_principal=c.peer_principal,
            tls_version=c.tls_version, cipher=c.cipher, bytes_sent=c.sent,
            bytes_received=c.received, opened_at=c.opened)
            for c in list(self.path.live.values())]

    # -- lifecycle -----------------------------------------------------------

    def informers(self) -> list[Informer[Any]]:
        return [self.pods, self.services, self.endpoints, self.namespaces, self.peer_auths,
                self.authz, self.service_entries, self.workload_entries, self.virtual_services,
                self.destination_rules]

    async def start(self) -> None:
        """Bind every port (a bad one fails here)."""
        await self.monitoring.start()
        await self.outbound.start()
        await self.inbound.start()
        await self.tunnel.start()
        await self.dns.start()
        if self.admin is not None:
            await self.admin.start()
        self.readiness.set("listeners")

    async def _keep_identities(self, changed: asyncio.Event, ready: asyncio.Event) -> None:
        """A certificate for each service account of a local mesh pod; the ones no
        pod uses any more are forgotten. Runs again when ``changed`` is set (pods or
        namespaces changed); sets ``ready`` when a certificate is signed."""
        pending: dict[tuple[str, str], asyncio.Task[None]] = {}

        async def fetch(key: tuple[str, str]) -> None:
            try:
                cert = await self.identities.get(*key)
                self.cert_expiry.labels(str(cert.spiffe_id)).set(cert.not_after)
            except errors.ShoalError as e:
                log.warning("no certificate for %s/%s yet: %s", *key, e)
            ready.set()

        try:
            while True:
                changed.clear()
                wanted = {(str(p.metadata.namespace), service_account(p))
                          for p in self.local_pods()}
                wanted |= {(str(w.metadata.namespace), meshhost.service_account_of(w))
                           for w in self.local_entries()}
                held = {(str(i.namespace), str(i.service_account))
                        for i, _, _ in self.identities.identities()}
                for key in held - wanted:
                    self.identities.forget(*key)
                    with contextlib.suppress(KeyError):
                        self.cert_expiry.remove(str(spiffe.SpiffeId(
                            self.config.trust_domain, *key)))
                for key in wanted - held:
                    if key not in pending or pending[key].done():
                        pending[key] = asyncio.create_task(fetch(key))
                # Also every 10 s: a failed signing is retried by the manager,
                # and this picks up its result.
                await wait_set(changed, 10.0)
                ready.set()
        finally:
            for t in pending.values():
                t.cancel()

    async def _keep_capture(self, refresh: asyncio.Event) -> None:
        cfg = self.config
        binary = cfg.iptables or await capture.detect_backend()
        log.info("mesh capture: iptables backend %s", binary)
        cap_type: type[capture.Capture] = capture.Capture
        extra: dict[str, Any] = {}
        if cfg.mesh_host:
            cap_type, extra = capture.HostCapture, {"agent_uid": os.geteuid()}
        self.capture = cap_type(
            config=capture.CaptureConfig(pod_cidr=cfg.pod_cidr, service_cidr=cfg.service_cidr,
                                         dns_ip=cfg.dns_ip, outbound_port=self.outbound.port,
                                         inbound_port=self.inbound.port,
                                         dns_port=self.dns.port,
                                         tunnel_port=self.tunnel.port,
                                         egress=cfg.egress_capture),
            iptables=capture.IptablesNat(binary=binary), interval=cfg.reconcile_interval,
            changes=await netfilter.watch_changes(binary, what="mesh capture"), **extra)
        cap = self.capture
        self.capture_rewrites.set_function(lambda: float(cap.rewrites))
        loop = asyncio.create_task(self.capture.run())
        try:
            while True:
                refresh.clear()
                ips = self.captured_ips()
                self.capture.set_pods(ips)
                self.captured_pods.set(len(ips))
                await refresh.wait()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            cap.changes.close()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for inf in self.informers():
                    tg.create_task(inf.run(), name=f"informer-{inf.kind.__name__}")
                for inf in self.informers():
                    await inf.synced.wait()
                self.mark_synced()
                self.readiness.set("informers")
                # What is loaded by now (modules, the informers' first lists) lives as
                # long as the agent: kept out of the collector's scans, so that a full
                # collection during traffic stays short (a pause is a latency spike).
                gc.freeze()
                self.pauses.start()
                log.info("mesh agent %s ready: outbound %d, inbound %d, tunnel %d, dns %d",
                         self.config.node_name, self.outbound.port, self.inbound.port,
                         self.tunnel.port, self.dns.port)
                refresh, identities_due = asyncio.Event(), asyncio.Event()
                self._on_pod_changes(refresh, identities_due)
                tg.create_task(self.identities.run(), name="identities")
                tg.create_task(self._keep_identities(identities_due, refresh),
                               name="identity-keeper")
                if self.config.capture:
                    tg.create_task(self._keep_capture(refresh), name="capture")
                if self.tracer is not None:
                    tg.create_task(self.tracer.run(), name="zipkin")
                tg.create_task(self._keep_resolved(), name="service-entry-dns")
        finally:
            if self.capture is not None and not self.config.keep_rules_on_exit:
                try:
                    await self.capture.cleanup()
                except Exception as e:  # shutting down: say so and go on
                    log.error("mesh capture: removing rules failed: %s", e)
            await self.outbound.close()
            await self.inbound.close()
            await self.tunnel.close()
            await self.http.close()
            await self.pool.close()
            await self.dns.close()
            if self.tracer is not None:
                await self.tracer.close()
            if self.admin is not None:
                await self.admin.close()
            self.pauses.stop()
            await self.monitoring.close()

    def _on_pod_changes(self, *events: asyncio.Event) -> None:
        """Set ``events`` whenever a pod or a namespace (its opt-out label) changes."""
        def changed(*_: object) -> None:
            for e in events:
                e.set()
        for inf in (self.pods, self.namespaces, self.workload_entries):
            inf.add_handlers(on_add=changed, on_update=changed, on_delete=changed)


def http_ports(services: list[core_pb2.Service], endpoints: list[core_pb2.Endpoints], *,
               domain: str, workload_entries: list[traffic_pb2.WorkloadEntry] | None = None
               ) -> tuple[dict[Address, l7engine.Service], set[Address]]:
    """The HTTP service ports (HTTP/1.1, HTTP/2, gRPC) by ClusterIP:port, and the pod
    (and selected WorkloadEntry) IP:ports behind them (pure): what the L7 path serves,
    outbound and inbound."""
    eps = {key_of(e): e for e in endpoints}
    by_vip: dict[Address, l7engine.Service] = {}
    pod_ports: set[Address] = set()
    for svc in services:
        ns, name = svc.metadata.namespace, svc.metadata.name
        ip = svc.spec.cluster_ip
        for sp in svc.spec.ports:
            choice = meshprotocol.port_protocol(
                name=sp.name, app_protocol=sp.app_protocol if sp.HasField("app_protocol")
                else None, transport=sp.protocol or "TCP")
            if not choice.is_http:
                continue
            if ip and ip != "None" and ":" not in ip:
                by_vip[(ip, int(sp.port))] = l7engine.Service(
                    host=f"{name}.{ns}.svc.{domain}", port=int(sp.port), name=name,
                    namespace=ns)
            ep = eps.get(key_of(svc))
            for subset in ep.subsets if ep is not None else ():
                port = next((p for p in subset.ports if p.name == sp.name), None)
                if port is not None:
                    pod_ports.update((a.ip, int(port.port)) for a in subset.addresses if a.ip)
            if workload_entries:
                pod_ports.update(e.key for e in l7upstream.workload_entry_endpoints(
                    svc, sp, workload_entries))
    return by_vip, pod_ports


def service_entry_http_ports(service_entries: list[traffic_pb2.ServiceEntry],
                             resolved: Mapping[str, tuple[str, ...]],
                             workload_entries: list[traffic_pb2.WorkloadEntry] | None = None
                             ) -> dict[Address, l7engine.Service]:
    """The destinations of ServiceEntries' HTTP ports that the L7 engine serves (pure):
    per HTTP port (``l7upstream.http_entry_ports``), the entry's single-IP addresses
    and its endpoints' IPs (STATIC, DNS: as resolved), as the host they belong to (its
    first host for a VIP or a STATIC endpoint; the cluster the engine routes to, which a
    VirtualService may name). Egress HTTP to them
    gets the mesh's routes, retries, timeouts and telemetry. A CIDR address, or a
    NONE entry without addresses, stays on the L4 egress path."""
    out: dict[Address, l7engine.Service] = {}
    for se in sorted(service_entries, key=key_of):
        hosts = [h.lower().rstrip(".") for h in se.spec.hosts if not h.startswith("*")]
        ports = l7upstream.http_entry_ports(se)
        if not hosts or not ports:
            continue
        vips = {ip for a in se.spec.addresses if (ip := l7upstream.single_ip(a)) is not None}
        for p in ports:
            for host in hosts:  # a DNS entry's hosts resolve each to its own addresses
                ips = set(vips)
                if not se.spec.addresses:  # no VIP: clients connect to the endpoints
                    ips |= {e.ip for e in l7upstream.service_entry_endpoints(
                        se, p, host, resolved=resolved,
                        workload_entries=workload_entries or ())}
                for ip in sorted(ips):
                    out.setdefault((ip, int(p.number)), l7engine.Service(
                        host=host, port=int(p.number), name=host,
                        namespace=se.metadata.namespace))
    return out


async def run(config: MeshConfig) -> None:
    client_cfg = configmod.load(config.client_config)
    async with AsyncClient(client_cfg) as client:
        agent = MeshAgent(config, client)
        await agent.start()
        # READY=1 to systemd (Type=notify) on the signals /readyz answers from.
        await sdnotify.serving(agent.run(), agent.readiness,
                               status=f"mesh agent {config.node_name} ready")
