"""The L7 engine on loopback: a client, the engine (client side), backends (real sockets).

Backends listen on 127.0.0.2 (v1) and 127.0.0.3 (v2), the same port: one
Service "web" with an HTTP port, its Endpoints labelled by version, routed by
VirtualServices and DestinationRules compiled by the agent's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from meshagent import relay
from meshagent.l7 import engine, routes, telemetry, upstream
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb

HOST = "web.default.svc.cluster.local"
V1, V2 = "127.0.0.2", "127.0.0.3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return int(s.getsockname()[1])


# -- backends ----------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Backend:
    """An HTTP/1.1 server; ``behave(target) -> (status, headers, body | chunks, delay)``."""

    ip: str
    port: int
    name: str
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    status: int = 200
    delay: float = 0.0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, self.ip, self.port)

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await r.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := (await r.readline()).decode().rstrip("\r\n")):
                    k, _, v = h.partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in headers:
                    body = await r.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    while (size := int((await r.readline()).strip(), 16)):
                        body += await r.readexactly(size)
                        await r.readline()
                    await r.readline()
                self.seen.append(Seen(method, target, headers, body))
                await self._answer(w, target, body)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went, or the test is over
        finally:
            w.close()

    async def _answer(self, w: asyncio.StreamWriter, target: str, body: bytes) -> None:
        status = self.status
        if "status=" in target:
            status = int(target.split("status=")[1].split("&", maxsplit=1)[0])
        if self.delay:
            await asyncio.sleep(self.delay)
        if "big=" in target:
            size = int(target.split("big=")[1].split("&", maxsplit=1)[0])
            w.write(f"HTTP/1.1 {status} X\r\ncontent-length: {size}\r\n\r\n".encode())
            block = b"x" * 65536
            for _ in range(size // len(block)):
                w.write(block)
                await w.drain()
            return
        text = f"{self.name} got {len(body)}".encode()
        if "chunked" in target:
            w.write(f"HTTP/1.1 {status} X\r\ntransfer-encoding: chunked\r\n"
                    f"keep-alive: timeout=5\r\nproxy-x: 1\r\n\r\n".encode())
            for part in (text[:3], text[3:]):
                w.write(b"%x\r\n%s\r\n" % (len(part), part))
            w.write(b"0\r\n\r\n")
            return
        w.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(text)}\r\n\r\n".encode() + text)


# -- the world ----------------------------------------------------------------------------


def _obj(cls: Any, text: str, name: str) -> Any:
    obj = cls()
    json_format.ParseDict({"spec": yaml.safe_load(text)}, obj)
    obj.metadata.name, obj.metadata.namespace = name, "default"
    return obj


@dataclass
class World:
    port: int
    backends: dict[str, Backend]
    table: routes.RouteTable
    clusters: upstream.Clusters
    records: list[telemetry.RequestRecord]
    eng: engine.Engine
    listen_port: int
    virtual_services: list[pb.VirtualService] = field(default_factory=list)
    rules: list[pb.DestinationRule] = field(default_factory=list)

    def apply(self, *, vs: str = "", dr: str = "") -> None:
        if vs:
            self.virtual_services = [_obj(pb.VirtualService, vs, "web")]
        if dr:
            self.rules = [_obj(pb.DestinationRule, dr, "web")]
        svc, eps = _service(self.port)
        self.table.update(self.virtual_services, [svc])
        self.clusters.update(services=[svc], endpoints=[eps],
                             destination_rules=self.rules)

    async def request(self, raw: bytes, *, read: Callable[[bytes], bool] | None = None
                      ) -> bytes:
        """Send ``raw`` on a new connection; read until ``read(data)`` or EOF."""
        r, w = await asyncio.open_connection("127.0.0.1", self.listen_port)
        w.write(raw)
        await w.drain()
        data = b""
        try:
            async with asyncio.timeout(20):
                while not (read and read(data)):
                    chunk = await r.read(65536)
                    if not chunk:
                        break
                    data += chunk
        finally:
            w.close()
        return data


def _service(port: int) -> tuple[core_pb2.Service, core_pb2.Endpoints]:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", "default"
    svc.spec.cluster_ip = "10.96.0.10"
    svc.spec.ports.add(name="http", port=80).target_port.int_val = port
    eps = core_pb2.Endpoints()
    eps.metadata.name, eps.metadata.namespace = "web", "default"
    for ip, version in ((V1, "v1"), (V2, "v2")):
        sub = eps.subsets.add()
        a = sub.addresses.add(ip=ip)
        a.labels["version"] = version
        sub.ports.add(name="http", port=port)
    return svc, eps


def _get(path: str = "/", *, extra: str = "", close: bool = True) -> bytes:
    conn = "connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nhost: web\r\n{conn}{extra}\r\n".encode()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


@pytest.fixture
async def world() -> AsyncIterator[World]:
    port = _free_port()
    backends = {"v1": Backend(V1, port, "v1"), "v2": Backend(V2, port, "v2")}
    for b in backends.values():
        await b.start()
    table = routes.RouteTable()
    clusters = upstream.Clusters()
    records: list[telemetry.RequestRecord] = []

    def pod(ip: str) -> engine.Pod | None:
        return engine.Pod(ip=ip, name=ip, namespace="default", workload="web", principal="",
                          node_local=False, meshed=False)

    eng = engine.Engine(node="n1", route_table=lambda: table, clusters=lambda: clusters,
                        pod=pod, record=records.append)
    source = engine.Peer(ip="127.0.0.1", workload="client", namespace="default")
    service = engine.Service(host=HOST, port=80, name="web", namespace="default")
    tasks: set[asyncio.Task[None]] = set()

    def accepted(end: relay.SocketEnd) -> None:
        t = asyncio.create_task(eng.outbound(end, source=source, service=service))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: relay.SocketEnd(accepted), "127.0.0.1", 0)
    w = World(port=port, backends=backends, table=table, clusters=clusters, records=records,
              eng=eng, listen_port=server.sockets[0].getsockname()[1])
    w.apply()
    yield w
    server.close()
    for t in list(tasks):
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await eng.close()
    for b in backends.values():
        assert b.server is not None
        b.server.close()
        with contextlib.suppress(Exception):
            await b.server.wait_closed()


# -- tests ------------------------------------------------------------------------------------


def _responses(data: bytes) -> list[bytes]:
    return [b"HTTP/1.1" + part for part in data.split(b"HTTP/1.1")[1:]]


async def test_keep_alive_both_sides(world: World) -> None:
    world.apply(vs="hosts: [web]\nhttp: [{route: [{destination: {host: web, subset: v1}}]}]",
                dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}, "
                   "{name: v2, labels: {version: v2}}]")
    raw = _get("/a", close=False) * 4 + _get("/b")
    data = await world.request(raw)
    replies = _responses(data)
    assert len(replies) == 5 and all(_status(r) == 200 for r in replies)
    assert world.backends["v1"].connections == 1  # one upstream connection, reused
    assert [s.target for s in world.backends["v1"].seen] == ["/a"] * 4 + ["/b"]
    assert world.eng.pool.reused == 4
    assert [r.response_code for r in world.records] == [200] * 5
    assert all(r.route == "VirtualService default/web http[0]" for r in world.records)


async def test_large_bodies_stream_both_ways(world: World) -> None:
    world.apply(vs="hosts: [web]\nhttp: [{route: [{destination: {host: web, subset: v1}}]}]",
                dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}]")
    size = 3 * engine.RETRY_BUFFER + 17
    up = b"POST /up HTTP/1.1\r\nhost: web\r\ncontent-length: %d\r\n\r\n" % size + \
        b"y" * size
    data = await world.request(up, read=lambda d: b"got" in d)
    assert f"v1 got {size}".encode() in data
    big = 8 << 20
    data = await world.request(_get(f"/?big={big}"))
    head, _, body = data.partition(b"\r\n\r\n")
    assert _status(head) == 200 and len(body) == big
    assert world.records[-1].response_bytes == big


async def test_chunked_and_hop_by_hop_headers(world: World) -> None:
    world.apply(vs="hosts: [web]\nhttp: [{route: [{destination: {host: web, subset: v1}}]}]",
                dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}]")
    raw = (b"POST /chunked HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n"
           b"connection: close, x-secret\r\nx-secret: s\r\nkeep-alive: timeout=9\r\n"
           b"proxy-authorization: p\r\nte: trailers\r\nupgrade: h2c\r\nx-kept: k\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    data = await world.request(raw)
    seen = world.backends["v1"].seen[-1]
    assert seen.body == b"hello world"
    for name in ("x-secret", "keep-alive", "proxy-authorization", "te", "upgrade"):
        assert name not in seen.headers, name
    assert seen.headers["x-kept"] == "k"
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"keep-alive" not in head.lower() and b"proxy-x" not in head.lower()
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"3\r\nv1 \r\n6\r\ngot 11\r\n0\r\n\r\n"  # re-chunked on the way back


async def test_retries_go_to_another_endpoint(world: World) -> None:
    world.backends["v1"].status = 503
    world.apply(vs="hosts: [web]\nhttp: [{retries: {attempts: 2, retryOn: 5xx}, "
                   "route: [{destination: {host: web}}]}]",
                dr="host: web\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}")
    statuses = [_status(await world.request(_get())) for _ in range(6)]
    assert statuses == [200] * 6
    assert len(world.backends["v2"].seen) == 6


async def test_retries_exhausted(world: World) -> None:
    for b in world.backends.values():
        b.status = 500
    world.apply(vs="hosts: [web]\nhttp: [{retries: {attempts: 2, retryOn: 5xx}, "
                   "route: [{destination: {host: web}}]}]")
    assert _status(await world.request(_get())) == 500
    assert sum(len(b.seen) for b in world.backends.values()) == 3
    assert "URX" in world.records[-1].response_flags


async def test_timeouts(world: World) -> None:
    world.backends["v1"].delay = 5.0
    world.apply(vs="hosts: [web]\nhttp: [{timeout: 0.3s, retries: {attempts: 0}, "
                   "route: [{destination: {host: web, subset: v1}}]}]",
                dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}]")
    assert _status(await world.request(_get())) == 504
    assert world.records[-1].response_flags == "UT"
    # A per-try timeout cuts the slow endpoint; the retry lands on the fast one.
    world.apply(vs="hosts: [web]\nhttp: [{retries: {attempts: 2, perTryTimeout: 0.3s, "
                   "retryOn: 'gateway-error,reset'}, route: [{destination: {host: web}}]}]",
                dr="host: web\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}")
    for _ in range(3):
        resp = await world.request(_get())
        assert _status(resp) == 200 and b"v2 got" in resp


async def test_fault_injection(world: World) -> None:
    world.apply(vs="hosts: [web]\nhttp: [{fault: {abort: {httpStatus: 418, "
                   "percentage: {value: 100}}}, route: [{destination: {host: web}}]}]")
    assert _status(await world.request(_get())) == 418
    assert world.records[-1].response_flags == "FI"
    assert not any(b.seen for b in world.backends.values())
    world.apply(vs="hosts: [web]\nhttp: [{fault: {delay: {fixedDelay: 0.2s, "
                   "percentage: {value: 100}}}, route: [{destination: {host: web}}]}]")
    assert _status(await world.request(_get())) == 200
    assert world.records[-1].response_flags == "DI"
    assert world.records[-1].duration_s >= 0.2
    # 50% aborts, retried on 5xx: almost all get through.
    world.apply(vs="hosts: [web]\nhttp: [{fault: {abort: {httpStatus: 503, "
                   "percentage: {value: 50}}}, retries: {attempts: 7, retryOn: 5xx}, "
                   "route: [{destination: {host: web}}]}]")
    data = await world.request(_get(close=False) * 39 + _get())
    assert sum(1 for r in _responses(data) if _status(r) == 200) >= 38


async def test_redirect_rewrite_and_headers(world: World) -> None:
    world.apply(vs="""
hosts: [web]
http:
- match: [{uri: {exact: /old}}]
  redirect: {uri: /new, authority: elsewhere}
- match: [{uri: {prefix: /api/}}]
  rewrite: {uri: /v2/, authority: web-internal}
  headers:
    request: {set: {x-set: "1"}, remove: [x-drop]}
    response: {add: {x-served: mesh}}
  route: [{destination: {host: web, subset: v1}}]
""", dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}]")
    resp = await world.request(_get("/old"))
    assert _status(resp) == 301 and b"location: http://elsewhere/new" in resp.lower()
    resp = await world.request(_get("/api/x?q=1", extra="x-drop: d\r\n"))
    assert _status(resp) == 200 and b"x-served: mesh" in resp
    seen = world.backends["v1"].seen[-1]
    assert seen.target == "/v2/x?q=1"
    assert seen.headers["host"] == "web-internal" and seen.headers["x-set"] == "1"
    assert "x-drop" not in seen.headers


async def test_mirror(world: World) -> None:
    world.apply(vs="hosts: [web]\nhttp: [{route: [{destination: {host: web, subset: v1}}], "
                   "mirror: {host: web, subset: v2}, mirrorPercentage: {value: 100}}]",
                dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}, "
                   "{name: v2, labels: {version: v2}}]")
    for _ in range(3):
        assert b"v1 got" in await world.request(_get("/m"))
    async with asyncio.timeout(5):
        while len(world.backends["v2"].seen) < 3:
            await asyncio.sleep(0.01)
    assert {s.headers["host"] for s in world.backends["v2"].seen} == {"web-shadow"}


async def test_overflow(world: World) -> None:
    world.backends["v1"].delay = 0.5
    world.apply(vs="hosts: [web]\nhttp: [{route: [{destination: {host: web, subset: v1}}]}]",
                dr="host: web\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 1}, "
                   "http: {http1MaxPendingRequests: 1, http2MaxRequests: 1}}}\n"
                   "subsets: [{name: v1, labels: {version: v1}}]")
    results = await asyncio.gather(*(world.request(_get()) for _ in range(3)))
    statuses = sorted(_status(r) for r in results)
    assert statuses.count(503) >= 1 and 200 in statuses
    assert any(r.response_flags == "UO" for r in world.records)


async def test_malformed_request_is_400(world: World) -> None:
    resp = await world.request(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
    assert _status(resp) == 400


async def test_no_virtual_service_routes_to_the_service(world: World) -> None:
    resp = await world.request(_get())
    assert _status(resp) == 200
    assert world.records[-1].route == "default"
    assert world.records[-1].upstream_cluster == "outbound|80||" + HOST


async def test_server_side_keep_alive_with_bodies(world: World) -> None:
    """The inbound (server) side answers every request of a keep-alive connection,
    bodies both ways, each response whole (head and body may leave in one write)."""
    dst = engine.Pod(ip=V1, name="web-v1", namespace="default", workload="web",
                     principal="", node_local=True, meshed=True)
    source = engine.Peer(ip="127.0.0.1", workload="client", namespace="default")
    tasks: set[asyncio.Task[None]] = set()

    def accepted(end: relay.SocketEnd) -> None:
        t = asyncio.create_task(world.eng.inbound(end, source=source, dst=dst,
                                                  port=world.port, mtls=False))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: relay.SocketEnd(accepted), "127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        for i in range(4):
            body = b"z" * (10 + i)
            w.write(b"POST /p%d HTTP/1.1\r\nhost: web\r\ncontent-length: %d\r\n\r\n%s"
                    % (i, len(body), body))
            await w.drain()
            async with asyncio.timeout(10):
                head = await r.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                got = await r.readexactly(length)
            assert _status(head) == 200 and got == b"v1 got %d" % len(body)
        w.close()
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [s.target for s in world.backends["v1"].seen] == ["/p0", "/p1", "/p2", "/p3"]
    assert world.backends["v1"].connections == 1
    assert [(r.reporter, r.response_code) for r in world.records] == [("destination", 200)] * 4


async def test_an_idle_client_connection_is_closed_but_not_a_slow_request(
        world: World) -> None:
    """idle_timeout counts between requests: an answer slower than it still comes
    back whole, then the connection, idle, is closed by the engine."""
    world.eng.idle_timeout = 0.3
    world.apply(vs="hosts: [web]\nhttp: [{route: [{destination: {host: web, subset: v1}}]}]",
                dr="host: web\nsubsets: [{name: v1, labels: {version: v1}}]")
    world.backends["v1"].delay = 0.6
    r, w = await asyncio.open_connection("127.0.0.1", world.listen_port)
    try:
        w.write(_get("/slow", close=False))
        await w.drain()
        async with asyncio.timeout(10):
            head = await r.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            assert await r.readexactly(length) == b"v1 got 0"
        assert _status(head) == 200
        async with asyncio.timeout(10):
            assert await r.read() == b""  # closed by the engine, nothing more sent
    finally:
        w.close()
