"""``MeshProxy``: every node's meshagent status, for ``shoal mesh ...`` and
``shoal apply --wait-propagated``.

    user --mTLS--> apiserver: authenticate, authorize (get nodes/proxy, of the one
           node asked about or, for all nodes, of any); the Node (or every Node) -> InternalIP
           + the mesh admin port (--mesh-admin-port, 15000) --mTLS (kubelet-client
           certificate; the node's serving certificate checked against the cluster
           CA), all nodes at once--> meshagent MeshAgent.Status

An agent that cannot be asked (no address, unreachable, refused, too slow) is
reported with the reason on its node's entry; the call itself still succeeds.

Lag: the answer carries the cluster's revision and, per node, what the agent
should have applied by now. For each resource the agent reports a generation
for, the watch cache knows the newest change (Pods only those bound to that
node: an agent watches its own node's pods) and how many changes are newer than
the agent's generation (:func:`lag_of`, pure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from apiserver.authz.attributes import Attributes
from apiserver.metrics import Metrics
from apiserver.nodedialing import NodeDialer, internal_ip, relayed
from apiserver.objectstore import ObjectStore
from apiserver.pki import Identity
from apiserver.rpc import Authenticator, Guard, attributes, unary
from apiserver.watchcache import CachedObject, CacheEvent, WatchCache
from shoal.api.core.v1 import core_pb2
from shoal.api.mesh.v1 import mesh_pb2 as pb
from shoal.kinds import KindTable

log = logging.getLogger(__name__)

SERVICE = "shoal.mesh.v1.MeshProxy"
AGENT_SERVICE = "shoal.mesh.v1.MeshAgent"
DEFAULT_ADMIN_PORT = 15000
NODE_FIELD = "spec.nodeName"


# --------------------------------------------------------------------------- lag (pure)


@dataclass(frozen=True)
class KindHistory:
    """What the watch cache holds of one resource: current objects, and the
    events after ``window_start`` (older ones are gone)."""

    objects: Iterable[CachedObject]
    events: Iterable[CacheEvent]
    window_start: int


@dataclass(frozen=True)
class Lag:
    required: int  # the newest relevant change's revision
    pending: int  # relevant changes newer than the agent's generation; -1 unknown


def _relevant(obj: CachedObject | None, node: str) -> bool:
    """A node's agent watches every object, but pods only on its node."""
    if obj is None:
        return False
    bound = obj.fields.get(NODE_FIELD)
    return bound is None or bound == node


def lag_of(*, generations: Mapping[str, int], overall: int, kinds: Mapping[str, KindHistory],
           node: str, cluster_revision: int) -> Lag:
    """How far an agent with these per-resource ``generations`` is behind."""
    known = {name: gen for name, gen in generations.items() if name in kinds}
    if not known:
        return Lag(required=cluster_revision, pending=0 if overall >= cluster_revision else -1)
    required, pending = 0, 0
    for name, gen in known.items():
        h = kinds[name]
        newest = max((o.revision for o in h.objects if _relevant(o, node)), default=0)
        newer = 0
        for ev in h.events:
            if _relevant(ev.obj, node) or _relevant(ev.prev, node):
                newest = max(newest, ev.revision)
                newer += ev.revision > gen
        required = max(required, newest)
        if pending >= 0 and newest > gen:
            pending = -1 if gen < h.window_start else pending + newer
    return Lag(required=required, pending=pending)


# --------------------------------------------------------------------------- service


class MeshProxy:
    def __init__(self, *, objects: ObjectStore, cache: WatchCache, kinds: KindTable,
                 pki_dir: Path, metrics: Metrics, authn: Authenticator, guard: Guard,
                 admin_port: int = DEFAULT_ADMIN_PORT, agent_timeout: float = 5.0) -> None:
        self.objects = objects
        self.cache = cache
        self.nodes = kinds.by_resource("", "nodes")
        self.metrics = metrics
        self.authn = authn
        self.guard = guard
        self.admin_port = admin_port
        self.agent_timeout = agent_timeout
        self.dialer = NodeDialer(pki_dir)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "MeshStatus": grpc.unary_unary_rpc_method_handler(
                self.mesh_status, request_deserializer=pb.MeshStatusRequest.FromString,
                response_serializer=lambda m: m.SerializeToString()),
        })

    async def _nodes(self, name: str) -> list[core_pb2.Node]:
        if name:
            return [await self.objects.get(self.nodes, namespace="", name=name)]
        kc = self.cache.cache_for(self.nodes)
        out = []
        for o in sorted(kc.objects.values(), key=lambda o: o.name):
            node = core_pb2.Node()
            node.ParseFromString(o.raw)
            out.append(node)
        return out

    async def _ask(self, node: core_pb2.Node, query: pb.StatusRequest,
                   timeout: float) -> pb.NodeMeshStatus:
        name = node.metadata.name
        ip = internal_ip(node)
        if not ip:
            return pb.NodeMeshStatus(node=name, error="the node reports no InternalIP address")
        address = f"[{ip}]:{self.admin_port}" if ":" in ip else f"{ip}:{self.admin_port}"
        rpc = self.dialer.channel(address).unary_unary(
            f"/{AGENT_SERVICE}/Status", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.AgentStatus.FromString)
        try:
            status: pb.AgentStatus = await rpc(query, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            err = relayed(e, f"the meshagent at {address}")
            return pb.NodeMeshStatus(node=name, address=address, error=err.message)
        return pb.NodeMeshStatus(node=name, address=address, status=status)

    def _lag(self, entry: pb.NodeMeshStatus, revision: int) -> None:
        names = set(entry.status.generations)
        kinds = {}
        for kc in self.cache.caches.values():
            if kc.kind.qualified_resource in names:
                kinds[kc.kind.qualified_resource] = KindHistory(
                    objects=kc.objects.values(), events=kc.history,
                    window_start=kc.window_start)
        lag = lag_of(generations=dict(entry.status.generations),
                     overall=entry.status.generation, kinds=kinds, node=entry.node,
                     cluster_revision=revision)
        entry.required_generation = lag.required
        entry.pending_changes = lag.pending

    @staticmethod
    def describe_status(service: object, request: pb.MeshStatusRequest,
                        ident: Identity) -> Attributes:
        return attributes(ident, "get", resource="nodes", subresource="proxy",
                          name=request.node)

    @unary("MeshStatus", describe=describe_status)
    async def mesh_status(self, request: pb.MeshStatusRequest,
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> pb.MeshStatusResponse:
        nodes = await self._nodes(request.node)
        remaining = context.time_remaining()
        timeout = self.agent_timeout if remaining is None else \
            max(0.1, min(self.agent_timeout, remaining - 0.2))
        revision = self.cache.revision
        entries = await asyncio.gather(*(self._ask(n, request.query, timeout) for n in nodes))
        for entry in entries:
            if not entry.error:
                self._lag(entry, revision)
        return pb.MeshStatusResponse(cluster_revision=revision, nodes=entries)

    async def close(self) -> None:
        await self.dialer.close()

