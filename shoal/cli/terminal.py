"""``shoal exec -i [-t]``: an interactive command, streamed through the apiserver.

    local terminal --raw bytes--> ExecStream (stdin, resize) --> node agent --> CRI Exec
    local stdout   <--stdout/stderr, then the exit code--

With ``-t`` the local terminal goes into raw mode (restored on the way out,
whatever happens): every key, Ctrl-C and Ctrl-D included, goes to the remote
terminal, whose line discipline acts on them. The size is sent at the start
and again on each SIGWINCH. Without ``-t`` (``-i`` only) stdin is streamed as
it comes; its end is sent as a half-close (the runtime's v4 stream protocol
cannot pass it on to the command: see ``nodeagent.streaming``). The exit code
is the command's, as kubectl's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import threading
import tty as ttymod
from collections.abc import Iterator
from typing import BinaryIO

from shoal import errors
from shoal.api.node.v1 import node_pb2
from shoal.cli.session import Session

_RESIZE = object()


def terminal_size(fd: int) -> tuple[int, int] | None:
    """(columns, rows) of the terminal on ``fd``, or None when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.columns, size.lines


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode for the block; restored afterwards."""
    saved = termios.tcgetattr(fd)
    try:
        ttymod.setraw(fd, termios.TCSADRAIN)  # keep what was typed ahead
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _binary(stream: object) -> BinaryIO | None:
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else None


async def run_exec_interactive(session: Session, *, pod: str, container: str,
                               command: list[str], tty: bool, stdin_fd: int | None = None
                               ) -> int:
    if not command:
        raise errors.BadRequest("exec needs a command after --, e.g. shoal exec -it web-0 -- sh")
    code = await stream_terminal(session, pod=pod, container=container, command=command,
                                 tty=tty, stdin_fd=stdin_fd)
    if code is None:
        raise errors.Unavailable("the exec stream ended without an exit code",
                                 retry_after=1.0)
    return code


async def stream_terminal(session: Session, *, pod: str, container: str, command: list[str],
                          tty: bool, stdin_fd: int | None = None, attach: bool = False
                          ) -> int | None:
    """Run (or, with ``attach``, attach to) a process with the local terminal;
    its exit code, or None when the stream ended without one (an attach)."""
    fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    if tty and not os.isatty(fd):
        session.warn("Unable to use a TTY - input is not a terminal or the right kind of file")
        tty = False
    start = node_pb2.ExecStart(pod=pod, container=container, command=command, stdin=True,
                               tty=tty, namespace=session.namespace, attach=attach)
    size = terminal_size(fd) if tty else None
    if size:
        start.size.width, start.size.height = size
    stream = session.client().exec_stream(start)
    await stream.open()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[bytes | object | None] = asyncio.Queue()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
        inbox.put_nowait(data or None)

    def read_in_thread() -> None:  # stdin is a regular file: epoll cannot watch it
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(inbox.put_nowait, data or None)
            if not data:
                return

    async def send_input() -> None:
        while True:
            item = await inbox.get()
            if item is None:
                await stream.done_writing()
                return
            if item is _RESIZE:
                now = terminal_size(fd)
                if now:
                    await stream.write(node_pb2.ExecInput(
                        resize=node_pb2.TerminalSize(width=now[0], height=now[1])))
            elif isinstance(item, bytes):
                await stream.write(node_pb2.ExecInput(stdin=item))

    out, err = _binary(session.out), _binary(session.err)

    def emit(data: bytes, binary: BinaryIO | None, text: object) -> None:
        if binary is not None:
            binary.write(data)
            binary.flush()
        else:
            text.write(data.decode("utf-8", "replace"))  # type: ignore[attr-defined]
            text.flush()  # type: ignore[attr-defined]

    watching = False
    with raw_mode(fd) if tty else contextlib.nullcontext():
        try:
            loop.add_reader(fd, readable)
            watching = True
        except (PermissionError, OSError):
            threading.Thread(target=read_in_thread, daemon=True).start()
        if tty:
            loop.add_signal_handler(signal.SIGWINCH, inbox.put_nowait, _RESIZE)
        sender = asyncio.create_task(send_input())
        code: int | None = None
        try:
            while (message := await stream.read()) is not None:
                kind = message.WhichOneof("output")
                if kind == "stdout":
                    emit(message.stdout, out, session.out)
                elif kind == "stderr":
                    emit(message.stderr, err, session.err)
                elif kind == "exit_code":
                    code = message.exit_code
                    break
        finally:
            sender.cancel()
            stream.cancel()
            if watching:
                loop.remove_reader(fd)
            if tty:
                loop.remove_signal_handler(signal.SIGWINCH)
    if code is None:
        return None
    return code if 0 <= code < 256 else 1
