"""The runtime's streaming server, reached over WebSocket: interactive exec and port-forward.

CRI's ``Exec`` and ``PortForward`` do not stream themselves: they answer a
one-time URL on containerd's streaming server (``stream_server_address``, on
127.0.0.1 next to the node agent). That server speaks the kubelet's streaming
protocols over SPDY or WebSocket; this module is a small WebSocket client
(RFC 6455, no extensions) for the ``v4.channel.k8s.io`` sub-protocol::

    every binary message = one channel byte + payload
    exec:          0 stdin ->   1 stdout <-   2 stderr <-
                   3 error <- (a metav1.Status JSON when the command ends:
                               Success, or NonZeroExitCode with an ExitCode cause)
                   4 resize -> (JSON {"Width": w, "Height": h})
    port-forward:  0 data <->   1 error <-    (?port=N; the first message the
                   server sends on each channel starts with the port, uint16 LE)

Limits of v4 (containerd 1.6 speaks no later version): stdin cannot be closed
on its own (half-close came with v5.channel.k8s.io), so with ``-i`` and no TTY
the end of the local stdin is not seen by the command; with a TTY, Ctrl-D is a
byte the terminal turns into end-of-file as usual.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from shoal import errors

CHANNEL_PROTOCOL = "v4.channel.k8s.io"
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
PF_DATA, PF_ERROR = 0, 1

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_MESSAGE = 16 << 20


class StreamingRuntime(Protocol):
    """What a CRI runtime offers for streams: one-time URLs on its streaming server."""

    async def exec_url(self, container_id: str, cmd: list[str], *, stdin: bool,
                       tty: bool) -> str: ...

    async def port_forward_url(self, sandbox_id: str, port: int) -> str: ...

    async def attach_url(self, container_id: str, *, stdin: bool, tty: bool) -> str: ...


def encode_frame(opcode: int, payload: bytes, *, mask: bytes | None) -> bytes:
    """One final WebSocket frame; clients must mask (``mask`` is 4 bytes)."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()


@dataclass(frozen=True)
class ExitStatus:
    """What the error channel said: the exit code, or a failure message."""

    code: int
    message: str = ""


def exit_status(status_json: bytes) -> ExitStatus:
    """Read the v4 error channel's Status: 0 on Success, the ExitCode cause on
    NonZeroExitCode, else 1 with the message (the command could not start)."""
    try:
        status: dict[str, Any] = json.loads(status_json or b"{}")
    except ValueError:
        return ExitStatus(1, status_json.decode("utf-8", "replace"))
    if status.get("status") == "Success":
        return ExitStatus(0)
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            with contextlib.suppress(TypeError, ValueError):
                return ExitStatus(int(cause.get("message", "1")))
    return ExitStatus(1, str(status.get("message", "")))


class ChannelSocket:
    """A client WebSocket carrying k8s channel messages. ``recv`` answers
    (channel, payload) or None when the server closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._send_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(cls, url: str, *, query: str = "") -> ChannelSocket:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "ws"):
            raise errors.Unavailable(f"the runtime's stream URL {url} is not plain HTTP",
                                     retry_after=1.0)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = parts.path or "/"
        q = "&".join(p for p in (parts.query, query) if p)
        if q:
            path += "?" + q
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            raise errors.Unavailable(f"cannot reach the runtime's streaming server at "
                                     f"{host}:{port}: {e}", retry_after=1.0) from e
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Protocol: {CHANNEL_PROTOCOL}\r\n\r\n").encode())
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            writer.close()
            raise errors.Unavailable("the runtime's streaming server closed the "
                                     "connection during the handshake", retry_after=1.0) from e
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        if len(status) < 2 or status[1] != "101":
            writer.close()
            body = b""
            with contextlib.suppress(Exception):
                body = await asyncio.wait_for(reader.read(4096), 1.0)
            raise errors.BadRequest(f"the runtime's streaming server refused the stream: "
                                    f"{lines[0]} {body.decode('utf-8', 'replace').strip()}")
        if headers.get("sec-websocket-accept") != accept_key(key):
            writer.close()
            raise errors.Unavailable("the runtime's streaming server answered a bad "
                                     "WebSocket handshake", retry_after=1.0)
        return cls(reader, writer)

    async def send(self, channel: int, data: bytes) -> None:
        async with self._send_lock:
            if self._closed:
                return
            self.writer.write(encode_frame(_BINARY, bytes([channel]) + data,
                                           mask=os.urandom(4)))
            await self.writer.drain()

    async def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        if n > _MAX_MESSAGE:
            raise errors.BadRequest(f"a stream message of {n} bytes is too large")
        mask = await self.reader.readexactly(4) if b1 & 0x80 else None
        payload = await self.reader.readexactly(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def recv(self) -> tuple[int, bytes] | None:
        message = b""
        while True:
            try:
                fin, opcode, payload = await self._frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == _CLOSE:
                return None
            if opcode == _PING:
                async with self._send_lock:
                    self.writer.write(encode_frame(_PONG, payload, mask=os.urandom(4)))
                continue
            if opcode == _PONG:
                continue
            message += payload
            if not fin:
                continue
            if not message:
                continue
            if opcode == _TEXT:  # base64 channel framing, should the server pick it
                message = message[:1] + base64.b64decode(message[1:])
            return message[0] - (ord("0") if opcode == _TEXT else 0), message[1:]

    async def close(self) -> None:
        async with self._send_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                self.writer.write(encode_frame(_CLOSE, struct.pack("!H", 1000),
                                               mask=os.urandom(4)))
                await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def resize_message(width: int, height: int) -> bytes:
    return json.dumps({"Width": width, "Height": height}).encode()
