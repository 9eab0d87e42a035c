"""The mesh agent's L7 wiring against an in-process apiserver: a Service's HTTP port
goes through the engine with the VirtualServices and DestinationRules the agent
watches; a TCP port keeps the L4 path. Loopback, a fake original destination."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from test_mesh_agent import running_agent

from meshagent.daemon import MeshConfig, http_ports, service_entry_http_ports
from meshagent.routing import Address
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.timers import FakeTimer
from shoal.testing.waiting import eventually


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[InProcessAPIServer]:
    async with InProcessAPIServer(tmp_path) as server:
        yield server


async def _http(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A one-request HTTP server that names the path it got."""
    line = await r.readline()
    while (await r.readline()).strip():
        pass
    text = line.split()[1] if line else b"?"
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(text), text))
    await w.drain()
    w.close()


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(await r.read())
    await w.drain()
    w.close()


def _service(name: str, port_name: str, ip: str, port: int, target: int
             ) -> tuple[core_pb2.Service, core_pb2.Endpoints]:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = name, "default"
    svc.spec.cluster_ip = ip
    svc.spec.ports.add(name=port_name, port=port, target_port={"int_val": target})
    ep = core_pb2.Endpoints()
    ep.metadata.name, ep.metadata.namespace = name, "default"
    sub = ep.subsets.add()
    sub.addresses.add(ip="127.0.0.1")
    sub.ports.add(name=port_name, port=target, protocol="TCP")
    return svc, ep


async def test_http_ports_take_the_engine_and_tcp_ports_stay_l4(
        api: InProcessAPIServer) -> None:
    web_backend = await asyncio.start_server(_http, "127.0.0.1", 0)
    tcp_backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
    web_port = web_backend.sockets[0].getsockname()[1]
    tcp_port = tcp_backend.sockets[0].getsockname()[1]
    async with api.client() as c:
        for obj in (*_service("web", "http-web", "10.96.0.60", 80, web_port),
                    *_service("raw", "tcp-raw", "10.96.0.61", 9000, tcp_port)):
            await c.create(obj)
        vs = pb.VirtualService()
        json_format.ParseDict({"metadata": {"name": "web", "namespace": "default"},
                               "spec": yaml.safe_load("""
hosts: [web]
http:
- match: [{uri: {prefix: /old/}}]
  rewrite: {uri: /new/}
  headers: {response: {set: {x-routed: rewrite}}}
  route: [{destination: {host: web}}]
- route: [{destination: {host: web}}]
""")}, vs)
        await c.create(vs)
        dst: list[Address] = [("10.96.0.60", 80)]
        async with running_agent(api, lambda _s: dst[0]) as agent:

            async def vs_known() -> bool:
                return agent.l7_routes().virtual_service(
                    "web.default.svc.cluster.local") is not None
            await eventually("the VirtualService known", vs_known)
            r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
            w.write(b"GET /old/x HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
            reply = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert reply.startswith(b"HTTP/1.1 200")
            assert b"x-routed: rewrite" in reply and reply.endswith(b"/new/x")
            # The TCP port: bytes relayed as they are.
            dst[0] = ("10.96.0.61", 9000)
            r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
            w.write(b"not http at all")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"not http at all"
            w.close()
    web_backend.close()
    tcp_backend.close()


def test_http_ports_by_protocol() -> None:
    web, web_ep = _service("web", "http", "10.96.0.60", 80, 8080)
    grpc, grpc_ep = _service("api", "grpc-api", "10.96.0.62", 90, 9090)
    raw, raw_ep = _service("raw", "redis", "10.96.0.61", 6379, 6379)
    by_vip, pod_ports = http_ports([web, grpc, raw], [web_ep, grpc_ep, raw_ep],
                                   domain="cluster.local")
    assert sorted(by_vip) == [("10.96.0.60", 80), ("10.96.0.62", 90)]  # not redis
    assert by_vip[("10.96.0.60", 80)].host == "web.default.svc.cluster.local"
    assert pod_ports == {("127.0.0.1", 8080), ("127.0.0.1", 9090)}


async def test_tcp_routes_pick_by_weight(api: InProcessAPIServer) -> None:
    async def named(name: bytes, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()
        w.write(name)
        await w.drain()
        w.close()

    a = await asyncio.start_server(lambda r, w: named(b"a", r, w), "127.0.0.2", 0)
    port = a.sockets[0].getsockname()[1]
    b = await asyncio.start_server(lambda r, w: named(b"b", r, w), "127.0.0.3", port)
    async with api.client() as c:
        svc, ep = _service("db", "tcp-db", "10.96.0.63", 5432, port)
        del ep.subsets[:]
        for ip, version in (("127.0.0.2", "a"), ("127.0.0.3", "b")):
            sub = ep.subsets.add()
            sub.addresses.add(ip=ip).labels["version"] = version
            sub.ports.add(name="tcp-db", port=port, protocol="TCP")
        await c.create(svc)
        await c.create(ep)
        for kind, doc in ((pb.DestinationRule, "host: db\nsubsets: [{name: a, labels: "
                           "{version: a}}, {name: b, labels: {version: b}}]"),
                          (pb.VirtualService, "hosts: [db]\ntcp: [{route: [{destination: "
                           "{host: db, subset: a}, weight: 0}, {destination: {host: db, "
                           "subset: b}, weight: 100}]}]")):
            obj = kind()
            json_format.ParseDict({"metadata": {"name": "db", "namespace": "default"},
                                   "spec": yaml.safe_load(doc)}, obj)
            await c.create(obj)
        async with running_agent(api, lambda _s: ("10.96.0.63", 5432)) as agent:

            async def routed() -> bool:
                return agent.l7_routes().has_tcp_routes and \
                    agent.l7_clusters().get("db.default.svc.cluster.local", 5432,
                                            "b") is not None
            await eventually("the tcp route known", routed)
            answers = []
            for _ in range(6):
                r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
                w.write(b"hi")
                w.write_eof()
                answers.append(await asyncio.wait_for(r.read(), 5))
                w.close()
            assert answers == [b"b"] * 6
    a.close()
    b.close()


async def test_a_service_selecting_a_workload_entry_reaches_it_through_the_engine(
        api: InProcessAPIServer) -> None:
    backend = await asyncio.start_server(_http, "127.0.0.4", 0)
    port = backend.sockets[0].getsockname()[1]
    async with api.client() as c:
        svc = core_pb2.Service()
        svc.metadata.name, svc.metadata.namespace = "vmweb", "default"
        svc.spec.cluster_ip = "10.96.0.64"
        svc.spec.selector["app"] = "vmweb"
        svc.spec.ports.add(name="http-web", port=80, target_port={"str_val": "web"})
        await c.create(svc)
        we = pb.WorkloadEntry()
        json_format.ParseDict({"metadata": {"name": "vm1", "namespace": "default"},
                               "spec": {"address": "127.0.0.4", "labels": {"app": "vmweb"},
                                        "ports": {"web": port}}}, we)
        await c.create(we)
        async with running_agent(api, lambda _s: ("10.96.0.64", 80)) as agent:

            async def known() -> bool:
                cluster = agent.l7_clusters().get("vmweb.default.svc.cluster.local", 80)
                return cluster is not None and bool(cluster.endpoints)
            await eventually("the WorkloadEntry in the cluster", known)
            assert agent.http_pod_port(("127.0.0.4", port))  # its inbound side is L7
            r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
            w.write(b"GET /from-a-pod HTTP/1.1\r\nhost: vmweb\r\nconnection: close\r\n\r\n")
            reply = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"/from-a-pod")
    backend.close()


def test_service_entry_http_ports_by_address_and_resolution() -> None:
    def entry(name: str, doc: str) -> pb.ServiceEntry:
        se = pb.ServiceEntry()
        json_format.ParseDict({"metadata": {"name": name, "namespace": "default"},
                               "spec": yaml.safe_load(doc)}, se)
        return se
    got = service_entry_http_ports([
        entry("vip", "hosts: [a.example.com]\naddresses: [10.99.0.5, 10.99.1.0/24]\n"
                     "resolution: STATIC\nendpoints: [{address: 203.0.113.7}]\n"
                     "ports: [{number: 80, name: http, protocol: HTTP}, "
                     "{number: 443, name: tls, protocol: TLS}]"),
        entry("static", "hosts: [b.example.com]\nresolution: STATIC\n"
                        "endpoints: [{address: 203.0.113.8}]\n"
                        "ports: [{number: 8080, name: grpc, protocol: GRPC}]"),
        entry("dns", "hosts: [c.example.com, d.example.com]\nresolution: DNS\n"
                     "ports: [{number: 80, name: http, protocol: HTTP}]"),
        entry("none", "hosts: [e.example.com]\nresolution: NONE\n"
                      "ports: [{number: 80, name: http, protocol: HTTP}]"),
    ], {"c.example.com": ("198.51.100.1",), "d.example.com": ("198.51.100.2",)})
    assert {dst: svc.host for dst, svc in got.items()} == {
        ("10.99.0.5", 80): "a.example.com",       # the VIP (the CIDR stays L4), not TLS
        ("203.0.113.8", 8080): "b.example.com",   # no VIP: the endpoint itself
        ("198.51.100.1", 80): "c.example.com",    # DNS: each host's own addresses
        ("198.51.100.2", 80): "d.example.com",
    }                                             # NONE without addresses: L4


async def test_egress_http_to_a_service_entry_goes_through_the_engine_with_retries(
        api: InProcessAPIServer) -> None:
    calls: list[bytes] = []

    async def flaky(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        while (await r.readline()).strip():
            pass
        calls.append(line)
        status = b"503 Service Unavailable" if len(calls) == 1 else b"200 OK"
        w.write(b"HTTP/1.1 %s\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok" % status)
        await w.drain()
        w.close()

    backend = await asyncio.start_server(flaky, "127.0.0.5", 0)
    port = backend.sockets[0].getsockname()[1]
    async with api.client() as c:
        for kind, name, doc in (
                (pb.ServiceEntry, "api", f"""
hosts: [api.example.com]
addresses: [10.99.0.5]
location: MESH_EXTERNAL
resolution: STATIC
ports: [{{number: 80, name: http, protocol: HTTP}}]
endpoints: [{{address: 127.0.0.5, ports: {{http: {port}}}}}]
"""),
                (pb.VirtualService, "api", """
hosts: [api.example.com]
http:
- route: [{destination: {host: api.example.com}}]
  retries: {attempts: 2, retryOn: 5xx}
  timeout: 5s
  headers: {response: {set: {x-routed: egress}}}
""")):
            obj = kind()
            json_format.ParseDict({"metadata": {"name": name, "namespace": "default"},
                                   "spec": yaml.safe_load(doc)}, obj)
            await c.create(obj)
        async with running_agent(api, lambda _s: ("10.99.0.5", 80), pod_cidr="10.244.0.0/16",
                                 outbound_traffic_policy="REGISTRY_ONLY") as agent:

            async def known() -> bool:
                return agent.http_service(("10.99.0.5", 80)) is not None and \
                    agent.l7_routes().virtual_service("api.example.com") is not None
            await eventually("the ServiceEntry's HTTP port known", known)
            r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
            w.write(b"GET /v1/x HTTP/1.1\r\nhost: api.example.com\r\n"
                    b"connection: close\r\n\r\n")
            reply = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert reply.startswith(b"HTTP/1.1 200"), reply
            assert b"x-routed: egress" in reply
            assert len(calls) == 2  # the 503 was retried
            counted = [(s.labels["reporter"], s.labels["response_code"],
                        s.labels["response_flags"], s.value)
                       for m in agent.registry.collect() if m.name == "istio_requests"
                       for s in m.samples if s.name == "istio_requests_total"
                       and s.labels["destination_service"] == "api.example.com"]
            assert counted == [("source", "200", "-", 1.0)]  # the mesh's telemetry
    backend.close()


async def test_a_burst_of_changes_is_one_rebuild_and_the_next_request_sees_it(
        api: InProcessAPIServer) -> None:
    """The L7 tables are rebuilt off the connection path: a burst of VirtualService
    updates is one rebuild, scheduled by the informer handlers (here on a fake
    timer); the request after it reads the current tables, and a request once the
    rebuild is overdue (a busy loop) rebuilds inline."""
    backend = await asyncio.start_server(_http, "127.0.0.1", 0)
    svc, ep = _service("web", "http-web", "10.96.0.70", 80,
                       backend.sockets[0].getsockname()[1])

    def routed_by(version: int) -> pb.VirtualService:
        vs = pb.VirtualService()
        json_format.ParseDict({"metadata": {"name": "web", "namespace": "default"},
                               "spec": {"hosts": ["web"], "http": [{
                                   "headers": {"response": {"set": {
                                       "x-routed": f"v{version}"}}},
                                   "route": [{"destination": {"host": "web"}}]}]}}, vs)
        return vs

    async def routed() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
        w.write(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        reply = await asyncio.wait_for(r.read(), 5)
        w.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply
        return reply.split(b"x-routed: ")[1].split(b"\r\n")[0]

    async with api.client() as c:
        for obj in (svc, ep):
            await c.create(obj)
        vs = await c.create(routed_by(0))
        timer = FakeTimer()
        delay = MeshConfig.rebuild_delay
        async with running_agent(api, lambda _s: ("10.96.0.70", 80),
                                 rebuild_timer=timer) as agent:
            assert agent.l7_tables.builds == 1  # every informer's list: one build
            assert await routed() == b"v0"
            for version in range(1, 11):  # a burst of ten updates
                vs = await c.update(pb.VirtualService(
                    metadata=vs.metadata, spec=routed_by(version).spec))

            async def all_seen() -> bool:
                got = agent.virtual_services.get("default", "web")
                return got is not None and \
                    got.metadata.resource_version == vs.metadata.resource_version
            await eventually("the agent's informer has the last update", all_seen)
            assert agent.l7_tables.builds == 1  # none on the informer's path
            assert timer.pending == 1  # one rebuild scheduled for the burst
            assert await routed() == b"v0"  # within the debounce: the last tables
            assert agent.l7_tables.builds == 1
            timer.advance(delay)  # the scheduled rebuild runs
            assert agent.l7_tables.builds == 2
            assert await routed() == b"v10"
            assert agent.l7_tables.builds == 2  # the request rebuilt nothing

            vs = await c.update(pb.VirtualService(metadata=vs.metadata,
                                                  spec=routed_by(11).spec))
            await eventually("the agent's informer has the update", all_seen)
            timer.advance(delay, run=False)  # due, but the loop has not run it
            assert await routed() == b"v11"  # rebuilt inline, once
            assert agent.l7_tables.builds == 3
            timer.run_due()
            assert agent.l7_tables.builds == 3
    backend.close()
