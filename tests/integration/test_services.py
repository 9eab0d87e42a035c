"""Services through the API: ClusterIP allocation (in-process apiserver, SQLite)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from apiserver.controllers.base import ControllerSettings
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace
from shoal.testing.waiting import eventually

RANGE = "10.100.0.0/24"


@pytest.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("services")
    settings = ControllerSettings(service_cluster_ip_range=RANGE)
    async with InProcessAPIServer(data, controller_settings=settings) as server:
        yield server


@pytest.fixture
async def c(api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(api, "svc") as client:
        yield client


def service(name: str, *, cluster_ip: str = "", port: int = 80,
            type_: str = "") -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name = name
    s.spec.selector["app"] = name
    s.spec.cluster_ip = cluster_ip
    s.spec.type = type_
    if type_ == "ExternalName":
        s.spec.external_name = "example.com"
    else:
        s.spec.ports.add(port=port)
    return s




async def test_a_service_gets_a_free_address_of_the_range(c: AsyncClient) -> None:
    a = await c.create(service("a"))
    b = await c.create(service("b"))
    for s in (a, b):
        assert ipaddress.ip_address(s.spec.cluster_ip) in ipaddress.ip_network(RANGE)
        assert list(s.spec.cluster_ips) == [s.spec.cluster_ip]
        assert s.spec.cluster_ip != "10.100.0.1"  # kept for the `kubernetes` Service
    assert a.spec.cluster_ip != b.spec.cluster_ip
    assert (await c.get(core_pb2.Service, "a")).spec.cluster_ip == a.spec.cluster_ip


async def test_concurrent_creates_get_distinct_addresses(c: AsyncClient) -> None:
    made = await asyncio.gather(*(c.create(service(f"many-{i}")) for i in range(30)))
    assert len({s.spec.cluster_ip for s in made}) == 30


async def test_a_requested_address_is_honoured_and_then_taken(c: AsyncClient) -> None:
    got = await c.create(service("fixed", cluster_ip="10.100.0.10"))
    assert got.spec.cluster_ip == "10.100.0.10"
    with pytest.raises(errors.Invalid) as e:
        await c.create(service("fixed-too", cluster_ip="10.100.0.10"))
    assert e.value.causes[0].field == "spec.clusterIP"
    assert "already allocated" in str(e.value)
    with pytest.raises(errors.NotFound):
        await c.get(core_pb2.Service, "fixed-too")


async def test_an_address_outside_the_range_is_invalid_and_nothing_is_created(
        c: AsyncClient) -> None:
    with pytest.raises(errors.Invalid) as e:
        await c.create(service("outside", cluster_ip="10.200.0.5"))
    assert e.value.causes[0].field == "spec.clusterIP"
    assert f"The range of valid IPs is {RANGE}" in str(e.value)
    with pytest.raises(errors.NotFound):
        await c.get(core_pb2.Service, "outside")


async def test_a_failed_create_frees_its_address(c: AsyncClient) -> None:
    await c.create(service("dup", cluster_ip="10.100.0.11"))
    with pytest.raises(errors.AlreadyExists):
        await c.create(service("dup", cluster_ip="10.100.0.12"))
    # .202 went back at once: another Service may take it.
    assert (await c.create(service("other", cluster_ip="10.100.0.12"))
            ).spec.cluster_ip == "10.100.0.12"


async def test_headless_has_no_address(c: AsyncClient) -> None:
    s = await c.create(service("headless", cluster_ip="None"))
    assert s.spec.cluster_ip == "None"
    assert list(s.spec.cluster_ips) == ["None"]


async def test_cluster_ip_is_immutable_and_kept_when_left_out(c: AsyncClient) -> None:
    s = await c.create(service("keep"))
    ip = s.spec.cluster_ip
    s.spec.cluster_ip, s.spec.cluster_ips[:] = "", []
    s.spec.ports[0].port = 8080
    assert (await c.update(s)).spec.cluster_ip == ip
    s = await c.get(core_pb2.Service, "keep")
    s.spec.cluster_ip = "10.100.0.13"
    s.spec.cluster_ips[:] = ["10.100.0.13"]
    with pytest.raises(errors.Invalid) as e:
        await c.update(s)
    assert "spec.clusterIP" in str(e.value) and "immutable" in str(e.value)
    headless = await c.create(service("still-headless", cluster_ip="None"))
    headless.spec.cluster_ip = "10.100.0.14"
    with pytest.raises(errors.Invalid):
        await c.update(headless)


async def test_external_name_turned_cluster_ip_gets_an_address(c: AsyncClient) -> None:
    s = await c.create(service("ext", type_="ExternalName"))
    assert s.spec.cluster_ip == ""
    s.spec.type = "ClusterIP"
    s.spec.external_name = ""
    s.spec.ports.add(port=80)
    s = await c.update(s)
    assert ipaddress.ip_address(s.spec.cluster_ip) in ipaddress.ip_network(RANGE)


async def test_deleting_a_service_frees_its_address(c: AsyncClient) -> None:
    await c.create(service("first", cluster_ip="10.100.0.15"))
    await c.delete(core_pb2.Service, "first")

    async def reusable() -> bool:
        try:
            await c.create(service("second", cluster_ip="10.100.0.15"))
        except errors.Invalid:
            return False
        return True

    await eventually("10.100.0.15 freed after the delete", reusable)


async def test_allocations_survive_an_apiserver_restart(tmp_path: Path) -> None:
    settings = ControllerSettings(service_cluster_ip_range="10.101.0.0/29")
    async with InProcessAPIServer(tmp_path, controller_settings=settings) as server:
        async with server.client() as c:
            c.namespace = "default"
            held = {(await c.create(service(f"s{i}"))).spec.cluster_ip for i in range(4)}
        await server.restart()
        async with server.client() as c:
            c.namespace = "default"
            last = await c.create(service("s4"))  # the only address left
            assert last.spec.cluster_ip not in held
            with pytest.raises(errors.InternalError, match="range is full"):
                await c.create(service("s5"))


async def test_turning_into_external_name_gives_the_address_up(c: AsyncClient) -> None:
    s = await c.create(service("becomes-ext", cluster_ip="10.100.0.9"))
    s.spec.type, s.spec.external_name = "ExternalName", "example.com"
    s.spec.cluster_ip, s.spec.cluster_ips[:] = "", []
    s.spec.ClearField("ip_family_policy")
    s = await c.update(s)
    assert s.spec.cluster_ip == "" and list(s.spec.cluster_ips) == []

    async def reusable() -> bool:
        try:
            await c.create(service("takes-nine", cluster_ip="10.100.0.9"))
        except errors.Invalid:
            return False
        return True

    await eventually("10.100.0.9 freed after the type change", reusable)
