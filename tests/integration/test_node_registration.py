"""A node registers, keeps its Lease renewed and its Ready condition true."""

from __future__ import annotations

import pytest

from nodeagent.nodestatus import NodeFacts, node_status
from nodeagent.registration import LEASE_NAMESPACE, NodeRegistration
from shoal import errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient

FACTS = NodeFacts(cpu_millis=2000, memory_bytes=4 * 1024**3, max_pods=110,
                  internal_ip="10.99.0.2", hostname="node-r", kernel_version="6.1.0",
                  os_image="Debian GNU/Linux 12", architecture="amd64", machine_id="m",
                  boot_id="b", system_uuid="u")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_register_renew_and_readiness(client: AsyncClient) -> None:
    clock = Clock()
    state = {"ready": True}

    async def probe() -> tuple[str, bool, str]:
        return "containerd://1.6.20", state["ready"], "" if state["ready"] else "CRI down"

    reg = NodeRegistration(client=client, node_name="node-r", facts=FACTS,
                           runtime_probe=probe, clock=clock, status_interval=60)
    await reg.tick()
    node = await client.get(core_pb2.Node, "node-r")
    assert node.metadata.labels["kubernetes.io/hostname"] == "node-r"
    assert node.status.capacity["cpu"].value == "2"
    assert node.status.allocatable["cpu"].value == "1900m"
    assert node.status.node_info.container_runtime_version == "containerd://1.6.20"
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "KubeletReady")
    lease = await client.get(coordination_pb2.Lease, "node-r", namespace=LEASE_NAMESPACE)
    assert lease.spec.holder_identity == "node-r" and lease.spec.lease_duration_seconds == 40
    assert lease.metadata.owner_references[0].uid == node.metadata.uid
    first_renew = lease.spec.renew_time.seconds

    clock.now += 10
    rv = node.metadata.resource_version
    await reg.tick()
    lease = await client.get(coordination_pb2.Lease, "node-r", namespace=LEASE_NAMESPACE)
    assert lease.spec.renew_time.seconds == first_renew + 10
    node = await client.get(core_pb2.Node, "node-r")
    assert node.metadata.resource_version == rv  # nothing changed, no status write

    state["ready"] = False
    clock.now += 10
    await reg.tick()
    node = await client.get(core_pb2.Node, "node-r")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "KubeletNotReady")
    assert "CRI down" in ready.message
    assert ready.last_transition_time.seconds == int(clock.now)

    # A restarted agent adopts the Node: its spec (set by others) is kept.
    node.spec.pod_cidr = "10.244.3.0/24"
    await client.update(node)
    again = NodeRegistration(client=client, node_name="node-r", facts=FACTS,
                             runtime_probe=probe, clock=clock)
    await again.tick()
    node = await client.get(core_pb2.Node, "node-r")
    assert node.spec.pod_cidr == "10.244.3.0/24"


async def test_status_is_posted_again_after_the_apiserver_was_out_of_reach(
        client: AsyncClient) -> None:
    """A partition healed: the node controller marked the node Unknown meanwhile;
    the agent's first good heartbeat puts Ready=True back, not 60 s later."""
    clock = Clock()

    async def probe() -> tuple[str, bool, str]:
        return "containerd://1.6.20", True, ""

    reg = NodeRegistration(client=client, node_name="node-r", facts=FACTS,
                           runtime_probe=probe, clock=clock, status_interval=60)
    await reg.tick()
    node = await client.get(core_pb2.Node, "node-r")
    for c in node.status.conditions:  # what the node lifecycle controller does
        c.status, c.reason = "Unknown", "NodeStatusUnknown"
    await client.update_status(node)

    renew = reg.renew_lease

    async def cut_off() -> coordination_pb2.Lease:
        raise errors.Unavailable("no route to host")

    reg.renew_lease = cut_off  # type: ignore[method-assign]
    clock.now += 10
    with pytest.raises(errors.Unavailable):
        await reg.tick()
    reg.renew_lease = renew  # type: ignore[method-assign]
    clock.now += 10
    await reg.tick()
    node = await client.get(core_pb2.Node, "node-r")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "True"


async def test_lease_renewal_survives_others_writing_or_deleting_it(
        client: AsyncClient) -> None:
    clock = Clock()

    async def probe() -> tuple[str, bool, str]:
        return "containerd://1.6.20", True, ""

    reg = NodeRegistration(client=client, node_name="node-r", facts=FACTS,
                           runtime_probe=probe, clock=clock)
    await reg.tick()
    lease = await client.get(coordination_pb2.Lease, "node-r", namespace=LEASE_NAMESPACE)
    lease.metadata.labels["touched"] = "yes"  # someone else writes: our copy is stale
    await client.update(lease)
    clock.now += 10
    await reg.tick()
    lease = await client.get(coordination_pb2.Lease, "node-r", namespace=LEASE_NAMESPACE)
    assert lease.spec.renew_time.seconds == int(clock.now)
    assert lease.metadata.labels["touched"] == "yes"
    await client.delete(coordination_pb2.Lease, "node-r", namespace=LEASE_NAMESPACE)
    clock.now += 10
    await reg.tick()
    lease = await client.get(coordination_pb2.Lease, "node-r", namespace=LEASE_NAMESPACE)
    assert lease.spec.renew_time.seconds == int(clock.now)


def test_condition_transition_time_is_kept_while_status_holds() -> None:
    a = node_status(FACTS, runtime_version="x", runtime_ready=True, runtime_message="",
                    previous=None, now=100)
    b = node_status(FACTS, runtime_version="x", runtime_ready=True, runtime_message="",
                    previous=a, now=200)
    ra = next(c for c in a.conditions if c.type == "Ready")
    rb = next(c for c in b.conditions if c.type == "Ready")
    assert rb.last_transition_time == ra.last_transition_time
    assert rb.last_heartbeat_time.seconds == 200


async def test_probe_errors_make_the_node_not_ready(client: AsyncClient) -> None:
    async def broken() -> tuple[str, bool, str]:
        raise errors.Unavailable("connection refused")

    reg = NodeRegistration(client=client, node_name="node-broken", facts=FACTS,
                           runtime_probe=broken)
    await reg.tick()
    node = await client.get(core_pb2.Node, "node-broken")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "False" and "connection refused" in ready.message


@pytest.fixture(autouse=True)
async def _cleanup(client: AsyncClient) -> None:
    yield  # type: ignore[misc]
    for name in ("node-r", "node-broken"):
        try:
            await client.delete(core_pb2.Node, name)
        except errors.NotFound:
            pass


async def test_node_ipam_gives_each_node_its_own_pod_cidr(client: AsyncClient) -> None:
    import asyncio

    cidrs = []
    for name in ("ipam-a", "ipam-b"):
        n = core_pb2.Node()
        n.metadata.name = name
        await client.create(n)
    async with asyncio.timeout(10):
        while len(cidrs) < 2:
            cidrs = [(await client.get(core_pb2.Node, nm)).spec.pod_cidr
                     for nm in ("ipam-a", "ipam-b")]
            cidrs = [c for c in cidrs if c]
            await asyncio.sleep(0.05)
    assert len(set(cidrs)) == 2 and all(c.startswith("10.244.") for c in cidrs)
    fixed = core_pb2.Node()
    fixed.metadata.name = "ipam-fixed"
    fixed.spec.pod_cidr = "10.244.200.0/24"
    await client.create(fixed)
    await asyncio.sleep(0.3)
    assert (await client.get(core_pb2.Node, "ipam-fixed")).spec.pod_cidr == "10.244.200.0/24"
    for name in ("ipam-a", "ipam-b", "ipam-fixed"):
        await client.delete(core_pb2.Node, name)
