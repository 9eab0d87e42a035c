"""ClusterIP allocation: the range, the repair planner (pure), and the allocator on a store."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from apiserver.serviceips import (
    Held,
    Owner,
    ServiceIPAllocator,
    ServiceIPRange,
    plan_repair,
    reservation_key,
)
from apiserver.storage.sqlite import SqliteStore
from shoal import errors
from shoal.api.core.v1 import core_pb2

# --------------------------------------------------------------------------- range


@pytest.mark.parametrize(("cidr", "ip", "inside"), [
    ("10.96.0.0/16", "10.96.0.1", True),
    ("10.96.0.0/16", "10.96.255.254", True),
    ("10.96.0.0/16", "10.96.0.0", False),      # network address
    ("10.96.0.0/16", "10.96.255.255", False),  # broadcast
    ("10.96.0.0/16", "10.97.0.1", False),
    ("10.96.0.0/16", "fd00::1", False),
    ("10.96.0.0/16", "not-an-ip", False),
    ("fd00:10::/120", "fd00:10::ff", True),
])
def test_range_contains(cidr: str, ip: str, inside: bool) -> None:
    assert ServiceIPRange(cidr).contains(ip) is inside


@pytest.mark.parametrize("cidr", ["10.96.0.0/31", "10.96.0.1/16", "nonsense", "10.96.0.0/33"])
def test_bad_ranges_are_refused(cidr: str) -> None:
    with pytest.raises(errors.BadRequest):
        ServiceIPRange(cidr)


def test_pick_never_returns_the_reserved_first_address_and_fills_the_range() -> None:
    r = ServiceIPRange("10.96.0.0/29")  # .1 .. .6 usable, .1 kept for `kubernetes`
    rng = random.Random(7)
    taken: set[str] = set()
    while (ip := r.pick(taken, rng)) is not None:
        taken.add(ip)
    assert taken == {f"10.96.0.{i}" for i in range(2, 7)}
    assert r.reserved == "10.96.0.1"


# --------------------------------------------------------------------------- repair plan

RANGE = ServiceIPRange("10.96.0.0/24")
NOW = 1000.0


def key(uid: str, *, at: float = 0.0, rev: int = 5) -> tuple[Owner, int]:
    return Owner("default", f"svc-{uid}", uid, at), rev


def held(ip: str, uid: str) -> Held:
    return Held(ip, "default", f"svc-{uid}", uid)


@pytest.mark.parametrize(("name", "keys", "services", "want"), [
    ("consistent", {"10.96.0.5": key("a")}, [held("10.96.0.5", "a")], {}),
    ("leaked and old: released", {"10.96.0.5": key("a", at=NOW - 61)}, [],
     {"release": (("10.96.0.5", 5),)}),
    ("leaked but young (create in flight): kept", {"10.96.0.5": key("a", at=NOW - 5)}, [], {}),
    ("service without a key: restored", {}, [held("10.96.0.7", "b")],
     {"restore": (held("10.96.0.7", "b"),)}),
    ("key of a gone service, address held by a live one: taken over",
     {"10.96.0.5": key("gone", rev=9)}, [held("10.96.0.5", "b")],
     {"takeover": (("10.96.0.5", 9, held("10.96.0.5", "b")),)}),
    ("two live services on one address: reported",
     {"10.96.0.5": key("a")}, [held("10.96.0.5", "a"), held("10.96.0.5", "b")],
     {"duplicates": (("10.96.0.5", "default/svc-a", "default/svc-b"),)}),
    ("address outside the range: reported, not restored", {}, [held("10.1.0.5", "c")],
     {"outside": (held("10.1.0.5", "c"),)}),
    ("live owner holding another address keeps this key too",
     {"10.96.0.5": key("a", at=0)}, [held("10.96.0.6", "a")],
     {"restore": (held("10.96.0.6", "a"),)}),
])
def test_plan_repair(name: str, keys: dict[str, tuple[Owner, int]], services: list[Held],
                     want: dict[str, tuple[object, ...]]) -> None:
    plan = plan_repair(keys=keys, held=services, ip_range=RANGE, now=NOW, leak_grace=60.0)
    for field in ("restore", "release", "takeover", "duplicates", "outside"):
        assert getattr(plan, field) == want.get(field, ()), f"{name}: {field}"


# --------------------------------------------------------------------------- allocator


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    s = SqliteStore(":memory:")
    await s.start()
    yield s
    await s.close()


def decode(raw: bytes) -> core_pb2.Service:
    svc = core_pb2.Service()
    svc.ParseFromString(raw)
    return svc


def service(name: str, *, cluster_ip: str = "", type_: str = "ClusterIP") -> core_pb2.Service:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace, svc.metadata.uid = name, "default", f"uid-{name}"
    svc.spec.type = type_
    svc.spec.cluster_ip = cluster_ip
    return svc


def allocator(store: SqliteStore, cidr: str = "10.96.0.0/29", *,
              clock: list[float] | None = None) -> ServiceIPAllocator:
    t = clock or [NOW]
    return ServiceIPAllocator(store=store, cidr=cidr, decode_service=decode,
                              clock=lambda: t[0], rng=random.Random(1), leak_grace=60.0)


async def test_allocates_distinct_addresses_until_full(store: SqliteStore) -> None:
    a = allocator(store)
    got = [await a.allocate(service(f"s{i}")) for i in range(5)]
    assert sorted(got) == [f"10.96.0.{i}" for i in range(2, 7)]
    with pytest.raises(errors.InternalError, match="range is full"):
        await a.allocate(service("s5"))


async def test_two_allocators_on_one_store_never_share_an_address(store: SqliteStore) -> None:
    # Two apiservers with stale hints: the create-if-absent key decides.
    a, b = allocator(store, "10.96.0.0/28"), allocator(store, "10.96.0.0/28")
    got = await asyncio.gather(*(x.allocate(service(f"s{i}"))
                                 for i in range(12) for x in (a, b) if (i % 2 == 0) == (x is a)))
    assert len(set(got)) == 12


@pytest.mark.parametrize(("requested", "message"), [
    ("10.97.0.5", "provided IP is not in the valid range"),
    ("10.96.0.0", "provided IP is not in the valid range"),
])
async def test_requested_address_outside_the_range_is_invalid(
        store: SqliteStore, requested: str, message: str) -> None:
    with pytest.raises(errors.Invalid) as e:
        await allocator(store).allocate(service("s", cluster_ip=requested))
    assert e.value.causes[0].field == "spec.clusterIP"
    assert message in e.value.causes[0].message
    assert (await store.range("/registry/serviceipallocations/")).kvs == ()


async def test_requested_address_is_honoured_once(store: SqliteStore) -> None:
    a = allocator(store)
    svc = service("s", cluster_ip="10.96.0.1")  # the reserved one may be asked for
    assert await a.allocate(svc) == "10.96.0.1"
    assert list(svc.spec.cluster_ips) == ["10.96.0.1"]
    with pytest.raises(errors.Invalid, match="already allocated"):
        await a.allocate(service("t", cluster_ip="10.96.0.1"))


@pytest.mark.parametrize(("cluster_ip", "type_"), [("None", "ClusterIP"), ("", "ExternalName")])
async def test_headless_and_external_name_take_nothing(
        store: SqliteStore, cluster_ip: str, type_: str) -> None:
    svc = service("s", cluster_ip=cluster_ip, type_=type_)
    assert await allocator(store).allocate(svc) == ""
    assert svc.spec.cluster_ip == cluster_ip
    assert (await store.range("/registry/serviceipallocations/")).kvs == ()


async def test_release_only_frees_the_owners_address(store: SqliteStore) -> None:
    a = allocator(store)
    ip = await a.allocate(service("s"))
    assert not await a.release(ip, "someone-else")
    assert await a.release(ip, "uid-s")
    assert not await a.release(ip, "uid-s")  # idempotent
    assert await store.get(reservation_key(ip)) is None


async def test_repair_frees_old_leaks_and_restores_missing_keys(store: SqliteStore) -> None:
    clock = [NOW]
    a = allocator(store, clock=clock)
    leaked = await a.allocate(service("crashed-mid-create"))
    kept = service("kept")
    await a.allocate(kept)
    await store.create("/registry/services/default/kept", kept.SerializeToString())
    await store.delete(reservation_key(kept.spec.cluster_ip), expected_revision=0)
    plan = await a.repair()
    assert plan.release == () and len(plan.restore) == 1  # the leak is still young
    assert await store.get(reservation_key(kept.spec.cluster_ip)) is not None
    clock[0] += 61
    plan = await a.repair()
    assert [ip for ip, _ in plan.release] == [leaked]
    assert await store.get(reservation_key(leaked)) is None


async def test_an_address_freed_by_another_apiserver_is_found_when_the_hint_says_full(
        store: SqliteStore) -> None:
    a, b = allocator(store), allocator(store)
    held = [await a.allocate(service(f"s{i}")) for i in range(5)]  # the range is full
    assert await b.release(held[2], "uid-s2")  # freed elsewhere: a's hint is stale
    assert await a.allocate(service("late")) == held[2]
