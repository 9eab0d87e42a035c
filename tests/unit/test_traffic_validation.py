"""networking.istio.io kinds: every apiVersion decodes, defaults, and Istio's validation
rules, each problem naming its field (pure, table-driven)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import errors
from shoal.kinds import builtin_kinds
from shoal.manifests import decode, encode
from shoal.trafficrules import DurationError, parse_duration
from shoal.validation import apply_defaults, validate

KINDS = builtin_kinds()


def doc(kind: str, spec: dict[str, Any], *, version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"networking.istio.io/{version}", "kind": kind,
            "metadata": {"name": "x", "namespace": "shop"}, "spec": spec}


def problems(kind: str, spec: dict[str, Any]) -> list[tuple[str, str]]:
    k, msg = decode(doc(kind, spec), KINDS)
    apply_defaults(k, msg)
    return [(e.field, e.message) for e in validate(k, msg)]


def route(*dests: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [{"destination": {"host": h, **({"subset": s} if s else {})}, "weight": w}
            for h, s, w in dests]


def vs(**http: Any) -> dict[str, Any]:
    """A VirtualService spec for host "web" with one HTTP route made of ``http``."""
    return {"hosts": ["web"], "http": [{"route": route(("web", "", 0)), **http}]}


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
@pytest.mark.parametrize("kind", ["VirtualService", "DestinationRule", "Gateway",
                                  "ServiceEntry"])
def test_every_istio_version_decodes_and_encodes_as_v1(kind: str, version: str) -> None:
    k, msg = decode(doc(kind, {}, version=version), KINDS)
    assert k.kind == kind and k.group == "networking.istio.io"
    assert encode(msg, KINDS)["apiVersion"] == "networking.istio.io/v1"


@pytest.mark.parametrize(("name", "kind"), [
    ("vs", "VirtualService"), ("virtualservices", "VirtualService"),
    ("virtualservices.networking.istio.io", "VirtualService"),
    ("dr", "DestinationRule"), ("destinationrule", "DestinationRule"),
    ("gw", "Gateway"), ("gateways.networking.istio.io", "Gateway"),
    ("se", "ServiceEntry"), ("serviceentries", "ServiceEntry"),
])
def test_names_users_type(name: str, kind: str) -> None:
    assert KINDS.by_name(name).kind == kind


@pytest.mark.parametrize(("text", "seconds"), [
    ("1.5s", 1.5), ("100ms", 0.1), ("1m30s", 90.0), ("3m", 180.0), ("0s", 0.0), ("1h", 3600.0),
    ("250us", 0.00025),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1.5", "-1s", "1 s", "1d", "1s2"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_defaults_lone_destination_weight_and_service_entry_enums() -> None:
    k, msg = decode(doc("VirtualService", vs()), KINDS)
    apply_defaults(k, msg)
    assert encode(msg, KINDS)["spec"]["http"][0]["route"][0]["weight"] == 100
    k, msg = decode(doc("VirtualService", {"hosts": ["web"], "http": [
        {"route": route(("web", "a", 0), ("web", "b", 100))}]}), KINDS)
    apply_defaults(k, msg)  # several destinations: weights are the user's
    assert [d.get("weight", 0) for d in encode(msg, KINDS)["spec"]["http"][0]["route"]] == [0,
                                                                                          100]
    k, msg = decode(doc("ServiceEntry", {"hosts": ["api.example.com"]}), KINDS)
    apply_defaults(k, msg)
    spec = encode(msg, KINDS)["spec"]
    assert (spec["location"], spec["resolution"]) == ("MESH_EXTERNAL", "NONE")


VALID = [
    pytest.param("VirtualService", vs(), id="vs-minimal"),
    pytest.param("VirtualService", {"hosts": ["web"], "http": [{"route": route(
        ("web", "v1", 90), ("web", "v2", 10))}]}, id="vs-canary"),
    pytest.param("VirtualService", {"hosts": ["web"], "http": [{
        "match": [{"uri": {"regex": "^/api/v[0-9]+/.*"}, "method": {"exact": "GET"},
                   "headers": {"x-user": {"prefix": "test"}, "x-present": {}},
                   "queryParams": {"debug": {"exact": "1"}}, "ignoreUriCase": True,
                   "sourceLabels": {"app": "front"}, "port": 8080}],
        "route": route(("web", "missing-subset-is-fine", 0)),
        "rewrite": {"uri": "/", "authority": "web.internal"},
        "headers": {"request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]},
                    "response": {"remove": ["server"]}},
        "timeout": "1.5s",
        "retries": {"attempts": 3, "perTryTimeout": "100ms",
                    "retryOn": "5xx,gateway-error,connect-failure,reset,retriable-4xx,503"},
        "fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": 0.5}},
                  "abort": {"httpStatus": 503, "percentage": {"value": 50}}},
        "mirror": {"host": "web", "subset": "v2"}, "mirrorPercentage": {"value": 100.0},
    }]}, id="vs-everything"),
    pytest.param("VirtualService", {"hosts": ["*"], "gateways": ["istio-system/ingress"],
                                    "http": [{"redirect": {"uri": "/new",
                                                           "redirectCode": 308}}]},
                 id="vs-wildcard-on-gateway-redirect"),
    pytest.param("VirtualService", {"hosts": ["db"], "tcp": [{
        "match": [{"port": 5432, "sourceLabels": {"app": "api"}}],
        "route": [{"destination": {"host": "db", "subset": "primary", "port": {"number": 5432}},
                   "weight": 80},
                  {"destination": {"host": "db", "subset": "replica"}, "weight": 20}]}]},
                 id="vs-tcp-weights"),
    pytest.param("DestinationRule", {"host": "web", "trafficPolicy": {
        "loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0s"}}},
        "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
                           "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 10,
                                    "maxRequestsPerConnection": 1, "maxRetries": 3,
                                    "idleTimeout": "1m"}},
        "outlierDetection": {"consecutive5xxErrors": 1, "consecutiveGatewayErrors": 0,
                             "interval": "1s", "baseEjectionTime": "3m",
                             "maxEjectionPercent": 100, "minHealthPercent": 0},
        "tls": {"mode": "ISTIO_MUTUAL"},
        "portLevelSettings": [{"port": {"number": 80},
                               "loadBalancer": {"simple": "LEAST_REQUEST"}}]},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"},
                     "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}]},
                 id="dr-everything"),
    pytest.param("Gateway", {"selector": {"istio": "ingressgateway"}, "servers": [
        {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"],
         "tls": {"httpsRedirect": True}},
        {"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
         "hosts": ["shop/web.example.com"],
         "tls": {"mode": "SIMPLE", "credentialName": "web-cert"}},
        {"port": {"number": 8443, "name": "tls", "protocol": "TLS"}, "hosts": ["*.example.com"],
         "tls": {"mode": "PASSTHROUGH"}}]}, id="gw-http-https-passthrough"),
    pytest.param("ServiceEntry", {"hosts": ["api.example.com"], "ports": [
        {"number": 443, "name": "https", "protocol": "TLS"}], "resolution": "DNS"},
                 id="se-dns"),
    pytest.param("DestinationRule", {"host": "httpbin", "trafficPolicy": {
        "connectionPool": {"tcp": {"maxConnections": 1},
                           "http": {"http1MaxPendingRequests": 1,
                                    "maxRequestsPerConnection": 1}},
        "outlierDetection": {"consecutiveErrors": 1, "interval": "1s",
                             "baseEjectionTime": "3m", "maxEjectionPercent": 100}}},
                 id="dr-istio-1.6-circuit-breaker-consecutiveErrors"),
    pytest.param("DestinationRule", {"host": "Web.Example.com", "subsets": [
        {"name": "V1", "labels": {"version": "v1"}}]}, id="dr-upper-case-like-istio"),
    pytest.param("Gateway", {"servers": [{"port": {"number": 80, "protocol": "http",
                                                   "name": "http-bookinfo-gateway-80"},
                                          "hosts": ["*"]}]}, id="gw-long-port-name"),
    pytest.param("ServiceEntry", {"hosts": ["db.internal"], "addresses": ["10.9.0.0/24"],
                                  "ports": [{"number": 5432, "name": "pg", "protocol": "TCP",
                                             "targetPort": 15432}],
                                  "location": "MESH_INTERNAL", "resolution": "STATIC",
                                  "endpoints": [{"address": "10.9.0.4", "ports": {"pg": 5433},
                                                 "labels": {"role": "primary"}}]},
                 id="se-static"),
]


@pytest.mark.parametrize(("kind", "spec"), VALID)
def test_valid(kind: str, spec: dict[str, Any]) -> None:
    assert problems(kind, spec) == []


def _fault(**fault: Any) -> dict[str, Any]:
    return vs(fault=fault)


INVALID = [
    # VirtualService
    ("VirtualService", {"http": [{"route": route(("web", "", 0))}]}, "spec.hosts",
     "at least one host"),
    ("VirtualService", {"hosts": ["web"]}, "spec.http", "http or tcp must be provided"),
    ("VirtualService", {"hosts": ["*"], "http": [{"route": route(("web", "", 0))}]},
     "spec.hosts[0]", "not allowed for virtual services bound to the mesh gateway"),
    ("VirtualService", {"hosts": ["web_1"], "http": [{"route": route(("web", "", 0))}]},
     "spec.hosts[0]", "domain name label"),
    ("VirtualService", {"hosts": ["web"], "http": [{"route": route(
        ("web", "v1", 90), ("web", "v2", 20))}]}, "spec.http[0].route",
     "weights must sum to 100"),
    ("VirtualService", {"hosts": ["web"], "http": [{"route": route(
        ("web", "v1", 120), ("web", "v2", -20))}]}, "spec.http[0].route[0].weight",
     "between 0 and 100"),
    ("VirtualService", {"hosts": ["web"], "http": [{}]}, "spec.http[0].route",
     "HTTP route or redirect is required"),
    ("VirtualService", {"hosts": ["web"], "http": [{"route": [{"weight": 100}]}]},
     "spec.http[0].route[0].destination", "destination is required"),
    ("VirtualService", {"hosts": ["web"], "http": [{"route": route(("*", "", 0))}]},
     "spec.http[0].route[0].destination.host", "invalid destination host"),
    ("VirtualService", {"hosts": ["web"], "http": [{"route": route(("web", "V_1", 0))}]},
     "spec.http[0].route[0].destination.subset", "RFC 1123 label"),
    ("VirtualService", vs(match=[{"uri": {"regex": "(unclosed"}}]),
     "spec.http[0].match[0].uri.regex", "not a valid regular expression"),
    ("VirtualService", vs(match=[{"uri": {"regex": "(a)\\1"}}]),
     "spec.http[0].match[0].uri.regex", "RE2"),
    ("VirtualService", vs(match=[{"headers": {"x-v": {"exact": "1", "prefix": "1"}}}]),
     "spec.http[0].match[0].headers[x-v]", "only one of exact, prefix or regex"),
    ("VirtualService", vs(match=[{"headers": {"bad header": {"exact": "1"}}}]),
     "spec.http[0].match[0].headers[bad header]", "valid HTTP header name"),
    ("VirtualService", vs(match=[{"port": 70000}]), "spec.http[0].match[0].port",
     "between 1 and 65535"),
    ("VirtualService", vs(match=[{"sourceLabels": {"app": "no spaces"}}]),
     "spec.http[0].match[0].sourceLabels[app]", "valid label"),
    ("VirtualService", vs(timeout="10"), "spec.http[0].timeout", "must be a duration"),
    ("VirtualService", vs(timeout="0.5ms"), "spec.http[0].timeout",
     "duration must be greater than 1ms"),
    ("VirtualService", vs(timeout="1.0005s"), "spec.http[0].timeout", "ms precision"),
    ("VirtualService", vs(retries={"attempts": 3, "perTryTimeout": "2 s"}),
     "spec.http[0].retries.perTryTimeout", "must be a duration"),
    ("VirtualService", vs(retries={"attempts": 3, "retryOn": "5xx,sometimes"}),
     "spec.http[0].retries.retryOn", "'sometimes' is not a valid retryOn policy"),
    ("VirtualService", vs(retries={"attempts": 3, "retryOn": "799"}),
     "spec.http[0].retries.retryOn", "'799' is not a valid retryOn policy"),
    ("VirtualService", vs(retries={"attempts": -1}), "spec.http[0].retries.attempts",
     "cannot be negative"),
    ("VirtualService", vs(retries={"attempts": 0, "retryOn": "5xx"}), "spec.http[0].retries",
     "attempts are set to 0"),
    ("VirtualService", _fault(), "spec.http[0].fault", "must have an abort and/or a delay"),
    ("VirtualService", _fault(abort={"httpStatus": 700, "percentage": {"value": 10}}),
     "spec.http[0].fault.abort.httpStatus", "not in range 200-599"),
    ("VirtualService", _fault(abort={"percentage": {"value": 10}}),
     "spec.http[0].fault.abort.httpStatus", "Required value"),
    ("VirtualService", _fault(abort={"httpStatus": 500, "percentage": {"value": 150}}),
     "spec.http[0].fault.abort.percentage.value", "between 0 and 100"),
    ("VirtualService", _fault(delay={"percentage": {"value": 10}}),
     "spec.http[0].fault.delay.fixedDelay", "Required value"),
    ("VirtualService", vs(mirror={"host": "web"}, mirrorPercentage={"value": -1}),
     "spec.http[0].mirrorPercentage.value", "between 0 and 100"),
    ("VirtualService", vs(rewrite={}), "spec.http[0].rewrite",
     "rewrite must specify URI, authority, or both"),
    ("VirtualService", vs(redirect={"uri": "/x"}), "spec.http[0].route",
     "cannot contain both route and redirect"),
    ("VirtualService", {"hosts": ["web"], "http": [{"redirect": {"redirectCode": 200,
                                                                 "uri": "/"}}]},
     "spec.http[0].redirect.redirectCode", "must be 3xx"),
    ("VirtualService", vs(headers={"response": {"set": {":status": "200"}}}),
     "spec.http[0].headers.response.set[:status]", "header cannot be internal"),
    ("VirtualService", vs(rewrite={"authority": "a"}, headers={"request": {"set": {"host": "b"}}}),
     "spec.http[0].headers.request.set[host]", "authority header cannot be set multiple times"),
    ("VirtualService", {"hosts": ["web"], "gateways": ["a/b/c"],
                        "http": [{"route": route(("web", "", 0))}]},
     "spec.gateways[0]", "invalid value for namespace"),
    ("VirtualService", {"hosts": ["db"], "tcp": [{"match": [{"port": 5432}]}]},
     "spec.tcp[0].route", "TCP route is required"),
    ("VirtualService", {"hosts": ["db"], "tcp": [{"route": route(("db", "a", 50),
                                                                 ("db", "b", 40))}]},
     "spec.tcp[0].route", "weights must sum to 100"),
    ("VirtualService", {"hosts": ["db"], "tcp": [{"match": [{"destinationSubnets": ["x"]}],
                                                  "route": route(("db", "", 0))}]},
     "spec.tcp[0].match[0].destinationSubnets[0]", "IP address or a CIDR"),
    ("VirtualService", {"hosts": ["web"], "exportTo": ["*", "."],
                        "http": [{"route": route(("web", "", 0))}]},
     "spec.exportTo", "may not be combined"),
    # DestinationRule
    ("DestinationRule", {"subsets": [{"name": "v1"}]}, "spec.host", "Required value"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {}}, "spec.trafficPolicy",
     "must have at least one field"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"loadBalancer": {
        "simple": "FASTEST"}}}, "spec.trafficPolicy.loadBalancer.simple",
     'Unsupported value: "FASTEST"'),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"loadBalancer": {
        "simple": "RANDOM", "consistentHash": {"httpHeaderName": "x-user"}}}},
     "spec.trafficPolicy.loadBalancer", "only one of simple or consistentHash"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"loadBalancer": {
        "consistentHash": {"httpHeaderName": "x-user", "useSourceIp": True}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash", "exactly one of"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"loadBalancer": {
        "consistentHash": {}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash", "exactly one of"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"loadBalancer": {
        "consistentHash": {"httpCookie": {"name": "user"}}}}},
     "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl", "ttl required"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"connectionPool": {}}},
     "spec.trafficPolicy.connectionPool", "at least one field"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"connectionPool": {
        "http": {"http1MaxPendingRequests": -1}}}},
     "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
     "greater than or equal to 0"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"connectionPool": {
        "tcp": {"connectTimeout": "soon"}}}},
     "spec.trafficPolicy.connectionPool.tcp.connectTimeout", "must be a duration"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"outlierDetection": {
        "maxEjectionPercent": 101}}},
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "between 0 and 100"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"outlierDetection": {
        "baseEjectionTime": "0s"}}},
     "spec.trafficPolicy.outlierDetection.baseEjectionTime", "greater than 1ms"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"outlierDetection": {
        "consecutiveErrors": -1}}},
     "spec.trafficPolicy.outlierDetection.consecutiveErrors", "cannot be negative"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"tls": {"mode": "MUTUAL"}}},
     "spec.trafficPolicy.tls.credentialName", "client certificate required"),
    ("DestinationRule", {"host": "web", "trafficPolicy": {"portLevelSettings": [
        {"loadBalancer": {"simple": "RANDOM"}}]}},
     "spec.trafficPolicy.portLevelSettings[0].port", "must have valid port"),
    ("DestinationRule", {"host": "web", "subsets": [{"name": "v1"}, {"name": "v1"}]},
     "spec.subsets[1].name", "Duplicate value"),
    ("DestinationRule", {"host": "web", "subsets": [{"labels": {"v": "1"}}]},
     "spec.subsets[0].name", "subset name cannot be empty"),
    # Gateway
    ("Gateway", {"selector": {"istio": "ingress"}}, "spec.servers",
     "at least one server"),
    ("Gateway", {"servers": [{"hosts": ["*"]}]}, "spec.servers[0].port", "port is required"),
    ("Gateway", {"servers": [{"port": {"number": 0, "protocol": "HTTP"}, "hosts": ["*"]}]},
     "spec.servers[0].port.number", "between 1 and 65535"),
    ("Gateway", {"servers": [{"port": {"number": 80, "protocol": "QUIC"}, "hosts": ["*"]}]},
     "spec.servers[0].port.protocol", 'Unsupported value: "QUIC"'),
    ("Gateway", {"servers": [{"port": {"number": 80, "protocol": "HTTP"}}]},
     "spec.servers[0].hosts", "at least one host"),
    ("Gateway", {"servers": [{"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["*"]}]},
     "spec.servers[0].tls", "must have TLS settings"),
    ("Gateway", {"servers": [{"port": {"number": 443, "protocol": "TLS"}, "hosts": ["*"]}]},
     "spec.servers[0].tls", "must have TLS settings"),
    ("ServiceEntry", {"hosts": ["db.internal"], "ports": [{"number": 5432, "name": "pg"}]},
     "spec.ports[0].protocol", "Required value"),
    ("Gateway", {"servers": [{"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["*"],
                              "tls": {"mode": "SIMPLE"}}]},
     "spec.servers[0].tls.credentialName", "needs a certificate"),
    ("Gateway", {"servers": [{"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["*"],
                              "tls": {"mode": "SOMETIMES", "credentialName": "c"}}]},
     "spec.servers[0].tls.mode", 'Unsupported value: "SOMETIMES"'),
    ("Gateway", {"servers": [{"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"],
                              "tls": {"mode": "SIMPLE", "credentialName": "c"}}]},
     "spec.servers[0].tls", "plain text HTTP ports"),
    ("Gateway", {"servers": [{"port": {"number": 80, "protocol": "HTTP"},
                              "hosts": ["/web.example.com"]}]},
     "spec.servers[0].hosts[0]", "cannot be empty"),
    ("Gateway", {"servers": [{"port": {"number": 80, "protocol": "HTTP", "name": "web_80"},
                              "hosts": ["*"]}]},
     "spec.servers[0].port.name", "RFC 1123 label"),
    ("ServiceEntry", {"hosts": ["db.internal"], "ports": [{"number": 5432, "name": "pg sql",
                                                           "protocol": "TCP"}]},
     "spec.ports[0].name", "RFC 1123 label"),
    # ServiceEntry
    ("ServiceEntry", {"resolution": "DNS"}, "spec.hosts", "at least one host"),
    ("ServiceEntry", {"hosts": ["*"]}, "spec.hosts[0]", "invalid host *"),
    ("ServiceEntry", {"hosts": ["db.internal"], "resolution": "STATIC"}, "spec.endpoints",
     "resolution STATIC needs endpoints"),
    ("ServiceEntry", {"hosts": ["db.internal"], "resolution": "STATIC",
                      "endpoints": [{"address": "db.example.com"}]},
     "spec.endpoints[0].address", "must be an IP address with resolution STATIC"),
    ("ServiceEntry", {"hosts": ["db.internal"], "resolution": "NONE",
                      "endpoints": [{"address": "10.0.0.1"}]},
     "spec.endpoints", "no endpoints should be provided"),
    ("ServiceEntry", {"hosts": ["db.internal"], "resolution": "SOMETIMES"},
     "spec.resolution", 'Unsupported value: "SOMETIMES"'),
    ("ServiceEntry", {"hosts": ["db.internal"], "location": "MESH_NEARBY"},
     "spec.location", 'Unsupported value: "MESH_NEARBY"'),
    ("ServiceEntry", {"hosts": ["db.internal"], "resolution": "DNS",
                      "addresses": ["10.0.0.0/24"]},
     "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC"),
    ("ServiceEntry", {"hosts": ["*.example.com"], "resolution": "DNS"}, "spec.hosts[0]",
     "hosts must be FQDN"),
    ("ServiceEntry", {"hosts": ["db.internal"], "ports": [
        {"number": 5432, "name": "pg", "protocol": "TCP"},
        {"number": 5432, "name": "pg", "protocol": "TCP"}]},
     "spec.ports[1].number", "Duplicate value"),
    ("ServiceEntry", {"hosts": ["db.internal"], "ports": [{"number": 5432, "protocol": "TCP"}]},
     "spec.ports[0].name", "port name must be set"),
    ("ServiceEntry", {"hosts": ["db.internal"], "resolution": "STATIC", "ports": [
        {"number": 5432, "name": "pg", "protocol": "TCP"}],
        "endpoints": [{"address": "10.0.0.1", "ports": {"sql": 5433}}]},
     "spec.endpoints[0].ports[sql]", "is not defined by the service entry"),
]


@pytest.mark.parametrize(("kind", "spec", "field", "message"), INVALID,
                         ids=[f"{k}-{f}-{m[:24]}" for k, _, f, m in INVALID])
def test_invalid_names_the_field(kind: str, spec: dict[str, Any], field: str,
                                 message: str) -> None:
    found = problems(kind, spec)
    assert any(f == field and message in m for f, m in found), found


@pytest.mark.parametrize(("kind", "spec", "field"), [
    ("VirtualService", {"hosts": ["web"], "tls": [{}]}, "spec.tls"),
    ("VirtualService", vs(corsPolicy={"allowOrigins": [{"exact": "*"}]}),
     "spec.http[0].corsPolicy"),
    ("DestinationRule", {"host": "web", "workloadSelector": {}}, "spec.workloadSelector"),
    ("VirtualService", vs(fault={"abort": {"httpStatus": "500"}}),
     "spec.http[0].fault.abort.httpStatus"),
    ("VirtualService", vs(mirrorPercentage=50), "spec.http[0].mirrorPercentage"),
])
def test_unsupported_or_mistyped_fields_are_refused_by_the_codec(
        kind: str, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.Invalid) as raised:
        decode(doc(kind, spec), KINDS)
    assert field in str(raised.value)


# --------------------------------------------------------------------------- never a crash

_TEXT = st.sampled_from(["", "*", "web", "v1", "1.5s", "0s", "10", "x y", "(", "5xx,reset",
                         "a.b.svc.cluster.local", "*.example.com", "10.0.0.0/8", ":path",
                         "STATIC", "DNS", "HTTPS", "SIMPLE", "ROUND_ROBIN"])


def _value(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None:
        return _message(fd.message_type._concrete_class, depth + 1)
    if fd.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if fd.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(-10, 200, allow_nan=False)
    if fd.type in (FieldDescriptor.TYPE_UINT32,):
        return st.integers(0, 70000)
    return st.integers(-5, 70000)


def _message(cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Random messages of ``cls``: any subset of its fields, a few levels deep."""
    if depth > 5:
        return st.just(cls())

    @st.composite
    def build(draw: Any) -> Any:
        msg = cls()
        for fd in cls.DESCRIPTOR.fields:
            if not draw(st.booleans()):
                continue
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                key_fd = fd.message_type.fields_by_name["key"]
                val_fd = fd.message_type.fields_by_name["value"]
                key = draw(_TEXT if key_fd.type == FieldDescriptor.TYPE_STRING
                           else st.integers(0, 70000))
                value = draw(_value(val_fd, depth))
                target = getattr(msg, fd.name)
                if val_fd.message_type is not None:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            elif fd.is_repeated:
                items = draw(st.lists(_value(fd, depth), max_size=3))
                target = getattr(msg, fd.name)
                for item in items:
                    if fd.message_type is not None:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif fd.message_type is not None:
                getattr(msg, fd.name).CopyFrom(draw(_value(fd, depth)))
            else:
                setattr(msg, fd.name, draw(_value(fd, depth)))
        return msg

    return build()


@pytest.mark.parametrize("kind_name", ["VirtualService", "DestinationRule", "Gateway",
                                       "ServiceEntry"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_spec_gets_field_errors_never_a_crash(kind_name: str, data: st.DataObject) -> None:
    kind = KINDS.by_name(kind_name)
    obj = kind.new()
    obj.metadata.name, obj.metadata.namespace = "x", "shop"
    obj.spec.CopyFrom(data.draw(_message(type(obj.spec))))
    apply_defaults(kind, obj)
    for problem in validate(kind, obj):
        assert problem.field.startswith(("spec", "metadata")) and problem.message
