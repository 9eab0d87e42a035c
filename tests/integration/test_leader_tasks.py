"""The apiserver's own leader-only loops (storage maintenance, node IPAM) run on the
apiserver holding the controller Lease only, and move with it."""

from __future__ import annotations

import asyncio
import contextlib

from apiserver.controllermanager import ControllerManager
from shoal.testing.apiserver import InProcessAPIServer


async def test_leader_tasks_run_on_one_apiserver_and_move_with_the_lease(
        apiserver: InProcessAPIServer) -> None:
    running: list[int] = []

    def task(i: int):  # type: ignore[no-untyped-def]
        async def compact() -> None:
            running.append(i)
            try:
                await asyncio.Event().wait()
            finally:
                running.remove(i)
        return compact

    managers = []
    for i in range(3):  # three apiservers' controller managers, no controllers
        m = ControllerManager(client_config=apiserver.client_config, controllers=[],
                              lease_duration=1.5, renew_deadline=1.0, retry_period=0.1)
        m.leader_tasks.append(("maintenance", task(i)))
        managers.append(m)
    tasks = [asyncio.create_task(m.run()) for m in managers]
    try:
        async with asyncio.timeout(5):
            while not running:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert len(running) == 1
        leader = running[0]
        tasks[leader].cancel()  # the leading apiserver dies
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[leader]
        async with asyncio.timeout(5):
            while not running or running[0] == leader:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert len(running) == 1 and running[0] != leader
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
