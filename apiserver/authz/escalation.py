"""RBAC escalation prevention: no one grants what they do not hold.

As in Kubernetes, writing a Role or ClusterRole needs either the ``escalate``
verb on it or every permission the role grants; writing a RoleBinding or
ClusterRoleBinding needs either ``bind`` on the role it refers to or every
permission that role grants (in the binding's namespace for a RoleBinding,
everywhere for a ClusterRoleBinding). A ClusterRole with an aggregationRule
grants whatever comes to match it, so it needs ``escalate``.

Coverage is checked rule by rule, each (verb, group, resource, name) of the
role asked of the caller's own authorizers with wildcards taken literally: a
role granting ``*`` needs the caller to hold ``*``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from apiserver.authz.attributes import Attributes, Decision
from apiserver.authz.rbac import RBACIndex, Rule
from shoal import errors
from shoal.kinds import RBAC

Allows = Callable[[Attributes], bool]


class Authorizer(Protocol):
    def authorize(self, attrs: Attributes) -> Decision: ...


def _show(values: Iterable[str]) -> str:
    return "[" + " ".join(json.dumps(v) for v in sorted(values)) + "]"


def describe_rule(rule: Rule) -> str:
    """Kubernetes' compact form: {APIGroups:[""], Resources:["pods"], Verbs:["get"]}."""
    parts = [f"APIGroups:{_show(rule.api_groups)}", f"Resources:{_show(rule.resources)}"]
    if rule.resource_names:
        parts.append(f"ResourceNames:{_show(rule.resource_names)}")
    parts.append(f"Verbs:{_show(rule.verbs)}")
    return "{" + ", ".join(parts) + "}"


def not_held(rules: Sequence[Rule], *, user: str, groups: tuple[str, ...], namespace: str,
             allows: Allows) -> list[Rule]:
    """The rules (of a role to be granted) the caller does not fully hold."""
    missing = []
    for rule in rules:
        names = sorted(rule.resource_names) or [""]
        held = all(
            allows(Attributes(user=user, groups=groups, verb=verb, group=group,
                              resource=resource.partition("/")[0],
                              subresource=resource.partition("/")[2], namespace=namespace,
                              name=name))
            for verb in sorted(rule.verbs) for group in sorted(rule.api_groups)
            for resource in sorted(rule.resources) for name in names)
        if not held:
            missing.append(rule)
    return missing


def escalation_message(what: str, *, user: str, groups: tuple[str, ...],
                       missing: Sequence[Rule]) -> str:
    shown = "; ".join(describe_rule(r) for r in missing)
    return (f'{what} is forbidden: user "{user}" (groups={_show(groups)}) is attempting to '
            f"grant RBAC permissions not currently held: {shown}")


class EscalationCheck:
    """Refuse a Role, ClusterRole or binding write that would grant more than the
    caller holds (``errors.Forbidden``), using the live authorizers and roles."""

    def __init__(self, *, authorizer: Authorizer, index: Callable[[], RBACIndex]) -> None:
        self.authorizer = authorizer
        self.index = index

    def _allows(self, attrs: Attributes) -> bool:
        return self.authorizer.authorize(attrs).allowed

    def check(self, *, user: str, groups: tuple[str, ...], resource: str, obj: Any) -> None:
        if resource not in ("roles", "clusterroles", "rolebindings", "clusterrolebindings"):
            return
        ns = obj.metadata.namespace if resource in ("roles", "rolebindings") else ""
        name = obj.metadata.name
        what = f'{resource}.{RBAC} "{name}"'

        def may(verb: str, on: str, on_name: str) -> bool:
            return self._allows(Attributes(user=user, groups=groups, verb=verb, group=RBAC,
                                           resource=on, namespace=ns, name=on_name))

        if resource in ("roles", "clusterroles"):
            if may("escalate", resource, name):
                return
            if resource == "clusterroles" and obj.aggregation_rule.cluster_role_selectors:
                raise errors.Forbidden(
                    f'{what} is forbidden: user "{user}" may not create an aggregated '
                    "ClusterRole without the escalate permission", kind=resource, name=name,
                    group=RBAC)
            rules: Sequence[Rule] = [Rule.of(r) for r in obj.rules]
        else:
            ref = obj.role_ref
            on = "roles" if ref.kind == "Role" else "clusterroles"
            if may("bind", on, ref.name):
                return
            index = self.index()
            found = (index.roles.get((ns, ref.name)) if ref.kind == "Role"
                     else index.cluster_roles.get(ref.name))
            if found is None:
                raise errors.Forbidden(
                    f'{what} is forbidden: user "{user}" may not bind {ref.kind} '
                    f'"{ref.name}": it does not exist (or has just been created; retry), '
                    "and the bind permission is not held", kind=resource, name=name, group=RBAC)
            rules = found
        missing = not_held(rules, user=user, groups=groups, namespace=ns, allows=self._allows)
        if missing:
            raise errors.Forbidden(escalation_message(what, user=user, groups=groups,
                                                      missing=missing),
                                   kind=resource, name=name, group=RBAC)
