"""The metrics API (metrics.k8s.io/v1beta1): nodes' and pods' recent CPU and memory use.

    client (shoal top, the HPA controller) --mTLS--> apiserver Metrics:
        authorize (list nodes / pods in group metrics.k8s.io)
        Nodes from the watch cache -> every node agent's Stats, at once
        (InternalIP + daemonEndpoints port, mTLS with the kubelet-client cert)
        -> filter by name / namespace / labels (the Node's or Pod's own labels,
           from the watch cache) -> NodeMetricsList / PodMetricsList

Nothing is stored: each node agent keeps its latest usage sample
(``nodeagent.usage``, a few seconds old at most) and the apiserver asks when a
client lists, as metrics-server scrapes kubelets, so every apiserver of an HA
control plane answers the same. A node whose agent cannot be asked, or has no
sample yet, is left out of the answer (logged); the call itself succeeds. Pods
take their labels from the Pod object, and a sample of a pod the apiserver no
longer has is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc

from apiserver.authz.attributes import Attributes
from apiserver.metrics import Metrics
from apiserver.nodedialing import NodeDialer, internal_ip, relayed
from apiserver.pki import Identity
from apiserver.rpc import Authenticator, Guard, attributes, unary
from apiserver.watchcache import WatchCache
from shoal import errors, selectors
from shoal.api.core.v1 import core_pb2
from shoal.api.metrics.v1beta1 import metrics_pb2 as pb
from shoal.kinds import KindTable

log = logging.getLogger(__name__)

SERVICE = "shoal.metrics.v1beta1.Metrics"
NODE_SERVICE = "shoal.node.v1.NodeAgent"
GROUP = "metrics.k8s.io"


class MetricsAPI:
    def __init__(self, *, cache: WatchCache, kinds: KindTable, pki_dir: Path,
                 metrics: Metrics, authn: Authenticator, guard: Guard,
                 agent_timeout: float = 5.0) -> None:
        self.cache = cache
        self.nodes = kinds.by_resource("", "nodes")
        self.pods = kinds.by_resource("", "pods")
        self.metrics = metrics
        self.authn = authn
        self.guard = guard
        self.agent_timeout = agent_timeout
        self.dialer = NodeDialer(pki_dir)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def ser(m: Any) -> bytes:
            return bytes(m.SerializeToString())

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ListNodeMetrics": grpc.unary_unary_rpc_method_handler(
                self.list_node_metrics, request_deserializer=pb.ListMetricsRequest.FromString,
                response_serializer=ser),
            "ListPodMetrics": grpc.unary_unary_rpc_method_handler(
                self.list_pod_metrics, request_deserializer=pb.ListMetricsRequest.FromString,
                response_serializer=ser),
        })

    def _cached(self, kind: Any, message: type[Any], namespace: str = "") -> dict[
            tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = {}
        for o in self.cache.cache_for(kind).objects.values():
            if namespace and o.namespace != namespace:
                continue
            obj = message()
            obj.ParseFromString(o.raw)
            out[(o.namespace, o.name)] = obj
        return out

    async def _ask(self, node: core_pb2.Node, timeout: float) -> pb.NodeStats | None:
        ip = internal_ip(node)
        port = node.status.daemon_endpoints.kubelet_endpoint.port
        if not ip or not port:
            return None
        address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        rpc = self.dialer.channel(address).unary_unary(
            f"/{NODE_SERVICE}/Stats", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.NodeStats.FromString)
        try:
            stats: pb.NodeStats = await rpc(pb.NodeStatsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            log.info("no usage from node %s: %s", node.metadata.name,
                     relayed(e, f"the node agent at {address}").message)
            return None
        return stats

    async def _gather(self, nodes: list[core_pb2.Node],
                      context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.NodeStats]:
        remaining = context.time_remaining()
        timeout = self.agent_timeout if remaining is None else \
            max(0.1, min(self.agent_timeout, remaining - 0.2))
        found = await asyncio.gather(*(self._ask(n, timeout) for n in nodes))
        return [s for s in found if s is not None]

    @staticmethod
    def _selector(text: str) -> selectors.LabelSelector:
        try:
            return selectors.parse_labels(text)
        except errors.ShoalError:
            raise
        except ValueError as e:
            raise errors.BadRequest(f"invalid label selector {text!r}: {e}") from e

    @staticmethod
    def describe_nodes(service: object, request: pb.ListMetricsRequest,
                       ident: Identity) -> Attributes:
        return attributes(ident, "get" if request.name else "list", group=GROUP,
                          resource="nodes", name=request.name)

    @staticmethod
    def describe_pods(service: object, request: pb.ListMetricsRequest,
                      ident: Identity) -> Attributes:
        return attributes(ident, "get" if request.name else "list", group=GROUP,
                          resource="pods", namespace=request.namespace, name=request.name)

    @unary("ListNodeMetrics", describe=describe_nodes)
    async def list_node_metrics(self, request: pb.ListMetricsRequest,
                                context: grpc.aio.ServicerContext[Any, Any]
                                ) -> pb.NodeMetricsList:
        wanted = self._selector(request.label_selector)
        nodes = [n for (_, name), n in sorted(self._cached(self.nodes, core_pb2.Node).items())
                 if (not request.name or name == request.name)
                 and wanted.matches(n.metadata.labels)]
        if request.name and not nodes:
            raise errors.NotFound(f'nodes "{request.name}" not found', kind="Node",
                                  name=request.name)
        out = pb.NodeMetricsList()
        by_name = {n.metadata.name: n for n in nodes}
        for stats in await self._gather(nodes, context):
            node = by_name.get(stats.node.metadata.name)
            if node is None:
                continue
            item = out.items.add()
            item.CopyFrom(stats.node)
            item.metadata.labels.update(node.metadata.labels)
        out.items.sort(key=lambda m: m.metadata.name)
        return out

    @unary("ListPodMetrics", describe=describe_pods)
    async def list_pod_metrics(self, request: pb.ListMetricsRequest,
                               context: grpc.aio.ServicerContext[Any, Any]
                               ) -> pb.PodMetricsList:
        wanted = self._selector(request.label_selector)
        pods = {key: p for key, p in self._cached(self.pods, core_pb2.Pod,
                                                   request.namespace).items()
                if (not request.name or key[1] == request.name)
                and wanted.matches(p.metadata.labels)}
        if request.name and not pods:
            raise errors.NotFound(f'pods "{request.name}" not found', kind="Pod",
                                  name=request.name)
        hosts = {p.spec.node_name for p in pods.values() if p.spec.node_name}
        nodes = [n for (_, name), n in self._cached(self.nodes, core_pb2.Node).items()
                 if name in hosts]
        out = pb.PodMetricsList()
        for stats in await self._gather(nodes, context):
            for m in stats.pods:
                pod = pods.get((m.metadata.namespace, m.metadata.name))
                if pod is None or pod.spec.node_name != stats.node.metadata.name:
                    continue
                item = out.items.add()
                item.CopyFrom(m)
                item.metadata.labels.update(pod.metadata.labels)
        out.items.sort(key=lambda m: (m.metadata.namespace, m.metadata.name))
        return out

    async def close(self) -> None:
        await self.dialer.close()
