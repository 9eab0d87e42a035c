"""DestinationRule at the client side: rule lookup, subsets, load balancing, pool limits and
outlier detection (pure, fake clock, seeded random source)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from google.protobuf import json_format

from meshagent.l7.upstream import (
    CONSISTENT_HASH,
    LEAST_REQUEST,
    RANDOM,
    ROUND_ROBIN,
    UNLIMITED,
    Cluster,
    Clusters,
    Endpoint,
    Overflow,
    find_rule,
    resolve_policy,
)
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb

HOST = "reviews.default.svc.cluster.local"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(name: str = "reviews", ns: str = "default",
            ports: tuple[tuple[str, int], ...] = (("http", 9080),)) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, ns
    s.spec.cluster_ip = "10.96.0.20"
    for pname, port in ports:
        s.spec.ports.add(name=pname, port=port, protocol="TCP")
    return s


def endpoints(pods: list[tuple[str, str, dict[str, str]]], *, name: str = "reviews",
              ns: str = "default", not_ready: tuple[str, ...] = (),
              ports: tuple[tuple[str, int], ...] = (("http", 9080),),
              labels_on_address: bool = True) -> core_pb2.Endpoints:
    """pods: (pod name, ip, labels)."""
    e = core_pb2.Endpoints()
    e.metadata.name, e.metadata.namespace = name, ns
    sub = e.subsets.add()
    for pod, ip, labels in pods:
        a = sub.addresses.add(ip=ip)
        a.target_ref.kind, a.target_ref.namespace, a.target_ref.name = "Pod", ns, pod
        if labels_on_address:
            a.labels.update(labels)
    for ip in not_ready:
        sub.not_ready_addresses.add(ip=ip)
    for pname, port in ports:
        sub.ports.add(name=pname, port=port, protocol="TCP")
    return e


def pod(name: str, labels: dict[str, str], ns: str = "default") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, ns
    p.metadata.labels.update(labels)
    return p


def rule(spec: dict[str, Any], *, name: str = "reviews", ns: str = "default",
         created: int = 0) -> pb.DestinationRule:
    dr = json_format.ParseDict({"spec": spec}, pb.DestinationRule())
    dr.metadata.name, dr.metadata.namespace = name, ns
    dr.metadata.creation_timestamp.seconds = created
    return dr


THREE = [("reviews-v1", "10.244.1.1", {"app": "reviews", "version": "v1"}),
         ("reviews-v2", "10.244.1.2", {"app": "reviews", "version": "v2"}),
         ("reviews-v3", "10.244.2.3", {"app": "reviews", "version": "v3"})]
SUBSETS = [{"name": "v1", "labels": {"version": "v1"}},
           {"name": "v2", "labels": {"version": "v2"}},
           {"name": "v3", "labels": {"version": "v3"}}]


def build(spec: dict[str, Any] | None, pods: list[tuple[str, str, dict[str, str]]] = THREE, *,
          clock: FakeClock | None = None, seed: int = 7) -> Clusters:
    cs = Clusters(clock=clock or FakeClock(), rng=random.Random(seed))
    cs.update(services=[service()], endpoints=[endpoints(pods)], pods=[],
              destination_rules=[rule(spec)] if spec is not None else [])
    return cs


def cluster(cs: Clusters, subset: str = "", port: int = 9080) -> Cluster:
    c = cs.get(HOST, port, subset)
    assert c is not None
    return c


def addrs(eps: Any) -> list[str]:
    return [e.ip for e in eps]


# --------------------------------------------------------------------------- rule lookup


@pytest.mark.parametrize(("rules", "want"), [
    ([], None),
    ([("a", "default", "reviews")], "default/a"),                     # short name, same ns
    ([("a", "other", "reviews")], None),                              # short name elsewhere
    ([("a", "other", HOST)], None),                                   # other ns: not looked at
    ([("a", "istio-system", HOST)], "istio-system/a"),                # the root namespace
    ([("a", "istio-system", HOST), ("b", "default", "reviews")], "default/b"),  # own ns first
    ([("a", "default", "*.default.svc.cluster.local"), ("b", "default", HOST)], "default/b"),
    ([("a", "default", "*.svc.cluster.local"),
      ("b", "default", "*.default.svc.cluster.local")], "default/b"),  # longest wildcard
    ([("a", "default", "*")], "default/a"),
    ([("a", "default", "ratings")], None),
])
def test_rule_lookup(rules: list[tuple[str, str, str]], want: str | None) -> None:
    objs = [rule({"host": host, "exportTo": ["."]}, name=n, ns=ns) for n, ns, host in rules]
    got = find_rule(objs, host=HOST, namespace="default")
    assert (f"{got.metadata.namespace}/{got.metadata.name}" if got else None) == want


def test_of_two_equal_rules_the_oldest_applies() -> None:
    old = rule({"host": "reviews"}, name="zz", created=10)
    new = rule({"host": "reviews"}, name="aa", created=20)
    got = find_rule([new, old], host=HOST, namespace="default")
    assert got is not None and got.metadata.name == "zz"


# --------------------------------------------------------------------------- subsets


def test_clusters_per_subset_with_istio_names_and_ready_endpoints_only() -> None:
    cs = Clusters(clock=FakeClock())
    cs.update(services=[service()], endpoints=[endpoints(THREE, not_ready=("10.244.9.9",))],
              destination_rules=[rule({"host": "reviews", "subsets": SUBSETS})])
    assert [c.name for c in cs.all()] == [
        f"outbound|9080||{HOST}", f"outbound|9080|v1|{HOST}", f"outbound|9080|v2|{HOST}",
        f"outbound|9080|v3|{HOST}"]
    assert addrs(cluster(cs).endpoints) == ["10.244.1.1", "10.244.1.2", "10.244.2.3"]
    assert addrs(cluster(cs, "v2").endpoints) == ["10.244.1.2"]
    assert cluster(cs, "v2").endpoints[0] == Endpoint(
        ip="10.244.1.2", port=9080, pod="default/reviews-v2",
        labels=(("app", "reviews"), ("version", "v2")))
    assert cs.get(HOST, 9080, "v9") is None
    assert cs.get(HOST, 80) is None


def test_subset_labels_come_from_the_target_pods_when_the_address_has_none() -> None:
    cs = Clusters(clock=FakeClock())
    cs.update(services=[service()], endpoints={"default/reviews": endpoints(
        THREE, labels_on_address=False)},
        pods={f"default/{n}": pod(n, labels) for n, _, labels in THREE},
        destination_rules=[rule({"host": "reviews", "subsets": SUBSETS})])
    assert addrs(cluster(cs, "v3").endpoints) == ["10.244.2.3"]


def test_endpoint_port_is_the_one_named_like_the_service_port() -> None:
    cs = Clusters(clock=FakeClock())
    cs.update(services=[service(ports=(("http", 80), ("grpc-api", 81)))],
              endpoints=[endpoints(THREE[:1], ports=(("grpc-api", 9090), ("http", 8080)))])
    assert [e.port for e in cluster(cs, port=80).endpoints] == [8080]
    assert [e.port for e in cluster(cs, port=81).endpoints] == [9090]


# --------------------------------------------------------------------------- policy merge


def test_defaults_are_istios() -> None:
    policy = cluster(build(None)).policy
    assert policy.load_balancer.policy == LEAST_REQUEST
    assert (policy.pool.max_connections, policy.pool.max_pending, policy.pool.max_requests) == (
        UNLIMITED, UNLIMITED, UNLIMITED)
    assert policy.outlier is None
    od = resolve_policy(rule({"host": "reviews", "trafficPolicy": {"outlierDetection": {}}}),
                        port=9080, subset="").outlier
    assert od is not None
    assert (od.consecutive_5xx_errors, od.consecutive_gateway_errors, od.interval,
            od.base_ejection_time, od.max_ejection_percent, od.min_health_percent) == (
        5, 0, 10.0, 30.0, 10, 0)


MERGE = {"host": "reviews",
         "trafficPolicy": {
             "loadBalancer": {"simple": "ROUND_ROBIN"},
             "connectionPool": {"tcp": {"maxConnections": 10}},
             "portLevelSettings": [{"port": {"number": 9080},
                                    "loadBalancer": {"simple": "RANDOM"}}]},
         "subsets": [{"name": "v1", "labels": {"version": "v1"},
                      "trafficPolicy": {"connectionPool": {"http": {
                          "http1MaxPendingRequests": 2}}}},
                     {"name": "v2", "labels": {"version": "v2"},
                      "trafficPolicy": {"loadBalancer": {"consistentHash": {
                          "httpHeaderName": "X-User"}}}}]}


@pytest.mark.parametrize(("port", "subset", "lb", "max_conn", "max_pending"), [
    (9080, "", RANDOM, 10, UNLIMITED),          # port level overrides the rule's lb
    (8000, "", ROUND_ROBIN, 10, UNLIMITED),     # another port: the rule's
    (9080, "v1", RANDOM, UNLIMITED, 2),         # the subset's pool replaces the rule's
    (9080, "v2", CONSISTENT_HASH, 10, UNLIMITED),
])
def test_port_level_and_subset_policies_override_field_by_field(
        port: int, subset: str, lb: str, max_conn: int, max_pending: int) -> None:
    policy = resolve_policy(rule(MERGE), port=port, subset=subset)
    assert policy.load_balancer.policy == lb
    assert (policy.pool.max_connections, policy.pool.max_pending) == (max_conn, max_pending)
    assert policy.rule == "default/reviews"


# --------------------------------------------------------------------------- load balancing


def lb(spec: dict[str, Any], pods: list[tuple[str, str, dict[str, str]]] = THREE,
       **kw: Any) -> Cluster:
    return cluster(build({"host": "reviews", "trafficPolicy": {"loadBalancer": spec}}, pods,
                         **kw))


def picks(c: Cluster, n: int, **kw: Any) -> list[str]:
    out = []
    for _ in range(n):
        ep = c.pick(headers=kw.get("headers", {}), source_ip=kw.get("source_ip", "10.0.0.1"),
                    exclude=kw.get("exclude", ()))
        assert ep is not None
        out.append(ep.ip)
    return out


def test_round_robin_takes_each_in_turn() -> None:
    assert picks(lb({"simple": "ROUND_ROBIN"}), 6) == ["10.244.1.1", "10.244.1.2",
                                                       "10.244.2.3"] * 2


def test_random_reaches_every_endpoint_evenly() -> None:
    counts = Counter(picks(lb({"simple": "RANDOM"}), 3000))
    assert set(counts) == {"10.244.1.1", "10.244.1.2", "10.244.2.3"}
    assert all(800 < n < 1200 for n in counts.values())


def test_least_request_prefers_the_less_busy_endpoint_by_two_choices() -> None:
    c = lb({"simple": "LEAST_REQUEST"}, THREE[:2])
    busy = c.endpoints[0]
    c.started(busy)
    counts = Counter(picks(c, 2000))
    # the busy one wins only when both draws hit it: about a quarter of the time
    assert 350 < counts[busy.ip] < 650
    c.finished(busy)
    assert 800 < Counter(picks(c, 2000))[busy.ip] < 1200


def test_exclude_skips_tried_endpoints_unless_none_is_left() -> None:
    c = lb({"simple": "ROUND_ROBIN"})
    first = c.endpoints[0]
    assert first.ip not in picks(c, 6, exclude=[first])
    only = lb({"simple": "ROUND_ROBIN"}, THREE[:1])
    assert picks(only, 1, exclude=[Endpoint(ip="10.244.1.1", port=9080)]) == ["10.244.1.1"]


def test_consistent_hash_by_header_is_stable_and_spreads_keys() -> None:
    c = lb({"consistentHash": {"httpHeaderName": "x-user"}})
    users = [f"user-{i}" for i in range(300)]
    first = {u: picks(c, 1, headers={"x-user": u})[0] for u in users}
    again = {u: picks(c, 1, headers={"x-user": u})[0] for u in users}
    assert first == again
    assert all(60 < n < 140 for n in Counter(first.values()).values())
    # no key: served at random, like Envoy's ring without a hash
    assert len(set(picks(c, 60))) == 3


def test_consistent_hash_moves_only_the_keys_of_a_removed_endpoint() -> None:
    cs = build({"host": "reviews", "trafficPolicy": {"loadBalancer": {"consistentHash": {
        "httpHeaderName": "x-user"}}}})
    users = [f"user-{i}" for i in range(300)]
    before = {u: picks(cluster(cs), 1, headers={"x-user": u})[0] for u in users}
    cs.update(services=[service()], endpoints=[endpoints(THREE[:2])],
              destination_rules=[rule({"host": "reviews", "trafficPolicy": {"loadBalancer": {
                  "consistentHash": {"httpHeaderName": "x-user"}}}})])
    after = {u: picks(cluster(cs), 1, headers={"x-user": u})[0] for u in users}
    moved = {u for u in users if before[u] != after[u]}
    assert moved == {u for u in users if before[u] == "10.244.2.3"}


def test_consistent_hash_by_source_ip() -> None:
    c = lb({"consistentHash": {"useSourceIp": True}})
    by_ip = {ip: set(picks(c, 5, source_ip=ip)) for ip in (f"10.244.0.{i}" for i in range(40))}
    assert all(len(s) == 1 for s in by_ip.values())
    assert len(set().union(*by_ip.values())) == 3


def test_consistent_hash_by_cookie_and_the_generated_cookie() -> None:
    c = lb({"consistentHash": {"httpCookie": {"name": "session", "ttl": "60s", "path": "/"}}})
    assert c.new_cookie({"cookie": "session=abc"}) is None
    one = picks(c, 5, headers={"cookie": "a=b; session=abc"})
    assert len(set(one)) == 1
    made = c.new_cookie({"cookie": "a=b"})
    assert made is not None and made.name == "session"
    assert made.set_cookie == f'session="{made.value}"; Path=/; Max-Age=60; HttpOnly'
    # the client sends it back: always the same endpoint
    again = picks(c, 5, headers={"cookie": f"session={made.value}"})
    assert len(set(again)) == 1


def test_consistent_hash_by_query_parameter() -> None:
    c = lb({"consistentHash": {"httpQueryParameterName": "u"}})
    got = {c.pick(headers={}, source_ip="", path=f"/p?u={i}").ip  # type: ignore[union-attr]
           for i in range(40) for _ in range(3)}
    assert got == {"10.244.1.1", "10.244.1.2", "10.244.2.3"}
    for i in range(20):
        assert len({c.pick(headers={}, source_ip="x", path=f"/p?u={i}&z=1")
                    for _ in range(5)}) == 1


# --------------------------------------------------------------------------- connection pool


def pool(limits: dict[str, Any]) -> Cluster:
    return cluster(build({"host": "reviews", "trafficPolicy": {"connectionPool": limits}}))


async def test_pool_admits_max_connections_queues_pending_and_overflows_the_rest() -> None:
    c = pool({"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}})
    first = await c.acquire()
    waiting = asyncio.ensure_future(c.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    with pytest.raises(Overflow) as err:
        await c.acquire()
    assert err.value.flag == "UO"
    assert c.describe()["connection_pool"] | {} == {
        "max_connections": 1, "http1_max_pending_requests": 1, "http2_max_requests": None,
        "active_requests": 1, "pending_requests": 1}
    first.release()
    first.release()                          # idempotent
    second = await asyncio.wait_for(waiting, 1)
    assert c.describe()["connection_pool"]["active_requests"] == 1
    second.release()
    assert c.describe()["connection_pool"]["active_requests"] == 0


async def test_http2_max_requests_overflows_at_once_without_queueing() -> None:
    c = pool({"http": {"http2MaxRequests": 2}})
    tickets = [await c.acquire(), await c.acquire()]
    with pytest.raises(Overflow):
        await c.acquire()
    tickets[0].release()
    (await c.acquire()).release()


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    c = pool({"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}})
    first = await c.acquire()
    waiting = asyncio.ensure_future(c.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queued = asyncio.ensure_future(c.acquire())     # the queue has room again
    await asyncio.sleep(0)
    first.release()
    (await asyncio.wait_for(queued, 1)).release()
    assert c.describe()["connection_pool"]["active_requests"] == 0


def test_no_limits_by_default() -> None:
    async def many() -> None:
        c = cluster(build(None))
        tickets = [await c.acquire() for _ in range(500)]
        for t in tickets:
            t.release()
    asyncio.run(many())


# --------------------------------------------------------------------------- outlier detection


def outlier(od: dict[str, Any], *, clock: FakeClock, pods: list[Any] = THREE,
            lb_spec: dict[str, Any] | None = None) -> Clusters:
    tp: dict[str, Any] = {"outlierDetection": od,
                          "loadBalancer": lb_spec or {"simple": "ROUND_ROBIN"}}
    return build({"host": "reviews", "trafficPolicy": tp}, pods, clock=clock)


def healthy(c: Cluster) -> set[str]:
    return set(picks(c, 12))


OD = {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "30s",
      "maxEjectionPercent": 100}


def test_consecutive_5xx_ejects_then_the_endpoint_comes_back_after_its_ejection_time() -> None:
    clock = FakeClock()
    c = cluster(outlier(OD, clock=clock))
    bad = c.endpoints[0]
    for _ in range(2):
        c.report(bad, status=500)
    assert bad.ip in healthy(c)
    c.report(bad, status=500)
    assert healthy(c) == {"10.244.1.2", "10.244.2.3"}
    assert c.describe()["endpoints"][0] | {} == {
        "address": "10.244.1.1:9080", "pod": "default/reviews-v1",
        "labels": {"app": "reviews", "version": "v1"}, "active_requests": 0,
        "ejected": True, "ejections": 1, "ejected_for_s": 30.0}
    clock.now += 29.5
    assert bad.ip not in healthy(c)
    clock.now += 1.0                          # the first interval tick after 30 s
    assert bad.ip in healthy(c)
    # ejected again soon: twice the base ejection time
    for _ in range(3):
        c.report(bad, status=503)
    clock.now += 45
    assert bad.ip not in healthy(c)
    clock.now += 16
    assert bad.ip in healthy(c)


def test_a_success_resets_the_count_and_4xx_is_a_success() -> None:
    clock = FakeClock()
    c = cluster(outlier(OD, clock=clock))
    bad = c.endpoints[0]
    for status in (500, 500, 200, 500, 500, 404, 500, 500):
        c.report(bad, status=status)
    assert bad.ip in healthy(c)


@pytest.mark.parametrize(("od", "statuses", "ejected"), [
    ({"consecutiveGatewayErrors": 2, "consecutive5xxErrors": 0}, [502, None], True),
    ({"consecutiveGatewayErrors": 2, "consecutive5xxErrors": 0}, [502, 500, 503], False),
    ({"consecutiveGatewayErrors": 2, "consecutive5xxErrors": 0}, [500, 500, 500, 500], False),
    ({"consecutive5xxErrors": 2}, [None, 500], True),      # a connect failure is a 5xx too
    ({"consecutiveErrors": 2, "consecutive5xxErrors": 0}, [504, 504], True),  # deprecated
    ({}, [500] * 4, False),                                # default 5
    ({}, [500] * 5, True),
])
def test_which_errors_count(od: dict[str, Any], statuses: list[int | None],
                            ejected: bool) -> None:
    c = cluster(outlier({**od, "maxEjectionPercent": 100}, clock=FakeClock()))
    for s in statuses:
        c.report(c.endpoints[0], status=s)
    assert (c.endpoints[0] in c.ejected()) is ejected


def test_max_ejection_percent_keeps_endpoints_in() -> None:
    c = cluster(outlier({**OD, "maxEjectionPercent": 40}, clock=FakeClock()))
    for ep in c.endpoints:
        for _ in range(3):
            c.report(ep, status=500)
    assert addrs(c.ejected()) == ["10.244.1.1"]       # a second one would be 66% > 40%
    # Istio's default 10% ejects nothing out of three
    c = cluster(outlier({"consecutive5xxErrors": 1}, clock=FakeClock()))
    c.report(c.endpoints[0], status=500)
    assert c.ejected() == ()


def test_all_ejected_means_no_healthy_upstream_unless_min_health_percent_panics() -> None:
    c = cluster(outlier({**OD, "consecutive5xxErrors": 1}, clock=FakeClock(), pods=THREE[:1]))
    c.report(c.endpoints[0], status=500)
    assert c.pick(headers={}, source_ip="") is None
    c = cluster(outlier({**OD, "consecutive5xxErrors": 1, "minHealthPercent": 50},
                        clock=FakeClock(), pods=THREE[:2]))
    c.report(c.endpoints[0], status=500)
    assert healthy(c) == {"10.244.1.2"}                 # 50% healthy: not below 50%
    c.report(c.endpoints[1], status=500)
    assert c.ejected() == c.endpoints
    assert healthy(c) == {"10.244.1.1", "10.244.1.2"}   # 0% < 50%: panic, all of them


def test_ejection_state_survives_update_for_endpoints_that_remain() -> None:
    clock = FakeClock()
    spec = {"host": "reviews", "trafficPolicy": {"outlierDetection": OD}}
    cs = Clusters(clock=clock, rng=random.Random(1))
    cs.update(services=[service()], endpoints=[endpoints(THREE)],
              destination_rules=[rule(spec)])
    c = cluster(cs)
    for _ in range(3):
        c.report(c.endpoints[0], status=500)
    c.report(c.endpoints[1], status=500)
    cs.update(services=[service()], endpoints=[endpoints(THREE[:2])],
              destination_rules=[rule(spec)])
    again = cluster(cs)
    assert again is c
    assert addrs(again.endpoints) == ["10.244.1.1", "10.244.1.2"]
    assert addrs(again.ejected()) == ["10.244.1.1"]
    for _ in range(2):
        again.report(again.endpoints[1], status=500)     # the count carried over: 3rd
    assert addrs(again.ejected()) == ["10.244.1.1", "10.244.1.2"]


def test_describe_without_a_rule() -> None:
    d = cluster(build(None)).describe()
    assert d["destination_rule"] is None and d["outlier_detection"] is None
    assert d["load_balancer"] == {"policy": LEAST_REQUEST}
    assert [e["address"] for e in d["endpoints"]] == [
        "10.244.1.1:9080", "10.244.1.2:9080", "10.244.2.3:9080"]


def workload_entry(name: str, ip: str, labels: dict[str, str], *, ns: str = "default",
                   ports: dict[str, int] | None = None) -> pb.WorkloadEntry:
    we = pb.WorkloadEntry()
    we.metadata.name, we.metadata.namespace = name, ns
    we.spec.address = ip
    we.spec.labels.update(labels)
    we.spec.ports.update(ports or {})
    return we


def selecting(svc: core_pb2.Service, target: int | str | None = None) -> core_pb2.Service:
    svc.spec.selector.update({"app": "reviews"})
    if isinstance(target, int):
        svc.spec.ports[0].target_port.int_val = target
    elif isinstance(target, str):
        svc.spec.ports[0].target_port.str_val = target
    return svc


@pytest.mark.parametrize(("target", "entry_ports", "want"), [
    ("web", {"web": 8081, "http": 8082}, 8081),  # the targetPort's name in the entry's ports
    ("web", {"http": 8082}, 8082),                # else the Service port's name
    (9090, {}, 9090),                             # else the numeric targetPort
    (None, {}, 9080),                             # else the Service port
])
def test_workload_entry_port(target: int | str | None, entry_ports: dict[str, int],
                             want: int) -> None:
    cs = Clusters()
    cs.update(services=[selecting(service(), target)], endpoints=[],
              workload_entries=[workload_entry("vm1", "192.168.50.2", {"app": "reviews"},
                                               ports=entry_ports)])
    c = cs.get(HOST, 9080)
    assert c is not None
    assert [(e.ip, e.port, e.pod) for e in c.endpoints] == [("192.168.50.2", want,
                                                             "default/vm1")]


def test_selected_workload_entries_join_the_pods_with_their_labels_for_subsets() -> None:
    rule = pb.DestinationRule()
    rule.metadata.name, rule.metadata.namespace = "reviews", "default"
    rule.spec.host = "reviews"
    rule.spec.subsets.add(name="v1", labels={"version": "v1"})
    rule.spec.subsets.add(name="vm", labels={"version": "vm"})
    entries = [
        workload_entry("vm1", "192.168.50.2", {"app": "reviews", "version": "vm"}),
        workload_entry("other-app", "192.168.50.3", {"app": "ratings", "version": "vm"}),
        workload_entry("other-ns", "192.168.50.4", {"app": "reviews", "version": "vm"},
                       ns="prod"),
        workload_entry("no-address", "", {"app": "reviews", "version": "vm"}),
    ]
    cs = Clusters()
    cs.update(services=[selecting(service())],
              endpoints=[endpoints([("r1", "10.244.1.5", {"version": "v1"})])],
              destination_rules=[rule], workload_entries=entries)

    def ips(subset: str) -> list[str]:
        c = cs.get(HOST, 9080, subset)
        assert c is not None
        return [e.ip for e in c.endpoints]
    assert ips("") == ["10.244.1.5", "192.168.50.2"]
    assert ips("vm") == ["192.168.50.2"]
    assert ips("v1") == ["10.244.1.5"]
    # A Service without a selector selects no entry.
    cs.update(services=[service()], endpoints=[], workload_entries=entries)
    c = cs.get(HOST, 9080)
    assert c is not None and c.endpoints == ()


def service_entry(resolution: str, *, hosts: tuple[str, ...] = ("api.example.com",),
                  addresses: tuple[str, ...] = (), protocol: str = "HTTP",
                  endpoints: tuple[tuple[str, dict[str, int], dict[str, str]], ...] = (),
                  selector: dict[str, str] | None = None) -> pb.ServiceEntry:
    se = pb.ServiceEntry()
    se.metadata.name, se.metadata.namespace = "api", "default"
    se.spec.hosts.extend(hosts)
    se.spec.addresses.extend(addresses)
    se.spec.resolution = resolution
    se.spec.ports.add(number=80, name="http", protocol=protocol)
    se.spec.ports.add(number=5432, name="tcp-db", protocol="TCP")
    for address, ports, labels in endpoints:
        ep = se.spec.endpoints.add(address=address)
        ep.ports.update(ports)
        ep.labels.update(labels)
    if selector:
        se.spec.workload_selector.labels.update(selector)
    return se


EXT = "api.example.com"


@pytest.mark.parametrize(("se", "resolved", "want"), [
    (service_entry("STATIC", endpoints=(("203.0.113.7", {"http": 8080}, {}),
                                        ("203.0.113.8", {}, {}), ("db.example.com", {}, {}))),
     {}, [("203.0.113.7", 8080), ("203.0.113.8", 80)]),
    (service_entry("DNS"), {EXT: ("198.51.100.1", "198.51.100.2")},
     [("198.51.100.1", 80), ("198.51.100.2", 80)]),
    (service_entry("DNS", endpoints=(("eu.example.com", {}, {}), ("203.0.113.9", {}, {}))),
     {"eu.example.com": ("198.51.100.3",), EXT: ("198.51.100.1",)},
     [("198.51.100.3", 80), ("203.0.113.9", 80)]),
    (service_entry("DNS"), {}, []),  # not resolved (yet): no endpoint, 503 UH
    (service_entry("NONE", addresses=("192.0.2.10", "192.0.2.0/24")), {},
     [("192.0.2.10", 80)]),  # the original destination; a CIDR is no endpoint
])
def test_service_entry_http_ports_get_clusters_by_resolution(
        se: pb.ServiceEntry, resolved: dict[str, tuple[str, ...]],
        want: list[tuple[str, int]]) -> None:
    cs = Clusters()
    cs.update(services=[], endpoints=[], service_entries=[se], resolved=resolved)
    c = cs.get(EXT, 80)
    assert c is not None and c.name == f"outbound|80||{EXT}"
    assert [(e.ip, e.port) for e in c.endpoints] == want
    assert cs.get(EXT, 5432) is None  # a TCP port stays L4


def test_service_entry_clusters_take_their_destination_rule_and_subsets() -> None:
    rule = pb.DestinationRule()
    rule.metadata.name, rule.metadata.namespace = "api", "default"
    json_format.ParseDict({"host": EXT, "trafficPolicy": {"loadBalancer": {"simple":
                           "ROUND_ROBIN"}}, "subsets": [{"name": "eu", "labels":
                                                         {"region": "eu"}}]}, rule.spec)
    se = service_entry("STATIC", endpoints=(("203.0.113.7", {}, {"region": "eu"}),
                                            ("203.0.113.8", {}, {"region": "us"})),
                       selector={"app": "api"})
    vm = workload_entry("vm", "192.168.50.9", {"app": "api", "region": "eu"},
                        ports={"http": 8000})
    cs = Clusters()
    cs.update(services=[], endpoints=[], service_entries=[se], destination_rules=[rule],
              workload_entries=[vm])
    c = cs.get(EXT, 80)
    assert c is not None and c.policy.load_balancer.policy == ROUND_ROBIN
    assert c.policy.rule == "default/api"
    eu = cs.get(EXT, 80, "eu")
    assert eu is not None
    assert [(e.ip, e.port) for e in eu.endpoints] == [("192.168.50.9", 8000),
                                                      ("203.0.113.7", 80)]
