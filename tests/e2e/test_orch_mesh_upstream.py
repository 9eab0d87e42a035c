"""DestinationRule resilience through the L7 mesh on the lab (``shoal lab up --mesh``):
outlier detection and connection-pool limits, enforced by the client pod's agent.

Runs with ``SHOAL_E2E_MESH=1`` (scripts/test.sh's mesh pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_mesh_upstream.py``.

Namespace ``mesh-upstream``:

    node-1: client (sleep)                       sends from its network namespace
    node-2: good (app, answers 200)              Service flaky:80 -> good + bad
    node-3: bad  (app, answers 500 by default)
    node-2: slow (app; ?delay=S)                 Service slow:80 -> slow
    node-3: greeter (sleep; a grpcio server run  Service greeter:50051 (port "grpc")
            in its network namespace)

The apps are shoal.testing.meshapps' busybox app; ``bad`` runs the same handler with
its default status set to 500.
"""

from __future__ import annotations

import json
import os
import select
import textwrap
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing import meshapps, podnet
from shoal.testing.metrics import metric_total, scrape
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "mesh-upstream"
Cluster = Any


def _failing_pod(name: str, node: str) -> core_pb2.Pod:
    """The app, answering 500 unless the request asks for another status."""
    return meshapps.app_pod(name, NS, app="flaky", version="bad", node=node,
                            env={"STATUS": "500"})


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)
    return p if p.status.phase == "Running" and p.status.pod_ip and ready else None


def _endpoints(cluster: Cluster, service: str, n: int) -> bool:
    ep = cluster.client.get(core_pb2.Endpoints, service, namespace=NS)
    return sum(len(s.addresses) for s in ep.subsets) == n


def _cluster_ip(cluster: Cluster, service: str) -> str:
    """Requests go to the ClusterIP (the host's resolver, not the pod's, runs in the netns)."""
    return str(cluster.client.get(core_pb2.Service, service, namespace=NS).spec.cluster_ip)


def _node_ip(cluster: Cluster, node: str) -> str:
    n = cluster.client.get(core_pb2.Node, node)
    return str(next(a.address for a in n.status.addresses if a.type == "InternalIP"))


@pytest.fixture(scope="module")
def apps(cluster: Cluster) -> Iterator[dict[str, core_pb2.Pod]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    cluster.client.create(meshapps.client_pod("client", NS, node="node-1"))
    cluster.client.create(meshapps.app_pod("good", NS, app="flaky", version="good",
                                           node="node-2"))
    cluster.client.create(_failing_pod("bad", "node-3"))
    cluster.client.create(meshapps.app_pod("slow", NS, app="slow", node="node-2"))
    cluster.client.create(meshapps.http_service("flaky", NS, app="flaky"))
    cluster.client.create(meshapps.http_service("slow", NS, app="slow"))
    pods = {name: wait_for(f"{name} running", partial(_running, cluster, name), timeout=120)
            for name in ("client", "good", "bad", "slow")}
    wait_for("flaky has 2 endpoints", partial(_endpoints, cluster, "flaky", 2), timeout=60)
    wait_for("slow has 1 endpoint", partial(_endpoints, cluster, "slow", 1), timeout=60)
    yield pods


def _apply(cluster: Cluster, path: Path, manifest: str) -> None:
    path.write_text(textwrap.dedent(manifest))
    r = cluster.shoal("apply", "-f", str(path), "--wait-propagated")
    assert r.returncode == 0, r.stderr


def test_outlier_detection_ejects_the_failing_endpoint_and_readmits_it(
        cluster: Cluster, apps: dict[str, core_pb2.Pod], tmp_path: Path) -> None:
    _apply(cluster, tmp_path / "dr.yaml", f"""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: flaky, namespace: {NS}}}
        spec:
          host: flaky
          trafficPolicy:
            loadBalancer: {{simple: ROUND_ROBIN}}
            outlierDetection:
              consecutive5xxErrors: 3
              interval: 1s
              baseEjectionTime: 8s
              maxEjectionPercent: 100
        """)
    # what the agent will do, by its own code (shoal mesh explain reads the API)
    r = cluster.shoal("mesh", "explain", "client", "flaky", "-n", NS, "-o", "json")
    assert r.returncode == 0, r.stderr
    [dest] = json.loads(r.stdout)["destinations"]
    assert dest["cluster"]["destination_rule"] == f"{NS}/flaky"
    assert dest["cluster"]["outlier_detection"]["consecutive_5xx_errors"] == 3
    assert sorted(e["pod"] for e in dest["endpoints"]) == [f"{NS}/bad", f"{NS}/good"]
    netns = podnet.pod_netns(apps["client"].status.pod_ip)
    send = partial(meshapps.send, netns, _cluster_ip(cluster, "flaky"), 80,
                   headers={"host": "flaky"})
    # before: both answer, the bad one with 500, until its third 500 in a row ejects it
    first = send(count=12)
    assert not first.errors, first.errors
    assert first.by_pod["bad"] == 3 and first.by_status[500] == 3, first.by_status
    # ejected: every request goes to the good endpoint
    ejected = send(count=20)
    assert ejected.by_pod == {"good": 20} and ejected.by_status == {200: 20}
    # after the ejection time (8 s, checked at the 1 s interval) it takes requests again
    back = wait_for("the ejected endpoint answers again",
                    lambda: send(count=2).by_pod["bad"] > 0, timeout=40, interval=0.5)
    assert back


def test_connection_pool_overflow_answers_503_with_flag_uo(
        cluster: Cluster, apps: dict[str, core_pb2.Pod], tmp_path: Path) -> None:
    _apply(cluster, tmp_path / "dr.yaml", f"""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: slow, namespace: {NS}}}
        spec:
          host: slow
          trafficPolicy:
            connectionPool:
              tcp: {{maxConnections: 1}}
              http: {{http1MaxPendingRequests: 1}}
        """)
    netns = podnet.pod_netns(apps["client"].status.pod_ip)
    metrics_url = f"http://{_node_ip(cluster, 'node-1')}:15020/metrics"

    def overflows() -> float:
        return metric_total(scrape(metrics_url), "istio_requests_total", reporter="source",
                            response_code="503", response_flags="UO",
                            destination_service=f"slow.{NS}.svc.cluster.local")

    before = overflows()
    # six at once, each held 3 s by the app: one runs, one waits, the rest overflow
    tally = meshapps.send(netns, _cluster_ip(cluster, "slow"), 80, count=6, concurrency=6,
                          path="/?delay=3", headers={"host": "slow"}, timeout=20)
    assert not tally.errors, tally.errors
    assert set(tally.by_status) <= {200, 503}, tally.by_status
    assert tally.by_status[200] >= 2 and tally.by_status[503] >= 1, tally.by_status
    assert all(not r.pod for r in tally.replies if r.status == 503)   # the mesh answered
    seen = wait_for("UO 503s in istio_requests_total",
                    lambda: (overflows() - before) >= tally.by_status[503] or None, timeout=15)
    assert seen
    assert overflows() - before == tally.by_status[503]


GRPC_SERVER = """
import sys, time
from concurrent import futures
import grpc

def say(request, context):
    return request + b"!"

def missing(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")

handler = grpc.method_handlers_generic_handler("test.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Missing": grpc.unary_unary_rpc_method_handler(missing)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("0.0.0.0:50051")
server.start()
print("ready", flush=True)
time.sleep(600)
"""

GRPC_CLIENT = """
import json, sys
import grpc
out = []
with grpc.insecure_channel(sys.argv[1]) as ch:
    for method, n in (("Say", 5), ("Missing", 2)):
        call = ch.unary_unary(f"/test.Echo/{method}")
        for _ in range(n):
            try:
                out.append([method, "OK", call(b"hi", timeout=10).decode()])
            except grpc.RpcError as e:
                out.append([method, e.code().name, e.details()])
print(json.dumps(out))
"""


def test_grpc_through_the_mesh_with_grpc_status_in_telemetry(
        cluster: Cluster, apps: dict[str, core_pb2.Pod]) -> None:
    pod = meshapps.client_pod("greeter", NS, node="node-3")
    cluster.client.create(pod)
    svc = meshapps.http_service("greeter", NS, app="greeter", port=50051, target_port=50051,
                                port_name="grpc")
    cluster.client.create(svc)
    server_pod = wait_for("greeter running", partial(_running, cluster, "greeter"),
                          timeout=120)
    wait_for("greeter has 1 endpoint", partial(_endpoints, cluster, "greeter", 1), timeout=60)
    server = podnet.start_in_netns(podnet.pod_netns(server_pod.status.pod_ip), GRPC_SERVER)
    try:
        assert server.stdout is not None
        readable, _, _ = select.select([server.stdout], [], [], 30)
        assert readable and server.stdout.readline().strip() == "ready", server.poll()
        source_url = f"http://{_node_ip(cluster, 'node-1')}:15020/metrics"
        dest_url = f"http://{_node_ip(cluster, 'node-3')}:15020/metrics"

        def count(url: str, reporter: str, status: str) -> float:
            return metric_total(scrape(url), "istio_requests_total", reporter=reporter,
                                request_protocol="grpc", grpc_response_status=status,
                                destination_workload="greeter",
                                destination_workload_namespace=NS)

        before = {(r, s): count(u, r, s) for u, r in ((source_url, "source"),
                                                       (dest_url, "destination"))
                  for s in ("0", "5")}
        r = podnet.in_netns(podnet.pod_netns(apps["client"].status.pod_ip), GRPC_CLIENT,
                            f"{_cluster_ip(cluster, 'greeter')}:50051", timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        answers = json.loads(r.stdout.strip().splitlines()[-1])
        assert answers == [["Say", "OK", "hi!"]] * 5 + \
            [["Missing", "NOT_FOUND", "no such greeting"]] * 2

        def counted() -> bool:
            now = {(r, s): count(u, r, s) for u, r in ((source_url, "source"),
                                                        (dest_url, "destination"))
                   for s in ("0", "5")}
            return all(now[(rep, "0")] - before[(rep, "0")] == 5
                       and now[(rep, "5")] - before[(rep, "5")] == 2
                       for rep in ("source", "destination"))
        assert wait_for("gRPC requests in istio_requests_total on both sides", counted,
                        timeout=15)
    finally:
        server.kill()
        server.wait()
