"""Wiring and lifecycle of one apiserver process.

``build(config)`` creates every part and hands each the narrowest handle it
needs; ``APIServer.start()`` binds every listener (a taken port fails here, not
later); ``run()`` runs the long-lived parts in one TaskGroup until ``stop()``.

    build -> start (storage connected, ports bound) -> run
        run: watch cache | bookmark ticker | readiness -> health SERVING
    stop: health NOT_SERVING -> gRPC drains for the grace period -> tasks cancelled
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from apiserver.admission import PodAdmission
from apiserver.authz import audit as auditing
from apiserver.authz import bootstrap as bootstrap_policy
from apiserver.authz.access import AccessControl, AlwaysAllow, Authorizer, Chain, MastersAuthorizer
from apiserver.authz.escalation import EscalationCheck
from apiserver.authz.nodegraph import CachedNodeGraph
from apiserver.authz.nodes import NodeAuthorizer
from apiserver.authz.rbac import RBACAuthorizer
from apiserver.authz.review import AccessReviewService
from apiserver.controllermanager import ControllerManager
from apiserver.controllers import builtin_controllers
from apiserver.controllers.base import ControllerSettings
from apiserver.encryption import EncryptionConfig
from apiserver.encryption import load_config as load_encryption_config
from apiserver.grpcapi import SERVICE, ResourceAPI
from apiserver.joining import JoinService
from apiserver.maintenance import Maintenance
from apiserver.meshproxy import MeshProxy
from apiserver.metrics import Metrics
from apiserver.namespaces import NamespaceFinalizer
from apiserver.nodeipam import NodeIPAM
from apiserver.objectstore import ObjectStore
from apiserver.pki import CertificateAuthority
from apiserver.podproxy import PodProxy
from apiserver.ratelimit import RateLimiter, RateLimits
from apiserver.resourcemetrics import MetricsAPI
from apiserver.rpc import Authenticator, DecodeRequests, Guard
from apiserver.serviceaccounts import (
    DEFAULT_ISSUER,
    DefaultServiceAccounts,
    LiveObjects,
    TokenAuthenticator,
    TokenService,
    TokenSigner,
)
from apiserver.serviceips import ServiceIPAllocator
from apiserver.storage import Store, etcdadmin
from apiserver.storage.encrypting import EncryptingStore
from apiserver.storage.instrumented import InstrumentedStore
from apiserver.watchcache import DELETED, MODIFIED, CacheEvent, WatchCache
from apiserver.workloadcerts import WorkloadCertificateService
from shoal import errors, sdnotify
from shoal.config import ClientConfig
from shoal.kinds import KindTable, builtin_kinds
from shoal.monitoring import MonitoringServer, Readiness

log = logging.getLogger(__name__)

# The largest gRPC message the apiserver accepts: kube's MaxRequestBodyBytes
# (3 MiB), twice the 1.5 MiB an object may take in storage
# (apiserver.objectstore.MAX_OBJECT_BYTES). Larger requests are refused by
# gRPC itself with RESOURCE_EXHAUSTED before they are decoded.
MAX_RECEIVE_BYTES = 3 * 1024 * 1024
MAX_SEND_BYTES = 512 * 1024 * 1024
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    listen: str = "127.0.0.1:6443"
    # Addresses nodes are told to use for this apiserver (default: listen).
    advertise: tuple[str, ...] = ()
    # TLS without client certificates, for the join service only ("" = off).
    join_listen: str = "127.0.0.1:6444"
    # Node IPAM: each Node gets a /node_cidr_mask block of this ("" = off).
    cluster_cidr: str = "10.244.0.0/16"
    node_cidr_mask: int = 24
    # In-process controllers to run (names from apiserver.controllers), behind
    # leader election; empty runs none.
    controllers: tuple[str, ...] = ()
    controller_settings: ControllerSettings = field(default_factory=ControllerSettings)
    leader_lease: tuple[float, float, float] = (15.0, 10.0, 2.0)
    # "sqlite" (embedded, file under data_dir unless sqlite_path) or "etcd".
    storage: str = "sqlite"
    etcd_servers: tuple[str, ...] = ()
    sqlite_path: str = ""
    metrics_listen: str = "127.0.0.1:9090"
    bookmark_interval: float = 60.0  # as Kubernetes: about one a minute
    history_events: int = 10_000
    history_revisions: int = 20_000
    shutdown_grace: float = 5.0
    tls: bool = True
    # Mesh workload certificates: SPIFFE trust domain and lifetime.
    mesh_trust_domain: str = "cluster.local"
    workload_cert_lifetime: float = 24 * 3600.0
    # The port every node's meshagent serves its admin API on (MeshProxy asks it).
    mesh_admin_port: int = 15000
    namespaces: tuple[str, ...] = field(default=DEFAULT_NAMESPACES)
    # Audit log: JSON lines to this file ("-" stdout, "" off), by this policy
    # (kube's audit.k8s.io Policy; "" logs everything at Metadata).
    audit_log_path: str = ""
    audit_policy_file: str = ""
    # Kubernetes' EncryptionConfiguration file for encryption at rest ("" = none).
    encryption_provider_config: str = ""
    # Service-account tokens: their `iss`, also the audience this server accepts.
    service_account_issuer: str = DEFAULT_ISSUER
    # Storage maintenance by the leader (apiserver.maintenance): keep this many
    # seconds of history (0 = never compact); defragment each etcd member every
    # interval seconds (0 = never), inside the UTC window "HH:MM-HH:MM" if set.
    etcd_compaction_interval: float = 300.0
    etcd_defrag_interval: float = 0.0
    etcd_defrag_window: str = ""
    # Hardening (docs/security.md): the largest request message, and per-user
    # rate limits (qps 0 = off; exempt groups are never limited).
    max_request_bytes: int = MAX_RECEIVE_BYTES
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # Pod admission (apiserver.admission): image registries pods may use (empty = any).
    allowed_registries: tuple[str, ...] = ()


def _split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_store(config: ServerConfig) -> Store:
    if config.storage == "etcd":
        if not config.etcd_servers:
            raise errors.BadRequest("--etcd-servers is required with --storage etcd")
        from apiserver.storage.etcd import EtcdStore

        return EtcdStore(list(config.etcd_servers))
    if config.storage == "sqlite":
        from apiserver.storage.sqlite import SqliteStore

        path = config.sqlite_path or str(config.data_dir / "state.db")
        return SqliteStore(path)
    raise errors.BadRequest(f"unknown storage {config.storage!r}: use etcd or sqlite")


class APIServer:
    def __init__(self, *, config: ServerConfig, store: Store, kinds: KindTable,
                 metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.kinds = kinds
        self.encryption: EncryptionConfig | None = None
        if config.encryption_provider_config:
            self.encryption = load_encryption_config(
                config.encryption_provider_config,
                known_resources=[k.qualified_resource for k in kinds])
            store = EncryptingStore(store, self.encryption)
        self.store: Store = InstrumentedStore(store, metrics)
        self.cache = WatchCache(
            store=self.store, kinds=kinds, history_events=config.history_events,
            history_revisions=config.history_revisions,
            on_watchers_changed=metrics.set_watchers)
        # ClusterIPs come from controller_settings.service_cluster_ip_range
        # (--service-cluster-ip-range); "" turns allocation off.
        self.service_ips = self._service_ips()
        self.objects = ObjectStore(store=self.store, kinds=kinds, service_ips=self.service_ips)
        self.authn = Authenticator()
        # Authorization (Node, RBAC and system:masters) from the watch cache, and audit.
        self.node_graph = CachedNodeGraph(cache=self.cache, kinds=kinds)
        self.rbac = RBACAuthorizer(cache=self.cache, kinds=kinds)
        authorizer: Authorizer = Chain([
            MastersAuthorizer(), NodeAuthorizer(self.node_graph.graph), self.rbac,
        ]) if config.tls else AlwaysAllow()
        self.audit: auditing.AuditLog | None = None
        if config.audit_log_path:
            policy = (auditing.load_policy(Path(config.audit_policy_file))
                      if config.audit_policy_file else auditing.EVERYTHING_AT_METADATA)
            self.audit = auditing.AuditLog(path=config.audit_log_path, policy=policy)
        self.guard = Guard(access=AccessControl(authorizer, catch_up=self.cache.caught_up),
                           audit=self.audit, render=auditing.request_renderer(kinds),
                           escalation=EscalationCheck(authorizer=authorizer,
                                                      index=self.rbac.index),
                           limiter=(RateLimiter(config.rate_limits)
                                    if config.rate_limits.qps > 0 else None))
        self.api = ResourceAPI(kinds=kinds, objects=self.objects, cache=self.cache,
                               metrics=metrics, storage_name=store.name, authn=self.authn,
                               guard=self.guard,
                               admission=PodAdmission(
                                   access=self.guard.access,
                                   allowed_registries=config.allowed_registries))
        self.reviews = AccessReviewService(metrics=metrics, authn=self.authn, guard=self.guard)
        self.join: JoinService | None = None
        self.proxy: PodProxy | None = None
        if config.tls and (config.data_dir / "pki" / "apiserver-kubelet-client.crt").exists():
            self.proxy = PodProxy(objects=self.objects, kinds=kinds,
                                  pki_dir=config.data_dir / "pki", metrics=metrics,
                                  authn=self.authn, guard=self.guard)
        self.mesh_proxy: MeshProxy | None = None
        self.resource_metrics: MetricsAPI | None = None
        if self.proxy is not None:
            self.resource_metrics = MetricsAPI(cache=self.cache, kinds=kinds,
                                               pki_dir=config.data_dir / "pki", metrics=metrics,
                                               authn=self.authn, guard=self.guard)
            self.mesh_proxy = MeshProxy(objects=self.objects, cache=self.cache, kinds=kinds,
                                        pki_dir=config.data_dir / "pki", metrics=metrics,
                                        authn=self.authn, guard=self.guard,
                                        admin_port=config.mesh_admin_port)
        if config.tls:
            self.join = JoinService(
                objects=self.objects, kinds=kinds,
                ca=CertificateAuthority.load(config.data_dir / "pki"),
                servers=config.advertise or (config.listen,), metrics=metrics,
                authn=self.authn, guard=self.guard)
        self.workload_certs: WorkloadCertificateService | None = None
        if config.tls:
            self.workload_certs = WorkloadCertificateService(
                pki_dir=config.data_dir / "pki", metrics=metrics, authn=self.authn,
                guard=self.guard, trust_domain=config.mesh_trust_domain,
                lifetime=dt.timedelta(seconds=config.workload_cert_lifetime))
        self.tokens: TokenService | None = None
        if config.tls:
            signer = TokenSigner.load_or_create(config.data_dir / "pki" / "sa.key")
            live = LiveObjects(cache=self.cache, kinds=kinds)
            audiences = (config.service_account_issuer,)
            self.authn.tokens = TokenAuthenticator(
                signer=signer, live=live, issuer=config.service_account_issuer,
                audiences=audiences)
            self.tokens = TokenService(live=live, signer=signer,
                                       issuer=config.service_account_issuer,
                                       audiences=audiences, metrics=metrics, authn=self.authn,
                                       guard=self.guard, cache=self.cache)
        self.default_service_accounts = DefaultServiceAccounts(
            objects=self.objects, cache=self.cache, kinds=kinds)
        self.namespaces = NamespaceFinalizer(objects=self.objects, cache=self.cache, kinds=kinds)
        self.ipam = (NodeIPAM(objects=self.objects, cache=self.cache, kinds=kinds,
                              cluster_cidr=config.cluster_cidr, mask=config.node_cidr_mask)
                     if config.cluster_cidr else None)
        self.maintenance = Maintenance(
            store=store, retention=config.etcd_compaction_interval,
            defrag_interval=config.etcd_defrag_interval,
            defrag_window=config.etcd_defrag_window,
            defragment=(functools.partial(etcdadmin.defragment_each, config.etcd_servers)
                        if config.storage == "etcd" else None))
        self.readiness = Readiness("storage", "watch-cache", "bootstrap")
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        host, port = _split_hostport(config.metrics_listen)
        self.monitoring = MonitoringServer(host=host, port=port, registry=metrics.registry,
                                           readiness=self.readiness)
        metrics.cache_collector(
            lambda: {name: len(kc.objects) for name, kc in self.cache.caches.items()},
            lambda: self.cache.revision)
        self.controller_manager: ControllerManager | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0
        self.join_port = 0
        self._stopping = asyncio.Event()

    def _service_ips(self) -> ServiceIPAllocator | None:
        cidr = self.config.controller_settings.service_cluster_ip_range
        if not cidr:
            return None
        services = self.kinds.by_resource("", "services")

        def decode(raw: bytes) -> object:
            svc = services.new()
            svc.ParseFromString(raw)
            return svc

        allocator = ServiceIPAllocator(store=self.store, cidr=cidr, decode_service=decode)

        def on_event(ev: CacheEvent) -> None:
            if ev.type == DELETED:
                allocator.service_changed(ev.obj.raw, None)
            elif ev.type == MODIFIED and ev.prev is not None:
                allocator.service_changed(ev.prev.raw, ev.obj.raw)

        self.cache.cache_for(services).listeners.append(on_event)
        return allocator

    async def start(self) -> None:
        """Connect storage and bind every port. Raises on a taken port."""
        await self.store.start()
        self.readiness.set("storage")
        server = grpc.aio.server(interceptors=[DecodeRequests()], options=[
            ("grpc.max_receive_message_length", self.config.max_request_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ])
        server.add_generic_rpc_handlers((self.api.handler(),))
        server.add_generic_rpc_handlers((self.reviews.handler(),))
        if self.join is not None:
            server.add_generic_rpc_handlers((self.join.handler(),))
        if self.proxy is not None:
            server.add_generic_rpc_handlers((self.proxy.handler(),))
        if self.mesh_proxy is not None:
            server.add_generic_rpc_handlers((self.mesh_proxy.handler(),))
        if self.resource_metrics is not None:
            server.add_generic_rpc_handlers((self.resource_metrics.handler(),))
        if self.workload_certs is not None:
            server.add_generic_rpc_handlers((self.workload_certs.handler(),))
        if self.tokens is not None:
            server.add_generic_rpc_handlers((self.tokens.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.tls:
            pki = self.config.data_dir / "pki"
            ca_pem = (pki / "ca.crt").read_bytes()
            chain = (pki / "server.crt").read_bytes()
            if ca_pem.strip() not in chain:
                chain = chain.rstrip() + b"\n" + ca_pem  # joining nodes find the CA here
            key = (pki / "server.key").read_bytes()
            creds = grpc.ssl_server_credentials([(key, chain)], root_certificates=ca_pem,
                                                require_client_auth=True)
            self.port = server.add_secure_port(self.config.listen, creds)
            # The join port: TLS without client certificates, for nodes that have
            # none yet. Every service but Join refuses callers without a verified
            # certificate (apiserver.rpc.Authenticator), so only Join works here.
            if self.config.join_listen:
                join_creds = grpc.ssl_server_credentials([(key, chain)])
                self.join_port = server.add_secure_port(self.config.join_listen, join_creds)
                if not self.join_port:
                    raise errors.Unavailable(f"cannot listen on {self.config.join_listen}")
        else:
            self.port = server.add_insecure_port(self.config.listen)
        if not self.port:
            raise errors.Unavailable(f"cannot listen on {self.config.listen}")
        await server.start()
        self.grpc_server = server
        self.controller_manager = self._controller_manager()
        if self.controller_manager is not None:  # one apiserver only runs these
            self.controller_manager.leader_tasks.append(("maintenance", self.maintenance.run))
            if self.ipam is not None:
                self.controller_manager.leader_tasks.append(("node-ipam", self.ipam.run))
        await self.monitoring.start()
        log.info("apiserver listening on %s (port %d), metrics on %s:%d, storage %s",
                 self.config.listen, self.port, self.monitoring.host, self.monitoring.port,
                 self.store.name)

    def _controller_manager(self) -> ControllerManager | None:
        names = self.config.controllers
        if not names or not self.config.tls:
            return None
        known = builtin_controllers()
        wanted = sorted(known) if names == ("all",) else list(names)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise errors.BadRequest(f"unknown controllers: {', '.join(unknown)} "
                                    f"(known: {', '.join(sorted(known))})")
        pki = self.config.data_dir / "pki"
        # The controllers dial this very server: its listen host unless that is a
        # wildcard (the lab listens on the bridge address only, not on loopback).
        host, _ = _split_hostport(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        loopback = ClientConfig(
            servers=(f"{host}:{self.port}",), ca_pem=(pki / "ca.crt").read_bytes(),
            cert_pem=(pki / "controller-manager.crt").read_bytes(),
            key_pem=(pki / "controller-manager.key").read_bytes(),
            user="system:kube-controller-manager", tls_server_name="localhost")
        duration, deadline, period = self.config.leader_lease
        return ControllerManager(client_config=loopback,
                                 controllers=[known[n] for n in wanted],
                                 settings=self.config.controller_settings,
                                 lease_duration=duration, renew_deadline=deadline,
                                 retry_period=period)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            cache_task = tg.create_task(self.cache.run(), name="watch-cache")
            loops = [
                tg.create_task(self._bookmarks(), name="bookmarks"),
                tg.create_task(self.namespaces.run(), name="namespace-finalizer"),
                tg.create_task(self.default_service_accounts.run(),
                               name="default-service-accounts"),
                # Without leader election (no controllers), every apiserver runs these.
                *([tg.create_task(self.ipam.run(), name="node-ipam")]
                  if self.ipam and self.controller_manager is None else []),
                *([tg.create_task(self.maintenance.run(), name="maintenance")]
                  if self.controller_manager is None else []),
                *([tg.create_task(self._service_ip_repair(self.service_ips),
                                  name="service-ips")] if self.service_ips else []),
                tg.create_task(self._become_ready(), name="readiness"),
            ]
            if self.controller_manager is not None:
                loops.append(tg.create_task(self._controllers(self.controller_manager),
                                            name="controller-manager"))
            await self._stopping.wait()
            cache_task.cancel()
            for task in loops:
                task.cancel()

    async def _become_ready(self) -> None:
        await self.cache.ready.wait()
        self.readiness.set("watch-cache")
        await self._bootstrap()
        self.readiness.set("bootstrap")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("apiserver ready")

    async def _bootstrap(self) -> None:
        """Create the default namespaces and the built-in RBAC policy (retrying while
        storage is unavailable)."""
        ns_kind = self.kinds.by_resource("", "namespaces")
        for name in self.config.namespaces:
            while True:
                ns = ns_kind.new()
                ns.metadata.name = name
                try:
                    await self.objects.create(ns_kind, ns)
                except errors.AlreadyExists:
                    pass
                except errors.Unavailable as e:
                    log.warning("bootstrap: %s; retrying", e)
                    await asyncio.sleep(1)
                    continue
                break
        await bootstrap_policy.ensure(self.objects, self.kinds)

    async def _service_ip_repair(self, allocator: ServiceIPAllocator) -> None:
        await self.cache.ready.wait()
        await allocator.run()

    async def _controllers(self, manager: ControllerManager) -> None:
        await self.readiness.signal("bootstrap").wait()
        await manager.run()

    async def _bookmarks(self) -> None:
        while True:
            await asyncio.sleep(self.config.bookmark_interval)
            self.cache.send_bookmarks()

    async def stop(self) -> None:
        """Stop serving: drain in-flight calls for the grace period, then close."""
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.config.shutdown_grace)
        self._stopping.set()
        await self.monitoring.close()

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
        if self.mesh_proxy is not None:
            await self.mesh_proxy.close()
        if self.resource_metrics is not None:
            await self.resource_metrics.close()
        await self.store.close()
        if self.audit is not None:
            self.audit.close()


def build(config: ServerConfig, *, store: Store | None = None,
          kinds: KindTable | None = None) -> APIServer:
    """Wire one apiserver from its config (a store may be injected for tests)."""
    return APIServer(config=config, store=store or make_store(config),
                     kinds=kinds or builtin_kinds(), metrics=Metrics())


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Start, run until ``stop`` is set (or the task is cancelled), shut down."""
    server = build(config)
    await server.start()
    # READY=1 to systemd (Type=notify) on the signals /readyz answers from.
    runner = asyncio.create_task(sdnotify.serving(server.run(), server.readiness,
                                                  status="apiserver serving"))
    try:
        if stop is None:
            await runner
        else:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                await server.stop()
                await runner
            else:
                waiter.cancel()
                runner.result()
    finally:
        if not runner.done():
            await server.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await server.close()
