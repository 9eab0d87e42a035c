"""Echo server and open-loop load generator for ``bench/mesh_bench.py``.

    python bench/meshload.py serve --port 9000 [--http [--version NAME]]
    python bench/meshload.py load --target IP:PORT [--rate 1000] [--connections 16]
        [--size 1024] [--warmup 3] [--duration 20] [--http [--host-header NAME]]
    python bench/meshload.py probe --target IP:PORT [--interval 0.002] [--host-header NAME]

Standard library only (asyncio Protocols), so it runs under any Python inside a
pod's network namespace (``nsenter --net=...``).

**serve** echoes every byte back on the same connection and prints ``READY``.
With ``--http`` it is an HTTP/1.1 keep-alive server instead: each request's body
is answered as the response body (200, ``Content-Length``), with an
``x-version`` header naming ``--version``; a request without a body is answered
with the version name as the body.

**load** opens ``--connections`` TCP connections, then sends request ``k``
(``--size`` bytes) on connection ``k % connections`` at the scheduled time
``t0 + k / rate``. The timetable is a ``timerfd`` with a fixed period (nanosecond
resolution, timer slack set to 1 ns), not ``asyncio.sleep`` (whose epoll timeout
is rounded up to whole milliseconds). Sends never wait for earlier replies (open
loop: a request due on a connection whose previous echo has not arrived yet is
pipelined behind it), and latency is counted from the *scheduled* time to the
arrival of the request's last echoed byte, so a stall shows up in every request
scheduled during it (no coordinated omission). The echo of each request is
compared with what was sent.

With ``--http`` each request is ``POST /echo`` with a ``Content-Length`` body of
``--size`` bytes on a keep-alive connection, and the response's body must be it.
HTTP/1.1 pipelining is not used (a proxy need not support it): a request due on a
connection still waiting for its previous response waits in that connection's
queue and is sent when the response has arrived, its latency still counted from
its scheduled time. Responses other than 200 are counted as errors.

**probe** (``bench/mesh_propagation_bench.py``) sends ``GET /`` every
``--interval`` seconds on one keep-alive connection and prints
``SWITCH <version> <CLOCK_MONOTONIC seconds>`` each time the answering version
(the ``x-version`` header) differs from the previous answer's.

It prints ``MEASURE_START`` when the first measured request is due (after
``--warmup`` seconds), ``MEASURE_END`` after the last one, and then one JSON line:
latency percentiles of the measured requests (ms), how many were lost (no full
echo within ``--drain`` seconds after the last send, or the connection failed),
the achieved rate (echoes completed inside the measured window / its length),
and how late the sends went out after their scheduled time (the generator's own
lag; it is part of every latency).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import socket
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import cast

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1
PR_SET_TIMERSLACK = 29


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)


def _ts(ns: int) -> _Timespec:
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def periodic_timerfd(start_ns: int, period_ns: int) -> int:
    """A non-blocking timerfd on CLOCK_MONOTONIC firing at ``start_ns`` and then
    every ``period_ns``; reading it returns how many periods have passed."""
    fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    spec = _Itimerspec(_ts(period_ns), _ts(start_ns))
    if _libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, "timerfd_settime")
    return fd


# -- echo server -------------------------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int, host: str = "0.0.0.0", *, http: bool = False,
                version: str = "v1") -> None:
    loop = asyncio.get_running_loop()
    factory: Callable[[], asyncio.Protocol] = (
        (lambda: HttpEcho(version)) if http else Echo)
    server = await loop.create_server(factory, host, port, reuse_address=True, backlog=256)
    print("READY", flush=True)
    gc.freeze()
    async with server:
        await server.serve_forever()


# -- HTTP/1.1 ----------------------------------------------------------------------


class HttpParser:
    """Incremental HTTP/1.1 message framing (requests or responses): feed bytes,
    get (start line, lower-case headers, body) for each complete message.
    Content-Length and chunked bodies; a message with neither has no body."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
        self.buf += data
        out: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        while True:
            msg = self._one()
            if msg is None:
                return out
            out.append(msg)

    def _one(self) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = bytes(buf[:end]).split(b"\r\n")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        pos = end + 4
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = bytearray()
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                n = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if n == 0:
                    # trailers: up to an empty line
                    trail = buf.find(b"\r\n\r\n", eol)
                    if buf[eol:eol + 4] == b"\r\n\r\n":
                        pos = eol + 4
                    elif trail < 0:
                        return None
                    else:
                        pos = trail + 4
                    break
                if len(buf) < eol + 2 + n + 2:
                    return None
                body += buf[eol + 2:eol + 2 + n]
                pos = eol + 2 + n + 2
            del buf[:pos]
            return lines[0], headers, bytes(body)
        n = int(headers.get(b"content-length", b"0"))
        if len(buf) < pos + n:
            return None
        body_b = bytes(buf[pos:pos + n])
        del buf[:pos + n]
        return lines[0], headers, body_b


class HttpEcho(asyncio.Protocol):
    def __init__(self, version: str) -> None:
        self.version = version.encode()
        self.parser = HttpParser()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.parser.feed(data)
        except ValueError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()
            return
        for _, headers, body in msgs:
            if not body:
                body = self.version
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream"
                                 b"\r\nx-version: " + self.version + b"\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
            if headers.get(b"connection", b"").lower() == b"close":
                self.transport.close()
                return


# -- load generator ----------------------------------------------------------------


class Stats:
    def __init__(self, *, measure_from: int, measure_to: int, window: tuple[float, float]
                 ) -> None:
        self.measure_from, self.measure_to = measure_from, measure_to
        self.window = window
        self.latencies = array("d")
        self.scheduled = array("d")  # each measured request's scheduled time (--trace)
        self.completed_in_window = 0
        self.completed_measured = 0
        self.mismatches = 0
        self.bad_status = 0
        self.errors: list[str] = []


class Conn(asyncio.Protocol):
    """One connection: requests in flight in order, echoes matched by byte count."""

    def __init__(self, *, payload: bytes, stats: Stats) -> None:
        self.payload, self.size, self.stats = payload, len(payload), stats
        self.pending: deque[tuple[int, float]] = deque()  # (k, scheduled time)
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, k: int, scheduled: float) -> None:
        if self.transport is None or self.lost:
            return
        self.pending.append((k, scheduled))
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        size, st = self.size, self.stats
        while len(buf) >= size:
            if buf[:size] != self.payload:
                st.mismatches += 1
            del buf[:size]
            if not self.pending:
                st.errors.append("echo without a request")
                return
            k, scheduled = self.pending.popleft()
            if st.measure_from <= k < st.measure_to:
                st.latencies.append(now - scheduled)
                st.scheduled.append(scheduled)
                st.completed_measured += 1
            if st.window[0] <= now < st.window[1]:
                st.completed_in_window += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending:
            self.stats.errors.append(f"connection lost with {len(self.pending)} in flight: "
                                     f"{exc or 'closed by peer'}")
        self.lost = True


class HttpConn(Conn):
    """One keep-alive HTTP/1.1 connection: one request in flight at a time (no
    pipelining); requests due meanwhile wait in ``queue``, their latency counted
    from their scheduled time all the same."""

    def __init__(self, *, payload: bytes, stats: Stats, host: str) -> None:
        super().__init__(payload=payload, stats=stats)
        self.request = (b"POST /echo HTTP/1.1\r\nHost: " + host.encode()
                        + b"\r\nContent-Type: application/octet-stream\r\nContent-Length: "
                        + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        self.queue: deque[tuple[int, float]] = deque()
        self.parser = HttpParser()

    def send(self, k: int, scheduled: float) -> None:
        if self.transport is None or self.lost:
            return
        if self.pending:
            self.queue.append((k, scheduled))
            return
        self.pending.append((k, scheduled))
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        st = self.stats
        try:
            msgs = self.parser.feed(data)
        except ValueError as e:
            st.errors.append(f"bad response: {e}")
            msgs = []
        for start, _, body in msgs:
            if not self.pending:
                st.errors.append("response without a request")
                return
            if not start.startswith(b"HTTP/1.1 200 "):
                st.bad_status += 1
                if len(st.errors) < 5:
                    st.errors.append(f"status {start.decode(errors='replace')!r}: "
                                     f"{body[:200]!r}")
            elif body != self.payload:
                st.mismatches += 1
            k, scheduled = self.pending.popleft()
            if st.measure_from <= k < st.measure_to:
                st.latencies.append(now - scheduled)
                st.scheduled.append(scheduled)
                st.completed_measured += 1
            if st.window[0] <= now < st.window[1]:
                st.completed_in_window += 1
            if self.queue and self.transport is not None:
                self.pending.append(self.queue.popleft())
                self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pending.extend(self.queue)
        self.queue.clear()
        super().connection_lost(exc)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


async def load(*, host: str, port: int, rate: float, connections: int, size: int,
               warmup: float, duration: float, drain: float, source: str = "",
               http: bool = False, host_header: str = "", trace: str = ""
               ) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    with open("/dev/urandom", "rb") as f:
        payload = f.read(size)
    period_ns = round(1e9 / rate)
    measure_from = round(warmup * rate)
    measure_to = measure_from + round(duration * rate)
    # Connect first, then start the timetable 200 ms later.
    placeholder = Stats(measure_from=measure_from, measure_to=measure_to, window=(0, 0))
    conns: list[Conn] = []
    hh = host_header or f"{host}:{port}"

    def factory() -> Conn:
        if http:
            return HttpConn(payload=payload, stats=placeholder, host=hh)
        return Conn(payload=payload, stats=placeholder)

    for _ in range(connections):
        _, proto = await loop.create_connection(
            factory, host, port, local_addr=(source, 0) if source else None)
        conns.append(proto)
    start_ns = time.monotonic_ns() + 200_000_000
    t0 = start_ns / 1e9
    stats = Stats(measure_from=measure_from, measure_to=measure_to,
                  window=(t0 + measure_from * period_ns / 1e9,
                          t0 + measure_to * period_ns / 1e9))
    for c in conns:
        c.stats = stats
    lags = array("d")
    done = loop.create_future()
    fd = periodic_timerfd(start_ns, period_ns)
    state = {"k": 0}

    def tick() -> None:
        try:
            n = struct.unpack("Q", os.read(fd, 8))[0]
        except BlockingIOError:
            return
        now = time.monotonic()
        k = state["k"]
        for _ in range(n):
            if k >= measure_to:
                break
            if k == measure_from:
                print("MEASURE_START", flush=True)
            scheduled = (start_ns + k * period_ns) / 1e9
            if k >= measure_from:
                lags.append(now - scheduled)
            conns[k % connections].send(k, scheduled)
            k += 1
        state["k"] = k
        if k >= measure_to and not done.done():
            print("MEASURE_END", flush=True)
            done.set_result(None)

    loop.add_reader(fd, tick)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    deadline = time.monotonic() + drain
    while any(c.pending and not c.lost for c in conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    if trace:  # one line per measured request: when it was due (CLOCK_MONOTONIC), latency (ms)
        with open(trace, "w") as out:
            for at, latency in zip(stats.scheduled, stats.latencies, strict=True):
                out.write(f"{at:.6f} {latency * 1e3:.3f}\n")
    lat = sorted(x * 1e3 for x in stats.latencies)
    lag = sorted(x * 1e3 for x in lags)
    measured = measure_to - measure_from
    return {
        "target_rps": rate,
        "measured_requests": measured,
        "completed": stats.completed_measured,
        "lost": measured - stats.completed_measured,
        "achieved_rps": stats.completed_in_window / duration,
        "mismatches": stats.mismatches,
        "bad_status": stats.bad_status,
        "sent_total": measure_to,
        "errors": stats.errors[:5],
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99), "p999_ms": percentile(lat, 99.9),
        "max_ms": lat[-1] if lat else float("nan"),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
        "send_lag_p50_ms": percentile(lag, 50), "send_lag_p99_ms": percentile(lag, 99),
    }


async def probe(*, host: str, port: int, interval: float, host_header: str) -> None:
    """See the module docstring: print each change of the answering version."""
    hh = (host_header or f"{host}:{port}").encode()
    request = b"GET / HTTP/1.1\r\nHost: " + hh + b"\r\n\r\n"
    last = b""
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            print(f"ERROR connect: {e}", flush=True)
            await asyncio.sleep(0.5)
            continue
        parser = HttpParser()
        try:
            while True:
                writer.write(request)
                msgs: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
                while not msgs:
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("closed by peer")
                    msgs = parser.feed(data)
                now = time.monotonic()
                start, headers, _ = msgs[-1]
                version = headers.get(b"x-version", b"status " + start[9:12])
                if version != last:
                    print(f"SWITCH {version.decode()} {now:.6f}", flush=True)
                    last = version
                await asyncio.sleep(interval)
        except (OSError, ConnectionError, ValueError) as e:
            print(f"ERROR {e}", flush=True)
            writer.close()
            await asyncio.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--http", action="store_true", help="an HTTP/1.1 echo server")
    s.add_argument("--version", default="v1", help="x-version of the HTTP answers")
    g = sub.add_parser("load")
    g.add_argument("--target", required=True, metavar="IP:PORT")
    g.add_argument("--rate", type=float, default=1000.0)
    g.add_argument("--connections", type=int, default=16)
    g.add_argument("--size", type=int, default=1024)
    g.add_argument("--warmup", type=float, default=3.0)
    g.add_argument("--duration", type=float, default=20.0)
    g.add_argument("--drain", type=float, default=5.0)
    g.add_argument("--source", default="", help="local address to connect from")
    g.add_argument("--http", action="store_true", help="HTTP/1.1 keep-alive requests")
    g.add_argument("--host-header", default="", help="Host of the HTTP requests")
    g.add_argument("--trace", default="", metavar="FILE",
                   help="write each measured request's time and latency here")
    pr = sub.add_parser("probe")
    pr.add_argument("--target", required=True, metavar="IP:PORT")
    pr.add_argument("--interval", type=float, default=0.002)
    pr.add_argument("--host-header", default="")
    ns = p.parse_args()
    _libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    gc.disable()  # the harness keeps no cycles; no collector pauses inside a run
    if ns.cmd == "serve":
        asyncio.run(serve(ns.port, ns.host, http=ns.http, version=ns.version))
        return 0
    host, _, port = ns.target.rpartition(":")
    if not host or not port.isdigit():
        print(f"--target: {ns.target!r} is not IP:PORT", file=sys.stderr)
        return 2
    if ns.cmd == "probe":
        asyncio.run(probe(host=host, port=int(port), interval=ns.interval,
                          host_header=ns.host_header))
        return 0
    if ns.rate <= 0 or ns.connections <= 0 or ns.size <= 0 or ns.duration <= 0:
        print("--rate, --connections, --size and --duration must be positive", file=sys.stderr)
        return 2
    result = asyncio.run(load(host=host, port=int(port), rate=ns.rate,
                              connections=ns.connections, size=ns.size, warmup=ns.warmup,
                              duration=ns.duration, drain=ns.drain, source=ns.source,
                              http=ns.http, host_header=ns.host_header, trace=ns.trace))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
