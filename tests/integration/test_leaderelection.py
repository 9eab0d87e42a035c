"""Leader election on a Lease: one leader at a time, fail-over within the lease."""

from __future__ import annotations

import asyncio
import contextlib

from apiserver.controllermanager import ControllerManager
from apiserver.controllers.base import ControllerContext
from shoal.api.coordination.v1 import coordination_pb2
from shoal.client import AsyncClient
from shoal.leaderelection import LeaderElector
from shoal.testing.apiserver import InProcessAPIServer


async def test_one_leader_and_fail_over(client: AsyncClient) -> None:
    leading: list[str] = []

    def elector(name: str) -> LeaderElector:
        return LeaderElector(client=client, name="test-election", identity=name,
                             lease_duration=1.5, renew_deadline=1.0, retry_period=0.1)

    async def work(name: str) -> None:
        leading.append(name)
        try:
            await asyncio.Event().wait()
        finally:
            leading.remove(name)

    a, b = elector("a"), elector("b")
    ta = asyncio.create_task(a.run(lambda: work("a")))
    await asyncio.sleep(0.3)
    tb = asyncio.create_task(b.run(lambda: work("b")))
    try:
        await asyncio.sleep(1.0)
        assert leading == ["a"]  # b waits while a renews
        ta.cancel()  # the leader dies without releasing the Lease
        with contextlib.suppress(asyncio.CancelledError):
            await ta
        async with asyncio.timeout(5):
            while leading != ["b"]:
                await asyncio.sleep(0.05)
        lease = await client.get(coordination_pb2.Lease, "test-election",
                                 namespace="kube-system")
        assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions >= 1
    finally:
        tb.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tb


class Recorder:
    name = "recorder"

    def __init__(self, runs: list[str]) -> None:
        self.runs = runs

    def setup(self, ctx: ControllerContext) -> None:
        pass

    async def run(self, ctx: ControllerContext) -> None:
        self.runs.append("run")
        await asyncio.Event().wait()


async def test_controller_manager_runs_controllers_only_when_leading(
        apiserver: InProcessAPIServer) -> None:
    runs: list[str] = []
    cfg = apiserver.client_config
    managers = [ControllerManager(client_config=cfg, controllers=[lambda: Recorder(runs)],
                                  lease_duration=1.5, renew_deadline=1.0, retry_period=0.1)
                for _ in range(2)]
    tasks = [asyncio.create_task(m.run()) for m in managers]
    try:
        async with asyncio.timeout(5):
            while not runs:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert runs == ["run"] and sum(m.leading.is_set() for m in managers) == 1
        leader = next(i for i, m in enumerate(managers) if m.leading.is_set())
        tasks[leader].cancel()
        async with asyncio.timeout(5):
            while len(runs) < 2:
                await asyncio.sleep(0.05)
        assert managers[1 - leader].leading.is_set()
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_events_are_recorded_and_counted(client: AsyncClient, namespace: str) -> None:
    from shoal.api.core.v1 import core_pb2
    from shoal.events import EventRecorder

    cm = core_pb2.ConfigMap()
    cm.metadata.name = "subject"
    cm = await client.create(cm)
    rec = EventRecorder(client, component="test-controller", host="h1")
    rec.event(cm, "Warning", "Broken", "it broke")
    rec.event(cm, "Warning", "Broken", "it broke")
    rec.event(cm, "Normal", "Fixed", "it works")
    await rec.flush()
    events = await client.list(core_pb2.Event, field_selector="involvedObject.name=subject")
    by_reason = {e.reason: e for e in events.items}
    assert by_reason["Broken"].count == 2 and by_reason["Fixed"].count == 1
    assert by_reason["Broken"].source.component == "test-controller"
    assert by_reason["Broken"].involved_object.uid == cm.metadata.uid
