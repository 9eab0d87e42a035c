"""systemd's readiness protocol (``sd_notify(3)``) in a few lines, no libsystemd.

A unit with ``Type=notify`` starts the daemon with ``NOTIFY_SOCKET`` set to a
unix datagram socket (a path, or ``@name`` in the abstract namespace); the
daemon sends ``READY=1`` there once it serves, and systemd only then counts the
unit as started and starts the units ordered after it. Without
``NOTIFY_SOCKET`` (the lab, tests, a shell) every call here does nothing.

``serving(work, readiness, status=...)`` is what a daemon's main wraps its run
in: ``READY=1`` (and a ``STATUS=`` line) the first time every named readiness
signal is set -- the same signals ``/readyz`` answers from -- and
``STOPPING=1`` when the work ends. Sending never raises: a daemon must not die
because its supervisor went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Coroutine, Mapping
from typing import Any

from shoal.monitoring import Readiness

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def socket_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The socket to notify, as ``connect`` takes it; None when not under systemd
    (or the address is of a kind we do not speak, e.g. vsock)."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (``READY=1``, ``STATUS=...``) in one datagram.
    True if sent; False without a socket or when sending failed (logged)."""
    address = socket_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(assignments).encode())
    except OSError as e:
        log.warning("sd_notify %s to %s failed: %s", assignments, address.lstrip("\0"), e)
        return False
    return True


async def _announce(readiness: Readiness, status: str) -> None:
    await readiness.wait()
    notify("READY=1", f"STATUS={status}")


async def serving(work: Coroutine[Any, Any, None], readiness: Readiness, *,
                  status: str) -> None:
    """Run ``work``; tell systemd READY=1 once ``readiness`` is complete, and
    STOPPING=1 when ``work`` ends (returns, fails or is cancelled)."""
    if socket_address() is None:
        await work
        return
    announcer = asyncio.create_task(_announce(readiness, status), name="sd_notify")
    try:
        await work
    finally:
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcer
        notify("STOPPING=1")
