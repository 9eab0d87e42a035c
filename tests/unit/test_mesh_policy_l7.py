"""AuthorizationPolicy on HTTP requests (Istio's sidecar semantics), table-driven.

The policies are the examples of Istio's AuthorizationPolicy reference and its
"Authorization for HTTP traffic" task, adapted to our namespaces."""

from __future__ import annotations

from typing import Any

import pytest

from meshagent.policy import (
    AuthorizationPolicy,
    HttpRequest,
    Peer,
    Target,
    authorize,
    host_matches,
    l4_gaps,
    l7_gaps,
    normalize_path,
    path_matches,
)
from shoal.manifests import decode_message

WEB = Target(namespace="foo", labels={"app": "httpbin", "version": "v1"}, port=8000,
             ip="10.244.1.5")
SLEEP = Peer(principal="cluster.local/ns/default/sa/sleep", namespace="default",
             ip="10.244.2.7")
TESTER = Peer(principal="cluster.local/ns/test/sa/tester", namespace="test", ip="10.244.2.8")
DEV = Peer(principal="cluster.local/ns/dev/sa/app", namespace="dev", ip="10.244.3.9")
PLAIN = Peer(principal="", namespace="", ip="192.168.1.20")


def ap(spec: dict[str, Any], *, name: str = "p", ns: str = "foo") -> AuthorizationPolicy:
    msg = decode_message({"metadata": {"namespace": ns, "name": name}, "spec": spec},
                         AuthorizationPolicy)
    assert isinstance(msg, AuthorizationPolicy)
    return msg


def req(method: str = "GET", path: str = "/", host: str = "httpbin.foo:8000",
        **headers: str) -> HttpRequest:
    return HttpRequest(method=method, path=path, host=host,
                       headers={k.replace("_", "-"): v for k, v in headers.items()})


def allowed(policies: list[AuthorizationPolicy], peer: Peer, request: HttpRequest | None,
            target: Target = WEB) -> bool:
    return authorize(policies, peer, target, root_namespace="istio-system",
                     request=request).allowed


# The reference's first example: principal sleep OR namespace test may GET /info* and
# POST /data (its `when` on request.auth.claims is left out: see the JWT cases below).
REFERENCE_ALLOW = ap({"action": "ALLOW", "rules": [{
    "from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
             {"source": {"namespaces": ["test"]}}],
    "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}},
           {"operation": {"methods": ["POST"], "paths": ["/data"]}}]}]})
# "Deny requests from the dev namespace to the POST method on all workloads in foo".
DENY_DEV_POST = ap({"action": "DENY", "rules": [{
    "from": [{"source": {"namespaces": ["dev"]}}], "to": [{"operation": {"methods": ["POST"]}}]}]})
ALLOW_NOTHING = ap({})
DENY_ALL = ap({"action": "DENY", "rules": [{}]})
ALLOW_ALL = ap({"action": "ALLOW", "rules": [{}]})
# The HTTP traffic task: GET only, from a service account, and a header condition.
READ_ONLY = ap({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "ALLOW", "rules": [{
    "to": [{"operation": {"methods": ["GET", "HEAD"]}}]}]})
HEADER_WHEN = ap({"action": "ALLOW", "rules": [{
    "to": [{"operation": {"methods": ["GET"]}}],
    "when": [{"key": "request.headers[version]", "values": ["v1", "v2"]}]}]})
DENY_HEADER_NOT = ap({"action": "DENY", "rules": [{
    "when": [{"key": "request.headers[X-Token]", "notValues": ["secret*"]}]}]})
DENY_PATH = ap({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]})
DENY_NOT_HEALTHZ = ap({"action": "DENY", "rules": [{
    "to": [{"operation": {"notPaths": ["/healthz"]}}]}]})
HOSTS = ap({"action": "ALLOW", "rules": [{
    "to": [{"operation": {"hosts": ["httpbin.foo", "*.example.com", "api.local:9000"]}}]}]})
NOT_HOSTS = ap({"action": "DENY", "rules": [{
    "to": [{"operation": {"notHosts": ["httpbin.foo"]}}]}]})
PATH_SUFFIX = ap({"action": "ALLOW", "rules": [{
    "to": [{"operation": {"paths": ["/test/*", "*/info"]}}]}]})
TEMPLATE = ap({"action": "ALLOW", "rules": [{
    "to": [{"operation": {"paths": ["/foo/{*}/bar", "/static/{**}"]}}]}]})
NOT_METHODS = ap({"action": "DENY", "rules": [{
    "to": [{"operation": {"notMethods": ["GET", "HEAD"]}}]}]})
REMOTE_IP = ap({"action": "DENY", "rules": [{
    "from": [{"source": {"remoteIpBlocks": ["1.2.3.0/24"]}}]}]})
REMOTE_IP_WHEN = ap({"action": "ALLOW", "rules": [{
    "when": [{"key": "remote.ip", "values": ["10.0.0.0/8"]}]}]})
REQUIRE_JWT_ALLOW = ap({"action": "ALLOW", "rules": [{
    "from": [{"source": {"requestPrincipals": ["*"]}}]}]})
REQUIRE_JWT_DENY = ap({"action": "DENY", "rules": [{
    "from": [{"source": {"notRequestPrincipals": ["*"]}}]}]})
DENY_ISSUER = ap({"action": "DENY", "rules": [{
    "when": [{"key": "request.auth.claims[iss]", "values": ["https://evil.example"]}]}]})
ALLOW_CLAIM = ap({"action": "ALLOW", "rules": [{
    "to": [{"operation": {"methods": ["GET"]}}],
    "when": [{"key": "request.auth.claims[iss]", "notValues": ["https://evil.example"]}]}]})
PORT_AND_PATH = ap({"action": "DENY", "rules": [{
    "to": [{"operation": {"ports": ["9000"], "paths": ["/private"]}}]}]})


@pytest.mark.parametrize(("policies", "peer", "request_", "want"), [
    # the reference example
    pytest.param([REFERENCE_ALLOW], SLEEP, req("GET", "/info/1"), True, id="ref-sleep-get-info"),
    pytest.param([REFERENCE_ALLOW], TESTER, req("POST", "/data"), True, id="ref-test-ns-post"),
    pytest.param([REFERENCE_ALLOW], SLEEP, req("POST", "/info"), False, id="ref-wrong-method"),
    pytest.param([REFERENCE_ALLOW], SLEEP, req("POST", "/data/x"), False,
                 id="ref-exact-path-only"),
    pytest.param([REFERENCE_ALLOW], SLEEP, req("GET", "/info?verbose=1"), True,
                 id="ref-query-ignored"),
    pytest.param([REFERENCE_ALLOW], DEV, req("GET", "/info"), False, id="ref-other-source"),
    pytest.param([REFERENCE_ALLOW], SLEEP, req("get", "/info"), False,
                 id="methods-case-sensitive"),
    # DENY dev POST
    pytest.param([DENY_DEV_POST], DEV, req("POST", "/x"), False, id="deny-dev-post"),
    pytest.param([DENY_DEV_POST], DEV, req("GET", "/x"), True, id="deny-dev-get-passes"),
    pytest.param([DENY_DEV_POST], SLEEP, req("POST", "/x"), True, id="deny-other-ns-post"),
    pytest.param([DENY_DEV_POST, ALLOW_ALL], DEV, req("POST"), False, id="deny-before-allow"),
    # allow-nothing, deny-all, allow-all
    pytest.param([ALLOW_NOTHING], SLEEP, req(), False, id="allow-nothing"),
    pytest.param([DENY_ALL], SLEEP, req(), False, id="deny-all"),
    pytest.param([ALLOW_ALL], PLAIN, req(), True, id="allow-all"),
    pytest.param([], PLAIN, req(), True, id="no-policy"),
    # read only
    pytest.param([READ_ONLY], SLEEP, req("HEAD"), True, id="read-only-head"),
    pytest.param([READ_ONLY], SLEEP, req("DELETE"), False, id="read-only-delete"),
    # headers
    pytest.param([HEADER_WHEN], SLEEP, req(version="v2"), True, id="header-value"),
    pytest.param([HEADER_WHEN], SLEEP, req(version="v3"), False, id="header-other-value"),
    pytest.param([HEADER_WHEN], SLEEP, req(), False, id="header-absent"),
    pytest.param([HEADER_WHEN], SLEEP, HttpRequest("GET", "/", "h", {"Version": "v1"}), True,
                 id="header-name-any-case"),
    pytest.param([DENY_HEADER_NOT], SLEEP, req(x_token="secret-1"), True,
                 id="deny-header-notvalues-ok"),
    pytest.param([DENY_HEADER_NOT], SLEEP, req(x_token="guess"), False,
                 id="deny-header-notvalues-wrong"),
    pytest.param([DENY_HEADER_NOT], SLEEP, req(), False, id="deny-header-absent-denied"),
    # paths
    pytest.param([DENY_PATH], SLEEP, req(path="/admin/users"), False, id="deny-path-prefix"),
    pytest.param([DENY_PATH], SLEEP, req(path="/public"), True, id="deny-path-other-passes"),
    pytest.param([DENY_PATH], SLEEP, req(path="/public/../admin/x"), False,
                 id="deny-path-dot-segments-normalized"),
    pytest.param([DENY_PATH], SLEEP, req(path="/./admin"), False, id="deny-path-dot"),
    pytest.param([DENY_NOT_HEALTHZ], SLEEP, req(path="/healthz"), True, id="notpaths-healthz"),
    pytest.param([DENY_NOT_HEALTHZ], SLEEP, req(path="/other"), False, id="notpaths-other"),
    pytest.param([PATH_SUFFIX], SLEEP, req(path="/test/a/b"), True, id="path-prefix"),
    pytest.param([PATH_SUFFIX], SLEEP, req(path="/x/y/info"), True, id="path-suffix"),
    pytest.param([PATH_SUFFIX], SLEEP, req(path="/x/y/infox"), False, id="path-no-match"),
    pytest.param([TEMPLATE], SLEEP, req(path="/foo/1/bar"), True, id="template-one-segment"),
    pytest.param([TEMPLATE], SLEEP, req(path="/foo/1/2/bar"), False, id="template-two-segments"),
    pytest.param([TEMPLATE], SLEEP, req(path="/static/css/a.css"), True, id="template-rest"),
    # hosts
    pytest.param([HOSTS], SLEEP, req(host="httpbin.foo"), True, id="host-exact"),
    pytest.param([HOSTS], SLEEP, req(host="HTTPBIN.foo:8000"), True,
                 id="host-case-and-port-ignored"),
    pytest.param([HOSTS], SLEEP, req(host="a.example.com:443"), True, id="host-suffix-port"),
    pytest.param([HOSTS], SLEEP, req(host="api.local:9000"), True, id="host-with-port"),
    pytest.param([HOSTS], SLEEP, req(host="api.local:9001"), False, id="host-other-port"),
    pytest.param([HOSTS], SLEEP, req(host="api.local"), False, id="host-port-required"),
    pytest.param([HOSTS], SLEEP, req(host="evil.com"), False, id="host-other"),
    pytest.param([NOT_HOSTS], SLEEP, req(host="httpbin.foo:8000"), True, id="nothosts-ok"),
    pytest.param([NOT_HOSTS], SLEEP, req(host="other"), False, id="nothosts-denied"),
    # methods
    pytest.param([NOT_METHODS], SLEEP, req("GET"), True, id="notmethods-get"),
    pytest.param([NOT_METHODS], SLEEP, req("PUT"), False, id="notmethods-put"),
    # remote IPs: the last X-Forwarded-For address, else the peer's
    pytest.param([REMOTE_IP], SLEEP, req(x_forwarded_for="9.9.9.9, 1.2.3.4"), False,
                 id="remote-ip-xff-last"),
    pytest.param([REMOTE_IP], SLEEP, req(x_forwarded_for="1.2.3.4, 9.9.9.9"), True,
                 id="remote-ip-xff-earlier-ignored"),
    pytest.param([REMOTE_IP], Peer("", "", "1.2.3.7"), req(), False, id="remote-ip-peer"),
    pytest.param([REMOTE_IP_WHEN], SLEEP, req(), True, id="remote-ip-when-peer"),
    pytest.param([REMOTE_IP_WHEN], SLEEP, req(x_forwarded_for="8.8.8.8"), False,
                 id="remote-ip-when-xff"),
    # JWT: none is ever validated
    pytest.param([REQUIRE_JWT_ALLOW], SLEEP, req(authorization="Bearer x"), False,
                 id="allow-requestprincipals-never"),
    pytest.param([REQUIRE_JWT_DENY], SLEEP, req(), False, id="deny-notrequestprincipals-all"),
    pytest.param([DENY_ISSUER], SLEEP, req(), True, id="deny-claim-values-no-jwt-pass"),
    pytest.param([ALLOW_CLAIM], SLEEP, req(), False, id="allow-with-claims-never"),
    # L4 attributes still hold on a request
    pytest.param([PORT_AND_PATH], SLEEP, req(path="/private"), True, id="port-other"),
])
def test_l7_authorization(policies: list[AuthorizationPolicy], peer: Peer,
                          request_: HttpRequest, want: bool) -> None:
    assert allowed(policies, peer, request_) is want


@pytest.mark.parametrize(("port", "path", "want"), [
    (9000, "/private", False), (9000, "/public", True), (8000, "/private", True),
])
def test_ports_and_paths_together(port: int, path: str, want: bool) -> None:
    target = Target(namespace="foo", labels=WEB.labels, port=port)
    assert allowed([PORT_AND_PATH], SLEEP, req(path=path), target) is want


@pytest.mark.parametrize(("policies", "peer", "want"), [
    pytest.param([DENY_PATH], SLEEP, False, id="deny-http-only-denies-all-at-l4"),
    pytest.param([READ_ONLY], SLEEP, False, id="allow-http-never-at-l4"),
    pytest.param([DENY_DEV_POST], SLEEP, True, id="deny-l4-part-other-ns"),
    pytest.param([DENY_DEV_POST], DEV, False, id="deny-l4-part-dev"),
])
def test_without_a_request_the_l4_behaviour_is_kept(policies: list[AuthorizationPolicy],
                                                    peer: Peer, want: bool) -> None:
    assert allowed(policies, peer, None) is want


def test_verdict_names_the_deciding_policy() -> None:
    v = authorize([DENY_PATH], SLEEP, WEB, request=req(path="/admin"))
    assert (v.allowed, v.policy, v.reason) == (False, "foo/p", "denied by DENY policy foo/p")


@pytest.mark.parametrize(("path", "want"), [
    ("/a/b?x=1", "/a/b"), ("/a/./b/../c", "/a/c"), ("/../a", "/a"), ("/a/b/", "/a/b/"),
    ("/", "/"), ("//a", "/a"), ("/a#frag", "/a"), ("*", "*"),
])
def test_normalize_path(path: str, want: str) -> None:
    assert normalize_path(path) == want


@pytest.mark.parametrize(("pattern", "path", "want"), [
    ("/a", "/a", True), ("/a*", "/abc", True), ("*c", "/abc", True), ("*", "/", True),
    ("/{*}", "/x", True), ("/{*}", "/x/y", False), ("/a/{**}", "/a/x/y", True),
    ("/a/{**}", "/a/", False), ("/a/{*}/c", "/a/b/c", True),
])
def test_path_matches(pattern: str, path: str, want: bool) -> None:
    assert path_matches(pattern, path) is want


@pytest.mark.parametrize(("pattern", "host", "want"), [
    ("a.com", "A.COM", True), ("a.com", "a.com:8080", True), ("a.com:80", "a.com", False),
    ("*.com", "x.a.com:1", True), ("a.*", "a.b:2", True), ("*", "x", True),
    ("::1", "::1", True), ("[::1]", "[::1]:80", True), ("a.com", "a.com:x", False),
])
def test_host_matches(pattern: str, host: str, want: bool) -> None:
    assert host_matches(pattern, host) is want


def test_gaps_say_what_is_not_enforced() -> None:
    assert l7_gaps(ALLOW_CLAIM) == ("rules[0]: request.auth.claims[iss] cannot be checked "
                                    "(no JWT validation; unknown keys); the rule never matches",)
    assert l7_gaps(REQUIRE_JWT_DENY)[0].startswith("rules[0]: notRequestPrincipals cannot")
    assert l7_gaps(DENY_PATH) == ()
    assert l4_gaps(DENY_PATH)  # at L4 the paths cannot be checked
