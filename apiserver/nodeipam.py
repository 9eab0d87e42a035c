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

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from apiserver.objectstore import ObjectStore
from apiserver.watchcache import CacheEvent, WatchCache
from shoal import errors
from shoal.kinds import KindTable
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)


def allocate(cluster_cidr: str, mask: int, used: Iterable[str]) -> str:
    """The lowest free ``/mask`` block of ``cluster_cidr`` (never the first)."""
    net: Any = ipaddress.ip_network(cluster_cidr, strict=True)
    if mask < net.prefixlen or mask > net.max_prefixlen:
        raise errors.BadRequest(f"node CIDR mask /{mask} does not fit in {cluster_cidr}")
    taken: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for cidr in used:
        try:
            taken.add(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            continue
    for i, block in enumerate(net.subnets(new_prefix=mask)):
        if i == 0:
            continue
        if not any(block.overlaps(t) for t in taken):
            return str(block)
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
        allocate(cluster_cidr, mask, ())  # a bad configuration fails at start
        self.cache.cache_for(self.nodes).listeners.append(self._on_event)

    def _decode(self, raw: bytes) -> Any:
        node: Any = self.nodes.new()
        node.ParseFromString(raw)
        return node

    def _on_event(self, ev: CacheEvent) -> None:
        if not self._decode(ev.obj.raw).spec.pod_cidr:
            self.queue.add(ev.obj.name)

    def _used(self) -> list[str]:
        out = []
        for obj in self.cache.cache_for(self.nodes).objects.values():
            node = self._decode(obj.raw)
            out += [node.spec.pod_cidr, *node.spec.pod_cidrs]
        return [c for c in out if c]

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
