"""What a request asks to do, and what an authorizer answers (pure values).

``Attributes`` are Kubernetes' authorizer attributes for resource requests:
the caller (user, groups), a verb, the API group, resource and subresource,
and the namespace and name when there are any. ``Decision`` is one
authorizer's answer: allow, deny, or no opinion (the next authorizer decides).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

READ_VERBS = frozenset({"get", "list", "watch"})
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
VERBS = READ_VERBS | WRITE_VERBS


@dataclass(frozen=True)
class Attributes:
    user: str
    groups: tuple[str, ...]
    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def qualified_resource(self) -> str:
        """'pods', 'deployments.apps' (what kube's error messages name)."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    @property
    def full_resource(self) -> str:
        """'pods/log', 'nodes/status', 'secrets'."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    NO_OPINION = "no-opinion"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


def allow(reason: str = "") -> Decision:
    return Decision(Verdict.ALLOW, reason)


def deny(reason: str = "") -> Decision:
    return Decision(Verdict.DENY, reason)


def no_opinion(reason: str = "") -> Decision:
    return Decision(Verdict.NO_OPINION, reason)


def forbidden_message(attrs: Attributes, reason: str = "") -> str:
    """Kubernetes' wording, e.g. ``deployments.apps "web" is forbidden: User "alice"
    cannot create resource "deployments" in API group "apps" in the namespace "dev"``."""
    # A create names no object in Kubernetes' request path, so its message neither.
    named = attrs.name and attrs.verb != "create"
    what = f'{attrs.qualified_resource} "{attrs.name}"' if named else attrs.qualified_resource
    where = (f'in the namespace "{attrs.namespace}"' if attrs.namespace
             else "at the cluster scope")
    text = (f'{what} is forbidden: User "{attrs.user}" cannot {attrs.verb} resource '
            f'"{attrs.full_resource}" in API group "{attrs.group}" {where}')
    return f"{text}: {reason}" if reason else text
