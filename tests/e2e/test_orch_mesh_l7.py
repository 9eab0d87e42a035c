"""VirtualService traffic management through the L7 mesh on the lab (``shoal lab up --mesh``):
weighted canary, header match, fault injection with retries, per-try timeout, mirroring.

Runs with ``SHOAL_E2E_MESH=1`` (scripts/test.sh's mesh pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_mesh_l7.py``.

Namespace ``mesh-l7`` (the apps are shoal.testing.meshapps' busybox app)::

    node-1: client (sleep)              sends from its network namespace
    node-2: web-v1 (version v1)         Service web:80 (http) -> web-v1 + web-v2
    node-3: web-v2 (version v2)
    node-2: quick (version fast)        Service lag:80 (http) -> quick + sluggish
    node-3: sluggish (version slow)     answers every request after 3 s

Requests go to the Services' ClusterIPs: the client's agent (node-1) routes each one.
"""

from __future__ import annotations

import os
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

NS = "mesh-l7"
Cluster = Any
SUBSETS = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: web, namespace: mesh-l7}
    spec:
      host: web
      subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}}
    """


def _slow_pod(name: str, node: str) -> core_pb2.Pod:
    """The app, answering every request after 3 s."""
    return meshapps.app_pod(name, NS, app="lag", version="slow", node=node,
                            env={"DELAY": "3"})


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)
    return p if p.status.phase == "Running" and p.status.pod_ip and ready else None


def _endpoints(cluster: Cluster, service: str, n: int) -> bool:
    ep = cluster.client.get(core_pb2.Endpoints, service, namespace=NS)
    return sum(len(s.addresses) for s in ep.subsets) == n


def _node_ip(cluster: Cluster, node: str) -> str:
    n = cluster.client.get(core_pb2.Node, node)
    return str(next(a.address for a in n.status.addresses if a.type == "InternalIP"))


@pytest.fixture(scope="module")
def apps(cluster: Cluster) -> Iterator[dict[str, Any]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    cluster.client.create(meshapps.client_pod("client", NS, node="node-1"))
    cluster.client.create(meshapps.app_pod("web-v1", NS, app="web", version="v1",
                                           node="node-2"))
    cluster.client.create(meshapps.app_pod("web-v2", NS, app="web", version="v2",
                                           node="node-3"))
    cluster.client.create(meshapps.app_pod("quick", NS, app="lag", version="fast",
                                           node="node-2"))
    cluster.client.create(_slow_pod("sluggish", "node-3"))
    cluster.client.create(meshapps.http_service("web", NS, app="web"))
    cluster.client.create(meshapps.http_service("lag", NS, app="lag"))
    pods = {name: wait_for(f"{name} running", partial(_running, cluster, name), timeout=120)
            for name in ("client", "web-v1", "web-v2", "quick", "sluggish")}
    wait_for("web has 2 endpoints", partial(_endpoints, cluster, "web", 2), timeout=60)
    wait_for("lag has 2 endpoints", partial(_endpoints, cluster, "lag", 2), timeout=60)
    netns = podnet.pod_netns(pods["client"].status.pod_ip)
    ips = {name: cluster.client.get(core_pb2.Service, name, namespace=NS).spec.cluster_ip
           for name in ("web", "lag")}
    # Ready is not yet reachable through the mesh: a pod's node agent captures it (port
    # 15008 included) once its certificate is signed. Wait until every pod answers.
    def answering(service: str, want: set[str], path: str) -> bool:
        t = meshapps.send(netns, ips[service], 80, count=12, path=path, concurrency=2)
        return not t.errors and t.by_status == {200: 12} and set(t.by_pod) == want
    wait_for("web-v1 and web-v2 answer through the mesh",
             partial(answering, "web", {"web-v1", "web-v2"}, "/"), timeout=60, interval=0.5)
    wait_for("quick and sluggish answer through the mesh",
             partial(answering, "lag", {"quick", "sluggish"}, "/?delay=0"), timeout=60,
             interval=0.5)
    yield {"pods": pods, "netns": netns, "ips": ips}


def _apply(cluster: Cluster, path: Path, *manifests: str) -> None:
    path.write_text("---\n".join(textwrap.dedent(m) for m in manifests))
    r = cluster.shoal("apply", "-f", str(path), "--wait-propagated")
    assert r.returncode == 0, r.stderr


def _send(apps: dict[str, Any], service: str = "web", **kw: Any) -> meshapps.Tally:
    tally = meshapps.send(apps["netns"], apps["ips"][service], 80, **kw)
    assert not tally.errors, tally.errors[:5]
    return tally


def test_a_90_10_split_lands_within_four_percent(
        cluster: Cluster, apps: dict[str, Any], tmp_path: Path) -> None:
    _apply(cluster, tmp_path / "vs.yaml", SUBSETS, """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: mesh-l7}
        spec:
          hosts: [web]
          http:
          - name: canary
            route:
            - {destination: {host: web, subset: v1}, weight: 90}
            - {destination: {host: web, subset: v2}, weight: 10}
        """)
    tally = _send(apps, count=1000, concurrency=4)
    assert tally.by_status == {200: 1000}, tally.by_status
    v1 = tally.by_version["v1"] / 1000
    print(f"90/10 split: {dict(tally.by_version)}")
    assert 0.86 <= v1 <= 0.94 and tally.by_version["v1"] + tally.by_version["v2"] == 1000, \
        tally.by_version


def test_a_header_match_sends_the_tester_to_v2_alone(
        cluster: Cluster, apps: dict[str, Any], tmp_path: Path) -> None:
    _apply(cluster, tmp_path / "vs.yaml", SUBSETS, """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: mesh-l7}
        spec:
          hosts: [web]
          http:
          - name: testers
            match: [{headers: {end-user: {exact: tester}}}]
            route: [{destination: {host: web, subset: v2}}]
          - route: [{destination: {host: web, subset: v1}}]
        """)
    tester = _send(apps, count=50, headers={"end-user": "tester"})
    assert tester.by_version == {"v2": 50}, tester.by_version
    # the app saw the header (and the mesh's x-request-id)
    assert tester.replies[0].header("end-user") == "tester"
    assert tester.replies[0].header("x-request-id")
    others = _send(apps, count=50, headers={"end-user": "someone"})
    assert others.by_version == {"v1": 50}, others.by_version


def test_a_50_percent_abort_with_retries_on_5xx_mostly_succeeds(
        cluster: Cluster, apps: dict[str, Any], tmp_path: Path) -> None:
    def vs(attempts: int) -> str:
        retries = f"{{attempts: {attempts}, retryOn: 5xx}}" if attempts else "{attempts: 0}"
        return f"""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: web, namespace: mesh-l7}}
        spec:
          hosts: [web]
          http:
          - fault: {{abort: {{httpStatus: 503, percentage: {{value: 50}}}}}}
            retries: {retries}
            route: [{{destination: {{host: web}}}}]
        """
    # Without retries about half are aborted by the fault (flag FI).
    _apply(cluster, tmp_path / "vs.yaml", vs(0))
    bare = _send(apps, count=400, concurrency=4)
    assert 0.4 <= bare.ok() / 400 <= 0.6, bare.by_status
    assert set(bare.by_status) == {200, 503}
    # 3 retries: every try is aborted with p=0.5, so 1 - 0.5^4 = 93.75% succeed.
    _apply(cluster, tmp_path / "vs.yaml", vs(3))
    three = _send(apps, count=400, concurrency=4)
    assert three.ok() / 400 >= 0.89, three.by_status
    # 10 retries: 1 - 0.5^11 = 99.95% (expected 0.2 failures of 400; with 7
    # retries, 99.6%, five failures or more came about once in 50 runs).
    _apply(cluster, tmp_path / "vs.yaml", vs(10))
    ten = _send(apps, count=400, concurrency=4)
    assert ten.ok() / 400 >= 0.99, ten.by_status
    print(f"50% abort: no retries {bare.ok()}/400, 3 retries {three.ok()}/400, "
          f"10 retries {ten.ok()}/400")


def test_a_per_try_timeout_cuts_the_slow_endpoint(
        cluster: Cluster, apps: dict[str, Any], tmp_path: Path) -> None:
    _apply(cluster, tmp_path / "vs.yaml", """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: lag, namespace: mesh-l7}
        spec:
          host: lag
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
        """, """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: lag, namespace: mesh-l7}
        spec:
          hosts: [lag]
          http:
          - timeout: 10s
            retries: {attempts: 2, perTryTimeout: 500ms, retryOn: "gateway-error,reset"}
            route: [{destination: {host: lag}}]
        """)
    # The sluggish pod answers after 3 s; the client gives up at 2.5 s. Every request
    # is answered, by the quick pod: a try on the sluggish one is cut at 500 ms and
    # retried elsewhere.
    tally = _send(apps, "lag", count=20, timeout=2.5)
    assert tally.by_status == {200: 20}, tally.by_status
    assert tally.by_pod == {"quick": 20}, tally.by_pod


def test_mirroring_delivers_copies_to_a_second_version(
        cluster: Cluster, apps: dict[str, Any], tmp_path: Path) -> None:
    node3 = f"http://{_node_ip(cluster, 'node-3')}:15020/metrics"

    def v2_requests() -> float:  # web-v2 is the only web pod on node-3
        return metric_total(scrape(node3), "istio_requests_total", reporter="destination",
                            destination_workload="web",
                            destination_workload_namespace=NS)

    _apply(cluster, tmp_path / "vs.yaml", SUBSETS, """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: mesh-l7}
        spec:
          hosts: [web]
          http:
          - route: [{destination: {host: web, subset: v1}}]
            mirror: {host: web, subset: v2}
            mirrorPercentage: {value: 100}
        """)
    before = v2_requests()
    tally = _send(apps, count=30)
    assert tally.by_version == {"v1": 30}, tally.by_version  # answers come from v1 only
    copies = wait_for("v2 got the copies", lambda: v2_requests() - before >= 30 or None,
                      timeout=20)
    assert copies
