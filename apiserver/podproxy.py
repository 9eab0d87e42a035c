"""``PodProxy``: logs, exec, port-forward and image imports for users, relayed to a node agent.

    user --mTLS--> apiserver: authenticate, authorize (get pods/log, create
           pods/exec for Exec and ExecStream, create pods/attach for an attaching
           ExecStream, create pods/portforward, update pods/ephemeralcontainers,
           create nodes/proxy for imports); pod -> spec.nodeName (or, for
           ImportImage, the node the first chunk names) -> Node address
           (InternalIP) and agent port (daemonEndpoints) --mTLS (the
           apiserver's kubelet-client certificate; the node's serving
           certificate checked against the cluster CA)--> node agent

ExecStream and PortForward are bidirectional: the first message names the pod
(and is what the authorizer sees), then messages are relayed both ways as they
come; either side ending ends the other (a user who goes away cancels the
node's stream, which closes the runtime's).

Errors say which hop failed: the pod is not scheduled yet, the node has no
address, or the node agent cannot be reached. Log streams are relayed chunk by
chunk; a user who disconnects ends the node stream too. Import chunks are
relayed as they arrive (gRPC flow control paces the user to the node), under
the user's own deadline.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc

from apiserver.authz.attributes import Attributes
from apiserver.metrics import Metrics
from apiserver.nodedialing import NodeDialer, internal_ip, relayed
from apiserver.objectstore import ObjectStore
from apiserver.pki import Identity
from apiserver.rpc import Authenticator, Call, Guard, abort_with, attributes, passthrough, unary
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.node.v1 import node_pb2
from shoal.api.resources.v1 import podproxy_pb2
from shoal.kinds import KindTable

log = logging.getLogger(__name__)

SERVICE = "shoal.resources.v1.PodProxy"
NODE_SERVICE = "shoal.node.v1.NodeAgent"
_EPHEMERAL_ATTEMPTS = 5


class PodProxy:
    def __init__(self, *, objects: ObjectStore, kinds: KindTable, pki_dir: Path,
                 metrics: Metrics, authn: Authenticator, guard: Guard) -> None:
        self.objects = objects
        self.guard = guard
        self.pods = kinds.by_resource("", "pods")
        self.nodes = kinds.by_resource("", "nodes")
        self.metrics = metrics
        self.authn = authn
        self.dialer = NodeDialer(pki_dir)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Logs": grpc.unary_stream_rpc_method_handler(
                self.logs, request_deserializer=node_pb2.LogsRequest.FromString,
                response_serializer=passthrough),
            "Exec": grpc.unary_unary_rpc_method_handler(
                self.exec, request_deserializer=node_pb2.ExecRequest.FromString,
                response_serializer=passthrough),
            "ImportImage": grpc.stream_unary_rpc_method_handler(
                self.import_image, request_deserializer=node_pb2.ImportChunk.FromString,
                response_serializer=passthrough),
            "ExecStream": grpc.stream_stream_rpc_method_handler(
                self.exec_stream, request_deserializer=node_pb2.ExecInput.FromString,
                response_serializer=passthrough),
            "PortForward": grpc.stream_stream_rpc_method_handler(
                self.port_forward, request_deserializer=node_pb2.PortForwardInput.FromString,
                response_serializer=passthrough),
            "AddEphemeralContainer": grpc.unary_unary_rpc_method_handler(
                self.add_ephemeral_container,
                request_deserializer=podproxy_pb2.EphemeralContainerRequest.FromString,
                response_serializer=passthrough),
        })

    async def _node_address(self, namespace: str, name: str) -> str:
        pod: Any = await self.objects.get(self.pods, namespace=namespace, name=name)
        if not pod.spec.node_name:
            raise errors.BadRequest(f'pod "{name}" is not scheduled to a node yet')
        return await self._agent_address(pod.spec.node_name)

    async def _agent_address(self, node_name: str) -> str:
        node: core_pb2.Node = await self.objects.get(self.nodes, namespace="", name=node_name)
        ip = internal_ip(node)
        port = node.status.daemon_endpoints.kubelet_endpoint.port
        if not ip or not port:
            raise errors.Unavailable(f'node "{node_name}" reports no agent address',
                                     retry_after=2.0)
        return f"{ip}:{port}"

    @staticmethod
    def describe_logs(service: object, request: node_pb2.LogsRequest,
                      ident: Identity) -> Attributes:
        return attributes(ident, "get", resource="pods", subresource="log",
                          namespace=request.namespace, name=request.pod)

    @staticmethod
    def describe_exec(service: object, request: node_pb2.ExecRequest,
                      ident: Identity) -> Attributes:
        return attributes(ident, "create", resource="pods", subresource="exec",
                          namespace=request.namespace, name=request.pod)

    @staticmethod
    def describe_exec_stream(service: object, request: node_pb2.ExecInput,
                             ident: Identity) -> Attributes:
        return attributes(ident, "create", resource="pods",
                          subresource="attach" if request.start.attach else "exec",
                          namespace=request.start.namespace, name=request.start.pod)

    @staticmethod
    def describe_ephemeral(service: object, request: podproxy_pb2.EphemeralContainerRequest,
                           ident: Identity) -> Attributes:
        return attributes(ident, "update", resource="pods", subresource="ephemeralcontainers",
                          namespace=request.namespace, name=request.pod)

    @unary("AddEphemeralContainer", describe=describe_ephemeral)
    async def add_ephemeral_container(self, request: podproxy_pb2.EphemeralContainerRequest,
                                      context: grpc.aio.ServicerContext[Any, Any]
                                      ) -> core_pb2.Pod:
        """Append one ephemeral container to the pod's spec (only that may
        change); the pod's node agent starts it. Retried on a concurrent write."""
        for _ in range(_EPHEMERAL_ATTEMPTS):
            pod: core_pb2.Pod = await self.objects.get(self.pods, namespace=request.namespace,
                                                       name=request.pod)
            if pod.metadata.HasField("deletion_timestamp") or \
                    pod.status.phase in ("Succeeded", "Failed"):
                raise errors.BadRequest(f'pod "{request.pod}" is not running: cannot add an '
                                        "ephemeral container")
            new = core_pb2.Pod()
            new.CopyFrom(pod)
            new.spec.ephemeral_containers.append(request.container)
            try:
                updated: core_pb2.Pod = await self.objects.update_ephemeral_containers(
                    self.pods, new)
                return updated
            except errors.Conflict:
                continue
        raise errors.Conflict(f'pod "{request.pod}" kept changing; try again',
                              kind="Pod", name=request.pod)

    @staticmethod
    def describe_port_forward(service: object, request: node_pb2.PortForwardInput,
                              ident: Identity) -> Attributes:
        return attributes(ident, "create", resource="pods", subresource="portforward",
                          namespace=request.start.namespace, name=request.start.pod)

    @staticmethod
    def describe_import(service: object, request: object, ident: Identity) -> Attributes:
        # The node is named in the first chunk, read later: any node's proxy.
        return attributes(ident, "create", resource="nodes", subresource="proxy")

    @unary("Exec", describe=describe_exec)
    async def exec(self, request: node_pb2.ExecRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.ExecResponse:
        address = await self._node_address(request.namespace, request.pod)
        rpc = self.dialer.channel(address).unary_unary(
            f"/{NODE_SERVICE}/Exec", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=node_pb2.ExecResponse.FromString)
        timeout = (request.timeout_seconds or 60) + 10
        try:
            return await rpc(request, timeout=timeout)  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as e:
            raise _relayed(e, address) from e

    @unary("ImportImage", describe=describe_import)
    async def import_image(self, request: AsyncIterator[node_pb2.ImportChunk],
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> node_pb2.ImportResult:
        first = await anext(aiter(request), None)
        if first is None or not first.node:
            raise errors.BadRequest("the first chunk of an image import must name the node")
        address = await self._agent_address(first.node)
        rpc = self.dialer.channel(address).stream_unary(
            f"/{NODE_SERVICE}/ImportImage", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=node_pb2.ImportResult.FromString)

        async def chunks() -> AsyncIterator[node_pb2.ImportChunk]:
            yield first
            async for chunk in request:
                yield chunk

        try:
            result = await rpc(chunks(), timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            raise _relayed(e, address) from e
        return result  # type: ignore[no-any-return]

    async def logs(self, request: node_pb2.LogsRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        audit = Call(self, "Logs", request)
        try:
            await audit.admit(context, request, self.describe_logs)
            address = await self._node_address(request.namespace, request.pod)
        except errors.ShoalError as e:
            audit.finish(e)
            await abort_with(context, e)
            return
        audit.count()
        audit.started()
        rpc = self.dialer.channel(address).unary_stream(
            f"/{NODE_SERVICE}/Logs", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=None)
        async with aclosing(_relay(rpc(request), address, context, audit)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def exec_stream(self, request: AsyncIterator[node_pb2.ExecInput],
                          context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        async for chunk in self._relay_stream("ExecStream", request, context,
                                              self.describe_exec_stream):
            yield chunk

    async def port_forward(self, request: AsyncIterator[node_pb2.PortForwardInput],
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[bytes]:
        async for chunk in self._relay_stream("PortForward", request, context,
                                              self.describe_port_forward):
            yield chunk

    async def _relay_stream(self, method: str, request: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext[Any, Any],
                            describe: Any) -> AsyncIterator[bytes]:
        """Admit on the first message (its ``start`` names the pod), then relay
        both ways to the pod's node agent until either side ends."""
        first = await anext(aiter(request), None)
        audit = Call(self, method, first)
        try:
            if first is None or first.WhichOneof("input") != "start":
                raise errors.BadRequest(f"a {method} stream must start with the pod")
            await audit.admit(context, first, describe)
            address = await self._node_address(first.start.namespace, first.start.pod)
        except errors.ShoalError as e:
            audit.finish(e)
            await abort_with(context, e)
            return
        audit.count()
        audit.started()
        rpc = self.dialer.channel(address).stream_stream(
            f"/{NODE_SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=None)

        async def inputs() -> AsyncIterator[Any]:
            yield first
            async for message in request:
                yield message

        async with aclosing(_relay(rpc(inputs()), address, context, audit)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def close(self) -> None:
        await self.dialer.close()


def _relayed(e: grpc.aio.AioRpcError, address: str) -> errors.ShoalError:
    return relayed(e, f"the node agent at {address}")


async def _relay(call: Any, address: str, context: grpc.aio.ServicerContext[Any, Any],
                 audit: Call) -> AsyncGenerator[bytes, None]:
    """Yield the node stream's chunks; a node error aborts the user's call, and
    however the stream ends, the node call is cancelled and the audit finished."""
    ended: BaseException | None = None
    try:
        async for chunk in call:
            yield chunk
    except grpc.aio.AioRpcError as e:
        ended = _relayed(e, address)
        await abort_with(context, ended)
    except BaseException as e:
        ended = e
        raise
    finally:
        call.cancel()
        audit.finish(ended)
