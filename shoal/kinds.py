"""The kinds Shoal serves: names, scope, storage keys and selectable fields.

A :class:`Kind` ties together what a user writes (``apiVersion: apps/v1``,
``kind: Deployment``, ``shoal get deploy``), what travels on the wire (the
protobuf message ``shoal.apps.v1.Deployment``) and what is stored
(``/registry/deployments/<namespace>/<name>``).

:func:`builtin_kinds` returns the table of every kind; a :class:`KindTable` is an
immutable value handed to whatever needs it (apiserver, CLI, codec).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.autoscaling.v2 import autoscaling_pb2
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.networking.v1 import networking_pb2
from shoal.api.rbac.v1 import rbac_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2

FieldGetter = Callable[[Any], str]

# Istio's API group for mesh security policies.
ISTIO_SECURITY = "security.istio.io"
# Istio's API group for traffic management.
ISTIO_NETWORKING = "networking.istio.io"
# Versions of Istio's API groups accepted on input beside v1 (same schema).
_ISTIO_NETWORKING_ALSO = ("v1beta1", "v1alpha3")
# Kubernetes' RBAC API group.
RBAC = "rbac.authorization.k8s.io"


def _meta_fields() -> dict[str, FieldGetter]:
    return {
        "metadata.name": lambda o: str(o.metadata.name),
        "metadata.namespace": lambda o: str(o.metadata.namespace),
    }


@dataclass(frozen=True)
class Kind:
    """One served kind."""

    group: str
    version: str
    kind: str
    resource: str
    namespaced: bool
    message: type[Message]
    short_names: tuple[str, ...] = ()
    has_status: bool = True
    # Further versions accepted on input with the same schema (Istio's
    # security.istio.io/v1beta1 beside v1); objects are always served as
    # ``version``.
    also_versions: tuple[str, ...] = ()
    # Field-selector paths this kind supports, beyond metadata.name/namespace.
    extra_fields: Mapping[str, FieldGetter] = field(default_factory=dict, hash=False,
                                                    compare=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def api_versions(self) -> tuple[str, ...]:
        """Every apiVersion a manifest of this kind may name, served one first."""
        return tuple(f"{self.group}/{v}" if self.group else v
                     for v in (self.version, *self.also_versions))

    @property
    def type_name(self) -> str:
        return str(self.message.DESCRIPTOR.full_name)

    @property
    def type_url(self) -> str:
        return f"type.googleapis.com/{self.type_name}"

    @property
    def qualified_resource(self) -> str:
        """'pods', 'deployments.apps', 'leases.coordination.k8s.io'."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def storage_prefix(self) -> str:
        """Every object of this kind lives under this key prefix."""
        return f"/registry/{self.qualified_resource}/"

    def key(self, namespace: str, name: str) -> str:
        if self.namespaced:
            return f"{self.storage_prefix}{namespace}/{name}"
        return f"{self.storage_prefix}{name}"

    def prefix(self, namespace: str = "") -> str:
        """Key prefix for one namespace's objects (all when namespace is empty)."""
        if self.namespaced and namespace:
            return f"{self.storage_prefix}{namespace}/"
        return self.storage_prefix

    @property
    def fields(self) -> Mapping[str, FieldGetter]:
        return {**_meta_fields(), **self.extra_fields}

    def new(self) -> Any:
        """A fresh, empty message of this kind."""
        return self.message()


class KindTable:
    """Immutable lookup of kinds by every name a user or the wire may use."""

    def __init__(self, kinds: Iterable[Kind]) -> None:
        self._kinds = tuple(kinds)
        self._by_gvk = {(v, k.kind): k for k in self._kinds for v in k.api_versions}
        self._by_resource = {(k.group, k.resource): k for k in self._kinds}
        self._by_type = {k.type_name: k for k in self._kinds}
        names: dict[str, Kind] = {}
        for k in self._kinds:
            for alias in (k.resource, k.singular, k.qualified_resource, *k.short_names):
                names.setdefault(alias.lower(), k)
            names.setdefault(f"{k.singular}.{k.group}" if k.group else k.singular, k)
        self._by_name = names

    def __iter__(self) -> Iterator[Kind]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def by_gvk(self, api_version: str, kind: str) -> Kind:
        try:
            return self._by_gvk[(api_version, kind)]
        except KeyError:
            known = sorted({k.kind for k in self._kinds if api_version in k.api_versions})
            hint = f" (known kinds in {api_version}: {', '.join(known)})" if known else ""
            raise errors.BadRequest(
                f"no kind {kind!r} is registered for apiVersion {api_version!r}{hint}"
            ) from None

    def by_resource(self, group: str, resource: str) -> Kind:
        try:
            return self._by_resource[(group, resource)]
        except KeyError:
            shown = f"{resource}.{group}" if group else resource
            raise errors.NotFound(
                f'the server does not serve resource "{shown}"'
            ) from None

    def by_type(self, type_name: str) -> Kind:
        try:
            return self._by_type[type_name]
        except KeyError:
            raise errors.BadRequest(f"unknown object type {type_name!r}") from None

    def by_type_url(self, type_url: str) -> Kind:
        return self.by_type(type_url.rsplit("/", 1)[-1])

    def by_message(self, message: Message) -> Kind:
        return self.by_type(message.DESCRIPTOR.full_name)

    def by_name(self, name: str) -> Kind:
        """Resolve what a user types: 'po', 'pods', 'Pod', 'deploy', 'deployments.apps'."""
        try:
            return self._by_name[name.lower()]
        except KeyError:
            raise errors.NotFound(
                f'the server doesn\'t have a resource type "{name}"'
            ) from None


def _pod_fields() -> dict[str, FieldGetter]:
    return {
        "spec.nodeName": lambda p: str(p.spec.node_name),
        "spec.restartPolicy": lambda p: str(p.spec.restart_policy),
        "spec.schedulerName": lambda p: str(p.spec.scheduler_name),
        "spec.serviceAccountName": lambda p: str(p.spec.service_account_name),
        "spec.hostNetwork": lambda p: "true" if p.spec.host_network else "false",
        "status.phase": lambda p: str(p.status.phase),
        "status.podIP": lambda p: str(p.status.pod_ip),
        "status.nominatedNodeName": lambda p: str(p.status.nominated_node_name),
    }


def _event_fields() -> dict[str, FieldGetter]:
    fields: dict[str, FieldGetter] = {
        "reason": lambda e: str(e.reason),
        "type": lambda e: str(e.type),
        "source": lambda e: str(e.source.component),
        "reportingComponent": lambda e: str(e.reporting_component),
    }
    for name in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion",
                 "fieldPath"):
        attr = "".join("_" + c.lower() if c.isupper() else c for c in name)
        fields[f"involvedObject.{name}"] = _involved(attr)
    return fields


def _involved(attr: str) -> FieldGetter:
    return lambda e: str(getattr(e.involved_object, attr))


@functools.cache
def builtin_kinds() -> KindTable:
    """Every kind this version of Shoal serves."""
    core, apps, coord, sec = core_pb2, apps_pb2, coordination_pb2, security_pb2
    return KindTable(
        [
            Kind("", "v1", "Namespace", "namespaces", False, core.Namespace, ("ns",),
                 extra_fields={"status.phase": lambda n: str(n.status.phase)}),
            Kind("", "v1", "Node", "nodes", False, core.Node, ("no",),
                 extra_fields={"spec.unschedulable":
                               lambda n: "true" if n.spec.unschedulable else "false"}),
            Kind("", "v1", "Pod", "pods", True, core.Pod, ("po",), extra_fields=_pod_fields()),
            Kind("", "v1", "Service", "services", True, core.Service, ("svc",)),
            Kind("", "v1", "Endpoints", "endpoints", True, core.Endpoints, ("ep",),
                 has_status=False),
            Kind("", "v1", "ConfigMap", "configmaps", True, core.ConfigMap, ("cm",),
                 has_status=False),
            Kind("", "v1", "Secret", "secrets", True, core.Secret, (), has_status=False,
                 extra_fields={"type": lambda s: str(s.type)}),
            Kind("", "v1", "ServiceAccount", "serviceaccounts", True, core.ServiceAccount,
                 ("sa",), has_status=False),
            Kind("", "v1", "Event", "events", True, core.Event, ("ev",), has_status=False,
                 extra_fields=_event_fields()),
            Kind("coordination.k8s.io", "v1", "Lease", "leases", True, coord.Lease, (),
                 has_status=False),
            Kind("apps", "v1", "Deployment", "deployments", True, apps.Deployment, ("deploy",)),
            Kind("apps", "v1", "ReplicaSet", "replicasets", True, apps.ReplicaSet, ("rs",)),
            Kind("apps", "v1", "StatefulSet", "statefulsets", True, apps.StatefulSet, ("sts",)),
            Kind("apps", "v1", "DaemonSet", "daemonsets", True, apps.DaemonSet, ("ds",)),
            Kind("apps", "v1", "ControllerRevision", "controllerrevisions", True,
                 apps.ControllerRevision, (), has_status=False),
            Kind("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers",
                 True, autoscaling_pb2.HorizontalPodAutoscaler, ("hpa",)),
            Kind(ISTIO_SECURITY, "v1", "PeerAuthentication", "peerauthentications", True,
                 sec.PeerAuthentication, ("pa",), has_status=False,
                 also_versions=("v1beta1",)),
            Kind(ISTIO_SECURITY, "v1", "AuthorizationPolicy", "authorizationpolicies", True,
                 sec.AuthorizationPolicy, ("ap",), has_status=False,
                 also_versions=("v1beta1",)),
            Kind(ISTIO_NETWORKING, "v1", "VirtualService", "virtualservices", True,
                 traffic_pb2.VirtualService, ("vs",), has_status=False,
                 also_versions=_ISTIO_NETWORKING_ALSO),
            Kind(ISTIO_NETWORKING, "v1", "DestinationRule", "destinationrules", True,
                 traffic_pb2.DestinationRule, ("dr",), has_status=False,
                 also_versions=_ISTIO_NETWORKING_ALSO),
            Kind(ISTIO_NETWORKING, "v1", "Gateway", "gateways", True, traffic_pb2.Gateway,
                 ("gw",), has_status=False, also_versions=_ISTIO_NETWORKING_ALSO),
            Kind(ISTIO_NETWORKING, "v1", "ServiceEntry", "serviceentries", True,
                 traffic_pb2.ServiceEntry, ("se",), has_status=False,
                 also_versions=_ISTIO_NETWORKING_ALSO),
            Kind(ISTIO_NETWORKING, "v1", "WorkloadEntry", "workloadentries", True,
                 traffic_pb2.WorkloadEntry, ("we",), has_status=False,
                 also_versions=_ISTIO_NETWORKING_ALSO),
            Kind("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", True,
                 networking_pb2.NetworkPolicy, ("netpol",), has_status=False),
            Kind(RBAC, "v1", "Role", "roles", True, rbac_pb2.Role, (), has_status=False),
            Kind(RBAC, "v1", "ClusterRole", "clusterroles", False, rbac_pb2.ClusterRole, (),
                 has_status=False),
            Kind(RBAC, "v1", "RoleBinding", "rolebindings", True, rbac_pb2.RoleBinding, (),
                 has_status=False),
            Kind(RBAC, "v1", "ClusterRoleBinding", "clusterrolebindings", False,
                 rbac_pb2.ClusterRoleBinding, (), has_status=False),
        ]
    )
