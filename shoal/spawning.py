"""Child processes of the daemons, started without forking them."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence


async def spawn(cmd: Sequence[str], *, stdin: bytes | None = None,
                timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to its end from a worker thread, without forking this process.

    Not ``asyncio.create_subprocess_exec``: on uvloop (the mesh agent's loop)
    that is libuv's fork(), which copies the page tables of a process of
    60 MB or more (a pause of the loop, then copy-on-write faults) and runs
    gRPC's fork handlers in the child, which can abort there while gRPC's
    threads are busy. Python's own subprocess starts the child with vfork().
    ``timeout`` kills the child (``subprocess.TimeoutExpired``)."""
    return await asyncio.to_thread(
        subprocess.run, list(cmd), input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, timeout=timeout, check=False)
