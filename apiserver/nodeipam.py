"""Node IPAM: every Node gets a pod CIDR carved from the cluster CIDR.

    cluster CIDR 10.244.0.0/16, mask 24  ->  node-1 10.244.1.0/24, node-2 10.244.2.0/24 ...

Level-triggered: on every Node event, and once at start for all Nodes, any
Node without ``spec.podCIDR`` gets the lowest free block (blocks in use by
other Nodes are skipped; the first block, holding the network address of the
whole range, is not handed out). The write is a compare-and-swap on the Node's
resourceVersion, so an agent updating its Node at the same moment loses
nothing; on conflict the Node is looked at again. A CIDR, once set, is never
changed (Kubernetes' rule), and a Node set by hand keeps its own.

Contract: ``allocate`` is pure; ``NodeIPAM.run`` retries with back-off per
Node through the work queue. With several apiservers the allocator must run
on one only (the leader-election issue); until then run one apiserver.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from apiserver.objectstore import ObjectStore
from apiserver.watchcache import DELETED, CacheEvent, WatchCache
from shoal import errors
from shoal.kinds import KindTable
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=65536)
def _blocks(cidr: str, cluster_cidr: str, mask: int) -> range:
    """The numbers of the ``/mask`` blocks of ``cluster_cidr`` that ``cidr`` overlaps."""
    net: Any = ipaddress.ip_network(cluster_cidr)
    try:
        t: Any = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return range(0)
    if t.version != net.version or not t.overlaps(net):
        return range(0)
    shift, base = net.max_prefixlen - mask, int(net.network_address)
    first = max(int(t.network_address), base)
    last = min(int(t.broadcast_address), int(net.broadcast_address))
    return range((first - base) >> shift, ((last - base) >> shift) + 1)


def allocate(cluster_cidr: str, mask: int, used: Iterable[str]) -> str:
    """The lowest free ``/mask`` block of ``cluster_cidr`` (never the first).

    Blocks are numbered by integer arithmetic (each used CIDR parsed once and
    remembered); a used CIDR of any size takes every block it overlaps."""
    net: Any = ipaddress.ip_network(cluster_cidr, strict=True)
    if mask < net.prefixlen or mask > net.max_prefixlen:
        raise errors.BadRequest(f"node CIDR mask /{mask} does not fit in {cluster_cidr}")
    taken: set[int] = set()
    for cidr in used:
        taken.update(_blocks(cidr, cluster_cidr, mask))
    shift, base = net.max_prefixlen - mask, int(net.network_address)
    for i in range(1, 1 << (mask - net.prefixlen)):
        if i not in taken:
            return str(ipaddress.ip_network((base + (i << shift), mask)))
    raise errors.Unavailable(f"no free /{mask} left in the cluster CIDR {cluster_cidr}",
                             retry_after=30.0)


class NodeIPAM:
    def __init__(self, *, objects: ObjectStore, cache: WatchCache, kinds: KindTable,
                 cluster_cidr: str, mask: int) -> None:
        self.objects = objects
        self.cache = cache
        self.nodes = kinds.by_resource("", "nodes")
        self.cluster_cidr = cluster_cidr
        self.mask = mask
        self.queue = WorkQueue(base_delay=0.2, max_delay=30.0)
        # Node name -> its pod CIDRs, kept from the cache's events.
        self._cidrs: dict[str, list[str]] = {}
        allocate(cluster_cidr, mask, ())  # a bad configuration fails at start
        self.cache.cache_for(self.nodes).listeners.append(self._on_event)

    def _decode(self, raw: bytes) -> Any:
        node: Any = self.nodes.new()
        node.ParseFromString(raw)
        return node

    def _on_event(self, ev: CacheEvent) -> None:
        if ev.type == DELETED:
            self._cidrs.pop(ev.obj.name, None)
            return
        node = self._decode(ev.obj.raw)
        cidrs = [c for c in (node.spec.pod_cidr, *node.spec.pod_cidrs) if c]
        if cidrs:
            self._cidrs[ev.obj.name] = cidrs
        else:
            self._cidrs.pop(ev.obj.name, None)
            self.queue.add(ev.obj.name)

    def _used(self) -> list[str]:
        """Every Node's CIDRs, as the events have told (no decoding here)."""
        return [c for cidrs in self._cidrs.values() for c in cidrs]

    async def run(self) -> None:
        await self.cache.ready.wait()
        for obj in list(self.cache.cache_for(self.nodes).objects.values()):
            self._on_event(CacheEvent(0, obj, None, obj.revision))
        async for name in self.queue.worker():
            try:
                await self.assign(name)
                self.queue.forget(name)
            except errors.ShoalError as e:
                delay = self.queue.add_rate_limited(name)
                log.warning("node IPAM: %s: %s; retrying in %.1fs", name, e, delay)

    async def assign(self, name: str) -> str:
        """Give ``name`` a pod CIDR unless it has one; returns its CIDR."""
        try:
            node = await self.objects.get(self.nodes, namespace="", name=name)
        except errors.NotFound:
            return ""
        if node.spec.pod_cidr:
            return str(node.spec.pod_cidr)
        cidr = allocate(self.cluster_cidr, self.mask, self._used())
        node.spec.pod_cidr = cidr
        node.spec.pod_cidrs[:] = [cidr]
        await self.objects.update(self.nodes, node)  # CAS on its resourceVersion
        log.info("node IPAM: %s gets %s", name, cidr)
        return cidr
