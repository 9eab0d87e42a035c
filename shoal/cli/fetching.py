"""Reads shared by the commands: one object or none, bounded fan-out, targets.

A named object that the server refuses (NotFound, Forbidden...) is reported on
stderr with kubectl's wording and the others are still shown; the caller gets
exit code 1 back. ``Unavailable`` is never swallowed (exit code 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from shoal import errors
from shoal.cli.reporting import ExitCode, server_error_line
from shoal.cli.session import Session
from shoal.cli.targets import Target
from shoal.client import AsyncClient
from shoal.kinds import Kind

CONCURRENT_READS = 16
# After a watch stream is cancelled, gRPC's core completes the call a moment
# later, on the loop that made it. Closing that loop first makes gRPC log
# "Event loop is closed" from whichever loop runs next; harmless in a CLI
# process, noise when several runs share a process (in-process tests).
STREAM_DRAIN_SECONDS = 0.1

_T = TypeVar("_T")


async def bounded_gather(coros: Sequence[Awaitable[_T]], *, limit: int = CONCURRENT_READS
                         ) -> list[_T]:
    """Await all, at most ``limit`` at a time; results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[_T]) -> _T:
        async with sem:
            return await c

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def drain_cancelled_stream() -> None:
    """Let a just-cancelled watch stream finish on this loop (see above)."""
    await asyncio.sleep(STREAM_DRAIN_SECONDS)


async def get_or_none(client: AsyncClient, kind: Kind, *, namespace: str, name: str
                      ) -> Any | None:
    try:
        return await client.get(kind.message, name, namespace=namespace)
    except errors.NotFound:
        return None


async def fetch_targets(session: Session, targets: Sequence[Target], *, namespace: str,
                        all_namespaces: bool = False, label_selector: str = "",
                        field_selector: str = "") -> tuple[list[tuple[Kind, list[Any]]], int]:
    """The objects each target names (or lists), and the exit code so far."""
    client = session.client()
    code = ExitCode.OK
    found: list[tuple[Kind, list[Any]]] = []
    for t in targets:
        objs: list[Any] = []
        if t.names:
            for name in t.names:
                try:
                    objs.append(await client.get(t.kind.message, name, namespace=namespace))
                except errors.Unavailable:
                    raise
                except errors.ShoalError as e:
                    session.warn(server_error_line(e))
                    code = ExitCode.SERVER_REFUSED
        else:
            listing = await client.list_all(
                t.kind.message, namespace=namespace, all_namespaces=all_namespaces,
                label_selector=label_selector, field_selector=field_selector)
            objs = list(listing.items)
        found.append((t.kind, objs))
    return found, code
