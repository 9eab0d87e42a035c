"""security.istio.io kinds: both apiVersions decode, and Istio's validation rules (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal import errors
from shoal.kinds import builtin_kinds
from shoal.manifests import decode, encode
from shoal.validation import validate

KINDS = builtin_kinds()


def doc(kind: str, spec: dict[str, Any], *, version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": kind,
            "metadata": {"name": "p", "namespace": "shop"}, "spec": spec}


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
@pytest.mark.parametrize("kind", ["PeerAuthentication", "AuthorizationPolicy"])
def test_both_api_versions_decode_and_encode_as_v1(kind: str, version: str) -> None:
    k, msg = decode(doc(kind, {}, version=version), KINDS)
    assert k.kind == kind and k.group == "security.istio.io"
    assert encode(msg, KINDS)["apiVersion"] == "security.istio.io/v1"


def test_other_versions_are_refused_with_the_known_kinds() -> None:
    with pytest.raises(errors.Invalid) as raised:
        decode(doc("PeerAuthentication", {}, version="v2"), KINDS)
    assert "security.istio.io/v2" in str(raised.value)


@pytest.mark.parametrize(("name", "kind"), [
    ("pa", "PeerAuthentication"), ("peerauthentications", "PeerAuthentication"),
    ("peerauthentications.security.istio.io", "PeerAuthentication"),
    ("ap", "AuthorizationPolicy"), ("authorizationpolicy", "AuthorizationPolicy"),
    ("authorizationpolicies.security.istio.io", "AuthorizationPolicy"),
])
def test_names_users_type(name: str, kind: str) -> None:
    assert KINDS.by_name(name).kind == kind


def test_port_keys_may_be_json_strings() -> None:
    _, msg = decode(doc("PeerAuthentication", {"selector": {"matchLabels": {"a": "b"}},
                                               "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
                    KINDS)
    assert dict(msg.spec.port_level_mtls)[8080].mode == "STRICT"  # type: ignore[attr-defined]


def problems(kind: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    k, msg = decode(doc(kind, spec), KINDS)
    return [(e.field, e.message) for e in validate(k, msg)]


SEL = {"selector": {"matchLabels": {"app": "web"}}}


@pytest.mark.parametrize("spec", [
    {},
    {"mtls": {"mode": "STRICT"}},
    {"mtls": {"mode": "UNSET"}},
    {**SEL, "mtls": {"mode": "DISABLE"}, "portLevelMtls": {8080: {"mode": "PERMISSIVE"},
                                                           9090: {}}},
])
def test_valid_peer_authentications(spec: dict[str, Any]) -> None:
    assert problems("PeerAuthentication", spec) == []


@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"mtls": {"mode": "strict"}}, "spec.mtls.mode", 'Unsupported value: "strict"'),
    ({**SEL, "portLevelMtls": {0: {"mode": "STRICT"}}}, "spec.portLevelMtls[0]",
     "must be between 1 and 65535"),
    ({**SEL, "portLevelMtls": {80: {"mode": "ON"}}}, "spec.portLevelMtls[80].mode",
     "Unsupported value"),
    ({"portLevelMtls": {80: {"mode": "STRICT"}}}, "spec.portLevelMtls",
     "cannot have port level mTLS"),
    ({"selector": {"matchLabels": {"app": "web*"}}}, "spec.selector.matchLabels[app]",
     "wildcard"),
])
def test_invalid_peer_authentications(spec: dict[str, Any], field: str, text: str) -> None:
    found = problems("PeerAuthentication", spec)
    assert any(f == field and text in m for f, m in found), found


SRC = "cluster.local/ns/front/sa/client"


@pytest.mark.parametrize("spec", [
    {},
    {"action": "ALLOW", "rules": [{}]},
    {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]},
    {**SEL, "rules": [{"from": [{"source": {"principals": [SRC], "ipBlocks": ["10.0.0.1"]}}],
                       "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}],
                       "when": [{"key": "request.headers[x-id]", "values": ["1"]},
                                {"key": "destination.port", "notValues": ["9090"]}]}]},
    {"rules": [{"from": [{"source": {"serviceAccounts": ["front/client", "local"]}}]}]},
    {"action": "CUSTOM", "provider": {"name": "opa"},
     "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]},
    {"targetRefs": [{"kind": "Service", "name": "web"},
                    {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}],
     "rules": [{}]},
])
def test_valid_authorization_policies(spec: dict[str, Any]) -> None:
    assert problems("AuthorizationPolicy", spec) == []


@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"action": "allow"}, "spec.action", 'Unsupported value: "allow"'),
    ({"action": "DENY"}, "spec.rules", "DENY action without `rules`"),
    ({"action": "CUSTOM"}, "spec.rules", "CUSTOM action without `rules`"),
    ({"action": "CUSTOM", "rules": [{}]}, "spec.provider.name", "Required value"),
    ({"provider": {"name": "opa"}, "rules": [{}]}, "spec.provider", "only be set with action"),
    ({"action": "CUSTOM", "provider": {"name": "opa"},
      "rules": [{"from": [{"source": {"principals": [SRC]}}]}]},
     "spec.rules[0].from[0].source.principals", "not supported with CUSTOM"),
    ({"rules": [{"from": [{}]}]}, "spec.rules[0].from[0].source", "Required value"),
    ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source", "must not be empty"),
    ({"rules": [{"to": [{"operation": {}}]}]}, "spec.rules[0].to[0].operation",
     "must not be empty"),
    ({"rules": [{"from": [{"source": {"principals": [""]}}]}]},
     "spec.rules[0].from[0].source.principals[0]", "empty value not allowed"),
    ({"rules": [{"from": [{"source": {"principals": [SRC], "serviceAccounts": ["a"]}}]}]},
     "spec.rules[0].from[0].source.serviceAccounts", "cannot be set together"),
    ({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]},
     "spec.rules[0].from[0].source.serviceAccounts[0]", "<namespace>/<name>"),
    ({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.300"]}}]}]},
     "spec.rules[0].from[0].source.notIpBlocks[0]", "IP address or a CIDR"),
    ({"rules": [{"to": [{"operation": {"notPorts": ["70000"]}}]}]},
     "spec.rules[0].to[0].operation.notPorts[0]", "between 0 and 65535"),
    ({"rules": [{"when": [{"key": "", "values": ["x"]}]}]}, "spec.rules[0].when[0].key",
     "Required value"),
    ({"rules": [{"when": [{"key": "source.ip"}]}]}, "spec.rules[0].when[0].values",
     "at least one of values or notValues"),
    ({"rules": [{"when": [{"key": "source.ip", "values": ["nope"]}]}]},
     "spec.rules[0].when[0].values[0]", "IP address or a CIDR"),
    ({"rules": [{"when": [{"key": "request.headers", "values": ["x"]}]}]},
     "spec.rules[0].when[0].key", "a[b]"),
    ({"rules": [{"when": [{"key": "destination.labels[app]", "values": ["x"]}]}]},
     "spec.rules[0].when[0].key", "Unsupported value"),
    ({**SEL, "targetRef": {"kind": "Service", "name": "web"}}, "spec",
     "only one of selector, targetRef or targetRefs"),
    ({"targetRefs": [{"kind": "Pod", "name": "web"}]}, "spec.targetRefs[0].kind",
     'Unsupported value: "Pod"'),
    ({"targetRef": {"kind": "Service"}}, "spec.targetRef.name", "Required value"),
    ({"targetRef": {"kind": "Service", "name": "a", "namespace": "b"}},
     "spec.targetRef.namespace", "cross namespace"),
])
def test_invalid_authorization_policies(spec: dict[str, Any], field: str, text: str) -> None:
    found = problems("AuthorizationPolicy", spec)
    assert any(f == field and text in m for f, m in found), found
