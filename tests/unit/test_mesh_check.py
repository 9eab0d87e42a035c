"""``shoal mesh check``'s analysis: objects in, istioctl-analyze-like findings out (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli.meshcheck import MeshObjects, analyze, report, service_key
from shoal.kinds import builtin_kinds
from shoal.manifests import decode


def obj(kind: str, name: str, spec: dict[str, Any], *, ns: str = "shop",
        labels: dict[str, str] | None = None) -> Any:
    group = "v1" if kind in ("Service", "Pod") else "networking.istio.io/v1"
    _, msg = decode({"apiVersion": group, "kind": kind,
                     "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                     "spec": spec}, builtin_kinds())
    return msg


def svc(name: str, *ports: dict[str, Any], ns: str = "shop") -> core_pb2.Service:
    spec = {"selector": {"app": name},
            "ports": list(ports) or [{"name": "http", "port": 80}]}
    result: core_pb2.Service = obj("Service", name, spec, ns=ns)
    return result


def pod(name: str, **labels: str) -> core_pb2.Pod:
    result: core_pb2.Pod = obj("Pod", name, {"containers": [{"name": "c", "image": "i"}]},
                               labels=labels)
    return result


def vs(name: str, *dests: tuple[str, str]) -> traffic_pb2.VirtualService:
    route = [{"destination": {"host": h, **({"subset": s} if s else {})},
              "weight": 100 // len(dests)} for h, s in dests]
    result: traffic_pb2.VirtualService = obj("VirtualService", name, {
        "hosts": [dests[0][0]], "http": [{"route": route}]})
    return result


def dr(host: str, **subsets: dict[str, str]) -> traffic_pb2.DestinationRule:
    result: traffic_pb2.DestinationRule = obj("DestinationRule", host, {
        "host": host, "subsets": [{"name": n, "labels": lab} for n, lab in subsets.items()]})
    return result


def codes(objects: MeshObjects, namespaces: frozenset[str] | None = None) -> list[tuple[str,
                                                                                       str]]:
    return [(f.code, f"{f.kind} {f.namespace}/{f.name}") for f in analyze(objects,
                                                                          namespaces=namespaces)]


@pytest.mark.parametrize(("host", "key"), [
    ("reviews", ("shop", "reviews")),
    ("reviews.prod.svc.cluster.local", ("prod", "reviews")),
    ("reviews.prod.svc", ("prod", "reviews")),
    ("reviews.prod", None),  # Istio does not expand names with dots
    ("httpbin.org", None),
    ("*.example.com", None),
])
def test_service_key(host: str, key: tuple[str, str] | None) -> None:
    assert service_key(host, "shop") == key


def test_a_clean_canary_has_no_findings() -> None:
    objects = MeshObjects(
        services=[svc("reviews")],
        pods=[pod("r1", app="reviews", version="v1"), pod("r2", app="reviews", version="v2")],
        virtual_services=[vs("reviews", ("reviews", "v1"), ("reviews", "v2"))],
        destination_rules=[dr("reviews", v1={"version": "v1"}, v2={"version": "v2"})])
    assert analyze(objects, namespaces=None) == []
    assert report([], scope="namespace: shop", output="") == \
        "\u2714 No validation issues found when analyzing namespace: shop.\n"


@pytest.mark.parametrize(("port", "found"), [
    ({"name": "http-web", "port": 80}, False),
    ({"name": "grpc", "port": 80}, False),
    ({"name": "tcp-db", "port": 80}, False),
    ({"name": "web", "port": 80, "appProtocol": "http"}, False),
    ({"name": "dns", "port": 53, "protocol": "UDP"}, False),
    ({"port": 80}, True),
    ({"name": "web", "port": 80}, True),
    ({"name": "http-web", "port": 80, "appProtocol": "custom"}, True),
])
def test_ambiguous_port_protocols(port: dict[str, Any], found: bool) -> None:
    findings = analyze(MeshObjects(services=[svc("web", port)]), namespaces=None)
    assert [f.code for f in findings] == (["IST0118"] if found else [])
    if found:
        assert findings[0].line().startswith("Warning [IST0118] (Service shop/web) Port 80 ")


def test_routes_to_unknown_hosts_and_subsets() -> None:
    se = obj("ServiceEntry", "ext", {"hosts": ["*.example.com"]})
    objects = MeshObjects(
        services=[svc("reviews")], service_entries=[se],
        pods=[pod("r1", app="reviews", version="v1")],
        virtual_services=[vs("typo", ("reviewz", "")),
                          vs("nosubset", ("reviews", "v1"), ("reviews", "v9")),
                          vs("external", ("api.example.com", ""))],
        destination_rules=[dr("reviews", v1={"version": "v1"})])
    findings = analyze(objects, namespaces=None)
    assert [(f.code, f.name) for f in findings] == [("IST0101", "nosubset"),
                                                    ("IST0101", "typo")]
    assert "'reviews' subset 'v9' (spec.http[0].route[1])" in findings[0].message
    assert "Referenced host not found: 'reviewz'" in findings[1].message


def test_subsets_selecting_no_pod() -> None:
    objects = MeshObjects(
        services=[svc("reviews")],
        pods=[pod("r1", app="reviews", version="v1"), pod("x", app="other", version="v2")],
        destination_rules=[dr("reviews", v1={"version": "v1"}, v2={"version": "v2"})])
    findings = analyze(objects, namespaces=None)
    assert [(f.code, f.kind, f.name) for f in findings] == [
        ("SHL0001", "DestinationRule", "reviews")]
    assert "Subset 'v2' (version=v2) selects no pod of Service shop/reviews" in \
        findings[0].message


def test_only_the_namespaces_asked_about_are_reported() -> None:
    objects = MeshObjects(services=[svc("a", {"port": 80}), svc("b", {"port": 80}, ns="other")])
    assert codes(objects) == [("IST0118", "Service other/b"), ("IST0118", "Service shop/a")]
    assert codes(objects, frozenset({"shop"})) == [("IST0118", "Service shop/a")]


def test_gateways_referenced_and_selecting_pods() -> None:
    gw = obj("Gateway", "ingress", {"selector": {"istio": "ingressgateway"}, "servers": [
        {"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"]}]}, ns="edge")
    lonely = obj("Gateway", "lonely", {"selector": {"istio": "nobody"}, "servers": [
        {"port": {"number": 80, "protocol": "HTTP"}, "hosts": ["*"]}]}, ns="edge")
    bound = obj("VirtualService", "web", {"hosts": ["*"], "gateways": [
        "edge/ingress", "missing", "mesh"], "http": [{"route": [
            {"destination": {"host": "web"}}]}]})
    objects = MeshObjects(services=[svc("web")], gateways=[gw, lonely],
                          pods=[pod("gw-1", istio="ingressgateway")],
                          virtual_services=[bound])
    findings = analyze(objects, namespaces=None)
    assert [f.line() for f in findings] == [
        "Warning [IST0101] (Gateway edge/lonely) Referenced selector not found: "
        "'istio=nobody' (no pod runs this gateway)",
        "Warning [IST0101] (VirtualService shop/web) Referenced gateway not found: 'missing'",
    ]
