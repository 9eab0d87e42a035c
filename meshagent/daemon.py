"""``shoal-meshagent run``: one mesh agent per node, beside the nodeagent.

    start: the node's client config (the nodeagent's node.conf) -> listeners bound
           (outbound 15001, inbound 15006, DNS 15053, monitoring 15020: a bad port
           fails here) -> informers (Pods with spec.nodeName=<node>, Services,
           Endpoints, Namespaces) synced -> ready -> capture rules for this node's
           pods kept on a loop (with --capture)
    stop (SIGTERM): capture rules removed (unless --keep-rules-on-exit), listeners
           closed.

Plaintext for now: connections go straight to the chosen endpoint; the mTLS
tunnel (15008) comes with meshagent.identity.

Readiness (/readyz): ``listeners``, ``informers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from meshagent import capture, dns, proxy
from meshagent.routing import Address, Balancer, Route, build_routes
from shoal import config as configmod
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer, key_of
from shoal.monitoring import MonitoringServer, Readiness

log = logging.getLogger(__name__)

DEFAULT_CLIENT_CONFIG = Path("/var/lib/shoal/nodeagent/node.conf")


@dataclass(frozen=True)
class MeshConfig:
    node_name: str
    client_config: Path = DEFAULT_CLIENT_CONFIG
    listen_host: str = "0.0.0.0"
    outbound_port: int = capture.OUTBOUND_PORT
    inbound_port: int = capture.INBOUND_PORT
    dns_port: int = capture.DNS_PORT
    metrics_listen: str = "0.0.0.0:15020"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    cluster_domain: str = dns.DEFAULT_DOMAIN
    dns_ip: str = ""  # the node IP pods send DNS to; "" = no DNS capture
    upstream_dns: str = ""
    capture: bool = False
    iptables: str = ""  # binary; "" = detect
    keep_rules_on_exit: bool = False
    reconcile_interval: float = 1.0


def captured(pod: core_pb2.Pod, namespaces: dict[str, core_pb2.Namespace]) -> bool:
    """Whether this pod's traffic is captured (pure)."""
    if pod.spec.host_network or not pod.status.pod_ip:
        return False
    if pod.status.phase in ("Succeeded", "Failed") or pod.metadata.deletion_timestamp.seconds:
        return False
    ns = namespaces.get(pod.metadata.namespace)
    ns_labels = dict(ns.metadata.labels) if ns is not None else {}
    return not capture.opted_out(dict(pod.metadata.labels)) and not capture.opted_out(ns_labels)


def workload_name(pod: core_pb2.Pod) -> str:
    labels = pod.metadata.labels
    for key in ("app.kubernetes.io/name", "app"):
        if labels.get(key):
            return str(labels[key])
    return str(pod.metadata.name)


class MeshAgent:
    def __init__(self, config: MeshConfig, client: AsyncClient) -> None:
        self.config = config
        self.client = client
        self.registry = CollectorRegistry()
        self.readiness = Readiness("listeners", "informers")
        host, _, port = config.metrics_listen.rpartition(":")
        self.monitoring = MonitoringServer(host=host or "0.0.0.0", port=int(port),
                                           registry=self.registry, readiness=self.readiness)
        self.pods = Informer(client, core_pb2.Pod,
                             field_selector=f"spec.nodeName={config.node_name}",
                             indexers={"ip": lambda p: [p.status.pod_ip] if p.status.pod_ip
                                       else []})
        self.services = Informer(client, core_pb2.Service)
        self.endpoints = Informer(client, core_pb2.Endpoints)
        self.namespaces = Informer(client, core_pb2.Namespace)
        self._routes: dict[Address, Route] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        self._dirty = True
        for inf in (self.services, self.endpoints):
            inf.add_handlers(on_add=self._changed, on_update=self._changed2,
                             on_delete=self._changed)
        metrics = proxy.Metrics(self.registry)
        balancer = Balancer()
        common = {"host": config.listen_host, "routes": self.routes,
                  "pod_cidr": config.pod_cidr, "balancer": balancer, "metrics": metrics,
                  "workload_of": self.workload_of}
        self.outbound = proxy.Listener(direction="outbound", port=config.outbound_port,
                                       **common)  # type: ignore[arg-type]
        self.inbound = proxy.Listener(direction="inbound", port=config.inbound_port,
                                      **common)  # type: ignore[arg-type]
        self.dns = dns.DNSServer(host=config.listen_host, port=config.dns_port,
                                 names=self.names, namespace_of=self.namespace_of,
                                 domain=config.cluster_domain, upstream=config.upstream_dns)
        self.captured_pods = Gauge("shoal_mesh_captured_pods",
                                   "pods whose traffic this agent captures",
                                   registry=self.registry)
        self.capture_rewrites = Gauge(
            "shoal_mesh_capture_rewrites", "times the capture rules were (re)written: "
            "changes of the captured pods, and drift (a flushed chain, a moved jump)",
            registry=self.registry)
        self.capture: capture.Capture | None = None

    # -- views for the listeners (rebuilt lazily after a change) -------------

    def _changed(self, _obj: object) -> None:
        self._dirty = True

    def _changed2(self, _old: object, _new: object) -> None:
        self._dirty = True

    def _rebuild(self) -> None:
        if self._dirty:
            self._dirty = False
            eps = {key_of(e): e for e in self.endpoints.list()}
            services = self.services.list()
            self._routes = build_routes(services, eps)
            self._names = dns.build_names(services, eps, domain=self.config.cluster_domain)

    def routes(self) -> dict[Address, Route]:
        self._rebuild()
        return self._routes

    def names(self) -> dict[str, tuple[str, ...]]:
        self._rebuild()
        return self._names

    def _pod_by_ip(self, ip: str) -> core_pb2.Pod | None:
        pods = self.pods.by_index("ip", ip)
        return pods[0] if pods else None

    def namespace_of(self, ip: str) -> str | None:
        pod = self._pod_by_ip(ip)
        return str(pod.metadata.namespace) if pod is not None else None

    def workload_of(self, ip: str) -> tuple[str, str]:
        pod = self._pod_by_ip(ip)
        if pod is None:
            return "unknown", "unknown"
        return workload_name(pod), str(pod.metadata.namespace)

    def captured_ips(self) -> list[str]:
        nss = {n.metadata.name: n for n in self.namespaces.list()}
        return sorted(p.status.pod_ip for p in self.pods.list() if captured(p, nss))

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Bind every port (a bad one fails here)."""
        await self.monitoring.start()
        await self.outbound.start()
        await self.inbound.start()
        await self.dns.start()
        self.readiness.set("listeners")

    async def _keep_capture(self) -> None:
        cfg = self.config
        binary = cfg.iptables or await capture.detect_backend()
        log.info("mesh capture: iptables backend %s", binary)
        self.capture = capture.Capture(
            config=capture.CaptureConfig(pod_cidr=cfg.pod_cidr, service_cidr=cfg.service_cidr,
                                         dns_ip=cfg.dns_ip, outbound_port=self.outbound.port,
                                         inbound_port=self.inbound.port,
                                         dns_port=self.dns.port),
            iptables=capture.IptablesNat(binary=binary), interval=cfg.reconcile_interval)
        cap = self.capture
        self.capture_rewrites.set_function(lambda: float(cap.rewrites))
        refresh = asyncio.Event()
        for inf in (self.pods, self.namespaces):
            inf.add_handlers(on_add=lambda _o: refresh.set(),
                             on_update=lambda _a, _b: refresh.set(),
                             on_delete=lambda _o: refresh.set())
        loop = asyncio.create_task(self.capture.run())
        try:
            while True:
                ips = self.captured_ips()
                self.capture.set_pods(ips)
                self.captured_pods.set(len(ips))
                refresh.clear()
                await refresh.wait()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for inf in (self.pods, self.services, self.endpoints, self.namespaces):
                    tg.create_task(inf.run(), name=f"informer-{inf.kind.__name__}")
                for inf in (self.pods, self.services, self.endpoints, self.namespaces):
                    await inf.synced.wait()
                self.readiness.set("informers")
                log.info("mesh agent %s ready: outbound %d, inbound %d, dns %d",
                         self.config.node_name, self.outbound.port, self.inbound.port,
                         self.dns.port)
                if self.config.capture:
                    tg.create_task(self._keep_capture(), name="capture")
        finally:
            if self.capture is not None and not self.config.keep_rules_on_exit:
                try:
                    await self.capture.cleanup()
                except Exception as e:  # shutting down: say so and go on
                    log.error("mesh capture: removing rules failed: %s", e)
            await self.outbound.close()
            await self.inbound.close()
            await self.dns.close()
            await self.monitoring.close()


async def run(config: MeshConfig) -> None:
    client_cfg = configmod.load(config.client_config)
    async with AsyncClient(client_cfg) as client:
        agent = MeshAgent(config, client)
        await agent.start()
        await agent.run()
