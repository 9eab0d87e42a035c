"""Echo server and open-loop load generator for ``bench/mesh_bench.py``.

    python bench/meshload.py serve --port 9000
    python bench/meshload.py load --target IP:PORT [--rate 1000] [--connections 16]
        [--size 1024] [--warmup 3] [--duration 20]

Standard library only (asyncio Protocols), so it runs under any Python inside a
pod's network namespace (``nsenter --net=...``).

**serve** echoes every byte back on the same connection and prints ``READY``.

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
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int, host: str = "0.0.0.0") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, reuse_address=True, backlog=256)
    print("READY", flush=True)
    gc.freeze()
    async with server:
        await server.serve_forever()


# -- load generator ----------------------------------------------------------------


class Stats:
    def __init__(self, *, measure_from: int, measure_to: int, window: tuple[float, float]
                 ) -> None:
        self.measure_from, self.measure_to = measure_from, measure_to
        self.window = window
        self.latencies = array("d")
        self.completed_in_window = 0
        self.completed_measured = 0
        self.mismatches = 0
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
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
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
                st.completed_measured += 1
            if st.window[0] <= now < st.window[1]:
                st.completed_in_window += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending:
            self.stats.errors.append(f"connection lost with {len(self.pending)} in flight: "
                                     f"{exc or 'closed by peer'}")
        self.lost = True


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


async def load(*, host: str, port: int, rate: float, connections: int, size: int,
               warmup: float, duration: float, drain: float, source: str = ""
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
    for _ in range(connections):
        _, proto = await loop.create_connection(
            lambda: Conn(payload=payload, stats=placeholder), host, port,
            local_addr=(source, 0) if source else None)
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
        "errors": stats.errors[:5],
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99), "p999_ms": percentile(lat, 99.9),
        "max_ms": lat[-1] if lat else float("nan"),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
        "send_lag_p50_ms": percentile(lag, 50), "send_lag_p99_ms": percentile(lag, 99),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=9000)
    s.add_argument("--host", default="0.0.0.0")
    g = sub.add_parser("load")
    g.add_argument("--target", required=True, metavar="IP:PORT")
    g.add_argument("--rate", type=float, default=1000.0)
    g.add_argument("--connections", type=int, default=16)
    g.add_argument("--size", type=int, default=1024)
    g.add_argument("--warmup", type=float, default=3.0)
    g.add_argument("--duration", type=float, default=20.0)
    g.add_argument("--drain", type=float, default=5.0)
    g.add_argument("--source", default="", help="local address to connect from")
    ns = p.parse_args()
    _libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    gc.disable()  # the harness keeps no cycles; no collector pauses inside a run
    if ns.cmd == "serve":
        asyncio.run(serve(ns.port, ns.host))
        return 0
    host, _, port = ns.target.rpartition(":")
    if not host or not port.isdigit():
        print(f"--target: {ns.target!r} is not IP:PORT", file=sys.stderr)
        return 2
    if ns.rate <= 0 or ns.connections <= 0 or ns.size <= 0 or ns.duration <= 0:
        print("--rate, --connections, --size and --duration must be positive", file=sys.stderr)
        return 2
    result = asyncio.run(load(host=host, port=int(port), rate=ns.rate,
                              connections=ns.connections, size=ns.size, warmup=ns.warmup,
                              duration=ns.duration, drain=ns.drain, source=ns.source))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
