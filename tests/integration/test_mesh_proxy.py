"""The mesh's capture listeners on loopback, with a fake original destination."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from meshagent.proxy import DataPath, Listener, Metrics, Workload
from meshagent.routing import LEAST_CONNECTIONS, Address, Balancer, Route

pytestmark = pytest.mark.asyncio


async def _backend(name: bytes) -> tuple[asyncio.Server, int]:
    """Replies NAME:<everything it read until EOF>, then closes."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()
        w.write(name + b":" + data)
        await w.drain()
        w.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def backends() -> AsyncIterator[list[int]]:
    servers = [await _backend(b"a"), await _backend(b"b")]
    yield [port for _, port in servers]
    for s, _ in servers:
        s.close()


async def _listener(routes: dict[Address, Route], dst: Address, *, direction: str = "outbound",
                    registry: CollectorRegistry | None = None,
                    ready: asyncio.Event | None = None, ready_timeout: float = 10.0
                    ) -> Listener:
    def fake_dst(_sock: socket.socket) -> Address:
        return dst
    def workload(ip: str) -> Workload:  # every address is a pod outside the mesh
        return Workload(ip=ip, name="client", namespace="default", service_account="default",
                        workload="client", node="elsewhere", meshed=False)
    path = DataPath(node="n1", trust_domain="cluster.local", routes=lambda: routes,
                    pod_cidr="127.0.0.0/8", workload=workload, balancer=Balancer(),
                    metrics=Metrics(registry or CollectorRegistry()), ready=ready,
                    ready_timeout=ready_timeout)
    lst = Listener(direction=direction, host="127.0.0.1", port=0, path=path,
                   original_dst=fake_dst)
    await lst.start()
    return lst


async def _request(port: int, body: bytes) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(body)
    w.write_eof()  # half-close: the reply must still come back
    reply = await asyncio.wait_for(r.read(), 5)
    w.close()
    return reply


async def test_service_connections_are_balanced_round_robin(backends: list[int]) -> None:
    route = Route(service="default/web", port_name="http",
                  endpoints=tuple(("127.0.0.1", p) for p in backends))
    registry = CollectorRegistry()
    lst = await _listener({("10.96.0.10", 80): route}, ("10.96.0.10", 80), registry=registry)
    try:
        replies = [await _request(lst.port, b"hello") for _ in range(4)]
    finally:
        await lst.close()
    assert sorted(replies) == [b"a:hello", b"a:hello", b"b:hello", b"b:hello"]
    labels = {"reporter": "source", "source_workload": "client",
              "source_workload_namespace": "default",
              "source_principal": "cluster.local/ns/default/sa/default",
              "destination_workload": "client", "destination_workload_namespace": "default",
              "destination_principal": "unknown",
              "destination_service": "web.default.svc.cluster.local",
              "connection_security_policy": "none", "response_flags": ""}
    assert registry.get_sample_value("istio_tcp_connections_opened_total", labels) == 4
    assert registry.get_sample_value("istio_tcp_connections_closed_total", labels) == 4
    assert registry.get_sample_value("istio_tcp_sent_bytes_total", labels) == 20
    assert registry.get_sample_value("istio_tcp_received_bytes_total", labels) == 28


async def test_least_connections_avoids_the_busy_endpoint(backends: list[int]) -> None:
    route = Route(service="default/web", port_name="http", policy=LEAST_CONNECTIONS,
                  endpoints=tuple(("127.0.0.1", p) for p in backends))
    lst = await _listener({("10.96.0.10", 80): route}, ("10.96.0.10", 80))
    try:
        # A connection held open (no EOF yet) keeps one endpoint busy.
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"x")
        await w.drain()
        for _ in range(50):
            if lst.path.balancer.active:
                break
            await asyncio.sleep(0.01)
        busy = next(iter(lst.path.balancer.active))
        other = b"a" if busy[1] == backends[1] else b"b"
        assert [await _request(lst.port, b"q") for _ in range(3)] == [other + b":q"] * 3
        w.write_eof()
        assert (await asyncio.wait_for(r.read(), 5)).endswith(b":x")
        w.close()
    finally:
        await lst.close()


async def test_pod_ip_is_forwarded_as_is_and_inbound_too(backends: list[int]) -> None:
    for direction in ("outbound", "inbound"):
        lst = await _listener({}, ("127.0.0.1", backends[1]), direction=direction)
        try:
            assert await _request(lst.port, b"hi") == b"b:hi"
        finally:
            await lst.close()


async def test_unknown_destination_is_closed_and_counted() -> None:
    registry = CollectorRegistry()
    lst = await _listener({}, ("192.0.2.1", 443), registry=registry)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed without a reply
        w.close()
    finally:
        await lst.close()
    assert registry.get_sample_value("istio_tcp_connections_closed_total", {
        "reporter": "source", "source_workload": "client",
        "source_workload_namespace": "default",
        "source_principal": "cluster.local/ns/default/sa/default",
        "destination_workload": "unknown", "destination_workload_namespace": "unknown",
        "destination_principal": "unknown", "destination_service": "unknown",
        "connection_security_policy": "none", "response_flags": "NR"}) == 1


async def test_nothing_is_decided_before_the_agent_has_synced(backends: list[int]) -> None:
    """A restarted agent behind the old agent's rules: connections wait for its
    view of the cluster, and are closed (not forwarded) if it never comes."""
    synced = asyncio.Event()
    lst = await _listener({}, ("127.0.0.1", backends[0]), ready=synced)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"early")
        w.write_eof()
        reply = asyncio.create_task(r.read())
        await asyncio.sleep(0.1)
        assert not reply.done()  # held, not forwarded with an empty view
        synced.set()
        assert await asyncio.wait_for(reply, 5) == b"a:early"
        w.close()
    finally:
        await lst.close()
    registry = CollectorRegistry()
    lst = await _listener({}, ("127.0.0.1", backends[0]), ready=asyncio.Event(),
                          ready_timeout=0.1, registry=registry)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"never")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed, nothing sent on
        w.close()
    finally:
        await lst.close()
    assert registry.get_sample_value("istio_tcp_connections_opened_total", {
        "reporter": "source", "source_workload": "client",
        "source_workload_namespace": "default",
        "source_principal": "cluster.local/ns/default/sa/default",
        "destination_workload": "client", "destination_workload_namespace": "default",
        "destination_principal": "unknown", "destination_service": "unknown",
        "connection_security_policy": "none", "response_flags": ""}) is None
