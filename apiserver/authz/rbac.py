"""RBAC: Roles, ClusterRoles and their bindings, with Kubernetes' semantics.

    Rule, Grant, RBACIndex      pure: what a set of RBAC objects allows
    RBACAuthorizer              the index kept from the watch cache

Matching (``rule_allows``), as Kubernetes does it:

- verbs, apiGroups, resources: ``*`` matches anything;
- a resource with a subresource (``pods/log``) is matched by ``pods/log``,
  ``*/log`` or ``*``, never by ``pods`` alone;
- resourceNames, when given, only match requests that name one of them (so a
  create, or a list or watch not pinned to one name, never matches such a rule);
- a RoleBinding grants its role's rules in its own namespace only; a
  ClusterRoleBinding grants everywhere, cluster-scoped resources included;
- a ServiceAccount subject is the user ``system:serviceaccount:<ns>:<name>``
  (its namespace defaults to the RoleBinding's).

A ClusterRole with an ``aggregationRule`` is evaluated as the union of the
rules of every ClusterRole whose labels match a selector (Kubernetes' controller
writes them into the object; Shoal folds them in here, so the stored object's
``rules`` stay as written). Non-resource URLs are never matched: Shoal serves
none.

The live authorizer rebuilds its index when one of the four kinds changed
(a watch-cache listener marks it stale) and never reads storage per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from apiserver.authz.attributes import Attributes, Decision, allow, no_opinion
from apiserver.watchcache import CacheEvent, WatchCache
from shoal import selectors
from shoal.api.rbac.v1 import rbac_pb2
from shoal.kinds import RBAC, KindTable

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Rule:
    verbs: frozenset[str]
    api_groups: frozenset[str]
    resources: frozenset[str]
    resource_names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, rule: rbac_pb2.PolicyRule) -> Rule:
        return cls(frozenset(rule.verbs), frozenset(rule.api_groups),
                   frozenset(rule.resources), frozenset(rule.resource_names))


def rule_allows(rule: Rule, attrs: Attributes) -> bool:
    if "*" not in rule.verbs and attrs.verb not in rule.verbs:
        return False
    if "*" not in rule.api_groups and attrs.group not in rule.api_groups:
        return False
    if "*" not in rule.resources:
        if attrs.subresource:
            if (attrs.full_resource not in rule.resources
                    and f"*/{attrs.subresource}" not in rule.resources):
                return False
        elif attrs.resource not in rule.resources:
            return False
    if rule.resource_names:
        # As in Kubernetes, a create is never restricted by name.
        return attrs.verb != "create" and bool(attrs.name) and \
            attrs.name in rule.resource_names
    return True


def service_account_user(namespace: str, name: str) -> str:
    return f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"


@dataclass(frozen=True)
class Grant:
    """One binding's grant to one subject."""

    binding_kind: str  # RoleBinding | ClusterRoleBinding
    binding_namespace: str  # "" for a ClusterRoleBinding
    binding_name: str
    role_kind: str  # Role | ClusterRole
    role_name: str
    subject: str  # 'User "alice"', for the reason

    def describe(self) -> str:
        binding = (f"{self.binding_namespace}/{self.binding_name}"
                   if self.binding_namespace else self.binding_name)
        return (f'RBAC: allowed by {self.binding_kind} "{binding}" of {self.role_kind} '
                f'"{self.role_name}" to {self.subject}')


@dataclass
class RBACIndex:
    """Everything the RBAC objects allow, indexed by subject (pure)."""

    cluster_roles: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    roles: dict[tuple[str, str], tuple[Rule, ...]] = field(default_factory=dict)
    by_user: dict[str, list[Grant]] = field(default_factory=dict)
    by_group: dict[str, list[Grant]] = field(default_factory=dict)

    @classmethod
    def build(cls, *, roles: Iterable[rbac_pb2.Role],
              cluster_roles: Iterable[rbac_pb2.ClusterRole],
              role_bindings: Iterable[rbac_pb2.RoleBinding],
              cluster_role_bindings: Iterable[rbac_pb2.ClusterRoleBinding]) -> RBACIndex:
        index = cls()
        for r in roles:
            index.roles[(r.metadata.namespace, r.metadata.name)] = tuple(
                Rule.of(x) for x in r.rules)
        index.cluster_roles = aggregate(list(cluster_roles))
        for b in role_bindings:
            index._add(b, "RoleBinding", b.metadata.namespace)
        for cb in cluster_role_bindings:
            index._add(cb, "ClusterRoleBinding", "")
        return index

    def _add(self, binding: Any, binding_kind: str, namespace: str) -> None:
        ref = binding.role_ref
        for s in binding.subjects:
            if s.kind == "User":
                target, key, subject = self.by_user, s.name, f'User "{s.name}"'
            elif s.kind == "Group":
                target, key, subject = self.by_group, s.name, f'Group "{s.name}"'
            elif s.kind == "ServiceAccount":
                ns = s.namespace or namespace
                target, key = self.by_user, service_account_user(ns, s.name)
                subject = f'ServiceAccount "{ns}/{s.name}"'
            else:
                continue
            target.setdefault(key, []).append(Grant(
                binding_kind=binding_kind, binding_namespace=namespace,
                binding_name=binding.metadata.name, role_kind=ref.kind,
                role_name=ref.name, subject=subject))

    def rules_of(self, grant: Grant) -> Sequence[Rule]:
        if grant.role_kind == "ClusterRole":
            return self.cluster_roles.get(grant.role_name, ())
        if grant.role_kind == "Role" and grant.binding_namespace:
            return self.roles.get((grant.binding_namespace, grant.role_name), ())
        return ()

    def grants_for(self, user: str, groups: Iterable[str]) -> list[Grant]:
        out = list(self.by_user.get(user, ()))
        for g in groups:
            out.extend(self.by_group.get(g, ()))
        return out

    def authorize(self, attrs: Attributes) -> Decision:
        for grant in self.grants_for(attrs.user, attrs.groups):
            if grant.binding_namespace and grant.binding_namespace != attrs.namespace:
                continue  # a RoleBinding grants in its own namespace only
            if any(rule_allows(r, attrs) for r in self.rules_of(grant)):
                return allow(grant.describe())
        return no_opinion()


def aggregate(cluster_roles: Sequence[rbac_pb2.ClusterRole]) -> dict[str, tuple[Rule, ...]]:
    """Each ClusterRole's rules with its aggregated roles' rules folded in. Like
    Kubernetes' controller writing them into the objects, aggregation is
    transitive (admin takes edit's, which took view's): repeated to a fixpoint."""
    written = {cr.metadata.name: tuple(dict.fromkeys(Rule.of(x) for x in cr.rules))
               for cr in cluster_roles}
    picks: dict[str, list[str]] = {}
    for cr in cluster_roles:
        sels = [selectors.from_proto(s) for s in cr.aggregation_rule.cluster_role_selectors]
        if sels:
            picks[cr.metadata.name] = sorted(
                o.metadata.name for o in cluster_roles
                if o.metadata.name != cr.metadata.name
                and any(sel.matches(dict(o.metadata.labels)) for sel in sels))
    out = dict(written)
    for _ in range(len(picks) + 1):
        changed = False
        for name, others in picks.items():
            rules = dict.fromkeys(written[name])
            for other in others:
                rules.update(dict.fromkeys(out[other]))
            merged = tuple(rules)
            if merged != out[name]:
                out[name], changed = merged, True
        if not changed:
            break
    return out


class RBACAuthorizer:
    """The RBAC index, kept current from the watch cache's four RBAC kinds."""

    def __init__(self, *, cache: WatchCache, kinds: KindTable) -> None:
        self._caches = [cache.cache_for(kinds.by_resource(RBAC, r))
                        for r in ("roles", "clusterroles", "rolebindings",
                                  "clusterrolebindings")]
        self._seen: list[Mapping[str, Any]] = []
        self._index = RBACIndex()
        self._stale = True
        for kc in self._caches:
            kc.listeners.append(self._changed)

    def _changed(self, ev: CacheEvent) -> None:
        self._stale = True

    def index(self) -> RBACIndex:
        # A relist replaces the cache's dicts without events: compare identities.
        current: list[Mapping[str, Any]] = [kc.objects for kc in self._caches]
        if self._stale or any(a is not b for a, b in zip(current, self._seen, strict=False)) \
                or len(self._seen) != len(current):
            self._stale = False
            self._seen = current
            decoded = [[_decode(kc.kind.new(), o.raw) for o in kc.objects.values()]
                       for kc in self._caches]
            self._index = RBACIndex.build(roles=decoded[0], cluster_roles=decoded[1],
                                          role_bindings=decoded[2],
                                          cluster_role_bindings=decoded[3])
        return self._index

    def authorize(self, attrs: Attributes) -> Decision:
        return self.index().authorize(attrs)


def _decode(msg: Any, raw: bytes) -> Any:
    msg.ParseFromString(raw)
    return msg
