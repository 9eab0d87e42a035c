"""What the meshagent logs about an AuthorizationPolicy (policy.enforcement_notes):
a warning only for what no port enforces, an information on how HTTP attributes are
handled on HTTP (L7) and TCP (L4) ports."""

from __future__ import annotations

from typing import Any

import pytest

from meshagent.policy import AuthorizationPolicy, Note, enforcement_notes, l7_gaps
from shoal.manifests import decode_message


def ap(spec: dict[str, Any]) -> AuthorizationPolicy:
    msg = decode_message({"metadata": {"namespace": "foo", "name": "p"}, "spec": spec},
                         AuthorizationPolicy)
    assert isinstance(msg, AuthorizationPolicy)
    return msg


def info(text: str) -> Note:
    return Note(False, text)


def warning(text: str) -> Note:
    return Note(True, text)


L7 = "are checked on requests to the target's HTTP ports (L7); on its TCP ports (L4) " \
     "they cannot be, and "


@pytest.mark.parametrize(("spec", "want"), [
    pytest.param({"action": "ALLOW", "rules": [{"from": [{"source": {
        "namespaces": ["test"], "principals": ["cluster.local/ns/a/sa/b"],
        "ipBlocks": ["10.0.0.0/8"]}}], "to": [{"operation": {"ports": ["80"]}}],
        "when": [{"key": "source.ip", "values": ["10.1.2.3"]}]}]},
        (), id="L4 attributes only: nothing to say"),
    pytest.param({"action": "ALLOW", "rules": [{"to": [{"operation": {
        "methods": ["GET"], "paths": ["/info*"]}}]}]},
        (info(f"rules[0]: methods, paths {L7}an ALLOW rule with them never matches "
              "there"),), id="ALLOW with paths and methods: enforced, said as info"),
    pytest.param({"action": "DENY", "rules": [{"to": [{"operation": {
        "paths": ["/admin*"]}}]}]},
        (info(f"rules[0]: paths {L7}the DENY rule is enforced without them there (more "
              "restrictive); set to.operation.ports to keep it to the HTTP ports"),),
        id="DENY on a path without ports: the L4 effect and how to narrow it"),
    pytest.param({"action": "DENY", "rules": [{"to": [{"operation": {
        "ports": ["9000"], "paths": ["/private"]}}]}]},
        (info(f"rules[0]: paths {L7}the DENY rule is enforced without them there (more "
              "restrictive)"),), id="DENY on a path with ports: no hint"),
    pytest.param({"action": "ALLOW", "rules": [{
        "to": [{"operation": {"hosts": ["a.example"]}}],
        "when": [{"key": "request.headers[x-user]", "values": ["me"]},
                 {"key": "remote.ip", "values": ["1.2.3.4"]}]}]},
        (info(f"rules[0]: hosts, remote.ip, request.headers[x-user] {L7}an ALLOW rule "
              "with them never matches there"),), id="hosts and L7 when keys"),
    pytest.param({"action": "ALLOW", "rules": [{
        "to": [{"operation": {"methods": ["GET"]}}],
        "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]},
        (warning("rules[0]: request.auth.claims[iss] cannot be checked (no JWT "
                 "validation; unknown keys); the rule never matches"),),
        id="ALLOW with a JWT claim: enforced nowhere, one warning"),
    pytest.param({"action": "DENY", "rules": [{
        "from": [{"source": {"notRequestPrincipals": ["*"]}}],
        "to": [{"operation": {"ports": ["80"], "methods": ["POST"]}}]}]},
        (warning("rules[0]: notRequestPrincipals cannot be checked (no JWT validation; "
                 "unknown keys); the rule is enforced as for a request without a JWT, "
                 "and without the other attributes (more restrictive)"),
         info(f"rules[0]: methods {L7}the DENY rule is enforced without them there (more "
              "restrictive)")), id="DENY with a JWT attribute and a method"),
    pytest.param({"action": "ALLOW", "rules": [
        {"to": [{"operation": {"ports": ["22"]}}]},
        {"to": [{"operation": {"notPaths": ["/private"]}}]}]},
        (info(f"rules[1]: notPaths {L7}an ALLOW rule with them never matches there"),),
        id="notes name the rule"),
    pytest.param({"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{"to": [{
        "operation": {"paths": ["/x"]}}]}]},
        (warning("action CUSTOM is not supported; the policy is ignored"),),
        id="CUSTOM: ignored, one warning"),
    pytest.param({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                  "name": "gw"}], "rules": [{}]},
        (warning("targetRefs are for waypoints and gateways; the policy is ignored"),),
        id="targetRefs: ignored, one warning"),
])
def test_enforcement_notes(spec: dict[str, Any], want: tuple[Note, ...]) -> None:
    assert enforcement_notes(ap(spec)) == want


def test_only_what_no_port_enforces_is_a_warning() -> None:
    """The warnings are exactly l7_gaps: what the L7 path cannot check either."""
    policy = ap({"action": "DENY", "rules": [
        {"to": [{"operation": {"paths": ["/a"]}}]},
        {"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]})
    notes = enforcement_notes(policy)
    assert tuple(n.text for n in notes if n.warning) == l7_gaps(policy)
    assert [n.warning for n in notes] == [False, True]
