"""The dashboard's service graph from meshagent metrics, and its pure views."""

from __future__ import annotations

import pytest

from apiserver.controllers.autoscalingmetrics import Scrape, rates_between
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli import dashboard, servicegraph

SRC = ('source_workload="client",source_workload_namespace="shop",'
       'destination_workload="web",destination_workload_namespace="shop",'
       'destination_service="web.shop.svc.cluster.local"')


def http_text(*, ok: float, failed: float, buckets: dict[str, float], tls: str = "mutual_tls",
              reporter: str = "destination") -> str:
    labels = f'reporter="{reporter}",{SRC},connection_security_policy="{tls}"'
    lines = ["# TYPE istio_requests_total counter",
             f'istio_requests_total{{{labels},response_code="200"}} {ok}',
             f'istio_requests_total{{{labels},response_code="503"}} {failed}',
             "# TYPE istio_request_duration_milliseconds histogram"]
    lines += [f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}} {n}'
              for le, n in buckets.items()]
    return "\n".join(lines) + "\n"


def test_http_edge_rate_errors_p99_and_mtls_between_two_scrapes() -> None:
    before = servicegraph.series(http_text(ok=0, failed=0, buckets={
        "5.0": 0, "10.0": 0, "+Inf": 0}))
    after = servicegraph.series(http_text(ok=90, failed=10, buckets={
        "5.0": 50, "10.0": 100, "+Inf": 100}))
    rates = rates_between(Scrape(0.0, before), Scrape(10.0, after))
    [edge] = servicegraph.edges(rates)
    assert (edge.source, edge.target, edge.protocol) == ("shop/client", "shop/web", "http")
    assert edge.rps == pytest.approx(10.0)
    assert edge.error_rate == pytest.approx(0.1)
    assert edge.p99_ms == pytest.approx(5 + 5 * (99 - 50) / 50)
    assert edge.mtls


def test_only_the_destination_reporter_counts_and_plaintext_is_not_mtls() -> None:
    source_side = servicegraph.series(
        http_text(ok=5, failed=0, buckets={"+Inf": 5}, reporter="source"))
    assert servicegraph.edges(source_side) == []
    [edge] = servicegraph.edges(servicegraph.series(
        http_text(ok=3, failed=0, buckets={"+Inf": 3}, tls="none")))
    assert edge.rps == 3 and not edge.mtls


def test_tcp_edges_from_the_l4_counters() -> None:
    labels = (f'reporter="destination",{SRC},connection_security_policy="mutual_tls",'
              'response_flags="-"')
    text = ("# TYPE istio_tcp_connections_opened_total counter\n"
            f"istio_tcp_connections_opened_total{{{labels}}} 4\n"
            "# TYPE istio_tcp_sent_bytes_total counter\n"
            f"istio_tcp_sent_bytes_total{{{labels}}} 4096\n")
    [edge] = servicegraph.edges(servicegraph.series(text))
    assert (edge.protocol, edge.rps, edge.bytes_per_second, edge.mtls) == ("tcp", 4, 4096, True)


@pytest.mark.parametrize(("buckets", "want"), [
    ({}, None),
    ({float("inf"): 0.0}, None),
    ({1.0: 10.0, float("inf"): 10.0}, 0.99),
    ({1.0: 0.0, 2.0: 100.0, float("inf"): 100.0}, 1.99),
    ({1.0: 0.0, float("inf"): 10.0}, 1.0),  # above the last finite bound: that bound
])
def test_quantile_as_histogram_quantile(buckets: dict[float, float],
                                        want: float | None) -> None:
    got = servicegraph.quantile(0.99, buckets)
    assert got == (pytest.approx(want) if want is not None else None)


def test_merge_sums_rates_and_is_mtls_only_when_every_moving_edge_is() -> None:
    def e(rps: float, mtls: bool, err: float = 0.0) -> servicegraph.Edge:
        return servicegraph.Edge(source="a/x", target="a/y", service="y.a", protocol="http",
                                 mtls=mtls, rps=rps, error_rate=err, p99_ms=3.0,
                                 bytes_per_second=0.0)
    [m] = servicegraph.merge([e(3, True, 0.5), e(1, True)])
    assert (m.rps, m.error_rate, m.mtls) == (4, pytest.approx(1.5 / 4), True)
    [m] = servicegraph.merge([e(3, True), e(1, False)])
    assert not m.mtls
    [m] = servicegraph.merge([e(3, True), e(0, False)])  # an idle plaintext series
    assert m.mtls


def pod(name: str, ns: str, **labels: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, ns
    p.metadata.labels.update(labels)
    return p


def test_config_view_finds_the_services_routes_and_policies_of_a_workload() -> None:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", "shop"
    svc.spec.selector["app"] = "web"
    vs = traffic_pb2.VirtualService()
    vs.metadata.name, vs.metadata.namespace = "web-routes", "shop"
    vs.spec.hosts.append("web")
    other_vs = traffic_pb2.VirtualService()
    other_vs.metadata.name, other_vs.metadata.namespace = "db", "shop"
    other_vs.spec.hosts.append("db.shop.svc.cluster.local")
    dr = traffic_pb2.DestinationRule()
    dr.metadata.name, dr.metadata.namespace = "web-dr", "other"
    dr.spec.host = "web.shop.svc.cluster.local"
    allow = security_pb2.AuthorizationPolicy()
    allow.metadata.name, allow.metadata.namespace = "allow-web", "shop"
    allow.spec.selector.match_labels["app"] = "web"
    ns_wide = security_pb2.AuthorizationPolicy()
    ns_wide.metadata.name, ns_wide.metadata.namespace = "all", "shop"
    not_web = security_pb2.AuthorizationPolicy()
    not_web.metadata.name, not_web.metadata.namespace = "db-only", "shop"
    not_web.spec.selector.match_labels["app"] = "db"
    objs = {"pods": [pod("web-1", "shop", app="web"), pod("db-1", "shop", app="db")],
            "services": [svc], "virtualservices": [vs, other_vs], "destinationrules": [dr],
            "authorizationpolicies": [allow, ns_wide, not_web]}
    view = dashboard.config_view(objs, namespace="shop", workload="web")
    assert view["pods"] == ["web-1"] and view["services"] == ["web"]
    assert [v["name"] for v in view["virtualServices"]] == ["web-routes"]
    assert [d["name"] for d in view["destinationRules"]] == ["web-dr"]
    assert sorted(a["name"] for a in view["authorizationPolicies"]) == [
        "all", "allow-web"]


def test_deployment_view_lists_its_replicasets_newest_revision_first() -> None:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace, d.metadata.uid = "web", "shop", "u1"
    d.spec.replicas = 3
    d.status.updated_replicas, d.status.ready_replicas = 2, 3

    def rs(name: str, rev: str, owner: str, ready: int) -> apps_pb2.ReplicaSet:
        r = apps_pb2.ReplicaSet()
        r.metadata.name = name
        r.metadata.annotations["deployment.kubernetes.io/revision"] = rev
        r.metadata.owner_references.add(uid=owner)
        r.status.ready_replicas = ready
        return r
    view = dashboard.deployment_view(d, [rs("web-a", "1", "u1", 1), rs("web-b", "2", "u1", 2),
                                         rs("other", "9", "u2", 1)])
    assert [(r["name"], r["ready"]) for r in view["replicasets"]] == [("web-b", 2), ("web-a", 1)]
    assert (view["replicas"], view["updated"], view["ready"]) == (3, 2, 3)


def test_reads_what_the_meshagents_telemetry_actually_exports() -> None:
    """The label names and series the graph reads are the meshagent's own."""
    from prometheus_client import CollectorRegistry, generate_latest

    from meshagent.l7.telemetry import RequestRecord, RequestTelemetry

    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry, access_log=False)
    for code, ms in ((200, 3.0), (200, 3.0), (200, 40.0), (503, 3.0)):
        for reporter in ("source", "destination"):
            telemetry.record(RequestRecord(
                reporter=reporter, source_workload="client", source_workload_namespace="shop",
                destination_workload="web", destination_workload_namespace="shop",
                destination_service="web.shop.svc.cluster.local", response_code=code,
                connection_security_policy="mutual_tls", duration_s=ms / 1000))
    [edge] = servicegraph.edges(servicegraph.series(generate_latest(registry).decode()))
    assert (edge.source, edge.target, edge.protocol, edge.mtls) == (
        "shop/client", "shop/web", "http", True)
    assert edge.rps == 4 and edge.error_rate == pytest.approx(0.25)
    assert edge.p99_ms is not None and 25 < edge.p99_ms <= 50


def test_reads_the_meshagents_l4_counters() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from meshagent.proxy import LABELS, Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    labels = dict.fromkeys(LABELS, "unknown") | {
        "reporter": "destination", "source_workload": "client",
        "source_workload_namespace": "shop", "destination_workload": "db",
        "destination_workload_namespace": "shop", "connection_security_policy": "none",
        "response_flags": "-"}
    metrics.opened.labels(**labels).inc(2)
    metrics.sent.labels(**labels).inc(100)
    metrics.received.labels(**labels).inc(300)
    [edge] = servicegraph.edges(servicegraph.series(generate_latest(registry).decode()))
    assert (edge.source, edge.target, edge.protocol, edge.mtls) == (
        "shop/client", "shop/db", "tcp", False)
    assert (edge.rps, edge.bytes_per_second) == (2, 400)
