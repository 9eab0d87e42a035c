"""Which objects each node may reach: pods bound to a node, and what they use.

    pod_refs(pod) -> PodRefs     pure: a pod's node and the objects it refers to
    NodeGraph                    pure: node -> pods -> Secrets, ConfigMaps, PVCs,
                                 ServiceAccounts (reference counted)
    CachedNodeGraph              NodeGraph kept from the watch cache's pods and
                                 WorkloadEntries

One graph answers both the node authorizer (may node N read Secret S? update
pod P's status?) and the mesh CA (does N run a pod of service account A?),
so the two never disagree.

A mesh-only host (a VM or bare-metal machine running only a meshagent) joins
with a node identity of its own, CN=system:node:<host>, and has no pods; the
graph also keeps every WorkloadEntry labelled ``shoal.dev/mesh-host: <host>``,
so that host may get certificates for those WorkloadEntries' service accounts
(and nothing else a pod would give it: no Secrets, no tokens).

The cache calls listeners synchronously as it applies an event, before any
watcher is woken, so a node that learns of a pod through its watch always finds
the graph already updated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from apiserver.watchcache import DELETED, CacheEvent, WatchCache
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.kinds import KindTable

SECRETS = "secrets"
CONFIGMAPS = "configmaps"
PVCS = "persistentvolumeclaims"
SERVICE_ACCOUNTS = "serviceaccounts"
FINISHED_PHASES = ("Succeeded", "Failed")

Ref = tuple[str, str, str]  # (resource, namespace, name)


@dataclass(frozen=True)
class PodRefs:
    namespace: str
    name: str
    node: str
    service_account: str
    phase: str
    refs: frozenset[Ref]

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES


def pod_refs(pod: core_pb2.Pod) -> PodRefs:
    """The objects a pod needs to run (kube's node graph edges)."""
    ns = pod.metadata.namespace
    spec = pod.spec
    refs: set[Ref] = set()

    def add(resource: str, name: str) -> None:
        if name:
            refs.add((resource, ns, name))

    for s in spec.image_pull_secrets:
        add(SECRETS, s.name)
    for v in spec.volumes:
        if v.HasField("secret"):
            add(SECRETS, v.secret.secret_name)
        if v.HasField("config_map"):
            add(CONFIGMAPS, v.config_map.name)
        if v.HasField("persistent_volume_claim"):
            add(PVCS, v.persistent_volume_claim.claim_name)
        for src in v.projected.sources:
            if src.HasField("secret"):
                add(SECRETS, src.secret.name)
            if src.HasField("config_map"):
                add(CONFIGMAPS, src.config_map.name)
    for c in (*spec.init_containers, *spec.containers):
        for env in c.env:
            if env.value_from.HasField("secret_key_ref"):
                add(SECRETS, env.value_from.secret_key_ref.name)
            if env.value_from.HasField("config_map_key_ref"):
                add(CONFIGMAPS, env.value_from.config_map_key_ref.name)
        for ef in c.env_from:
            if ef.HasField("secret_ref"):
                add(SECRETS, ef.secret_ref.name)
            if ef.HasField("config_map_ref"):
                add(CONFIGMAPS, ef.config_map_ref.name)
    sa = spec.service_account_name or spec.service_account or "default"
    add(SERVICE_ACCOUNTS, sa)
    return PodRefs(namespace=ns, name=pod.metadata.name, node=spec.node_name,
                   service_account=sa, phase=pod.status.phase, refs=frozenset(refs))


MESH_HOST_LABEL = "shoal.dev/mesh-host"


def workload_entry_account(we: traffic_pb2.WorkloadEntry) -> tuple[str, str, str] | None:
    """(mesh host, namespace, service account) of a WorkloadEntry on a mesh-only
    host, else None (pure)."""
    host = we.metadata.labels.get(MESH_HOST_LABEL, "")
    if not host:
        return None
    return host, we.metadata.namespace, we.spec.service_account or "default"


class NodeGraph:
    """Bound pods per node and the reference counts of what they use (pure)."""

    def __init__(self) -> None:
        # (namespace, name) of a WorkloadEntry -> (mesh host, namespace, service account)
        self.workload_entries: dict[tuple[str, str], tuple[str, str, str]] = {}
        self.pods: dict[tuple[str, str], PodRefs] = {}
        self._by_node: dict[str, dict[tuple[str, str], PodRefs]] = {}
        self._refs: dict[str, Counter[Ref]] = {}

    def set_pod(self, namespace: str, name: str, pod: PodRefs | None) -> None:
        """Record a pod's current state (None: deleted). Unbound pods are left out."""
        key = (namespace, name)
        old = self.pods.pop(key, None)
        if old is not None:
            self._by_node[old.node].pop(key, None)
            if not self._by_node[old.node]:
                del self._by_node[old.node]
            counts = self._refs[old.node]
            counts.subtract(old.refs)
            for ref in old.refs:
                if counts[ref] <= 0:
                    del counts[ref]
            if not counts:
                del self._refs[old.node]
        if pod is None or not pod.node:
            return
        self.pods[key] = pod
        self._by_node.setdefault(pod.node, {})[key] = pod
        self._refs.setdefault(pod.node, Counter()).update(pod.refs)

    def replace(self, pods: Iterable[PodRefs]) -> None:
        self.pods.clear()
        self._by_node.clear()
        self._refs.clear()
        for p in pods:
            self.set_pod(p.namespace, p.name, p)

    def node_uses(self, node: str, resource: str, namespace: str, name: str) -> bool:
        counts = self._refs.get(node)
        return counts is not None and counts.get((resource, namespace, name), 0) > 0

    def node_of(self, namespace: str, name: str) -> str | None:
        pod = self.pods.get((namespace, name))
        return pod.node if pod is not None else None

    def pods_on(self, node: str) -> Mapping[tuple[str, str], PodRefs]:
        return self._by_node.get(node, {})

    def runs_service_account(self, node: str, namespace: str, service_account: str) -> bool:
        """A pod on ``node`` in ``namespace``, not finished, runs as ``service_account``;
        or a WorkloadEntry of that namespace and service account names ``node`` as its
        mesh-only host."""
        if (node, namespace, service_account) in self.workload_entries.values():
            return True
        return any(p.namespace == namespace and p.service_account == service_account
                   and not p.finished for p in self.pods_on(node).values())

    def set_workload_entry(self, namespace: str, name: str,
                           account: tuple[str, str, str] | None) -> None:
        if account is None:
            self.workload_entries.pop((namespace, name), None)
        else:
            self.workload_entries[(namespace, name)] = account


class CachedNodeGraph:
    """A NodeGraph fed by the watch cache's pod events (rebuilt after a relist)."""

    def __init__(self, *, cache: WatchCache, kinds: KindTable) -> None:
        self._kc = cache.cache_for(kinds.by_resource("", "pods"))
        self._graph = NodeGraph()
        self._seen: Mapping[str, Any] | None = None
        self._kc.listeners.append(self._on_event)
        self._we = cache.cache_for(kinds.by_resource("networking.istio.io", "workloadentries"))
        self._we_seen: Mapping[str, Any] | None = None
        self._we.listeners.append(self._on_workload_entry)

    def _decode(self, raw: bytes) -> PodRefs:
        pod = core_pb2.Pod()
        pod.ParseFromString(raw)
        return pod_refs(pod)

    def _on_event(self, ev: CacheEvent) -> None:
        if self._seen is not self._kc.objects:
            return  # not built yet (or relisted): graph() rebuilds from the objects
        o = ev.obj
        self._graph.set_pod(o.namespace, o.name,
                            None if ev.type == DELETED else self._decode(o.raw))

    @staticmethod
    def _entry(raw: bytes) -> tuple[str, str, str] | None:
        we = traffic_pb2.WorkloadEntry()
        we.ParseFromString(raw)
        return workload_entry_account(we)

    def _on_workload_entry(self, ev: CacheEvent) -> None:
        if self._we_seen is not self._we.objects:
            return
        o = ev.obj
        self._graph.set_workload_entry(o.namespace, o.name,
                                       None if ev.type == DELETED else self._entry(o.raw))

    def graph(self) -> NodeGraph:
        if self._we_seen is not self._we.objects:
            self._we_seen = self._we.objects
            self._graph.workload_entries = {
                (o.namespace, o.name): a for o in self._we.objects.values()
                if (a := self._entry(o.raw)) is not None}
        if self._seen is not self._kc.objects:
            self._seen = self._kc.objects
            self._graph.replace(self._decode(o.raw) for o in self._kc.objects.values())
        return self._graph
