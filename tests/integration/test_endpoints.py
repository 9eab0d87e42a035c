"""The Endpoints controller in an in-process apiserver, over pods whose status the test sets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace, leading_apiserver
from shoal.testing.waiting import eventually


@pytest.fixture(scope="module")
async def ep_api(tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("endpoints")
    async with leading_apiserver(data, controllers=("endpoints",)) as api:
        yield api


@pytest.fixture
async def c(ep_api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(ep_api, "ep") as client:
        yield client




def service(name: str, *, headless: bool = False) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name = name
    s.spec.selector["app"] = name
    if headless:
        s.spec.cluster_ip = "None"
    s.spec.ports.add(name="http", port=80).target_port.str_val = "web"
    return s


async def running_pod(c: AsyncClient, name: str, app: str, ip: str, *, ready: bool = True,
                      version: str = "v1") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.metadata.labels.update({"app": app, "version": version})
    p.spec.node_name = "node-1"
    p.spec.containers.add(name="main", image="busybox").ports.add(name="web",
                                                                   container_port=8080)
    p = await c.create(p)
    return await set_status(c, p, ip=ip, ready=ready)


async def set_status(c: AsyncClient, p: core_pb2.Pod, *, ip: str, ready: bool) -> core_pb2.Pod:
    p.status.phase = "Running"
    p.status.pod_ip = ip
    p.status.pod_ips.add(ip=ip)
    del p.status.conditions[:]
    p.status.conditions.add(type="Ready", status="True" if ready else "False")
    return await c.update_status(p)


async def addresses(c: AsyncClient, name: str) -> tuple[list[str], list[str]]:
    try:
        ep = await c.get(core_pb2.Endpoints, name)
    except errors.NotFound:
        return [], []
    return (sorted(a.ip for s in ep.subsets for a in s.addresses),
            sorted(a.ip for s in ep.subsets for a in s.not_ready_addresses))


async def test_endpoints_follow_pods_readiness_and_scale(c: AsyncClient) -> None:
    await c.create(service("web"))
    a = await running_pod(c, "web-a", "web", "10.244.1.2")
    await running_pod(c, "web-b", "web", "10.244.1.3", ready=False)
    await running_pod(c, "db", "db", "10.244.1.9")

    async def expect(ready: list[str], not_ready: list[str]) -> None:
        async def check() -> bool:
            return await addresses(c, "web") == (ready, not_ready)
        await eventually(f"endpoints {ready} / {not_ready}", check)

    await expect(["10.244.1.2"], ["10.244.1.3"])
    ep = await c.get(core_pb2.Endpoints, "web")
    assert [(p.name, p.port) for p in ep.subsets[0].ports] == [("http", 8080)]
    addr = ep.subsets[0].addresses[0]
    assert (addr.target_ref.name, addr.node_name) == ("web-a", "node-1")
    assert dict(addr.labels) == {"app": "web", "version": "v1"}

    await set_status(c, a, ip="10.244.1.2", ready=False)  # a pod becomes unready
    await expect([], ["10.244.1.2", "10.244.1.3"])
    await running_pod(c, "web-c", "web", "10.244.2.2")  # scale up
    await expect(["10.244.2.2"], ["10.244.1.2", "10.244.1.3"])
    await c.delete(core_pb2.Pod, "web-b")  # scale down
    await expect(["10.244.2.2"], ["10.244.1.2"])


async def test_headless_endpoints_list_pod_ips_with_labels(c: AsyncClient) -> None:
    s = await c.create(service("db", headless=True))
    assert s.spec.cluster_ip == "None"
    await running_pod(c, "db-0", "db", "10.244.3.2", version="v2")

    async def labelled() -> Any:
        ep = await c.get(core_pb2.Endpoints, "db") if (await addresses(c, "db"))[0] else None
        return ep and [dict(a.labels) for a in ep.subsets[0].addresses]

    assert await eventually("headless endpoints", labelled) == [{"app": "db", "version": "v2"}]
    ep = await c.get(core_pb2.Endpoints, "db")
    assert "service.kubernetes.io/headless" in ep.metadata.labels


async def test_endpoints_go_with_their_service_and_come_back_if_deleted(c: AsyncClient) -> None:
    await c.create(service("gone"))
    await running_pod(c, "gone-0", "gone", "10.244.4.2")

    async def present() -> bool:
        return bool((await addresses(c, "gone"))[0])

    await eventually("endpoints created", present)
    await c.delete(core_pb2.Endpoints, "gone")  # someone removes ours: put back
    await eventually("endpoints recreated", present)
    await c.delete(core_pb2.Service, "gone")

    async def deleted() -> bool:
        try:
            await c.get(core_pb2.Endpoints, "gone")
        except errors.NotFound:
            return True
        return False

    await eventually("endpoints deleted with the service", deleted)
