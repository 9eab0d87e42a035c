"""Register this node, renew its Lease, keep its status true.

    register: create the Node (labels, status) or, if it exists, keep its spec
              (pod CIDR, taints, unschedulable) and replace its status
    every renew_interval (10 s):  Lease kube-node-lease/<node>.renewTime = now
    status:   posted when it changes (runtime became (not) ready, ...) and at
              least every status_interval as a heartbeat

The Lease is the heartbeat the node-lifecycle controller watches: a node whose
Lease is not renewed within ``leaseDurationSeconds`` (40 s) is presumed gone.

Contract: every step retries by itself on the next tick; a failed renewal is
logged and never stops the agent. ``tick()`` does one round (tests drive it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import timestamp_pb2

from nodeagent.nodestatus import NodeFacts, node_status, same_except_heartbeat
from shoal import errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.events import EventRecorder

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40
RENEW_INTERVAL = 10.0
STATUS_INTERVAL = 60.0

# () -> (runtime version, ready, message)
RuntimeProbe = Callable[[], Awaitable[tuple[str, bool, str]]]


def _ready(status: core_pb2.NodeStatus) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions)


def _ts(now: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(now * 1e9))
    return ts


class NodeRegistration:
    def __init__(
        self,
        *,
        client: AsyncClient,
        node_name: str,
        facts: NodeFacts,
        runtime_probe: RuntimeProbe,
        labels: dict[str, str] | None = None,
        renew_interval: float = RENEW_INTERVAL,
        status_interval: float = STATUS_INTERVAL,
        lease_duration: int = LEASE_DURATION,
        pod_cidr: str = "",
        clock: Callable[[], float] = time.time,
        events: EventRecorder | None = None,
    ) -> None:
        self.client = client
        # Starting, RegisteredNode, NodeReady / NodeNotReady (the kubelet's Events).
        self.events = events
        self._ready_reported: bool | None = None
        # A heartbeat failed since the last good one (see tick).
        self._out_of_touch = False
        # The Lease as last written (see renew_lease).
        self._lease: coordination_pb2.Lease | None = None
        self.node_name = node_name
        self.facts = facts
        self.runtime_probe = runtime_probe
        self.labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": facts.architecture,
            **(labels or {}),
        }
        self.renew_interval = renew_interval
        self.status_interval = status_interval
        self.lease_duration = lease_duration
        # A pod CIDR given on the command line is published at registration, so
        # node IPAM leaves it alone and other nodes route to it.
        self.pod_cidr = pod_cidr
        self.clock = clock
        self.registered = asyncio.Event()
        self.node: core_pb2.Node | None = None
        self._last_status_post = 0.0

    async def _status(self, previous: core_pb2.NodeStatus | None) -> core_pb2.NodeStatus:
        try:
            version, ready, message = await self.runtime_probe()
        except errors.ShoalError as e:
            version, ready, message = "", False, str(e)
        return node_status(self.facts, runtime_version=version, runtime_ready=ready,
                           runtime_message=message, previous=previous, now=self.clock())

    async def register(self) -> core_pb2.Node:
        """Create or adopt the Node object; post a fresh status."""
        try:
            node = await self.client.get(core_pb2.Node, self.node_name)
        except errors.NotFound:
            node = core_pb2.Node()
            node.metadata.name = self.node_name
            node.metadata.labels.update(self.labels)
            if self.pod_cidr:
                node.spec.pod_cidr = self.pod_cidr
                node.spec.pod_cidrs.append(self.pod_cidr)
            node.status.CopyFrom(await self._status(None))
            try:
                node = await self.client.create(node)
                log.info("registered node %s", self.node_name)
                self._event(node, "RegisteredNode", f"Node {self.node_name} registered")
            except errors.AlreadyExists:
                node = await self.client.get(core_pb2.Node, self.node_name)
        if self.pod_cidr and node.spec.pod_cidr and node.spec.pod_cidr != self.pod_cidr:
            log.warning("node %s: --pod-cidr %s differs from the Node's %s; a pod CIDR "
                        "cannot change once set", self.node_name, self.pod_cidr,
                        node.spec.pod_cidr)
        missing = {k: v for k, v in self.labels.items() if node.metadata.labels.get(k) != v}
        if missing:
            node.metadata.labels.update(missing)
            node = await self.client.update(node)
        self.node = node
        self._event(node, "Starting", "Starting shoal-nodeagent.")
        await self.post_status(force=True)
        self.registered.set()
        return self.node

    async def post_status(self, *, force: bool = False) -> None:
        node = self.node or await self.client.get(core_pb2.Node, self.node_name)
        status = await self._status(node.status if node.HasField("status") else None)
        due = self.clock() - self._last_status_post >= self.status_interval
        if not force and not due and node.HasField("status") and \
                same_except_heartbeat(node.status, status):
            return
        for _ in range(5):
            node.status.CopyFrom(status)
            try:
                self.node = await self.client.update_status(node)
                self._last_status_post = self.clock()
                now_ready = _ready(status)
                if now_ready != self._ready_reported and (now_ready or self._ready_reported):
                    state = "NodeReady" if now_ready else "NodeNotReady"
                    self._event(self.node, state,
                                f"Node {self.node_name} status is now: {state}")
                self._ready_reported = now_ready
                return
            except errors.Conflict:
                node = await self.client.get(core_pb2.Node, self.node_name)
        raise errors.Conflict(f"node {self.node_name}: status kept conflicting")

    def _event(self, node: core_pb2.Node, reason: str, message: str) -> None:
        if self.events is not None:
            self.events.event(node, "Normal", reason, message)

    async def renew_lease(self) -> coordination_pb2.Lease:
        """Renew (or create) the node's Lease.

        As the kubelet does, the Lease written last is kept and updated
        directly: one request per renewal. Only when that fails (someone else
        wrote it, or it is gone) is it read afresh."""
        if self._lease is not None:
            lease = coordination_pb2.Lease()
            lease.CopyFrom(self._lease)
            lease.spec.renew_time.CopyFrom(_ts(self.clock()))
            try:
                self._lease = await self.client.update(lease)
                return self._lease
            except (errors.Conflict, errors.NotFound):
                self._lease = None
        self._lease = await self._renew_fresh()
        return self._lease

    async def _renew_fresh(self) -> coordination_pb2.Lease:
        now = _ts(self.clock())
        try:
            lease = await self.client.get(coordination_pb2.Lease, self.node_name,
                                          namespace=LEASE_NAMESPACE)
        except errors.NotFound:
            lease = coordination_pb2.Lease()
            lease.metadata.name = self.node_name
            lease.metadata.namespace = LEASE_NAMESPACE
            self._own(lease)
            lease.spec.holder_identity = self.node_name
            lease.spec.lease_duration_seconds = self.lease_duration
            lease.spec.acquire_time.CopyFrom(now)
            lease.spec.renew_time.CopyFrom(now)
            return await self.client.create(lease)
        lease.spec.holder_identity = self.node_name
        lease.spec.lease_duration_seconds = self.lease_duration
        lease.spec.renew_time.CopyFrom(now)
        return await self.client.update(lease)

    def _own(self, lease: Any) -> None:
        """The Lease belongs to the Node (deleted with it)."""
        if self.node is not None and self.node.metadata.uid:
            ref = lease.metadata.owner_references.add()
            ref.api_version, ref.kind = "v1", "Node"
            ref.name, ref.uid = self.node_name, self.node.metadata.uid

    async def tick(self) -> None:
        """One round: register if needed, renew the lease, post status if due."""
        try:
            await self._tick()
        except errors.ShoalError:
            self._out_of_touch = True
            raise

    async def _tick(self) -> None:
        if not self.registered.is_set():
            await self.register()
        await self.renew_lease()
        if self._out_of_touch:
            # While we could not reach the apiserver, the node lifecycle
            # controller may have marked the node Unknown: our cached Node says
            # nothing about that, so read it afresh and post our status now.
            self.node = None
            await self.post_status(force=True)
            self._out_of_touch = False
        else:
            await self.post_status()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except errors.ShoalError as e:
                log.warning("node %s: heartbeat failed: %s", self.node_name, e)
            await asyncio.sleep(self.renew_interval)
