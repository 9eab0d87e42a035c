"""The mesh agent against an in-process apiserver: informers -> routes, names, pods.

Capture rules are not installed here (no root network changes); the outbound
listener is driven on loopback with a fake original destination."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from meshagent import rebuilding
from meshagent.daemon import MeshAgent, MeshConfig
from meshagent.routing import Address
from shoal.api.core.v1 import core_pb2
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.waiting import eventually

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def running_agent(api: InProcessAPIServer, original_dst: Callable[[socket.socket], Address],
                        *, rebuild_timer: rebuilding.Timer | None = None, **config: Any
                        ) -> AsyncIterator[MeshAgent]:
    """Agent "n1" on loopback (every listener on a free port, pods in 127.0.0.0/8
    unless ``config`` says otherwise), its outbound connections' original
    destination from ``original_dst``; yielded once its informers have synced,
    stopped after."""
    cfg = MeshConfig(**{"node_name": "n1", "listen_host": "127.0.0.1", "outbound_port": 0,
                        "inbound_port": 0, "dns_port": 0, "tunnel_port": 0,
                        "metrics_listen": "127.0.0.1:0", "admin_listen": "",
                        "pod_cidr": "127.0.0.0/8", **config})
    async with api.client() as agent_client:
        agent = MeshAgent(cfg, agent_client, rebuild_timer=rebuild_timer)
        agent.outbound.original_dst = original_dst
        await agent.start()
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.readiness.signal("informers").wait(), 10)
            yield agent
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[InProcessAPIServer]:
    async with InProcessAPIServer(tmp_path) as server:
        yield server


async def test_agent_routes_a_cluster_ip_to_a_ready_endpoint(api: InProcessAPIServer) -> None:
    backend = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    async with api.client() as c:
        svc = core_pb2.Service()
        svc.metadata.name, svc.metadata.namespace = "web", "default"
        svc.spec.cluster_ip = "10.96.0.50"
        svc.spec.ports.add(name="tcp-echo", port=80, target_port={"int_val": port})
        svc = await c.create(svc)

        def fake_dst(_s: socket.socket) -> Address:
            return svc.spec.cluster_ip, 80
        async with running_agent(api, fake_dst) as agent:
            # No endpoints yet: the name resolves, the connection is refused.
            assert agent.names()["web.default.svc.cluster.local"] == (
                svc.spec.cluster_ip,)
            ep = core_pb2.Endpoints()
            ep.metadata.name, ep.metadata.namespace = "web", "default"
            sub = ep.subsets.add()
            sub.addresses.add(ip="127.0.0.1")
            sub.ports.add(name="tcp-echo", port=port, protocol="TCP")
            await c.create(ep)
            async def routed() -> bool:
                return agent.routes()[(svc.spec.cluster_ip, 80)].endpoints == (
                    ("127.0.0.1", port),)
            await eventually("the endpoint routed", routed)
            r, w = await asyncio.open_connection("127.0.0.1", agent.outbound.port)
            w.write(b"ping")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"ping"
            w.close()
            # A local pod is known by IP: its namespace drives the DNS search path.
            pod = core_pb2.Pod()
            pod.metadata.name, pod.metadata.namespace = "client", "default"
            pod.spec.node_name = "n1"
            pod.spec.containers.add(name="c", image="busybox")
            pod = await c.create(pod)
            pod.status.pod_ip = "10.244.1.7"
            await c.update_status(pod)
            async def known() -> bool:
                return agent.namespace_of("10.244.1.7") == "default"
            await eventually("the pod known by IP", known)

            async def captured() -> bool:  # once its certificate is signed
                return agent.captured_ips() == ["10.244.1.7"]
            await eventually("the pod captured", captured)
    backend.close()


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(await r.read())
    await w.drain()
    w.close()


async def test_the_command_becomes_ready_and_stops_on_sigterm(api: InProcessAPIServer) -> None:
    from shoal.testing.apiserver import free_port

    metrics = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshagent.main", "run", "--node-name", "n1",
        "--config", str(api.config_path), "--listen-host", "127.0.0.1",
        "--outbound-port", "0", "--inbound-port", "0", "--dns-port", "0",
        "--metrics-listen", f"127.0.0.1:{metrics}", "--admin-listen", "",
        "--tunnel-port", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async def ready() -> bool:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", metrics)
            except OSError:
                return False
            w.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await r.read()
            w.close()
            return reply.startswith(b"HTTP/1.1 200")
        await eventually("shoal-meshagent ready", ready)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logs = (await proc.stderr.read()).decode()
    assert '"mesh agent n1 ready' in logs or "mesh agent n1 ready" in logs
