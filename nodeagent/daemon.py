"""``shoal-nodeagent run``: one node agent process, wired from its config.

    start: client config (from join) -> container runtime: attach to
           --cri-socket, or start/adopt our own containerd (registry mirrors
           written to DATA/containerd/certs.d first) -> sandbox image present
           (built locally and imported, never pulled) -> CNI config from the
           pod CIDR -> node API (TLS, 10250; logs, exec, image import, usage) and
           monitoring (10255) bound -> NodeAgent.run(), PodNetwork.run(),
           ServiceProxy.run() (ClusterIP iptables rules; lab nodes only),
           NetworkPolicies.run() (NetworkPolicy iptables rules; lab nodes only)
    stop (SIGTERM): the agent's loops stop. containerd and the pods keep
           running; the next start adopts them without restarting anything.

Readiness (/readyz): ``runtime`` (CRI answers), ``informer`` (pods listed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from nodeagent.agent import NodeAgent
from nodeagent.certrotation import CertificateRotator
from nodeagent.containerd import (
    ContainerdConfig,
    ContainerdProcess,
    RegistryMirror,
    write_registry_mirrors,
)
from nodeagent.cri import Runtime, RuntimeClient
from nodeagent.criruntime import CRIPodRuntime
from nodeagent.networkpolicy import NetworkPolicies
from nodeagent.nodestatus import gather_facts
from nodeagent.podnetwork import PodNetwork
from nodeagent.serviceproxy import ServiceProxy
from nodeagent.serving import NodeAPI
from nodeagent.usage import UsageSampler
from nodeagent.volumes import VolumeManager
from shoal import config as configmod
from shoal import errors, images
from shoal.backoff import Backoff
from shoal.client import AsyncClient
from shoal.events import EventRecorder
from shoal.monitoring import MonitoringServer, Readiness
from shoal.netfilter import Polling, watch_changes

log = logging.getLogger(__name__)

DEFAULT_SANDBOX_IMAGE = "docker.io/shoal/pause:1"


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    data_dir: Path
    node_ip: str
    client_config: Path | None = None
    listen: str = "0.0.0.0:10250"
    metrics_listen: str = "127.0.0.1:10255"
    # Attach to this CRI socket; empty: run our own containerd under data_dir.
    cri_socket: str = ""
    netns: str | None = None
    pod_cidr: str = ""
    cni_bridge: str = "cni0"
    cni_gateway: bool = True
    sandbox_image: str = DEFAULT_SANDBOX_IMAGE
    relist_interval: float = 1.0
    restart_backoff: tuple[float, float] = (10.0, 300.0)
    renew_interval: float = 10.0
    # Keep routes to other nodes' pod CIDRs (and take ours from the Node when no
    # --pod-cidr is given). Off on a shared host that is not a lab node.
    routes: bool = True
    # Keep iptables rules for Service ClusterIPs in our netns (nodeagent.serviceproxy);
    # only together with ``routes`` (never in a shared host's own netns).
    service_proxy: bool = True
    # Enforce NetworkPolicies in our netns (nodeagent.networkpolicy); only
    # together with ``routes``, as the service proxy.
    network_policy: bool = True
    # Pull these registries from these endpoints (our own containerd only).
    registry_mirrors: tuple[RegistryMirror, ...] = ()

    @property
    def cni_conf_dir(self) -> Path:
        return self.data_dir / "cni" / "net.d"

    @property
    def log_root(self) -> Path:
        return self.data_dir / "logs"

    @property
    def containerd_dir(self) -> Path:
        return self.data_dir / "containerd"

    @property
    def registry_config_dir(self) -> Path:
        """containerd's registry ``config_path``: one ``<registry>/hosts.toml`` each."""
        return self.containerd_dir / "certs.d"

    @property
    def import_dir(self) -> Path:
        """Where archives sent to ImportImage wait while they are imported."""
        return self.data_dir / "images"

    def containerd_config(self) -> ContainerdConfig:
        """The config of this node's containerd: the agent's own, or the one a
        systemd unit runs beside it (shoal.bootstrap writes the same file)."""
        return ContainerdConfig.under(self.containerd_dir, cni_conf_dir=self.cni_conf_dir,
                                      sandbox_image=self.sandbox_image,
                                      registry_config_path=self.registry_config_dir)


async def ensure_sandbox_image(runtime: Runtime, *, image: str, address: str) -> None:
    """Build and import the pause image if containerd lacks it."""
    if await runtime.image_status(image) is not None:
        return
    name = image.removeprefix("docker.io/")
    with tempfile.TemporaryDirectory() as tmp:
        ref = await asyncio.to_thread(images.build_sandbox_image, Path(tmp) / "pause.tar",
                                      name=name)
        await asyncio.to_thread(images.import_image, ref, address=address)
    log.info("imported the locally built sandbox image %s", image)


class NodeAgentDaemon:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.readiness = Readiness("runtime", "informer")
        # A renewed serving certificate the node API has not picked up yet.
        self._new_serving: grpc.ServerCertificateConfiguration | None = None
        host, _, port = config.metrics_listen.rpartition(":")
        self.monitoring = MonitoringServer(host=host or "0.0.0.0", port=int(port),
                                           registry=self.registry, readiness=self.readiness)
        self.containerd: ContainerdProcess | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.agent: NodeAgent | None = None
        self.api_port = 0

    async def _runtime(self) -> tuple[Runtime, str]:
        cfg = self.config
        if cfg.cri_socket:
            if cfg.registry_mirrors:
                raise errors.BadRequest(
                    "--registry-mirror needs the agent's own containerd; with --cri-socket, "
                    "set that containerd's registry config_path instead")
            client = RuntimeClient(cfg.cri_socket)
            await client.wait_ready(60)
            return client, cfg.cri_socket.removeprefix("unix://")
        # Always set: containerd reads hosts.toml files at each pull, so mirrors
        # can change with an agent restart even when containerd is adopted.
        written = await asyncio.to_thread(write_registry_mirrors, cfg.registry_config_dir,
                                          cfg.registry_mirrors)
        for path in written:
            log.info("registry mirror: %s", path)
        cd = cfg.containerd_config()
        self.containerd = ContainerdProcess(cd, netns=cfg.netns)
        await self.containerd.start()
        client = self.containerd.client()
        return client, str(cd.address)

    async def _supervise(self, containerd: ContainerdProcess) -> None:
        """Start our containerd again when it dies. Pods' shims outlive it, and the
        new one finds them; the CRI client reconnects by itself."""
        backoff = Backoff(base=0.5, cap=15.0)
        while True:
            await asyncio.sleep(1.0)
            if containerd.running:
                backoff.reset()
                continue
            self.readiness.clear("runtime")
            log.warning("containerd (pid %s) is gone; starting it again", containerd.pid)
            try:
                await containerd.start()
                self.readiness.set("runtime")
            except errors.ShoalError as e:
                delay = backoff.next()
                log.error("containerd did not come back: %s; retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)

    def _serving_renewed(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Certificate rotation wrote a new serving certificate: present it on
        the node API's next handshakes (grpc asks ``_fetch_serving``)."""
        self._new_serving = grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)],
            root_certificates=(self.config.data_dir / "pki" / "ca.crt").read_bytes())

    def _fetch_serving(self) -> grpc.ServerCertificateConfiguration | None:
        new, self._new_serving = self._new_serving, None
        return new

    def _serve_api(self, api: NodeAPI) -> None:
        pki = self.config.data_dir / "pki"
        creds = grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration(
                [((pki / "serving.key").read_bytes(), (pki / "serving.crt").read_bytes())],
                root_certificates=(pki / "ca.crt").read_bytes()),
            self._fetch_serving,  # type: ignore[arg-type]  # None: keep the current one
            require_client_authentication=True)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((api.handler(),))
        self.api_port = server.add_secure_port(self.config.listen, creds)
        if not self.api_port:
            raise errors.Unavailable(f"cannot listen on {self.config.listen}")
        self.grpc_server = server

    async def run(self) -> None:
        cfg = self.config
        client_cfg = configmod.load(cfg.client_config or cfg.data_dir / "node.conf")
        await self.monitoring.start()
        runtime, address = await self._runtime()
        self.readiness.set("runtime")
        await ensure_sandbox_image(runtime, image=cfg.sandbox_image, address=address)
        facts = gather_facts(internal_ip=cfg.node_ip, hostname=cfg.node_name,
                             agent_port=int(cfg.listen.rpartition(":")[2]))
        pod_runtime = CRIPodRuntime(runtime, log_root=cfg.log_root, dns_server=cfg.node_ip)
        async with AsyncClient(client_cfg) as client:
            self.agent = NodeAgent(
                client=client, runtime=pod_runtime, node_name=cfg.node_name, facts=facts,
                volumes=VolumeManager(root=cfg.data_dir), relist_interval=cfg.relist_interval,
                restart_backoff=cfg.restart_backoff, renew_interval=cfg.renew_interval,
                pod_cidr=cfg.pod_cidr,
                events=EventRecorder(client, component="shoal-nodeagent", host=cfg.node_name))
            agent = self.agent
            sampler = UsageSampler(runtime=runtime, node_name=cfg.node_name)
            api = NodeAPI(pod_by_name=agent.pods.get, records=lambda: agent.relister.records,
                          runtime=pod_runtime, log_root=cfg.log_root, node_name=cfg.node_name,
                          containerd_address=address, import_dir=cfg.import_dir,
                          streaming=runtime if isinstance(runtime, RuntimeClient) else None,
                          usage=lambda: sampler.latest)
            await asyncio.to_thread(api.remove_stale_imports)
            network = PodNetwork(client=client, node_name=cfg.node_name,
                                 cni_conf_dir=cfg.cni_conf_dir,
                                 cni_data_dir=cfg.data_dir / "cni" / "ipam",
                                 bridge=cfg.cni_bridge, gateway=cfg.cni_gateway,
                                 fixed_pod_cidr=cfg.pod_cidr)
            self._serve_api(api)
            assert self.grpc_server is not None
            await self.grpc_server.start()
            log.info("node agent %s: API on %s, metrics on %s", cfg.node_name, cfg.listen,
                     cfg.metrics_listen)
            watches: list[Polling] = []
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(agent.run(), name="agent")
                    tg.create_task(sampler.run(), name="usage-sampler")
                    if client_cfg.cert_pem:
                        rotator = CertificateRotator(
                            client=client, data_dir=cfg.data_dir, node_name=cfg.node_name,
                            node_ips=(cfg.node_ip,) if cfg.node_ip else (),
                            config_path=cfg.client_config or cfg.data_dir / "node.conf",
                            on_serving=self._serving_renewed)
                        tg.create_task(rotator.run(), name="certificate-rotation")
                    if cfg.routes:
                        tg.create_task(network.run(), name="pod-network")
                    if cfg.routes and cfg.service_proxy:
                        watches.append(await watch_changes("iptables", what="service proxy"))
                        proxy = ServiceProxy(client=client, changes=watches[-1])
                        tg.create_task(proxy.run(), name="service-proxy")
                    if cfg.routes and cfg.network_policy:
                        watches.append(await watch_changes("iptables", what="network policy"))
                        policies = NetworkPolicies(client=client, node_name=cfg.node_name,
                                                   changes=watches[-1])
                        tg.create_task(policies.run(), name="network-policy")
                    if self.containerd is not None:
                        tg.create_task(self._supervise(self.containerd), name="containerd")
                    await agent.synced.wait()
                    self.readiness.set("informer")
            finally:
                for w in watches:
                    w.close()
                await self.grpc_server.stop(1)
                await self.monitoring.close()
                if isinstance(runtime, RuntimeClient):
                    with contextlib.suppress(Exception):
                        await runtime.close()
