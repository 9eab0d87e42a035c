"""The lab's names and addresses, worked out from the node count alone (pure).

    host netns                                   node netns shoal-node-i
    ----------                                   -----------------------
    etcd        127.0.0.1:<free ports>
    apiserver   10.77.0.1:6443 (join :6444)      eth0 10.77.0.(10+i)/24
                metrics 127.0.0.1:9090            nodeagent :10250, metrics :10255
    registry    10.77.0.1:5000                    containerd (its own, started by the agent)
    bridge shoal0 10.77.0.1/24 --- veth shln-i ---+
                                                  cni0: this node's pods (the pod CIDR
                                                  comes from the apiserver's node IPAM)

With ``--control-planes N`` (3 or 5) member i of the control plane has the
bridge address 10.77.0.i (an extra address of shoal0) for its apiserver
(metrics on 10.77.0.i:9090; member 1 keeps 127.0.0.1:9090) and its own etcd on
loopback ports; member 1 also runs the registry. Member 1's data is the lab
dir itself, member i's is ``control-planes/cp-i``.

Nothing here touches the machine: ``plan(nodes=3, lab_dir=D)`` returns the same
frozen :class:`Topology` every time, and every other module of the lab takes
its names and addresses from it. The lab network has no default route and no
NAT: nothing in it can reach beyond the bridge.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

from shoal import bootstrap, errors

NodeName = NewType("NodeName", str)

DEFAULT_DIR = Path("/var/lib/shoal/lab")
DEFAULT_NODES = 3
MAX_NODES = 20
CONTROL_PLANE_SIZES = (1, 3, 5)  # etcd members: odd, so a majority survives a loss

BRIDGE = "shoal0"
NETWORK = ipaddress.IPv4Network("10.77.0.0/24")
GATEWAY = ipaddress.IPv4Address("10.77.0.1")
NODE_IP_OFFSET = 10              # node-i gets 10.77.0.(10+i)
NETNS_PREFIX = "shoal-node-"
VETH_PREFIX = "shln-"            # host side of a node's veth; the node side is eth0
NODE_IFACE = "eth0"
NODE_PREFIX = "node-"
CONTROL_PLANE = "control-plane"  # the host side, as a partition endpoint

# Ports and images: those of every Shoal machine (shoal.bootstrap).
API_PORT = bootstrap.API_PORT
JOIN_PORT = bootstrap.JOIN_PORT
API_METRICS = bootstrap.API_METRICS
REGISTRY_PORT = bootstrap.REGISTRY_PORT
AGENT_PORT = bootstrap.AGENT_PORT
AGENT_METRICS_PORT = bootstrap.AGENT_METRICS_PORT
DEMO_IMAGE = bootstrap.DEMO_IMAGE
SANDBOX_IMAGE = bootstrap.SANDBOX_IMAGE

# iptables chains the lab owns: one on the host, one in each node's netns.
FORWARD_CHAIN = "SHOAL-LAB-FWD"
PARTITION_CHAIN = "SHOAL-LAB-PARTITION"


@dataclass(frozen=True)
class Node:
    """One lab node: its names, its address, and where its data lives."""

    index: int
    name: NodeName
    netns: str
    host_veth: str
    ip: str
    data_dir: Path

    @property
    def netns_path(self) -> Path:
        return Path("/var/run/netns") / self.netns

    @property
    def address(self) -> str:
        """The node's address with the lab network's prefix, for ``ip addr add``."""
        return f"{self.ip}/{NETWORK.prefixlen}"

    @property
    def agent_listen(self) -> str:
        return f"{self.ip}:{AGENT_PORT}"

    @property
    def agent_metrics(self) -> str:
        return f"{self.ip}:{AGENT_METRICS_PORT}"

    @property
    def containerd_dir(self) -> Path:
        return self.data_dir / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.data_dir / "cni" / "net.d"

    @property
    def bootstrap_spec(self) -> Path:
        """This node's ``shoal.bootstrap`` spec, written by ``up``."""
        return self.data_dir / "bootstrap.yaml"


@dataclass(frozen=True)
class Topology:
    """The whole lab: control plane on the host, ``nodes`` in their own netns."""

    lab_dir: Path
    nodes: tuple[Node, ...]
    bridge: str = BRIDGE
    gateway: str = str(GATEWAY)

    @property
    def bridge_address(self) -> str:
        return f"{self.gateway}/{NETWORK.prefixlen}"

    @property
    def api_server(self) -> str:
        return f"{self.gateway}:{API_PORT}"

    @property
    def join_server(self) -> str:
        return f"{self.gateway}:{JOIN_PORT}"

    @property
    def registry(self) -> str:
        return f"{self.gateway}:{REGISTRY_PORT}"

    @property
    def state_file(self) -> Path:
        return self.lab_dir / "state.json"

    @property
    def state_lock(self) -> Path:
        return self.lab_dir / "state.lock"

    @property
    def admin_config(self) -> Path:
        return self.lab_dir / "admin.conf"

    @property
    def bootstrap_spec(self) -> Path:
        """The control plane's ``shoal.bootstrap`` spec (each node has its own)."""
        return self.lab_dir / "bootstrap.yaml"

    @property
    def etcd_dir(self) -> Path:
        return self.lab_dir / "etcd"

    @property
    def apiserver_dir(self) -> Path:
        return self.lab_dir / "apiserver"

    @property
    def registry_dir(self) -> Path:
        return self.lab_dir / "registry"

    @property
    def images_dir(self) -> Path:
        return self.lab_dir / "images"

    @property
    def logs_dir(self) -> Path:
        return self.lab_dir / "logs"

    @property
    def owned_entries(self) -> tuple[Path, ...]:
        """What the lab writes in its directory (all that ``--purge`` removes)."""
        return (self.etcd_dir, self.apiserver_dir, self.registry_dir, self.images_dir,
                self.logs_dir, self.lab_dir / "nodes", self.lab_dir / "control-planes",
                self.admin_config, self.bootstrap_spec,
                self.state_file, self.state_lock)

    def node(self, name: str) -> Node:
        """The node called ``name``; ``BadRequest`` names the ones there are."""
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise errors.BadRequest(f"no lab node {name!r} (the lab has: {known})")


@dataclass(frozen=True)
class ControlPlaneMember:
    """Member ``index`` (1-based) of the lab's control plane."""

    index: int
    address: str          # its apiserver's address on the bridge
    data_dir: Path

    @property
    def suffix(self) -> str:
        return "" if self.index == 1 else f"/cp-{self.index}"

    @property
    def etcd_process(self) -> str:
        return f"{bootstrap.ETCD}{self.suffix}"

    @property
    def apiserver_process(self) -> str:
        return f"{bootstrap.APISERVER}{self.suffix}"

    @property
    def etcd_name(self) -> str:
        return "shoal-lab" if self.index == 1 else f"shoal-lab-{self.index}"

    @property
    def api_server(self) -> str:
        return f"{self.address}:{API_PORT}"

    @property
    def bootstrap_spec(self) -> Path:
        """This member's ``shoal.bootstrap`` spec (member 1's is the lab's,
        :attr:`Topology.bootstrap_spec`: its data dir is the lab dir)."""
        return self.data_dir / "bootstrap.yaml"

    @property
    def metrics(self) -> str:
        return API_METRICS if self.index == 1 else f"{self.address}:{API_METRICS.rsplit(':')[1]}"


def control_plane_members(topology: Topology, count: int) -> tuple[ControlPlaneMember, ...]:
    if count not in CONTROL_PLANE_SIZES:
        sizes = ", ".join(map(str, CONTROL_PLANE_SIZES))
        raise errors.BadRequest(f"a lab's control plane has {sizes} members (an odd "
                                f"number: etcd needs a majority), not {count}")
    return tuple(ControlPlaneMember(
        index=i, address=str(GATEWAY + (i - 1)),
        data_dir=topology.lab_dir if i == 1 else
        topology.lab_dir / "control-planes" / f"cp-{i}") for i in range(1, count + 1))


def node_name(index: int) -> NodeName:
    return NodeName(f"{NODE_PREFIX}{index}")


def plan(*, nodes: int, lab_dir: Path) -> Topology:
    """The topology of a lab of ``nodes`` nodes (1..MAX_NODES) under ``lab_dir``."""
    if not 1 <= nodes <= MAX_NODES:
        raise errors.BadRequest(f"a lab has 1 to {MAX_NODES} nodes, not {nodes}")
    if not lab_dir.is_absolute():
        raise errors.BadRequest(f"the lab directory must be an absolute path: {lab_dir}")
    made = []
    for i in range(1, nodes + 1):
        name = node_name(i)
        made.append(Node(index=i, name=name, netns=f"{NETNS_PREFIX}{i}",
                         host_veth=f"{VETH_PREFIX}{i}",
                         ip=str(NETWORK.network_address + NODE_IP_OFFSET + i),
                         data_dir=lab_dir / "nodes" / name))
    return Topology(lab_dir=lab_dir, nodes=tuple(made))


@dataclass(frozen=True)
class Endpoint:
    """One side of a partition: a node (its IP, and its netns to put rules in) or
    the control plane (the host's bridge address; its rules go in the nodes)."""

    name: str
    ip: str
    netns: str | None  # None: the control plane
    # The control plane's other members' addresses (``--control-planes 3|5``).
    also: tuple[str, ...] = ()


def endpoint(topology: Topology, name: str, *, control_planes: int = 1) -> Endpoint:
    if name == CONTROL_PLANE:
        members = control_plane_members(topology, control_planes)
        return Endpoint(name=CONTROL_PLANE, ip=topology.gateway, netns=None,
                        also=tuple(m.address for m in members[1:]))
    n = topology.node(name)
    return Endpoint(name=n.name, ip=n.ip, netns=n.netns)


@dataclass(frozen=True)
class DropRule:
    """Drop traffic between ``netns``'s node and ``peer`` (an address or CIDR)."""

    netns: str
    peer: str


def partition_rules(a: Endpoint, b: Endpoint, *,
                    pod_cidrs: dict[str, tuple[str, ...]]) -> tuple[DropRule, ...]:
    """The drop rules that cut ``a`` from ``b``, both ways.

    Rules live in node netns only (the host's own traffic is never filtered): a
    node cut from another drops that node's IP and its pods' CIDRs; a node cut
    from the control plane drops the bridge address and every other member's.
    ``pod_cidrs`` maps a node name to the pod CIDRs routed to it (from the
    agent's routes); missing is fine.
    """
    if a.name == b.name:
        raise errors.BadRequest(f"cannot partition {a.name} from itself")
    if a.netns is None and b.netns is None:
        raise errors.BadRequest("a partition needs at least one node")
    rules: list[DropRule] = []
    for here, there in ((a, b), (b, a)):
        if here.netns is None:
            continue
        for peer in (there.ip, *there.also, *pod_cidrs.get(there.name, ())):
            rules.append(DropRule(netns=here.netns, peer=peer))
    return tuple(dict.fromkeys(rules))
