"""Mesh L4 routing: the route table from Services/Endpoints, decisions, balancing (pure)."""

from __future__ import annotations

import pytest

from meshagent.routing import (
    LB_ANNOTATION,
    LEAST_CONNECTIONS,
    ROUND_ROBIN,
    Balancer,
    Route,
    build_routes,
    decide,
)
from shoal.api.core.v1 import core_pb2


def service(name: str, ip: str, *, ports: tuple[tuple[str, int, str], ...] = (("http", 80, "TCP"),),
            policy: str = "") -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, "default"
    s.spec.cluster_ip = ip
    if policy:
        s.metadata.annotations[LB_ANNOTATION] = policy
    for pname, port, proto in ports:
        s.spec.ports.add(name=pname, port=port, protocol=proto)
    return s


def endpoints(name: str, ready: list[str], not_ready: list[str] | None = None,
              ports: tuple[tuple[str, int], ...] = (("http", 8080),)) -> core_pb2.Endpoints:
    e = core_pb2.Endpoints()
    e.metadata.name, e.metadata.namespace = name, "default"
    sub = e.subsets.add()
    for ip in ready:
        sub.addresses.add(ip=ip)
    for ip in not_ready or []:
        sub.not_ready_addresses.add(ip=ip)
    for pname, port in ports:
        sub.ports.add(name=pname, port=port, protocol="TCP")
    return e


def test_routes_use_ready_endpoints_with_the_target_port() -> None:
    routes = build_routes([service("web", "10.96.0.10")],
                          {"default/web": endpoints("web", ["10.244.1.3", "10.244.2.4"],
                                                    not_ready=["10.244.1.9"])})
    assert routes == {("10.96.0.10", 80): Route(
        service="default/web", port_name="http",
        endpoints=(("10.244.1.3", 8080), ("10.244.2.4", 8080)), policy=ROUND_ROBIN)}


def test_ports_are_matched_by_name() -> None:
    svc = service("web", "10.96.0.10", ports=(("http", 80, "TCP"), ("admin", 9000, "TCP")))
    ep = endpoints("web", ["10.244.1.3"], ports=(("admin", 9901), ("http", 8080)))
    routes = build_routes([svc], {"default/web": ep})
    assert routes[("10.96.0.10", 80)].endpoints == (("10.244.1.3", 8080),)
    assert routes[("10.96.0.10", 9000)].endpoints == (("10.244.1.3", 9901),)


@pytest.mark.parametrize("svc", [
    service("headless", "None"),
    service("pending", ""),
    service("dns", "10.96.0.53", ports=(("dns", 53, "UDP"),)),
])
def test_no_route_for_headless_unallocated_or_udp(svc: core_pb2.Service) -> None:
    assert build_routes([svc], {}) == {}


@pytest.mark.parametrize(("annotation", "policy"), [
    ("", ROUND_ROBIN), (LEAST_CONNECTIONS, LEAST_CONNECTIONS), ("random", ROUND_ROBIN)])
def test_policy_from_annotation(annotation: str, policy: str) -> None:
    routes = build_routes([service("web", "10.96.0.10", policy=annotation)], {})
    assert routes[("10.96.0.10", 80)].policy == policy


ROUTE = Route(service="default/web", port_name="http",
              endpoints=(("10.244.1.3", 8080), ("10.244.2.4", 8080)))
EMPTY = Route(service="default/empty", port_name="http", endpoints=())
ROUTES = {("10.96.0.10", 80): ROUTE, ("10.96.0.11", 80): EMPTY}


@pytest.mark.parametrize(("dst", "kind"), [
    (("10.96.0.10", 80), "service"),
    (("10.96.0.11", 80), "refuse"),  # no ready endpoints
    (("10.96.0.10", 81), "refuse"),  # a ClusterIP, but not a service port
    (("10.244.2.4", 8080), "passthrough"),
    (("192.0.2.1", 443), "refuse"),
])
def test_decide(dst: tuple[str, int], kind: str) -> None:
    assert decide(ROUTES, dst, pod_cidr="10.244.0.0/16").kind == kind


def test_round_robin_alternates() -> None:
    b = Balancer()
    assert [b.pick(ROUTE)[0] for _ in range(4)] == ["10.244.1.3", "10.244.2.4"] * 2


def test_least_connections_prefers_the_idle_endpoint() -> None:
    route = Route(service="default/web", port_name="http", endpoints=ROUTE.endpoints,
                  policy=LEAST_CONNECTIONS)
    b = Balancer()
    first = b.pick(route)
    b.opened(first)
    b.opened(first)
    assert b.pick(route) != first
    assert b.pick(route) != first
    b.closed(first)
    b.closed(first)
    assert b.active == {}


def test_picking_from_no_endpoints_is_an_error() -> None:
    with pytest.raises(LookupError, match="default/empty"):
        Balancer().pick(EMPTY)
