"""gRPC through the mesh's HTTP/2 proxy on loopback: a grpcio client -> the client-side
proxy (routing, cluster, pick) -> the server-side proxy (L7 authorization) -> a grpcio
server; telemetry from both sides carries grpc_response_status. Both proxies are
``Dispatch``: an HTTP/1.1 request on the same listener goes to the HTTP/1.1 engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import json_format

from meshagent import relay
from meshagent.l7 import routes, telemetry, upstream
from meshagent.l7.engine import Engine, HttpRequest, Peer, Pod, Service
from meshagent.l7.http2 import Dispatch
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.testing import grpcecho

HOST = "greeter.default.svc.cluster.local"
SERVICE_PORT = 50051


def _clusters(port: int) -> upstream.Clusters:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "greeter", "default"
    svc.spec.cluster_ip = "10.96.0.50"
    svc.spec.ports.add(name="grpc", port=SERVICE_PORT)
    ep = core_pb2.Endpoints()
    ep.metadata.name, ep.metadata.namespace = "greeter", "default"
    sub = ep.subsets.add()
    sub.addresses.add(ip="127.0.0.1")
    sub.ports.add(name="grpc", port=port)
    cs = upstream.Clusters()
    cs.update(services=[svc], endpoints=[ep])
    return cs


async def _listen(serve: Callable[[relay.SocketEnd], None]) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: relay.SocketEnd(serve), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@dataclass
class Mesh:
    records: list[telemetry.RequestRecord]
    port: int  # the client-side proxy


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    app, app_port = await grpcecho.start("127.0.0.1:0")
    records: list[telemetry.RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    def authorize(*, source: Peer, dst: Pod, port: int, mtls: bool,
                  request: HttpRequest) -> tuple[bool, str]:
        return (not request.path.endswith("/Forbidden"), "path denied")

    server_engine = Engine(node="node-2", route_table=routes.RouteTable,
                           clusters=upstream.Clusters, pod=lambda ip: None,
                           record=records.append, authorize=authorize)
    server_side = Dispatch(server_engine)
    dst = Pod(ip="127.0.0.1", name="greeter-1", namespace="default", workload="greeter",
              principal="cluster.local/ns/default/sa/greeter", node_local=True, meshed=True)
    source = Peer(ip="127.0.0.1", workload="client", namespace="default",
                  principal="cluster.local/ns/default/sa/client", meshed=True)
    inbound, in_port = await _listen(lambda end: spawn(server_side.inbound(
        end, source=source, dst=dst, port=app_port, mtls=True)))

    async def to_inbound(ip: str, port: int) -> relay.End:
        assert (ip, port) == ("127.0.0.1", app_port)   # the endpoint the cluster picked
        _, end = await asyncio.get_running_loop().create_connection(
            relay.SocketEnd, "127.0.0.1", in_port)
        return end

    teapot = json_format.ParseDict({
        "metadata": {"name": "greeter", "namespace": "default"},
        "spec": {"hosts": ["greeter"], "http": [
            {"match": [{"uri": {"prefix": "/teapot"}}],
             "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "greeter"}}]},
            {"route": [{"destination": {"host": "greeter"}}]}]}},
        traffic_pb2.VirtualService())
    table = routes.RouteTable()
    table.update([teapot], [], [])
    clusters = _clusters(app_port)
    client_engine = Engine(node="node-1", route_table=lambda: table, clusters=lambda: clusters,
                           pod=lambda ip: None, record=records.append, connect=to_inbound)
    client_side = Dispatch(client_engine)
    service = Service(host=HOST, port=SERVICE_PORT, name="greeter", namespace="default")
    outbound, out_port = await _listen(lambda end: spawn(client_side.outbound(
        end, source=source, service=service)))
    yield Mesh(records=records, port=out_port)
    for s in (outbound, inbound):
        s.close()
    await client_side.close()
    await server_side.close()
    for t in list(tasks):
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await app.stop(None)


def _by(records: list[telemetry.RequestRecord], path: str, reporter: str
        ) -> telemetry.RequestRecord:
    return next(r for r in records if r.path == path and r.reporter == reporter)


async def _settled(mesh: Mesh, n: int) -> None:
    async with asyncio.timeout(5):
        while len(mesh.records) < n:
            await asyncio.sleep(0.01)


async def test_grpc_calls_through_both_proxies(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as ch:
        assert await ch.unary_unary("/test.Echo/Say", None, None)(b"hi", timeout=5) == b"hi!"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await ch.unary_unary("/test.Echo/Missing", None, None)(b"x", timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert missing.value.details() == "no such greeting"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await ch.unary_unary("/test.Echo/Forbidden", None, None)(b"x", timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        count = ch.unary_stream("/test.Echo/Count", None, None)
        got = [m async for m in count(b"50", timeout=5)]
        assert got == [str(i).encode() * 1000 for i in range(50)]     # 190 kB streamed back

        async def parts() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"x" * 50_000                                      # 2 MB streamed up
        total = await ch.stream_unary("/test.Echo/Sum", None, None)(parts(), timeout=10)
        assert total == b"2000000"
    await _settled(mesh, 10)
    say = _by(mesh.records, "/test.Echo/Say", "source")
    assert (say.request_protocol, say.response_code, say.grpc_response_status,
            say.response_flags) == ("grpc", 200, "0", "")
    assert say.upstream_cluster == f"outbound|{SERVICE_PORT}||{HOST}"
    assert say.protocol == "HTTP/2"
    server = _by(mesh.records, "/test.Echo/Say", "destination")
    assert (server.request_protocol, server.grpc_response_status, server.destination_workload,
            server.connection_security_policy) == ("grpc", "0", "greeter", "mutual_tls")
    assert _by(mesh.records, "/test.Echo/Missing", "source").grpc_response_status == "5"
    assert _by(mesh.records, "/test.Echo/Missing", "destination").grpc_response_status == "5"
    deny = _by(mesh.records, "/test.Echo/Forbidden", "destination")
    assert (deny.response_code, deny.response_flags, deny.grpc_response_status) == (
        403, "DENY", "7")
    assert _by(mesh.records, "/test.Echo/Forbidden", "source").grpc_response_status == "7"
    assert _by(mesh.records, "/test.Echo/Sum", "source").request_bytes == 40 * 50_005


async def test_http1_on_the_same_listener_goes_to_the_http1_engine(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.port)
    writer.write(b"GET /teapot HTTP/1.1\r\nHost: greeter\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 418 "), answer
    await _settled(mesh, 1)
    rec = _by(mesh.records, "/teapot", "source")
    assert (rec.response_code, rec.response_flags, rec.protocol) == (418, "FI", "HTTP/1.1")
