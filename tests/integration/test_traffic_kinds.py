"""Istio's networking.istio.io kinds through the CLI and the SDK, on a live apiserver.

The YAML examples of Istio's documentation (a weighted canary with its
DestinationRule, fault injection, retries and a timeout, a Gateway with its
VirtualService, ServiceEntries) apply unchanged under v1, v1beta1 and v1alpha3,
read back as v1 with Istio's defaults written out, and list with istioctl's
columns. Bad input is refused naming the field, and nothing is stored.
``shoal mesh check`` reports a small setup's problems and exits 79.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from shoal import errors
from shoal.api.traffic.v1 import traffic_pb2
from shoal.kinds import builtin_kinds
from shoal.manifests import decode
from shoal.testing.cli import Result, run_shoal
from shoal.testing.cli import make_namespace as _make_namespace


@pytest.fixture
def shoal(apiserver: Any, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> Any:
    """``await shoal("get", "vs")`` -> Result, with the apiserver's config."""
    async def run(*args: str, stdin: str | None = None) -> Result:
        return await run_shoal(apiserver.config_path, capsys, monkeypatch, *args, stdin=stdin)

    return run


async def make_namespace(shoal: Any) -> str:
    return await _make_namespace(shoal, "traffic")


# Istio's documentation examples (traffic shifting, fault injection, request
# timeouts and retries, ingress gateways, egress), as published, in a namespace.
ISTIO_DOCS_YAML = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: {ns}
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
  namespace: {ns}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v3
    labels:
      version: v3
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: ratings
  namespace: {ns}
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - fault:
      abort:
        percentage:
          value: 10
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings-route
  namespace: {ns}
spec:
  hosts:
  - ratings.prod.svc.cluster.local
  http:
  - route:
    - destination:
        host: ratings.prod.svc.cluster.local
        subset: v1
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
  namespace: {ns}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
  namespace: {ns}
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 8080
      name: http
      protocol: HTTP
    hosts:
    - "*"
  - port:
      number: 443
      name: https
      protocol: HTTPS
    tls:
      mode: SIMPLE
      credentialName: httpbin-credential
    hosts:
    - httpbin.example.com
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo
  namespace: {ns}
spec:
  hosts:
  - "*"
  gateways:
  - bookinfo-gateway
  http:
  - match:
    - uri:
        exact: /productpage
    - uri:
        prefix: /static
    - uri:
        prefix: /api/v1/products
    route:
    - destination:
        host: productpage
        port:
          number: 9080
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin-ext
  namespace: {ns}
spec:
  hosts:
  - httpbin.org
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-svc-mongocluster
  namespace: {ns}
spec:
  hosts:
  - mymongodb.somedomain
  addresses:
  - 192.192.192.192/24
  ports:
  - number: 27018
    name: mongodb
    protocol: MONGO
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 2.2.2.2
  - address: 3.3.3.3
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api-defaults
  namespace: {ns}
spec:
  hosts:
  - api.example.com
  ports:
  - number: 443
    name: tls
    protocol: TLS
"""


async def test_istio_docs_yaml_applies_unchanged_and_reads_back(shoal: Any,
                                                                apiserver: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("apply", "-f", "-", stdin=ISTIO_DOCS_YAML.format(ns=ns))
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "virtualservice.networking.istio.io/reviews created",
        "destinationrule.networking.istio.io/reviews created",
        "virtualservice.networking.istio.io/ratings created",
        "virtualservice.networking.istio.io/ratings-route created",
        "destinationrule.networking.istio.io/httpbin created",
        "gateway.networking.istio.io/bookinfo-gateway created",
        "virtualservice.networking.istio.io/bookinfo created",
        "serviceentry.networking.istio.io/httpbin-ext created",
        "serviceentry.networking.istio.io/external-svc-mongocluster created",
        "serviceentry.networking.istio.io/api-defaults created",
    ]
    again = await shoal("apply", "-f", "-", stdin=ISTIO_DOCS_YAML.format(ns=ns))
    assert again.code == 0 and again.out.count("unchanged") == 10, again.out

    # Read back as v1 whatever was written, as written, with Istio's defaults filled.
    ratings = yaml.safe_load((await shoal("get", "vs", "ratings", "-n", ns, "-o", "yaml")).out)
    assert ratings["apiVersion"] == "networking.istio.io/v1"
    assert ratings["spec"]["http"][0] == {
        "match": [{"headers": {"end-user": {"exact": "jason"}}}],
        "route": [{"destination": {"host": "ratings", "subset": "v1"}, "weight": 100}],
        "fault": {"delay": {"fixedDelay": "7s", "percentage": {"value": 100.0}}},
    }
    assert ratings["spec"]["http"][1]["fault"] == {
        "abort": {"httpStatus": 500, "percentage": {"value": 10.0}}}
    retry = json.loads((await shoal("get", "virtualservices.networking.istio.io",
                                    "ratings-route", "-n", ns, "-o", "json")).out)
    assert retry["spec"]["http"][0]["timeout"] == "10s"
    assert retry["spec"]["http"][0]["retries"] == {
        "attempts": 3, "perTryTimeout": "2s",
        "retryOn": "gateway-error,connect-failure,refused-stream"}
    canary = yaml.safe_load((await shoal("get", "vs", "reviews", "-n", ns, "-o", "yaml")).out)
    assert [d["weight"] for d in canary["spec"]["http"][0]["route"]] == [50, 50]
    breaker = yaml.safe_load((await shoal("get", "dr", "httpbin", "-n", ns, "-o", "yaml")).out)
    assert breaker["spec"]["trafficPolicy"]["outlierDetection"] == {
        "consecutive5xxErrors": 1, "interval": "1s", "baseEjectionTime": "3m",
        "maxEjectionPercent": 100}
    defaults = yaml.safe_load((await shoal("get", "se", "api-defaults", "-n", ns,
                                           "-o", "yaml")).out)
    assert (defaults["spec"]["location"], defaults["spec"]["resolution"]) == (
        "MESH_EXTERNAL", "NONE")

    # istioctl's / kubectl's columns.
    vs_table = await shoal("get", "vs", "-n", ns)
    assert vs_table.out.splitlines()[0].split() == ["NAME", "GATEWAYS", "HOSTS", "AGE"]
    rows = {line.split()[0]: line.split() for line in vs_table.out.splitlines()[1:]}
    assert rows["bookinfo"][1:3] == ['["bookinfo-gateway"]', '["*"]']
    assert rows["reviews"][1] == '["reviews"]'  # no gateways: a blank cell
    dr_table = await shoal("get", "dr", "-n", ns)
    assert [line.split()[:2] for line in dr_table.out.splitlines()] == [
        ["NAME", "HOST"], ["httpbin", "httpbin"], ["reviews", "reviews"]]
    gw_table = await shoal("get", "gw", "-n", ns)
    assert [line.split()[0] for line in gw_table.out.splitlines()] == ["NAME",
                                                                         "bookinfo-gateway"]
    assert gw_table.out.splitlines()[0].split() == ["NAME", "AGE"]
    se_table = await shoal("get", "se", "-n", ns)
    assert [line.split()[:4] for line in se_table.out.splitlines()] == [
        ["NAME", "HOSTS", "LOCATION", "RESOLUTION"],
        ["api-defaults", '["api.example.com"]', "MESH_EXTERNAL", "NONE"],
        ["external-svc-mongocluster", '["mymongodb.somedomain"]', "MESH_INTERNAL", "STATIC"],
        ["httpbin-ext", '["httpbin.org"]', "MESH_EXTERNAL", "DNS"]]

    described = await shoal("describe", "vs", "ratings", "-n", ns)
    assert described.code == 0 and "jason" in described.out, described

    # What an agent will read: the SDK's typed objects.
    async with apiserver.client() as c:
        got = await c.get(traffic_pb2.DestinationRule, "reviews", namespace=ns)
    assert [s.name for s in got.spec.subsets] == ["v1", "v2", "v3"]
    assert got.spec.subsets[1].traffic_policy.load_balancer.simple == "ROUND_ROBIN"

    deleted = await shoal("delete", "-f", "-", stdin=ISTIO_DOCS_YAML.format(ns=ns))
    assert deleted.code == 0, deleted.err
    gone = await shoal("get", "vs,dr,gw,se", "-n", ns)
    assert gone.code == 0 and gone.out == "", gone


async def test_api_resources_lists_the_traffic_kinds(shoal: Any) -> None:
    r = await shoal("api-resources")
    assert r.code == 0, r.err
    rows = {line.split()[0]: line.split() for line in r.out.splitlines()[1:]}
    for resource, short, kind in (("virtualservices", "vs", "VirtualService"),
                                  ("destinationrules", "dr", "DestinationRule"),
                                  ("gateways", "gw", "Gateway"),
                                  ("serviceentries", "se", "ServiceEntry")):
        assert rows[resource][1:] == [short, "networking.istio.io/v1", "true", kind]


def istio(kind: str, ns: str, spec: dict[str, Any], *, name: str = "bad",
          version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"networking.istio.io/{version}", "kind": kind,
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _route(*weights: int) -> list[dict[str, Any]]:
    return [{"destination": {"host": "web", "subset": f"v{i}"}, "weight": w}
            for i, w in enumerate(weights, 1)]


@pytest.mark.parametrize(("make", "field", "message"), [
    pytest.param(lambda ns: istio("VirtualService", ns, {"hosts": ["web"], "http": [
        {"route": _route(90, 20)}]}), "spec.http[0].route", "weights must sum to 100",
        id="weights"),
    pytest.param(lambda ns: istio("VirtualService", ns, {"hosts": ["web"], "http": [
        {"match": [{"uri": {"regex": "([a-z"}}], "route": _route(100)}]}, version="v1beta1"),
        "spec.http[0].match[0].uri.regex", "not a valid regular expression", id="regex"),
    pytest.param(lambda ns: istio("VirtualService", ns, {"hosts": ["web"], "http": [
        {"route": _route(100), "timeout": "10 seconds"}]}),
        "spec.http[0].timeout", "must be a duration", id="duration"),
    pytest.param(lambda ns: istio("VirtualService", ns, {"hosts": ["web"], "http": [
        {"route": _route(100), "retries": {"attempts": 2, "retryOn": "5xx,on-tuesdays"}}]}),
        "spec.http[0].retries.retryOn", "'on-tuesdays' is not a valid retryOn policy",
        id="retry-on"),
    pytest.param(lambda ns: istio("VirtualService", ns, {"hosts": ["web"], "http": [
        {"route": _route(100), "fault": {"abort": {"httpStatus": 503,
                                                   "percentage": {"value": 120}}}}]},
        version="v1alpha3"),
        "spec.http[0].fault.abort.percentage.value", "between 0 and 100", id="percentage"),
    pytest.param(lambda ns: istio("DestinationRule", ns, {"host": "web", "trafficPolicy": {
        "loadBalancer": {"consistentHash": {"httpHeaderName": "x-user",
                                            "useSourceIp": True}}}}),
        "spec.trafficPolicy.loadBalancer.consistentHash", "exactly one of", id="hash-keys"),
    pytest.param(lambda ns: istio("DestinationRule", ns, {"subsets": [{"name": "v1"}]}),
                 "spec.host", "Required value", id="dr-host"),
    pytest.param(lambda ns: istio("Gateway", ns, {"servers": [{"hosts": ["*"]}]}),
                 "spec.servers[0].port", "port is required", id="gw-port"),
    pytest.param(lambda ns: istio("ServiceEntry", ns, {"hosts": ["db.internal"],
                                                       "resolution": "STATIC"}),
                 "spec.endpoints", "resolution STATIC needs endpoints", id="se-static"),
    pytest.param(lambda ns: istio("VirtualService", ns, {"hosts": ["web"], "tls": [{}]}),
                 "spec.tls", 'unknown field "tls"', id="tls-routes-unsupported"),
])
async def test_bad_input_is_refused_naming_the_field(shoal: Any, apiserver: Any, make: Any,
                                                     field: str, message: str) -> None:
    ns = await make_namespace(shoal)
    doc = make(ns)
    good = istio("VirtualService", ns, {"hosts": ["web"], "http": [{"route": _route(100)}]},
                 name="good-first")
    r = await shoal("apply", "-f", "-", stdin=yaml.safe_dump_all([good, doc]))
    assert r.code == 2, r.out
    assert field in r.err and message in r.err, r.err
    assert r.out == ""
    listed = await shoal("get", "vs,dr,gw,se", "-n", ns, "-o", "name")
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
        assert (await c.list(type(msg), namespace=ns)).items == []


CHECK_SETUP = """\
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: {ns}}}
spec:
  selector: {{app: reviews}}
  ports:
  - {{name: http, port: 9080}}
  - {{name: metrics, port: 9090}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v1, namespace: {ns}, labels: {{app: reviews, version: v1}}}}
spec:
  containers: [{{name: app, image: busybox}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: {ns}}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: {ns}}}
spec:
  hosts: [reviews]
  http:
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: 80}}
    - {{destination: {{host: reviews, subset: v3}}, weight: 10}}
    - {{destination: {{host: reviewz}}, weight: 10}}
"""


async def test_mesh_check_on_a_small_setup(shoal: Any) -> None:
    clean = await make_namespace(shoal)
    ok = await shoal("mesh", "check", "-n", clean)
    assert ok.code == 0, ok
    assert ok.out == f"\u2714 No validation issues found when analyzing namespace: {clean}.\n"

    ns = await make_namespace(shoal)
    r = await shoal("apply", "-f", "-", stdin=CHECK_SETUP.format(ns=ns))
    assert r.code == 0, r.err
    found = await shoal("mesh", "check", "-n", ns)
    assert found.code == 79, found
    assert found.out.splitlines() == [
        f"Warning [SHL0001] (DestinationRule {ns}/reviews) Subset 'v2' (version=v2) selects "
        f"no pod of Service {ns}/reviews",
        f"Warning [IST0118] (Service {ns}/reviews) Port 9090 declares no protocol (its name "
        "'metrics' has no protocol prefix): the mesh treats it as TCP. Name it http-*, http2-*, "
        "grpc-* or tcp-*, or set appProtocol.",
        f"Warning [IST0101] (VirtualService {ns}/reviews) Referenced host+subset in "
        "destinationrule not found: 'reviews' subset 'v3' (spec.http[0].route[1])",
        f"Warning [IST0101] (VirtualService {ns}/reviews) Referenced host not found: "
        "'reviewz' (spec.http[0].route[2]): no Service or ServiceEntry has it",
    ]
    assert f"Analyzers found issues when analyzing namespace: {ns}" in found.err
    as_json = await shoal("mesh", "check", "-n", ns, "-o", "json")
    assert as_json.code == 79
    assert sorted(f["code"] for f in json.loads(as_json.out)) == [
        "IST0101", "IST0101", "IST0118", "SHL0001"]
    # -n looks at one namespace (references resolve anywhere); -A at all of them.
    assert (await shoal("mesh", "check", "-n", clean)).code == 0
    everywhere = await shoal("mesh", "check", "-A")
    assert everywhere.code == 79 and f"(Service {ns}/reviews)" in everywhere.out


async def test_a_bad_update_keeps_the_stored_object(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    good = istio("VirtualService", ns, {"hosts": ["web"], "http": [{"route": _route(90, 10)}]},
                 name="canary")
    assert (await shoal("apply", "-f", "-", stdin=yaml.safe_dump(good))).code == 0
    bad = istio("VirtualService", ns, {"hosts": ["web"], "http": [{"route": _route(90, 20)}]},
                name="canary")
    r = await shoal("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    assert r.code == 2 and "spec.http[0].route" in r.err and "weights must sum to 100" in r.err
    stored = yaml.safe_load((await shoal("get", "vs", "canary", "-n", ns, "-o", "yaml")).out)
    assert [d["weight"] for d in stored["spec"]["http"][0]["route"]] == [90, 10]
