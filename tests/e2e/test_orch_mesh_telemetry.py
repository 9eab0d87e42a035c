"""L7 telemetry and authorization on the lab (``shoal lab up --mesh``).

Runs with ``SHOAL_E2E_MESH=1`` (scripts/test.sh runs it in the mesh pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_mesh_telemetry.py``.

Namespace ``mesh-telemetry``: a client pod on node-1 (sa client) sends HTTP to
Service web:80 (port name http) whose one pod (the busybox test app of
:mod:`shoal.testing.meshapps`, sa web) runs on node-2. So node-1's agent is the
source reporter and node-2's the destination reporter, which also enforces L7
AuthorizationPolicy and emits the server span to the lab's Zipkin collector.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import textwrap
import urllib.error
import urllib.request
import uuid
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

NS = "mesh-telemetry"
SERVICE = f"web.{NS}.svc.cluster.local"
ZIPKIN = "http://10.77.0.1:9411"  # the lab's collector (shoal.lab.lab.zipkin_url)
Cluster = Any


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


@pytest.fixture(scope="module")
def apps(cluster: Cluster) -> Iterator[dict[str, str]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    for sa in ("client", "web"):
        account = core_pb2.ServiceAccount()
        account.metadata.name, account.metadata.namespace = sa, NS
        cluster.client.create(account)
    cluster.client.create(meshapps.app_pod("web", NS, app="web", version="v1", node="node-2",
                                           sa="web"))
    cluster.client.create(meshapps.client_pod("client", NS, node="node-1", sa="client"))
    cluster.client.create(meshapps.http_service("web", NS, app="web"))
    pods = {name: wait_for(f"{name} running", partial(_running, cluster, name), timeout=120)
            for name in ("web", "client")}
    netns = podnet.pod_netns(pods["client"].status.pod_ip)
    ip = cluster.client.get(core_pb2.Service, "web", namespace=NS).spec.cluster_ip
    # The mesh is ready for this service once the client gets the app's answer.
    wait_for("web answers through the mesh",
             lambda: _send({"netns": netns, "ip": ip}, path="/ready").ok() == 1 or None,
             timeout=60)
    yield {"netns": netns, "ip": ip, "node1": _node_ip(cluster, "node-1"),
           "node2": _node_ip(cluster, "node-2")}


# -- helpers ------------------------------------------------------------------------


def _send(apps: dict[str, str], **kw: Any) -> meshapps.Tally:
    """Requests from the client pod to the web Service (its ClusterIP: the pod's
    resolver is not the host's)."""
    return meshapps.send(apps["netns"], apps["ip"], 80, timeout=10,
                         headers={"host": f"web.{NS}", **kw.pop("headers", {})}, **kw)


def _node_ip(cluster: Cluster, node: str) -> str:
    n = cluster.client.get(core_pb2.Node, node)
    return str(next(a.address for a in n.status.addresses if a.type == "InternalIP"))


def _requests(node_ip: str, **labels: str) -> float:
    """istio_requests_total for requests to the web pod, as one agent counted them."""
    return metric_total(scrape(f"http://{node_ip}:15020/metrics"), "istio_requests_total",
                        destination_workload="web", destination_workload_namespace=NS,
                        **labels)


def _counts(apps: dict[str, str]) -> dict[tuple[str, str], float]:
    """istio_requests_total by (reporter, response_code) for web, from both agents."""
    out = {}
    for reporter, node in (("source", apps["node1"]), ("destination", apps["node2"])):
        for code in ("200", "403", "404"):
            out[(reporter, code)] = _requests(node, reporter=reporter, response_code=code)
    return out


def _access_lines(cluster: Cluster, node: str, marker: str) -> list[dict[str, Any]]:
    lines = []
    for line in (cluster.dir / "logs" / f"{node}-meshagent.log").read_text().splitlines():
        if marker not in line:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("logger") == "meshagent.access":
                lines.append(rec)
    return lines


def _zipkin(path: str) -> Any:
    try:
        with urllib.request.urlopen(f"{ZIPKIN}{path}", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


@contextlib.contextmanager
def _applied(cluster: Cluster, path: Path, manifest: str) -> Iterator[None]:
    path.write_text(textwrap.dedent(manifest))
    r = cluster.shoal("apply", "-f", str(path), "--wait-propagated", "--timeout", "30s")
    try:
        assert r.returncode == 0, r.stderr
        yield
    finally:
        cluster.shoal("delete", "-f", str(path))


# -- tests ------------------------------------------------------------------------


def test_the_lab_runs_a_zipkin_collector_for_the_meshagents(cluster: Cluster) -> None:
    status = cluster.lab("status")
    assert "zipkin" in status.stdout and f"{ZIPKIN}/api/v2/traces" in status.stdout, \
        status.stdout
    assert _zipkin("/health")["status"] == "UP"
    agents = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True,
                            check=True).stdout
    assert f"--zipkin-endpoint {ZIPKIN}" in agents


def test_an_l7_deny_on_a_path_returns_403_and_other_paths_pass(
        cluster: Cluster, apps: dict[str, str], tmp_path: Path) -> None:
    with _applied(cluster, tmp_path / "deny.yaml", f"""\
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata:
              name: deny-admin
              namespace: {NS}
            spec:
              selector:
                matchLabels:
                  app: web
              action: DENY
              rules:
              - to:
                - operation:
                    paths: ["/admin*"]
            """):
        denied = _send(apps, paths=["/admin", "/admin/users?x=1"], count=4)
        passed = _send(apps, paths=["/public", "/adm"], count=4)
    assert denied.by_status == {403: 4}, denied
    assert all("RBAC: access denied" in r.body for r in denied.replies), denied.replies[0]
    assert not denied.by_pod  # the app never saw them
    assert passed.by_status == {200: 4} and passed.by_pod == {"web": 4}, passed


def test_istio_requests_total_counts_every_request_at_both_reporters(
        apps: dict[str, str]) -> None:
    before = _counts(apps)
    ok = _send(apps, path="/count", count=17)
    missing = _send(apps, path="/count?status=404", count=5)
    assert ok.by_status == {200: 17} and missing.by_status == {404: 5}
    want = dict(before)
    for reporter in ("source", "destination"):
        want[(reporter, "200")] += 17
        want[(reporter, "404")] += 5
    # Recorded as each response completes: the last may land just after the client read it.
    wait_for("counts reach the requests sent", lambda: _counts(apps) == want or None,
             timeout=10)
    assert _counts(apps) == want
    # Istio's labels, as each side knows them (the destination side labels by the pod).
    labels = dict(source_workload="client", source_workload_namespace=NS,
                  source_principal=f"cluster.local/ns/{NS}/sa/client",
                  destination_principal=f"cluster.local/ns/{NS}/sa/web",
                  request_protocol="http", response_flags="-")
    # Both name the Service: the destination reporter by the request's Host (web.NS).
    service = dict(destination_service=SERVICE, destination_service_name="web",
                   destination_service_namespace=NS)
    assert _requests(apps["node2"], reporter="destination", response_code="200",
                     connection_security_policy="mutual_tls", **service, **labels) == want[
        ("destination", "200")]
    assert _requests(apps["node1"], reporter="source", response_code="404",
                     **service, **labels) == want[("source", "404")]
    text = scrape(f"http://{apps['node2']}:15020/metrics")
    assert metric_total(text, "istio_request_duration_milliseconds_count",
                        reporter="destination", destination_workload="web",
                        destination_workload_namespace=NS) == sum(
        v for (r, _), v in want.items() if r == "destination")


def test_one_access_log_line_per_request(cluster: Cluster, apps: dict[str, str]) -> None:
    marker = f"log-{uuid.uuid4().hex[:10]}"
    paths = [f"/{marker}/{i}" for i in range(6)]
    sent = _send(apps, paths=paths, count=6)
    assert sent.by_status == {200: 6}

    def lines() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        src, dst = (_access_lines(cluster, "node-1", marker),
                    _access_lines(cluster, "node-2", marker))
        return (src, dst) if len(src) >= 6 and len(dst) >= 6 else None

    src, dst = wait_for("access-log lines", lines, timeout=10)
    for reporter, got in (("source", src), ("destination", dst)):
        assert sorted(r["path"] for r in got) == sorted(paths), (reporter, got)
        assert {(r["reporter"], r["method"], r["response_code"], r["response_flags"])
                for r in got} == {(reporter, "GET", 200, "-")}
        assert all(r["upstream_host"] != "-" and r["start_time"] and r["x-request-id"] != "-"
                   for r in got), got
    # One request, one id, on both sides; the delivering agent's line has the trace.
    assert {r["path"]: r["x-request-id"] for r in src} == \
        {r["path"]: r["x-request-id"] for r in dst}
    assert all(len(r["trace_id"]) == 32 for r in dst), dst


def test_spans_reach_the_lab_collector(apps: dict[str, str]) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    joined = _send(apps, path="/traced",
                   headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    fresh = _send(apps, path="/untraced")
    assert joined.by_status == {200: 1} and fresh.by_status == {200: 1}

    spans = wait_for("the server span of the traced request",
                     partial(_zipkin, f"/api/v2/trace/{trace_id}"), timeout=15)
    assert len(spans) == 1, spans
    span = spans[0]
    assert (span["kind"], span["parentId"]) == ("SERVER", parent), span
    # The app got the server span's context, in both formats, to pass on.
    echoed = joined.replies[0]
    assert echoed.header("traceparent") == f"00-{trace_id}-{span['id']}-01", echoed.headers
    assert (echoed.header("x-b3-traceid"), echoed.header("x-b3-spanid")) == (
        trace_id, span["id"])

    # No context came in: the delivering agent started a trace, and told the app.
    started = (fresh.replies[0].header("traceparent") or "").split("-")
    assert len(started) == 4, fresh.replies[0].headers
    roots = wait_for("the new trace's span", partial(_zipkin, f"/api/v2/trace/{started[1]}"),
                     timeout=15)
    assert [(s["id"], s.get("parentId")) for s in roots] == [(started[2], None)], roots
