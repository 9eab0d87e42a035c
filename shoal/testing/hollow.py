"""Hollow nodes: many node agents in one process on the fake runtime, as kubemark's.

    HollowCluster(clients, count=5000, ...)
      PodDispatcher: ONE Informer of all pods (one list + one watch)
          --by spec.nodeName--> NodeView per node (a cache shaped like the agent's
                                own field-selected informer: same handlers, same
                                UID index, same add/update/delete semantics)
      per node: nodeagent.agent.NodeAgent, unchanged:
          registration (Node create, status posts) + Lease renewal every
          ``heartbeat`` seconds, the pod work queue and workers, the planner and
          syncer (sandbox, containers, status writes), the relister, the resync
          on FakeRuntime + CRIPodRuntime, VolumeManager on a mounter that mounts
          nothing

What is shared, and why: a real agent watches its own pods with a field
selector. 5,000 such watches would make the apiserver test every pod event
against 5,000 selectors and hold 5,000 streams, which measures the watch fan-out
rather than the agents; so one watch feeds every agent's cache here, and the
agents' own sync logic runs as it would. The gRPC channels are shared too
(``clients`` round-robin), and so is the client identity (the admin
certificate, not one per node). Containers run until stopped (the fake
runtime's default behaviour); images are "present". Each node brings its own
pod CIDR (``hollow_pod_cidr``), so node IPAM is left out.

    python -m shoal.testing.hollow --config admin.conf --nodes 5000 [--heartbeat 10]

runs them until SIGTERM/SIGINT, printing "ready <n>" on stdout once every node
has registered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from nodeagent.agent import UID_INDEX, NodeAgent
from nodeagent.criruntime import CRIPodRuntime
from nodeagent.nodestatus import NodeFacts
from nodeagent.volumes import VolumeManager
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer
from shoal.testing.fakecri import FakeRuntime

log = logging.getLogger(__name__)

IMAGES = ("busybox:1.36", "busybox", "registry.k8s.io/pause:3.9")


class NullMounter:
    """Volumes without mounts (a hollow node has no tmpfs to give)."""

    def __init__(self) -> None:
        self.mounted: set[Path] = set()

    def mount_tmpfs(self, path: Path, *, size: str = "") -> None:
        self.mounted.add(path)

    def unmount(self, path: Path) -> None:
        self.mounted.discard(path)

    def is_mount(self, path: Path) -> bool:
        return path in self.mounted


class NodeView(Informer[core_pb2.Pod]):
    """One node's pods, fed by a :class:`PodDispatcher` instead of its own watch."""

    def __init__(self, client: AsyncClient, node_name: str) -> None:
        super().__init__(client, core_pb2.Pod, field_selector=f"spec.nodeName={node_name}",
                         indexers={UID_INDEX: lambda p: [p.metadata.uid]})
        self.node_name = node_name

    def feed(self, pod: core_pb2.Pod) -> None:
        self._upsert(pod)

    def drop(self, pod: core_pb2.Pod) -> None:
        self._remove(pod)

    async def run(self) -> None:
        """Nothing to list or watch: the dispatcher feeds this cache."""
        await asyncio.Event().wait()


class PodDispatcher:
    """One pod Informer for every hollow node, dispatching by ``spec.nodeName``."""

    def __init__(self, client: AsyncClient) -> None:
        self.informer: Informer[core_pb2.Pod] = Informer(client, core_pb2.Pod)
        self.views: dict[str, NodeView] = {}
        self.informer.add_handlers(on_add=self._add, on_update=self._update,
                                   on_delete=self._delete)

    def view(self, client: AsyncClient, node_name: str) -> NodeView:
        v = self.views[node_name] = NodeView(client, node_name)
        if self.informer.synced.is_set():
            for pod in self.informer.list():
                if pod.spec.node_name == node_name:
                    v.feed(pod)
            v.synced.set()
        return v

    def _add(self, pod: core_pb2.Pod) -> None:
        v = self.views.get(pod.spec.node_name) if pod.spec.node_name else None
        if v is not None:
            v.feed(pod)

    def _update(self, old: core_pb2.Pod, new: core_pb2.Pod) -> None:
        if old.spec.node_name != new.spec.node_name:
            gone = self.views.get(old.spec.node_name) if old.spec.node_name else None
            if gone is not None:
                gone.drop(old)
        self._add(new)

    def _delete(self, pod: core_pb2.Pod) -> None:
        v = self.views.get(pod.spec.node_name) if pod.spec.node_name else None
        if v is not None:
            v.drop(pod)

    async def run(self) -> None:
        task = asyncio.create_task(self.informer.run(), name="hollow-pod-informer")
        try:
            await self.informer.synced.wait()   # the initial list went through _add
            for v in self.views.values():
                v.synced.set()
            await task
        finally:
            task.cancel()


def hollow_facts(name: str, index: int, *, cpu_millis: int, memory_bytes: int,
                 max_pods: int) -> NodeFacts:
    return NodeFacts(cpu_millis=cpu_millis, memory_bytes=memory_bytes, max_pods=max_pods,
                     internal_ip=f"10.{64 + index // 65536 % 64}.{index // 256 % 256}."
                                 f"{index % 256}",
                     hostname=name, kernel_version="hollow", os_image="hollow",
                     architecture="amd64", machine_id=f"hollow-{index}",
                     boot_id=f"hollow-boot-{index}", system_uuid=f"hollow-{index}",
                     reserved_cpu_millis=0, reserved_memory_bytes=0)


def hollow_pod_cidr(index: int) -> str:
    """Each hollow node brings its own /24 (as ``--pod-cidr``), from 10.128.0.0/9, so
    node IPAM has nothing to hand out (it would run out of a /16 at 255 nodes)."""
    if index >= 32768:
        raise ValueError("at most 32,768 hollow nodes (10.128.0.0/9 in /24 blocks)")
    return f"10.{128 + index // 256}.{index % 256}.0/24"


class HollowCluster:
    """``count`` hollow nodes named ``{prefix}-{i}`` over the given clients."""

    def __init__(self, clients: Sequence[AsyncClient], *, count: int, root: Path,
                 prefix: str = "hollow", heartbeat: float = 10.0, relist: float = 10.0,
                 resync: float = 60.0, workers: int = 1, cpu_millis: int = 4000,
                 memory_bytes: int = 32 * 1024**3, max_pods: int = 110,
                 start_batch: int = 200) -> None:
        if not clients:
            raise ValueError("HollowCluster needs at least one client")
        self.clients = list(clients)
        self.dispatcher = PodDispatcher(self.clients[0])
        self.count = count
        self.start_batch = start_batch
        self.agents: list[NodeAgent] = []
        self.runtimes: list[FakeRuntime] = []
        for i in range(count):
            name = f"{prefix}-{i}"
            client = self.clients[i % len(self.clients)]
            fake = FakeRuntime()
            for image in IMAGES:
                fake.add_image(image)
            node_root = root / name
            self.runtimes.append(fake)
            self.agents.append(NodeAgent(
                client=client, runtime=CRIPodRuntime(fake, log_root=node_root / "logs"),
                node_name=name,
                facts=hollow_facts(name, i, cpu_millis=cpu_millis, memory_bytes=memory_bytes,
                                   max_pods=max_pods),
                volumes=VolumeManager(root=node_root, mounter=NullMounter()),
                workers=workers, relist_interval=relist, resync_period=resync,
                renew_interval=heartbeat, pod_cidr=hollow_pod_cidr(i),
                pods=self.dispatcher.view(client, name)))
        self.ready = asyncio.Event()

    @property
    def names(self) -> list[str]:
        return [a.node_name for a in self.agents]

    async def run(self) -> None:
        """Run every agent until cancelled; ``ready`` once all have registered."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.dispatcher.run(), name="hollow-dispatcher")
            for start in range(0, len(self.agents), self.start_batch):
                batch = self.agents[start:start + self.start_batch]
                for a in batch:
                    tg.create_task(a.run(), name=f"hollow-{a.node_name}")
                await asyncio.gather(*(a.registration.registered.wait() for a in batch))
            self.ready.set()
            log.info("%d hollow nodes registered", len(self.agents))


async def _main(ns: argparse.Namespace) -> None:
    clients = [AsyncClient.from_config(ns.config) for _ in range(max(1, ns.channels))]
    root = Path(ns.root or tempfile.mkdtemp(prefix="shoal-hollow-"))
    cluster = HollowCluster(clients, count=ns.nodes, root=root, prefix=ns.prefix,
                            heartbeat=ns.heartbeat, relist=ns.relist, workers=ns.workers,
                            cpu_millis=ns.cpu_millis, memory_bytes=ns.memory_mib * 1024**2,
                            max_pods=ns.max_pods)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    task = asyncio.create_task(cluster.run())

    async def announce() -> None:
        await cluster.ready.wait()
        print(f"ready {len(cluster.agents)}", flush=True)

    ann = asyncio.create_task(announce())
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        ann.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for c in clients:
            await c.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.testing.hollow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="client config (admin.conf)")
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--prefix", default="hollow")
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help="Lease renewal (and status check) interval, seconds")
    p.add_argument("--relist", type=float, default=10.0,
                   help="runtime relist interval per node, seconds")
    p.add_argument("--workers", type=int, default=1, help="pod workers per node")
    p.add_argument("--channels", type=int, default=4, help="gRPC channels shared by nodes")
    p.add_argument("--cpu-millis", type=int, default=4000)
    p.add_argument("--memory-mib", type=int, default=32 * 1024)
    p.add_argument("--max-pods", type=int, default=110)
    p.add_argument("--root", default="", help="scratch directory (default: a temp dir)")
    p.add_argument("--log-level", default="warning")
    ns = p.parse_args(argv)
    if ns.nodes < 1:
        p.error("--nodes must be at least 1")
    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(ns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
