"""The audit policy and the audit log's lines (pure, with a fake clock)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from apiserver.authz.attributes import Attributes
from apiserver.authz.audit import AuditLog, parse_policy
from shoal import errors

POLICY = """
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  users: ["system:kube-controller-manager"]
- level: None
  userGroups: ["system:nodes"]
  verbs: ["get", "list", "watch"]
- level: RequestResponse
  resources:
  - group: ""
    resources: ["secrets", "pods/log"]
- level: Request
  namespaces: ["prod"]
  verbs: ["create", "update", "patch", "delete"]
- level: Metadata
  resources: [{group: apps, resources: ["*/scale"]}]
- level: Metadata
  omitStages: [ResponseStarted]
  resources: [{group: "", resources: ["pods"], resourceNames: ["special"]}]
"""


def _a(verb: str, resource: str, *, user: str = "alice", groups: tuple[str, ...] = (),
       ns: str = "dev", group: str = "", sub: str = "", name: str = "") -> Attributes:
    return Attributes(user=user, groups=groups, verb=verb, group=group, resource=resource,
                      subresource=sub, namespace=ns, name=name)


@pytest.mark.parametrize("attrs,level", [
    (_a("create", "pods", user="system:kube-controller-manager"), "None"),
    (_a("list", "pods", user="system:node:n1", groups=("system:nodes",)), "None"),
    (_a("update", "pods", user="system:node:n1", groups=("system:nodes",), ns="prod"),
     "Request"),
    # Secrets are capped at Metadata whatever the rule says; pods/log is not a secret.
    (_a("get", "secrets", name="db"), "Metadata"),
    (_a("get", "pods", sub="log", name="web"), "Request"),
    (_a("create", "secrets", ns="prod"), "Metadata"),
    (_a("create", "configmaps", ns="prod"), "Metadata"),
    (_a("create", "deployments", group="apps", ns="prod"), "Request"),
    (_a("update", "deployments", group="apps", sub="scale"), "Metadata"),
    (_a("update", "deployments", group="apps"), "None"),  # no rule: None
    (_a("get", "pods", name="special"), "Metadata"),
    (_a("get", "pods", name="other"), "None"),
])
def test_levels(attrs: Attributes, level: str) -> None:
    assert parse_policy(POLICY).decide(attrs)[0] == level


def test_stages_left_out() -> None:
    policy = parse_policy(POLICY)
    assert policy.decide(_a("get", "pods", name="special"))[1] == {
        "RequestReceived", "ResponseStarted"}


@pytest.mark.parametrize("text,message", [
    ("kind: Policy\nrules: [{level: Loud}]", r"rules\[0\]\.level: 'Loud'"),
    ("kind: Policy\nrules: [{level: None, verb: [get]}]", r"rules\[0\]: unknown field 'verb'"),
    ("kind: Policy\nrules: [{level: None, users: alice}]", r"rules\[0\]\.users must be a list"),
    ("kind: Policy\nomitStages: [Later]\nrules: []", "unknown stage 'Later'"),
    ("kind: Pod\n", "must be an audit.k8s.io/v1 Policy"),
    ("kind: [", "not YAML"),
])
def test_bad_policies_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(errors.Invalid, match=message):
        parse_policy(text)


def test_a_line_per_request_with_who_what_outcome_and_latency(tmp_path: Path) -> None:
    times = iter([dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
                  dt.datetime(2026, 1, 2, 3, 4, 5, 250_000, tzinfo=dt.UTC)])
    log = AuditLog(path=str(tmp_path / "audit.log"),
                   policy=parse_policy("kind: Policy\nrules: [{level: Request}]"),
                   clock=lambda: next(times))
    rec = log.begin("Get")
    rec.attrs = _a("get", "secrets", name="db")
    rec.user, rec.groups = "alice", ("devs",)
    rec.decision, rec.reason = "forbid", ""
    rec.request_object = lambda: {"data": {"password": "c2VjcmV0"}}
    log.write(rec, stage="ResponseComplete", code="PERMISSION_DENIED", message="no")
    log.close()
    (event,) = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert event == {
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
        "auditID": rec.audit_id, "stage": "ResponseComplete", "method": "Get", "verb": "get",
        "user": {"username": "alice", "groups": ["devs"]},
        "objectRef": {"resource": "secrets", "apiGroup": "", "namespace": "dev",
                      "name": "db"},
        "responseStatus": {"code": 403, "grpcCode": "PERMISSION_DENIED", "message": "no"},
        "requestReceivedTimestamp": "2026-01-02T03:04:05.000000Z",
        "stageTimestamp": "2026-01-02T03:04:05.250000Z", "latencySeconds": 0.25,
        "annotations": {"authorization.k8s.io/decision": "forbid",
                        "authorization.k8s.io/reason": ""},
    }
