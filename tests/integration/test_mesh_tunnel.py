"""Two mesh agents ("nodes" n1 and n2) in one process, on loopback, with real
certificates from the in-process apiserver's mesh CA.

Pods get loopback addresses (n1's client 127.0.1.1, n2's server 127.0.2.1); the
capture redirects are replaced by fake original destinations. A client on n1
reaches a Service whose only endpoint is on n2 through n1's outbound listener,
n1's tunnel pool, mTLS and n2's tunnel server.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshagent import proxy
from meshagent.daemon import MeshAgent, MeshConfig
from meshagent.routing import Address
from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer, free_port
from shoal.testing.waiting import eventually

pytestmark = pytest.mark.asyncio

CLIENT_IP, SERVER_IP, LOCAL_SERVER_IP = "127.0.1.1", "127.0.2.1", "127.0.1.2"


@dataclass
class Mesh:
    api: InProcessAPIServer
    admin: AsyncClient
    namespace: str
    n1: MeshAgent
    n2: MeshAgent
    backend_port: int
    seen: list[str]  # what the backends saw: "<server>:<peer ip>"


async def _pod(c: AsyncClient, ns: str, name: str, *, node: str, ip: str, sa: str,
               app: str) -> None:
    pod = core_pb2.Pod()
    pod.metadata.name, pod.metadata.namespace = name, ns
    pod.metadata.labels["app"] = app
    pod.spec.node_name = node
    pod.spec.service_account_name = sa
    pod.spec.containers.add(name="c", image="busybox")
    pod = await c.create(pod)
    pod.status.pod_ip = ip
    pod.status.phase = "Running"
    await c.update_status(pod)


async def _web_service(c: AsyncClient, ns: str, port: int) -> str:
    """Service web:80 whose one endpoint is SERVER_IP:``port``; its ClusterIP."""
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", ns
    svc.spec.ports.add(name="tcp", port=80, target_port={"int_val": port})
    cluster_ip = str((await c.create(svc)).spec.cluster_ip)
    ep = core_pb2.Endpoints()
    ep.metadata.name, ep.metadata.namespace = "web", ns
    sub = ep.subsets.add()
    sub.addresses.add(ip=SERVER_IP)
    sub.ports.add(name="tcp", port=port, protocol="TCP")
    await c.create(ep)
    return cluster_ip


async def _agent(api: InProcessAPIServer, node: str, host: str, tunnel_port: int,
                 outbound_dst: Address) -> tuple[MeshAgent, AsyncClient,
                                                 asyncio.Task[None]]:
    client = AsyncClient(api.node_client_config(node))

    def fake_dst(sock: socket.socket) -> Address:
        local = sock.getsockname()
        if local[1] == tunnel_port:  # a peer's tunnel: the pod it dialled
            return local[0], 15008
        return outbound_dst

    cfg = MeshConfig(node_name=node, listen_host=host, outbound_port=0, inbound_port=0,
                     dns_port=0, tunnel_port=tunnel_port, metrics_listen=f"{host}:0",
                     admin_listen="",
                     pod_cidr="127.0.0.0/8")
    agent = MeshAgent(cfg, client, original_dst=fake_dst)
    agent.pool.port = tunnel_port
    await agent.start()
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.readiness.signal("informers").wait(), 10)
    return agent, client, task


Started = tuple[MeshAgent, AsyncClient, "asyncio.Task[None]"]


async def _pair(api: InProcessAPIServer, cluster_ip: str) -> tuple[Started, Started]:
    """Agents n1 (pod CLIENT_IP) and n2 (pod SERVER_IP) sharing a tunnel port, their
    outbound original destination ``cluster_ip``:80."""
    tunnel_port = free_port()
    a = await _agent(api, "n1", CLIENT_IP, tunnel_port, (cluster_ip, 80))
    b = await _agent(api, "n2", SERVER_IP, tunnel_port, (cluster_ip, 80))
    return a, b


def _pair_ready(n1: MeshAgent, n2: MeshAgent, cluster_ip: str) -> bool:
    """Each agent captures its pod and n1 routes ``cluster_ip``:80 to an endpoint."""
    route = n1.routes().get((cluster_ip, 80))
    return (n1.captured_ips() == [CLIENT_IP] and n2.captured_ips() == [SERVER_IP]
            and bool(route and route.endpoints))


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    # An apiserver of its own: pod IPs are reused from test to test.
    async with InProcessAPIServer(tmp_path) as apiserver, apiserver.client() as client:
        async for m in _mesh(apiserver, client, "default"):
            yield m


async def _mesh(apiserver: InProcessAPIServer, client: AsyncClient,
                namespace: str) -> AsyncIterator[Mesh]:
    seen: list[str] = []

    def backend(name: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen.append(f"{name}:{w.get_extra_info('peername')[0]}")
            w.write(name.encode() + b":" + await r.read())
            await w.drain()
            w.close()
        return handle

    port = free_port()
    servers = [await asyncio.start_server(backend("remote"), SERVER_IP, port),
               await asyncio.start_server(backend("local"), LOCAL_SERVER_IP, port)]
    await _pod(client, namespace, "sleep", node="n1", ip=CLIENT_IP, sa="sleep", app="sleep")
    await _pod(client, namespace, "web", node="n2", ip=SERVER_IP, sa="web", app="web")
    cluster_ip = await _web_service(client, namespace, port)

    (n1, c1, t1), (n2, c2, t2) = await _pair(apiserver, cluster_ip)
    try:
        async def ready() -> bool:
            return _pair_ready(n1, n2, cluster_ip)
        await eventually("both agents hold their pods' certificates and the route", ready)
        yield Mesh(apiserver, client, namespace, n1, n2, port, seen)
    finally:
        for t in (t1, t2):
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        for c in (c1, c2):
            await c.close()
        for s in servers:
            s.close()


async def _call(agent: MeshAgent, body: bytes, *, source: str = CLIENT_IP) -> bytes:
    """Connect from ``source`` to the agent's outbound listener (as a captured pod)."""
    r, w = await asyncio.open_connection(agent.outbound.host, agent.outbound.port,
                                         local_addr=(source, 0))
    w.write(body)
    w.write_eof()
    try:
        return await asyncio.wait_for(r.read(), 10)
    except ConnectionResetError:  # refused with our bytes unread: a reset
        return b""
    finally:
        w.close()


def _sample(agent: MeshAgent, name: str, labels: dict[str, str]) -> float:
    return agent.registry.get_sample_value(name, labels) or 0.0


async def test_a_cross_node_connection_goes_through_mutual_tls(mesh: Mesh) -> None:
    ns = mesh.namespace
    assert await _call(mesh.n1, b"hello") == b"remote:hello"
    assert await _call(mesh.n1, b"again") == b"remote:again"
    # The backend was reached by n2's agent, never straight from the client.
    assert len(mesh.seen) == 2 and f"remote:{CLIENT_IP}" not in mesh.seen
    # One handshake; the second connection rode the pooled tunnel connection.
    handshakes = {"direction": "outbound", "result": "ok"}
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total", handshakes) == 1
    assert _sample(mesh.n2, "shoal_mesh_tls_handshakes_total",
                   {"direction": "inbound", "result": "ok"}) == 1
    assert _sample(mesh.n1, "shoal_mesh_tunnel_streams_total",
                   {"direction": "outbound", "pooled": "true"}) == 1
    # Both sides report the connection with the identities the handshake proved.
    source = {"reporter": "source", "source_workload": "sleep",
              "source_workload_namespace": ns,
              "source_principal": f"cluster.local/ns/{ns}/sa/sleep",
              "destination_workload": "web", "destination_workload_namespace": ns,
              "destination_principal": f"cluster.local/ns/{ns}/sa/web",
              "destination_service": f"web.{ns}.svc.cluster.local",
              "connection_security_policy": "mutual_tls", "response_flags": ""}
    assert _sample(mesh.n1, "istio_tcp_connections_closed_total", source) == 2
    assert _sample(mesh.n1, "istio_tcp_received_bytes_total", source) == len(
        b"remote:hello") + len(b"remote:again")
    # The destination reporter names the Service too: the one of the pod's
    # namespace with it as an endpoint on that port (Istio's FQDN form).
    dest = {**source, "reporter": "destination", "source_workload": "unknown"}
    assert _sample(mesh.n2, "istio_tcp_connections_closed_total", dest) == 2
    # And the config generation each has applied.
    assert _sample(mesh.n1, "shoal_mesh_config_generation", {}) == (
        mesh.n1.generations().overall) > 0


async def test_live_connections_show_what_the_handshake_saw(mesh: Mesh) -> None:
    ns = mesh.namespace
    r, w = await asyncio.open_connection(mesh.n1.outbound.host, mesh.n1.outbound.port,
                                         local_addr=(CLIENT_IP, 0))
    w.write(b"held")
    await w.drain()
    try:
        async def both_live() -> bool:
            return bool(mesh.n1.path.live) and bool(mesh.n2.path.live)
        await eventually("the connection live on both agents", both_live)
        out = next(iter(mesh.n1.path.live.values()))
        assert (out.mode, out.peer_principal, out.tls_version) == (
            "mTLS", f"cluster.local/ns/{ns}/sa/web", "TLSv1.3")
        assert out.cipher.startswith("TLS_")
        inbound = next(iter(mesh.n2.path.live.values()))
        assert (inbound.peer_principal, inbound.source_ip) == (
            f"cluster.local/ns/{ns}/sa/sleep", CLIENT_IP)
    finally:
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b"remote:held"
        w.close()


async def test_a_denied_connection_is_closed_and_counted_on_both_sides(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(**kw: object) -> proxy.Verdict:
        return proxy.Verdict(False, "denied by test/deny-sleep")
    monkeypatch.setattr(mesh.n2.path, "admit", deny)
    assert await _call(mesh.n1, b"hello") == b""
    assert mesh.seen == []
    assert _sample(mesh.n2, "shoal_mesh_connections_denied_total", {
        "reporter": "destination", "destination_workload": "web",
        "destination_workload_namespace": mesh.namespace,
        "source_principal": f"cluster.local/ns/{mesh.namespace}/sa/sleep",
        "reason": "denied by test/deny-sleep"}) == 1
    assert _sample(mesh.n1, "shoal_mesh_connections_denied_total", {
        "reporter": "source", "destination_workload": "web",
        "destination_workload_namespace": mesh.namespace,
        "source_principal": f"cluster.local/ns/{mesh.namespace}/sa/sleep",
        "reason": f"CONNECT 127.0.2.1:{mesh.backend_port} refused: 403 "
                  "denied by test/deny-sleep"}) == 1


async def test_a_peer_proving_the_wrong_identity_is_refused(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    # n2 believes its pod runs as another service account (one of its other pods'):
    # it presents that certificate, not the one n1 expects for the destination pod.
    await _pod(mesh.admin, mesh.namespace, "other", node="n2", ip="127.0.2.9", sa="other",
               app="other")

    async def signed() -> bool:
        try:
            await mesh.n2.identities.get(mesh.namespace, "other")
        except Exception:
            return False
        return True
    await eventually("a certificate for n2's other service account", signed)
    monkeypatch.setattr(mesh.n2.tunnel, "local_identity",
                        lambda ip: (mesh.namespace, "other"))
    assert await _call(mesh.n1, b"hello") == b""
    assert mesh.seen == []
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total", {
        "direction": "outbound", "result": "wrong_peer_identity"}) == 1


async def test_pods_on_the_same_node_connect_directly_through_policy(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    await _pod(mesh.admin, mesh.namespace, "web-local", node="n1", ip=LOCAL_SERVER_IP,
               sa="web", app="web")
    asked: list[tuple[str, str, int]] = []

    def admit(*, principal: str, namespace: str, ip: str, dst: proxy.Workload, port: int,
              mtls: bool) -> proxy.Verdict:
        asked.append((principal, dst.name, port))
        return proxy.Verdict(len(asked) == 1, "second one denied")
    monkeypatch.setattr(mesh.n1.path, "admit", admit)

    async def known() -> bool:
        w = mesh.n1.workload(LOCAL_SERVER_IP)
        return w is not None and w.node == "n1"
    await eventually("the local pod known", known)
    monkeypatch.setattr(mesh.n1.outbound, "original_dst",
                        lambda _s: (LOCAL_SERVER_IP, mesh.backend_port))
    assert await _call(mesh.n1, b"hi") == b"local:hi"
    assert await _call(mesh.n1, b"hi") == b""
    principal = f"cluster.local/ns/{mesh.namespace}/sa/sleep"
    assert asked == [(principal, "web-local", mesh.backend_port)] * 2
    assert len(mesh.seen) == 1 and mesh.seen[0].startswith("local:")  # the allowed one
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total",
                   {"direction": "outbound", "result": "ok"}) == 0  # no tunnel


async def _wait_informed(agent: MeshAgent, count: int) -> None:
    async def seen() -> bool:
        return len(agent.authz.list()) + len(agent.peer_auths.list()) >= count
    await eventually("the policies reach the agent", seen)


async def test_a_deny_policy_by_principal_blocks_that_source_only(mesh: Mesh) -> None:
    ns = mesh.namespace
    ap = security_pb2.AuthorizationPolicy()
    ap.metadata.name, ap.metadata.namespace = "deny-sleep", ns
    ap.spec.selector.match_labels["app"] = "web"
    ap.spec.action = "DENY"
    ap.spec.rules.add().from_.add().source.principals.append(
        f"cluster.local/ns/{ns}/sa/sleep")
    await mesh.admin.create(ap)
    await _wait_informed(mesh.n2, 1)
    assert await _call(mesh.n1, b"hello") == b""
    assert mesh.seen == []
    assert _sample(mesh.n2, "shoal_mesh_connections_denied_total", {
        "reporter": "destination", "destination_workload": "web",
        "destination_workload_namespace": ns,
        "source_principal": f"cluster.local/ns/{ns}/sa/sleep",
        "reason": f"denied by DENY policy {ns}/deny-sleep"}) == 1
    # Another workload on n1, with another identity, still gets through.
    await _pod(mesh.admin, ns, "curl", node="n1", ip="127.0.1.3", sa="curl", app="curl")

    async def curl_ready() -> bool:
        return "127.0.1.3" in mesh.n1.captured_ips()
    await eventually("the second client's certificate", curl_ready)
    assert await _call(mesh.n1, b"hello", source="127.0.1.3") == b"remote:hello"


async def test_strict_mtls_refuses_plaintext_but_not_the_mesh(mesh: Mesh) -> None:
    ns = mesh.namespace

    async def plaintext() -> bytes:  # from outside the mesh, into n2's inbound capture
        mesh.n2.inbound.original_dst = lambda _s: (SERVER_IP, mesh.backend_port)
        r, w = await asyncio.open_connection(mesh.n2.inbound.host, mesh.n2.inbound.port,
                                             local_addr=("127.0.9.9", 0))
        w.write(b"plain")
        w.write_eof()
        try:
            return await asyncio.wait_for(r.read(), 10)
        except ConnectionResetError:
            return b""
        finally:
            w.close()

    assert await plaintext() == b"remote:plain"  # PERMISSIVE by default
    pa = security_pb2.PeerAuthentication()
    pa.metadata.name, pa.metadata.namespace = "strict", ns
    pa.spec.mtls.mode = "STRICT"
    await mesh.admin.create(pa)
    await _wait_informed(mesh.n2, 1)
    assert await plaintext() == b""
    assert await _call(mesh.n1, b"mesh") == b"remote:mesh"
    assert _sample(mesh.n2, "shoal_mesh_connections_denied_total", {
        "reporter": "destination", "destination_workload": "web",
        "destination_workload_namespace": ns, "source_principal": "unknown",
        "reason": "STRICT mTLS: plaintext refused"}) == 1


async def test_large_transfers_flow_through_the_window_both_ways(mesh: Mesh) -> None:
    # 6 MiB each way: several times the tunnel's per-stream window (1 MiB), so
    # it only completes if consumed data is acknowledged and senders wait for
    # window; the backend reads everything before it answers (half-close).
    body = bytes(range(256)) * (6 * 4096)
    assert await _call(mesh.n1, body) == b"remote:" + body
    assert _sample(mesh.n1, "istio_tcp_sent_bytes_total", {
        "reporter": "source", "source_workload": "sleep",
        "source_workload_namespace": mesh.namespace,
        "source_principal": f"cluster.local/ns/{mesh.namespace}/sa/sleep",
        "destination_workload": "web", "destination_workload_namespace": mesh.namespace,
        "destination_principal": f"cluster.local/ns/{mesh.namespace}/sa/web",
        "destination_service": f"web.{mesh.namespace}.svc.cluster.local",
        "connection_security_policy": "mutual_tls", "response_flags": ""}) == len(body)


async def test_concurrent_connections_share_one_handshake_without_cross_talk(
        mesh: Mesh) -> None:
    bodies = [f"client-{i}-".encode() * (i + 1) for i in range(40)]
    replies = await asyncio.gather(*(_call(mesh.n1, b) for b in bodies))
    assert replies == [b"remote:" + b for b in bodies]
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total",
                   {"direction": "outbound", "result": "ok"}) == 1
    assert _sample(mesh.n1, "shoal_mesh_tunnel_streams_total",
                   {"direction": "outbound", "pooled": "true"}) == 39


async def test_a_new_certificate_moves_new_connections_to_a_new_tunnel(mesh: Mesh) -> None:
    """After the source's certificate changes (rotation; here: the identity is
    dropped and signed again), new streams do not ride the connection made with
    the old certificate: a second handshake, then pooling on the new one."""
    handshakes = {"direction": "outbound", "result": "ok"}
    assert await _call(mesh.n1, b"one") == b"remote:one"
    assert await _call(mesh.n1, b"two") == b"remote:two"
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total", handshakes) == 1
    before = (await mesh.n1.identities.get(mesh.namespace, "sleep")).serial
    mesh.n1.identities.forget(mesh.namespace, "sleep")
    assert await _call(mesh.n1, b"three") == b"remote:three"
    assert (await mesh.n1.identities.get(mesh.namespace, "sleep")).serial != before
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total", handshakes) == 2
    assert await _call(mesh.n1, b"four") == b"remote:four"
    assert _sample(mesh.n1, "shoal_mesh_tls_handshakes_total", handshakes) == 2
