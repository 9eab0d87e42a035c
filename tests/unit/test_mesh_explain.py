"""``shoal mesh explain``: the pure explanation, from objects, by the agent's own code."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli.meshexplain import Ask, MeshObjects, explain, parse_headers, render
from shoal.cli.reporting import UsageError
from shoal.kinds import builtin_kinds
from shoal.manifests import decode

SETUP = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: buyer, containers: [{name: c, image: busybox}]}
status: {podIP: 10.244.1.9, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec: {nodeName: n1, containers: [{name: c, image: busybox}]}
status: {podIP: 10.244.1.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: shop, labels: {app: reviews, version: v2}}
spec: {nodeName: n2, containers: [{name: c, image: busybox}]}
status: {podIP: 10.244.2.3, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 9080}, {name: metrics, port: 9090}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: reviews, namespace: shop}
subsets:
- addresses:
  - {ip: 10.244.1.2, targetRef: {kind: Pod, namespace: shop, name: reviews-v1}}
  - {ip: 10.244.2.3, targetRef: {kind: Pod, namespace: shop, name: reviews-v2}}
  ports: [{name: http, port: 8080}, {name: metrics, port: 9090}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 5s,
                       maxEjectionPercent: 100}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: testers
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: 5xx}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
"""

_FIELDS = {core_pb2.Service: "services", core_pb2.Endpoints: "endpoints",
           core_pb2.Pod: "pods", core_pb2.Namespace: "namespaces",
           traffic_pb2.VirtualService: "virtual_services",
           traffic_pb2.DestinationRule: "destination_rules",
           traffic_pb2.ServiceEntry: "service_entries",
           security_pb2.AuthorizationPolicy: "authorization_policies",
           security_pb2.PeerAuthentication: "peer_authentications"}


def objects(text: str = SETUP, extra: str = "") -> MeshObjects:
    lists: dict[str, list[Any]] = {f: [] for f in _FIELDS.values()}
    kinds = builtin_kinds()
    for doc in yaml.safe_load_all(text + extra):
        if doc:
            _, msg = decode(doc, kinds)
            lists[_FIELDS[type(msg)]].append(msg)
    return MeshObjects(**lists)


def ask(target: str = "reviews:9080", **kw: Any) -> Ask:
    return Ask(pod="client", namespace="shop", target=target, **kw)


def test_the_header_match_route_with_its_timeout_retries_and_subset() -> None:
    doc = explain(objects(), ask(headers={"end-user": "jason"}))
    assert doc["route"] == {
        "origin": "VirtualService shop/reviews http[0] (testers)", "timeout_s": 2.0,
        "retries": {"attempts": 3, "per_try_timeout_s": 0.5, "retry_on": ["5xx"],
                    "retriable_status_codes": []}}
    [dest] = doc["destinations"]
    assert (dest["host"], dest["port"], dest["subset"], dest["weight"]) == (
        "reviews.shop.svc.cluster.local", 9080, "v2", 100)
    assert dest["cluster"]["name"] == "outbound|9080|v2|reviews.shop.svc.cluster.local"
    assert dest["cluster"]["destination_rule"] == "shop/reviews"
    assert dest["cluster"]["connection_pool"]["max_connections"] == 1
    assert dest["cluster"]["load_balancer"] == {"policy": "ROUND_ROBIN"}
    assert [(e["address"], e["pod"], e["node"]) for e in dest["endpoints"]] == [
        ("10.244.2.3:8080", "shop/reviews-v2", "n2")]
    assert dest["endpoints"][0]["policy"]["allowed"] is True
    assert dest["endpoints"][0]["connection_security"] == "mutual_tls"
    assert dest["endpoints"][0]["mtls_mode"] == "PERMISSIVE"
    assert doc["source"]["principal"] == "cluster.local/ns/shop/sa/buyer"
    assert any("known only by the source pod's agent" in n for n in doc["notes"])


def test_the_weighted_route_lists_both_subsets() -> None:
    doc = explain(objects(), ask("reviews.shop.svc.cluster.local:9080"))
    assert doc["route"]["origin"] == "VirtualService shop/reviews http[1]"
    assert doc["route"]["timeout_s"] is None
    assert [(d["subset"], d["weight"], [e["pod"] for e in d["endpoints"]])
            for d in doc["destinations"]] == [("v1", 90, ["shop/reviews-v1"]),
                                              ("v2", 10, ["shop/reviews-v2"])]


def test_an_l7_deny_on_a_path() -> None:
    doc = explain(objects(), ask("reviews.shop:9080", path="/admin/x",
                                 headers={"end-user": "jason"}))
    policy = doc["destinations"][0]["endpoints"][0]["policy"]
    assert policy["allowed"] is False and policy["policy"] == "shop/no-admin"
    text = render(doc)
    assert "policy DENY by shop/no-admin" in text


def test_no_virtual_service_is_the_default_route_and_strict_mtls_refuses_plaintext() -> None:
    docs = [d for d in SETUP.split("---\n") if "kind: VirtualService" not in d]
    extra = ("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
             "metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n")
    objs = objects("---\n".join(docs), extra)
    doc = explain(objs, ask())
    assert doc["route"]["origin"] == "default"
    assert doc["route"]["retries"]["attempts"] == 2        # Istio's default retry policy
    [dest] = doc["destinations"]
    assert dest["cluster"]["name"] == "outbound|9080||reviews.shop.svc.cluster.local"
    assert {e["mtls_mode"] for e in dest["endpoints"]} == {"STRICT"}
    assert all(e["policy"]["allowed"] for e in dest["endpoints"])
    # the client opted out of the mesh: plaintext, refused by STRICT
    opted = objects("---\n".join(docs).replace("labels: {app: client}",
                                               "labels: {app: client, shoal.dev/mesh: disabled}"),
                    extra)
    doc = explain(opted, ask())
    assert all(e["policy"] == {"allowed": False, "policy": "",
                               "reason": "STRICT mTLS: plaintext refused"}
               for e in doc["destinations"][0]["endpoints"])
    assert any("not in the mesh" in n for n in doc["notes"])


def test_a_tcp_port_is_relayed_at_l4() -> None:
    doc = explain(objects(), ask("reviews:9090"))
    assert doc["destination"]["protocol"] == "TCP"
    assert doc["route"]["origin"] == "default"
    assert any("relays its connections at L4" in n for n in doc["notes"])
    assert [e["address"] for e in doc["destinations"][0]["endpoints"]] == [
        "10.244.1.2:9090", "10.244.2.3:9090"]


def test_a_subset_no_rule_defines_is_a_503() -> None:
    text = SETUP.replace("subset: v2}}]", "subset: v9}}]")
    doc = explain(objects(text), ask(headers={"end-user": "jason"}))
    [dest] = doc["destinations"]
    assert dest["cluster"] is None and "subset 'v9'" in dest["problem"]


def test_no_matching_route_is_a_404() -> None:
    text = SETUP.replace("  - route:\n"
                         "    - {destination: {host: reviews, subset: v1}, weight: 90}\n"
                         "    - {destination: {host: reviews, subset: v2}, weight: 10}\n", "")
    doc = explain(objects(text), ask())
    assert doc["destinations"] == []
    assert any("404 with response flag NR" in n for n in doc["notes"])


def test_render_names_the_route_cluster_and_endpoints() -> None:
    text = render(explain(objects(), ask(headers={"end-user": "jason"})))
    lines = text.splitlines()
    assert lines[0] == ("Request: GET / (authority reviews:9080) from pod shop/client "
                        "(10.244.1.9 on n1)")
    assert "Route: VirtualService shop/reviews http[0] (testers)" in lines
    assert "  timeout: 2s" in lines
    assert "  retries: 3 (per try timeout 0.5s; on 5xx)" in lines
    assert "  -> 100% reviews.shop.svc.cluster.local:9080 subset v2" in lines
    assert ("      cluster outbound|9080|v2|reviews.shop.svc.cluster.local "
            "(DestinationRule shop/reviews)") in lines
    assert ("      connection pool: max_connections 1, http1_max_pending_requests 1"
            in lines)
    assert any(line.startswith("      endpoint 10.244.2.3:8080 pod shop/reviews-v2 node n2: "
                               "mTLS PERMISSIVE (mutual_tls), policy ALLOW") for line in lines)


@pytest.mark.parametrize(("a", "message"), [
    (ask(target="reviews:x"), "the port must be a number"),
    (ask(target="reviews:70000"), "the port must be a number"),
    (ask(target="nothere"), 'no Service "nothere" in namespace "shop"'),
    (ask(target="reviews.shop.example.com"), "not a Service name"),
    (ask(target="reviews:1234"), "has no port 1234 (its ports: 9080, 9090)"),
    (ask(target="reviews"), "has ports 9080, 9090: give one as DST-HOST:PORT"),
    (Ask(pod="ghost", namespace="shop", target="reviews:9080"),
     'pod "ghost" not found in namespace "shop"'),
])
def test_bad_input_is_named(a: Ask, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        explain(objects(), a)


def test_headers_parse() -> None:
    assert parse_headers(["End-User=jason", "x-a: b"]) == {"end-user": "jason", "x-a": "b"}
    with pytest.raises(UsageError, match="expected NAME=VALUE"):
        parse_headers(["novalue"])
