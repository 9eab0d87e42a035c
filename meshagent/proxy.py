"""The capture listeners: outbound (15001) and inbound (15006), plaintext L4.

    accept -> original destination (SO_ORIGINAL_DST, or a function given in tests)
           -> outbound: routing.decide(): a service port -> Balancer.pick() of its
              ready endpoints; a pod IP -> as is; else close
              inbound: the original destination (a local pod) as is
           -> connect (timeout) -> splice both ways until both sides are done

Splicing is half-close aware (EOF one way is passed on with ``write_eof`` and
the other way keeps flowing), reads are bounded (64 KiB) and writes drained
(back-pressure), and a connection idle in both directions for ``idle_timeout``
is closed. Listeners are bound in ``start()`` so a bad port fails at start-up.

Metrics use Istio's names: istio_tcp_connections_opened_total,
istio_tcp_connections_closed_total, istio_tcp_sent_bytes_total (client to
server) and istio_tcp_received_bytes_total (server to client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from meshagent.routing import Address, Balancer, Route, decide

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
CHUNK = 64 * 1024

OriginalDst = Callable[[socket.socket], Address]
# pod IP -> (workload, namespace); ("unknown", "unknown") when not a known pod.
WorkloadOf = Callable[[str], tuple[str, str]]
Routes = Callable[[], dict[Address, Route]]


def original_dst(sock: socket.socket) -> Address:
    """The pre-REDIRECT destination of an accepted IPv4 connection."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), int(port)


def _unknown(_ip: str) -> tuple[str, str]:
    return "unknown", "unknown"


LABELS = ("reporter", "source_workload", "source_workload_namespace",
          "destination_workload", "destination_workload_namespace", "destination_service",
          "response_flags")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened",
                              LABELS, registry=registry)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed",
                              LABELS, registry=registry)
        self.sent = Counter("istio_tcp_sent_bytes", "bytes sent from client to server",
                            LABELS, registry=registry)
        self.received = Counter("istio_tcp_received_bytes",
                                "bytes received by the client from the server", LABELS,
                                registry=registry)


@dataclass
class _Activity:
    last: float


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                count: Callable[[int], None], activity: _Activity) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        activity.last = time.monotonic()
        count(len(data))
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter], *,
                 sent: Callable[[int], None], received: Callable[[int], None],
                 idle_timeout: float) -> None:
    """Copy a->b and b->a until both directions end, an error, or idleness."""
    activity = _Activity(time.monotonic())
    up = asyncio.create_task(_pump(a[0], b[1], sent, activity))
    down = asyncio.create_task(_pump(b[0], a[1], received, activity))
    pending: set[asyncio.Task[None]] = {up, down}
    try:
        while pending:
            wait = max(0.0, activity.last + idle_timeout - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=wait,
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.exception() is not None:
                    return
            if not done and time.monotonic() - activity.last >= idle_timeout:
                return
    finally:
        for t in (up, down):
            t.cancel()
        for t in (up, down):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class Listener:
    """One capture listener; ``direction`` is "outbound" or "inbound"."""

    def __init__(self, *, direction: str, host: str, port: int, routes: Routes,
                 pod_cidr: str, balancer: Balancer, metrics: Metrics,
                 workload_of: WorkloadOf = _unknown,
                 original_dst: OriginalDst = original_dst,
                 connect_timeout: float = 5.0, idle_timeout: float = 3600.0) -> None:
        self.direction = direction
        self.host = host
        self.port = port
        self.routes = routes
        self.pod_cidr = pod_cidr
        self.balancer = balancer
        self.metrics = metrics
        self.workload_of = workload_of
        self.original_dst = original_dst
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        # Wait for them: their sockets close and their metrics are counted.
        await asyncio.gather(*conns, return_exceptions=True)

    def _target(self, dst: Address) -> tuple[Address | None, str, str]:
        """(where to connect, destination service, response flag if refused)."""
        if self.direction == "inbound":
            return dst, "unknown", ""
        d = decide(self.routes(), dst, pod_cidr=self.pod_cidr)
        if d.kind == "service" and d.route is not None:
            return self.balancer.pick(d.route), d.route.service, ""
        if d.kind == "passthrough":
            return dst, "unknown", ""
        svc = d.route.service if d.route is not None else "unknown"
        log.info("%s: refused %s:%d: %s", self.direction, dst[0], dst[1], d.reason)
        return None, svc, "NR"  # no route, as Envoy's response flag

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Shutting down. Ending normally: Python 3.11's start_server callback
            # calls task.exception() and would log a cancelled task as an error.
            pass
        except Exception:
            log.exception("%s connection failed", self.direction)
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        try:
            dst = self.original_dst(sock)
        except OSError as e:
            log.warning("%s: no original destination for %s: %s", self.direction, peer, e)
            return
        target, service, flag = self._target(dst)
        src_wl, src_ns = self.workload_of(peer[0])
        dst_wl, dst_ns = self.workload_of(target[0]) if target else ("unknown", "unknown")
        labels: dict[str, str] = {
            "reporter": "destination" if self.direction == "inbound" else "source",
            "source_workload": src_wl, "source_workload_namespace": src_ns,
            "destination_workload": dst_wl, "destination_workload_namespace": dst_ns,
            "destination_service": service, "response_flags": flag}
        if target is None:
            self.metrics.opened.labels(**labels).inc()
            self.metrics.closed.labels(**labels).inc()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*target), timeout=self.connect_timeout)
        except (OSError, TimeoutError) as e:
            log.info("%s: connect to %s:%d failed: %s", self.direction, *target, e)
            labels["response_flags"] = "UF"  # upstream connection failure
            self.metrics.opened.labels(**labels).inc()
            self.metrics.closed.labels(**labels).inc()
            return
        self.balancer.opened(target)
        self.metrics.opened.labels(**labels).inc()
        sent = self.metrics.sent.labels(**labels)
        received = self.metrics.received.labels(**labels)
        try:
            await splice((reader, writer), (up_reader, up_writer),
                         sent=sent.inc, received=received.inc,
                         idle_timeout=self.idle_timeout)
        finally:
            self.balancer.closed(target)
            self.metrics.closed.labels(**labels).inc()
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
