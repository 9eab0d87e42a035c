"""RBAC with Kubernetes' semantics: rule matching, bindings, aggregation,
validation of RBAC manifests (pure, table-driven)."""

from __future__ import annotations

import pytest

from apiserver.authz import bootstrap
from apiserver.authz.access import Chain, MastersAuthorizer
from apiserver.authz.attributes import Attributes, forbidden_message
from apiserver.authz.escalation import describe_rule, not_held
from apiserver.authz.rbac import RBACIndex, Rule, rule_allows
from shoal import manifests, validation
from shoal.api.rbac.v1 import rbac_pb2
from shoal.kinds import builtin_kinds


def _a(verb: str, resource: str, *, group: str = "", sub: str = "", ns: str = "dev",
       name: str = "", user: str = "alice", groups: tuple[str, ...] = ()) -> Attributes:
    return Attributes(user=user, groups=groups, verb=verb, group=group, resource=resource,
                      subresource=sub, namespace=ns, name=name)


def _split(text: str) -> frozenset[str]:
    return frozenset(text.split(",")) if text else frozenset()


def _rule(verbs: str, groups: str, resources: str, names: str = "") -> Rule:
    split = _split
    return Rule(split(verbs), frozenset(groups.split(",")), split(resources), split(names))


@pytest.mark.parametrize("rule,attrs,allowed", [
    (_rule("get", "", "pods"), _a("get", "pods"), True),
    (_rule("get", "", "pods"), _a("list", "pods"), False),
    (_rule("*", "", "pods"), _a("delete", "pods"), True),
    (_rule("get", "", "pods"), _a("get", "pods", group="apps"), False),
    (_rule("get", "*", "pods"), _a("get", "pods", group="apps"), True),
    (_rule("get", "apps", "deployments"), _a("get", "deployments", group="apps"), True),
    (_rule("get", "", "*"), _a("get", "secrets"), True),
    # subresources: never matched by the bare resource
    (_rule("get", "", "pods"), _a("get", "pods", sub="log"), False),
    (_rule("get", "", "pods/log"), _a("get", "pods", sub="log"), True),
    (_rule("get", "", "pods/log"), _a("get", "pods"), False),
    (_rule("update", "", "*/status"), _a("update", "nodes", sub="status"), True),
    (_rule("update", "", "*/status"), _a("update", "nodes"), False),
    (_rule("create", "", "*"), _a("create", "pods", sub="exec"), True),
    # resourceNames
    (_rule("get", "", "secrets", "a,b"), _a("get", "secrets", name="a"), True),
    (_rule("get", "", "secrets", "a,b"), _a("get", "secrets", name="c"), False),
    (_rule("list", "", "secrets", "a"), _a("list", "secrets"), False),
    (_rule("create", "", "secrets", "a"), _a("create", "secrets", name="a"), False),
])
def test_rule_matching(rule: Rule, attrs: Attributes, allowed: bool) -> None:
    assert rule_allows(rule, attrs) is allowed


def _role(name: str, ns: str, *rules: rbac_pb2.PolicyRule) -> rbac_pb2.Role:
    r = rbac_pb2.Role(rules=list(rules))
    r.metadata.name, r.metadata.namespace = name, ns
    return r


def _rb(name: str, ns: str, kind: str, role: str,
        *subjects: tuple[str, str, str]) -> rbac_pb2.RoleBinding:
    b = rbac_pb2.RoleBinding(role_ref=rbac_pb2.RoleRef(
        api_group="rbac.authorization.k8s.io", kind=kind, name=role))
    b.metadata.name, b.metadata.namespace = name, ns
    for skind, sname, sns in subjects:
        b.subjects.add(kind=skind, name=sname, namespace=sns)
    return b


def _crb(name: str, role: str, *subjects: tuple[str, str, str]) -> rbac_pb2.ClusterRoleBinding:
    b = rbac_pb2.ClusterRoleBinding(role_ref=rbac_pb2.RoleRef(
        api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role))
    b.metadata.name = name
    for skind, sname, sns in subjects:
        b.subjects.add(kind=skind, name=sname, namespace=sns)
    return b


def _index(**extra: list[object]) -> RBACIndex:
    return RBACIndex.build(
        roles=[_role("pod-reader", "dev", rbac_pb2.PolicyRule(
            verbs=["get", "list"], api_groups=[""], resources=["pods"]))],
        cluster_roles=bootstrap.cluster_roles(),
        role_bindings=[
            _rb("alice-edit", "dev", "ClusterRole", "edit", ("User", "alice", "")),
            _rb("bob-reads", "dev", "Role", "pod-reader", ("User", "bob", "")),
            _rb("robots", "dev", "ClusterRole", "view", ("ServiceAccount", "robot", "")),
            _rb("dangling", "dev", "Role", "missing", ("User", "carol", "")),
        ],
        cluster_role_bindings=[
            *bootstrap.cluster_role_bindings(),
            _crb("viewers", "view", ("Group", "viewers", "")),
            _crb("ops-admin", "admin", ("User", "ops", "")),
        ])


@pytest.mark.parametrize("attrs,allowed", [
    # view (by group, everywhere): reads, no writes, no secrets
    (_a("get", "pods", user="v", groups=("viewers",)), True),
    (_a("list", "deployments", group="apps", user="v", groups=("viewers",), ns="prod"), True),
    (_a("create", "deployments", group="apps", user="v", groups=("viewers",)), False),
    (_a("get", "secrets", user="v", groups=("viewers",)), False),
    (_a("get", "pods", sub="log", user="v", groups=("viewers",)), True),
    (_a("create", "pods", sub="exec", user="v", groups=("viewers",)), False),
    # edit in dev only (a RoleBinding of a ClusterRole)
    (_a("create", "deployments", group="apps"), True),
    (_a("delete", "secrets", name="x"), True),
    (_a("create", "pods", sub="exec", name="p"), True),
    (_a("get", "pods", sub="log", name="p"), True),  # edit aggregates view
    (_a("create", "deployments", group="apps", ns="prod"), False),
    (_a("get", "pods", ns="prod"), False),
    (_a("list", "nodes", ns=""), False),  # cluster-scoped: RoleBindings never reach it
    (_a("create", "rolebindings", group="rbac.authorization.k8s.io"), False),  # admin only
    # admin (ClusterRoleBinding): edit plus RBAC within namespaces
    (_a("create", "rolebindings", group="rbac.authorization.k8s.io", user="ops"), True),
    (_a("create", "pods", user="ops", ns="anything"), True),
    # a Role: only its rules, only its namespace
    (_a("get", "pods", user="bob"), True),
    (_a("watch", "pods", user="bob"), False),
    (_a("get", "pods", user="bob", ns="prod"), False),
    # service accounts: namespace defaults to the binding's
    (_a("get", "pods", user="system:serviceaccount:dev:robot"), True),
    (_a("get", "pods", user="system:serviceaccount:prod:robot"), False),
    # a binding to a missing role grants nothing
    (_a("get", "pods", user="carol"), False),
    # nobody
    (_a("get", "pods", user="mallory"), False),
    # cluster-admin is bound to system:masters
    (_a("delete", "nodes", ns="", user="root", groups=("system:masters",)), True),
])
def test_bindings(attrs: Attributes, allowed: bool) -> None:
    assert _index().authorize(attrs).allowed is allowed


def test_reason_names_the_binding() -> None:
    d = _index().authorize(_a("create", "deployments", group="apps"))
    assert d.reason == ('RBAC: allowed by RoleBinding "dev/alice-edit" of ClusterRole "edit" '
                        'to User "alice"')


def test_aggregation_takes_labelled_roles() -> None:
    extra = rbac_pb2.ClusterRole(rules=[rbac_pb2.PolicyRule(
        verbs=["get"], api_groups=["example.com"], resources=["widgets"])])
    extra.metadata.name = "widgets-view"
    extra.metadata.labels["rbac.authorization.k8s.io/aggregate-to-view"] = "true"
    index = RBACIndex.build(roles=[], cluster_roles=[*bootstrap.cluster_roles(), extra],
                            role_bindings=[], cluster_role_bindings=[
                                _crb("a", "admin", ("User", "a", ""))])
    # view -> edit -> admin: transitive
    assert index.authorize(_a("get", "widgets", group="example.com", user="a")).allowed


def test_forbidden_message_is_kubes() -> None:
    assert forbidden_message(_a("create", "deployments", group="apps")) == (
        'deployments.apps is forbidden: User "alice" cannot create resource "deployments" '
        'in API group "apps" in the namespace "dev"')
    assert forbidden_message(_a("update", "nodes", sub="status", ns="", name="n2"),
                             "node 'n1' cannot modify node 'n2'") == (
        'nodes "n2" is forbidden: User "alice" cannot update resource "nodes/status" in API '
        'group "" at the cluster scope: node \'n1\' cannot modify node \'n2\'')


def test_masters_first_then_rbac() -> None:
    chain = Chain([MastersAuthorizer(), _index()])
    assert chain.authorize(_a("delete", "nodes", groups=("system:masters",))).allowed
    assert not chain.authorize(_a("delete", "nodes", user="mallory")).allowed


# -- manifests: Kubernetes' RBAC YAML applies unchanged --------------------------------

_GOOD = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: "system:monitoring"
aggregationRule:
  clusterRoleSelectors:
  - matchLabels: {rbac.example.com/aggregate-to-monitoring: "true"}
rules:
- nonResourceURLs: ["/metrics"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods", "pods/log"]
  resourceNames: ["web"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: read-pods, namespace: default}
subjects:
- {kind: User, name: jane, apiGroup: rbac.authorization.k8s.io}
- {kind: Group, name: devs}
- {kind: ServiceAccount, name: default}
roleRef: {kind: ClusterRole, name: view, apiGroup: rbac.authorization.k8s.io}
"""


def _decode_all(text: str) -> list[tuple[object, object]]:
    docs = manifests.load_documents(text, source="rbac.yaml")
    return list(manifests.iter_decode(docs, builtin_kinds()))


def test_kubernetes_rbac_yaml_decodes_and_validates() -> None:
    decoded = _decode_all(_GOOD)
    for kind, obj in decoded:
        validation.apply_defaults(kind, obj)  # type: ignore[arg-type]
        assert validation.validate(kind, obj) == []  # type: ignore[arg-type]
    _, rb = decoded[1]
    assert isinstance(rb, rbac_pb2.RoleBinding)
    assert rb.subjects[1].api_group == "rbac.authorization.k8s.io"  # defaulted
    assert rb.subjects[2].api_group == ""


@pytest.mark.parametrize("doc,field,message", [
    ("kind: Role\nmetadata: {name: r, namespace: d}\nrules: [{apiGroups: [''], "
     "resources: [pods]}]", "rules[0].verbs", "Required value"),
    ("kind: Role\nmetadata: {name: r, namespace: d}\nrules: [{verbs: [get], "
     "resources: [pods]}]", "rules[0].apiGroups", "Required value"),
    ("kind: Role\nmetadata: {name: r, namespace: d}\nrules: [{verbs: [get], "
     "nonResourceURLs: [/x]}]", "rules[0].nonResourceURLs", "namespaced rules"),
    ("kind: ClusterRoleBinding\nmetadata: {name: b}\nroleRef: {kind: Role, name: r}\n"
     "subjects: []", "roleRef.kind", "Unsupported value"),
    ("kind: ClusterRoleBinding\nmetadata: {name: b}\nroleRef: {kind: ClusterRole, name: r}\n"
     "subjects: [{kind: ServiceAccount, name: s}]", "subjects[0].namespace", "Required"),
    ("kind: RoleBinding\nmetadata: {name: b, namespace: d}\n"
     "roleRef: {kind: ClusterRole, name: r}\nsubjects: [{kind: Robot, name: s}]",
     "subjects[0].kind", "Unsupported value"),
    ("kind: RoleBinding\nmetadata: {name: b, namespace: d}\n"
     "roleRef: {kind: ClusterRole, name: ''}\nsubjects: []", "roleRef.name", "Required"),
    ("kind: ClusterRole\nmetadata: {name: 'a/b'}\nrules: []", "metadata.name", "may not"),
])
def test_bad_rbac_objects_name_the_field(doc: str, field: str, message: str) -> None:
    (kind, obj), = _decode_all("apiVersion: rbac.authorization.k8s.io/v1\n" + doc)
    validation.apply_defaults(kind, obj)  # type: ignore[arg-type]
    errs = validation.validate(kind, obj)  # type: ignore[arg-type]
    assert any(e.field == field and message in e.message for e in errs), errs


def test_role_ref_is_immutable() -> None:
    (kind, old), = _decode_all(_GOOD.split("---")[1])
    validation.apply_defaults(kind, old)  # type: ignore[arg-type]
    new = type(old)()
    new.CopyFrom(old)  # type: ignore[arg-type]
    new.role_ref.name = "edit"
    errs = validation.validate_update(kind, new, old)  # type: ignore[arg-type]
    assert [e.field for e in errs] == ["roleRef"]
    assert "cannot change roleRef" in errs[0].message


def test_bootstrap_reconcile_restores_rules_unless_opted_out() -> None:
    wanted = bootstrap.cluster_roles()[3]  # view
    current = rbac_pb2.ClusterRole()
    current.CopyFrom(wanted)
    current.metadata.resource_version = "7"
    assert bootstrap.reconciled(current, wanted) is None
    del current.aggregation_rule.cluster_role_selectors[:]
    fixed = bootstrap.reconciled(current, wanted)
    assert fixed is not None and fixed.aggregation_rule == wanted.aggregation_rule
    current.metadata.annotations[bootstrap.AUTOUPDATE] = "false"
    assert bootstrap.reconciled(current, wanted) is None


# -- escalation: no one grants what they do not hold -------------------------------------


@pytest.mark.parametrize("rules,missing", [
    ([_rule("get,list", "", "pods")], []),
    ([_rule("get", "", "pods/log")], []),  # edit aggregates view
    ([_rule("get", "", "nodes")], [0]),  # cluster-scoped: not through a RoleBinding
    ([_rule("*", "", "pods")], [0]),  # a wildcard needs a wildcard
    ([_rule("get", "", "pods"), _rule("create", "apps", "deployments"),
      _rule("create", "", "rolebindings")], [2]),
    ([_rule("get", "", "secrets", "db")], []),
])
def test_not_held(rules: list[Rule], missing: list[int]) -> None:
    index = _index()
    got = not_held(rules, user="alice", groups=(), namespace="dev",
                   allows=lambda a: index.authorize(a).allowed)
    assert got == [rules[i] for i in missing]


def test_escalation_message_is_kubes() -> None:
    assert describe_rule(_rule("get,list", "", "pods,secrets")) == (
        '{APIGroups:[""], Resources:["pods" "secrets"], Verbs:["get" "list"]}')
