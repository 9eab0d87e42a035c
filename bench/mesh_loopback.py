"""Two meshagents in one process on loopback, the same open-loop echo load as
``bench/mesh_bench.py``: a quick reproduction of the mesh data path for
profiling and A/B checks, without a lab (no root, no lock needed).

    python bench/mesh_loopback.py [--duration 10] [--rate 1000] [--nodelay-everywhere]
        [--cprofile FILE] [--setup-samples N] [--http]

Set up as ``tests/integration/test_mesh_tunnel.py`` does: an in-process
apiserver with its mesh CA, agents "n1" (client pod 127.0.1.1) and "n2" (server
pod 127.0.2.1), capture replaced by fake original destinations. The echo server
and the load generator (``bench/meshload.py``) are separate processes; the load
connects from 127.0.1.1 to n1's outbound listener and reaches the server through
n1's pooled mTLS tunnel to n2.

``--http``: the Service port is named ``http`` (the L7 path: n1's engine, n2's
server side) and the echo and load are HTTP/1.1 (``meshload.py --http``).

``--nodelay-everywhere`` makes asyncio set TCP_NODELAY on every TCP socket it
wraps. Python 3.11 sets it only when ``sock.proto == IPPROTO_TCP``; a socket made
with ``socket.socket(AF_INET, SOCK_STREAM)`` (proto 0) and the sockets it accepts
do not qualify, so they keep Nagle's algorithm.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from test_mesh_tunnel import (  # noqa: E402
    CLIENT_IP,
    SERVER_IP,
    _pair,
    _pair_ready,
    _pod,
    _web_service,
)

from meshagent.daemon import MeshAgent  # noqa: E402
from shoal import spiffe  # noqa: E402
from shoal.api.core.v1 import core_pb2  # noqa: E402
from shoal.testing.apiserver import InProcessAPIServer, free_port  # noqa: E402
from shoal.testing.waiting import eventually  # noqa: E402

LOAD = ROOT / "bench" / "meshload.py"


def nodelay_everywhere() -> None:
    import asyncio.base_events as base_events

    def set_nodelay(sock: socket.socket) -> None:
        if sock.family in {socket.AF_INET, socket.AF_INET6} and \
                sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    base_events._set_nodelay = set_nodelay  # type: ignore[attr-defined]


async def setup_times(n1: MeshAgent, port: int, samples: int) -> dict[str, object]:
    """Open a tunnel stream ``samples`` times on a fresh connection (TCP connect,
    TLS 1.3 mutual handshake, CONNECT) and as often on the pooled one (CONNECT
    only); medians and p90s in ms."""
    expected = spiffe.SpiffeId("cluster.local", "default", "web")

    async def open_once() -> float:
        t0 = time.perf_counter()
        stream = await n1.pool.open(source=("default", "sleep"),
                                    destination=(SERVER_IP, port), expected=expected)
        took = time.perf_counter() - t0
        stream.close()
        return took * 1000

    fresh, pooled = [], []
    for _ in range(samples):
        await n1.pool.close()
        fresh.append(await open_once())
        pooled.append(await open_once())

    def stats(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"p50_ms": statistics.median(xs), "p90_ms": xs[int(len(xs) * 0.9) - 1]}
    return {"fresh_connection": stats(fresh), "pooled_connection": stats(pooled),
            "samples": samples}


async def run(args: argparse.Namespace) -> dict[str, object]:
    echo_port = free_port()
    echo = await asyncio.create_subprocess_exec(
        sys.executable, str(LOAD), "serve", "--host", SERVER_IP, "--port", str(echo_port),
        *(["--http"] if args.http else []), stdout=asyncio.subprocess.PIPE)
    assert echo.stdout is not None
    await echo.stdout.readline()  # READY
    with tempfile.TemporaryDirectory() as tmp:
        async with InProcessAPIServer(Path(tmp)) as api, api.client() as client:
            ns = "default"
            await _pod(client, ns, "sleep", node="n1", ip=CLIENT_IP, sa="sleep", app="sleep")
            await _pod(client, ns, "web", node="n2", ip=SERVER_IP, sa="web", app="web")
            cluster_ip = await _web_service(client, ns, echo_port)
            if args.http:  # the port named http: the L7 path
                svc = await client.get(core_pb2.Service, "web", namespace=ns)
                svc.spec.ports[0].name = "http"
                await client.update(svc)
                ep = await client.get(core_pb2.Endpoints, "web", namespace=ns)
                ep.subsets[0].ports[0].name = "http"
                await client.update(ep)
            (n1, c1, t1), (n2, c2, t2) = await _pair(api, cluster_ip)
            try:
                async def ready() -> bool:
                    return _pair_ready(n1, n2, cluster_ip)
                await eventually("both agents ready", ready)
                if args.setup_samples:
                    return await setup_times(n1, echo_port, args.setup_samples)
                prof = cProfile.Profile() if args.cprofile else None
                cpu0 = time.process_time()
                load = await asyncio.create_subprocess_exec(
                    sys.executable, str(LOAD), "load", "--source", CLIENT_IP, "--target",
                    f"{n1.outbound.host}:{n1.outbound.port}", "--rate", str(args.rate),
                    "--warmup", "2", "--duration", str(args.duration),
                    *(["--http", "--host-header", "web.default.svc.cluster.local"]
                      if args.http else []),
                    stdout=asyncio.subprocess.PIPE)
                assert load.stdout is not None
                result: dict[str, object] = {}
                while line := (await load.stdout.readline()).decode().strip():
                    if line == "MEASURE_START":
                        cpu0 = time.process_time()
                        if prof is not None:
                            prof.enable()
                    elif line == "MEASURE_END":
                        if prof is not None:
                            prof.disable()
                        result["agents_cpu_s_per_1000"] = (
                            (time.process_time() - cpu0) / (args.rate * args.duration / 1000))
                    elif line.startswith("{"):
                        result.update(json.loads(line))
                await load.wait()
                if prof is not None:
                    prof.dump_stats(args.cprofile)
                return result
            finally:
                for t in (t1, t2):
                    t.cancel()
                    await asyncio.gather(t, return_exceptions=True)
                for c in (c1, c2):
                    await c.close()
                echo.terminate()
                await echo.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--nodelay-everywhere", action="store_true")
    p.add_argument("--http", action="store_true", help="HTTP/1.1 through the L7 path")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the event loop the agents run on")
    p.add_argument("--cprofile", help="write a cProfile of the agents' process here")
    p.add_argument("--setup-samples", type=int, default=0, metavar="N",
                   help="instead of the load: time N tunnel stream opens on a fresh "
                        "connection and N on the pooled one")
    args = p.parse_args()
    if args.nodelay_everywhere:
        nodelay_everywhere()
    if args.loop == "uvloop":
        import uvloop
        r = uvloop.run(run(args))
    else:
        r = asyncio.run(run(args))
    if args.setup_samples:
        print(json.dumps(r))
        return 0
    keys = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms", "achieved_rps",
            "lost", "bad_status", "errors", "agents_cpu_s_per_1000")
    print(json.dumps({k: r.get(k) for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
