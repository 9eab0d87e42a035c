"""One node bootstrap: the command line and the config files of every component.

The local lab (``shoal lab``, supervised by the lab's supervisor) and machines
run by systemd (the Vagrant VMs, ``deploy/``) start Shoal's components with the
same commands and the same config files, and both get them from here. Only the
supervision differs::

    a spec (what this machine is)          ControlPlane: etcd, registry, apiserver
      lab: built from the lab's topology   NodeSpec:     containerd, nodeagent, meshagent
      VM:  /etc/shoal/bootstrap.yaml                       (+ join, once)
             |
             v
    command(spec, component) -> Command(argv, ready_url)      pure, the same everywhere
    render(spec, component)  -> files it needs (PKI, registry config, containerd config)
             |
             +-- lab: render, then its supervisor spawns ``argv`` (in the node's netns)
             +-- systemd: ``ExecStart=python -m shoal.bootstrap exec COMPONENT``
                 renders and ``exec``s ``argv`` (the same PID, so Type=notify works)

A control plane of several members (etcd's cluster and one apiserver each)
is several machines with one spec each: every member names the whole etcd
cluster (``etcdInitialCluster``, name=peer URL), every member's etcd client
endpoint (``etcdServers``, its own first: its apiserver's ``--etcd-servers``)
and every apiserver (``apiServers``: the serving certificate's SANs and
admin.conf's server list). The first member makes the CA, the keys and the
encryption config; the others copy them from its apiserver dir
(``pkiFrom``) before their first start, as kubeadm's ``--upload-certs`` does.
Only one member runs the registry (``runsRegistry``).

The one difference a spec carries is who runs a node's containerd: in the lab
the node agent runs its own (``containerd: agent``; the agent adopts it after
a restart); under systemd it is a unit of its own (``containerd: service``), so
stopping or restarting the agent's unit never touches containerd or the pods'
shims, and the agent attaches with ``--cri-socket``. Both write the same
containerd config, from :meth:`nodeagent.daemon.AgentConfig.containerd_config`.

Contract: ``command`` is pure (tests compare argv); ``render`` is idempotent
(the PKI is made once and kept; config files are rewritten to the same
content); ``load`` rejects an unknown or missing key, or a wrong type, naming
it, and changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shoal import errors

if TYPE_CHECKING:
    from nodeagent.daemon import AgentConfig
    from shoal.images import ImageRef

ETCD, REGISTRY, APISERVER = "etcd", "registry", "apiserver"
CONTAINERD, NODEAGENT, MESHAGENT = "containerd", "nodeagent", "meshagent"
CONTROL_PLANE_COMPONENTS = (ETCD, REGISTRY, APISERVER)
NODE_COMPONENTS = (CONTAINERD, NODEAGENT, MESHAGENT)
COMPONENTS = CONTROL_PLANE_COMPONENTS + NODE_COMPONENTS

# Who runs a node's containerd.
BY_AGENT, BY_SERVICE = "agent", "service"

DEFAULT_SPEC = Path("/etc/shoal/bootstrap.yaml")
SANDBOX_IMAGE = "docker.io/shoal/pause:1"
DEMO_IMAGE = "docker.io/library/busybox:1.36"
API_METRICS = "127.0.0.1:9090"
API_PORT, JOIN_PORT, REGISTRY_PORT = 6443, 6444, 5000
AGENT_PORT, AGENT_METRICS_PORT, MESH_METRICS_PORT = 10250, 10255, 15020
SERVICE_CIDR = "10.96.0.0/16"    # the apiserver's --service-cluster-ip-range default


@dataclass(frozen=True)
class ControlPlane:
    """etcd, the registry and the apiserver on one machine."""

    address: str                     # the IP nodes and users reach (never a NAT one)
    data_dir: Path                   # etcd/, apiserver/, registry/ and admin.conf under it
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    etcd_name: str = "shoal"
    extra_sans: tuple[str, ...] = ()  # more names/IPs for the serving certificate
    apiserver_args: tuple[str, ...] = ()
    apiserver_metrics: str = API_METRICS  # /metrics and /readyz (local only by default)
    # A member of a control plane of several (empty/defaults: a control plane of one).
    etcd_address: str = "127.0.0.1"         # this member's etcd: client and peer URLs
    etcd_initial_cluster: tuple[str, ...] = ()  # NAME=PEER-URL of every member
    etcd_servers: tuple[str, ...] = ()      # every member's client HOST:PORT, own first
    api_servers: tuple[str, ...] = ()       # every apiserver's HOST:PORT
    pki_from: str = ""                      # the first member's apiserver dir (copied)
    runs_registry: bool = True

    @property
    def etcd_client_url(self) -> str:
        return f"http://{self.etcd_address}:{self.etcd_client_port}"

    @property
    def etcd_peer_url(self) -> str:
        return f"http://{self.etcd_address}:{self.etcd_peer_port}"

    @property
    def all_etcd_servers(self) -> tuple[str, ...]:
        return self.etcd_servers or (self.etcd_endpoint,)

    @property
    def all_api_servers(self) -> tuple[str, ...]:
        return self.api_servers or (self.api_server,)

    @property
    def api_server(self) -> str:
        return f"{self.address}:{API_PORT}"

    @property
    def join_server(self) -> str:
        return f"{self.address}:{JOIN_PORT}"

    @property
    def registry(self) -> str:
        return f"{self.address}:{REGISTRY_PORT}"

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.etcd_address}:{self.etcd_client_port}"

    @property
    def etcd_dir(self) -> Path:
        return self.data_dir / "etcd"

    @property
    def apiserver_dir(self) -> Path:
        return self.data_dir / "apiserver"

    @property
    def encryption_config(self) -> Path:
        """Secrets at rest: AES-GCM key made by render (apiserver.encryption)."""
        return self.apiserver_dir / "encryption-config.yaml"

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    @property
    def registry_config(self) -> Path:
        return self.registry_dir / "config.yml"

    @property
    def admin_config(self) -> Path:
        return self.data_dir / "admin.conf"


@dataclass(frozen=True)
class NodeSpec:
    """One worker: containerd, the node agent and (with ``mesh``) the mesh agent."""

    name: str
    ip: str                          # the node's address on the cluster network
    data_dir: Path
    api_server: str                  # HOST:PORT
    registry: str                    # HOST:PORT; pulls of docker.io and of it go there
    containerd: str = BY_SERVICE
    more_api_servers: tuple[str, ...] = ()  # the other apiservers (failover, node.conf)
    mesh: bool = False
    lease_renew_interval: float = 10.0
    sandbox_image: str = SANDBOX_IMAGE
    # The mesh agent's Zipkin v2 collector (http://HOST:PORT); "" = no tracing.
    zipkin_endpoint: str = ""
    # The mesh agent's JSON access log (--access-log; off by default, as Istio).
    access_log: bool = False
    # The share of new traces the mesh agent samples, in percent (Istio's default 1).
    trace_sampling: float = 1.0
    # A mesh-only host (a VM or bare-metal machine outside the cluster): joins like
    # a node, then runs only the mesh agent with --mesh-host (no node agent, no
    # containerd, no Node object); its workloads are the WorkloadEntries labelled
    # shoal.dev/mesh-host: NAME. Needs ``mesh``.
    mesh_host: bool = False

    @property
    def join_server(self) -> str:
        host, _, port = self.api_server.rpartition(":")
        return f"{host}:{int(port) + 1}"

    @property
    def node_config(self) -> Path:
        return self.data_dir / "node.conf"

    @property
    def containerd_dir(self) -> Path:
        return self.data_dir / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "root" / "config.toml"

    @property
    def agent_metrics(self) -> str:
        return f"{self.ip}:{AGENT_METRICS_PORT}"

    @property
    def mesh_metrics(self) -> str:
        return f"{self.ip}:{MESH_METRICS_PORT}"

    @property
    def mirrors(self) -> tuple[str, ...]:
        """docker.io, and the registry by its own name, both pulled from the
        cluster registry over plain HTTP (never the internet)."""
        url = f"http://{self.registry}"
        return (f"docker.io={url}", f"{self.registry}={url}")


@dataclass(frozen=True)
class Spec:
    """What one machine (or one lab node) runs."""

    control_plane: ControlPlane | None = None
    node: NodeSpec | None = None

    def components(self) -> tuple[str, ...]:
        cp = self.control_plane
        made: tuple[str, ...] = tuple(
            c for c in CONTROL_PLANE_COMPONENTS if c != REGISTRY or cp.runs_registry
        ) if cp is not None else ()
        if self.node is not None and self.node.mesh_host:
            made += (MESHAGENT,)
        elif self.node is not None:
            made += tuple(c for c in NODE_COMPONENTS
                          if (c != CONTAINERD or self.node.containerd == BY_SERVICE)
                          and (c != MESHAGENT or self.node.mesh))
        return made


@dataclass(frozen=True)
class Command:
    """How to start one component, and how to tell it serves."""

    component: str
    argv: tuple[str, ...]
    ready_url: str = ""              # an HTTP endpoint that answers 200 once it serves
    notifies: bool = True            # sends sd_notify READY=1 itself (Type=notify)


# -- commands (pure) -------------------------------------------------------------


def command(spec: Spec, component: str, *, python: str) -> Command:
    """The command line of ``component`` on this spec's machine. ``python`` runs
    Shoal's own daemons (``python -P -m <daemon>.main``: -P so that no working
    directory shadows a package)."""
    cp, node = spec.control_plane, spec.node
    if component in CONTROL_PLANE_COMPONENTS:
        if cp is None:
            raise errors.BadRequest(f"{component} runs on the control plane, and this spec "
                                    "has no controlPlane section")
        return _control_plane_command(cp, component, python=python)
    if component in NODE_COMPONENTS:
        if node is None:
            raise errors.BadRequest(f"{component} runs on a node, and this spec has no node "
                                    "section")
        if node.mesh_host and component != MESHAGENT:
            raise errors.BadRequest(f"{component} does not run on a mesh-only host "
                                    "(meshHost: true runs only the meshagent)")
        if component == CONTAINERD and node.containerd != BY_SERVICE:
            raise errors.BadRequest(f"this node's containerd is run by its node agent "
                                    f"(containerd: {node.containerd}), not on its own")
        return _node_command(node, component, python=python)
    raise errors.BadRequest(f"no component {component!r} (known: {', '.join(COMPONENTS)})")


def _control_plane_command(cp: ControlPlane, component: str, *, python: str) -> Command:
    if component == ETCD:
        client, peer = cp.etcd_client_url, cp.etcd_peer_url
        cluster = ",".join(cp.etcd_initial_cluster) or f"{cp.etcd_name}={peer}"
        return Command(ETCD, (
            "etcd", "--name", cp.etcd_name, "--data-dir", str(cp.etcd_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--experimental-watch-progress-notify-interval", "1s",
            "--logger", "zap", "--log-level", "warn",
        ), ready_url=f"{client}/health")  # fmt: skip
    if component == REGISTRY:
        return Command(REGISTRY, ("docker-registry", "serve", str(cp.registry_config)),
                       ready_url=f"http://{cp.registry}/v2/", notifies=False)
    return Command(APISERVER, (
        python, "-P", "-m", "apiserver.main", "serve", "--data-dir", str(cp.apiserver_dir),
        "--listen", cp.api_server, "--join-listen", cp.join_server,
        "--advertise", cp.api_server, "--metrics-listen", cp.apiserver_metrics,
        "--storage", "etcd", "--etcd-servers", ",".join(cp.all_etcd_servers),
        "--encryption-provider-config", str(cp.encryption_config), *cp.apiserver_args,
    ), ready_url=f"http://{cp.apiserver_metrics}/readyz")  # fmt: skip


def _node_command(node: NodeSpec, component: str, *, python: str) -> Command:
    if component == CONTAINERD:
        return Command(CONTAINERD, ("containerd", "--config", str(node.containerd_config)))
    if component == NODEAGENT:
        if node.containerd == BY_SERVICE:  # mirrors are in containerd's config (render)
            runtime: tuple[str, ...] = ("--cri-socket", f"unix://{node.containerd_socket}")
        else:
            runtime = tuple(f"--registry-mirror={m}" for m in node.mirrors)
        return Command(NODEAGENT, (
            python, "-P", "-m", "nodeagent.main", "run",
            "--node-name", node.name, "--node-ip", node.ip,
            "--listen", f"{node.ip}:{AGENT_PORT}", "--metrics-listen", node.agent_metrics,
            "--data-dir", str(node.data_dir), "--sandbox-image", node.sandbox_image,
            "--lease-renew-interval", _seconds(node.lease_renew_interval), *runtime,
        ), ready_url=f"http://{node.agent_metrics}/readyz")  # fmt: skip
    # A mesh-only host's DNS is the agent's by capture (as the lab's mesh hosts).
    role = ("--mesh-host", "--capture") if node.mesh_host else (
        "--capture", "--dns-ip", node.ip)
    return Command(MESHAGENT, (
        python, "-P", "-m", "meshagent.main", "run", "--node-name", node.name,
        "--config", str(node.node_config), *role,
        "--metrics-listen", node.mesh_metrics,
        *(("--zipkin-endpoint", node.zipkin_endpoint) if node.zipkin_endpoint else ()),
        *(("--access-log",) if node.access_log else ()),
        "--trace-sampling", f"{node.trace_sampling:g}",
    ), ready_url=f"http://{node.mesh_metrics}/readyz")  # fmt: skip


def join_command(node: NodeSpec, *, token: str, ca_cert_hash: str, python: str
                 ) -> tuple[str, ...]:
    """``shoal-nodeagent join`` for this node (idempotent: a node holding a valid
    certificate for this cluster does nothing)."""
    return (python, "-P", "-m", "nodeagent.main", "join", "--server", node.join_server,
            "--token", token, "--ca-cert-hash", ca_cert_hash, "--node-name", node.name,
            "--node-ip", node.ip, "--data-dir", str(node.data_dir),
            "--api-server", node.api_server,
            *(a for server in node.more_api_servers for a in ("--api-server", server)))


def mesh_host_routes(nodes: list[tuple[str, str]], *, service_cidr: str = SERVICE_CIDR
                     ) -> list[tuple[str, str]]:
    """A mesh-only host's routes, as (destination, via), from the Nodes' (podCIDR,
    InternalIP): each pod CIDR through its node (the tunnel goes to a pod's
    address:15008) and the service CIDR through the first node, as the lab's mesh
    hosts have (pure). A node without either is left out."""
    routes = sorted((cidr, ip) for cidr, ip in nodes if cidr and ip)
    return [*routes, (service_cidr, routes[0][1])] if routes else []


def mesh_host_routes_from_api(node: NodeSpec) -> list[tuple[str, str]]:
    """:func:`mesh_host_routes` for the Nodes the API lists now, read with the
    host's own identity (its node.conf: nodes may read Nodes)."""
    from shoal import config as configmod
    from shoal.api.core.v1 import core_pb2
    from shoal.client import Client

    with Client(configmod.load(node.node_config), timeout=15.0) as client:
        nodes = [(n.spec.pod_cidr, next((a.address for a in n.status.addresses
                                         if a.type == "InternalIP"), ""))
                 for n in client.list(core_pb2.Node).items]
    return mesh_host_routes(nodes)


def _seconds(value: float) -> str:
    return f"{value:g}"


# -- the files a component needs ------------------------------------------------------


def render(spec: Spec, component: str) -> list[Path]:
    """Write what ``component`` reads before it starts; returns the paths made or
    rewritten. Idempotent."""
    command(spec, component, python="")  # names a wrong component or a missing section
    cp, node = spec.control_plane, spec.node
    if component == REGISTRY and cp is not None:
        from shoal.testing import registry

        (cp.registry_dir / "data").mkdir(parents=True, exist_ok=True)
        cp.registry_config.write_text(registry.render_config(
            address=cp.registry, storage_dir=cp.registry_dir / "data"))
        return [cp.registry_config]
    if component == APISERVER and cp is not None:
        import shutil

        from apiserver import encryption, pki

        cp.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the CA key
        if cp.pki_from:  # one cluster, one CA and one set of keys: the first member's
            source = Path(cp.pki_from)
            if not (source / "pki" / "ca.key").exists():
                raise errors.BadRequest(f"pkiFrom: no CA in {source}/pki (start the first "
                                        "control-plane member first)")
            if not (cp.apiserver_dir / "pki").exists():
                shutil.copytree(source / "pki", cp.apiserver_dir / "pki")
            shared = source / cp.encryption_config.name
            if shared.exists() and not cp.encryption_config.exists():
                shutil.copyfile(shared, cp.encryption_config)
                cp.encryption_config.chmod(0o600)
        result = pki.init(cp.apiserver_dir, server_addresses=list(cp.all_api_servers),
                          extra_sans=[cp.address, *cp.extra_sans])
        shutil.copyfile(result.admin_config, cp.admin_config)
        cp.admin_config.chmod(0o600)
        made = [cp.encryption_config] if encryption.ensure_config_file(
            cp.encryption_config) else []
        return [cp.apiserver_dir / "pki" / name for name in result.created] + [
            cp.admin_config, *made]
    if component == CONTAINERD and node is not None:
        from nodeagent.containerd import parse_registry_mirror, write_registry_mirrors

        agent = agent_config(node)
        config = agent.containerd_config()
        for d in (config.root, config.state, agent.cni_conf_dir):
            d.mkdir(parents=True, exist_ok=True)
        node.containerd_config.write_text(config.render())
        written = write_registry_mirrors(agent.registry_config_dir,
                                         [parse_registry_mirror(m) for m in node.mirrors])
        return [node.containerd_config, *written]
    # etcd, the node agent, the mesh agent: only their data directory.
    base = node.data_dir if node is not None and component in NODE_COMPONENTS else \
        cp.data_dir if cp is not None else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    return []


def agent_config(node: NodeSpec) -> AgentConfig:
    """The node agent's own config for this node (its data layout and its
    containerd config come from there)."""
    from nodeagent.daemon import AgentConfig

    return AgentConfig(node_name=node.name, data_dir=node.data_dir, node_ip=node.ip,
                       sandbox_image=node.sandbox_image)


# -- the images every cluster has ---------------------------------------------------


def seed_registry(registry: str, *, images_dir: Path) -> list[str]:
    """Build the demo (busybox) and pause images and push them to ``registry``
    under the names a docker.io mirror serves; returns what was pushed."""
    for ref in build_images(images_dir):
        push_image(ref.archive, name=ref.name, registry=registry)
    return [in_registry(registry, name) for name in (DEMO_IMAGE, SANDBOX_IMAGE)]


def build_images(images_dir: Path) -> list[ImageRef]:
    from shoal import images

    return [images.build_busybox_image(images_dir / "busybox.tar", name=DEMO_IMAGE,
                                       cmd=["sh"]),
            images.build_sandbox_image(images_dir / "pause.tar", name=SANDBOX_IMAGE)]


def push_image(archive: Path, *, name: str, registry: str) -> None:
    from shoal import pushing

    pushing.push_archive(archive, in_registry(registry, name), insecure=True)


def in_registry(registry: str, name: str) -> str:
    """``docker.io/library/busybox:1.36`` as pushed to the cluster registry:
    ``10.77.0.1:5000/library/busybox:1.36`` (what a docker.io mirror serves)."""
    return f"{registry}/{name.split('/', 1)[1]}"


# -- the spec file ---------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _to_yaml_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def dump(spec: Spec) -> str:
    """The spec as YAML (what :func:`load` reads back)."""
    doc: dict[str, Any] = {}
    for key, part in (("controlPlane", spec.control_plane), ("node", spec.node)):
        if part is not None:
            doc[key] = {_camel(f.name): _to_yaml_value(getattr(part, f.name))
                        for f in dataclasses.fields(part)}
    return ("# Shoal node bootstrap spec: what this machine runs (python -m shoal.bootstrap)\n"
            + yaml.safe_dump(doc, sort_keys=False))


_TYPES: dict[str, type] = {"Path": Path, "str": str, "int": int, "float": float,
                           "bool": bool, "tuple[str, ...]": tuple}


def _part(cls: Any, where: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise errors.BadRequest(f"{where}: must be a mapping, not {type(raw).__name__}")
    fields = {_camel(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise errors.BadRequest(f"{where}.{unknown[0]}: unknown key (known: "
                                f"{', '.join(fields)})")
    values: dict[str, Any] = {}
    for key, f in fields.items():
        if key not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise errors.BadRequest(f"{where}.{key}: required")
            continue
        value, want = raw[key], _TYPES[str(f.type)]
        if want is Path:
            if not isinstance(value, str) or not value.startswith("/"):
                raise errors.BadRequest(f"{where}.{key}: must be an absolute path")
            value = Path(value)
        elif want is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise errors.BadRequest(f"{where}.{key}: must be a list of strings")
            value = tuple(value)
        elif want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise errors.BadRequest(f"{where}.{key}: must be {want.__name__}, not "
                                    f"{type(value).__name__}")
        values[f.name] = value
    return cls(**values)


def parse(text: str, *, source: str = "spec") -> Spec:
    """A spec from YAML; ``BadRequest`` names the first key that is wrong."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.BadRequest(f"{source}: not YAML: {e}") from None
    if not isinstance(raw, dict):
        raise errors.BadRequest(f"{source}: must be a mapping with controlPlane and/or node")
    unknown = sorted(set(raw) - {"controlPlane", "node"})
    if unknown:
        raise errors.BadRequest(f"{source}: unknown key {unknown[0]!r} (known: controlPlane, "
                                "node)")
    cp = _part(ControlPlane, f"{source}: controlPlane", raw["controlPlane"]) \
        if raw.get("controlPlane") is not None else None
    node = _part(NodeSpec, f"{source}: node", raw["node"]) \
        if raw.get("node") is not None else None
    if cp is None and node is None:
        raise errors.BadRequest(f"{source}: has neither controlPlane nor node")
    if node is not None and node.containerd not in (BY_AGENT, BY_SERVICE):
        raise errors.BadRequest(f"{source}: node.containerd: must be {BY_AGENT} or "
                                f"{BY_SERVICE}, not {node.containerd!r}")
    if node is not None and node.mesh_host and not node.mesh:
        raise errors.BadRequest(f"{source}: node.meshHost: a mesh-only host runs the mesh "
                                "agent, so it needs mesh: true")
    return Spec(control_plane=cp, node=node)


def load(path: Path) -> Spec:
    try:
        text = path.read_text()
    except OSError as e:
        raise errors.BadRequest(f"cannot read the bootstrap spec {path}: "
                                f"{e.strerror or e}") from None
    return parse(text, source=str(path))


def save(spec: Spec, path: Path) -> None:
    """Write the spec (atomically: a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump(spec))
    tmp.replace(path)


__all__ = [
    "APISERVER", "BY_AGENT", "BY_SERVICE", "COMPONENTS", "CONTAINERD", "ETCD", "MESHAGENT",
    "NODEAGENT", "REGISTRY", "Command", "ControlPlane", "NodeSpec", "Spec", "command",
    "dump", "join_command", "load", "mesh_host_routes", "mesh_host_routes_from_api", "parse",
    "render", "save",
]
