"""Waiting in tests: poll a check until it holds, failing with what was awaited.

    await eventually("3 pods", async_check)    # in async tests
    wait_for("node-1 Ready", check)            # in sync (e2e) tests
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(what: str, check: Callable[[], Awaitable[Any]], *,
                     timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what``."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await check()
                if last:
                    return last
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"{what} (last: {last!r})") from None


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 60.0,
             interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout:g}s (last: {last!r})")
