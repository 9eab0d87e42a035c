"""The ingress gateway and the bookinfo demo on the lab (``shoal lab up --mesh``).

Runs with ``SHOAL_E2E_MESH=1`` (scripts/test.sh runs it in the mesh pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_mesh_gateway.py``.

The lab runs the gateway (pod istio-system/istio-ingressgateway on node-1, see
shoal/lab/ingress.py); the host reaches it at the pod's IP. In namespace
``bookinfo``: examples/bookinfo.yaml, examples/bookinfo-gateway.yaml (HTTP and
HTTPS for bookinfo.example.com, the certificate from the Secret
istio-system/bookinfo-credential made here), the canary's DestinationRule, and
``trace-gateway``: reviews.example.com -> reviews v2, which calls ratings, for
the 3-hop trace. Requests come from this (host) process.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from apiserver.pki import CertificateAuthority, cert_pem
from shoal.api.core.v1 import core_pb2
from shoal.lab import ingress
from shoal.testing import podnet
from shoal.testing.istio import tls_secret
from shoal.testing.metrics import metric_total, scrape
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "bookinfo"
HOST = "bookinfo.example.com"
TRACE_HOST = "reviews.example.com"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ZIPKIN = "http://10.77.0.1:9411"  # the lab's collector (shoal.lab.lab.zipkin_url)
Cluster = Any


def _entry(gateway: str, entry: str, host: str, *, port: int, protocol: str,
           destination: str) -> str:
    """The Gateway ``gateway`` with one server (``port``, ``protocol``) for ``host``,
    and the VirtualService ``entry`` bound to it, routing every request of ``host``
    to ``destination`` (a route destination in YAML flow style)."""
    return f"""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: {gateway}, namespace: {NS}}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: {protocol.lower()}, protocol: {protocol}}}
    hosts: ["{host}"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {entry}, namespace: {NS}}}
spec:
  hosts: ["{host}"]
  gateways: [{gateway}]
  http:
  - route:
    - destination: {destination}
"""


# reviews.example.com -> reviews v2 (which calls ratings): the 3-hop trace.
TRACE_GATEWAY = _entry("trace-gateway", "reviews-entry", TRACE_HOST, port=80, protocol="HTTP",
                       destination="{host: reviews, subset: v2, port: {number: 9080}}")


GRPC_HOST = "greeter.example.com"
GRPC_PORT = 8090  # the gateway's GRPC server (h2c)
GREETER = f"""
apiVersion: v1
kind: Pod
metadata: {{name: greeter, namespace: {NS}, labels: {{app: greeter}}}}
spec:
  containers:
  - {{name: app, image: "docker.io/library/busybox:1.36", command: [sleep, "3600"]}}
---
apiVersion: v1
kind: Service
metadata: {{name: greeter, namespace: {NS}}}
spec:
  selector: {{app: greeter}}
  ports: [{{name: grpc, port: 50051}}]
---
""" + _entry("grpc-gateway", "greeter-entry", GRPC_HOST, port=GRPC_PORT, protocol="GRPC",
             destination="{host: greeter, port: {number: 50051}}")
# The greeter pod's app: the gRPC echo service (shoal.testing.grpcecho) run in the
# pod's network namespace by this Python (the pod's container only sleeps).
GREETER_APP = """
    import asyncio
    from shoal.testing import grpcecho

    async def main():
        server, _ = await grpcecho.start("0.0.0.0:50051")
        print("serving", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
"""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Bookinfo:
    gateway_ip: str
    ca_pem: bytes


def _apply(cluster: Cluster, path: Path, *flags: str) -> None:
    r = cluster.shoal("apply", "-f", str(path), *flags)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def bookinfo(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Bookinfo]:
    tmp = tmp_path_factory.mktemp("bookinfo")
    ca = CertificateAuthority.create("bookinfo-e2e-ca")
    cluster.client.create(tls_secret(ca, host=HOST, name="bookinfo-credential",
                                     namespace=ingress.NAMESPACE))
    _apply(cluster, EXAMPLES / "bookinfo.yaml")
    _apply(cluster, EXAMPLES / "bookinfo-canary.yaml")
    _apply(cluster, EXAMPLES / "bookinfo-gateway.yaml")
    (tmp / "trace.yaml").write_text(TRACE_GATEWAY)
    _apply(cluster, tmp / "trace.yaml")
    for d in ("details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3",
              "productpage-v1"):
        r = cluster.shoal("rollout", "status", f"deployment/{d}", "-n", NS, "--timeout",
                          "180s", timeout=200)
        assert r.returncode == 0, r.stdout + r.stderr
    ip = wait_for("the gateway pod's IP", partial(ingress.address, cluster.client),
                  timeout=30)
    try:
        yield Bookinfo(gateway_ip=ip, ca_pem=cert_pem(ca.cert))
    finally:
        for f in (tmp / "trace.yaml", EXAMPLES / "bookinfo-gateway.yaml",
                  EXAMPLES / "bookinfo-canary.yaml", EXAMPLES / "bookinfo.yaml"):
            cluster.shoal("delete", "-f", str(f))
        cluster.client.delete(core_pb2.Secret, "bookinfo-credential",
                              namespace=ingress.NAMESPACE)


# -- a client on the host ------------------------------------------------------------


def _request(ip: str, port: int, host: str, path: str, *, ca_pem: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 20.0) -> Reply:
    """One HTTP/1.1 request to the gateway at ``ip``:``port`` for ``host``; HTTPS
    (SNI ``host``, the certificate checked against ``ca_pem``) when ``ca_pem``."""
    raw = socket.create_connection((ip, port), timeout=timeout)
    sock: socket.socket = raw
    if ca_pem is not None:
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        sock = ctx.wrap_socket(raw, server_hostname=host)
    with sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                     f"User-Agent: shoal-e2e\r\n{extra}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    hdrs = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:])}
    return Reply(status=int(lines[0].split()[1]), headers=hdrs, body=body)


def _productpage(b: Bookinfo) -> dict[str, Any] | None:
    try:
        r = _request(b.gateway_ip, 443, HOST, "/productpage/", ca_pem=b.ca_pem)
    except OSError:
        return None
    if r.status != 200:
        return None
    try:
        page: dict[str, Any] = json.loads(r.body)
    except json.JSONDecodeError:
        return None
    return page


def _reviews_versions(b: Bookinfo, n: int) -> Counter[str]:
    """reviews' version in ``n`` product pages fetched through the gateway."""
    def one(_: int) -> str:
        page = _productpage(b)
        if page is None:
            return "error"
        return str(page["reviews"].get("version", page["reviews"].get("error", "?")))
    with ThreadPoolExecutor(max_workers=4) as pool:
        return Counter(pool.map(one, range(n)))


def _trace(trace_id: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{ZIPKIN}/api/v2/trace/{trace_id}", timeout=5) as r:
            spans: list[dict[str, Any]] = json.loads(r.read())
            return spans
    except OSError:
        return []


# -- tests ------------------------------------------------------------------------


def test_https_from_the_host_reaches_a_service_through_the_gateway(
        cluster: Cluster, bookinfo: Bookinfo) -> None:
    page = wait_for("productpage through the gateway over HTTPS",
                    partial(_productpage, bookinfo), timeout=60)
    assert page["productpage"] == "v1"
    assert page["details"]["author"] == "William Shakespeare"
    # The certificate is the Secret's: a client checking for another name refuses it.
    with pytest.raises(ssl.SSLCertVerificationError):
        _request(bookinfo.gateway_ip, 443, "other.example.com", "/productpage/",
                 ca_pem=bookinfo.ca_pem)
    # Plain HTTP is served too (the Gateway's port 80 server); an unknown host is 404 NR.
    assert _request(bookinfo.gateway_ip, 80, HOST, "/productpage/").status == 200
    nr = _request(bookinfo.gateway_ip, 80, "unknown.example.org", "/")
    assert nr.status == 404 and nr.headers.get("x-shoal-response-flags") == "NR"
    # The gateway went into the mesh as its own identity, over mutual TLS.
    metrics = scrape(f"http://{bookinfo.gateway_ip}:{ingress.METRICS_PORT}/metrics")
    assert metric_total(metrics, "istio_requests_total", reporter="source",
                        source_workload="istio-ingressgateway",
                        source_principal="cluster.local/ns/istio-system/sa/istio-ingressgateway",
                        destination_service=f"productpage.{NS}.svc.cluster.local",
                        destination_principal=f"cluster.local/ns/{NS}/sa/bookinfo-productpage",
                        connection_security_policy="mutual_tls", response_code="200") >= 2


def test_a_request_through_the_gateway_and_two_services_is_one_trace_of_three_spans(
        cluster: Cluster, bookinfo: Bookinfo) -> None:
    def reviews_v2() -> Reply | None:
        r = _request(bookinfo.gateway_ip, 80, TRACE_HOST, "/reviews/0/")
        return r if r.status == 200 and '"version": "v2"' in r.body else None
    wait_for("reviews v2 through trace-gateway", reviews_v2, timeout=60)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    r = _request(bookinfo.gateway_ip, 80, TRACE_HOST, "/reviews/0/",
                 headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status == 200, r
    page = json.loads(r.body)
    assert page["version"] == "v2" and page["ratings"]["version"] == "v1"  # A called B
    def three() -> list[dict[str, Any]] | None:
        found = _trace(trace_id)
        return found if len(found) >= 3 else None
    spans = wait_for(f"3 spans of trace {trace_id} in zipkin", three, timeout=30)
    assert len(spans) == 3, json.dumps(spans, indent=1)
    assert {s["kind"] for s in spans} == {"SERVER"}
    by_parent = {s.get("parentId", ""): s for s in spans}
    gateway_span = by_parent[parent]  # the gateway's: a child of the caller's context
    a = by_parent[gateway_span["id"]]  # reviews', delivered by its node's agent
    b = by_parent[a["id"]]  # ratings': reviews copied the context onto its call
    assert "istio-ingressgateway" in gateway_span["localEndpoint"]["serviceName"]
    assert {gateway_span["id"], a["id"], b["id"]} == {s["id"] for s in spans}


def test_the_bookinfo_canary_through_the_gateway(cluster: Cluster, bookinfo: Bookinfo,
                                                 tmp_path: Path) -> None:
    # examples/bookinfo-canary.yaml (applied by the fixture): reviews v1 only.
    _apply(cluster, EXAMPLES / "bookinfo-canary.yaml", "--wait-propagated")
    assert _reviews_versions(bookinfo, 40) == Counter({"v1": 40})
    # 90/10.
    _apply(cluster, EXAMPLES / "bookinfo-canary-10.yaml", "--wait-propagated")
    n = 500
    seen = _reviews_versions(bookinfo, n)
    assert set(seen) <= {"v1", "v2"}, seen
    assert abs(seen["v2"] / n - 0.10) <= 0.04, seen
    # All of it to v2.
    _apply(cluster, EXAMPLES / "bookinfo-canary-100.yaml", "--wait-propagated")
    assert _reviews_versions(bookinfo, 40) == Counter({"v2": 40})
    # `shoal mesh explain` names the VirtualService the agents route by.
    pod = next(p.metadata.name for p in cluster.client.list(core_pb2.Pod, namespace=NS).items
               if p.metadata.labels.get("app") == "productpage")
    r = cluster.shoal("mesh", "explain", pod, "reviews:9080", "-n", NS)
    assert r.returncode == 0, r.stderr
    assert f"VirtualService {NS}/reviews" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def greeter(cluster: Cluster, bookinfo: Bookinfo, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    """A meshed pod serving gRPC (port 50051, named grpc) behind the gateway's GRPC
    server on port GRPC_PORT; the pod's IP."""
    manifest = tmp_path_factory.mktemp("greeter") / "greeter.yaml"
    manifest.write_text(GREETER)
    _apply(cluster, manifest)
    app = None
    try:
        def running() -> str | None:
            pod = cluster.client.get(core_pb2.Pod, "greeter", namespace=NS)
            return pod.status.pod_ip if pod.status.phase == "Running" else None

        ip = wait_for("the greeter pod running", running, timeout=120)
        app = podnet.start_in_netns(podnet.pod_netns(ip), GREETER_APP)
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "serving"
        yield ip
    finally:
        if app is not None:
            app.terminate()
            app.wait(10)
        cluster.shoal("delete", "-f", str(manifest))


def test_grpc_from_the_host_through_the_gateway_and_the_tunnel(
        cluster: Cluster, bookinfo: Bookinfo, greeter: str) -> None:
    """A grpcio client on the host speaks h2c to the gateway's GRPC server; the gateway
    routes by its VirtualService and goes to the pod's agent over the mTLS tunnel, whose
    HTTP/2 server side hands the calls to the pod's gRPC server."""
    target = f"{bookinfo.gateway_ip}:{GRPC_PORT}"
    options = [("grpc.default_authority", GRPC_HOST)]

    def say() -> bytes | None:
        with grpc.insecure_channel(target, options=options) as ch:
            try:
                reply: bytes = ch.unary_unary("/test.Echo/Say")(b"hi", timeout=5)
            except grpc.RpcError:
                return None  # the gateway or the agent has not seen the objects yet
            return reply

    assert wait_for("a gRPC call through the gateway", say, timeout=60) == b"hi!"
    with grpc.insecure_channel(target, options=options) as ch:
        pieces = list(ch.unary_stream("/test.Echo/Count")(b"20", timeout=10))
        assert pieces == [str(i).encode() * 1000 for i in range(20)]
        with pytest.raises(grpc.RpcError) as missing:
            ch.unary_unary("/test.Echo/Missing")(b"", timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    metrics = scrape(f"http://{bookinfo.gateway_ip}:{ingress.METRICS_PORT}/metrics")
    assert metric_total(metrics, "istio_requests_total", reporter="source",
                        request_protocol="grpc", grpc_response_status="5",
                        destination_service=f"greeter.{NS}.svc.cluster.local",
                        destination_workload="greeter",
                        connection_security_policy="mutual_tls") == 1
