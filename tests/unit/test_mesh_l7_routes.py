"""VirtualService compile + match -> Action (meshagent.l7.routes), table-driven."""

from __future__ import annotations

import pytest
import yaml
from google.protobuf import json_format

from meshagent.l7.routes import (
    Action,
    Destination,
    Request,
    Retries,
    Rewrite,
    RouteTable,
    fqdn,
    shadow_authority,
)
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb

SVC = "reviews.default.svc.cluster.local"


def _vs(text: str, *, name: str = "reviews", namespace: str = "default",
        created: int = 0) -> pb.VirtualService:
    vs = pb.VirtualService()
    json_format.ParseDict({"spec": yaml.safe_load(text)}, vs)
    vs.metadata.name, vs.metadata.namespace = name, namespace
    vs.metadata.creation_timestamp.seconds = created
    return vs


def _svc(name: str, namespace: str = "default", ports: tuple[int, ...] = (9080,)
         ) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, namespace
    for p in ports:
        s.spec.ports.add(name=f"http-{p}", port=p)
    return s


def _req(path: str = "/", *, method: str = "GET", headers: dict[str, str] | None = None,
         port: int = 9080, labels: dict[str, str] | None = None,
         namespace: str = "default", authority: str = "reviews:9080") -> Request:
    return Request(method=method, path=path, authority=authority, headers=headers or {},
                   port=port, source_labels=labels or {}, source_namespace=namespace)


def _table(*vss: pb.VirtualService) -> RouteTable:
    t = RouteTable()
    t.update(vss, [_svc("reviews"), _svc("ratings"), _svc("multi", ports=(80, 8080))])
    return t


MATCHES = """
hosts: [reviews]
http:
- name: exact
  match: [{uri: {exact: /exact}}]
  route: [{destination: {host: reviews, subset: exact}}]
- name: prefix
  match: [{uri: {prefix: /api/}}]
  route: [{destination: {host: reviews, subset: prefix}}]
- name: regex
  match: [{uri: {regex: "/items/[0-9]+"}}]
  route: [{destination: {host: reviews, subset: regex}}]
- name: header-exact
  match: [{headers: {end-user: {exact: jason}}}]
  route: [{destination: {host: reviews, subset: jason}}]
- name: header-prefix
  match: [{headers: {x-group: {prefix: beta}}}]
  route: [{destination: {host: reviews, subset: beta}}]
- name: header-regex
  match: [{headers: {x-id: {regex: "[a-f]+"}}}]
  route: [{destination: {host: reviews, subset: hexid}}]
- name: method
  match: [{method: {exact: DELETE}}]
  route: [{destination: {host: reviews, subset: deleter}}]
- name: query
  match: [{queryParams: {debug: {exact: "1"}}}]
  route: [{destination: {host: reviews, subset: debug}}]
- name: labels
  match: [{sourceLabels: {app: tester}}]
  route: [{destination: {host: reviews, subset: tested}}]
- name: port-or-both
  match: [{port: 9999}, {uri: {prefix: /both}, method: {exact: POST}}]
  route: [{destination: {host: reviews, subset: either}}]
- route: [{destination: {host: reviews, subset: v1}}]
"""


@pytest.mark.parametrize(("req", "subset"), [
    (_req("/exact"), "exact"),
    (_req("/exact/more"), "v1"),                      # exact is exact
    (_req("/exact?x=1"), "exact"),                    # the query is not the path
    (_req("/api/v1/x"), "prefix"),
    (_req("/API/v1/x"), "v1"),                        # case-sensitive without ignoreUriCase
    (_req("/items/42"), "regex"),
    (_req("/items/42/x"), "v1"),                      # regex: a full match
    (_req(headers={"end-user": "jason"}), "jason"),
    (_req(headers={"end-user": "jasonx"}), "v1"),
    (_req(headers={"x-group": "beta-7"}), "beta"),
    (_req(headers={"x-id": "abc"}), "hexid"),
    (_req(headers={"x-id": "abz"}), "v1"),
    (_req(method="DELETE"), "deleter"),
    (_req("/?debug=1"), "debug"),
    (_req("/?debug=2"), "v1"),
    (_req(labels={"app": "tester", "version": "x"}), "tested"),
    (_req(labels={"app": "other"}), "v1"),
    (_req(port=9999), "either"),                      # OR over match entries
    (_req("/both", method="POST"), "either"),         # AND within one
    (_req("/both", method="GET"), "v1"),
    # first matching route wins: header-exact comes before method
    (_req(method="DELETE", headers={"end-user": "jason"}), "jason"),
])
def test_match(req: Request, subset: str) -> None:
    a = _table(_vs(MATCHES)).route(req, SVC, 9080)
    assert [d.subset for d in a.destinations] == [subset]
    assert a.destinations[0].host == SVC and a.destinations[0].port == 9080


def test_origin_names_the_object_route_and_match() -> None:
    a = _table(_vs(MATCHES)).route(_req(headers={"end-user": "jason"}), SVC, 9080)
    assert a.origin == "VirtualService default/reviews http[3] (header-exact)"
    assert _table(_vs(MATCHES)).route(_req(), SVC, 9080).origin == \
        "VirtualService default/reviews http[10]"


@pytest.mark.parametrize(("hosts", "vs_ns", "host", "applies"), [
    ("[reviews]", "default", SVC, True),                            # short name, VS namespace
    ("[reviews]", "other", SVC, False),                             # ... of another namespace
    ("[reviews.default.svc.cluster.local]", "other", SVC, True),    # FQDN from anywhere
    ("['*.default.svc.cluster.local']", "other", SVC, True),        # wildcard
    ("['*.example.com']", "default", SVC, False),
    ("[api.example.com]", "default", "api.example.com", True),     # a ServiceEntry host
])
def test_hosts(hosts: str, vs_ns: str, host: str, applies: bool) -> None:
    vs = _vs(f"hosts: {hosts}\nhttp: [{{route: [{{destination: {{host: x, subset: s}}}}]}}]",
             namespace=vs_ns)
    a = _table(vs).route(_req(), host, 9080)
    assert (a.origin != "default") is applies


def test_exact_host_beats_wildcard_and_oldest_wins() -> None:
    wild = _vs("hosts: ['*.svc.cluster.local']\nhttp: [{route: [{destination: {host: w}}]}]",
               name="wild", created=1)
    new = _vs("hosts: [reviews]\nhttp: [{route: [{destination: {host: n}}]}]", name="new",
              created=3)
    old = _vs("hosts: [reviews]\nhttp: [{route: [{destination: {host: o}}]}]", name="old",
              created=2)
    a = _table(wild, new, old).route(_req(), SVC, 9080)
    assert a.destinations[0].host == "o.default.svc.cluster.local"


def test_no_virtual_service_is_the_service_itself() -> None:
    a = _table().route(_req(), SVC, 9080)
    assert a == Action(origin="default", destinations=(Destination(SVC, 9080),))
    assert a.retries.attempts == 2  # Istio's default retry policy


def test_no_route_matching_is_no_destination() -> None:
    vs = _vs("hosts: [reviews]\nhttp: [{match: [{uri: {exact: /a}}], "
             "route: [{destination: {host: reviews}}]}]")
    a = _table(vs).route(_req("/b"), SVC, 9080)
    assert a.destinations == () and a.choose(0.3) is None


def test_gateways_and_export_to() -> None:
    gw = _vs("hosts: [reviews]\ngateways: [bookinfo-gateway]\n"
             "http: [{route: [{destination: {host: reviews, subset: gw}}]}]")
    t = _table(gw)
    assert t.route(_req(), SVC, 9080).origin == "default"
    assert t.route(_req(), SVC, 9080, gateway="default/bookinfo-gateway").destinations[0] \
        .subset == "gw"
    private = _vs("hosts: [reviews]\nexportTo: ['.']\n"
                  "http: [{route: [{destination: {host: reviews, subset: p}}]}]")
    t = _table(private)
    assert t.route(_req(namespace="default"), SVC, 9080).destinations[0].subset == "p"
    assert t.route(_req(namespace="elsewhere"), SVC, 9080).origin == "default"


WEIGHTS = """
hosts: [reviews]
http:
- route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews, subset: v2}, weight: 10}
"""


@pytest.mark.parametrize(("r", "subset"), [(0.0, "v1"), (0.8999, "v1"), (0.9, "v2"),
                                           (0.9999, "v2")])
def test_weights(r: float, subset: str) -> None:
    a = _table(_vs(WEIGHTS)).route(_req(), SVC, 9080)
    d = a.choose(r)
    assert d is not None and d.subset == subset


def test_destination_port_defaults() -> None:
    vs = _vs("hosts: [reviews]\nhttp: [{route: [{destination: {host: ratings}, weight: 50}, "
             "{destination: {host: multi}, weight: 50}]}]")
    a = _table(vs).route(_req(port=9080), SVC, 9080)
    # ratings has one port: that one; multi has two: the request's.
    assert [(d.host.split(".")[0], d.port) for d in a.destinations] == \
        [("ratings", 9080), ("multi", 9080)]


FEATURES = """
hosts: [reviews]
http:
- match: [{uri: {prefix: /old/}}]
  rewrite: {uri: /new/, authority: reviews-v2}
  route: [{destination: {host: reviews}}]
- match: [{uri: {exact: /moved}}]
  redirect: {uri: /here, authority: other.example}
- match: [{uri: {prefix: /slow}}]
  timeout: 2s
  retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,connect-failure"}
  fault:
    delay: {fixedDelay: 1s, percentage: {value: 10}}
    abort: {httpStatus: 503, percentage: {value: 50}}
  route: [{destination: {host: reviews}}]
- headers:
    request: {set: {X-Set: a}, add: {x-add: b}, remove: [x-drop]}
    response: {set: {x-served-by: mesh}}
  mirror: {host: reviews, subset: v2}
  mirrorPercentage: {value: 25}
  route: [{destination: {host: reviews, subset: v1}}]
"""


def test_rewrite_redirect_timeout_retries_fault() -> None:
    t = _table(_vs(FEATURES))
    a = t.route(_req("/old/x?y=1"), SVC, 9080)
    assert a.rewrite == Rewrite(uri="/new/", authority="reviews-v2", prefix="/old/")
    assert a.rewrite.path("/old/x?y=1") == "/new/x?y=1"
    a = t.route(_req("/moved"), SVC, 9080)
    assert a.redirect is not None and a.redirect.code == 301 and a.destinations == ()
    assert a.redirect.location(scheme="http", authority="reviews:9080", path="/moved") == \
        "http://other.example/here"
    a = t.route(_req("/slow"), SVC, 9080)
    assert a.timeout == 2.0
    assert (a.retries.attempts, a.retries.per_try_timeout) == (3, 0.5)
    assert a.retries.retriable(500) and a.retries.retriable_failure("UF")
    assert not a.retries.retriable(404)
    assert a.fault is not None
    assert (a.fault.delay, a.fault.delay_percent) == (1.0, 10.0)
    assert (a.fault.abort_status, a.fault.abort_percent) == (503, 50.0)


def test_header_ops_and_mirror() -> None:
    a = _table(_vs(FEATURES)).route(_req("/"), SVC, 9080)
    headers = [("x-set", "old"), ("X-Drop", "1"), ("x-add", "a"), ("keep", "k")]
    assert a.request_headers.apply(headers) == \
        [("x-add", "a"), ("keep", "k"), ("x-set", "a"), ("x-add", "b")]
    assert a.response_headers.set == (("x-served-by", "mesh"),)
    assert a.mirror == Destination(SVC, 9080, "v2")
    assert a.mirror_percent == 25.0


@pytest.mark.parametrize(("retry_on", "status", "retried"), [
    ("5xx", 500, True), ("5xx", 503, True), ("5xx", 404, False),
    ("gateway-error", 502, True), ("gateway-error", 500, False),
    ("connect-failure", 503, False), ("reset", 503, False),
    ("retriable-4xx", 409, True), ("retriable-4xx", 404, False),
    ("503", 503, True), ("503", 500, False),
])
def test_retry_on(retry_on: str, status: int, retried: bool) -> None:
    vs = _vs(f"hosts: [reviews]\nhttp: [{{retries: {{attempts: 1, retryOn: '{retry_on}'}}, "
             "route: [{destination: {host: reviews}}]}]")
    assert _table(vs).route(_req(), SVC, 9080).retries.retriable(status) is retried


@pytest.mark.parametrize(("retry_on", "grpc_status", "retried"), [
    ("unavailable", "14", True), ("cancelled", "1", True), ("deadline-exceeded", "4", True),
    ("internal", "13", True), ("resource-exhausted", "8", True),
    ("unavailable", "13", False), ("5xx", "14", False), ("unavailable", "0", False),
    ("unavailable", "", False), ("5xx,internal", "13", True),
])
def test_retry_on_grpc_status(retry_on: str, grpc_status: str, retried: bool) -> None:
    vs = _vs(f"hosts: [reviews]\nhttp: [{{retries: {{attempts: 1, retryOn: '{retry_on}'}}, "
             "route: [{destination: {host: reviews}}]}]")
    retries = _table(vs).route(_req(), SVC, 9080).retries
    assert retries.retriable_grpc(grpc_status) is retried
    assert retries.on_grpc is (retry_on != "5xx")


def test_default_retries_cover_grpc_unavailable_and_cancelled() -> None:
    retries = _table().route(_req(), SVC, 9080).retries
    assert retries.on_grpc and retries.retriable_grpc("14") and retries.retriable_grpc("1")
    assert not retries.retriable_grpc("13")


@pytest.mark.parametrize(("authority", "want"), [
    ("reviews", "reviews-shadow"), ("reviews:9080", "reviews-shadow:9080"),
    ("reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local-shadow"),
])
def test_shadow_authority(authority: str, want: str) -> None:
    assert shadow_authority(authority) == want


def test_tcp_routes_with_weights() -> None:
    vs = _vs("hosts: [reviews]\ntcp:\n- match: [{port: 9999}]\n"
             "  route: [{destination: {host: reviews, subset: a}, weight: 30}, "
             "{destination: {host: reviews, subset: b}, weight: 70}]")
    t = _table(vs)
    a = t.tcp_route(SVC, 9999, source_labels={})
    assert a is not None and [d.weight for d in a.destinations] == [30, 70]
    assert a.destinations[0].port == 9080  # the service's only port
    assert t.tcp_route(SVC, 9080, source_labels={}) is None


def test_a_bad_virtual_service_is_left_out_alone() -> None:
    bad = _vs("hosts: [reviews]\nhttp: [{match: [{uri: {regex: '('}}], "
              "route: [{destination: {host: x}}]}]", name="bad")
    good = _vs("hosts: [ratings]\nhttp: [{route: [{destination: {host: ratings, "
               "subset: v9}}]}]", name="good")
    t = _table(bad, good)
    assert "default/bad" in t.errors
    assert t.route(_req(), "ratings.default.svc.cluster.local", 9080).destinations[0] \
        .subset == "v9"


@pytest.mark.parametrize(("host", "ns", "want"), [
    ("reviews", "default", SVC), ("Reviews", "x", "reviews.x.svc.cluster.local"),
    ("reviews.default", "x", "reviews.default"), ("*.a.com", "x", "*.a.com"),
])
def test_fqdn(host: str, ns: str, want: str) -> None:
    assert fqdn(host, ns) == want


@pytest.mark.parametrize("retry_on, retried", [
    # how the try ended: connect failure (UF), reset (UC), per-try timeout (UT)
    ("5xx", {"UF", "UC", "UT"}),
    ("gateway-error", {"UF", "UC", "UT"}),
    ("reset", {"UF", "UC", "UT"}),
    ("connect-failure", {"UF"}),  # a timed-out try is not a connect failure (Envoy)
    ("refused-stream", set()),  # a reset that is not REFUSED_STREAM: see below
    ("retriable-4xx", set()),
    ("503", set()),
])
def test_a_try_without_response_is_retried_as_envoy_does(retry_on: str, retried: set[str]
                                                         ) -> None:
    r = Retries(attempts=2, retry_on=frozenset({retry_on}))
    assert {f for f in ("UF", "UC", "UT") if r.retriable_failure(f)} == retried


@pytest.mark.parametrize("retry_on, retried", [
    ("refused-stream", True), ("reset", True), ("5xx", True), ("connect-failure", False)])
def test_a_refused_stream_is_retried_under_refused_stream(retry_on: str,
                                                          retried: bool) -> None:
    r = Retries(attempts=2, retry_on=frozenset({retry_on}))
    assert r.retriable_failure("UC", refused=True) is retried
