"""Relaying bytes between two ends of a proxied connection, by callbacks.

An end is a plain TCP socket (:class:`SocketEnd`, an asyncio protocol) or a
tunnel stream (:class:`meshagent.tunnel.Stream`). While the agent decides where
a connection goes, its ends keep what arrives; :meth:`Relay.run` then starts
them and every chunk is handed straight from one end's ``data_received`` to the
other end's ``write``, with no task, queue or future per chunk. That is what
the data path costs per request, so it matters::

    end A (side 0)                         end B (side 1)
    data_received --Relay.data(0, b)-----> write(b)          counted as "sent"
    write(b) <------Relay.data(1, b)------ data_received     counted as "received"
    EOF ----------- Relay.eof(0) --------> write_eof()       (half-close: the other
                                                             way keeps flowing)
    its output backs up -- Relay.full(0) --> B.pause_reading()
    ... and drains -------- Relay.drained(0) -> B.resume_reading()

Back-pressure comes from the end that cannot write: a socket whose transport
buffer passed its high-water mark, or a stream out of HTTP/2 send window. The
relay ends when both directions have ended (each EOF passed on and written), on
an error or reset of either end, or after ``idle_timeout`` with no data either
way; both ends are then closed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, cast

EARLY_LIMIT = 64 * 1024  # bytes an end keeps before the relay starts, then pauses


class End(Protocol):
    """What the relay needs of each end."""

    def start(self, relay: Relay, side: int) -> None:
        """Hand everything kept so far, and from now on everything that comes,
        to ``relay`` as ``side``."""

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    async def flushed(self) -> None:
        """Return once what was written has left (or cannot anymore)."""

    def close(self) -> None:
        """Done: a clean close after both EOFs, else an abort or reset."""


class Relay:
    """Copies A->B (``sent``) and B->A (``received``) until both directions end."""

    def __init__(self, a: End, b: End, *, sent: Callable[[int], None],
                 received: Callable[[int], None]) -> None:
        self.ends = (a, b)
        self._count = (sent, received)
        self._eof = [False, False]
        self.last = time.monotonic()
        self.error = ""
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- called by the ends --

    def data(self, side: int, data: bytes) -> None:
        self.last = time.monotonic()
        self._count[side](len(data))
        self.ends[1 - side].write(data)

    def eof(self, side: int) -> None:
        if self._eof[side]:
            return
        self._eof[side] = True
        self.ends[1 - side].write_eof()
        if all(self._eof):
            self._finish("")

    def lost(self, side: int, why: str) -> None:
        """``side`` is gone: reset, failed, or closed before its EOF."""
        if not self._eof[side] or why:
            self._finish(why or "closed")

    def full(self, side: int) -> None:
        self.ends[1 - side].pause_reading()

    def drained(self, side: int) -> None:
        self.ends[1 - side].resume_reading()

    def _finish(self, why: str) -> None:
        if not self._done.done():
            self.error = why
            self._done.set_result(None)

    # -- the owner --

    async def run(self, idle_timeout: float) -> None:
        """Start both ends and return when the relay is over; the caller closes
        the ends."""
        for side, end in enumerate(self.ends):
            end.start(self, side)
        while not self._done.done():
            wait = self.last + idle_timeout - time.monotonic()
            if wait <= 0:
                self.error = "idle"
                return
            await asyncio.wait([self._done], timeout=wait)
        if not self.error:  # both ways ended: let the last bytes leave
            try:
                async with asyncio.timeout(idle_timeout):
                    for end in self.ends:
                        await end.flushed()
            except TimeoutError:
                self.error = "idle"


class SocketEnd(asyncio.Protocol):
    """A plain TCP connection as a relay end (the pod's side, or a plaintext
    upstream). ``on_connected`` runs when the connection is made (listeners
    start their decision there)."""

    def __init__(self, on_connected: Callable[[SocketEnd], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected = on_connected
        self._relay: Relay | None = None
        self._side = 0
        self._early = bytearray()
        self._early_eof = False
        self._lost: str | None = None  # set once the connection is gone

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._relay is not None:
            self._relay.data(self._side, data)
            return
        self._early += data
        if len(self._early) >= EARLY_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self._relay is not None:
            self._relay.eof(self._side)
        else:
            self._early_eof = True
        return True  # keep our sending side open: a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = str(exc) if exc is not None else ""
        if self._relay is not None:
            self._relay.lost(self._side, self._lost)

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.full(self._side)

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.drained(self._side)

    # -- End --

    def start(self, relay: Relay, side: int) -> None:
        self._relay, self._side = relay, side
        if self._early:
            data, self._early = bytes(self._early), bytearray()
            relay.data(side, data)
            if self.transport is not None and self._lost is None:
                self.transport.resume_reading()
        if self._early_eof:
            relay.eof(side)
        if self._lost is not None:
            relay.lost(side, self._lost)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and self._lost is None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._lost is None:
            self.transport.resume_reading()

    async def flushed(self) -> None:
        """A transport's close() sends what it holds first; nothing to wait for."""

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
