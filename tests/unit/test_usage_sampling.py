"""The node agent's usage sampling: CPU rates from two CRI readings, memory from the
working set, pods reported only when every container has a rate; on a fake CRI
runtime and a fake clock."""

from __future__ import annotations

import pytest

from nodeagent.usage import (
    NodeSample,
    UsageSampler,
    parse_meminfo,
    parse_proc_stat,
)
from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.testing.fakecri import FakeClock, FakeRuntime

NS = 1_000_000_000
MI = 1024 * 1024


def pod_labels(ns: str, pod: str, container: str) -> dict[str, str]:
    return {"io.kubernetes.pod.namespace": ns, "io.kubernetes.pod.name": pod,
            "io.kubernetes.pod.uid": f"uid-{pod}", "io.kubernetes.container.name": container}


async def start(rt: FakeRuntime, ns: str, pod: str, container: str) -> str:
    sc = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=pod, uid=f"uid-{pod}",
                                                              namespace=ns))
    sid = await rt.run_pod_sandbox(sc)
    cid = await rt.create_container(sid, cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=container), image=cri.ImageSpec(image="busybox"),
        labels=pod_labels(ns, pod, container)), sandbox_config=sc)
    await rt.start_container(cid)
    return cid


class Node:
    """A scripted node counter: CPU time and memory set by the test."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.cpu_ns = 0
        self.memory = 0

    def __call__(self) -> NodeSample:
        return NodeSample(cpu_ns=self.cpu_ns, at_ns=int(self.clock() * NS), memory=self.memory)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def rt(clock: FakeClock) -> FakeRuntime:
    fake = FakeRuntime(clock=clock)
    fake.add_image("busybox")
    return fake


def usage(container_or_node: object) -> tuple[str, str]:
    u = container_or_node.usage  # type: ignore[attr-defined]
    return u["cpu"].value, u["memory"].value


async def test_rates_come_from_two_readings(rt: FakeRuntime, clock: FakeClock) -> None:
    node = Node(clock)
    cid = await start(rt, "shop", "web-1", "app")
    sampler = UsageSampler(runtime=rt, node_name="node-1", node_sample=node)
    rt.containers[cid].cpu_ns, rt.containers[cid].working_set = 5 * NS, 10 * MI
    node.cpu_ns, node.memory = 100 * NS, 900 * MI
    await sampler.sample_once()
    assert sampler.latest is None  # one reading is no rate

    clock.advance(10)
    rt.containers[cid].cpu_ns, rt.containers[cid].working_set = 7 * NS, 12 * MI  # 0.2 cores
    node.cpu_ns, node.memory = 115 * NS, 950 * MI  # 1.5 cores
    await sampler.sample_once()
    latest = sampler.latest
    assert latest is not None
    assert latest.node.metadata.name == "node-1"
    assert usage(latest.node) == ("1500000000n", f"{950 * 1024}Ki")
    assert latest.node.window.ToSeconds() == 10
    [pod] = latest.pods
    assert (pod.metadata.namespace, pod.metadata.name) == ("shop", "web-1")
    [c] = pod.containers
    assert c.name == "app" and usage(c) == ("200000000n", f"{12 * 1024}Ki")


async def test_a_pod_waits_until_every_container_has_a_rate(rt: FakeRuntime,
                                                             clock: FakeClock) -> None:
    sampler = UsageSampler(runtime=rt, node_name="n", node_sample=Node(clock))
    await start(rt, "shop", "old", "app")
    await sampler.sample_once()
    clock.advance(5)
    await start(rt, "shop", "new", "app")  # started between the readings
    await sampler.sample_once()
    assert sampler.latest is not None
    assert [p.metadata.name for p in sampler.latest.pods] == ["old"]
    clock.advance(5)
    await sampler.sample_once()
    assert sorted(p.metadata.name for p in sampler.latest.pods) == ["new", "old"]


async def test_a_restarted_counter_gives_no_rate(rt: FakeRuntime, clock: FakeClock) -> None:
    sampler = UsageSampler(runtime=rt, node_name="n", node_sample=Node(clock))
    cid = await start(rt, "shop", "web", "app")
    rt.containers[cid].cpu_ns = 9 * NS
    await sampler.sample_once()
    clock.advance(5)
    rt.containers[cid].cpu_ns = 1 * NS
    await sampler.sample_once()
    assert sampler.latest is not None and list(sampler.latest.pods) == []


async def test_a_failed_reading_keeps_the_last_usage(rt: FakeRuntime, clock: FakeClock) -> None:
    sampler = UsageSampler(runtime=rt, node_name="n", node_sample=Node(clock))
    await start(rt, "shop", "web", "app")
    await sampler.sample_once()
    clock.advance(5)
    await sampler.sample_once()
    before = sampler.latest
    rt.fail_next("list_container_stats", errors.Unavailable("containerd is restarting"))
    clock.advance(5)
    await sampler.sample_once()
    assert sampler.latest is before


@pytest.mark.parametrize(("text", "ticks", "want"), [
    ("cpu  100 0 50 1000 20 5 5 0 0 0\ncpu0 1 2 3 4\n", 100, 160 * NS // 100),
    ("cpu  1 2 3 4\n", 100, 6 * NS // 100),
])
def test_proc_stat_counts_non_idle_time(text: str, ticks: int, want: int) -> None:
    assert parse_proc_stat(text, ticks_per_second=ticks) == want


def test_meminfo_in_use_is_total_minus_available() -> None:
    text = "MemTotal:       2000 kB\nMemFree:         100 kB\nMemAvailable:    500 kB\n"
    assert parse_meminfo(text) == 1500 * 1024
