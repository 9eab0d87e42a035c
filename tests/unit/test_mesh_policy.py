"""Mesh L4 policy: PeerAuthentication mode resolution and AuthorizationPolicy verdicts (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from meshagent.policy import (
    AuthorizationPolicy,
    Peer,
    PeerAuthentication,
    Target,
    authorize,
    l4_gaps,
    mtls_mode,
    string_matches,
)
from shoal.manifests import decode_message

ROOT = "istio-system"
WEB = {"app": "web", "version": "v1"}


def pa(ns: str, name: str, spec: dict[str, Any], *, created: int = 0) -> PeerAuthentication:
    msg = decode_message({"metadata": {"namespace": ns, "name": name}, "spec": spec},
                         PeerAuthentication)
    assert isinstance(msg, PeerAuthentication)
    msg.metadata.creation_timestamp.seconds = created
    return msg


def ap(ns: str, name: str, spec: dict[str, Any]) -> AuthorizationPolicy:
    msg = decode_message({"metadata": {"namespace": ns, "name": name}, "spec": spec},
                         AuthorizationPolicy)
    assert isinstance(msg, AuthorizationPolicy)
    return msg


def target(port: int = 8080, *, ns: str = "shop", labels: dict[str, str] | None = None,
           ip: str = "10.244.1.5") -> Target:
    return Target(namespace=ns, labels=WEB if labels is None else labels, port=port, ip=ip)


CLIENT = Peer(principal="cluster.local/ns/front/sa/client", namespace="front", ip="10.244.2.7")
OTHER = Peer(principal="cluster.local/ns/ops/sa/robot", namespace="ops", ip="10.244.3.9")
PLAIN = Peer(principal="", namespace="", ip="192.168.1.20")

STRICT = {"mtls": {"mode": "STRICT"}}
PERMISSIVE = {"mtls": {"mode": "PERMISSIVE"}}
DISABLE = {"mtls": {"mode": "DISABLE"}}
UNSET = {"mtls": {"mode": "UNSET"}}
SEL = {"selector": {"matchLabels": {"app": "web"}}}


# --------------------------------------------------------------------------- mtls_mode


@pytest.mark.parametrize(("policies", "tgt", "want"), [
    pytest.param([], target(), "PERMISSIVE", id="no-policy-defaults-to-permissive"),
    pytest.param([pa(ROOT, "default", STRICT)], target(), "STRICT", id="mesh-wide-strict"),
    pytest.param([pa("other", "default", STRICT)], target(), "PERMISSIVE",
                 id="another-namespace-does-not-apply"),
    pytest.param([pa(ROOT, "default", STRICT), pa("shop", "ns", PERMISSIVE)], target(),
                 "PERMISSIVE", id="namespace-overrides-mesh"),
    pytest.param([pa(ROOT, "default", PERMISSIVE), pa("shop", "ns", STRICT),
                  pa("shop", "web", {**SEL, **DISABLE})], target(), "DISABLE",
                 id="workload-overrides-namespace"),
    pytest.param([pa(ROOT, "default", STRICT), pa("shop", "ns", UNSET)], target(), "STRICT",
                 id="namespace-unset-inherits-mesh"),
    pytest.param([pa(ROOT, "default", STRICT), pa("shop", "ns", {})], target(), "STRICT",
                 id="namespace-without-mtls-inherits-mesh"),
    pytest.param([pa("shop", "ns", STRICT), pa("shop", "web", {**SEL, **UNSET})], target(),
                 "STRICT", id="workload-unset-inherits-namespace"),
    pytest.param([pa("shop", "web", {"selector": {"matchLabels": {"app": "db"}}, **STRICT})],
                 target(), "PERMISSIVE", id="selector-not-matching"),
    pytest.param([pa("shop", "web", {"selector": {"matchLabels": {"app": "web", "x": "y"}},
                                     **STRICT})],
                 target(), "PERMISSIVE", id="selector-must-be-subset-of-labels"),
    pytest.param([pa(ROOT, "web", {**SEL, **STRICT})], target(), "PERMISSIVE",
                 id="selector-in-root-namespace-ignored"),
    pytest.param([pa(ROOT, "default", STRICT, created=20),
                  pa(ROOT, "older", PERMISSIVE, created=10)], target(), "PERMISSIVE",
                 id="oldest-mesh-policy-wins"),
    pytest.param([pa("shop", "a", STRICT, created=5), pa("shop", "b", DISABLE, created=5)],
                 target(), "STRICT", id="same-age-name-breaks-tie"),
    pytest.param([pa("shop", "w1", {**SEL, **DISABLE}, created=2),
                  pa("shop", "w2", {"selector": {"matchLabels": {"version": "v1"}}, **STRICT},
                     created=1)],
                 target(), "STRICT", id="oldest-workload-policy-wins"),
    pytest.param([pa("shop", "web", {**SEL, **STRICT, "portLevelMtls": {8080: DISABLE["mtls"]}})],
                 target(8080), "DISABLE", id="port-level-overrides-workload"),
    pytest.param([pa("shop", "web", {**SEL, **STRICT, "portLevelMtls": {8080: DISABLE["mtls"]}})],
                 target(9090), "STRICT", id="port-level-only-for-its-port"),
    pytest.param([pa(ROOT, "default", STRICT),
                  pa("shop", "web", {**SEL, "portLevelMtls": {8080: {"mode": "UNSET"}}})],
                 target(8080), "STRICT", id="port-level-unset-inherits"),
    pytest.param([pa("shop", "ns", STRICT),
                  pa("shop", "web", {**SEL, "portLevelMtls": {8080: PERMISSIVE["mtls"]}})],
                 target(8080), "PERMISSIVE", id="port-level-under-inherited-strict"),
    pytest.param([pa(ROOT, "default", STRICT)], target(ns=ROOT, labels={}), "STRICT",
                 id="workload-in-root-namespace"),
])
def test_mtls_mode(policies: list[PeerAuthentication], tgt: Target, want: str) -> None:
    assert mtls_mode(policies, tgt, root_namespace=ROOT) == want


def test_mtls_mode_root_namespace_is_a_parameter() -> None:
    policies = [pa("mesh-root", "default", STRICT)]
    assert mtls_mode(policies, target(), root_namespace="mesh-root") == "STRICT"
    assert mtls_mode(policies, target(), root_namespace=ROOT) == "PERMISSIVE"


# --------------------------------------------------------------------------- string matching


@pytest.mark.parametrize(("pattern", "value", "want"), [
    ("cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/b", True),
    ("cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/bb", False),
    ("cluster.local/ns/a/*", "cluster.local/ns/a/sa/b", True),
    ("cluster.local/ns/a/*", "cluster.local/ns/ab/sa/b", False),
    ("*/sa/b", "cluster.local/ns/a/sa/b", True),
    ("*/sa/b", "cluster.local/ns/a/sa/c", False),
    ("*", "anything", True),
    ("*", "", False),
    ("prefix*", "", False),
])
def test_string_matches(pattern: str, value: str, want: bool) -> None:
    assert string_matches(pattern, value) is want


# --------------------------------------------------------------------------- authorize


def allow(ns: str, name: str, rules: list[dict[str, Any]] | None, **extra: Any
          ) -> AuthorizationPolicy:
    spec: dict[str, Any] = {"action": "ALLOW", **extra}
    if rules is not None:
        spec["rules"] = rules
    return ap(ns, name, spec)


def deny(ns: str, name: str, rules: list[dict[str, Any]], **extra: Any) -> AuthorizationPolicy:
    return ap(ns, name, {"action": "DENY", "rules": rules, **extra})


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def ports(*values: str, negate: bool = False) -> dict[str, Any]:
    return {"to": [{"operation": {"notPorts" if negate else "ports": list(values)}}]}


CLIENT_P = "cluster.local/ns/front/sa/client"


@pytest.mark.parametrize(("policies", "peer", "tgt", "allowed", "deciding"), [
    # no policies / allow-nothing / allow-all
    pytest.param([], CLIENT, target(), True, "", id="no-policy-allows"),
    pytest.param([allow("shop", "nothing", None)], CLIENT, target(), False, "",
                 id="allow-without-rules-allows-nothing"),
    pytest.param([ap("shop", "nothing", {})], CLIENT, target(), False, "",
                 id="empty-spec-is-allow-nothing"),
    pytest.param([allow("shop", "all", [{}])], PLAIN, target(), True, "shop/all",
                 id="empty-rule-allows-everything"),
    pytest.param([deny("shop", "all", [{}])], CLIENT, target(), False, "shop/all",
                 id="empty-deny-rule-denies-everything"),
    # principals and namespaces
    pytest.param([allow("shop", "p", [src(principals=[CLIENT_P])])], CLIENT, target(), True,
                 "shop/p", id="allow-by-principal"),
    pytest.param([allow("shop", "p", [src(principals=[CLIENT_P])])], OTHER, target(), False, "",
                 id="allow-by-principal-other-refused"),
    pytest.param([allow("shop", "p", [src(principals=["*"])])], PLAIN, target(), False, "",
                 id="any-principal-refuses-plaintext"),
    pytest.param([allow("shop", "p", [src(principals=["*"])])], OTHER, target(), True, "shop/p",
                 id="any-principal-allows-mtls"),
    pytest.param([deny("shop", "plain", [src(notPrincipals=["*"])])], PLAIN, target(), False,
                 "shop/plain", id="deny-not-principals-star-blocks-plaintext"),
    pytest.param([deny("shop", "plain", [src(notPrincipals=["*"])])], CLIENT, target(), True, "",
                 id="deny-not-principals-star-lets-mtls-through"),
    pytest.param([allow("shop", "p", [src(principals=["cluster.local/ns/front/*"])])], CLIENT,
                 target(), True, "shop/p", id="principal-prefix-wildcard"),
    pytest.param([allow("shop", "p", [src(principals=["*/sa/robot"])])], CLIENT, target(), False,
                 "", id="principal-suffix-wildcard-miss"),
    pytest.param([allow("shop", "n", [src(namespaces=["front"])])], CLIENT, target(), True,
                 "shop/n", id="allow-by-namespace"),
    pytest.param([allow("shop", "n", [src(namespaces=["front"])])], PLAIN, target(), False, "",
                 id="namespace-never-matches-plaintext"),
    pytest.param([allow("shop", "n", [src(notNamespaces=["ops"])])], CLIENT, target(), True,
                 "shop/n", id="not-namespaces-other"),
    pytest.param([allow("shop", "n", [src(notNamespaces=["ops"])])], OTHER, target(), False, "",
                 id="not-namespaces-same"),
    pytest.param([allow("shop", "n", [src(namespaces=["front"])])],
                 Peer(principal=CLIENT_P, namespace="", ip="10.0.0.1"), target(), True,
                 "shop/n", id="namespace-taken-from-principal"),
    pytest.param([allow("shop", "sa", [src(serviceAccounts=["front/client"])])], CLIENT,
                 target(), True, "shop/sa", id="service-account-with-namespace"),
    pytest.param([allow("front", "sa", [src(serviceAccounts=["client"])])], CLIENT,
                 target(ns="front"), True, "front/sa",
                 id="service-account-in-policy-namespace"),
    pytest.param([allow("shop", "sa", [src(serviceAccounts=["client"])])], CLIENT, target(),
                 False, "", id="bare-service-account-is-policy-namespace"),
    # ip blocks
    pytest.param([allow("shop", "ip", [src(ipBlocks=["10.244.2.0/24"])])], CLIENT, target(),
                 True, "shop/ip", id="ip-block-cidr"),
    pytest.param([allow("shop", "ip", [src(ipBlocks=["10.244.2.8"])])], CLIENT, target(), False,
                 "", id="ip-block-single-miss"),
    pytest.param([allow("shop", "ip", [src(ipBlocks=["10.0.0.0/8"],
                                           notIpBlocks=["10.244.2.7"])])],
                 CLIENT, target(), False, "", id="not-ip-blocks-excludes"),
    # several sources: any one; several fields in one source: all
    pytest.param([allow("shop", "or", [{"from": [{"source": {"principals": ["x"]}},
                                                  {"source": {"namespaces": ["front"]}}]}])],
                 CLIENT, target(), True, "shop/or", id="any-source-matches"),
    pytest.param([allow("shop", "and", [src(namespaces=["front"], ipBlocks=["1.2.3.4"])])],
                 CLIENT, target(), False, "", id="all-fields-of-a-source"),
    # ports
    pytest.param([allow("shop", "port", [ports("8080")])], PLAIN, target(8080), True,
                 "shop/port", id="allow-by-port"),
    pytest.param([allow("shop", "port", [ports("8080")])], PLAIN, target(9090), False, "",
                 id="allow-by-port-other-port"),
    pytest.param([deny("shop", "port", [ports("9090", negate=True)])], CLIENT, target(8080),
                 False, "shop/port", id="deny-not-ports"),
    pytest.param([allow("shop", "both", [{**src(principals=[CLIENT_P]), **ports("8080")}])],
                 CLIENT, target(9090), False, "", id="from-and-to-both-needed"),
    # DENY before ALLOW
    pytest.param([allow("shop", "all", [{}]), deny("shop", "robot", [src(namespaces=["ops"])])],
                 OTHER, target(), False, "shop/robot", id="deny-wins-over-allow"),
    pytest.param([allow("shop", "all", [{}]), deny("shop", "robot", [src(namespaces=["ops"])])],
                 CLIENT, target(), True, "shop/all", id="deny-not-matching-then-allow"),
    pytest.param([deny("shop", "robot", [src(namespaces=["ops"])])], CLIENT, target(), True, "",
                 id="only-deny-policies-allow-the-rest"),
    pytest.param([allow("shop", "a", [src(namespaces=["x"])]),
                  allow("shop", "b", [src(namespaces=["front"])])],
                 CLIENT, target(), True, "shop/b", id="any-allow-policy"),
    # scope: root namespace, other namespaces, selectors, targetRefs
    pytest.param([deny(ROOT, "mesh", [src(namespaces=["front"])])], CLIENT, target(), False,
                 f"{ROOT}/mesh", id="root-namespace-policy-is-mesh-wide"),
    pytest.param([deny(ROOT, "mesh", [src(namespaces=["front"])],
                       selector={"matchLabels": {"app": "web"}})], CLIENT, target(), False,
                 f"{ROOT}/mesh", id="root-namespace-selector-applies-in-all-namespaces"),
    pytest.param([deny("elsewhere", "d", [{}])], CLIENT, target(), True, "",
                 id="other-namespace-does-not-apply"),
    pytest.param([deny("shop", "d", [{}], selector={"matchLabels": {"app": "db"}})], CLIENT,
                 target(), True, "", id="selector-not-matching-does-not-apply"),
    pytest.param([allow("shop", "a", None, selector={"matchLabels": {"app": "db"}})], CLIENT,
                 target(), True, "", id="allow-for-other-workload-does-not-default-deny"),
    pytest.param([deny("shop", "d", [{}], selector={"matchLabels": {"app": "web"}})], CLIENT,
                 target(), False, "shop/d", id="selector-matching-applies"),
    pytest.param([deny("shop", "gw", [{}], targetRefs=[{"kind": "Service", "name": "web"}])],
                 CLIENT, target(), True, "", id="target-refs-ignored-at-l4"),
    # unsupported actions
    pytest.param([ap("shop", "ext", {"action": "CUSTOM", "provider": {"name": "opa"},
                                     "rules": [{}]})], CLIENT, target(), True, "",
                 id="custom-ignored"),
    pytest.param([ap("shop", "audit", {"action": "AUDIT", "rules": [{}]})], CLIENT, target(),
                 True, "", id="audit-ignored"),
    # HTTP attributes at L4
    pytest.param([allow("shop", "get", [{**src(principals=[CLIENT_P]),
                                         "to": [{"operation": {"methods": ["GET"]}}]}])],
                 CLIENT, target(), False, "", id="allow-rule-with-methods-never-matches"),
    pytest.param([allow("shop", "mixed", [{"to": [{"operation": {"paths": ["/x"]}}]},
                                          src(principals=[CLIENT_P])])],
                 CLIENT, target(), True, "shop/mixed", id="other-l4-rule-still-matches"),
    pytest.param([allow("shop", "jwt", [src(requestPrincipals=["*"])])], CLIENT, target(),
                 False, "", id="allow-request-principals-never-matches"),
    pytest.param([deny("shop", "get", [{**src(namespaces=["ops"]),
                                        "to": [{"operation": {"methods": ["GET"]}}]}])],
                 OTHER, target(), False, "shop/get", id="deny-rule-drops-methods"),
    pytest.param([deny("shop", "get", [{**src(namespaces=["ops"]),
                                        "to": [{"operation": {"methods": ["GET"]}}]}])],
                 CLIENT, target(), True, "", id="deny-rule-l4-part-still-checked"),
    pytest.param([deny("shop", "paths", [{"to": [{"operation": {"paths": ["/admin"]}}]}])],
                 CLIENT, target(), False, "shop/paths", id="deny-with-only-http-denies-all"),
    pytest.param([deny("shop", "hdr", [{"when": [{"key": "request.headers[x-user]",
                                                  "values": ["bob"]}]}])],
                 CLIENT, target(), False, "shop/hdr", id="deny-http-condition-left-out"),
    pytest.param([allow("shop", "hdr", [{"when": [{"key": "request.headers[x-user]",
                                                   "values": ["bob"]}]}])],
                 CLIENT, target(), False, "", id="allow-http-condition-never-matches"),
    # L4 when conditions
    pytest.param([allow("shop", "w", [{"when": [{"key": "source.ip",
                                                 "values": ["10.244.2.0/24"]}]}])],
                 CLIENT, target(), True, "shop/w", id="when-source-ip"),
    pytest.param([allow("shop", "w", [{"when": [{"key": "source.namespace",
                                                 "notValues": ["front"]}]}])],
                 CLIENT, target(), False, "", id="when-source-namespace-not-values"),
    pytest.param([allow("shop", "w", [{"when": [{"key": "source.principal",
                                                 "values": ["*/sa/client"]}]}])],
                 CLIENT, target(), True, "shop/w", id="when-source-principal"),
    pytest.param([allow("shop", "w", [{"when": [{"key": "destination.port",
                                                 "values": ["8080"]}]}])],
                 CLIENT, target(9090), False, "", id="when-destination-port"),
    pytest.param([allow("shop", "w", [{"when": [{"key": "destination.ip",
                                                 "values": ["10.244.1.0/24"]}]}])],
                 CLIENT, target(), True, "shop/w", id="when-destination-ip"),
    pytest.param([allow("shop", "w", [{"when": [{"key": "source.namespace", "values": ["front"]},
                                                {"key": "destination.port",
                                                 "values": ["9090"]}]}])],
                 CLIENT, target(8080), False, "", id="every-condition-must-match"),
])
def test_authorize(policies: list[AuthorizationPolicy], peer: Peer, tgt: Target, allowed: bool,
                   deciding: str) -> None:
    verdict = authorize(policies, peer, tgt, root_namespace=ROOT)
    assert (verdict.allowed, verdict.policy) == (allowed, deciding), verdict.reason
    assert verdict.reason


def test_verdict_reason_names_the_policies() -> None:
    v = authorize([allow("shop", "only-front", [src(namespaces=["front"])])], OTHER, target(),
                  root_namespace=ROOT)
    assert not v.allowed and "shop/only-front" in v.reason
    v = authorize([deny("shop", "no-ops", [src(namespaces=["ops"])])], OTHER, target(),
                  root_namespace=ROOT)
    assert "DENY" in v.reason and "shop/no-ops" in v.reason


@pytest.mark.parametrize(("policy", "want"), [
    (allow("shop", "ok", [src(principals=[CLIENT_P])]), ()),
    (ap("shop", "ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}),
     ("action CUSTOM is not supported at L4; the policy is ignored",)),
    (allow("shop", "get", [{"to": [{"operation": {"methods": ["GET"], "paths": ["/a"]}}]}]),
     ("rules[0]: HTTP attributes (methods, paths) cannot be checked at L4; "
      "the rule never matches",)),
    (deny("shop", "get", [{}, {"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]),
     ("rules[1]: HTTP attributes (request.auth.claims[iss]) cannot be checked at L4; "
      "the rule is enforced without them (more restrictive)",)),
])
def test_l4_gaps(policy: AuthorizationPolicy, want: tuple[str, ...]) -> None:
    assert l4_gaps(policy) == want
