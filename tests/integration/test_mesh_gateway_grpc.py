"""gRPC through the ingress gateway on loopback: grpcio clients over TLS (ALPN h2, the
certificate of a kubernetes.io/tls Secret) and over h2c (a GRPC server port) reach a
grpcio app outside the mesh by the VirtualService bound to the Gateway. The gateway
adds its trace context and x-forwarded-for, passes gRPC statuses and streams through,
answers an unbound host itself (trailers-only, UNIMPLEMENTED, flag NR) and records each
call as gRPC; HTTP/1.1 on the same HTTPS port still works."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from apiserver.pki import CertificateAuthority, cert_pem
from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.testing import grpcecho
from shoal.testing.apiserver import free_port
from shoal.testing.istio import loopback_gateway, loopback_service, spec_object, tls_secret
from shoal.testing.metrics import metric_total

LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}
HOST = "greeter.example.com"


@dataclass
class Setup:
    tls: int  # HTTPS, SIMPLE
    h2c: int  # a GRPC server: plaintext
    ca_pem: bytes
    seen: list[dict[str, str]]  # each call's metadata as the app got it
    registry: CollectorRegistry


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    seen: list[dict[str, str]] = []
    app, app_port = await grpcecho.start("127.0.0.1:0", seen)
    ca = CertificateAuthority.create("test-grpc-ingress-ca")
    secret = tls_secret(ca, host=HOST, name="greeter-cert", namespace="istio-system")
    tls, h2c = free_port(), free_port()
    gateway = spec_object(pb.Gateway, f"""
selector: {{istio: ingressgateway}}
servers:
- port: {{number: {tls}, name: https, protocol: HTTPS}}
  hosts: ["{HOST}"]
  tls: {{mode: SIMPLE, credentialName: greeter-cert}}
- port: {{number: {h2c}, name: grpc, protocol: GRPC}}
  hosts: ["*"]
""", name="grpc-gateway", namespace="istio-system")
    vs = spec_object(pb.VirtualService, f"""
hosts: ["{HOST}"]
gateways: ["istio-system/grpc-gateway"]
http:
- match: [{{uri: {{prefix: /old/}}}}]
  redirect: {{uri: /new/}}
- route: [{{destination: {{host: greeter, port: {{number: 50051}}}}}}]
""", name="greeter", namespace="shop")
    svc, eps = loopback_service("greeter", "shop", port_name="grpc", port=50051,
                                target_port=app_port)
    registry = CollectorRegistry()
    g = loopback_gateway(registry, labels=LABELS, gateways=[gateway], virtual_services=[vs],
                         services=[svc], endpoints=[eps],
                         secrets={"istio-system/greeter-cert": secret})
    try:
        await g.apply()
        assert g.listening() == {tls: "HTTPS", h2c: "HTTP"}
        yield Setup(tls=tls, h2c=h2c, ca_pem=cert_pem(ca.cert), seen=seen, registry=registry)
    finally:
        await g.close()
        await app.stop(None)


async def _counted(setup: Setup, want: float, **labels: str) -> float:
    """istio_requests_total with ``labels``, once it is ``want`` (the gateway records a
    call right after its last frame went out), or what it is after 5 s."""
    loop = asyncio.get_running_loop()
    until = loop.time() + 5
    while True:
        got = metric_total(generate_latest(setup.registry).decode(),
                           "istio_requests_total", **labels)
        if got == want or loop.time() > until:
            return got
        await asyncio.sleep(0.02)


def _tls_channel(setup: Setup) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=setup.ca_pem)
    return grpc.aio.secure_channel(f"127.0.0.1:{setup.tls}", creds, options=[
        ("grpc.ssl_target_name_override", HOST), ("grpc.default_authority", HOST)])


def _h2c_channel(setup: Setup, authority: str = HOST) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{setup.h2c}",
                                     options=[("grpc.default_authority", authority)])


async def test_a_grpc_call_over_tls_reaches_the_app_with_the_gateways_headers(
        setup: Setup) -> None:
    async with _tls_channel(setup) as ch:
        got = await ch.unary_unary("/test.Echo/Say", None, None)(b"hi", timeout=10)
    assert got == b"hi!"
    [sent] = setup.seen
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "https"
    assert sent["traceparent"].startswith("00-") and sent["x-b3-traceid"]
    assert sent["x-request-id"]
    assert await _counted(setup, 1, reporter="source",
                          source_workload="istio-ingressgateway", request_protocol="grpc",
                          response_code="200", grpc_response_status="0",
                          destination_service="greeter.shop.svc.cluster.local") == 1


async def test_grpc_over_h2c_passes_statuses_and_streams_through(setup: Setup) -> None:
    async with _h2c_channel(setup) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await ch.unary_unary("/test.Echo/Missing", None, None)(b"", timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "no such greeting"
        pieces = [m async for m in ch.unary_stream("/test.Echo/Count", None, None)(
            b"50", timeout=10)]
        assert pieces == [str(i).encode() * 1000 for i in range(50)]
        assert await ch.unary_unary("/test.Echo/Say", None, None)(b"a", timeout=10) == b"a!"
    assert setup.seen[0]["x-forwarded-proto"] == "http"
    assert await _counted(setup, 1, request_protocol="grpc", grpc_response_status="5") == 1


async def test_a_host_no_virtual_service_binds_gets_unimplemented_with_flag_nr(
        setup: Setup) -> None:
    async with _h2c_channel(setup, authority="nobody.example.org") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/test.Echo/Say", None, None)(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert ("x-shoal-response-flags", "NR") in list(err.value.trailing_metadata() or ())
    assert setup.seen == []
    assert await _counted(setup, 1, response_code="404", response_flags="NR",
                          request_protocol="grpc") == 1


async def test_a_client_offering_h2_and_http11_gets_http11(setup: Setup) -> None:
    """As curl and browsers do: the listener prefers http/1.1, which every destination
    speaks (here the gRPC app answers it with an HTTP error, through the gateway)."""
    ctx = ssl.create_default_context(cadata=setup.ca_pem.decode())
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    r, w = await asyncio.open_connection("127.0.0.1", setup.tls, ssl=ctx,
                                         server_hostname=HOST)
    try:
        obj = w.get_extra_info("ssl_object")
        assert obj.selected_alpn_protocol() == "http/1.1"
        w.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        status = (await asyncio.wait_for(r.readline(), 10)).decode()
    finally:
        w.close()
    assert status.startswith("HTTP/1.1 ")



async def _h2_head(port: int, path: str, *, scheme: str, tls: ssl.SSLContext | None
                   ) -> dict[bytes, bytes]:
    """One HTTP/2 GET (h2 by ALPN over ``tls``, else h2c); the response head."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                         server_hostname=HOST if tls else None)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", scheme), (":authority", HOST),
                          (":path", path)], end_stream=True)
    w.write(conn.data_to_send())
    head: dict[bytes, bytes] = {}
    try:
        async with asyncio.timeout(10):
            while not head:
                data = await r.read(65536)
                assert data, "the gateway closed the connection"
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        head = dict(ev.headers or ())
                w.write(conn.data_to_send())
    finally:
        w.close()
    return head


async def test_a_redirect_over_h2_says_the_connections_scheme(setup: Setup) -> None:
    """A VirtualService redirect without a scheme: https:// to a client over TLS (the
    HTTP/2 path used to say http:// whatever came), and http:// over h2c even when
    the client's :scheme claims https (the connection decides, as for HTTP/1.1)."""
    ctx = ssl.create_default_context(cadata=setup.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    head = await _h2_head(setup.tls, "/old/page", scheme="https", tls=ctx)
    assert head[b":status"] == b"301"
    assert head[b"location"] == f"https://{HOST}/new/".encode()
    head = await _h2_head(setup.h2c, "/old/page", scheme="https", tls=None)
    assert head[b":status"] == b"301"
    assert head[b"location"] == f"http://{HOST}/new/".encode()
