"""Runs the in-process controllers while this apiserver holds the leader Lease.

    ControllerManager.run():
        LeaderElector("shoal-controller-manager" Lease in kube-system)
          leading: SharedInformers + EventRecorder; every controller's setup(),
                   then informers start, then each controller's run() in a TaskGroup
          lost:    all cancelled; campaign again

The controllers talk to the apiserver through the SDK over a loopback TLS
connection with the controller manager's own certificate, exactly like any
other client: they see the API as users see it, nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

from apiserver.controllers.base import (
    Controller,
    ControllerContext,
    ControllerSettings,
    SharedInformers,
)
from shoal.client import AsyncClient
from shoal.config import ClientConfig
from shoal.events import EventRecorder
from shoal.leaderelection import LeaderElector

log = logging.getLogger(__name__)

LEASE_NAME = "shoal-controller-manager"


class ControllerManager:
    def __init__(self, *, client_config: ClientConfig,
                 controllers: Sequence[Callable[[], Controller]],
                 settings: ControllerSettings | None = None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0) -> None:
        self.client_config = client_config
        self.factories = list(controllers)
        self.settings = settings or ControllerSettings()
        self.identity = f"{socket.gethostname()}_{os.getpid()}_{id(self):x}"
        self.lease = (lease_duration, renew_deadline, retry_period)
        self.leading = asyncio.Event()
        # Loops of the apiserver itself that one apiserver only may run (node
        # IPAM, storage compaction): they run beside the controllers, while leading.
        self.leader_tasks: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    async def run(self) -> None:
        if not self.factories and not self.leader_tasks:
            return
        async with AsyncClient(self.client_config) as client:
            duration, deadline, period = self.lease
            elector = LeaderElector(client=client, name=LEASE_NAME, identity=self.identity,
                                    lease_duration=duration, renew_deadline=deadline,
                                    retry_period=period)

            async def lead() -> None:
                await self._lead(client)

            await elector.run(lead)

    async def _lead(self, client: AsyncClient) -> None:
        informers = SharedInformers(client)
        events = EventRecorder(client, component="shoal-controller-manager")
        ctx = ControllerContext(client=client, informers=informers, events=events,
                                settings=self.settings)
        controllers = [f() for f in self.factories]
        for c in controllers:
            c.setup(ctx)
        informers.start()
        self.leading.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(events.run(), name="events")
                for c in controllers:
                    tg.create_task(c.run(ctx), name=f"controller-{c.name}")
                for name, task in self.leader_tasks:
                    tg.create_task(task(), name=name)  # type: ignore[arg-type]
                log.info("controllers running: %s", ", ".join(c.name for c in controllers))
        finally:
            self.leading.clear()
            informers.stop()
