"""The node agent's parts, wired together and run.

    NodeAgent.run()  (one TaskGroup)
      registration   Node + Lease heartbeat (nodeagent.registration)
      informer       pods with spec.nodeName == this node (SDK Informer)
      relister       the runtime's truth every second (nodeagent.pleg)
      workers x N    WorkQueue of pod UIDs -> PodSyncer.sync
      resync         every pod UID again every ``resync_period`` (level-triggered)
      events         the kubelet's Events for pods and the Node (shoal.events), if given

Events only enqueue UIDs; a worker reads the pod from the informer's cache and
the runtime record from the relister. A UID is never synced by two workers at
once. Orphans (runtime pods with no API object) are synced only after the
informer has synced, so a restart never kills pods it simply has not seen yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nodeagent.nodestatus import NodeFacts
from nodeagent.pleg import Relister
from nodeagent.podruntime import PodRuntime
from nodeagent.podsync import PodSyncer
from nodeagent.probing import ProbeManager
from nodeagent.registration import NodeRegistration
from nodeagent.restarts import RestartTracker
from nodeagent.volumes import VolumeManager
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.events import EventRecorder
from shoal.informer import Informer
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

UID_INDEX = "uid"


class NodeAgent:
    def __init__(
        self,
        *,
        client: AsyncClient,
        runtime: PodRuntime,
        node_name: str,
        facts: NodeFacts,
        volumes: VolumeManager,
        workers: int = 8,
        relist_interval: float = 1.0,
        resync_period: float = 30.0,
        renew_interval: float = 10.0,
        restart_backoff: tuple[float, float] = (10.0, 300.0),
        pod_cidr: str = "",
        clock: Callable[[], float] = time.time,
        pods: Informer[core_pb2.Pod] | None = None,
        events: EventRecorder | None = None,
    ) -> None:
        self.client = client
        # The kubelet's Events for pods and the Node (None: none are recorded).
        self.events = events
        self.runtime = runtime
        self.node_name = node_name
        self.workers = workers
        self.resync_period = resync_period
        self.queue = WorkQueue(base_delay=0.2, max_delay=30.0)
        # The pods bound here: this agent's own watch by default. Hollow nodes
        # (shoal.testing.hollow) pass a view fed by one watch shared by many; it
        # must carry the UID_INDEX index.
        self.pods: Informer[core_pb2.Pod] = pods if pods is not None else Informer(
            client, core_pb2.Pod, field_selector=f"spec.nodeName={node_name}",
            indexers={UID_INDEX: lambda p: [p.metadata.uid]})
        self.pods.add_handlers(
            on_add=self._enqueue, on_update=lambda old, new: self._enqueue(new),
            on_delete=self._enqueue)
        self.relister = Relister(runtime=runtime, on_change=self.queue.add,
                                 interval=relist_interval)
        self.probes = ProbeManager(exec_fn=self._exec, on_change=self.queue.add,
                                   on_failure=self._probe_failed)
        self.syncer = PodSyncer(runtime=runtime, client=client, volumes=volumes,
                                probes=self.probes, node_name=node_name,
                                host_ip=facts.internal_ip, relist=self.relister.relist,
                                clock=clock, restarts=RestartTracker(
                                    initial=restart_backoff[0], cap=restart_backoff[1]),
                                events=events)
        self.registration = NodeRegistration(client=client, node_name=node_name, facts=facts,
                                             runtime_probe=runtime.version,
                                             renew_interval=renew_interval,
                                             pod_cidr=pod_cidr, clock=clock, events=events)
        self.synced = asyncio.Event()

    def _probe_failed(self, uid: str, container: str, message: str) -> None:
        pod = self.pod_for(uid)
        if pod is not None and self.events is not None:
            self.events.event(pod, "Warning", "Unhealthy", message)

    def _enqueue(self, pod: core_pb2.Pod) -> None:
        self.queue.add(pod.metadata.uid)

    async def _exec(self, container_id: str, command: list[str], timeout: float
                    ) -> tuple[int, str]:
        code, out, err = await self.runtime.exec_sync(container_id, command, timeout=timeout)
        return code, (out + err).decode("utf-8", "replace")

    def pod_for(self, uid: str) -> core_pb2.Pod | None:
        found = self.pods.by_index(UID_INDEX, uid)
        return found[0] if found else None

    async def _worker(self) -> None:
        async for uid in self.queue.worker():
            pod = self.pod_for(uid)
            record = self.relister.records.get(uid)
            try:
                again = await self.syncer.sync(uid, pod, record)
            except errors.ShoalError as e:
                delay = self.queue.add_rate_limited(uid)
                log.warning("pod %s: sync failed: %s; retrying in %.1fs", uid, e, delay)
                continue
            except Exception:
                delay = self.queue.add_rate_limited(uid)
                log.exception("pod %s: sync crashed; retrying in %.1fs", uid, delay)
                continue
            self.queue.forget(uid)
            if again is not None:
                self.queue.add_after(uid, again)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_period)
            for uid in {p.metadata.uid for p in self.pods.list()} | set(self.relister.records):
                self.queue.add(uid)

    async def run(self) -> None:
        """Run until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                if self.events is not None:
                    tg.create_task(self.events.run(), name="events")
                tg.create_task(self.registration.run(), name="registration")
                tg.create_task(self.pods.run(), name="pod-informer")
                await self.pods.synced.wait()
                # First listing before any worker runs: adopt what is there.
                while True:
                    try:
                        await self.relister.relist()
                        break
                    except errors.ShoalError as e:
                        log.warning("waiting for the container runtime: %s", e)
                        await asyncio.sleep(1)
                self.synced.set()
                tg.create_task(self.relister.run(), name="relister")
                tg.create_task(self._resync(), name="resync")
                for i in range(self.workers):
                    tg.create_task(self._worker(), name=f"pod-worker-{i}")
        finally:
            self.probes.close()
            self.queue.close()
