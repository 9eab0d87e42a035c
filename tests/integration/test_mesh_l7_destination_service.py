"""The destination reporter names the Service a request was for, as Istio's does:
requests cross two agents (n1's L7 engine, the mTLS tunnel, n2's server side) to
a pod behind two Services (web and web-all), so only the request's Host /
:authority can say which one; n2's istio_requests_total carries it, for
HTTP/1.1 and for gRPC (HTTP/2). Loopback, a fake original destination."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events
from test_mesh_tunnel import CLIENT_IP, SERVER_IP, _agent, _pod

from meshagent.daemon import MeshAgent
from shoal.api.core.v1 import core_pb2
from shoal.testing.apiserver import InProcessAPIServer, free_port
from shoal.testing.waiting import eventually

WEB = "web.default.svc.cluster.local"
PORTS = {"http": 80, "grpc": 50051}  # the Services' port names and numbers


# What the apps got in x-forwarded-client-cert, in order (None: no such header).
XFCC_SEEN: list[str | None] = []


async def _web(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while (line := await r.readline()) and line.strip():
        xfcc = None
        while (h := await r.readline()).strip():
            name, _, value = h.decode().partition(":")
            if name.strip().lower() == "x-forwarded-client-cert":
                xfcc = value.strip()
        XFCC_SEEN.append(xfcc)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
    w.close()


async def _say(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    XFCC_SEEN.append(dict(context.invocation_metadata() or ()).get(
        "x-forwarded-client-cert"))
    return request + b"!"


def _services(targets: dict[str, int]) -> list[core_pb2.Service | core_pb2.Endpoints]:
    """Services web and web-all, both with the web pod on both ports."""
    out: list[core_pb2.Service | core_pb2.Endpoints] = []
    for name in ("web", "web-all"):
        svc, ep = core_pb2.Service(), core_pb2.Endpoints()
        svc.metadata.name = ep.metadata.name = name
        svc.metadata.namespace = ep.metadata.namespace = "default"
        sub = ep.subsets.add()
        sub.addresses.add(ip=SERVER_IP)
        for port_name, port in PORTS.items():
            svc.spec.ports.add(name=port_name, port=port,
                               target_port={"int_val": targets[port_name]})
            sub.ports.add(name=port_name, port=targets[port_name], protocol="TCP")
        out += [svc, ep]
    return out


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def _mesh(tmp: Path, port_name: str) -> AsyncIterator[tuple[MeshAgent, MeshAgent]]:
    """n1 (the client pod's node) and n2 (web's), n1's outbound connections going
    to web's ``port_name`` port. Each part is stopped, last first, however far
    the start got."""
    http_port, grpc_port = free_port(), free_port()
    async with AsyncExitStack() as stack:
        http = await asyncio.start_server(_web, SERVER_IP, http_port)
        stack.callback(http.close)
        app = grpc.aio.server()
        app.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_say)}),))
        app.add_insecure_port(f"{SERVER_IP}:{grpc_port}")
        await app.start()
        stack.push_async_callback(app.stop, None)
        api = await stack.enter_async_context(InProcessAPIServer(tmp))
        c = await stack.enter_async_context(api.client())
        await _pod(c, "default", "sleep", node="n1", ip=CLIENT_IP, sa="sleep", app="sleep")
        await _pod(c, "default", "web", node="n2", ip=SERVER_IP, sa="web", app="web")
        cluster_ip = ""
        for obj in _services({"http": http_port, "grpc": grpc_port}):
            created = await c.create(obj)
            if isinstance(created, core_pb2.Service) and created.metadata.name == "web":
                cluster_ip = str(created.spec.cluster_ip)
        vip = (cluster_ip, PORTS[port_name])
        tunnel_port = free_port()
        agents = []
        for node, ip in (("n1", CLIENT_IP), ("n2", SERVER_IP)):
            agent, client, task = await _agent(api, node, ip, tunnel_port, vip)
            stack.push_async_callback(client.close)
            stack.push_async_callback(_stopped, task)
            agents.append(agent)
        n1, n2 = agents

        async def ready() -> bool:
            route = n1.routes().get(vip)
            return (n1.captured_ips() == [CLIENT_IP] and n2.captured_ips() == [SERVER_IP]
                    and bool(route and route.endpoints))
        await eventually("both agents ready", ready)
        yield n1, n2


async def _counted(agent: MeshAgent, reporter: str,
                   want: dict[tuple[str, str, str], float]) -> bool:
    return _requests(agent, reporter) == want


def _requests(agent: MeshAgent, reporter: str) -> dict[tuple[str, str, str], float]:
    """istio_requests_total by (destination_service, its name, its namespace)."""
    out: dict[tuple[str, str, str], float] = {}
    for m in agent.registry.collect():
        for s in m.samples:
            if s.name == "istio_requests_total" and s.labels["reporter"] == reporter:
                key = (s.labels["destination_service"], s.labels["destination_service_name"],
                       s.labels["destination_service_namespace"])
                out[key] = out.get(key, 0.0) + s.value
    return out


async def test_http1_the_host_names_the_service(tmp_path: Path) -> None:
    async with _mesh(tmp_path, "http") as (n1, n2):
        r, w = await asyncio.open_connection(n1.outbound.host, n1.outbound.port,
                                             local_addr=(CLIENT_IP, 0))
        for host in ("web", "web.default.svc.cluster.local:80", "web-all.default",
                     "10.96.0.1"):
            w.write(b"GET / HTTP/1.1\r\nhost: %s\r\n\r\n" % host.encode())
            assert (await asyncio.wait_for(r.readline(), 10)).split()[1] == b"200"
            while (await r.readline()).strip():
                pass
            assert await r.readexactly(2) == b"ok"
        w.close()
        want = {(WEB, "web", "default"): 2.0,
                ("web-all.default.svc.cluster.local", "web-all", "default"): 1.0,
                # two Services have the pod: a host that names neither stays unknown
                ("unknown", "unknown", "unknown"): 1.0}
        await eventually("n2 counted the requests", lambda: _counted(n2, "destination", want))
        # The source reporter names the Service whose ClusterIP the client dialled.
        assert _requests(n1, "source") == {(WEB, "web", "default"): 4.0}


async def test_grpc_the_authority_names_the_service(tmp_path: Path) -> None:
    XFCC_SEEN.clear()
    async with _mesh(tmp_path, "grpc") as (n1, n2):
        r, w = await asyncio.open_connection(n1.outbound.host, n1.outbound.port,
                                             local_addr=(CLIENT_IP, 0))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"),
                                (":path", "/test.Echo/Say"),
                                (":authority", "web.default:50051"),
                                ("content-type", "application/grpc"), ("te", "trailers")])
        conn.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
        w.write(conn.data_to_send())
        data, trailers, ended = b"", {}, False
        while not ended:
            chunk = await asyncio.wait_for(r.read(65536), 10)
            assert chunk, "the connection closed before the response ended"
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
            w.write(conn.data_to_send())
        w.close()
        assert trailers.get("grpc-status") == "0" and data.endswith(b"hi!")
        # The gRPC app sees the caller's identity too (metadata).
        assert len(XFCC_SEEN) == 1 and XFCC_FORM.fullmatch(XFCC_SEEN[0] or ""), XFCC_SEEN
        await eventually("n2 counted the call", lambda: _counted(
            n2, "destination", {(WEB, "web", "default"): 1.0}))


# Istio's sidecar form: the server's own SPIFFE ID, the client certificate's hash,
# an empty Subject (SPIFFE certificates have none) and the client's SPIFFE ID.
XFCC_FORM = re.compile(r'By=spiffe://cluster\.local/ns/default/sa/web;Hash=[0-9a-f]{64};'
                       r'Subject="";URI=spiffe://cluster\.local/ns/default/sa/sleep')


async def test_the_app_gets_the_callers_identity_in_x_forwarded_client_cert(
        tmp_path: Path) -> None:
    XFCC_SEEN.clear()
    async with _mesh(tmp_path, "http") as (n1, _):
        r, w = await asyncio.open_connection(n1.outbound.host, n1.outbound.port,
                                             local_addr=(CLIENT_IP, 0))
        for extra in (b"", b"x-forwarded-client-cert: By=upstream\r\n"):
            w.write(b"GET / HTTP/1.1\r\nhost: web\r\n%s\r\n" % extra)
            assert (await asyncio.wait_for(r.readline(), 10)).split()[1] == b"200"
            while (await r.readline()).strip():
                pass
            assert await r.readexactly(2) == b"ok"
        w.close()
    first, second = XFCC_SEEN
    assert first is not None and XFCC_FORM.fullmatch(first), first
    # One the request already had is kept, ours after it (APPEND_FORWARD).
    assert second == f"By=upstream,{first}"
