"""The node agent's own gRPC API (port 10250): container logs and exec.

Served with TLS using the node's serving certificate (from join). Every caller
must present a client certificate from the cluster CA whose subject is the
apiserver's kubelet client (CN ``shoal-apiserver-kubelet-client``) or whose
groups include ``system:masters``; users come in through the apiserver's
PodProxy, which authenticates them.

Logs are read from the runtime's log files (``nodeagent.logs``); ``follow``
streams until the container instance stops or the caller goes away.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from nodeagent.logs import container_logs, pod_log_dir, read_logs
from nodeagent.podruntime import PodRuntime
from nodeagent.runtimestate import ContainerRecord, ContainerState, PodRecord
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.node.v1 import node_pb2

log = logging.getLogger(__name__)

SERVICE = "shoal.node.v1.NodeAgent"
STATUS_TRAILER = "shoal-status-bin"
ALLOWED_USERS = frozenset({"shoal-apiserver-kubelet-client"})
ALLOWED_GROUPS = frozenset({"system:masters"})
GRPC_CODES = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, set[str]]:
    props = context.auth_context() or {}
    pems = props.get("x509_pem_cert")
    if not pems:
        raise errors.Unauthorized("a client certificate from the cluster CA is required")
    cert = x509.load_pem_x509_certificate(next(iter(pems)))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return (str(cn[0].value) if cn else ""), {str(o.value) for o in orgs}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], e: errors.ShoalError) -> None:
    code = next((c for cls, c in GRPC_CODES.items() if isinstance(e, cls)),
                grpc.StatusCode.INTERNAL)
    await context.abort(code, e.message,
                        trailing_metadata=((STATUS_TRAILER, e.status().SerializeToString()),))


class NodeAPI:
    def __init__(self, *, pod_by_name: Callable[[str, str], core_pb2.Pod | None],
                 records: Callable[[], dict[str, PodRecord]], runtime: PodRuntime,
                 log_root: Path) -> None:
        self.pod_by_name = pod_by_name
        self.records = records
        self.runtime = runtime
        self.log_root = log_root

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def ser(m: Any) -> bytes:
            return bytes(m.SerializeToString())

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Logs": grpc.unary_stream_rpc_method_handler(
                self.logs, request_deserializer=node_pb2.LogsRequest.FromString,
                response_serializer=ser),
            "Exec": grpc.unary_unary_rpc_method_handler(
                self.exec, request_deserializer=node_pb2.ExecRequest.FromString,
                response_serializer=ser),
        })

    def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        user, groups = _caller(context)
        if user not in ALLOWED_USERS and not groups & ALLOWED_GROUPS:
            raise errors.Forbidden(f'user "{user}" may not read logs or exec on this node')

    def _locate(self, namespace: str, name: str, container: str
                ) -> tuple[core_pb2.Pod, str, PodRecord]:
        pod = self.pod_by_name(namespace, name)
        if pod is None:
            raise errors.NotFound(f'pod "{name}" is not on this node')
        names = [c.name for c in pod.spec.containers] + \
            [c.name for c in pod.spec.init_containers]
        if not container:
            if len(pod.spec.containers) != 1:
                raise errors.BadRequest(
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(names)}]")
            container = pod.spec.containers[0].name
        elif container not in names:
            raise errors.BadRequest(f"container {container} is not valid for pod {name}")
        record = self.records().get(pod.metadata.uid, PodRecord(uid=pod.metadata.uid))
        return pod, container, record

    async def logs(self, request: node_pb2.LogsRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[
                       node_pb2.LogChunk]:
        try:
            self._authorize(context)
            pod, container, record = self._locate(request.namespace, request.pod,
                                                  request.container)
            pod_dir = pod_log_dir(self.log_root, pod.metadata.namespace, pod.metadata.name,
                                  pod.metadata.uid)
            files = container_logs(pod_dir, container)
            current = record.latest(container)
            if request.previous:
                before = [f for f in files if current is None or int(f.stem) < current.attempt]
                if not before:
                    raise errors.BadRequest(
                        f'previous terminated container "{container}" in pod '
                        f'"{pod.metadata.name}" not found')
                path, follow = before[-1], False
            else:
                if current is None or not files:
                    raise errors.BadRequest(
                        f'container "{container}" in pod "{pod.metadata.name}" is waiting '
                        "to start")
                path = next((f for f in files if int(f.stem) == current.attempt), files[-1])
                follow = request.follow
        except errors.ShoalError as e:
            await _abort(context, e)
            return
        tail = request.tail_lines if request.HasField("tail_lines") else None

        def stopped(cid: str = current.id if current else "") -> bool:
            rec = self.records().get(pod.metadata.uid)
            inst: ContainerRecord | None = next(
                (c for c in rec.containers if c.id == cid), None) if rec else None
            return inst is None or inst.state is not ContainerState.RUNNING

        async for text in read_logs(path, tail=tail, follow=follow,
                                    timestamps=request.timestamps, done=stopped):
            yield node_pb2.LogChunk(data=text.encode())

    async def exec(self, request: node_pb2.ExecRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> node_pb2.ExecResponse:
        try:
            self._authorize(context)
            if not request.command:
                raise errors.BadRequest("exec needs a command")
            pod, container, record = self._locate(request.namespace, request.pod,
                                                  request.container)
            inst = record.latest(container)
            if inst is None or inst.state is not ContainerState.RUNNING:
                raise errors.BadRequest(
                    f'container "{container}" in pod "{pod.metadata.name}" is not running')
            code, out, err = await self.runtime.exec_sync(
                inst.id, list(request.command), timeout=float(request.timeout_seconds or 60))
        except errors.ShoalError as e:
            await _abort(context, e)
            raise  # pragma: no cover - abort raises
        return node_pb2.ExecResponse(stdout=out, stderr=err, exit_code=code)
