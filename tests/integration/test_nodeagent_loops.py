"""The node agent's control loops against the fake CRI runtime and a real apiserver.

Everything above CRI is real: informer, work queue, planner, syncer, status
writes, finalizers. Containers are scripted (``shoal.testing.fakecri``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nodeagent.agent import NodeAgent
from nodeagent.criruntime import CRIPodRuntime
from nodeagent.nodestatus import NodeFacts
from nodeagent.volumes import VolumeManager
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.fakecri import Behaviour, ExecResult, FakeRuntime
from shoal.testing.hollow import NullMounter as FakeMounter

_n = itertools.count()


class Node:
    def __init__(self, client: AsyncClient, name: str, root: Path) -> None:
        self.client = client
        self.name = name
        self.root = root
        self.fake = FakeRuntime()
        self.fake.add_image("busybox:1.36")
        self.task: asyncio.Task[None] | None = None
        self.agent: NodeAgent | None = None

    async def start(self) -> NodeAgent:
        facts = NodeFacts(cpu_millis=2000, memory_bytes=2**31, max_pods=110,
                          internal_ip="10.99.0.5", hostname=self.name, kernel_version="6",
                          os_image="test", architecture="amd64", machine_id="m", boot_id="b",
                          system_uuid="u")
        self.agent = NodeAgent(
            client=self.client, runtime=CRIPodRuntime(self.fake, log_root=self.root / "logs"),
            node_name=self.name, facts=facts,
            volumes=VolumeManager(root=self.root, mounter=FakeMounter()),
            relist_interval=0.05, resync_period=1.0, restart_backoff=(0.2, 0.8))
        self.task = asyncio.create_task(self.agent.run())
        async with asyncio.timeout(10):
            await self.agent.synced.wait()
        return self.agent

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None


@pytest.fixture
async def node(client: AsyncClient, namespace: str, tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(client, f"fake-node-{next(_n)}", tmp_path)
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


def pod(name: str, node: Node, *, command: list[str] | None = None,
        image: str = "busybox:1.36", policy: str = "Always") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.spec.node_name = node.name
    p.spec.restart_policy = policy
    p.spec.termination_grace_period_seconds = 3
    c = p.spec.containers.add(name="app", image=image)
    c.command.extend(command or ["sleep", "3600"])
    return p


async def until(client: AsyncClient, name: str, pred: Callable[[core_pb2.Pod], bool],
                timeout: float = 15.0) -> core_pb2.Pod:
    last: core_pb2.Pod | None = None
    async with asyncio.timeout(timeout):
        while True:
            try:
                last = await client.get(core_pb2.Pod, name)
                if pred(last):
                    return last
            except errors.NotFound:
                pass
            await asyncio.sleep(0.05)


def waiting(p: core_pb2.Pod) -> str:
    return p.status.container_statuses[0].state.waiting.reason \
        if p.status.container_statuses else ""


async def test_pod_runs_and_reports_truthful_status(client: AsyncClient, node: Node) -> None:
    await client.create(pod("web", node))
    p = await until(client, "web", lambda p: p.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in p.status.conditions))
    assert "shoal.dev/nodeagent" in p.metadata.finalizers
    assert p.status.pod_ip.startswith("10.88.0.") and p.status.host_ip == "10.99.0.5"
    cs = p.status.container_statuses[0]
    assert cs.ready and cs.state.running.started_at.seconds > 0
    assert cs.container_id.startswith("containerd://")
    created = node.fake.calls_to("create_container")[0]["config"]
    assert list(created.command) == ["sleep", "3600"]
    assert created.labels["io.kubernetes.pod.uid"] == p.metadata.uid


async def test_exit_codes_restart_counts_and_back_off(client: AsyncClient,
                                                      node: Node) -> None:
    node.fake.behave(Behaviour(exit_code=3, run_for=0.05), name="app")
    await client.create(pod("crashy", node))
    p = await until(client, "crashy", lambda p: bool(p.status.container_statuses) and
                    p.status.container_statuses[0].restart_count >= 2 and
                    waiting(p) == "CrashLoopBackOff", timeout=20)
    cs = p.status.container_statuses[0]
    assert cs.last_state.terminated.exit_code == 3
    assert cs.last_state.terminated.reason == "Error"
    assert "back-off" in cs.state.waiting.message


async def test_never_policy_ends_in_failed(client: AsyncClient, node: Node) -> None:
    node.fake.behave(Behaviour(exit_code=7, run_for=0.05), name="app")
    await client.create(pod("once", node, policy="Never"))
    p = await until(client, "once", lambda p: p.status.phase == "Failed")
    assert p.status.container_statuses[0].state.terminated.exit_code == 7
    assert len(node.fake.calls_to("create_container")) == 1


async def test_image_pull_failure_is_a_reason(client: AsyncClient, node: Node) -> None:
    node.fake.behave(Behaviour(pull_error="manifest unknown: nope:9 not found"),
                     image="nope:9")
    created = await client.create(pod("pull", node, image="nope:9"))
    # Every status the agent writes, in order (a watch misses nothing, polling could).
    seen: list[tuple[str, str]] = []
    async with asyncio.timeout(15):
        async for ev in client.watch(core_pb2.Pod, field_selector="metadata.name=pull",
                                     resource_version=created.metadata.resource_version):
            if ev.object is not None and ev.object.status.container_statuses:
                w = ev.object.status.container_statuses[0].state.waiting
                seen.append((w.reason, w.message))
            if [r for r, _ in seen].count("ImagePullBackOff") and \
                    [r for r, _ in seen].count("ErrImagePull") >= 2:
                break
    reasons = [r for r, _ in seen]
    first = reasons.index("ErrImagePull")
    assert "ImagePullBackOff" in reasons[first:]
    assert "manifest unknown" in seen[first][1]
    assert seen[reasons.index("ImagePullBackOff")][1] == 'Back-off pulling image "nope:9"'


async def test_bad_command_is_run_container_error(client: AsyncClient, node: Node) -> None:
    node.fake.behave(Behaviour(start_error='exec: "nosuch": executable file not found in '
                                           '$PATH: unknown'), name="app")
    await client.create(pod("badcmd", node, command=["nosuch"]))
    p = await until(client, "badcmd", lambda p: waiting(p) == "RunContainerError")
    assert "executable file not found" in p.status.container_statuses[0].state.waiting.message


async def test_missing_config_then_fixed(client: AsyncClient, node: Node) -> None:
    p = pod("needs-config", node)
    ref = p.spec.containers[0].env.add(name="MODE").value_from.config_map_key_ref
    ref.name, ref.key = "settings", "mode"
    await client.create(p)
    got = await until(client, "needs-config",
                      lambda p: waiting(p) == "CreateContainerConfigError")
    message = got.status.container_statuses[0].state.waiting.message
    assert 'configmap "settings" not found' in message
    cm = core_pb2.ConfigMap()
    cm.metadata.name = "settings"
    cm.data["mode"] = "fast"
    await client.create(cm)
    await until(client, "needs-config", lambda p: p.status.phase == "Running", timeout=20)
    config = node.fake.calls_to("create_container")[-1]["config"]
    assert ("MODE", "fast") in [(e.key, e.value) for e in config.envs]


async def test_liveness_failure_restarts_the_container(client: AsyncClient,
                                                       node: Node) -> None:
    healthy = {"ok": True}
    node.fake.behave(Behaviour(exec_result=lambda cmd: ExecResult(0 if healthy["ok"] else 1)),
                     name="app")
    p = pod("live", node)
    probe = p.spec.containers[0].liveness_probe
    probe.exec.command.extend(["cat", "/tmp/healthy"])
    probe.period_seconds, probe.failure_threshold = 1, 1
    await client.create(p)
    await until(client, "live", lambda p: p.status.phase == "Running")
    healthy["ok"] = False
    got = await until(client, "live", lambda p: bool(p.status.container_statuses) and
                      p.status.container_statuses[0].restart_count >= 1, timeout=20)
    assert got.status.container_statuses[0].last_state.terminated.exit_code == 143


async def test_readiness_probe_gates_ready(client: AsyncClient, node: Node) -> None:
    ready = {"ok": False}
    node.fake.behave(Behaviour(exec_result=lambda cmd: ExecResult(0 if ready["ok"] else 1)),
                     name="app")
    p = pod("ready", node)
    p.spec.containers[0].readiness_probe.exec.command.append("check")
    p.spec.containers[0].readiness_probe.period_seconds = 1
    await client.create(p)
    got = await until(client, "ready", lambda p: p.status.phase == "Running")
    assert not any(c.type == "Ready" and c.status == "True" for c in got.status.conditions)
    ready["ok"] = True
    await until(client, "ready", lambda p: any(c.type == "Ready" and c.status == "True"
                                               for c in p.status.conditions))


async def test_init_containers_run_in_order_first(client: AsyncClient, node: Node) -> None:
    node.fake.behave(Behaviour(exit_code=0, run_for=0.05), name="init-1")
    node.fake.behave(Behaviour(exit_code=0, run_for=0.05), name="init-2")
    p = pod("inits", node)
    for name in ("init-1", "init-2"):
        p.spec.init_containers.add(name=name, image="busybox:1.36").command.append("true")
    await client.create(p)
    await until(client, "inits", lambda p: p.status.phase == "Running")
    names = [c["config"].metadata.name for c in node.fake.calls_to("create_container")]
    assert names == ["init-1", "init-2", "app"]


async def test_graceful_delete_stops_then_releases(client: AsyncClient, node: Node) -> None:
    await client.create(pod("bye", node))
    await until(client, "bye", lambda p: p.status.phase == "Running")
    await client.delete(core_pb2.Pod, "bye")
    async with asyncio.timeout(15):
        while True:
            try:
                await client.get(core_pb2.Pod, "bye")
            except errors.NotFound:
                break
            await asyncio.sleep(0.05)
    stops = node.fake.calls_to("stop_container")
    assert stops and stops[0]["grace_seconds"] == 3  # the pod's own grace period
    assert not node.fake.containers and not node.fake.sandboxes


async def test_agent_restart_adopts_and_cleans_up_while_down(client: AsyncClient,
                                                             node: Node) -> None:
    await client.create(pod("keep", node))
    await client.create(pod("drop", node))
    kept = await until(client, "keep", lambda p: p.status.phase == "Running")
    await until(client, "drop", lambda p: p.status.phase == "Running")
    ids_before = set(node.fake.containers)
    await node.stop()
    # Deleted while the agent was down: only its finalizer holds it.
    marked = await client.delete(core_pb2.Pod, "drop")
    assert marked.metadata.HasField("deletion_timestamp")
    created_before = len(node.fake.calls_to("create_container"))
    await node.start()
    async with asyncio.timeout(15):
        while True:
            try:
                await client.get(core_pb2.Pod, "drop")
            except errors.NotFound:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert len(node.fake.calls_to("create_container")) == created_before  # nothing restarted
    after = await client.get(core_pb2.Pod, "keep")
    assert after.status.container_statuses[0].container_id == \
        kept.status.container_statuses[0].container_id
    assert after.status.container_statuses[0].container_id[len("containerd://"):] in ids_before


async def test_runtime_pods_unknown_to_the_api_are_removed(client: AsyncClient,
                                                           node: Node) -> None:
    await client.create(pod("ghost", node))
    got = await until(client, "ghost", lambda p: p.status.phase == "Running")
    await node.stop()
    # Gone from the API entirely (its finalizer removed by someone else).
    got.metadata.ClearField("finalizers")
    await client.update(got)
    await client.delete(core_pb2.Pod, "ghost")
    await node.start()
    async with asyncio.timeout(15):
        while any(c.config.labels.get("io.kubernetes.pod.uid") == got.metadata.uid
                  for c in node.fake.containers.values()):
            await asyncio.sleep(0.05)


