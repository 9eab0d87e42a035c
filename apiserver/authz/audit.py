"""The audit log: one JSON line per request, by a policy like Kubernetes'.

Policy file (``--audit-policy-file``), audit.k8s.io/v1 ``Policy``, simplified::

    apiVersion: audit.k8s.io/v1
    kind: Policy
    omitStages: [ResponseStarted]        # optional
    rules:                               # the first matching rule decides
    - level: None
      users: ["system:kube-controller-manager"]
    - level: Metadata
      resources: [{group: "", resources: ["secrets", "configmaps"]}]
    - level: Request
      verbs: ["create", "update", "patch", "delete"]
      namespaces: ["prod"]
    - level: Metadata

A rule matches when every selector it has matches: ``users``, ``userGroups``
(any of them), ``verbs``, ``namespaces`` and ``resources`` (``group``,
``resources`` -- ``pods``, ``pods/log``, ``*``, ``*/status`` --, and
``resourceNames``). No rule matching means level None; with a log path and no
policy file everything is logged at Metadata.

Levels: ``None`` (not logged), ``Metadata`` (who, what, outcome, latency),
``Request`` (also the request's object). ``RequestResponse`` is read as
Request: response bodies are never logged. Secrets, ConfigMaps, join and
certificate requests are never logged above Metadata, whatever the policy says,
so no secret value or token reaches the log.

Stages: a unary call writes one ``ResponseComplete`` line; a stream (watch,
logs) writes ``ResponseStarted`` when it is admitted and ``ResponseComplete``
when it ends. A refused request is one ``ResponseComplete`` line with code 403
and the authorizer's reason in ``annotations``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from apiserver.authz.attributes import Attributes
from shoal import errors, manifests
from shoal.kinds import KindTable

log = logging.getLogger(__name__)

NONE, METADATA, REQUEST = "None", "Metadata", "Request"
_LEVELS = {"None": NONE, "Metadata": METADATA, "Request": REQUEST,
           "RequestResponse": REQUEST}
_RANK = {NONE: 0, METADATA: 1, REQUEST: 2}
STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")
# Never logged above Metadata: their bodies are secrets or carry credentials.
SENSITIVE = frozenset({"secrets", "configmaps", "certificatesigningrequests"})
SENSITIVE_SUBRESOURCES = frozenset({"serviceaccounts/token",
                                    "serviceaccounts/workloadcertificate"})


def is_sensitive(a: Attributes) -> bool:
    return a.resource in SENSITIVE or a.full_resource in SENSITIVE_SUBRESOURCES


def _capped(level: str, a: Attributes) -> str:
    return METADATA if level == REQUEST and is_sensitive(a) else level

# HTTP-style codes for gRPC codes, as a Kubernetes audit event records them.
HTTP_CODES = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401,
              "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "UNIMPLEMENTED": 405,
              "ALREADY_EXISTS": 409, "ABORTED": 409, "OUT_OF_RANGE": 410,
              "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500,
              "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


@dataclass(frozen=True)
class ResourceMatch:
    group: str = ""
    resources: frozenset[str] = frozenset()
    resource_names: frozenset[str] = frozenset()

    def matches(self, a: Attributes) -> bool:
        if self.group not in (a.group, "*"):
            return False
        if self.resources:
            full = a.full_resource
            ok = ("*" in self.resources or full in self.resources
                  or (a.subresource and f"*/{a.subresource}" in self.resources)
                  or (a.subresource and f"{a.resource}/*" in self.resources))
            if not ok:
                return False
        return not self.resource_names or a.name in self.resource_names


@dataclass(frozen=True)
class PolicyRule:
    level: str
    users: frozenset[str] = frozenset()
    user_groups: frozenset[str] = frozenset()
    verbs: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    resources: tuple[ResourceMatch, ...] = ()
    omit_stages: frozenset[str] = frozenset()

    def matches(self, a: Attributes) -> bool:
        if self.users and a.user not in self.users:
            return False
        if self.user_groups and not self.user_groups.intersection(a.groups):
            return False
        if self.verbs and a.verb not in self.verbs:
            return False
        if self.namespaces and a.namespace not in self.namespaces:
            return False
        return not self.resources or any(r.matches(a) for r in self.resources)


@dataclass(frozen=True)
class Policy:
    rules: tuple[PolicyRule, ...] = ()
    omit_stages: frozenset[str] = frozenset()
    default: str = NONE

    def decide(self, a: Attributes) -> tuple[str, frozenset[str]]:
        """The level for a request and the stages to leave out."""
        for r in self.rules:
            if r.matches(a):
                return _capped(r.level, a), self.omit_stages | r.omit_stages
        return _capped(self.default, a), self.omit_stages


EVERYTHING_AT_METADATA = Policy(default=METADATA)


def _strings(path: str, value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise errors.Invalid(f"audit policy: {path} must be a list of strings")
    return frozenset(value)


def _stages(path: str, value: Any) -> frozenset[str]:
    stages = _strings(path, value)
    bad = sorted(stages - set(STAGES))
    if bad:
        raise errors.Invalid(f"audit policy: {path}: unknown stage {bad[0]!r} "
                             f"(known: {', '.join(STAGES)})")
    return stages


def parse_policy(text: str, *, source: str = "audit policy") -> Policy:
    """A Policy from YAML; Invalid naming the rule and field of the first problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.Invalid(f"{source}: not YAML: {e}") from None
    if not isinstance(data, Mapping) or data.get("kind") != "Policy":
        raise errors.Invalid(f"{source}: must be an audit.k8s.io/v1 Policy (kind: Policy)")
    rules_data = data.get("rules") or []
    if not isinstance(rules_data, list):
        raise errors.Invalid(f"{source}: rules must be a list")
    rules = []
    for i, r in enumerate(rules_data):
        path = f"rules[{i}]"
        if not isinstance(r, Mapping):
            raise errors.Invalid(f"{source}: {path} must be a mapping")
        unknown = sorted(set(r) - {"level", "users", "userGroups", "verbs", "namespaces",
                                   "resources", "omitStages", "nonResourceURLs"})
        if unknown:
            raise errors.Invalid(f"{source}: {path}: unknown field {unknown[0]!r}")
        level = _LEVELS.get(str(r.get("level", "")))
        if level is None:
            raise errors.Invalid(f"{source}: {path}.level: {r.get('level')!r} is not one of "
                                 "None, Metadata, Request, RequestResponse")
        matches = []
        for j, m in enumerate(r.get("resources") or []):
            if not isinstance(m, Mapping):
                raise errors.Invalid(f"{source}: {path}.resources[{j}] must be a mapping")
            matches.append(ResourceMatch(
                group=str(m.get("group", "")),
                resources=_strings(f"{path}.resources[{j}].resources", m.get("resources")),
                resource_names=_strings(f"{path}.resources[{j}].resourceNames",
                                        m.get("resourceNames"))))
        rules.append(PolicyRule(
            level=level, users=_strings(f"{path}.users", r.get("users")),
            user_groups=_strings(f"{path}.userGroups", r.get("userGroups")),
            verbs=_strings(f"{path}.verbs", r.get("verbs")),
            namespaces=_strings(f"{path}.namespaces", r.get("namespaces")),
            resources=tuple(matches),
            omit_stages=_stages(f"{path}.omitStages", r.get("omitStages"))))
    return Policy(rules=tuple(rules), omit_stages=_stages("omitStages", data.get("omitStages")))


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as e:
        raise errors.Invalid(f"cannot read the audit policy {path}: {e}") from None
    return parse_policy(text, source=str(path))


@dataclass
class AuditRecord:
    """One request's audit facts, filled in as the request goes."""

    method: str
    received: dt.datetime
    attrs: Attributes | None = None
    user: str = ""
    groups: tuple[str, ...] = ()
    decision: str = ""
    reason: str = ""
    request_object: Callable[[], Any] | None = None
    audit_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    level: str = ""
    omit: frozenset[str] = frozenset()


class AuditLog:
    """Writes audit events as JSON lines to a file ('-' for stdout)."""

    def __init__(self, *, path: str, policy: Policy,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
                 ) -> None:
        self.policy = policy
        self.clock = clock
        self.path = path
        self._out: IO[str] | None = None

    def _stream(self) -> IO[str]:
        if self._out is None:
            if self.path == "-":
                self._out = sys.stdout
            else:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._out = open(fd, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        return self._out

    def begin(self, method: str) -> AuditRecord:
        return AuditRecord(method=method, received=self.clock())

    def _level(self, rec: AuditRecord) -> str:
        if not rec.level:
            a = rec.attrs or Attributes(user=rec.user, groups=rec.groups, verb="")
            rec.level, rec.omit = self.policy.decide(a)
        return rec.level

    def write(self, rec: AuditRecord, *, stage: str, code: str, message: str = "") -> None:
        level = self._level(rec)
        if level == NONE or stage in rec.omit:
            return
        now = self.clock()
        a = rec.attrs
        event: dict[str, Any] = {
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": level,
            "auditID": rec.audit_id, "stage": stage, "method": rec.method,
            "verb": a.verb if a else "",
            "user": {"username": rec.user or (a.user if a else ""),
                     "groups": list(rec.groups or (a.groups if a else ()))},
        }
        if a is not None and a.resource:
            ref = {"resource": a.resource, "apiGroup": a.group}
            if a.subresource:
                ref["subresource"] = a.subresource
            if a.namespace:
                ref["namespace"] = a.namespace
            if a.name:
                ref["name"] = a.name
            event["objectRef"] = ref
        status: dict[str, Any] = {"code": HTTP_CODES.get(code, 500), "grpcCode": code}
        if message and code != "OK":
            status["message"] = message
        event["responseStatus"] = status
        event["requestReceivedTimestamp"] = _ts(rec.received)
        event["stageTimestamp"] = _ts(now)
        event["latencySeconds"] = round((now - rec.received).total_seconds(), 6)
        if rec.decision:
            event["annotations"] = {"authorization.k8s.io/decision": rec.decision,
                                    "authorization.k8s.io/reason": rec.reason}
        if (level == REQUEST and a is not None and rec.request_object is not None
                and stage != "ResponseStarted"):
            try:
                body = rec.request_object()
            except Exception:  # the request was malformed: log without it
                body = None
            if body is not None:
                event["requestObject"] = body
        try:
            self._stream().write(json.dumps(event, separators=(",", ":")) + "\n")
        except OSError as e:
            log.error("audit log %s: %s", self.path, e)

    def close(self) -> None:
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None


def _ts(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")



def request_renderer(kinds: KindTable) -> Callable[[Any], Any]:
    """The JSON form of a request for level Request: the object of a create or
    update as its manifest, other requests as their fields."""

    def render(request: Any) -> Any:
        if not isinstance(request, Message):
            return None  # a client stream (image import): not logged
        packed = getattr(request, "object", None)
        if isinstance(packed, any_pb2.Any) and packed.type_url:
            kind = kinds.by_type_url(packed.type_url)
            obj = kind.new()
            obj.ParseFromString(packed.value)
            return manifests.encode(obj, kinds)
        return json_format.MessageToDict(request)

    return render
