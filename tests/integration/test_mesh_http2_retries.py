"""Retries, timeouts and mirroring of the mesh's HTTP/2 proxy on loopback: a grpcio (or a
plain h2c) client -> the client-side proxy -> scriptable HTTP/2 backends, v1 on 127.0.0.2
and v2 on 127.0.0.3 (the same port), endpoints of one Service "greeter" with a gRPC port,
routed by VirtualServices and DestinationRules compiled by the agent's own code.

A backend answers each stream as the next word of its ``script`` says (then "ok"), once it
has read the whole request: "ok" (a gRPC answer naming the backend and the body's size),
"503", "reset" (RST_STREAM), "refused" (RST_STREAM REFUSED_STREAM), "unavailable"
(trailers-only grpc-status 14), "unavailable-late" (a head, then trailers with
grpc-status 14), "slow" (answers after 30 s)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import h2.errors
import pytest
import yaml
from google.protobuf import json_format

from meshagent import relay
from meshagent.l7 import routes, telemetry, upstream
from meshagent.l7.engine import Engine, Peer, Service
from meshagent.l7.http2 import RETRY_BUFFER, Dispatch, H2Connection, Headers
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb

HOST = "greeter.default.svc.cluster.local"
V1, V2 = "127.0.0.2", "127.0.0.3"
SERVICE_PORT = 50051
SUBSETS = "host: greeter\nsubsets: [{name: v1, labels: {version: v1}}, " \
          "{name: v2, labels: {version: v2}}]"


def _grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class Tasks(set[asyncio.Task[None]]):
    """Tasks started for a test, cancelled at its end."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self.add(t)
        t.add_done_callback(self.discard)

    async def cancel(self) -> None:
        for t in list(self):
            t.cancel()
        await asyncio.gather(*self, return_exceptions=True)


class Backend:
    """An HTTP/2 server on ``ip``:``port``; ``seen`` holds each stream's (headers, body)."""

    def __init__(self, name: str, ip: str) -> None:
        self.name, self.ip, self.port = name, ip, 0
        self.script: list[str] = []
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.server: asyncio.Server | None = None
        self.tasks = Tasks()

    async def start(self, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: relay.SocketEnd(lambda end: self.tasks.spawn(self._serve(end))), self.ip, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.tasks.cancel()

    async def _serve(self, end: relay.End) -> None:
        conn = H2Connection(end, client=False)
        try:
            while (sid := await conn.incoming.get()) is not None:
                self.tasks.spawn(self._stream(conn, sid))
        finally:
            conn.close()

    async def _stream(self, conn: H2Connection, sid: int) -> None:
        _, head = await conn.next_event(sid)
        if self.script[:1] == ["503-early"]:  # answers before reading the body
            self.script.pop(0)
            self.seen.append((dict(head), b""))
            conn.send_headers(sid, [(":status", "503")], end_stream=True)
            return
        body = b""
        while (ev := await conn.next_event(sid))[0] == "data":
            body += ev[1]
        if ev[0] == "reset":
            return
        self.seen.append((dict(head), body))
        how = self.script.pop(0) if self.script else "ok"
        if how == "slow":
            await asyncio.sleep(30)
        if how == "reset":
            conn.reset(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif how == "refused":
            conn.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif how == "503":
            conn.send_headers(sid, [(":status", "503"), ("content-length", "4")])
            await conn.send_data(sid, b"busy", end_stream=True)
        elif how == "unavailable":
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                    ("grpc-status", "14"), ("grpc-message", "later")],
                              end_stream=True)
        else:
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            if how == "unavailable-late":
                conn.send_headers(sid, [("grpc-status", "14")], end_stream=True)
                return
            await conn.send_data(sid, _grpc_frame(f"{self.name} got {len(body)}".encode()))
            conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)


@dataclass
class World:
    port: int  # the client-side proxy
    backends: dict[str, Backend]
    table: routes.RouteTable
    clusters: upstream.Clusters
    records: list[telemetry.RequestRecord]

    def apply(self, vs: str, dr: str = SUBSETS) -> None:
        def parsed(cls: Any, **fields: Any) -> Any:
            meta = {"name": "greeter", "namespace": "default"}
            return json_format.ParseDict({"metadata": meta, **fields}, cls())

        svc = parsed(core_pb2.Service, spec={"clusterIP": "10.96.0.50", "ports": [
            {"name": "grpc", "port": SERVICE_PORT}]})
        eps = parsed(core_pb2.Endpoints, subsets=[
            {"addresses": [{"ip": b.ip, "labels": {"version": b.name}}],
             "ports": [{"name": "grpc", "port": b.port}]} for b in self.backends.values()])
        self.table.update([parsed(pb.VirtualService, spec=yaml.safe_load(vs))], [svc])
        self.clusters.update(services=[svc], endpoints=[eps], destination_rules=[
            parsed(pb.DestinationRule, spec=yaml.safe_load(dr))])

    def source_record(self) -> telemetry.RequestRecord:
        return next(r for r in reversed(self.records) if r.reporter == "source")


@pytest.fixture
async def world() -> AsyncIterator[World]:
    backends = {"v1": Backend("v1", V1), "v2": Backend("v2", V2)}
    await backends["v2"].start(await backends["v1"].start())  # the same port
    table, clusters = routes.RouteTable(), upstream.Clusters()
    records: list[telemetry.RequestRecord] = []
    engine = Engine(node="node-1", route_table=lambda: table, clusters=lambda: clusters,
                    pod=lambda ip: None, record=records.append)
    proxy = Dispatch(engine)
    source = Peer(ip="127.0.0.1", workload="client", namespace="default")
    service = Service(host=HOST, port=SERVICE_PORT, name="greeter", namespace="default")
    tasks = Tasks()
    listener = await asyncio.get_running_loop().create_server(
        lambda: relay.SocketEnd(lambda end: tasks.spawn(
            proxy.outbound(end, source=source, service=service))), "127.0.0.1", 0)
    yield World(port=listener.sockets[0].getsockname()[1], backends=backends, table=table,
                clusters=clusters, records=records)
    listener.close()
    await tasks.cancel()
    await proxy.close()
    for b in backends.values():
        await b.stop()


@contextlib.asynccontextmanager
async def _channel(world: World) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
            f"127.0.0.1:{world.port}",
            options=[("grpc.default_authority", "greeter"),
                     ("grpc.enable_retries", 0)]) as ch:
        yield ch


async def _say(world: World, message: bytes = b"hi") -> bytes:
    async with _channel(world) as ch:
        answer: bytes = await ch.unary_unary("/test.Echo/Say", None, None)(message, timeout=10)
        return answer


async def _h2c_post(world: World, *parts: bytes,
                    between: Callable[[], Awaitable[None]] | None = None,
                    heads: list[Headers] | None = None) -> tuple[int, bytes]:
    """A plain (not gRPC) HTTP/2 request with prior knowledge, its body sent in ``parts``
    (``between`` awaited after each but the last): the answer's status and body (its
    head appended to ``heads``)."""
    _, end = await asyncio.get_running_loop().create_connection(
        relay.SocketEnd, "127.0.0.1", world.port)
    conn = H2Connection(end, client=True)
    try:
        sid = conn.open_stream()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/up"),
                                (":authority", "greeter")])
        for i, part in enumerate(parts):
            await conn.send_data(sid, part, end_stream=i == len(parts) - 1)
            if between is not None and i < len(parts) - 1:
                await between()
        head: Headers = []
        got = b""
        async with asyncio.timeout(10):
            while (ev := await conn.next_event(sid))[0] not in ("end", "reset"):
                if ev[0] == "headers":
                    head = ev[1]
                elif ev[0] == "data":
                    got += ev[1]
        if heads is not None:
            heads.append(head)
        return int(dict(head)[":status"]), got
    finally:
        conn.close()


def _retries(retries: str, *, extra: str = "") -> str:
    return f"hosts: [greeter]\nhttp: [{{retries: {{{retries}}}, {extra}" \
           "route: [{destination: {host: greeter, subset: v1}}]}]"


# -- response headers ----------------------------------------------------------------------


async def test_the_routes_response_header_operations_apply_to_upstream_answers(
        world: World) -> None:
    world.apply("""
hosts: [greeter]
http:
- headers: {response: {set: {x-route: r}, add: {x-added: a}, remove: [content-type]}}
  route:
  - destination: {host: greeter, subset: v1}
    headers: {response: {set: {x-dest: d}}}
""")
    heads: list[Headers] = []
    status, _ = await _h2c_post(world, b"hello", heads=heads)
    got = dict(heads[0])
    assert status == 200 and got[":status"] == "200"
    assert (got.get("x-route"), got.get("x-added"), got.get("x-dest")) == ("r", "a", "d")
    assert "content-type" not in got  # the backend sends it; the route removes it


# -- outlier detection ---------------------------------------------------------------------


async def test_outlier_detection_ejects_an_endpoint_answering_grpc_unavailable(
        world: World) -> None:
    """A trailers-only UNAVAILABLE counts as a 503 (as Envoy's router reports it), so
    two in a row eject v1; its answers' :status is 200 all the same."""
    world.apply("hosts: [greeter]\nhttp: [{retries: {attempts: 0}, "
                "route: [{destination: {host: greeter}}]}]",
                SUBSETS + "\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, "
                "outlierDetection: {consecutive5xxErrors: 2, interval: 1s, "
                "baseEjectionTime: 60s, maxEjectionPercent: 100}}")
    v1 = world.backends["v1"]
    v1.script = ["unavailable"] * 20
    for _ in range(10):  # until v1 has answered twice (every other call)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await _say(world)
        if len(v1.seen) == 2:
            break
    assert len(v1.seen) == 2
    for _ in range(6):
        assert await _say(world) == b"v2 got 7"  # v1 ejected: none go to it
    assert len(v1.seen) == 2
    cluster = world.clusters.get(HOST, SERVICE_PORT)
    assert cluster is not None and [ep.ip for ep in cluster.ejected()] == [V1]


async def test_a_grpc_error_in_trailers_after_a_head_does_not_eject(world: World) -> None:
    """As Envoy: outlier detection counts the head's 200; the error in trailers is the
    request's (telemetry's grpc_response_status), not the endpoint's health."""
    world.apply("hosts: [greeter]\nhttp: [{retries: {attempts: 0}, "
                "route: [{destination: {host: greeter, subset: v1}}]}]",
                SUBSETS + "\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 2, "
                "interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}")
    world.backends["v1"].script = ["unavailable-late"] * 3
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await _say(world)
    assert world.source_record().grpc_response_status == "14"
    cluster = world.clusters.get(HOST, SERVICE_PORT, "v1")
    assert cluster is not None and cluster.ejected() == ()


# -- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["503", "reset", "unavailable", "unavailable-late"])
async def test_a_failed_first_try_is_retried(world: World, first: str) -> None:
    world.apply(_retries("attempts: 2, retryOn: '5xx,reset,unavailable'"))
    world.backends["v1"].script = [first]
    assert await _say(world) == b"v1 got 7"       # the retry's answer (2 + 5 framing)
    assert len(world.backends["v1"].seen) == 2
    rec = world.source_record()
    assert (rec.response_code, rec.grpc_response_status, rec.response_flags) == (200, "0", "")


async def test_the_default_policy_retries_a_refused_stream_but_not_a_reset(
        world: World) -> None:
    """Istio's default retries (2 attempts, retryOn connect-failure,refused-stream,
    unavailable,cancelled,retriable-status-codes): a stream the backend refused is sent
    again; one it reset with another code may have done its work and is not."""
    world.apply("hosts: [greeter]\nhttp: [{route: [{destination: {host: greeter, "
                "subset: v1}}]}]")
    world.backends["v1"].script = ["refused"]
    assert await _say(world) == b"v1 got 7"
    assert len(world.backends["v1"].seen) == 2
    world.backends["v1"].script = ["reset"]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _say(world)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(world.backends["v1"].seen) == 3  # tried once
    assert world.source_record().response_flags == "UC"


async def test_grpc_status_retried_only_when_retry_on_names_it(world: World) -> None:
    world.apply(_retries("attempts: 2, retryOn: 5xx"))
    world.backends["v1"].script = ["unavailable"]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _say(world)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(world.backends["v1"].seen) == 1
    assert world.source_record().grpc_response_status == "14"


async def test_exhausted_retries_answer_the_last_try_with_urx(world: World) -> None:
    world.apply(_retries("attempts: 2, retryOn: 5xx"))
    world.backends["v1"].script = ["503", "503", "503"]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _say(world)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(world.backends["v1"].seen) == 3
    rec = world.source_record()
    assert (rec.response_code, rec.response_flags) == (503, "URX")


async def test_h2c_request_body_is_sent_again_on_retry(world: World) -> None:
    world.apply(_retries("attempts: 1, retryOn: 5xx"))
    world.backends["v1"].script = ["503"]
    body = b"b" * (RETRY_BUFFER - 100)
    status, _ = await _h2c_post(world, body)
    assert status == 200
    assert [seen[1] for seen in world.backends["v1"].seen] == [body, body]


async def test_a_retry_replays_the_kept_body_and_goes_on_with_the_rest(world: World) -> None:
    world.apply(_retries("attempts: 1, retryOn: 5xx"))
    v1 = world.backends["v1"]
    v1.script = ["503-early"]

    async def first_try_answered() -> None:
        async with asyncio.timeout(5):
            while not v1.seen:
                await asyncio.sleep(0.01)

    status, _ = await _h2c_post(world, b"a" * 1000, b"b" * 1000, between=first_try_answered)
    assert status == 200
    assert [seen[1] for seen in v1.seen] == [b"", b"a" * 1000 + b"b" * 1000]


@pytest.mark.parametrize("client", ["grpc", "h2c"])
async def test_a_body_over_the_buffer_limit_is_not_retried(world: World, client: str) -> None:
    world.apply(_retries("attempts: 2, retryOn: 5xx"))
    world.backends["v1"].script = ["503"]
    body = b"b" * (RETRY_BUFFER + 1000)
    if client == "grpc":
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await _say(world, body)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    else:
        assert (await _h2c_post(world, body))[0] == 503
    assert len(world.backends["v1"].seen) == 1    # the whole body reached it, once
    assert len(world.backends["v1"].seen[0][1]) >= len(body)
    rec = world.source_record()
    assert (rec.response_code, rec.response_flags) == (503, "")
    assert rec.request_bytes >= len(body)


# -- timeouts ------------------------------------------------------------------------------


async def test_per_try_timeout_cuts_a_slow_try_and_the_next_answers(world: World) -> None:
    world.apply(_retries("attempts: 2, perTryTimeout: 0.3s, retryOn: gateway-error"))
    world.backends["v1"].script = ["slow"]
    assert await _say(world) == b"v1 got 7"
    assert len(world.backends["v1"].seen) == 2
    assert world.source_record().response_flags == ""


async def test_route_timeout_answers_504_ut(world: World) -> None:
    world.apply(_retries("attempts: 0", extra="timeout: 0.3s, "))
    world.backends["v1"].script = ["slow"]
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _say(world)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    rec = world.source_record()
    assert (rec.response_code, rec.response_flags, rec.grpc_response_status) == (504, "UT", "14")


async def test_per_try_timeouts_exhausted_answer_504_ut_urx(world: World) -> None:
    world.apply(_retries("attempts: 1, perTryTimeout: 0.2s, retryOn: reset"))
    world.backends["v1"].script = ["slow", "slow"]
    with pytest.raises(grpc.aio.AioRpcError):
        await _say(world)
    assert len(world.backends["v1"].seen) == 2
    rec = world.source_record()
    assert (rec.response_code, rec.response_flags) == (504, "UT,URX")


# -- mirroring -----------------------------------------------------------------------------


async def test_mirror_gets_a_copy_and_the_client_the_primary_answer(world: World) -> None:
    world.apply("hosts: [greeter]\nhttp: [{route: [{destination: {host: greeter, "
                "subset: v1}}], mirror: {host: greeter, subset: v2}, "
                "mirrorPercentage: {value: 100}}]")
    world.backends["v2"].script = ["503", "slow"]   # the mirror fails, then hangs
    for _ in range(2):
        assert await _say(world, b"hello") == b"v1 got 10"
    async with asyncio.timeout(5):
        while len(world.backends["v2"].seen) < 2:
            await asyncio.sleep(0.01)
    shadow = world.backends["v2"].seen
    assert {(h[":authority"], h[":path"], body) for h, body in shadow} == {
        ("greeter-shadow", "/test.Echo/Say", _grpc_frame(b"hello"))}
    assert len(world.backends["v1"].seen) == 2
    assert [r.response_code for r in world.records] == [200, 200]  # mirrors not recorded


async def test_no_mirror_when_the_percentage_is_zero(world: World) -> None:
    world.apply("hosts: [greeter]\nhttp: [{route: [{destination: {host: greeter, "
                "subset: v1}}], mirror: {host: greeter, subset: v2}, "
                "mirrorPercentage: {value: 0}}]")
    assert await _say(world) == b"v1 got 7"
    assert world.backends["v2"].seen == []
