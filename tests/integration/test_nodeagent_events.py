"""The node agent's Events (the kubelet's reasons), on the fake CRI runtime and a real apiserver."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodeagent.agent import NodeAgent
from nodeagent.criruntime import CRIPodRuntime
from nodeagent.nodestatus import NodeFacts
from nodeagent.volumes import VolumeManager
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.events import EventRecorder
from shoal.testing.fakecri import Behaviour, ExecResult, FakeRuntime
from shoal.testing.hollow import NullMounter as FakeMounter

_n = itertools.count()


@pytest.fixture
async def agent(client: AsyncClient, namespace: str, tmp_path: Path
                ) -> AsyncIterator[tuple[NodeAgent, FakeRuntime]]:
    fake = FakeRuntime()
    fake.add_image("busybox:1.36")
    name = f"events-node-{next(_n)}"
    facts = NodeFacts(cpu_millis=2000, memory_bytes=2**31, max_pods=110,
                      internal_ip="10.99.0.6", hostname=name, kernel_version="6",
                      os_image="test", architecture="amd64", machine_id="m", boot_id="b",
                      system_uuid="u")
    a = NodeAgent(client=client, runtime=CRIPodRuntime(fake, log_root=tmp_path / "logs"),
                  node_name=name, facts=facts,
                  volumes=VolumeManager(root=tmp_path, mounter=FakeMounter()),
                  relist_interval=0.05, resync_period=1.0, restart_backoff=(0.2, 0.8),
                  events=EventRecorder(client, component="shoal-nodeagent", host=name))
    task = asyncio.create_task(a.run())
    async with asyncio.timeout(10):
        await a.synced.wait()
    try:
        yield a, fake
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pod(name: str, node: str, *, image: str = "busybox:1.36") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="app", image=image)
    c.command.extend(["sleep", "3600"])
    return p


async def reasons(client: AsyncClient, *, kind: str, name: str, namespace: str,
                  want: set[str], timeout: float = 15.0) -> dict[str, core_pb2.Event]:
    """Wait until Events with every reason in ``want`` exist for the object."""
    got: dict[str, core_pb2.Event] = {}
    try:
        async with asyncio.timeout(timeout):
            while True:
                events = await client.list(core_pb2.Event, namespace=namespace)
                got = {e.reason: e for e in events.items
                       if e.involved_object.kind == kind and e.involved_object.name == name}
                if want <= set(got):
                    return got
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"events for {kind} {name}: want {sorted(want)}, "
                             f"got {sorted(got)}") from None


async def test_a_started_pod_records_pulled_created_started_and_killing(
        client: AsyncClient, namespace: str, agent: tuple[NodeAgent, FakeRuntime]) -> None:
    a, _ = agent
    await client.create(pod("web", a.node_name))
    got = await reasons(client, kind="Pod", name="web", namespace=namespace,
                        want={"Pulled", "Created", "Started"})
    assert got["Started"].message == "Started container app"
    assert got["Pulled"].message == 'Container image "busybox:1.36" already present on machine'
    assert got["Started"].source.component == "shoal-nodeagent"
    assert got["Started"].source.host == a.node_name
    assert got["Started"].type == "Normal"
    await client.delete(core_pb2.Pod, "web")
    got = await reasons(client, kind="Pod", name="web", namespace=namespace, want={"Killing"})
    assert got["Killing"].message == "Stopping container app"


async def test_a_failing_pull_records_err_image_pull_and_back_off(
        client: AsyncClient, namespace: str, agent: tuple[NodeAgent, FakeRuntime]) -> None:
    a, fake = agent
    fake.behave(Behaviour(pull_error="manifest unknown"), image="nope:1")
    await client.create(pod("bad", a.node_name, image="nope:1"))
    got = await reasons(client, kind="Pod", name="bad", namespace=namespace,
                        want={"Pulling", "Failed", "BackOff"})
    assert got["Pulling"].message == 'Pulling image "nope:1"'
    assert got["BackOff"].message == 'Back-off pulling image "nope:1"'
    events = await client.list(core_pb2.Event, namespace=namespace)
    failed = {e.message for e in events.items if e.reason == "Failed"}
    assert {"Error: ErrImagePull", "Error: ImagePullBackOff"} <= failed
    assert all(e.type == "Warning" for e in events.items if e.reason == "Failed")


async def test_a_crash_loop_records_back_off(
        client: AsyncClient, namespace: str, agent: tuple[NodeAgent, FakeRuntime]) -> None:
    a, fake = agent
    fake.behave(Behaviour(exit_code=1, run_for=0.05), name="app")
    await client.create(pod("crashy", a.node_name))
    got = await reasons(client, kind="Pod", name="crashy", namespace=namespace,
                        want={"BackOff"}, timeout=20)
    assert got["BackOff"].type == "Warning"
    assert got["BackOff"].message == "Back-off restarting failed container app in pod crashy"


async def test_the_node_records_starting_and_ready(
        client: AsyncClient, agent: tuple[NodeAgent, FakeRuntime]) -> None:
    a, _ = agent
    got = await reasons(client, kind="Node", name=a.node_name, namespace="default",
                        want={"Starting", "RegisteredNode", "NodeReady"})
    assert got["NodeReady"].message == f"Node {a.node_name} status is now: NodeReady"


async def test_a_failing_liveness_probe_records_unhealthy_and_killing(
        client: AsyncClient, namespace: str, agent: tuple[NodeAgent, FakeRuntime]) -> None:
    a, fake = agent
    fake.behave(Behaviour(exec_result=lambda cmd: ExecResult(1, b"no such file")), name="app")
    p = pod("live", a.node_name)
    probe = p.spec.containers[0].liveness_probe
    probe.exec.command.extend(["cat", "/tmp/healthy"])
    probe.period_seconds, probe.failure_threshold = 1, 1
    await client.create(p)
    got = await reasons(client, kind="Pod", name="live", namespace=namespace,
                        want={"Unhealthy", "Killing"}, timeout=20)
    assert got["Unhealthy"].type == "Warning"
    assert got["Unhealthy"].message.startswith("Liveness probe failed: ")
    assert "liveness probe failed" in got["Killing"].message
