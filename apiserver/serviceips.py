"""ClusterIP allocation: each Service gets a free address of the service CIDR.

Every allocated address is one storage key, written create-if-absent::

    /registry/serviceipallocations/10.96.0.17 -> {"namespace", "name", "uid", "at"}

so two Services (or two apiservers) can never hold the same address: the
second create of the key fails and the allocator moves on. This is the shape
of Kubernetes' newer allocator (one IPAddress object per address) rather than
the older bitmap, and needs nothing beyond the ``Store`` interface.

Lifecycle of one address::

    free --Service create (reserve key, then write Service)--> held
    held --Service write failed for sure--> free (key deleted at once)
    held --Service deleted, or turned ExternalName (watch cache event)--> free
    held, no Service owns it for > leak_grace (crash mid-create, lost event)
         --repair--> free
    Service with an address but no key (restored backup) --repair--> held

Rules (Kubernetes'): type ClusterIP/NodePort/LoadBalancer without a clusterIP
gets a random free address (never the range's first, kept for the
``kubernetes`` Service); a requested address must be inside the range and
free, else ``Invalid`` on ``spec.clusterIP`` and nothing is written;
``clusterIP: None`` is headless and takes nothing; ExternalName takes nothing.
The address never changes on update (``shoal.validation``).

Contract: ``reserve`` and ``release`` are idempotent CAS steps on one key;
``repair`` only creates missing keys and deletes keys whose owner is gone and
that are older than ``leak_grace`` (so an allocation whose Service write is
still in flight is never taken). Every apiserver runs ``run()``: all its writes
are compare-and-swap, so several never hand out one address. ``plan_repair``
and ``ServiceIPRange`` are pure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from apiserver.storage import Store
from shoal import errors

log = logging.getLogger(__name__)

RESERVATION_PREFIX = "/registry/serviceipallocations/"
SERVICES_PREFIX = "/registry/services/"
REPAIR_SECONDS = 180.0
LEAK_GRACE_SECONDS = 60.0
_ATTEMPTS = 8

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ServiceIPRange:
    """The usable addresses of a service CIDR (pure)."""

    def __init__(self, cidr: str) -> None:
        try:
            net: Any = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            raise errors.BadRequest(f"invalid service cluster IP range {cidr!r}: {e}") from None
        self.cidr = str(net)
        self.network = net
        # IPv4 loses the network and broadcast addresses; IPv6 only the network one.
        self.first = int(net.network_address) + 1
        self.last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
        if self.last - self.first < 1:
            raise errors.BadRequest(f"service cluster IP range {cidr} is too small: it needs "
                                    "at least two usable addresses")

    @property
    def reserved(self) -> str:
        """The first usable address, kept for the ``kubernetes`` Service."""
        return str(ipaddress.ip_address(self.first))

    @property
    def dynamic_size(self) -> int:
        return self.last - self.first  # every usable address but the reserved one

    def contains(self, ip: str) -> bool:
        try:
            value = int(ipaddress.ip_address(ip))
        except ValueError:
            return False
        return ipaddress.ip_address(ip).version == self.network.version and (
            self.first <= value <= self.last)

    def not_in_range(self, ip: str) -> errors.FieldError:
        return errors.FieldError(
            "spec.clusterIP",
            f'Invalid value: "{ip}": failed to allocate IP {ip}: provided IP is not in the '
            f"valid range. The range of valid IPs is {self.cidr}")

    @property
    def static_band(self) -> int:
        """How many low addresses are kept for requested clusterIPs first.

        Kubernetes' split (KEP-3070): min(max(16, size/16), 256) addresses at
        the bottom are handed out dynamically only once the rest is full."""
        size = self.last - self.first + 1
        return min(max(16, size // 16), 256, size - 1)

    def pick(self, taken: Collection[str], rng: random.Random) -> str | None:
        """A random free address (never the reserved one), or None when full.

        The upper band first, then the static band (see ``static_band``)."""
        low = self.first + 1
        split = self.first + self.static_band
        for lo, hi in ((split, self.last), (low, split - 1)):
            n = hi - lo + 1
            if n <= 0:
                continue
            start = rng.randrange(n)
            for i in range(n):
                ip = str(ipaddress.ip_address(lo + (start + i) % n))
                if ip not in taken:
                    return ip
        return None


def already_allocated(ip: str) -> errors.FieldError:
    return errors.FieldError(
        "spec.clusterIP",
        f'Invalid value: "{ip}": failed to allocate IP {ip}: provided IP is already allocated')


@dataclass(frozen=True)
class Owner:
    namespace: str
    name: str
    uid: str
    at: float  # when it was reserved (seconds since the epoch)

    def encode(self) -> bytes:
        return json.dumps({"namespace": self.namespace, "name": self.name, "uid": self.uid,
                           "at": self.at}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Owner:
        try:
            d = json.loads(raw)
            return cls(str(d["namespace"]), str(d["name"]), str(d["uid"]), float(d["at"]))
        except (ValueError, KeyError, TypeError):
            return cls("", "", "", 0.0)  # unreadable: owned by nobody, repair frees it


def reservation_key(ip: str) -> str:
    return RESERVATION_PREFIX + ip


def service_ips(svc: Any) -> list[str]:
    """The addresses a Service holds ("None" and empty are not addresses)."""
    ips = [svc.spec.cluster_ip, *svc.spec.cluster_ips]
    return list(dict.fromkeys(ip for ip in ips if ip and ip != "None"))


def wants_ip(svc: Any) -> bool:
    return bool(svc.spec.type != "ExternalName" and svc.spec.cluster_ip != "None")


# --------------------------------------------------------------------------- repair (pure)


@dataclass(frozen=True)
class Held:
    """A Service's claim on an address, as read from storage."""

    ip: str
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class RepairPlan:
    # Services holding an address with no key: (ip, owner) keys to create.
    restore: tuple[Held, ...] = ()
    # Keys no live Service owns, old enough to free: (ip, revision) to delete.
    release: tuple[tuple[str, int], ...] = ()
    # Keys that belong to a gone Service while a live one holds the address:
    # (ip, revision, new owner) to rewrite.
    takeover: tuple[tuple[str, int, Held], ...] = ()
    # Two live Services holding one address (needs a person).
    duplicates: tuple[tuple[str, str, str], ...] = ()
    # Services holding an address outside the range (the range changed).
    outside: tuple[Held, ...] = ()


def plan_repair(*, keys: Mapping[str, tuple[Owner, int]], held: Iterable[Held],
                ip_range: ServiceIPRange, now: float, leak_grace: float) -> RepairPlan:
    """What to change so that keys and Services agree (pure).

    ``keys`` maps each reserved address to its owner and the key's revision,
    read *before* ``held`` (the Services) was read."""
    live_uids: set[str] = set()
    by_ip: dict[str, list[Held]] = {}
    outside: list[Held] = []
    for h in held:
        live_uids.add(h.uid)
        if not ip_range.contains(h.ip):
            outside.append(h)
            continue
        by_ip.setdefault(h.ip, []).append(h)
    restore: list[Held] = []
    takeover: list[tuple[str, int, Held]] = []
    duplicates: list[tuple[str, str, str]] = []
    for ip, holders in sorted(by_ip.items()):
        key = keys.get(ip)
        if len(holders) > 1:
            names = sorted(f"{h.namespace}/{h.name}" for h in holders)
            duplicates.append((ip, names[0], names[1]))
        if key is None:
            restore.append(holders[0])
            continue
        owner, revision = key
        if owner.uid in {h.uid for h in holders}:
            continue
        if owner.uid not in live_uids:
            takeover.append((ip, revision, holders[0]))
        else:
            names = sorted([f"{owner.namespace}/{owner.name}",
                            f"{holders[0].namespace}/{holders[0].name}"])
            duplicates.append((ip, names[0], names[1]))
    release: list[tuple[str, int]] = []
    for ip, (owner, revision) in sorted(keys.items()):
        if ip in by_ip or owner.uid in live_uids:
            continue
        if now - owner.at >= leak_grace:
            release.append((ip, revision))
    return RepairPlan(tuple(restore), tuple(release), tuple(takeover), tuple(duplicates),
                      tuple(outside))


# --------------------------------------------------------------------------- allocator


class ServiceIPAllocator:
    """Reserves and releases ClusterIPs in storage. See the module docstring."""

    def __init__(self, *, store: Store, cidr: str, decode_service: Callable[[bytes], Any],
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 repair_period: float = REPAIR_SECONDS,
                 leak_grace: float = LEAK_GRACE_SECONDS) -> None:
        self.store = store
        self.range = ServiceIPRange(cidr)
        self.decode_service = decode_service
        self.clock = clock
        self.rng = rng or random.Random()
        self.repair_period = repair_period
        self.leak_grace = leak_grace
        self._hint: set[str] = set()  # addresses known taken (a hint, never trusted)
        self._released: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    # -- create / update ---------------------------------------------------------

    async def allocate(self, svc: Any, *, dry_run: bool = False) -> str:
        """Give ``svc`` its address (requested or picked) and reserve it.

        Returns the reserved address ("" when none was reserved: headless,
        ExternalName, dry run). The caller releases it if the Service write fails."""
        if not wants_ip(svc):
            if svc.spec.cluster_ip == "None":
                svc.spec.cluster_ips[:] = ["None"]
            return ""
        requested = svc.spec.cluster_ip or (svc.spec.cluster_ips[0] if svc.spec.cluster_ips
                                            else "")
        meta = svc.metadata
        if requested:
            if not self.range.contains(requested):
                raise self._invalid(svc, self.range.not_in_range(requested))
            if dry_run:
                if await self.store.get(reservation_key(requested)) is not None:
                    raise self._invalid(svc, already_allocated(requested))
                self._set(svc, requested)
                return ""
            owner = Owner(meta.namespace, meta.name, meta.uid, self.clock())
            try:
                await self.store.create(reservation_key(requested), owner.encode())
            except errors.AlreadyExists:
                raise self._invalid(svc, already_allocated(requested)) from None
            self._hint.add(requested)
            self._set(svc, requested)
            return requested
        if dry_run:
            return ""
        ip = await self._reserve_dynamic(Owner(meta.namespace, meta.name, meta.uid,
                                               self.clock()))
        self._set(svc, ip)
        return ip

    async def _reserve_dynamic(self, owner: Owner) -> str:
        """Try a pick from the hint; after a collision, or when the hint says the
        range is full, read every key afresh (another apiserver may have taken
        or freed addresses) and pick again."""
        taken: set[str] = set(self._hint)
        fresh = False
        for _ in range(_ATTEMPTS):
            ip = self.range.pick(taken, self.rng)
            if ip is None:
                if fresh:
                    raise errors.InternalError(
                        f"failed to allocate a serviceIP: range is full ({self.range.cidr})")
            else:
                try:
                    await self.store.create(reservation_key(ip), owner.encode())
                except errors.AlreadyExists:
                    pass
                else:
                    self._hint.add(ip)
                    return ip
            taken = set(await self._reserved())
            self._hint = set(taken)
            fresh = True
        raise errors.Unavailable("failed to allocate a serviceIP: too many concurrent "
                                 "allocations; try again", retry_after=1.0)

    @staticmethod
    def _set(svc: Any, ip: str) -> None:
        svc.spec.cluster_ip = ip
        svc.spec.cluster_ips[:] = [ip]
        family = "IPv6" if ":" in ip else "IPv4"
        if not svc.spec.ip_families:
            svc.spec.ip_families.append(family)

    @staticmethod
    def _invalid(svc: Any, cause: errors.FieldError) -> errors.Invalid:
        name = svc.metadata.name or svc.metadata.generate_name
        return errors.Invalid(f'Service "{name}" is invalid', kind="Service",
                              name=svc.metadata.name, causes=[cause])

    # -- release -------------------------------------------------------------------

    async def release(self, ip: str, uid: str) -> bool:
        """Free ``ip`` if ``uid`` still holds it. Idempotent; True if a key went."""
        key = reservation_key(ip)
        kv = await self.store.get(key)
        if kv is None or Owner.decode(kv.value).uid != uid:
            return False
        try:
            await self.store.delete(key, expected_revision=kv.mod_revision)
        except (errors.NotFound, errors.Conflict):
            return False
        self._hint.discard(ip)
        return True

    def service_changed(self, old_raw: bytes, new_raw: bytes | None) -> None:
        """A Service was deleted (``new_raw`` None) or updated (the watch cache's
        event): free the addresses it no longer holds, soon."""
        try:
            old = self.decode_service(old_raw)
            kept = set(service_ips(self.decode_service(new_raw))) if new_raw else set()
        except Exception:  # undecodable: repair will sort it out
            return
        for ip in service_ips(old):
            if ip not in kept:
                self._released.put_nowait((ip, old.metadata.uid))

    async def _release_loop(self) -> None:
        while True:
            ip, uid = await self._released.get()
            try:
                if await self.release(ip, uid):
                    log.info("service IPs: %s released", ip)
            except errors.ShoalError as e:
                log.warning("service IPs: releasing %s failed: %s (repair will free it)", ip, e)

    # -- repair --------------------------------------------------------------------

    async def _reserved(self) -> dict[str, tuple[Owner, int]]:
        res = await self.store.range(RESERVATION_PREFIX)
        return {kv.key[len(RESERVATION_PREFIX):]: (Owner.decode(kv.value), kv.mod_revision)
                for kv in res.kvs}

    async def _held(self) -> list[Held]:
        out: list[Held] = []
        start = ""
        while True:
            res = await self.store.range(SERVICES_PREFIX, start=start, limit=1000)
            for kv in res.kvs:
                svc = self.decode_service(kv.value)
                meta = svc.metadata
                out += [Held(ip, meta.namespace, meta.name, meta.uid)
                        for ip in service_ips(svc)]
            if not res.more or not res.kvs:
                return out
            start = res.kvs[-1].key + "\x00"

    async def repair(self) -> RepairPlan:
        """One repair pass: keys first, then Services (see ``plan_repair``)."""
        keys = await self._reserved()
        held = await self._held()
        plan = plan_repair(keys=keys, held=held, ip_range=self.range, now=self.clock(),
                           leak_grace=self.leak_grace)
        for h in plan.restore:
            owner = Owner(h.namespace, h.name, h.uid, self.clock())
            try:
                await self.store.create(reservation_key(h.ip), owner.encode())
                log.warning("service IPs: %s held by %s/%s had no allocation; restored",
                            h.ip, h.namespace, h.name)
            except errors.AlreadyExists:
                pass
        for ip, revision, h in plan.takeover:
            owner = Owner(h.namespace, h.name, h.uid, self.clock())
            try:
                await self.store.update(reservation_key(ip), owner.encode(),
                                        expected_revision=revision)
            except (errors.NotFound, errors.Conflict):
                pass
        for ip, revision in plan.release:
            try:
                await self.store.delete(reservation_key(ip), expected_revision=revision)
                log.warning("service IPs: %s was allocated to no Service; released", ip)
            except (errors.NotFound, errors.Conflict):
                pass
        for ip, a, b in plan.duplicates:
            log.error("service IPs: %s is held by both %s and %s", ip, a, b)
        for h in plan.outside:
            log.warning("service IPs: %s/%s holds %s, outside the range %s", h.namespace,
                        h.name, h.ip, self.range.cidr)
        self._hint = set(keys) - {ip for ip, _ in plan.release} | {h.ip for h in plan.restore}
        return plan

    async def run(self) -> None:
        """Release addresses of deleted Services; repair at start and periodically."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._release_loop(), name="service-ip-release")
            while True:
                try:
                    await self.repair()
                except errors.ShoalError as e:
                    log.warning("service IPs: repair failed: %s", e)
                await asyncio.sleep(self.repair_period)
