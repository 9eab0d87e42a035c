"""The node agent's own gRPC API (port 10250): container logs, exec, image imports, usage.

Served with TLS using the node's serving certificate (from join); who may call
is :mod:`shoal.nodeaccess` (the apiserver's kubelet client or system:masters;
users come in through the apiserver's PodProxy, which authenticates them).

Logs are read from the runtime's log files (``nodeagent.logs``); ``follow``
streams until the container instance stops or the caller goes away.

``ImportImage`` loads an OCI archive into this node's containerd::

    chunks --> <import_dir>/import-*.tar (size capped) --> every blob checked
    against its digest, and the first chunk's image/digest, if given --> ``ctr
    images import`` (one import at a time) --> containerd lists the image at
    that digest --> result; the temp file is removed whatever happened

It is idempotent (the same archive again is a no-op that answers the same).
A stream naming another node is refused, so a misrouted import never lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from nodeagent.logs import container_logs, pod_log_dir, read_logs
from nodeagent.podruntime import PodRuntime
from nodeagent.runtimestate import ContainerRecord, ContainerState, PodRecord
from nodeagent.streaming import (
    ERROR,
    PF_DATA,
    PF_ERROR,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    ChannelSocket,
    StreamingRuntime,
    exit_status,
    resize_message,
)
from shoal import errors, images
from shoal.api.core.v1 import core_pb2
from shoal.api.metrics.v1beta1 import metrics_pb2
from shoal.api.node.v1 import node_pb2
from shoal.nodeaccess import abort, authorize

log = logging.getLogger(__name__)

SERVICE = "shoal.node.v1.NodeAgent"
IMPORT_PREFIX = "import-"
DEFAULT_MAX_IMPORT_BYTES = 4 << 30


class NodeAPI:
    """The handlers. ``containerd_address`` (the socket path) and ``import_dir``
    enable ``ImportImage``; without them it answers UNIMPLEMENTED."""

    def __init__(self, *, pod_by_name: Callable[[str, str], core_pb2.Pod | None],
                 records: Callable[[], dict[str, PodRecord]], runtime: PodRuntime,
                 log_root: Path, node_name: str = "", containerd_address: str = "",
                 import_dir: Path | None = None,
                 max_import_bytes: int = DEFAULT_MAX_IMPORT_BYTES,
                 streaming: StreamingRuntime | None = None,
                 usage: Callable[[], metrics_pb2.NodeStats | None] | None = None) -> None:
        self.usage = usage
        self.pod_by_name = pod_by_name
        self.records = records
        self.runtime = runtime
        self.log_root = log_root
        self.node_name = node_name
        self.containerd_address = containerd_address
        self.import_dir = import_dir
        self.max_import_bytes = max_import_bytes
        self.streaming = streaming
        self._import_lock = asyncio.Lock()

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
            "ImportImage": grpc.stream_unary_rpc_method_handler(
                self.import_image, request_deserializer=node_pb2.ImportChunk.FromString,
                response_serializer=ser),
            "ExecStream": grpc.stream_stream_rpc_method_handler(
                self.exec_stream, request_deserializer=node_pb2.ExecInput.FromString,
                response_serializer=ser),
            "PortForward": grpc.stream_stream_rpc_method_handler(
                self.port_forward, request_deserializer=node_pb2.PortForwardInput.FromString,
                response_serializer=ser),
            "Stats": grpc.unary_unary_rpc_method_handler(
                self.stats, request_deserializer=metrics_pb2.NodeStatsRequest.FromString,
                response_serializer=ser),
        })

    def _locate(self, namespace: str, name: str, container: str
                ) -> tuple[core_pb2.Pod, str, PodRecord]:
        pod = self.pod_by_name(namespace, name)
        if pod is None:
            raise errors.NotFound(f'pod "{name}" is not on this node')
        names = [c.name for c in pod.spec.containers] + \
            [c.name for c in pod.spec.init_containers] + \
            [c.name for c in pod.spec.ephemeral_containers]
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

    def _running(self, namespace: str, name: str, container: str) -> ContainerRecord:
        """The container's running instance, for exec and attach."""
        pod, container, record = self._locate(namespace, name, container)
        inst = record.latest(container)
        if inst is None or inst.state is not ContainerState.RUNNING:
            raise errors.BadRequest(
                f'container "{container}" in pod "{pod.metadata.name}" is not running')
        return inst

    async def logs(self, request: node_pb2.LogsRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[
                       node_pb2.LogChunk]:
        try:
            authorize(context)
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
            await abort(context, e)
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
            authorize(context)
            if not request.command:
                raise errors.BadRequest("exec needs a command")
            inst = self._running(request.namespace, request.pod, request.container)
            code, out, err = await self.runtime.exec_sync(
                inst.id, list(request.command), timeout=float(request.timeout_seconds or 60))
        except errors.ShoalError as e:
            await abort(context, e)
            raise  # pragma: no cover - abort raises
        return node_pb2.ExecResponse(stdout=out, stderr=err, exit_code=code)

    async def stats(self, request: metrics_pb2.NodeStatsRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> metrics_pb2.NodeStats:
        """The latest usage sample (``nodeagent.usage``)."""
        try:
            authorize(context)
            latest = self.usage() if self.usage is not None else None
            if latest is None:
                raise errors.Unavailable("no usage sampled yet on this node", retry_after=5.0)
        except errors.ShoalError as e:
            await abort(context, e)
            raise  # pragma: no cover - abort raises
        return latest

    # -- streams (interactive exec, port-forward) ----------------------------------

    def _streams(self) -> StreamingRuntime:
        if self.streaming is None:
            raise errors.MethodNotAllowed(
                "this node agent's runtime offers no streaming server")
        return self.streaming

    async def exec_stream(self, request_iterator: AsyncIterator[node_pb2.ExecInput],
                          context: grpc.aio.ServicerContext[Any, Any]
                          ) -> AsyncIterator[node_pb2.ExecOutput]:
        """stdin/resize in, stdout/stderr out, then the exit code; the caller
        going away closes the runtime's stream (the command gets a hangup)."""
        try:
            authorize(context)
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("input") != "start":
                raise errors.BadRequest("an exec stream must start with the command")
            start = first.start
            if not start.command and not start.attach:
                raise errors.BadRequest("exec needs a command")
            inst = self._running(start.namespace, start.pod, start.container)
            if start.attach:
                url = await self._streams().attach_url(inst.id, stdin=start.stdin,
                                                       tty=start.tty)
            else:
                url = await self._streams().exec_url(inst.id, list(start.command),
                                                     stdin=start.stdin, tty=start.tty)
            sock = await ChannelSocket.connect(url)
        except errors.ShoalError as e:
            await abort(context, e)
            return
        if start.tty and start.size.width and start.size.height:
            await sock.send(RESIZE, resize_message(start.size.width, start.size.height))

        async def forward_input() -> None:
            async for msg in request_iterator:
                kind = msg.WhichOneof("input")
                if kind == "stdin" and start.stdin:
                    await sock.send(STDIN, msg.stdin)
                elif kind == "resize" and start.tty:
                    await sock.send(RESIZE, resize_message(msg.resize.width, msg.resize.height))

        pump = asyncio.create_task(forward_input())
        status = b""
        try:
            while (message := await sock.recv()) is not None:
                channel, data = message
                if channel == STDOUT:
                    yield node_pb2.ExecOutput(stdout=data)
                elif channel == STDERR:
                    yield node_pb2.ExecOutput(stderr=data)
                elif channel == ERROR:
                    status += data
            ended = exit_status(status) if status else None
            if start.attach and (ended is None or not ended.message):
                return  # an attach carries no exit code: the container's status has it
            if ended is None:
                raise errors.Unavailable("the runtime ended the exec stream without an "
                                         "exit status", retry_after=1.0)
            if ended.message:
                yield node_pb2.ExecOutput(stderr=(ended.message + "\n").encode())
            yield node_pb2.ExecOutput(exit_code=ended.code)
        except errors.ShoalError as e:
            await abort(context, e)
        finally:
            pump.cancel()
            await sock.close()

    async def port_forward(self, request_iterator: AsyncIterator[node_pb2.PortForwardInput],
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[node_pb2.PortForwardOutput]:
        """One TCP connection to ``port`` inside the pod's network namespace
        (the runtime dials it from the sandbox): bytes both ways until the
        pod side closes or the caller goes away."""
        try:
            authorize(context)
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("input") != "start":
                raise errors.BadRequest("a port-forward stream must start with the port")
            start = first.start
            if not 0 < start.port < 65536:
                raise errors.BadRequest(f"port {start.port} is not a valid port number")
            pod = self.pod_by_name(start.namespace, start.pod)
            if pod is None:
                raise errors.NotFound(f'pod "{start.pod}" is not on this node')
            record = self.records().get(pod.metadata.uid)
            sandbox = record.sandbox if record else None
            if sandbox is None or not sandbox.ready:
                raise errors.BadRequest(f'pod "{start.pod}" has no running sandbox')
            url = await self._streams().port_forward_url(sandbox.id, start.port)
            sock = await ChannelSocket.connect(url, query=f"port={start.port}")
        except errors.ShoalError as e:
            await abort(context, e)
            return

        async def forward_input() -> None:
            async for msg in request_iterator:
                if msg.data:
                    await sock.send(PF_DATA, msg.data)

        pump = asyncio.create_task(forward_input())
        seen: set[int] = set()
        failure = b""
        try:
            while (message := await sock.recv()) is not None:
                channel, data = message
                if channel not in seen:  # each channel opens with the port (uint16 LE)
                    seen.add(channel)
                    data = data[2:]
                if channel == PF_DATA and data:
                    yield node_pb2.PortForwardOutput(data=data)
                elif channel == PF_ERROR:
                    failure += data
            if failure:
                raise errors.Unavailable(
                    f"port-forward to {start.pod}:{start.port}: "
                    f"{failure.decode('utf-8', 'replace').strip()}", retry_after=1.0)
        except errors.ShoalError as e:
            await abort(context, e)
        finally:
            pump.cancel()
            await sock.close()

    # -- image import -------------------------------------------------------------

    def remove_stale_imports(self) -> list[Path]:
        """Delete archives an earlier run left in ``import_dir`` (it crashed
        mid-import). Call before serving; returns what was removed."""
        if self.import_dir is None or not self.import_dir.is_dir():
            return []
        stale = sorted(self.import_dir.glob(f"{IMPORT_PREFIX}*"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    async def import_image(self, request_iterator: AsyncIterator[node_pb2.ImportChunk],
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> node_pb2.ImportResult:
        try:
            authorize(context)
            if not self.containerd_address or self.import_dir is None:
                raise errors.MethodNotAllowed(
                    "this node agent was started without a containerd socket for imports")
            return await self._import(request_iterator)
        except errors.ShoalError as e:
            await abort(context, e)
            raise  # pragma: no cover - abort raises

    async def _import(self, chunks: AsyncIterator[node_pb2.ImportChunk]
                      ) -> node_pb2.ImportResult:
        assert self.import_dir is not None
        fd, path = await asyncio.to_thread(_new_import_file, self.import_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                first, size = await self._receive(chunks, out)
            if first.size and size != first.size:
                raise errors.BadRequest(
                    f"the archive stream ended after {size} of {first.size} bytes")
            async with self._import_lock:
                image, digest = await asyncio.to_thread(self._load, path, first)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.info("imported image %s (%s, %d bytes)", image, digest, size)
        return node_pb2.ImportResult(node=self.node_name, image=image, digest=digest,
                                     size=size)

    async def _receive(self, chunks: AsyncIterator[node_pb2.ImportChunk], out: Any
                       ) -> tuple[node_pb2.ImportChunk, int]:
        first: node_pb2.ImportChunk | None = None
        size = 0
        async for chunk in chunks:
            if first is None:
                first = chunk
                if chunk.node and self.node_name and chunk.node != self.node_name:
                    raise errors.BadRequest(
                        f'this is node "{self.node_name}", not "{chunk.node}"')
                if chunk.size > self.max_import_bytes:
                    raise errors.RequestEntityTooLarge(
                        f"the archive ({chunk.size} bytes) is larger than this node "
                        f"accepts ({self.max_import_bytes} bytes)")
            size += len(chunk.data)
            if size > self.max_import_bytes:
                raise errors.RequestEntityTooLarge(
                    f"the archive is larger than this node accepts "
                    f"({self.max_import_bytes} bytes)")
            if chunk.data:
                await asyncio.to_thread(out.write, chunk.data)
        if first is None or size == 0:
            raise errors.BadRequest("the import stream carried no archive")
        return first, size

    def _load(self, path: Path, first: node_pb2.ImportChunk) -> tuple[str, str]:
        """Check the archive against what the first chunk expects, import it,
        and return (image name, manifest digest). Blocking."""
        archived = images.inspect_archive(path)
        named = [i for i in archived if i.name]
        if not named:
            raise errors.BadRequest("the archive names no image (index.json has no "
                                    f"{images.ANNOTATION_CONTAINERD_NAME} annotation)")
        chosen = named[0]
        if first.image:
            want = images.normalize_reference(first.image)
            match = [i for i in named if i.name == want]
            if not match:
                raise errors.BadRequest(
                    f"the archive holds {', '.join(i.name for i in named)}, not {want}")
            chosen = match[0]
        if first.digest and chosen.digest != first.digest:
            raise errors.BadRequest(
                f"the archive's {chosen.name} is {chosen.digest}, not {first.digest}")
        images.import_image(path, address=self.containerd_address)
        return chosen.name, chosen.digest


def _new_import_file(directory: Path) -> tuple[int, Path]:
    """An open, empty ``import-*.tar`` in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=IMPORT_PREFIX, suffix=".tar")
    return fd, Path(name)
