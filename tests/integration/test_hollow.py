"""Hollow nodes (shoal.testing.hollow) with the scheduler: pods land, spread, and run."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

from shoal.api.core.v1 import core_pb2
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.hollow import HollowCluster


async def test_hollow_nodes_register_and_run_scheduled_pods(tmp_path: Path) -> None:
    async with InProcessAPIServer(tmp_path / "api", controllers=("scheduler",),
                                  leader_lease=(5.0, 4.0, 0.2)) as api, \
            api.client() as c1, api.client() as c2:
        hollow = HollowCluster([c1, c2], count=12, root=tmp_path / "nodes", heartbeat=1.0,
                               relist=0.5, start_batch=5)
        task = asyncio.create_task(hollow.run())
        try:
            async with asyncio.timeout(20):
                await hollow.ready.wait()
            nodes = (await c1.list(core_pb2.Node)).items
            assert sorted(n.metadata.name for n in nodes) == sorted(hollow.names)
            assert all(any(cond.type == "Ready" and cond.status == "True"
                           for cond in n.status.conditions) for n in nodes)
            for i in range(24):
                p = core_pb2.Pod()
                p.metadata.name, p.metadata.namespace = f"p-{i}", "default"
                p.metadata.owner_references.add(api_version="apps/v1", kind="ReplicaSet",
                                                 name="rs", uid="rs-1", controller=True)
                c = p.spec.containers.add(name="c", image="busybox:1.36")
                c.resources.requests["cpu"].value = "100m"
                await c1.create(p)
            async with asyncio.timeout(30):
                while True:
                    pods = (await c1.list(core_pb2.Pod, namespace="default")).items
                    if len(pods) == 24 and all(p.status.phase == "Running" for p in pods):
                        break
                    await asyncio.sleep(0.1)
            assert Counter(p.spec.node_name for p in pods) == {n: 2 for n in hollow.names}
            # The agents' own status: each pod has a sandbox in its node's fake runtime.
            sandboxes = sum(len(rt.calls_to("run_pod_sandbox")) for rt in hollow.runtimes)
            assert sandboxes == 24
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
