"""The event loop a data-path daemon runs on.

The mesh agent and the gateway move every request through Python callbacks, and
uvloop's transports (libuv, Cython) make each of those steps cheaper than
asyncio's selector loop: the agents spend about an eighth less CPU per request
(BENCHMARKS.md). asyncio's own loop stays selectable (``--event-loop asyncio``),
and the in-process tests run the agents on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

LOOPS = ("uvloop", "asyncio")
DEFAULT = "uvloop"


def run(main: Coroutine[Any, Any, None], loop: str = DEFAULT) -> None:
    """``asyncio.run(main)`` on the named event loop."""
    if loop == "uvloop":
        import uvloop  # only the daemons that choose it import it

        uvloop.run(main)
    elif loop == "asyncio":
        asyncio.run(main)
    else:
        main.close()
        raise ValueError(f"event loop {loop!r}: want one of {', '.join(LOOPS)}")
