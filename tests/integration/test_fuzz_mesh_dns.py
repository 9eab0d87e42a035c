"""Fuzzing the meshagent's DNS responder (``meshagent/dns.py``) with malformed
packets over real UDP and TCP sockets on loopback (issue 10).

Whatever arrives, the responder answers with a well-formed DNS message (FORMERR
for a query it cannot answer as asked) or drops it, and it keeps answering
correct queries afterwards: after every malformed packet a valid query is
sent on the same socket and must be answered.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent.dns import DNSServer

NAMES = {"web.shop.svc.cluster.local": ("10.96.0.10",)}
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Running:
    """A DNSServer on 127.0.0.1 in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = DNSServer(host="127.0.0.1", port=0, names=lambda: NAMES,
                                namespace_of=lambda ip: "shop")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.errors: list[object] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))

    def __enter__(self) -> Running:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with Running() as r:
        yield r


@pytest.fixture(scope="module")
def udp(server: Running) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", server.server.port))
    s.settimeout(2.0)
    yield s
    s.close()


def _valid_query() -> dns.message.Message:
    q = dns.message.make_query("web", "A")
    q.id = random.randrange(1 << 16)
    return q


def _check_answer(wire: bytes) -> dns.message.Message:
    """A reply must itself be a well-formed response."""
    msg = dns.message.from_wire(wire)
    assert msg.flags & dns.flags.QR
    return msg


def _still_answers(udp: socket.socket) -> None:
    """A valid query gets its answer (skipping late replies to what came before)."""
    q = _valid_query()
    udp.send(q.to_wire())
    while True:
        msg = _check_answer(udp.recv(65535))
        if msg.id == q.id and msg.question == q.question:
            assert msg.rcode() == dns.rcode.NOERROR
            assert [r.address for rr in msg.answer if rr.rdtype == 1 for r in rr] == [
                "10.96.0.10"]
            return


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        if out:
            out[at % len(out)] = value
    return bytes(out)


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "truncated", "header"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    base = dns.message.make_query("web", "A")
    base.id = draw(st.integers(0, 65535))
    base.use_edns(draw(st.sampled_from([-1, 0])))
    wire = base.to_wire()
    if kind == "mutated":
        return _mutate(wire, draw(st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)),
                                           min_size=1, max_size=6)))
    if kind == "truncated":
        return wire[:draw(st.integers(0, len(wire) - 1))]
    # A valid header with odd flags/opcodes/counts, then random bytes.
    head = struct.pack("!HHHHHH", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                       *draw(st.lists(st.integers(0, 65535), min_size=4, max_size=4)))
    return head + draw(st.binary(max_size=64))


@FUZZ
@given(malformed())
def test_malformed_udp_packets_get_formerr_or_nothing_and_the_server_keeps_answering(
        server: Running, udp: socket.socket, packet: bytes) -> None:
    udp.send(packet)
    _still_answers(udp)


@pytest.mark.parametrize("packet", [
    b"",
    b"\x00",
    b"\xff" * 12,
    # A response (QR set) sent as a query.
    dns.message.make_response(dns.message.make_query("web", "A")).to_wire(),
    # Two questions; zero questions.
    b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00" + b"\x03web\x00\x00\x01\x00\x01" * 2,
    b"\x12\x34\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    # An UPDATE, a NOTIFY.
    dns.message.make_query("web", "A").to_wire()[:2] + b"\x28\x00"
    + dns.message.make_query("web", "A").to_wire()[4:],
    dns.message.make_query("web", "A").to_wire()[:2] + b"\x20\x00"
    + dns.message.make_query("web", "A").to_wire()[4:],
    # A compression pointer loop.
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
])
def test_known_bad_packets(server: Running, udp: socket.socket, packet: bytes) -> None:
    udp.send(packet)
    udp.settimeout(0.3)
    try:
        reply = udp.recv(65535)
    except TimeoutError:
        reply = b""  # dropped
    finally:
        udp.settimeout(2.0)
    if reply:
        msg = _check_answer(reply)
        assert msg.rcode() in (dns.rcode.FORMERR, dns.rcode.NOTIMP, dns.rcode.NOERROR,
                               dns.rcode.NXDOMAIN, dns.rcode.REFUSED), msg
    _still_answers(udp)


def _tcp_exchange(port: int, payloads: list[bytes]) -> bytes:
    """Send ``payloads`` on one connection; what came back. The server closes a
    connection whose message it cannot decode (a drop)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        out = b""
        try:
            s.sendall(b"".join(struct.pack("!H", len(p)) + p for p in payloads))
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65535):
                out += chunk
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        return out


@FUZZ
@given(st.lists(malformed(), min_size=1, max_size=3))
def test_malformed_tcp_messages_leave_the_server_serving(
        server: Running, udp: socket.socket, packets: list[bytes]) -> None:
    out = _tcp_exchange(server.server.port, packets)
    while len(out) >= 2:  # whatever came back is length-prefixed, well-formed DNS
        (n,) = struct.unpack("!H", out[:2])
        _check_answer(out[2:2 + n])
        out = out[2 + n:]
    assert not out
    _still_answers(udp)
    good = _valid_query()
    reply = _tcp_exchange(server.server.port, [good.to_wire()])
    assert _check_answer(reply[2:]).id == good.id


def test_a_response_sent_as_a_query_over_tcp_is_dropped(server: Running,
                                                        udp: socket.socket) -> None:
    """Found by the fuzzer: answering it raised dnspython's FormError out of the TCP
    handler (an unhandled exception in the event loop); it is dropped now, as the
    UDP side already did."""
    before = len(server.errors)
    response = dns.message.make_response(dns.message.make_query("web", "A")).to_wire()
    assert _tcp_exchange(server.server.port, [response]) == b""
    assert server.errors[before:] == []
    _still_answers(udp)


def test_no_unhandled_errors_in_the_server(server: Running) -> None:
    """Runs after the fuzzers (same module): nothing escaped to the event loop."""
    assert server.errors == []
