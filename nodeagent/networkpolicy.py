"""Kubernetes' NetworkPolicy for the pods on this node, in iptables chains of our own.

Semantics (networking.k8s.io/v1, as Kubernetes documents them):

- A pod selected by no policy is non-isolated: everything may reach it and it
  may reach everything. Isolation is per direction: a policy selecting the pod
  with "Ingress" in its policyTypes isolates its ingress, "Egress" its egress.
- An isolated pod accepts (sends) only what at least one rule of one policy
  selecting it allows; policies add up and never subtract.
- A rule with no ``from``/``to`` matches every peer, one with no ``ports`` every
  port and protocol. Peers: ``podSelector`` alone (pods of the policy's
  namespace), ``namespaceSelector`` alone (every pod of the matching
  namespaces), both (those pods of those namespaces), or ``ipBlock`` (a CIDR
  minus its ``except`` CIDRs). Ports: a number, a range (``endPort``), or a
  named container port (on the destination pod), per protocol (TCP, UDP, SCTP).
- Replies to allowed connections pass (conntrack ESTABLISHED,RELATED). DNS is
  not special. Traffic between a pod and its own node (kubelet probes, the
  node's DNS responder) is always allowed, as Kubernetes says.

Where the rules sit (every node's own network namespace, filter table)::

    FORWARD --> SHOAL-NETPOL
        ctstate RELATED,ESTABLISHED --> RETURN
        -s <local egress-isolated pod IP> --> SHOAL-NP-E-<hash>
        -d <local ingress-isolated pod IP> --> SHOAL-NP-I-<hash>
    SHOAL-NP-I-<hash> / SHOAL-NP-E-<hash>:  one line per allowed (peer CIDR,
        protocol, port range) --> RETURN;  last: REJECT (icmp-port-unreachable)

FORWARD sees pod traffic routed between nodes and, with br_netfilter
(``net.bridge.bridge-nf-call-iptables=1`` in the node's namespace, which the
syncer sets), traffic bridged between pods of the same node on ``cni0``. It
runs after nat PREROUTING, so a connection to a ClusterIP is checked against
the endpoint the service proxy DNATed it to (the pod's real IP and port), as
in Kubernetes. Each node enforces its own pods' side: egress where the sender
runs, ingress where the receiver runs. Peers are matched by pod IP (from pod
status), one iptables line per (peer IP, port) and no ipsets: the work per new
connection grows with the number of peers a policy selects (fine for hundreds
of pods, not for many thousands).

Sync, level-triggered (as the service proxy)::

    Pod/Namespace/NetworkPolicy informer change --> dirty --> sync
    sync: plan (pure) unchanged since the last write --> nothing; else one
          ``iptables-restore -w --noflush``: every chain of ours declared (so
          flushed and refilled atomically), stale SHOAL-NP-* chains deleted ->
          FORWARD jump ensured -> our lines read back as the drift reference
    every check_period: our lines differ from the reference (a flush, a deleted
          jump) --> full sync

``pod_view``, ``isolation``, ``plan_ruleset``, ``render`` and ``our_lines`` are
pure. The rules stay when the agent stops (as the service proxy's);
``cleanup`` removes them (``shoal lab down`` runs it through
``serviceproxy.cleanup``). Failed syncs are retried with back-off by the loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.serviceproxy import Iptables, IptablesCommands, Jump, existing_chains
from shoal import errors, netfilter, selectors
from shoal.api.core.v1 import core_pb2
from shoal.api.networking.v1 import networking_pb2
from shoal.backoff import Backoff
from shoal.client import AsyncClient
from shoal.informer import Informer

log = logging.getLogger(__name__)

POLICY_CHAIN = "SHOAL-NETPOL"
INGRESS_PREFIX = "SHOAL-NP-I-"
EGRESS_PREFIX = "SHOAL-NP-E-"
JUMP = Jump("filter", "FORWARD", ("-m", "comment", "--comment", "shoal network policies",
                                  "-j", POLICY_CHAIN))
REJECT = "REJECT --reject-with icmp-port-unreachable"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
BRIDGE_FILTERING = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class NamedPort:
    name: str
    protocol: str  # TCP, UDP or SCTP
    port: int


@dataclass(frozen=True)
class PodView:
    """What policies need of a pod: where it is, its labels and named ports."""

    namespace: str
    name: str
    ip: str
    node: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    ports: tuple[NamedPort, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_view(pod: core_pb2.Pod) -> PodView | None:
    """The pod as policies see it; None for a pod policies cannot apply to: no
    IPv4 address yet, host network (its traffic is the node's), or finished (its
    address may already be someone else's)."""
    ip = pod.status.pod_ip
    if (not ip or ":" in ip or pod.spec.host_network
            or pod.status.phase in ("Succeeded", "Failed")):
        return None
    ports = tuple(NamedPort(p.name, p.protocol or "TCP", int(p.container_port))
                  for c in pod.spec.containers for p in c.ports if p.name)
    return PodView(namespace=pod.metadata.namespace, name=pod.metadata.name, ip=ip,
                   node=pod.spec.node_name, labels=dict(pod.metadata.labels), ports=ports)


@dataclass(frozen=True, order=True)
class Allow:
    """Traffic one rule allows: from/to ``peer`` (a CIDR; None: anywhere), of
    ``protocol`` (None: any) to ports ``low..high`` (None: any)."""

    peer: str | None
    protocol: str | None
    ports: tuple[int, int] | None
    why: str = field(compare=False, default="")


@dataclass(frozen=True)
class Isolation:
    """One pod's verdict: None where a direction is not isolated, else what is allowed."""

    pod: PodView
    ingress: tuple[Allow, ...] | None
    egress: tuple[Allow, ...] | None


def policy_types(spec: networking_pb2.NetworkPolicySpec) -> tuple[str, ...]:
    """policyTypes, or Kubernetes' default when unset: Ingress, plus Egress with
    egress rules."""
    if spec.policy_types:
        return tuple(spec.policy_types)
    return ("Ingress", "Egress") if spec.egress else ("Ingress",)


def block_cidrs(cidr: str, excepts: Iterable[str]) -> list[str]:
    """``cidr`` minus ``excepts``, as a list of IPv4 CIDRs (IPv6 blocks: none,
    as these rules are iptables' IPv4 only)."""
    net = ipaddress.ip_network(cidr, strict=False)
    if not isinstance(net, ipaddress.IPv4Network):
        return []
    rest = [net]
    for text in excepts:
        cut = ipaddress.ip_network(text, strict=False)
        if not isinstance(cut, ipaddress.IPv4Network):
            continue
        kept: list[ipaddress.IPv4Network] = []
        for n in rest:
            if not n.overlaps(cut):
                kept.append(n)
            elif cut.subnet_of(n):
                kept.extend(n.address_exclude(cut))
            # else n lies inside cut: all of it is excepted
        rest = kept
    return [str(n) for n in ipaddress.collapse_addresses(rest)]


def _in_block(ip: str, cidrs: Sequence[str]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(c) for c in cidrs)


class _Cluster:
    """The pods and namespace labels peers are resolved against."""

    def __init__(self, pods: Sequence[PodView], namespaces: Mapping[str, Mapping[str, str]]):
        self.pods = pods
        self.namespaces = namespaces

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        # A namespace the informer has not seen yet still has its name label.
        return self.namespaces.get(namespace) or {NAMESPACE_NAME_LABEL: namespace}

    def peer_pods(self, peer: networking_pb2.NetworkPolicyPeer, policy_ns: str
                  ) -> list[PodView]:
        pod_sel = selectors.from_proto(peer.pod_selector) \
            if peer.HasField("pod_selector") else None
        if peer.HasField("namespace_selector"):
            ns_sel = selectors.from_proto(peer.namespace_selector)
            found = [p for p in self.pods if ns_sel.matches(self.namespace_labels(p.namespace))]
        else:
            found = [p for p in self.pods if p.namespace == policy_ns]
        return found if pod_sel is None else [p for p in found if pod_sel.matches(p.labels)]


def _port_range(port: networking_pb2.NetworkPolicyPort) -> tuple[int, int]:
    n = int(port.port.int_val)
    return (n, int(port.end_port) if port.HasField("end_port") else n)


def _rule_allows(*, rule: Any, peers: Sequence[networking_pb2.NetworkPolicyPeer],
                 direction: str, pod: PodView, policy: networking_pb2.NetworkPolicy,
                 cluster: _Cluster, why: str) -> list[Allow]:
    """What one ingress (``from``) or egress (``to``) rule allows for ``pod``."""
    ns = policy.metadata.namespace
    # Peers as CIDRs (None: any), and the pods they cover (for named ports).
    cidrs: list[str] | None = None
    peer_pods: list[PodView] = list(cluster.pods)
    if peers:
        cidrs, peer_pods = [], []
        for peer in peers:
            if peer.HasField("ip_block"):
                block = block_cidrs(peer.ip_block.cidr, peer.ip_block.except_)
                cidrs += block
                peer_pods += [p for p in cluster.pods if _in_block(p.ip, block)]
            else:
                found = cluster.peer_pods(peer, ns)
                cidrs += [f"{p.ip}/32" for p in found]
                peer_pods += found
    out: list[Allow] = []
    if not rule.ports:
        return [Allow(c, None, None, why) for c in (cidrs if cidrs is not None else [None])]
    for port in rule.ports:
        protocol = port.protocol or "TCP"
        if port.port.WhichOneof("value") == "str_val":
            # A named port is the destination pod's: ours for ingress, each
            # peer's for egress.
            name = port.port.str_val
            targets = [pod] if direction == "ingress" else peer_pods
            for target in targets:
                for np in target.ports:
                    if np.name == name and np.protocol == protocol:
                        to = cidrs if direction == "ingress" else [f"{target.ip}/32"]
                        out += [Allow(c, protocol.lower(), (np.port, np.port), why)
                                for c in (to if to is not None else [None])]
            continue
        ports = _port_range(port) if port.HasField("port") else None
        out += [Allow(c, protocol.lower(), ports, why)
                for c in (cidrs if cidrs is not None else [None])]
    return out


def isolation(pod: PodView, policies: Sequence[networking_pb2.NetworkPolicy],
              cluster: _Cluster) -> Isolation:
    """Which directions of ``pod`` the policies isolate, and what they allow (pure)."""
    ingress: list[Allow] | None = None
    egress: list[Allow] | None = None
    for policy in policies:
        if policy.metadata.namespace != pod.namespace:
            continue
        spec = policy.spec
        if not selectors.from_proto(spec.pod_selector).matches(pod.labels):
            continue
        types = policy_types(spec)
        name = f"{policy.metadata.namespace}/{policy.metadata.name}"
        if "Ingress" in types:
            ingress = ingress or []
            for i, irule in enumerate(spec.ingress):
                ingress += _rule_allows(rule=irule, peers=irule.from_, direction="ingress",
                                        pod=pod, policy=policy, cluster=cluster,
                                        why=f"{name} ingress[{i}]")
        if "Egress" in types:
            egress = egress or []
            for i, erule in enumerate(spec.egress):
                egress += _rule_allows(rule=erule, peers=erule.to, direction="egress",
                                       pod=pod, policy=policy, cluster=cluster,
                                       why=f"{name} egress[{i}]")
    return Isolation(pod=pod, ingress=_dedup(ingress), egress=_dedup(egress))


def _dedup(allows: list[Allow] | None) -> tuple[Allow, ...] | None:
    if allows is None:
        return None
    seen: dict[Allow, Allow] = {}
    for a in allows:
        seen.setdefault(a, a)
    return tuple(sorted(seen.values(), key=lambda a: (a.peer or "", a.protocol or "",
                                                      a.ports or (0, 0))))


def _chain(prefix: str, pod: PodView) -> str:
    digest = hashlib.sha256(pod.key.encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def ingress_chain(pod: PodView) -> str:
    return _chain(INGRESS_PREFIX, pod)


def egress_chain(pod: PodView) -> str:
    return _chain(EGRESS_PREFIX, pod)


def _q(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def _allow_line(chain: str, allow: Allow, *, peer_flag: str) -> str:
    parts = [f"-A {chain}"]
    if allow.peer is not None:
        parts.append(f"{peer_flag} {allow.peer}")
    if allow.protocol is not None:
        parts.append(f"-p {allow.protocol} -m {allow.protocol}")
        if allow.ports is not None:
            low, high = allow.ports
            parts.append(f"--dport {low}" if low == high else f"--dport {low}:{high}")
    parts.append(f"-m comment --comment {_q(allow.why)} -j RETURN")
    return " ".join(parts)


@dataclass(frozen=True)
class Ruleset:
    """Every filter-table chain of ours and its rules, in order (``-A ...`` lines)."""

    chains: Mapping[str, tuple[str, ...]]
    problems: tuple[str, ...] = ()


def _check_selectors(policy: networking_pb2.NetworkPolicy) -> None:
    """Raise if a selector or an ipBlock of the policy cannot be read."""
    spec = policy.spec
    selectors.from_proto(spec.pod_selector)
    peers = [*(p for r in spec.ingress for p in r.from_), *(p for r in spec.egress for p in r.to)]
    for peer in peers:
        for sel in ("pod_selector", "namespace_selector"):
            if peer.HasField(sel):
                selectors.from_proto(getattr(peer, sel))
        if peer.HasField("ip_block"):
            block_cidrs(peer.ip_block.cidr, peer.ip_block.except_)


def _pod_chain(pod: PodView, direction: str, allows: Sequence[Allow]
               ) -> tuple[str, str, tuple[str, ...]]:
    """The jump from SHOAL-NETPOL for one isolated direction of a pod, its
    chain's name, and the chain: what is allowed, then REJECT (pure)."""
    egress = direction == "egress"
    chain = egress_chain(pod) if egress else ingress_chain(pod)
    own, peer = ("-s", "-d") if egress else ("-d", "-s")
    jump = (f"-A {POLICY_CHAIN} {own} {pod.ip}/32 -m comment --comment "
            f"{_q(pod.key + ' ' + direction)} -j {chain}")
    lines = (*(_allow_line(chain, a, peer_flag=peer) for a in allows),
             f"-A {chain} -m comment --comment "
             f"{_q(pod.key + ' ' + direction + ': no policy allows it')} -j {REJECT}")
    return jump, chain, lines


def plan_ruleset(*, local: Sequence[PodView], pods: Sequence[PodView],
                 namespaces: Mapping[str, Mapping[str, str]],
                 policies: Sequence[networking_pb2.NetworkPolicy]) -> Ruleset:
    """The chains for this node's pods (``local``), given every pod (peers), the
    namespaces' labels and the policies (pure).

    A policy whose selectors cannot be read is left out and reported in
    ``problems`` (the API's validation keeps such policies out)."""
    problems: list[str] = []
    usable: list[networking_pb2.NetworkPolicy] = []
    cluster = _Cluster(pods, namespaces)
    for policy in policies:
        try:
            _check_selectors(policy)
            usable.append(policy)
        except (errors.ShoalError, ValueError) as e:
            problems.append(f"{policy.metadata.namespace}/{policy.metadata.name}: {e}")
    chains: dict[str, tuple[str, ...]] = {}
    jumps: dict[str, list[str]] = {"egress": [], "ingress": []}
    for pod in sorted(local, key=lambda p: p.key):
        iso = isolation(pod, usable, cluster)
        for direction, allows in (("egress", iso.egress), ("ingress", iso.ingress)):
            if allows is not None:
                jump, chain, lines = _pod_chain(pod, direction, allows)
                jumps[direction].append(jump)
                chains[chain] = lines
    top: list[str] = []
    if jumps["egress"] or jumps["ingress"]:
        top = [f"-A {POLICY_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
               *jumps["egress"], *jumps["ingress"]]
    return Ruleset(chains={POLICY_CHAIN: tuple(top), **chains}, problems=tuple(problems))


def _ours(chain: str) -> bool:
    return chain == POLICY_CHAIN or chain.startswith((INGRESS_PREFIX, EGRESS_PREFIX))


def stale_chains(rules: Ruleset, existing: Iterable[str]) -> list[str]:
    return sorted(c for c in set(existing) if _ours(c) and c not in rules.chains)


def render(rules: Ruleset, *, stale: Iterable[str] = ()) -> str:
    """``iptables-restore --noflush`` input: every chain of ours declared (so
    flushed) and refilled, ``stale`` ones deleted (pure)."""
    gone = sorted(set(stale))
    lines = ["*filter", *(f":{c} - [0:0]" for c in [*rules.chains, *gone])]
    for chain_rules in rules.chains.values():
        lines += chain_rules
    lines += [f"-X {c}" for c in gone]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def our_lines(save: str) -> list[str]:
    """The lines of a filter-table ``iptables-save`` about our chains (pure):
    their declarations (counters dropped), their rules and jumps to them."""
    return netfilter.lines_about(save, _ours)


def matches_plan(rules: Ruleset, ours: Sequence[str]) -> bool:
    """Whether a read-back holds every chain with as many rules as planned and
    the FORWARD jump (pure); see ``serviceproxy.matches_plan``."""
    counts: dict[str, int] = {}
    jumped = False
    for line in ours:
        if line.startswith("-A "):
            words = line.split()
            counts[words[1]] = counts.get(words[1], 0) + 1
            if words[1] == JUMP.chain and words[-1] == POLICY_CHAIN:
                jumped = True
    return jumped and all(counts.get(c, 0) == len(r) for c, r in rules.chains.items())


# --------------------------------------------------------------------------- the node


def ensure_bridge_filtering(path: Path = BRIDGE_FILTERING) -> str:
    """Make bridged pod traffic (same node, over ``cni0``) cross iptables: set
    ``bridge-nf-call-iptables`` in our network namespace, loading br_netfilter
    first if needed. Returns a problem, or "" when it is on."""
    if not path.exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, check=False)
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
        return ""
    except OSError as e:
        return (f"cannot turn on br_netfilter ({e}): traffic between pods of the same "
                "node is not filtered by network policies")


# --------------------------------------------------------------------------- the loop


class NetworkPolicies:
    """Keeps this node's policy chains in line with the cluster (see the module doc)."""

    def __init__(self, *, client: AsyncClient, node_name: str,
                 iptables: Iptables | None = None, check_period: float = 5.0,
                 min_interval: float = 0.2,
                 pods: Informer[core_pb2.Pod] | None = None,
                 namespaces: Informer[core_pb2.Namespace] | None = None,
                 policies: Informer[networking_pb2.NetworkPolicy] | None = None,
                 bridge_filtering: Path | None = BRIDGE_FILTERING,
                 changes: netfilter.Polling | None = None) -> None:
        self.node_name = node_name
        self.iptables: Iptables = iptables or IptablesCommands()
        self.check_period = check_period
        # nf_tables change notifications: drift is looked for when the ruleset
        # changes (and every WATCHED_CHECK_PERIOD), not every check_period.
        self.changes = changes or netfilter.Polling()
        self.min_interval = min_interval
        self.bridge_filtering = bridge_filtering
        self.pods = pods or Informer(client, core_pb2.Pod)
        self.namespaces = namespaces or Informer(client, core_pb2.Namespace)
        self.policies = policies or Informer(client, networking_pb2.NetworkPolicy)
        for inf in (self.pods, self.namespaces, self.policies):
            inf.add_handlers(on_add=self._changed, on_update=self._changed2,
                             on_delete=self._changed)
        self._dirty = asyncio.Event()
        self.applied: list[str] | None = None  # our lines as read back after the last sync
        self._written: Ruleset | None = None
        self.syncs = 0
        self.repairs = 0

    def _changed(self, _obj: object) -> None:
        self._dirty.set()

    def _changed2(self, _old: object, _new: object) -> None:
        self._dirty.set()

    def plan(self) -> Ruleset:
        views = [v for v in map(pod_view, self.pods.list()) if v is not None]
        return plan_ruleset(
            local=[v for v in views if v.node == self.node_name], pods=views,
            namespaces={n.metadata.name: dict(n.metadata.labels)
                        for n in self.namespaces.list()},
            policies=self.policies.list())

    async def _read_back(self) -> list[str]:
        return our_lines(await self.iptables.save("filter"))

    async def sync(self, *, full: bool = False) -> None:
        rules = self.plan()
        if not full and self._written is not None and rules == self._written:
            return
        for problem in rules.problems:
            log.warning("network policy left out: %s", problem)
        self._written = None  # unknown until this sync succeeds
        save = await self.iptables.save("filter")
        await self.iptables.restore(render(rules, stale=stale_chains(rules,
                                                                     existing_chains(save))))
        await self.iptables.ensure_jump(JUMP)
        self.applied = await self._read_back()
        if not matches_plan(rules, self.applied):
            log.warning("network policy: our iptables rules changed while we wrote them; "
                        "rewriting them at the next check")
            self.applied = None
        self._written = rules
        self.syncs += 1
        log.debug("network policy: %d chains synced", len(rules.chains))

    async def drifted(self) -> bool:
        return self.applied is None or await self._read_back() != self.applied

    async def run(self) -> None:
        if self.bridge_filtering is not None:
            problem = await asyncio.to_thread(ensure_bridge_filtering, self.bridge_filtering)
            if problem:
                log.warning("network policy: %s", problem)
        backoff = Backoff(base=0.5, cap=30.0)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.pods.run(), name="netpol-pods")
            tg.create_task(self.namespaces.run(), name="netpol-namespaces")
            tg.create_task(self.policies.run(), name="netpol-policies")
            for synced in (self.pods.synced, self.namespaces.synced, self.policies.synced):
                await synced.wait()
            self._dirty.set()
            while True:
                await self.changes.wait(self._dirty, self.check_period)
                try:
                    if self._dirty.is_set():
                        self._dirty.clear()
                        await self.sync()
                    else:
                        self.changes.take()  # a change after the read-back wakes us again
                        if await self.drifted():
                            log.warning("network policy: our iptables rules changed under "
                                        "us; putting them back")
                            self.repairs += 1
                            await self.sync(full=True)
                    backoff.reset()
                except errors.ShoalError as e:
                    self._dirty.set()
                    self._written = None
                    delay = backoff.next()
                    log.warning("network policy: sync failed: %s; retrying in %.1fs", e, delay)
                    await asyncio.sleep(delay)
                    continue
                await asyncio.sleep(self.min_interval)


# --------------------------------------------------------------------------- cleanup


def cleanup(*, netns: str | None = None, binary: str = "iptables") -> list[str]:
    """Remove the jump and every chain of ours. Returns problems."""
    problem = netfilter.remove_ours("filter", _ours, binary=binary, netns=netns)
    return [problem] if problem else []
