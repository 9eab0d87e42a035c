"""HTTP/1.1 over a relay End (a pod's socket or a tunnel stream), parsed by httptools.

    Channel(end)                 an End as an async byte source and sink, with
                                 back-pressure both ways (reading pauses the End
                                 past READ_HIGH bytes unread; ``drain`` waits
                                 while the End cannot take more)
    Reader(channel, request=)    ``await next()`` -> Head | bytes (body) | END,
                                 messages in order (pipelined ones too)
    Head                         method/target or status/reason, headers as
                                 received, keep-alive, body framing
    forward_headers(head)        the headers minus hop-by-hop ones
    request_line / status_line   serialisation; ``chunk`` / LAST_CHUNK re-frame

Bodies stream: the reader hands each piece on as httptools parses it, and
only feeds the parser more once the consumer took what it gave (so nothing is
buffered beyond one read). Chunked bodies arrive de-chunked and are re-framed
by the writer (chunked again, or with the Content-Length the sender gave).

Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded: Connection and every
header it names, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding (the
body is re-framed) and Upgrade (no protocol switching through the proxy).
Malformed input raises :class:`HttpError` (400; 431 for a header block over
``MAX_HEADER_BYTES``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import httptools

from meshagent import relay

MAX_HEADER_BYTES = 64 * 1024
READ_HIGH = 256 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding",
                        "upgrade"})
LAST_CHUNK = b"0\r\n\r\n"


class _End:
    def __repr__(self) -> str:
        return "END"


END: Final = _End()  # the end of one message's body


class HttpError(Exception):
    """The peer sent something that is not HTTP/1.1 we accept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ChannelClosed(ConnectionError):
    """The connection broke (reset, or lost before its end)."""


@dataclass
class Head:
    """A request or response head. ``headers`` as received (names' case kept)."""

    version: str = "1.1"
    method: str = ""
    target: str = ""
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    keep_alive: bool = True
    chunked: bool = False
    length: int | None = None  # Content-Length

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def lower(self) -> dict[str, str]:
        """Headers by lower-case name (repeated ones joined with ", ")."""
        out: dict[str, str] = {}
        for k, v in self.headers:
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    @property
    def body_until_close(self) -> bool:
        """A response whose body ends when the connection does."""
        return (self.status != 0 and not self.chunked and self.length is None
                and not (100 <= self.status < 200 or self.status in (204, 304)))


def forward_headers(head: Head) -> list[tuple[str, str]]:
    """``head``'s headers minus the hop-by-hop ones (and Content-Length when the
    body was chunked: the writer frames it)."""
    named = {t.strip().lower() for k, v in head.headers if k.lower() == "connection"
             for t in v.split(",")}
    out = []
    for k, v in head.headers:
        lk = k.lower()
        if lk in HOP_BY_HOP or lk in named or lk.startswith("proxy-"):
            continue
        if lk == "content-length" and head.chunked:
            continue
        out.append((k, v))
    return out


def _head_bytes(first: str, headers: list[tuple[str, str]]) -> bytes:
    parts = [first, "\r\n"]
    for k, v in headers:
        parts += [k, ": ", v, "\r\n"]
    parts.append("\r\n")
    return "".join(parts).encode("latin-1", errors="replace")


def request_line(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    return _head_bytes(f"{method} {target} HTTP/1.1", headers)


def status_line(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    return _head_bytes(f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}",
                       headers)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 400: "Bad Request",
            403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
            413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")


# --------------------------------------------------------------------------- channel


class Channel(relay.Relay):
    """One End read and written by the codec (the End calls the relay's
    callbacks; this class takes the relay's place)."""

    def __init__(self, end: relay.End) -> None:  # no super(): nothing of Relay's state
        self.end = end
        self._buf = bytearray()
        self._eof = [False, False]
        self.error = ""
        self._ready = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self.closed = False
        self._pending: list[bytes] = []  # written with more=True, not yet sent
        end.start(self, 0)

    # -- the End's callbacks --

    def data(self, side: int, data: bytes) -> None:
        self._buf += data
        self._ready.set()
        if len(self._buf) > READ_HIGH and not self._paused:
            self._paused = True
            self.end.pause_reading()

    def eof(self, side: int) -> None:
        self._eof[0] = True
        self._ready.set()

    def lost(self, side: int, why: str) -> None:
        if why and not self.error:
            self.error = why
        self._eof[0] = True
        self._ready.set()
        self._writable.set()

    def full(self, side: int) -> None:
        self._writable.clear()

    def drained(self, side: int) -> None:
        self._writable.set()

    # -- the codec's side --

    @property
    def at_eof(self) -> bool:
        return self._eof[0] and not self._buf

    async def read(self) -> bytes:
        """What arrived (b"" at EOF); raises ChannelClosed after a reset."""
        while not self._buf and not self._eof[0]:
            self._ready.clear()
            await self._ready.wait()
        if not self._buf:
            if self.error:
                raise ChannelClosed(self.error)
            return b""
        data, self._buf = bytes(self._buf), bytearray()
        if self._paused:
            self._paused = False
            self.end.resume_reading()
        return data

    def write(self, data: bytes, *, more: bool = False) -> None:
        """Send ``data``; with ``more`` keep it until the next write without
        ``more`` (or ``flush``/``drain``), so that a message's head and a body
        that is already at hand leave as one write: one ``send`` on a socket,
        one DATA frame and one TLS record on a tunnel stream."""
        if self.error:
            raise ChannelClosed(self.error)
        if more:
            self._pending.append(data)
            return
        if self._pending:
            self._pending.append(data)
            data = b"".join(self._pending)
            self._pending.clear()
        self.end.write(data)

    def flush(self) -> None:
        """Send what ``write(..., more=True)`` kept (dropped after a reset)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self.error:
                self.end.write(data)

    async def drain(self) -> None:
        self.flush()
        if not self._writable.is_set():
            await self._writable.wait()
        if self.error:
            raise ChannelClosed(self.error)

    def write_eof(self) -> None:
        self.flush()
        self.end.write_eof()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self.end.close()


# --------------------------------------------------------------------------- reader

Event = Head | bytes | _End


class Reader:
    """Messages from a channel, as events: a Head, body pieces, END."""

    def __init__(self, channel: Channel, *, request: bool,
                 max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.channel = channel
        self.request = request
        self.max_header_bytes = max_header_bytes
        self.events: deque[Event] = deque()
        self._parser = self._new_parser()
        self._url = bytearray()
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._size = 0
        self._in_body = False
        self._skip_body = False  # the response to a HEAD request
        self.bytes_in = 0

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        return (httptools.HttpRequestParser(self) if self.request
                else httptools.HttpResponseParser(self))

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._url = bytearray()
        self._reason = b""
        self._headers = []
        self._size = 0

    def _count(self, n: int) -> None:
        self._size += n
        if self._size > self.max_header_bytes:
            raise HttpError(431, f"the header block is over {self.max_header_bytes} bytes")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self._url += url

    def on_status(self, status: bytes) -> None:
        self._count(len(status))
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4  # _count, inline: once per header
        if self._size > self.max_header_bytes:
            raise HttpError(431, f"the header block is over {self.max_header_bytes} bytes")
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        p = self._parser
        head = Head(version=p.get_http_version(), headers=self._headers,
                    keep_alive=bool(p.should_keep_alive()))
        if isinstance(p, httptools.HttpRequestParser):
            head.method = p.get_method().decode("latin-1")
            head.target = self._url.decode("latin-1")
        else:
            head.status = p.get_status_code()
            head.reason = self._reason.decode("latin-1")
        te = cl = None  # the first of each, as Head.get: one pass over the headers
        for k, v in self._headers:
            if len(k) in (14, 17):
                lk = k.lower()
                if lk == "content-length" and cl is None:
                    cl = v
                elif lk == "transfer-encoding" and te is None:
                    te = v
        head.chunked = te is not None and "chunked" in te.lower()
        if cl is not None and not head.chunked:
            if not cl.strip().isdigit():
                raise HttpError(400, f"bad Content-Length {cl!r}")
            head.length = int(cl)
        self.events.append(head)
        self._in_body = True

    def on_body(self, body: bytes) -> None:
        self.bytes_in += len(body)
        self.events.append(bytes(body))

    def on_message_complete(self) -> None:
        self._in_body = False
        self.events.append(END)

    # -- the consumer's side --

    def skip_body(self) -> None:
        """The next response has no body whatever its headers say (it answers HEAD)."""
        self._skip_body = True

    async def next(self) -> Event | None:
        """The next event; None at a clean EOF between messages. Raises
        HttpError on malformed input, ChannelClosed when the connection broke
        (or ended inside a message that needed its end)."""
        while not self.events:
            data = await self.channel.read()
            if not data:
                if self._in_body and not self.request and self._until_close():
                    self._in_body = False
                    return END
                if self._in_body or self._size:
                    raise ChannelClosed("the connection ended inside a message")
                return None
            self._feed(data)
        ev = self.events.popleft()
        if isinstance(ev, Head) and self._skip_body and not self.request:
            self._skip_body = False
            # Nothing follows this head: a fresh parser for the next message.
            self.events.clear()
            self.events.append(END)
            self._parser = self._new_parser()
            self._in_body = False
        return ev

    def _until_close(self) -> bool:
        return True  # a response without framing: its body ends at EOF

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # An Upgrade request: we do not switch protocols (Upgrade is
            # hop-by-hop and dropped); go on parsing what follows.
            offset = int(e.args[0]) if e.args and isinstance(e.args[0], int) else len(data)
            self._parser = self._new_parser()
            self._in_body = False
            if offset < len(data):
                self._feed(data[offset:])
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, HttpError):
                raise cause from None
            raise HttpError(400, f"malformed HTTP: {e}") from None
        except HttpError:
            raise
