"""The node authorizer: Kubernetes' Node authorizer and NodeRestriction in one.

A caller is node N when its user is ``system:node:N`` and its groups include
``system:nodes``. What N may do (anything else: no opinion, so RBAC decides):

    read    pods, services, endpoints, namespaces, nodes        (all of them)
    get     Secrets, ConfigMaps, PVCs, ServiceAccounts           only those a pod
                                                                bound to N uses
    write   its own Node (create, update, nodes/status), its own Lease in
            kube-node-lease, pods/status of pods bound to N, pods bound to N
            (the agent's finalizer), events
    create  serviceaccounts/token                                only for a service
                                                                account a pod on N
                                                                uses
    create  serviceaccounts/workloadcertificate (the mesh CA)   only for a service
                                                                account a running
                                                                pod on N uses, or a
                                                                WorkloadEntry labelled
                                                                shoal.dev/mesh-host: N
                                                                names (N is then a
                                                                mesh-only host)

Writing pods (not only their status) is Shoal's addition: the node agent holds
its pods with a finalizer. Decisions come from the shared NodeGraph, never from
storage.
"""

from __future__ import annotations

from collections.abc import Callable

from apiserver.authz.attributes import (
    READ_VERBS,
    Attributes,
    Decision,
    allow,
    no_opinion,
)
from apiserver.authz.nodegraph import CONFIGMAPS, PVCS, SECRETS, SERVICE_ACCOUNTS, NodeGraph

NODE_GROUP = "system:nodes"
NODE_PREFIX = "system:node:"
NODE_LEASE_NAMESPACE = "kube-node-lease"
WORKLOAD_CERTIFICATE = "workloadcertificate"

_OPEN_READS = frozenset({"pods", "services", "endpoints", "namespaces", "nodes"})
_GRAPH_READS = frozenset({SECRETS, CONFIGMAPS, PVCS, SERVICE_ACCOUNTS})
_OWN_NODE_WRITES = frozenset({"create", "update", "patch"})
_EVENT_WRITES = frozenset({"create", "update", "patch"})


def node_name(user: str, groups: tuple[str, ...] | frozenset[str]) -> str | None:
    """N for a node identity (CN=system:node:N, O=system:nodes), else None."""
    if user.startswith(NODE_PREFIX) and NODE_GROUP in groups:
        return user[len(NODE_PREFIX):] or None
    return None


def authorize_node(node: str, attrs: Attributes, graph: NodeGraph) -> Decision:
    """What node ``node`` may do (pure given the graph)."""
    res, sub, verb = attrs.resource, attrs.subresource, attrs.verb
    core = attrs.group == ""
    if core and not sub and res in _OPEN_READS and verb in READ_VERBS:
        return allow(f"node '{node}' may read {res}")
    if core and not sub and res in _GRAPH_READS:
        if verb != "get" or not attrs.name:
            return no_opinion("can only get individual resources of this type")
        if graph.node_uses(node, res, attrs.namespace, attrs.name):
            return allow(f"node '{node}' runs a pod that uses it")
        return no_opinion(f"no relationship found between node '{node}' and this object")
    if core and res == "nodes" and sub in ("", "status") and verb in _OWN_NODE_WRITES:
        if attrs.name == node:
            return allow(f"node '{node}' may write itself")
        return no_opinion(f"node '{node}' cannot modify node '{attrs.name}'")
    if attrs.group == "coordination.k8s.io" and res == "leases" and not sub:
        if attrs.namespace == NODE_LEASE_NAMESPACE and attrs.name == node and verb in (
                "get", "create", "update", "patch", "delete"):
            return allow(f"node '{node}' may hold its own lease")
        return no_opinion(f"node '{node}' may only use its own lease in {NODE_LEASE_NAMESPACE}")
    if core and res == "pods" and sub in ("", "status") and verb in ("update", "patch"):
        bound = graph.node_of(attrs.namespace, attrs.name)
        if bound == node:
            return allow(f"pod is bound to node '{node}'")
        return no_opinion(f"pod is not bound to node '{node}'")
    if res == "events" and attrs.group in ("", "events.k8s.io") and verb in _EVENT_WRITES:
        return allow("nodes may record events")
    if core and res == SERVICE_ACCOUNTS and sub == "token" and verb == "create":
        if graph.node_uses(node, SERVICE_ACCOUNTS, attrs.namespace, attrs.name):
            return allow(f"node '{node}' runs a pod as this service account")
        return no_opinion(f"no relationship found between node '{node}' and this object")
    if core and res == SERVICE_ACCOUNTS and sub == WORKLOAD_CERTIFICATE and verb == "create":
        if graph.runs_service_account(node, attrs.namespace, attrs.name):
            return allow(f"node '{node}' runs a pod or a WorkloadEntry as this service "
                         "account")
        return no_opinion(
            f"node '{node}' runs no pod (and no WorkloadEntry names it as its mesh host) "
            f"in namespace '{attrs.namespace}' with service account "
            f"'{attrs.name}'; it may get certificates only for its own workloads")
    return no_opinion()


class NodeAuthorizer:
    def __init__(self, graph: Callable[[], NodeGraph]) -> None:
        self._graph = graph

    def authorize(self, attrs: Attributes) -> Decision:
        node = node_name(attrs.user, attrs.groups)
        if node is None:
            return no_opinion()
        return authorize_node(node, attrs, self._graph())
