"""The built-in RBAC policy, created and reconciled at every apiserver start.

Like Kubernetes' bootstrap policy: the user-facing ClusterRoles ``cluster-admin``,
``admin``, ``edit`` and ``view`` (the last three aggregate the
``system:aggregate-to-*`` roles, and whatever else carries the
``rbac.authorization.k8s.io/aggregate-to-*`` labels), the binding of
``cluster-admin`` to system:masters, and what Shoal's own components need
beyond the node authorizer: node identities (the node agent and the meshagent
use the node's certificate) read the mesh policies and NetworkPolicies.

Who uses which identity (nothing else needs a binding):

    lab CLI, admin.conf              CN=admin, O=system:masters
    in-process controllers and the   CN=system:kube-controller-manager,
      scheduler                        O=system:masters
    apiserver -> node agents         kubelet-client cert (system:masters; checked
                                       by the node, not by this authorizer)
    nodeagent, meshagent             CN=system:node:<name>, O=system:nodes (node
                                       authorizer + the system:shoal:node role)

Reconciling: a missing object is created; an existing one is brought back to
the built-in rules, labels and subjects unless it carries the annotation
``rbac.authorization.kubernetes.io/autoupdate: "false"`` (kube's opt-out).
Idempotent; a change by another apiserver in between is a Conflict, retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from apiserver.objectstore import ObjectStore
from shoal import errors
from shoal.api.rbac.v1 import rbac_pb2
from shoal.kinds import ISTIO_NETWORKING, ISTIO_SECURITY, RBAC, KindTable

log = logging.getLogger(__name__)

AUTOUPDATE = "rbac.authorization.kubernetes.io/autoupdate"
AGGREGATE_TO = "rbac.authorization.k8s.io/aggregate-to-"
BOOTSTRAPPING = "kubernetes.io/bootstrapping"
READ = ("get", "list", "watch")
WRITE = ("create", "delete", "deletecollection", "patch", "update")


def _rule(verbs: Sequence[str], groups: Sequence[str], resources: Sequence[str]
          ) -> rbac_pb2.PolicyRule:
    return rbac_pb2.PolicyRule(verbs=list(verbs), api_groups=list(groups),
                               resources=list(resources))


def _role(name: str, rules: Sequence[rbac_pb2.PolicyRule], *,
          labels: dict[str, str] | None = None,
          aggregate: str = "") -> rbac_pb2.ClusterRole:
    role = rbac_pb2.ClusterRole(rules=list(rules))
    role.metadata.name = name
    role.metadata.labels.update({BOOTSTRAPPING: "rbac-defaults", **(labels or {})})
    role.metadata.annotations[AUTOUPDATE] = "true"
    if aggregate:
        sel = role.aggregation_rule.cluster_role_selectors.add()
        sel.match_labels[AGGREGATE_TO + aggregate] = "true"
    return role


def _binding(name: str, role: str, *, groups: Sequence[str] = (),
             users: Sequence[str] = ()) -> rbac_pb2.ClusterRoleBinding:
    b = rbac_pb2.ClusterRoleBinding(role_ref=rbac_pb2.RoleRef(
        api_group=RBAC, kind="ClusterRole", name=role))
    b.metadata.name = name
    b.metadata.labels[BOOTSTRAPPING] = "rbac-defaults"
    b.metadata.annotations[AUTOUPDATE] = "true"
    for g in groups:
        b.subjects.add(kind="Group", api_group=RBAC, name=g)
    for u in users:
        b.subjects.add(kind="User", api_group=RBAC, name=u)
    return b


_VIEW_CORE = ("pods", "pods/log", "pods/status", "services", "services/status", "endpoints",
              "configmaps", "persistentvolumeclaims", "persistentvolumeclaims/status",
              "serviceaccounts", "events", "namespaces", "namespaces/status",
              "limitranges", "resourcequotas", "resourcequotas/status",
              "replicationcontrollers", "replicationcontrollers/status",
              "replicationcontrollers/scale")
_APPS = ("deployments", "deployments/scale", "deployments/status", "replicasets",
         "replicasets/scale", "replicasets/status", "statefulsets", "statefulsets/scale",
         "statefulsets/status", "daemonsets", "daemonsets/status", "controllerrevisions")
_EDIT_CORE = ("pods", "pods/attach", "pods/exec", "pods/portforward", "pods/proxy",
              "pods/eviction", "configmaps", "endpoints", "persistentvolumeclaims",
              "replicationcontrollers", "replicationcontrollers/scale", "secrets",
              "serviceaccounts", "services", "services/proxy")
_NETWORKING = ("networkpolicies", "ingresses")
_MESH = ("peerauthentications", "authorizationpolicies")
_TRAFFIC = ("virtualservices", "destinationrules", "gateways", "serviceentries",
            "workloadentries")


def cluster_roles() -> list[rbac_pb2.ClusterRole]:
    return [
        _role("cluster-admin", [_rule(["*"], ["*"], ["*"])]),
        _role("admin", [], labels={}, aggregate="admin"),
        _role("edit", [], labels={AGGREGATE_TO + "admin": "true"}, aggregate="edit"),
        _role("view", [], labels={AGGREGATE_TO + "edit": "true"}, aggregate="view"),
        _role("system:aggregate-to-admin", [
            _rule(WRITE + READ, [RBAC], ["roles", "rolebindings"]),
            _rule(["create"], ["authorization.k8s.io"], ["localsubjectaccessreviews"]),
        ], labels={AGGREGATE_TO + "admin": "true"}),
        _role("system:aggregate-to-edit", [
            _rule(WRITE, [""], _EDIT_CORE),
            _rule(READ, [""], ("pods/attach", "pods/exec", "pods/portforward", "pods/proxy",
                               "secrets", "services/proxy")),
            _rule(["impersonate"], [""], ["serviceaccounts"]),
            _rule(["create"], [""], ["serviceaccounts/token"]),
            _rule(WRITE, ["apps"], _APPS),
            _rule(WRITE, ["networking.k8s.io"], _NETWORKING),
            _rule(WRITE, [ISTIO_SECURITY], _MESH),
            _rule(WRITE, [ISTIO_NETWORKING], _TRAFFIC),
            _rule(WRITE, ["autoscaling"], ["horizontalpodautoscalers"]),
        ], labels={AGGREGATE_TO + "edit": "true"}),
        _role("system:aggregate-to-view", [
            _rule(READ, [""], _VIEW_CORE),
            _rule(READ, ["apps"], _APPS),
            _rule(READ, ["networking.k8s.io"], _NETWORKING),
            _rule(READ, [ISTIO_SECURITY], _MESH),
            _rule(READ, [ISTIO_NETWORKING], _TRAFFIC),
            _rule(READ, ["autoscaling"], ["horizontalpodautoscalers",
                                         "horizontalpodautoscalers/status"]),
            # metrics-server's system:aggregated-metrics-reader, aggregated to view.
            _rule(READ, ["metrics.k8s.io"], ["pods", "nodes"]),
        ], labels={AGGREGATE_TO + "view": "true"}),
        # Shoal's node components, beyond what the node authorizer allows.
        _role("system:shoal:node", [
            _rule(READ, [ISTIO_SECURITY], _MESH),
            _rule(READ, [ISTIO_NETWORKING], _TRAFFIC),
            _rule(READ, ["networking.k8s.io"], ["networkpolicies"]),
        ]),
    ]


def cluster_role_bindings() -> list[rbac_pb2.ClusterRoleBinding]:
    return [
        _binding("cluster-admin", "cluster-admin", groups=["system:masters"]),
        _binding("system:shoal:node", "system:shoal:node", groups=["system:nodes"]),
    ]


def reconciled(current: Any, wanted: Any) -> Any | None:
    """The object to write so ``current`` matches ``wanted``; None if nothing to do."""
    if current.metadata.annotations.get(AUTOUPDATE) == "false":
        return None
    out = type(current)()
    out.CopyFrom(current)
    out.metadata.labels.update(wanted.metadata.labels)
    out.metadata.annotations.update(wanted.metadata.annotations)
    if isinstance(wanted, rbac_pb2.ClusterRole):
        del out.rules[:]
        out.rules.extend(wanted.rules)
        out.aggregation_rule.CopyFrom(wanted.aggregation_rule)
        if not wanted.HasField("aggregation_rule"):
            out.ClearField("aggregation_rule")
    else:
        for s in wanted.subjects:
            if s not in out.subjects:
                out.subjects.append(s)
    return None if out == current else out


async def ensure(objects: ObjectStore, kinds: KindTable) -> None:
    """Create or reconcile every built-in object (retrying while storage is down)."""
    roles = kinds.by_resource(RBAC, "clusterroles")
    bindings = kinds.by_resource(RBAC, "clusterrolebindings")
    items: list[tuple[Any, Any]] = [(roles, r) for r in cluster_roles()]
    items += [(bindings, b) for b in cluster_role_bindings()]
    for kind, wanted in items:
        for attempt in range(20):
            try:
                await _ensure_one(objects, kind, wanted)
                break
            except (errors.Conflict, errors.AlreadyExists):
                continue
            except errors.Unavailable as e:
                log.warning("bootstrap policy: %s; retrying", e)
                await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))


async def _ensure_one(objects: ObjectStore, kind: Any, wanted: Any) -> None:
    try:
        current = await objects.get(kind, namespace="", name=wanted.metadata.name)
    except errors.NotFound:
        await objects.create(kind, wanted)
        return
    update = reconciled(current, wanted)
    if update is not None:
        await objects.update(kind, update)
