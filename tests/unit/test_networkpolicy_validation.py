"""networking.k8s.io/v1 NetworkPolicy: Kubernetes' manifests decode unchanged, the
API's defaults, and Kubernetes' validation rules, each naming its field (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.kinds import builtin_kinds
from shoal.manifests import decode, encode, load_documents
from shoal.validation import apply_defaults, validate

KINDS = builtin_kinds()

# From the Kubernetes documentation's NetworkPolicy page, unchanged.
KUBE_EXAMPLE = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
"""


def test_the_kube_docs_example_decodes_validates_and_round_trips() -> None:
    [document] = load_documents(KUBE_EXAMPLE, source="kube-docs.yaml")
    doc = dict(document.data)
    kind, np = decode(doc, KINDS)
    assert (kind.group, kind.kind, kind.resource) == ("networking.k8s.io", "NetworkPolicy",
                                                     "networkpolicies")
    apply_defaults(kind, np)
    assert validate(kind, np) == []
    rule = np.spec.ingress[0]  # type: ignore[attr-defined]
    assert list(rule.from_[0].ip_block.except_) == ["172.17.1.0/24"]
    assert rule.from_[1].HasField("namespace_selector")
    assert not rule.from_[1].HasField("pod_selector")
    assert encode(np, KINDS) == {**doc, "metadata": {"name": "test-network-policy",
                                                     "namespace": "default"}}


@pytest.mark.parametrize(("name", "kind"), [
    ("netpol", "NetworkPolicy"), ("networkpolicies", "NetworkPolicy"),
    ("networkpolicy", "NetworkPolicy"), ("networkpolicies.networking.k8s.io", "NetworkPolicy"),
])
def test_names_users_type(name: str, kind: str) -> None:
    assert KINDS.by_name(name).kind == kind


def policy(spec: dict[str, Any]) -> Any:
    kind, np = decode({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                       "metadata": {"name": "p", "namespace": "shop"}, "spec": spec}, KINDS)
    apply_defaults(kind, np)
    return np


@pytest.mark.parametrize(("spec", "types"), [
    ({"podSelector": {}}, ["Ingress"]),
    ({"podSelector": {}, "ingress": [{}]}, ["Ingress"]),
    ({"podSelector": {}, "egress": [{}]}, ["Ingress", "Egress"]),
    ({"podSelector": {}, "egress": []}, ["Ingress"]),
    ({"podSelector": {}, "policyTypes": ["Egress"]}, ["Egress"]),
])
def test_policy_types_default_as_kubernetes(spec: dict[str, Any], types: list[str]) -> None:
    assert list(policy(spec).spec.policy_types) == types


def test_ports_default_to_tcp() -> None:
    np = policy({"ingress": [{"ports": [{"port": 80}, {"protocol": "UDP", "port": 53}]}],
                 "egress": [{"ports": [{"port": "dns"}]}]})
    assert [p.protocol for p in np.spec.ingress[0].ports] == ["TCP", "UDP"]
    assert [p.protocol for p in np.spec.egress[0].ports] == ["TCP"]


def problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    kind = KINDS.by_name("networkpolicies")
    return [(e.field, e.message) for e in validate(kind, policy(spec))]


PEER = {"podSelector": {"matchLabels": {"app": "web"}}}


@pytest.mark.parametrize("spec", [
    {"podSelector": {}},  # default deny ingress
    {"podSelector": {}, "ingress": [{}]},  # allow all ingress
    {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},  # deny all both ways
    {"ingress": [{"from": [PEER, {"namespaceSelector": {}, **PEER}],
                  "ports": [{"port": "http"}, {"protocol": "SCTP"},
                            {"protocol": "UDP", "port": 32000, "endPort": 32768}]}]},
    {"egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}]}]},
    {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In",
                                           "values": ["db"]}]}},
])
def test_valid_policies(spec: dict[str, Any]) -> None:
    assert problems(spec) == []


@pytest.mark.parametrize(("spec", "field", "message"), [
    ({"policyTypes": ["Ingress", "Foo"]}, "spec.policyTypes[1]",
     'Unsupported value: "Foo": supported values: "Ingress", "Egress"'),
    ({"policyTypes": ["Ingress", "Ingress"]}, "spec.policyTypes[1]",
     'Duplicate value: "Ingress"'),
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "spec.ingress[0].ports[0].protocol",
     'Unsupported value: "ICMP": supported values: "TCP", "UDP", "SCTP"'),
    ({"ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress[0].ports[0].port",
     "Invalid value: 70000: must be between 1 and 65535, inclusive"),
    ({"egress": [{"ports": [{"port": "Not_A_Name"}]}]}, "spec.egress[0].ports[0].port",
     'Invalid value: "Not_A_Name": must contain only alpha-numeric characters (a-z, 0-9), '
     "and hyphens (-)"),
    ({"ingress": [{"ports": [{"endPort": 90}]}]}, "spec.ingress[0].ports[0].port",
     "Required value: must be specified when `endPort` is specified"),
    ({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort",
     "Invalid value: 90: may not be specified when `port` is non-numeric"),
    ({"ingress": [{"ports": [{"port": 100, "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort",
     "Invalid value: 90: must be greater than or equal to `port`"),
    ({"ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]",
     "Required value: must specify a peer"),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, **PEER}]}]}, "spec.egress[0].to[0]",
     "Forbidden: may not specify both ipBlock and another peer"),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0"}}]}]}, "spec.egress[0].to[0].ipBlock.cidr",
     'Invalid value: "10.0.0.0": must be a valid CIDR value, (e.g. 10.9.8.0/24 or '
     "2001:db8::/64)"),
    ({"egress": [{"to": [{"ipBlock": {}}]}]}, "spec.egress[0].to[0].ipBlock.cidr",
     "Required value"),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]",
     'Invalid value: "10.1.0.0/24": must be a strict subset of `cidr`'),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]",
     'Invalid value: "10.0.0.0/16": must be a strict subset of `cidr`'),
    ({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
        {"key": "team", "operator": "Has"}]}}]}]},
     "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator",
     'Unsupported value: "Has": supported values: "In", "NotIn", "Exists", "DoesNotExist"'),
    ({"podSelector": {"matchLabels": {"bad key!": "x"}}}, "spec.podSelector.matchLabels",
     None),
])
def test_invalid_policies_name_the_field(spec: dict[str, Any], field: str,
                                         message: str | None) -> None:
    got = problems(spec)
    assert field in [f for f, _ in got], got
    if message is not None:
        assert (field, message) in got, got


def test_unknown_fields_are_refused_with_their_path() -> None:
    from shoal import errors

    with pytest.raises(errors.Invalid) as raised:
        policy({"ingress": [{"form": [PEER]}]})
    assert "spec.ingress[0].form" in str(raised.value)


def test_get_prints_kubectls_columns() -> None:
    from shoal.cli.printing import TableOptions, table_headers, table_row

    kind = KINDS.by_name("netpol")
    opts = TableOptions()
    assert table_headers(kind, opts) == ("NAME", "POD-SELECTOR", "AGE")
    web = policy({"podSelector": {"matchLabels": {"app": "web"}}})
    assert table_row(kind, web, now=0.0, options=opts)[:2] == ("p", "app=web")
    assert table_row(kind, policy({"podSelector": {}}), now=0.0, options=opts)[1] == "<none>"
