"""The relay between two ends: delivery, half-close, back-pressure, failures, idleness."""

from __future__ import annotations

import asyncio

import pytest

from meshagent.relay import Relay

pytestmark = pytest.mark.asyncio


class FakeEnd:
    """An end that records what the relay asks of it and can be fed by the test."""

    def __init__(self, *, early: bytes = b"", early_eof: bool = False) -> None:
        self.relay: Relay | None = None
        self.side = 0
        self.early, self.early_eof = early, early_eof
        self.written = bytearray()
        self.eof_written = False
        self.paused = False
        self.closed = False
        self.flushes = 0

    def start(self, relay: Relay, side: int) -> None:
        self.relay, self.side = relay, side
        if self.early:
            relay.data(side, self.early)
        if self.early_eof:
            relay.eof(side)

    def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    async def flushed(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True

    # -- the test drives these --

    def receive(self, data: bytes) -> None:
        assert self.relay is not None
        self.relay.data(self.side, data)

    def end(self) -> None:
        assert self.relay is not None
        self.relay.eof(self.side)


def _relay(a: FakeEnd, b: FakeEnd) -> tuple[Relay, list[int], list[int]]:
    sent: list[int] = []
    received: list[int] = []
    return Relay(a, b, sent=sent.append, received=received.append), sent, received


async def _until_started(a: FakeEnd) -> None:
    while a.relay is None:
        await asyncio.sleep(0)


async def test_bytes_flow_both_ways_and_both_eofs_end_it_cleanly() -> None:
    a, b = FakeEnd(early=b"hello "), FakeEnd()
    relay, sent, received = _relay(a, b)
    run = asyncio.create_task(relay.run(idle_timeout=30))
    await _until_started(a)
    a.receive(b"world")
    a.end()
    assert b.written == b"hello world" and b.eof_written
    assert not run.done()  # half-closed: the other way still flows
    b.receive(b"reply")
    b.end()
    await asyncio.wait_for(run, 5)
    assert a.written == b"reply" and a.eof_written
    assert sent == [6, 5] and received == [5]
    assert relay.error == "" and a.flushes == b.flushes == 1


async def test_an_end_lost_before_its_eof_ends_it_with_the_reason() -> None:
    a, b = FakeEnd(), FakeEnd()
    relay, _, _ = _relay(a, b)
    run = asyncio.create_task(relay.run(idle_timeout=30))
    await _until_started(a)
    b.relay.lost(b.side, "connection reset")  # type: ignore[union-attr]
    await asyncio.wait_for(run, 5)
    assert relay.error == "connection reset" and a.flushes == 0


async def test_a_clean_close_after_eof_is_not_an_error() -> None:
    a, b = FakeEnd(early_eof=True), FakeEnd()
    relay, _, _ = _relay(a, b)
    run = asyncio.create_task(relay.run(idle_timeout=30))
    await _until_started(a)
    a.relay.lost(a.side, "")  # type: ignore[union-attr]
    assert not run.done()
    b.end()
    await asyncio.wait_for(run, 5)
    assert relay.error == ""


async def test_a_full_end_pauses_the_other_until_it_drains() -> None:
    a, b = FakeEnd(), FakeEnd()
    relay, _, _ = _relay(a, b)
    run = asyncio.create_task(relay.run(idle_timeout=30))
    await _until_started(a)
    relay.full(1)  # b cannot take more: stop reading a
    assert a.paused and not b.paused
    relay.drained(1)
    assert not a.paused
    a.end()
    b.end()
    await asyncio.wait_for(run, 5)


async def test_an_idle_relay_ends() -> None:
    a, b = FakeEnd(), FakeEnd()
    relay, _, _ = _relay(a, b)
    await asyncio.wait_for(relay.run(idle_timeout=0.05), 5)
    assert relay.error == "idle"
