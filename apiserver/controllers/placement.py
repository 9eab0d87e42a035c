"""Where a pod may run, and where it should: the scheduler's filters and scores (pure).

Nothing here does I/O or reads a clock. ``scheduling`` feeds it from informers
and carries out what it decides.

    pod_info(Pod) -> PodInfo            what the pod asks for, parsed once
    ClusterState                        NodeInfo per node: allocatable, the requests
                                        of its pods (bound and assumed), owners,
                                        ports; kept up to date incrementally
    schedule(pod, state, start=...)     -> Decision (a node, or why none fits)

``schedule`` follows kube-scheduler's cycle:

    prefilter     pod (anti-)affinity domains, computed once per attempt
    filter        nodes in order from ``start`` (a rotating offset), stopping at
                  num_feasible_nodes_to_find(n) feasible ones (all of them below
                  100 nodes; 50% - n/125, at least 5% and 100 nodes, above)
    score         least allocated (weight 1), owner spread (2), preferred node
                  affinity (2), PreferNoSchedule taints (3); each normalised to
                  0..100 over the scored nodes, as kube's DefaultNormalizeScore
    select        the highest total; ties broken by ``rng`` (first one without)

Filters, in kube's plugin order; the first that fails names the node's reason
(resources may name several), and a pod that fits nowhere gets kube's message,
``0/5 nodes are available: 2 Insufficient cpu, 3 node(s) didn't match Pod's
node affinity/selector.``

1. NodeUnschedulable  ``spec.unschedulable`` unless the pod tolerates
                      ``node.kubernetes.io/unschedulable:NoSchedule``
2. TaintToleration    NoSchedule and NoExecute taints; a node whose Ready
                      condition is not True carries an implicit
                      ``node.kubernetes.io/not-ready`` (False or missing) or
                      ``.../unreachable`` (Unknown) NoSchedule taint, as the node
                      lifecycle controller would put on it
3. NodeAffinity       ``nodeSelector`` and required node affinity
4. NodePorts          host ports already taken on the node
5. NodeResourcesFit   pods count, cpu, memory and other requested resources
                      against allocatable minus the requests already there
6. InterPodAffinity   required pod affinity, required pod anti-affinity, and
                      the anti-affinity of pods already running (any topology
                      key; ``kubernetes.io/hostname`` makes each node a domain)

Not modelled: preemption, volumes, topology spread constraints, preferred pod
(anti-)affinity and namespace selectors with requirements (an empty
``namespaceSelector`` means all namespaces; a non-empty one is ignored).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice

from apiserver.controllers.taints import (
    NO_EXECUTE,
    NO_SCHEDULE,
    PREFER_NO_SCHEDULE,
)
from apiserver.controllers.taints import NOT_READY as TAINT_NOT_READY
from apiserver.controllers.taints import UNREACHABLE as TAINT_UNREACHABLE
from apiserver.controllers.taints import UNSCHEDULABLE as TAINT_UNSCHEDULABLE
from shoal import errors, quantity, selectors
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2

MAX_NODE_SCORE = 100
# kube's non-zero defaults for scoring a container that requests nothing.
DEFAULT_MILLI_CPU_REQUEST = 100
DEFAULT_MEMORY_REQUEST = 200 * 1024 * 1024
MIN_FEASIBLE_NODES_TO_FIND = 100
MIN_FEASIBLE_NODES_PERCENTAGE_TO_FIND = 5

HOSTNAME_LABEL = "kubernetes.io/hostname"

# Filter failures, in kube-scheduler's words.
REASON_UNSCHEDULABLE = "node(s) were unschedulable"
REASON_NODE_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
REASON_PORTS = "node(s) didn't have free ports for the requested pod ports"
REASON_TOO_MANY_PODS = "Too many pods"
REASON_AFFINITY = "node(s) didn't match pod affinity rules"
REASON_ANTI_AFFINITY = "node(s) didn't match pod anti-affinity rules"
REASON_EXISTING_ANTI_AFFINITY = "node(s) didn't satisfy existing pods anti-affinity rules"
NO_NODES = "no nodes available to schedule pods"

# Score weights of kube's default profile.
WEIGHT_LEAST_ALLOCATED = 1
WEIGHT_SPREAD = 2
WEIGHT_NODE_AFFINITY = 2
WEIGHT_TAINTS = 3

_CPU, _MEMORY, _PODS = "cpu", "memory", "pods"


def insufficient(resource: str) -> str:
    return f"Insufficient {resource}"


def untolerated(taint: Taint) -> str:
    return f"node(s) had untolerated taint {{{taint.key}: {taint.value}}}"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str = ""
    effect: str = NO_SCHEDULE


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    def tolerates(self, taint: Taint) -> bool:
        """kube's ToleratesTaint: effect and key match when set; Exists ignores the value."""
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        if self.operator == "Exists":
            return True
        return self.operator in ("", "Equal") and self.value == taint.value


def tolerated(taint: Taint, tolerations: Iterable[Toleration]) -> bool:
    return any(t.tolerates(taint) for t in tolerations)


@dataclass(frozen=True, slots=True)
class NodeRequirement:
    """One ``matchExpressions`` (on labels) or ``matchFields`` (on metadata.name) entry."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        value = labels.get(self.key)
        if op == "In":
            return value is not None and value in self.values
        if op == "NotIn":
            return value is None or value not in self.values
        if op == "Exists":
            return value is not None
        if op == "DoesNotExist":
            return value is None
        if op in ("Gt", "Lt") and value is not None and len(self.values) == 1:
            try:
                have, want = int(value), int(self.values[0])
            except ValueError:
                return False
            return have > want if op == "Gt" else have < want
        return False


@dataclass(frozen=True, slots=True)
class NodeTerm:
    """A ``NodeSelectorTerm``: all its requirements hold. An empty term matches nothing."""

    expressions: tuple[NodeRequirement, ...] = ()
    fields: tuple[NodeRequirement, ...] = ()

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        if not self.expressions and not self.fields:
            return False
        if not all(r.matches(labels) for r in self.expressions):
            return False
        if self.fields:
            node_fields = {"metadata.name": name}
            return all(r.matches(node_fields) for r in self.fields)
        return True


@dataclass(frozen=True, slots=True)
class AffinityTerm:
    """A required ``PodAffinityTerm``: pods matching it, in a domain of ``topology_key``."""

    selector: selectors.LabelSelector
    namespaces: frozenset[str]          # empty: every namespace
    topology_key: str

    def matches(self, pod: PodInfo) -> bool:
        if self.namespaces and pod.namespace not in self.namespaces:
            return False
        return self.selector.matches(pod.labels)


@dataclass(frozen=True, slots=True)
class HostPort:
    ip: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What the scheduler needs of a pod, parsed once from the API object."""

    key: str
    namespace: str
    name: str
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    cpu: int = 0                           # requests, millicores
    memory: int = 0                        # requests, bytes
    scalar: tuple[tuple[str, int], ...] = ()   # other requested resources
    nz_cpu: int = DEFAULT_MILLI_CPU_REQUEST     # requests for scoring (kube's non-zero)
    nz_memory: int = DEFAULT_MEMORY_REQUEST
    node_selector: tuple[tuple[str, str], ...] = ()
    required: tuple[NodeTerm, ...] | None = None     # None: no required node affinity
    preferred: tuple[tuple[int, NodeTerm], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    owner: str = ""                        # uid of the controller ownerReference
    host_ports: tuple[HostPort, ...] = ()
    affinity: tuple[AffinityTerm, ...] = ()
    anti_affinity: tuple[AffinityTerm, ...] = ()

    @property
    def plain(self) -> bool:
        """Asks for nothing a node-by-node check beyond cpu/memory/pods must look at."""
        return not (self.node_selector or self.required is not None or self.scalar
                    or self.host_ports or self.affinity or self.anti_affinity)


# --------------------------------------------------------------------------- parsing


@functools.lru_cache(maxsize=4096)
def _milli(text: str) -> int:
    return quantity.milli(text)


@functools.lru_cache(maxsize=4096)
def _whole(text: str) -> int:
    return quantity.to_int(text)


def _amount(resource: str, q: meta_pb2.Quantity) -> int:
    try:
        return _milli(q.value) if resource == _CPU else _whole(q.value)
    except quantity.QuantityError:
        return 0


def _container_requests(c: core_pb2.Container, *, non_zero: bool) -> dict[str, int]:
    out = {name: _amount(name, q) for name, q in c.resources.requests.items()}
    if non_zero:
        out.setdefault(_CPU, DEFAULT_MILLI_CPU_REQUEST)
        out.setdefault(_MEMORY, DEFAULT_MEMORY_REQUEST)
    return out


def _add(into: dict[str, int], more: Mapping[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def _max(into: dict[str, int], other: Mapping[str, int]) -> None:
    for k, v in other.items():
        if v > into.get(k, 0):
            into[k] = v


def pod_requests(spec: core_pb2.PodSpec, *, non_zero: bool = False) -> dict[str, int]:
    """kube's PodRequests: containers summed, init containers as a peak (sidecars
    counted alongside), plus overhead. ``non_zero`` fills kube's scoring defaults
    (100m cpu, 200Mi memory) into containers that request nothing."""
    reqs: dict[str, int] = {}
    for c in spec.containers:
        _add(reqs, _container_requests(c, non_zero=non_zero))
    sidecars: dict[str, int] = {}
    peak: dict[str, int] = {}
    for c in spec.init_containers:
        r = _container_requests(c, non_zero=non_zero)
        if c.HasField("restart_policy") and c.restart_policy == "Always":
            _add(reqs, r)
            _add(sidecars, r)
            _max(peak, sidecars)
        else:
            step = dict(r)
            _add(step, sidecars)
            _max(peak, step)
    _max(reqs, peak)
    _add(reqs, {name: _amount(name, q) for name, q in spec.overhead.items()})
    return reqs


def _node_term(term: core_pb2.NodeSelectorTerm) -> NodeTerm:
    return NodeTerm(
        expressions=tuple(NodeRequirement(r.key, r.operator, tuple(r.values))
                          for r in term.match_expressions),
        fields=tuple(NodeRequirement(r.key, r.operator, tuple(r.values))
                     for r in term.match_fields))


def _affinity_term(term: core_pb2.PodAffinityTerm, namespace: str) -> AffinityTerm:
    try:
        sel = selectors.from_proto(term.label_selector if term.HasField("label_selector")
                                   else None)
    except errors.ShoalError:
        sel = selectors.NOTHING
    if term.HasField("namespace_selector") and not term.namespace_selector.match_labels \
            and not term.namespace_selector.match_expressions:
        namespaces: frozenset[str] = frozenset()
    else:
        namespaces = frozenset(term.namespaces) or frozenset([namespace])
    return AffinityTerm(selector=sel, namespaces=namespaces, topology_key=term.topology_key)


def controller_uid(meta: meta_pb2.ObjectMeta) -> str:
    for ref in meta.owner_references:
        if ref.HasField("controller") and ref.controller:
            return ref.uid
    return ""


def pod_info(pod: core_pb2.Pod) -> PodInfo:
    """Parse what scheduling needs from a Pod (requests, selectors, tolerations...)."""
    meta, spec = pod.metadata, pod.spec
    reqs = pod_requests(spec)
    nz = pod_requests(spec, non_zero=True)
    aff = spec.affinity
    node_aff = aff.node_affinity
    required: tuple[NodeTerm, ...] | None = None
    if node_aff.HasField("required_during_scheduling_ignored_during_execution"):
        required = tuple(_node_term(t) for t in node_aff.
                         required_during_scheduling_ignored_during_execution.node_selector_terms)
    preferred = tuple((p.weight, _node_term(p.preference)) for p in
                      node_aff.preferred_during_scheduling_ignored_during_execution
                      if p.weight)
    ports = tuple(HostPort(p.host_ip or "0.0.0.0", p.protocol or "TCP", p.host_port)
                  for c in (*spec.init_containers, *spec.containers)
                  for p in c.ports if p.host_port)
    return PodInfo(
        key=f"{meta.namespace}/{meta.name}", namespace=meta.namespace, name=meta.name,
        uid=meta.uid, labels=dict(meta.labels),
        cpu=reqs.pop(_CPU, 0), memory=reqs.pop(_MEMORY, 0),
        scalar=tuple(sorted((k, v) for k, v in reqs.items() if v and k != _PODS)),
        nz_cpu=nz.get(_CPU, 0), nz_memory=nz.get(_MEMORY, 0),
        node_selector=tuple(sorted(spec.node_selector.items())),
        required=required, preferred=preferred,
        tolerations=tuple(Toleration(t.key, t.operator, t.value, t.effect)
                          for t in spec.tolerations),
        owner=controller_uid(meta), host_ports=ports,
        affinity=tuple(_affinity_term(t, meta.namespace) for t in
                       aff.pod_affinity.required_during_scheduling_ignored_during_execution),
        anti_affinity=tuple(
            _affinity_term(t, meta.namespace) for t in
            aff.pod_anti_affinity.required_during_scheduling_ignored_during_execution))


def is_terminal(pod: core_pb2.Pod) -> bool:
    return pod.status.phase in ("Succeeded", "Failed")


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """The scheduling-relevant part of a Node object; equal specs schedule alike."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()          # NoSchedule/NoExecute, implicit ones included
    soft_taints: tuple[Taint, ...] = ()     # PreferNoSchedule
    unschedulable: bool = False
    cpu: int = 0                            # allocatable, millicores
    memory: int = 0                         # allocatable, bytes
    pods: int = 0                           # allocatable pod count
    scalar: tuple[tuple[str, int], ...] = ()


def node_spec(node: core_pb2.Node) -> NodeSpec:
    """What scheduling needs of a Node: labels, taints (with the implicit not-ready
    one), cordon and allocatable."""
    ready = next((c.status for c in node.status.conditions if c.type == "Ready"), "")
    taints = [Taint(t.key, t.value, t.effect) for t in node.spec.taints]
    if ready != "True":
        implicit = TAINT_UNREACHABLE if ready == "Unknown" else TAINT_NOT_READY
        if not any(t.key == implicit and t.effect == NO_SCHEDULE for t in taints):
            taints.append(Taint(implicit, "", NO_SCHEDULE))
    alloc = {name: _amount(name, q) for name, q in node.status.allocatable.items()}
    return NodeSpec(
        name=node.metadata.name, labels=dict(node.metadata.labels),
        taints=tuple(t for t in taints if t.effect in (NO_SCHEDULE, NO_EXECUTE)),
        soft_taints=tuple(t for t in taints if t.effect == PREFER_NO_SCHEDULE),
        unschedulable=node.spec.unschedulable,
        cpu=alloc.pop(_CPU, 0), memory=alloc.pop(_MEMORY, 0), pods=alloc.pop(_PODS, 0),
        scalar=tuple(sorted(alloc.items())))


class NodeInfo:
    """One node and the pods on it (bound or assumed), with running totals.

    Mutable, owned by :class:`ClusterState`; ``schedule`` only reads it. The
    ``free_*`` figures are allocatable minus the requests of the pods here.
    """

    __slots__ = ("free_cpu", "free_memory", "free_pods", "free_scalar", "labels", "name",
                 "nz_cpu", "nz_memory", "owners", "pods", "ports", "present", "spec",
                 "untainted")

    def __init__(self, name: str) -> None:
        self.name = name
        self.present = False       # False: a placeholder holding pods of an unseen node
        self.spec = NodeSpec(name=name)
        self.labels: Mapping[str, str] = self.spec.labels
        self.untainted = False     # schedulable with no hard taint: any pod passes 1-2
        self.pods: dict[str, PodInfo] = {}
        self.owners: dict[str, int] = {}
        self.ports: dict[HostPort, int] = {}
        self.free_cpu = self.free_memory = self.free_pods = 0
        self.free_scalar: dict[str, int] = {}
        self.nz_cpu = self.nz_memory = 0

    def set_spec(self, spec: NodeSpec) -> None:
        self.present = True
        self.spec = spec
        self.labels = spec.labels
        self.untainted = not spec.unschedulable and not spec.taints
        self._recount()

    def _recount(self) -> None:
        spec = self.spec
        self.free_cpu = spec.cpu - sum(p.cpu for p in self.pods.values())
        self.free_memory = spec.memory - sum(p.memory for p in self.pods.values())
        self.free_pods = spec.pods - len(self.pods)
        free = dict(spec.scalar)
        for p in self.pods.values():
            for k, v in p.scalar:
                free[k] = free.get(k, 0) - v
        self.free_scalar = free

    def add(self, pod: PodInfo) -> None:
        self.pods[pod.key] = pod
        self.free_cpu -= pod.cpu
        self.free_memory -= pod.memory
        self.free_pods -= 1
        for k, v in pod.scalar:
            self.free_scalar[k] = self.free_scalar.get(k, 0) - v
        self.nz_cpu += pod.nz_cpu
        self.nz_memory += pod.nz_memory
        if pod.owner:
            self.owners[pod.owner] = self.owners.get(pod.owner, 0) + 1
        for hp in pod.host_ports:
            self.ports[hp] = self.ports.get(hp, 0) + 1

    def remove(self, key: str) -> PodInfo | None:
        pod = self.pods.pop(key, None)
        if pod is None:
            return None
        self.free_cpu += pod.cpu
        self.free_memory += pod.memory
        self.free_pods += 1
        for k, v in pod.scalar:
            self.free_scalar[k] = self.free_scalar.get(k, 0) + v
        self.nz_cpu -= pod.nz_cpu
        self.nz_memory -= pod.nz_memory
        if pod.owner:
            left = self.owners.get(pod.owner, 0) - 1
            if left > 0:
                self.owners[pod.owner] = left
            else:
                self.owners.pop(pod.owner, None)
        for hp in pod.host_ports:
            left = self.ports.get(hp, 0) - 1
            if left > 0:
                self.ports[hp] = left
            else:
                self.ports.pop(hp, None)
        return pod


class ClusterState:
    """Nodes and the pods placed on them, including pods this scheduler *assumed*.

    An assumed pod counts against its node as soon as the scheduler picks the
    node, before the binding write returns and long before the informer shows
    it bound, so a burst of pods never overcommits a node (kube-scheduler's
    assume/confirm/forget)::

        assume(pod, node) --binding ok--> finish_binding(key, deadline)
             |                                 |  informer shows it bound: add_pod (confirm)
             | binding failed: forget(key)      |  deadline passes unseen: expire(now)
             v                                 v
          removed                          removed

    Nodes are kept in a stable order (``ordered()``) for the rotating search.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self._where: dict[str, tuple[PodInfo, str]] = {}   # pod key -> (pod, node name)
        self._by_ns: dict[str, dict[str, PodInfo]] = {}
        self._anti: dict[str, PodInfo] = {}                 # pods with required anti-affinity
        self._assumed: dict[str, float | None] = {}         # key -> expiry (None: binding)
        self._order: list[NodeInfo] | None = None
        self._soft: set[str] = set()                        # nodes with PreferNoSchedule

    # -- nodes ----------------------------------------------------------------

    def set_node(self, spec: NodeSpec) -> bool:
        """Add or update a node; True when the change could make a pod fit."""
        info = self.nodes.get(spec.name)
        if info is None:
            info = self.nodes[spec.name] = NodeInfo(spec.name)
        if info.present and info.spec == spec:
            return False
        if not info.present:
            self._order = None
        info.set_spec(spec)
        if spec.soft_taints:
            self._soft.add(spec.name)
        else:
            self._soft.discard(spec.name)
        return True

    def remove_node(self, name: str) -> None:
        info = self.nodes.get(name)
        if info is None:
            return
        self._order = None
        self._soft.discard(name)
        if info.pods:
            info.present = False   # keep the pods' accounting until they go
            info.set_spec(NodeSpec(name=name))
            info.present = False
        else:
            del self.nodes[name]

    @property
    def soft_tainted(self) -> bool:
        """Some node has a PreferNoSchedule taint (the taint score is not a constant)."""
        return bool(self._soft)

    def ordered(self) -> list[NodeInfo]:
        """Every present node, in a stable (name) order."""
        if self._order is None:
            self._order = sorted((n for n in self.nodes.values() if n.present),
                                 key=lambda n: n.name)
        return self._order

    # -- pods -----------------------------------------------------------------

    def node_of(self, key: str) -> str | None:
        found = self._where.get(key)
        return found[1] if found else None

    def pod(self, key: str) -> PodInfo | None:
        found = self._where.get(key)
        return found[0] if found else None

    def add_pod(self, pod: PodInfo, node: str) -> None:
        """A pod seen bound to ``node`` (confirms it if it was assumed)."""
        self._assumed.pop(pod.key, None)
        self._place(pod, node)

    def remove_pod(self, key: str) -> None:
        self._assumed.pop(key, None)
        found = self._where.pop(key, None)
        if found is None:
            return
        pod, node = found
        info = self.nodes.get(node)
        if info is not None:
            info.remove(key)
            if not info.present and not info.pods:
                del self.nodes[node]
        ns = self._by_ns.get(pod.namespace)
        if ns is not None:
            ns.pop(key, None)
            if not ns:
                del self._by_ns[pod.namespace]
        self._anti.pop(key, None)

    def assume(self, pod: PodInfo, node: str) -> None:
        self._place(pod, node)
        self._assumed[pod.key] = None

    def is_assumed(self, key: str) -> bool:
        return key in self._assumed

    def finish_binding(self, key: str, *, deadline: float) -> None:
        """The binding was written; expire the assumption at ``deadline`` if unconfirmed."""
        if key in self._assumed:
            self._assumed[key] = deadline

    def forget(self, key: str) -> None:
        """The binding failed: the pod no longer counts against the node."""
        if key in self._assumed:
            self.remove_pod(key)

    def expire(self, now: float) -> list[str]:
        """Drop assumed pods whose binding finished before ``deadline`` but never showed up."""
        gone = [k for k, d in self._assumed.items() if d is not None and d <= now]
        for k in gone:
            self.remove_pod(k)
        return gone

    def _place(self, pod: PodInfo, node: str) -> None:
        old = self._where.get(pod.key)
        if old is not None:
            if old[1] == node and old[0] == pod:
                return
            self.remove_pod(pod.key)
        info = self.nodes.get(node)
        if info is None:
            info = self.nodes[node] = NodeInfo(node)
        info.add(pod)
        self._where[pod.key] = (pod, node)
        self._by_ns.setdefault(pod.namespace, {})[pod.key] = pod
        if pod.anti_affinity:
            self._anti[pod.key] = pod

    def pods_in(self, namespaces: frozenset[str]) -> Iterator[tuple[PodInfo, str]]:
        """Placed pods in these namespaces (every namespace when empty), with their node."""
        groups = (self._by_ns.values() if not namespaces else
                  (self._by_ns[ns] for ns in namespaces if ns in self._by_ns))
        for group in groups:
            for key, pod in group.items():
                yield pod, self._where[key][1]

    def with_anti_affinity(self) -> Iterable[PodInfo]:
        return self._anti.values()

    def __len__(self) -> int:
        return len(self._where)


# --------------------------------------------------------------------------- prefilter


@dataclass(frozen=True, slots=True)
class TopologyRules:
    """Domains (``(topology key, label values)``) from the pod (anti-)affinity prefilter."""

    affinity: tuple[tuple[str, frozenset[str]], ...] = ()
    # No pod anywhere matches the affinity terms, but the pod matches its own:
    # it may go to any node that has the keys (the first of a group).
    affinity_free: bool = False
    anti: tuple[tuple[str, frozenset[str]], ...] = ()
    existing: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.affinity or self.anti or self.existing)

    def reason(self, labels: Mapping[str, str]) -> str | None:
        for key, domains in self.affinity:
            value = labels.get(key)
            if value is None or not (self.affinity_free or value in domains):
                return REASON_AFFINITY
        for key, domains in self.anti:
            if labels.get(key, None) in domains:
                return REASON_ANTI_AFFINITY
        for key, domains in self.existing:
            if labels.get(key, None) in domains:
                return REASON_EXISTING_ANTI_AFFINITY
        return None


NO_TOPOLOGY_RULES = TopologyRules()


def _domains(term: AffinityTerm, state: ClusterState, *, skip: str) -> frozenset[str]:
    out: set[str] = set()
    key = term.topology_key
    for other, node in state.pods_in(term.namespaces):
        if other.key == skip or not term.selector.matches(other.labels):
            continue
        info = state.nodes.get(node)
        value = info.labels.get(key) if info is not None else None
        if value is not None:
            out.add(value)
    return frozenset(out)


def topology_rules(pod: PodInfo, state: ClusterState) -> TopologyRules:
    """kube's InterPodAffinity PreFilter: which domains the pod must or must not join."""
    existing: dict[str, set[str]] = {}
    for other in state.with_anti_affinity():
        if other.key == pod.key:
            continue
        node = state.node_of(other.key)
        info = state.nodes.get(node) if node is not None else None
        if info is None:
            continue
        for term in other.anti_affinity:
            if term.matches(pod):
                value = info.labels.get(term.topology_key)
                if value is not None:
                    existing.setdefault(term.topology_key, set()).add(value)
    if not pod.affinity and not pod.anti_affinity and not existing:
        return NO_TOPOLOGY_RULES
    affinity = tuple((t.topology_key, _domains(t, state, skip=pod.key)) for t in pod.affinity)
    free = bool(affinity) and not any(d for _, d in affinity) and \
        all(t.matches(pod) for t in pod.affinity)
    return TopologyRules(
        affinity=affinity, affinity_free=free,
        anti=tuple((t.topology_key, _domains(t, state, skip=pod.key))
                   for t in pod.anti_affinity),
        existing=tuple((k, frozenset(v)) for k, v in sorted(existing.items())))


# --------------------------------------------------------------------------- filters


def _matches_node_affinity(pod: PodInfo, node: NodeInfo) -> bool:
    labels = node.labels
    for k, v in pod.node_selector:
        if labels.get(k) != v:
            return False
    if pod.required is not None:
        return any(t.matches(node.name, labels) for t in pod.required)
    return True


def _ports_conflict(pod: PodInfo, node: NodeInfo) -> bool:
    if not node.ports:
        return False
    for want in pod.host_ports:
        for used in node.ports:
            if used.port == want.port and used.protocol == want.protocol and (
                    used.ip == want.ip or "0.0.0.0" in (used.ip, want.ip)):
                return True
    return False


def unfit_reasons(pod: PodInfo, node: NodeInfo,
                  rules: TopologyRules = NO_TOPOLOGY_RULES) -> tuple[str, ...]:
    """Why ``pod`` cannot go to ``node`` (empty when it can), in filter order."""
    spec = node.spec
    tolerations = pod.tolerations
    if spec.unschedulable and not tolerated(Taint(TAINT_UNSCHEDULABLE, "", NO_SCHEDULE),
                                            tolerations):
        return (REASON_UNSCHEDULABLE,)
    for taint in spec.taints:
        if not tolerated(taint, tolerations):
            return (untolerated(taint),)
    if not _matches_node_affinity(pod, node):
        return (REASON_NODE_AFFINITY,)
    if pod.host_ports and _ports_conflict(pod, node):
        return (REASON_PORTS,)
    short: list[str] = []
    if node.free_pods < 1:
        short.append(REASON_TOO_MANY_PODS)
    # As kube: a resource the pod does not request never fails, even on a node
    # already overcommitted by pods bound without the scheduler.
    if pod.cpu and pod.cpu > node.free_cpu:
        short.append(insufficient(_CPU))
    if pod.memory and pod.memory > node.free_memory:
        short.append(insufficient(_MEMORY))
    for k, v in pod.scalar:
        if v > node.free_scalar.get(k, 0):
            short.append(insufficient(k))
    if short:
        return tuple(short)
    if not rules.empty:
        why = rules.reason(node.labels)
        if why is not None:
            return (why,)
    return ()


def num_feasible_nodes_to_find(num_nodes: int, percentage: int = 0) -> int:
    """kube's numFeasibleNodesToFind: all nodes below 100; else ``percentage`` of them
    (adaptive when 0: 50% - nodes/125, at least 5%), never fewer than 100."""
    if num_nodes < MIN_FEASIBLE_NODES_TO_FIND:
        return num_nodes
    if percentage <= 0:
        percentage = max(50 - num_nodes // 125, MIN_FEASIBLE_NODES_PERCENTAGE_TO_FIND)
    percentage = min(percentage, 100)
    return max(num_nodes * percentage // 100, MIN_FEASIBLE_NODES_TO_FIND)


@dataclass(frozen=True, slots=True)
class Feasible:
    nodes: list[NodeInfo]
    reasons: Mapping[str, int]     # failure reason -> nodes that failed with it
    failed: int                    # nodes that failed a filter
    processed: int                 # nodes looked at (the next search starts after them)


def find_feasible(pod: PodInfo, nodes: Sequence[NodeInfo], *, start: int, want: int,
                  rules: TopologyRules = NO_TOPOLOGY_RULES) -> Feasible:
    """Filter nodes in order from ``start`` (wrapping) until ``want`` fit."""
    n = len(nodes)
    start = start % n if n else 0
    feasible: list[NodeInfo] = []
    reasons: dict[str, int] = {}
    failed = 0
    fast = pod.plain and rules.empty
    cpu, memory = pod.cpu, pod.memory
    for node in chain(islice(nodes, start, None), islice(nodes, 0, start)):
        if fast and node.untainted and node.free_pods > 0 and (not cpu or cpu <= node.free_cpu) \
                and (not memory or memory <= node.free_memory):
            why: tuple[str, ...] = ()
        else:
            why = unfit_reasons(pod, node, rules)
        if why:
            failed += 1
            for r in why:
                reasons[r] = reasons.get(r, 0) + 1
        else:
            feasible.append(node)
            if len(feasible) >= want:
                break
    return Feasible(nodes=feasible, reasons=reasons, failed=failed,
                    processed=len(feasible) + failed)


def failure_message(num_nodes: int, reasons: Mapping[str, int]) -> str:
    """kube's FitError text: ``0/5 nodes are available: 2 Insufficient cpu, ....``"""
    if num_nodes == 0:
        return NO_NODES
    parts = sorted(f"{count} {reason}" for reason, count in reasons.items())
    return f"0/{num_nodes} nodes are available: {', '.join(parts)}."


# --------------------------------------------------------------------------- scores


def _least_requested(requested: int, capacity: int) -> int:
    if capacity <= 0 or requested > capacity:
        return 0
    return (capacity - requested) * MAX_NODE_SCORE // capacity


def least_allocated(pod: PodInfo, node: NodeInfo) -> int:
    """kube's LeastAllocated over cpu and memory (equal weights), 0..100."""
    spec = node.spec
    return (_least_requested(node.nz_cpu + pod.nz_cpu, spec.cpu)
            + _least_requested(node.nz_memory + pod.nz_memory, spec.memory)) // 2


def normalize(raw: Sequence[int], *, reverse: bool = False) -> list[int]:
    """kube's DefaultNormalizeScore: scale to 0..100 by the maximum (optionally reversed)."""
    top = max(raw, default=0)
    if top == 0:
        return [MAX_NODE_SCORE if reverse else 0] * len(raw)
    if reverse:
        return [MAX_NODE_SCORE - MAX_NODE_SCORE * s // top for s in raw]
    return [MAX_NODE_SCORE * s // top for s in raw]


def spread_scores(pod: PodInfo, nodes: Sequence[NodeInfo]) -> list[int]:
    """Fewer pods of the same owner scores higher: 100 * (max - count) / max.

    (kube's SelectorSpread by the controller owner; all equal for a pod without one)."""
    if not pod.owner:
        return [0] * len(nodes)
    owner = pod.owner
    counts = [n.owners.get(owner, 0) for n in nodes]
    top = max(counts, default=0)
    if top == 0:
        return [MAX_NODE_SCORE] * len(nodes)
    return [MAX_NODE_SCORE * (top - c) // top for c in counts]


def node_affinity_scores(pod: PodInfo, nodes: Sequence[NodeInfo]) -> list[int]:
    """Summed weights of the preferred terms each node matches, normalised."""
    if not pod.preferred:
        return [0] * len(nodes)
    return normalize([sum(w for w, t in pod.preferred if t.matches(n.name, n.labels))
                      for n in nodes])


def taint_scores(pod: PodInfo, nodes: Sequence[NodeInfo]) -> list[int]:
    """Fewer untolerated PreferNoSchedule taints scores higher (reversed normalisation)."""
    tols = tuple(t for t in pod.tolerations if t.effect in ("", PREFER_NO_SCHEDULE))
    raw = [sum(1 for t in n.spec.soft_taints if not tolerated(t, tols)) if n.spec.soft_taints
           else 0 for n in nodes]
    return normalize(raw, reverse=True)


@dataclass(frozen=True, slots=True)
class NodeScore:
    node: str
    least_allocated: int
    spread: int
    node_affinity: int
    taints: int

    @property
    def total(self) -> int:
        return (self.least_allocated * WEIGHT_LEAST_ALLOCATED + self.spread * WEIGHT_SPREAD
                + self.node_affinity * WEIGHT_NODE_AFFINITY + self.taints * WEIGHT_TAINTS)


def score_nodes(pod: PodInfo, nodes: Sequence[NodeInfo]) -> list[NodeScore]:
    """Every score plugin's normalised result per node (for tests and explanations)."""
    la = [least_allocated(pod, n) for n in nodes]
    return [NodeScore(n.name, a, s, f, t) for n, a, s, f, t in zip(
        nodes, la, spread_scores(pod, nodes), node_affinity_scores(pod, nodes),
        taint_scores(pod, nodes), strict=True)]


def total_scores(pod: PodInfo, nodes: Sequence[NodeInfo]) -> list[int]:
    """The weighted sum per node; the same figures as ``score_nodes``, computed lean."""
    pc, pm = pod.nz_cpu, pod.nz_memory
    lr = _least_requested
    totals = [(lr(n.nz_cpu + pc, n.spec.cpu) + lr(n.nz_memory + pm, n.spec.memory)) // 2
              * WEIGHT_LEAST_ALLOCATED for n in nodes]
    if pod.owner:
        totals = [t + s * WEIGHT_SPREAD for t, s in zip(totals, spread_scores(pod, nodes),
                                                        strict=True)]
    if pod.preferred:
        totals = [t + s * WEIGHT_NODE_AFFINITY for t, s in
                  zip(totals, node_affinity_scores(pod, nodes), strict=True)]
    if any(n.spec.soft_taints for n in nodes):
        totals = [t + s * WEIGHT_TAINTS for t, s in
                  zip(totals, taint_scores(pod, nodes), strict=True)]
    else:
        totals = [t + MAX_NODE_SCORE * WEIGHT_TAINTS for t in totals]
    return totals


# --------------------------------------------------------------------------- the cycle


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one scheduling attempt."""

    node: str | None               # where to bind; None: unschedulable
    processed: int                 # nodes looked at; advance the start offset by this
    feasible: int                  # feasible nodes found (and scored)
    reasons: Mapping[str, int] = field(default_factory=dict)
    message: str = ""              # kube's FitError text when node is None


def schedule(pod: PodInfo, state: ClusterState, *, start: int = 0, percentage: int = 0,
             rng: random.Random | None = None) -> Decision:
    """Pick a node for ``pod`` (prefilter, filter a bounded sample, score, select)."""
    nodes = state.ordered()
    if not nodes:
        return Decision(node=None, processed=0, feasible=0, message=NO_NODES)
    rules = topology_rules(pod, state)
    want = num_feasible_nodes_to_find(len(nodes), percentage)
    if pod.plain and rules.empty and not pod.owner and not pod.preferred \
            and not state.soft_tainted:
        return _schedule_plain(pod, nodes, start=start, want=want, rng=rng)
    found = find_feasible(pod, nodes, start=start, want=want, rules=rules)
    if not found.nodes:
        return Decision(node=None, processed=found.processed, feasible=0,
                        reasons=found.reasons,
                        message=failure_message(len(nodes), found.reasons))
    if len(found.nodes) == 1:
        return Decision(node=found.nodes[0].name, processed=found.processed, feasible=1)
    totals = total_scores(pod, found.nodes)
    top = max(totals)
    best = [i for i, t in enumerate(totals) if t == top]
    pick = best[rng.randrange(len(best))] if rng is not None and len(best) > 1 else best[0]
    return Decision(node=found.nodes[pick].name, processed=found.processed,
                    feasible=len(found.nodes))


def _schedule_plain(pod: PodInfo, nodes: Sequence[NodeInfo], *, start: int, want: int,
                    rng: random.Random | None) -> Decision:
    """``schedule`` for the common pod, in one pass and without lists: filter, score
    (least allocated is then the only score that differs between nodes) and select
    (kube's reservoir sampling among equal scores) as each node comes.

    For a pod without node or pod affinity, host ports, extended resources or an
    owner, on a cluster without PreferNoSchedule taints; the result is the one the
    general path gives (a unit test holds the two together).
    """
    n = len(nodes)
    start = start % n
    cpu, memory = pod.cpu, pod.memory
    pc, pm = pod.nz_cpu, pod.nz_memory
    reasons: dict[str, int] = {}
    failed = found = ties = 0
    best = -1
    pick: NodeInfo | None = None
    lr = _least_requested
    for node in chain(islice(nodes, start, None), islice(nodes, 0, start)):
        if not (node.untainted and node.free_pods > 0 and (not cpu or cpu <= node.free_cpu)
                and (not memory or memory <= node.free_memory)):
            why = unfit_reasons(pod, node)
            if why:
                failed += 1
                for r in why:
                    reasons[r] = reasons.get(r, 0) + 1
                continue
        spec = node.spec
        score = (lr(node.nz_cpu + pc, spec.cpu) + lr(node.nz_memory + pm, spec.memory)) // 2
        found += 1
        if score > best:
            best, pick, ties = score, node, 1
        elif score == best:
            ties += 1
            if rng is not None and rng.randrange(ties) == 0:
                pick = node
        if found >= want:
            break
    if pick is None:
        return Decision(node=None, processed=failed, feasible=0, reasons=reasons,
                        message=failure_message(n, reasons))
    return Decision(node=pick.name, processed=found + failed, feasible=found)
