"""The ingress gateway on loopback: an HTTPS listener terminating TLS with the
certificate of a kubernetes.io/tls Secret (SNI picks it), requests routed by
the VirtualService bound to the Gateway to a plain HTTP backend (a workload
outside the mesh: no tunnel), the trace context and forwarding headers added;
the L7 engine carries them: keep-alive client connections, retries."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, generate_latest

from apiserver.pki import CertificateAuthority, cert_pem, key_pem, new_key
from meshagent import gateway as gw
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.testing.apiserver import free_port
from shoal.testing.istio import loopback_gateway, loopback_service, spec_object, tls_secret
from shoal.testing.metrics import metric_total

LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}
HOST = "bookinfo.example.com"
CLIENT_URI = "spiffe://example.org/ns/shop/sa/client"  # the MUTUAL server's subjectAltNames
OPEN_HOST = "open.example.com"  # a SIMPLE server sharing the MUTUAL server's port


@dataclass
class Setup:
    gateway: gw.Gateway
    https: int
    http: int
    ca_pem: bytes
    seen: list[dict[str, str]]
    registry: CollectorRegistry
    mtls: int  # HTTPS with TLS mode MUTUAL: client certificates of ``ca``
    ca: CertificateAuthority


async def _backend(seen: list[dict[str, str]]) -> tuple[asyncio.Server, int]:
    """A plain HTTP/1.1 app: answers with the request line and headers it got (JSON)."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:] if x)}
        n = int(headers.get("content-length", "0") or 0)
        body = await r.readexactly(n) if n else b""
        seen.append({"request-line": lines[0], "body": body.decode(), **headers})
        if lines[0].startswith("GET /slow"):
            await asyncio.sleep(2)
        status = b"200 OK"
        if lines[0].startswith("GET /flaky") and \
                sum(x["request-line"].startswith("GET /flaky") for x in seen) == 1:
            status = b"500 Internal Server Error"  # the first try fails
        out = json.dumps({"line": lines[0], "headers": headers}).encode()
        w.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nx-app: web\r\n\r\n%s" % (status, len(out), out))
        await w.drain()
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    seen: list[dict[str, str]] = []
    backend, backend_port = await _backend(seen)
    ca = CertificateAuthority.create("test-ingress-ca")
    # ca.crt: the MUTUAL server's client certificates' CA
    secret = tls_secret(ca, host=HOST, name="bookinfo-cert", namespace="istio-system",
                        with_ca=True)
    https, http, mtls = free_port(), free_port(), free_port()
    gateway = spec_object(pb.Gateway, f"""
selector: {{istio: ingressgateway}}
servers:
- port: {{number: {https}, name: https, protocol: HTTPS}}
  hosts: ["{HOST}"]
  tls: {{mode: SIMPLE, credentialName: bookinfo-cert}}
- port: {{number: {http}, name: http, protocol: HTTP}}
  hosts: ["*"]
- port: {{number: {mtls}, name: https-mtls, protocol: HTTPS}}
  hosts: ["{HOST}"]
  tls: {{mode: MUTUAL, credentialName: bookinfo-cert, subjectAltNames: ["{CLIENT_URI}"]}}
- port: {{number: {mtls}, name: https-open, protocol: HTTPS}}
  hosts: ["{OPEN_HOST}"]
  tls: {{mode: SIMPLE, credentialName: bookinfo-cert}}
""", name="bookinfo-gateway", namespace="istio-system")
    vs = spec_object(pb.VirtualService, f"""
hosts: ["{HOST}"]
gateways: ["istio-system/bookinfo-gateway"]
http:
- match: [{{uri: {{prefix: /old/}}}}]
  redirect: {{uri: /new/}}
- match: [{{uri: {{prefix: /flaky}}}}]
  retries: {{attempts: 2, retryOn: 5xx}}
  route: [{{destination: {{host: web, port: {{number: 80}}}}}}]
- match: [{{uri: {{prefix: /slow}}}}]
  timeout: 0.2s
  route: [{{destination: {{host: web, port: {{number: 80}}}}}}]
- match: [{{uri: {{prefix: /api/}}}}]
  rewrite: {{uri: /}}
  route: [{{destination: {{host: web, port: {{number: 80}}}}}}]
- route: [{{destination: {{host: web, port: {{number: 80}}}}}}]
""", name="bookinfo", namespace="bookinfo")
    svc, eps = loopback_service("web", "bookinfo", port_name="http", port=80,
                                target_port=backend_port)
    registry = CollectorRegistry()
    g = loopback_gateway(registry, labels=LABELS, gateways=[gateway], virtual_services=[vs],
                         services=[svc], endpoints=[eps],
                         secrets={"istio-system/bookinfo-cert": secret})
    await g.apply()
    assert g.listening() == {https: "HTTPS", http: "HTTP", mtls: "HTTPS"}
    try:
        yield Setup(gateway=g, https=https, http=http, ca_pem=cert_pem(ca.cert), seen=seen,
                    registry=registry, mtls=mtls, ca=ca)
    finally:
        await g.close()
        backend.close()


Response = tuple[str, dict[str, str], str]  # status line, headers, body


async def _send(r: asyncio.StreamReader, w: asyncio.StreamWriter, path: str, *, host: str,
                extra: str = "") -> Response:
    """One request on an open connection; its response, read by Content-Length."""
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n{extra}\r\n".encode())
    await w.drain()
    head = (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)).decode()
    lines = head.rstrip("\r\n").split("\r\n")
    headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:])}
    n = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(r.readexactly(n), 10) if n else b""
    return lines[0], headers, body.decode()


async def _get(port: int, path: str, *, host: str = HOST, ctx: ssl.SSLContext | None = None,
               extra: str = "") -> Response:
    """One request on a connection of its own (``Connection: close``)."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                         server_hostname=host if ctx else None)
    try:
        return await _send(r, w, path, host=host, extra=f"Connection: close\r\n{extra}")
    finally:
        w.close()


def _client(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    return ctx


async def test_https_terminates_with_the_secrets_certificate_and_reaches_the_service(
        setup: Setup) -> None:
    status, headers, body = await _get(setup.https, "/productpage?u=1",
                                       ctx=_client(setup.ca_pem))
    assert status == "HTTP/1.1 200 OK"
    assert headers["x-app"] == "web"
    assert headers["connection"] == "close"
    got = json.loads(body)
    assert got["line"] == "GET /productpage?u=1 HTTP/1.1"
    sent = got["headers"]
    assert sent["x-forwarded-proto"] == "https"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["traceparent"].startswith("00-") and sent["x-b3-traceid"]
    assert sent["x-request-id"]


async def test_the_client_verifies_the_certificate_against_the_host_name(
        setup: Setup) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await _get(setup.https, "/", host="other.example.com", ctx=_client(setup.ca_pem))


async def test_an_incoming_trace_is_continued(setup: Setup) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    _, _, body = await _get(setup.https, "/", ctx=_client(setup.ca_pem),
                            extra=f"traceparent: {parent}\r\n")
    sent = json.loads(body)["headers"]
    assert sent["x-b3-traceid"] == "0af7651916cd43dd8448eb211c80319c"
    assert sent["x-b3-parentspanid"] == "b7ad6b7169203331"
    assert sent["x-b3-spanid"] != "b7ad6b7169203331"


async def test_rewrite_and_redirect_of_the_bound_virtual_service(setup: Setup) -> None:
    _, _, body = await _get(setup.http, "/api/items")
    assert json.loads(body)["line"] == "GET /items HTTP/1.1"
    status, headers, _ = await _get(setup.http, "/old/page")
    assert status.startswith("HTTP/1.1 301")
    assert headers["location"] == f"http://{HOST}/new/"


async def test_a_host_no_virtual_service_binds_gets_404_nr(setup: Setup) -> None:
    status, headers, _ = await _get(setup.http, "/", host="unknown.example.org")
    assert status.startswith("HTTP/1.1 404")
    assert headers["x-shoal-response-flags"] == "NR"


async def test_a_new_certificate_in_the_secret_is_served_without_a_restart(
        setup: Setup) -> None:
    ca2 = CertificateAuthority.create("rotated-ca")
    key = new_key()
    leaf = ca2.issue(key.public_key(), common_name=HOST, dns_names=[HOST], server=True)
    secret = core_pb2.Secret(type="kubernetes.io/tls")
    secret.metadata.name, secret.metadata.namespace = "bookinfo-cert", "istio-system"
    secret.metadata.resource_version = "2"
    secret.data["tls.crt"], secret.data["tls.key"] = cert_pem(leaf), key_pem(key)
    g = setup.gateway
    g.credentials.update({"istio-system/bookinfo-cert": secret},
                         [gw.Tls("bookinfo-cert", "SIMPLE")])
    status, _, _ = await _get(setup.https, "/", ctx=_client(cert_pem(ca2.cert)))
    assert status == "HTTP/1.1 200 OK"
    with pytest.raises(ssl.SSLCertVerificationError):
        await _get(setup.https, "/", ctx=_client(setup.ca_pem))


async def test_the_route_timeout_cuts_a_slow_answer_with_504_ut(setup: Setup) -> None:
    status, headers, _ = await _get(setup.http, "/slow")
    assert status.startswith("HTTP/1.1 504")
    assert headers["x-shoal-response-flags"] == "UT"
    _, _, body = await _get(setup.http, "/api/fast")  # the gateway goes on serving
    assert json.loads(body)["line"] == "GET /fast HTTP/1.1"


async def test_one_client_connection_carries_several_requests(setup: Setup) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", setup.https, ssl=_client(setup.ca_pem),
                                         server_hostname=HOST)
    try:
        first = await _send(r, w, "/api/one", host=HOST)
        second = await _send(r, w, "/two", host=HOST)
    finally:
        w.close()
    assert first[0] == second[0] == "HTTP/1.1 200 OK"
    assert "connection" not in first[1]  # kept alive
    assert json.loads(first[2])["line"] == "GET /one HTTP/1.1"
    assert json.loads(second[2])["line"] == "GET /two HTTP/1.1"
    assert [x["x-forwarded-proto"] for x in setup.seen] == ["https", "https"]


async def test_a_retry_on_5xx_recovers_from_a_failing_first_try(setup: Setup) -> None:
    status, _, body = await _get(setup.http, "/flaky")
    assert status == "HTTP/1.1 200 OK"
    assert json.loads(body)["line"] == "GET /flaky HTTP/1.1"
    assert [x["request-line"] for x in setup.seen] == ["GET /flaky HTTP/1.1"] * 2
    # One request, recorded once as the gateway's (the retry is inside it).
    metrics = generate_latest(setup.registry).decode()
    assert metric_total(metrics, "istio_requests_total", reporter="source",
                        source_workload="istio-ingressgateway", response_code="200",
                        destination_service="web.bookinfo.svc.cluster.local") == 1


# -- MUTUAL TLS and x-forwarded-client-cert -------------------------------------------------


def _client_with_cert(setup: Setup, tmp: Path, *, uri: str) -> tuple[ssl.SSLContext, bytes]:
    """A client context presenting a certificate of the test CA (CN=client, URI
    ``uri``); the certificate's DER."""
    key = new_key()
    leaf = setup.ca.issue(key.public_key(), common_name="client", uris=[uri], client=True)
    (tmp / "client.pem").write_bytes(cert_pem(leaf) + key_pem(key))
    ctx = _client(setup.ca_pem)
    ctx.load_cert_chain(tmp / "client.pem")
    return ctx, leaf.public_bytes(serialization.Encoding.DER)


async def test_mutual_tls_refuses_a_client_without_a_certificate(setup: Setup) -> None:
    """The port also serves a SIMPLE host: the handshake only asks for a
    certificate, and the MUTUAL server's connection without one is closed."""
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _get(setup.mtls, "/", ctx=_client(setup.ca_pem))
    assert setup.seen == []  # nothing reached the service
    # The SIMPLE server of the same port needs no certificate (no route: 404 NR).
    ctx = _client(setup.ca_pem)
    ctx.check_hostname = False  # the Secret's certificate names HOST only
    status, headers, _ = await _get(setup.mtls, "/", host=OPEN_HOST, ctx=ctx)
    assert status.startswith("HTTP/1.1 404") and headers["x-shoal-response-flags"] == "NR"


async def test_mutual_tls_refuses_a_certificate_of_another_ca(setup: Setup,
                                                              tmp_path: Path) -> None:
    other = CertificateAuthority.create("someone-else")
    key = new_key()
    leaf = other.issue(key.public_key(), common_name="client", client=True)
    (tmp_path / "c.pem").write_bytes(cert_pem(leaf) + key_pem(key))
    ctx = _client(setup.ca_pem)
    ctx.load_cert_chain(tmp_path / "c.pem")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _get(setup.mtls, "/", ctx=ctx)
    assert setup.seen == []


async def test_mutual_tls_forwards_the_client_certificate_details(setup: Setup,
                                                                 tmp_path: Path) -> None:
    uri = CLIENT_URI
    ctx, der = _client_with_cert(setup, tmp_path, uri=uri)
    status, _, body = await _get(setup.mtls, "/", ctx=ctx,
                                 extra="X-Forwarded-Client-Cert: By=forged\r\n")
    assert status == "HTTP/1.1 200 OK"
    xfcc = json.loads(body)["headers"]["x-forwarded-client-cert"]
    # Istio's gateways' SANITIZE_SET: the client's own header gone, ours set.
    assert xfcc == f'Hash={hashlib.sha256(der).hexdigest()};Subject="CN=client";URI={uri}'


async def test_a_client_sent_x_forwarded_client_cert_is_dropped_without_mtls(
        setup: Setup) -> None:
    _, _, body = await _get(setup.http, "/", extra="X-Forwarded-Client-Cert: By=forged\r\n")
    assert "x-forwarded-client-cert" not in json.loads(body)["headers"]


async def test_mutual_tls_refuses_a_certificate_not_in_subject_alt_names(
        setup: Setup, tmp_path: Path) -> None:
    ctx, _ = _client_with_cert(setup, tmp_path, uri="spiffe://example.org/ns/shop/sa/other")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _get(setup.mtls, "/", ctx=ctx)
    assert setup.seen == []
