"""``wait_set``: an event-or-timer wait that a loop around it can always be
cancelled from (``asyncio.wait_for`` on 3.11 swallows a cancellation that
arrives as the event fires, leaving such a loop running for ever)."""

from __future__ import annotations

import asyncio

import pytest

from shoal.queueing import wait_set

pytestmark = pytest.mark.asyncio


async def test_it_tells_a_set_event_from_a_timeout() -> None:
    ev = asyncio.Event()
    assert await wait_set(ev, 0.01) is False
    ev.set()
    assert await wait_set(ev, 10) is True


@pytest.mark.parametrize("yields", [0, 1, 2, 3])
async def test_a_loop_around_it_stops_when_cancelled_as_the_event_fires(yields: int) -> None:
    ev = asyncio.Event()

    async def loop() -> None:  # as the agents' loops: clear, then wait
        while True:
            ev.clear()
            await wait_set(ev, 10)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    ev.set()
    for _ in range(yields):  # every interleaving of the wake-up and the cancel
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1)
    assert done and task.cancelled()
