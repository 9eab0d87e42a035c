"""Istio's security.istio.io kinds through the CLI and the SDK, on a live apiserver.

Users' Istio YAML (``security.istio.io/v1`` and ``/v1beta1``) applies unchanged,
reads back as v1, lists and describes; bad input is refused with the field named
and nothing stored.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from meshagent.policy import Peer, Target, authorize, mtls_mode
from shoal import errors
from shoal.api.security.v1 import security_pb2
from shoal.kinds import builtin_kinds
from shoal.manifests import decode
from shoal.testing.cli import Result, run_shoal
from shoal.testing.cli import make_namespace as _make_namespace


@pytest.fixture
def shoal(apiserver: Any, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> Any:
    """``await shoal("get", "pa")`` -> Result, with the apiserver's config."""
    async def run(*args: str, stdin: str | None = None) -> Result:
        return await run_shoal(apiserver.config_path, capsys, monkeypatch, *args, stdin=stdin)

    return run


async def make_namespace(shoal: Any) -> str:
    return await _make_namespace(shoal, "sec")


ISTIO_YAML = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {ns}
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: web-metrics
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: web
  mtls:
    mode: UNSET
  portLevelMtls:
    9100:
      mode: PERMISSIVE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/{ns}/sa/sleep"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-front
  namespace: {ns}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["front", "{ns}"]
        notIpBlocks: ["10.9.0.0/16"]
    to:
    - operation:
        ports: ["8080"]
    when:
    - key: source.ip
      values: ["10.244.0.0/16"]
"""


async def test_istio_yaml_applies_unchanged_and_reads_back(shoal: Any, apiserver: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("apply", "-f", "-", stdin=ISTIO_YAML.format(ns=ns))
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "peerauthentication.security.istio.io/default created",
        "peerauthentication.security.istio.io/web-metrics created",
        "authorizationpolicy.security.istio.io/deny-sleep created",
        "authorizationpolicy.security.istio.io/allow-front created",
    ]
    again = await shoal("apply", "-f", "-", stdin=ISTIO_YAML.format(ns=ns))
    assert again.code == 0 and again.out.count("unchanged") == 4, again.out

    got = await shoal("get", "ap", "allow-front", "-n", ns, "-o", "yaml")
    doc = yaml.safe_load(got.out)
    assert doc["apiVersion"] == "security.istio.io/v1"  # served as v1, whatever was written
    assert doc["spec"] == {
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"namespaces": ["front", ns],
                                        "notIpBlocks": ["10.9.0.0/16"]}}],
                   "to": [{"operation": {"ports": ["8080"]}}],
                   "when": [{"key": "source.ip", "values": ["10.244.0.0/16"]}]}],
    }
    pa_json = json.loads((await shoal("get", "peerauthentications.security.istio.io",
                                      "web-metrics", "-n", ns, "-o", "json")).out)
    assert pa_json["spec"]["portLevelMtls"] == {"9100": {"mode": "PERMISSIVE"}}

    table = await shoal("get", "pa", "-n", ns)
    assert [line.split()[:2] for line in table.out.splitlines()] == [
        ["NAME", "MODE"], ["default", "STRICT"], ["web-metrics", "UNSET"]]
    policies = await shoal("get", "authorizationpolicies", "-n", ns)
    assert [line.split()[:2] for line in policies.out.splitlines()] == [
        ["NAME", "ACTION"], ["allow-front", "ALLOW"], ["deny-sleep", "DENY"]]
    described = await shoal("describe", "ap", "deny-sleep", "-n", ns)
    assert described.code == 0
    assert f"cluster.local/ns/{ns}/sa/sleep" in described.out

    # What the meshagent will read: the SDK's typed objects, evaluated by policy.py.
    async with apiserver.client() as c:
        pas = (await c.list(security_pb2.PeerAuthentication, namespace=ns)).items
        aps = (await c.list(security_pb2.AuthorizationPolicy, namespace=ns)).items
    web = Target(namespace=ns, labels={"app": "web"}, port=8080)
    assert mtls_mode(pas, web, root_namespace="istio-system") == "STRICT"
    assert mtls_mode(pas, Target(namespace=ns, labels={"app": "web"}, port=9100),
                     root_namespace="istio-system") == "PERMISSIVE"
    sleep = Peer(principal=f"cluster.local/ns/{ns}/sa/sleep", namespace=ns, ip="10.244.1.4")
    front = Peer(principal="cluster.local/ns/front/sa/app", namespace="front", ip="10.244.2.4")
    assert authorize(aps, sleep, web, root_namespace="istio-system").policy == f"{ns}/deny-sleep"
    assert authorize(aps, front, web, root_namespace="istio-system").allowed

    deleted = await shoal("delete", "-f", "-", stdin=ISTIO_YAML.format(ns=ns))
    assert deleted.code == 0, deleted.err
    gone = await shoal("get", "pa,ap", "-n", ns)
    assert gone.code == 0 and gone.out == "", gone


async def test_api_resources_lists_the_security_kinds(shoal: Any) -> None:
    r = await shoal("api-resources")
    assert r.code == 0, r.err
    rows = {line.split()[0]: line.split() for line in r.out.splitlines()[1:]}
    assert rows["peerauthentications"][1:] == ["pa", "security.istio.io/v1", "true",
                                               "PeerAuthentication"]
    assert rows["authorizationpolicies"][1:] == ["ap", "security.istio.io/v1", "true",
                                                 "AuthorizationPolicy"]


def pa_doc(ns: str, spec: dict[str, Any], *, name: str = "bad",
           api_version: str = "security.istio.io/v1") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ap_doc(ns: str, spec: dict[str, Any], *, name: str = "bad",
           api_version: str = "security.istio.io/v1beta1") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


@pytest.mark.parametrize(("make", "field", "message"), [
    pytest.param(lambda ns: pa_doc(ns, {"mtls": {"mode": "STRICTEST"}}), "spec.mtls.mode",
                 'Unsupported value: "STRICTEST"', id="unknown-mtls-mode"),
    pytest.param(lambda ns: pa_doc(ns, {"selector": {"matchLabels": {"app": "web"}},
                                        "portLevelMtls": {70000: {"mode": "STRICT"}}}),
                 "spec.portLevelMtls[70000]", "must be between 1 and 65535",
                 id="port-out-of-range"),
    pytest.param(lambda ns: pa_doc(ns, {"portLevelMtls": {8080: {"mode": "DISABLE"}}}),
                 "spec.portLevelMtls", "cannot have port level mTLS",
                 id="port-level-without-selector"),
    pytest.param(lambda ns: pa_doc(ns, {"mtls": {"mode": "STRICT", "strict": True}}),
                 "spec.mtls.strict", 'unknown field "strict"', id="unknown-field"),
    pytest.param(lambda ns: ap_doc(ns, {"action": "CUSTOM", "rules": [{}]}),
                 "spec.provider.name", "Required value", id="custom-without-provider"),
    pytest.param(lambda ns: ap_doc(ns, {"action": "DENY"}), "spec.rules",
                 "DENY action without `rules`", id="deny-without-rules"),
    pytest.param(lambda ns: ap_doc(ns, {"action": "REJECT", "rules": [{}]}), "spec.action",
                 'Unsupported value: "REJECT"', id="unknown-action"),
    pytest.param(lambda ns: ap_doc(ns, {"rules": [{"from": [{"source": {"principals": [7]}}]}]}),
                 "spec.rules[0].from[0].source.principals[0]", "expected string, got integer",
                 id="principal-not-a-string"),
    pytest.param(lambda ns: ap_doc(ns, {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                 "spec.rules[0].to[0].operation.ports[0]", "must be a port number",
                 id="port-not-a-number"),
    pytest.param(lambda ns: ap_doc(ns, {"rules": [{"from": [{"source": {
        "ipBlocks": ["10.0.0.0/33"]}}]}]}),
                 "spec.rules[0].from[0].source.ipBlocks[0]", "CIDR", id="bad-cidr"),
    pytest.param(lambda ns: ap_doc(ns, {"rules": [{"when": [{"key": "source.colour",
                                                            "values": ["red"]}]}]}),
                 "spec.rules[0].when[0].key", 'Unsupported value: "source.colour"',
                 id="unknown-condition-key"),
    pytest.param(lambda ns: ap_doc(ns, {"rules": [{"from": [{}]}]}),
                 "spec.rules[0].from[0].source", "Required value", id="from-without-source"),
    pytest.param(lambda ns: ap_doc(ns, {"rules": [{}], "sourceSelector": {}}),
                 "spec.sourceSelector", 'unknown field "sourceSelector"',
                 id="unknown-spec-field"),
])
async def test_bad_input_is_refused_naming_the_field(shoal: Any, apiserver: Any, make: Any,
                                                     field: str, message: str) -> None:
    ns = await make_namespace(shoal)
    doc = make(ns)
    good = ap_doc(ns, {"rules": [{}]}, name="good-first")
    r = await shoal("apply", "-f", "-", stdin=yaml.safe_dump_all([good, doc]))
    assert r.code == 2, r.out
    assert field in r.err and message in r.err, r.err
    assert r.out == ""
    # Nothing stored: not the bad object, not the good one before it.
    listed = await shoal("get", "pa,ap", "-n", ns, "-o", "name")
    assert listed.code == 0 and listed.out == "", listed
    # The server refuses it too (the CLI is not the only gate).
    try:
        _, msg = decode(doc, builtin_kinds())
    except errors.Invalid:
        return  # the codec refuses it before any request can be made
    async with apiserver.client() as c:
        with pytest.raises(errors.Invalid) as raised:
            await c.create(msg)
        assert field in str(raised.value) or any(
            cause.field == field for cause in raised.value.causes)
        kind = type(msg)
        assert (await c.list(kind, namespace=ns)).items == []
