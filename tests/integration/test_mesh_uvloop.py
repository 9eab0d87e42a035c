"""The mesh agents' data path on uvloop, the loop the daemons run on by default
(shoal.eventloop): an HTTP request crosses two agents (n1's L7 engine, the mTLS
tunnel, n2's server side, n2's connection to the pod) and both count it.

uvloop's transports are not subclasses of asyncio's, and its
``connect_accepted_socket`` returns its own TLS protocol, not the application's:
both broke the agents once. The scenario runs in a subprocess (this file as a
script) because the test session's event loop is asyncio's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_http_request_crosses_two_agents_on_uvloop() -> None:
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loop"].startswith("uvloop")
    assert result["answers"] == ["200 hello from web"] * 3
    assert result["source_requests"] == 3
    assert result["destination_requests"] == 3
    # n2 accepted the tunnel, checked n1's identity and keeps the connection
    assert result["inbound_handshakes_ok"] == 1
    assert result["inbound_connections"] == 1


async def _scenario(tmp: Path) -> dict[str, object]:
    from test_mesh_tunnel import CLIENT_IP, SERVER_IP, _pair, _pair_ready, _pod

    from shoal.api.core.v1 import core_pb2
    from shoal.testing.apiserver import InProcessAPIServer, free_port
    from shoal.testing.waiting import eventually

    async def web(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (line := await r.readline()) and line.strip():
            while (await r.readline()).strip():
                pass
            body = b"hello from web"
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()
        w.close()

    port = free_port()
    server = await asyncio.start_server(web, SERVER_IP, port)
    async with InProcessAPIServer(tmp) as api, api.client() as c:
        await _pod(c, "default", "sleep", node="n1", ip=CLIENT_IP, sa="sleep", app="sleep")
        await _pod(c, "default", "web", node="n2", ip=SERVER_IP, sa="web", app="web")
        svc = core_pb2.Service()
        svc.metadata.name, svc.metadata.namespace = "web", "default"
        svc.spec.ports.add(name="http", port=80, target_port={"int_val": port})
        cluster_ip = str((await c.create(svc)).spec.cluster_ip)
        ep = core_pb2.Endpoints()
        ep.metadata.name, ep.metadata.namespace = "web", "default"
        sub = ep.subsets.add()
        sub.addresses.add(ip=SERVER_IP)
        sub.ports.add(name="http", port=port, protocol="TCP")
        await c.create(ep)
        (n1, c1, t1), (n2, c2, t2) = await _pair(api, cluster_ip)
        try:
            async def ready() -> bool:
                # L4 routes, both workloads, and the L7 tables: n1 knows the Service
                # port speaks HTTP and n2 the pod's port (each set of tables is
                # rebuilt a few ms after the events that change it).
                web, sleep = n1.workload(SERVER_IP), n2.workload(CLIENT_IP)
                return (_pair_ready(n1, n2, cluster_ip) and web is not None and web.meshed
                        and sleep is not None and sleep.meshed
                        and n1.http_service((cluster_ip, 80)) is not None
                        and n2.http_pod_port((SERVER_IP, port)))
            await eventually("both agents ready", ready)
            r, w = await asyncio.open_connection(n1.outbound.host, n1.outbound.port,
                                                 local_addr=(CLIENT_IP, 0))
            answers = []
            for _ in range(3):  # keep-alive: one client connection, three requests
                w.write(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
                status = (await asyncio.wait_for(r.readline(), 10)).split()[1].decode()
                length = 0
                while (line := await r.readline()).strip():
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                answers.append(f"{status} {(await r.readexactly(length)).decode()}")
            w.close()

            def count(agent: object, reporter: str) -> float:
                reg = agent.registry  # type: ignore[attr-defined]
                return sum(s.value for m in reg.collect() if m.name == "istio_requests"
                           for s in m.samples if s.name == "istio_requests_total"
                           and s.labels.get("reporter") == reporter
                           and s.labels.get("connection_security_policy") == "mutual_tls")

            async def counted() -> bool:
                return count(n1, "source") == 3 and count(n2, "destination") == 3
            await eventually("both agents counted the requests", counted)
            ok = n2.registry.get_sample_value("shoal_mesh_tls_handshakes_total",
                                              {"direction": "inbound", "result": "ok"})
            return {"loop": type(asyncio.get_running_loop()).__module__, "answers": answers,
                    "source_requests": count(n1, "source"),
                    "destination_requests": count(n2, "destination"),
                    "inbound_handshakes_ok": ok or 0,
                    "inbound_connections": len(n2.tunnel.conns)}
        finally:
            for t in (t1, t2):
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
            for cl in (c1, c2):
                await cl.close()
            server.close()


def _main() -> None:
    import tempfile

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    from shoal import eventloop

    out: dict[str, object] = {}

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out.update(await _scenario(Path(tmp)))
    eventloop.run(main(), "uvloop")
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
