"""The Shoal SDK: typed access to the resource API over gRPC with mutual TLS.

    import shoal
    from shoal.api.core.v1.core_pb2 import Pod

    with shoal.Client.from_config() as c:           # $SHOAL_CONFIG or ~/.shoal/config
        pod = c.get(Pod, "web-0", namespace="default")
        for ev in c.watch(Pod, resource_version=pod.metadata.resource_version):
            print(ev.type, ev.object.metadata.name)

``AsyncClient`` is the asyncio client; ``Client`` runs one on a private event
loop thread and offers the same methods synchronously.

Errors are ``shoal.errors`` classes (``NotFound``, ``Conflict``, ``Invalid`` with
field causes, ``Expired``, ``Unavailable``...), never a raw gRPC error. Calls are
retried by gRPC itself only on ``UNAVAILABLE`` (the service config below);
watches resume by themselves from the last resourceVersion they saw, and raise
``Expired`` when that version is gone (relist then; the Informer does).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import json
import logging
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from shoal import config as configmod
from shoal import errors
from shoal.api.authentication.v1 import tokens_pb2
from shoal.api.mesh.v1 import mesh_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.api.metrics.v1beta1 import metrics_pb2
from shoal.api.node.v1 import node_pb2
from shoal.api.resources.v1 import resources_pb2 as pb
from shoal.backoff import Backoff
from shoal.config import ClientConfig
from shoal.failover import Failover
from shoal.kinds import Kind, KindTable, builtin_kinds

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Message)
SERVICE = "shoal.resources.v1.Resources"
STATUS_TRAILER = "shoal-status-bin"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
IMPORT_CHUNK_BYTES = 1 << 20
# Times a rate-limited call is sent again (each after the server's retry-after).
MAX_THROTTLE_RETRIES = 10
EVENT_NAMES = {pb.ADDED: "ADDED", pb.MODIFIED: "MODIFIED", pb.DELETED: "DELETED",
               pb.BOOKMARK: "BOOKMARK"}



def _service_config(*, attempts: int) -> str:
    """gRPC's own retries of ``UNAVAILABLE`` on one server. With one server it
    tries 5 times over about 1.5 s; with several, twice (a blip), then the
    failover moves to the next server rather than waiting on this one."""
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    })


_CODE_ERRORS: dict[grpc.StatusCode, type[errors.ShoalError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.ABORTED: errors.Conflict,
    grpc.StatusCode.INVALID_ARGUMENT: errors.BadRequest,
    grpc.StatusCode.OUT_OF_RANGE: errors.Expired,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: errors.Forbidden,
    grpc.StatusCode.UNIMPLEMENTED: errors.MethodNotAllowed,
}


def classify(e: grpc.aio.AioRpcError | grpc.RpcError) -> errors.ShoalError:
    """The Shoal error a failed call stands for (the boundary: nothing above sees gRPC)."""
    trailers: Any = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == STATUS_TRAILER and isinstance(value, bytes):
            status = meta_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:
                break
            return errors.from_status(status)
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else "") or str(code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        return errors.Unavailable(f"apiserver unavailable: {details}", retry_after=1.0)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "larger than max" in details or "message" in details.lower():
            return errors.RequestEntityTooLarge(f"request refused: {details}")
        return errors.TooManyRequests(details, retry_after=1.0)
    cls = _CODE_ERRORS.get(code, errors.InternalError)
    return cls(details)


def _retry_after(e: grpc.aio.AioRpcError) -> float | None:
    """Seconds the server asks to wait before sending the same call again: set
    only when it refused the call for the rate limit (nothing was done)."""
    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    if not isinstance(classify(e), errors.TooManyRequests):
        return None  # e.g. RequestEntityTooLarge: sending it again cannot help
    trailers: Any = e.trailing_metadata()
    for key, value in trailers or ():
        if key == "retry-after":
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                return max(0.0, float(text))
            except ValueError:
                return 1.0
    return 1.0


@dataclass(frozen=True)
class WatchEvent(Generic[T]):
    """``type`` is ADDED, MODIFIED, DELETED or BOOKMARK (object is None then)."""

    type: str
    object: T | None
    resource_version: str


@dataclass(frozen=True)
class ObjectList(Generic[T]):
    items: list[T]
    resource_version: str
    continue_token: str = ""
    remaining_item_count: int | None = None


class _BearerToken(grpc.AuthMetadataPlugin):
    """``authorization: Bearer <token>`` on every call; a token file is re-read
    when it changes (the node agent rotates it before it expires)."""

    def __init__(self, *, token: str = "", path: str = "") -> None:
        self.token = token
        self.path = path
        self._stamp: tuple[int, int] = (0, 0)

    def _current(self) -> str:
        if not self.path:
            return self.token
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                with open(self.path) as f:
                    self.token = f.read().strip()
                self._stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            pass  # keep the last token read: it may still be valid
        return self.token

    def __call__(self, context: grpc.AuthMetadataContext,
                 callback: grpc.AuthMetadataPluginCallback) -> None:
        token = self._current()
        callback(((("authorization", f"Bearer {token}"),) if token else ()), None)


def _credentials(cfg: ClientConfig) -> grpc.ChannelCredentials:
    if not (cfg.token or cfg.token_file):
        return grpc.ssl_channel_credentials(
            root_certificates=cfg.ca_pem, private_key=cfg.key_pem,
            certificate_chain=cfg.cert_pem)
    tls = grpc.ssl_channel_credentials(
        root_certificates=cfg.ca_pem, private_key=cfg.key_pem or None,
        certificate_chain=cfg.cert_pem or None)
    bearer = grpc.metadata_call_credentials(
        _BearerToken(token=cfg.token, path=cfg.token_file), name="bearer")
    return grpc.composite_channel_credentials(tls, bearer)


def _channel(cfg: ClientConfig, server: str) -> grpc.aio.Channel:
    creds = _credentials(cfg)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(attempts=5 if len(cfg.servers) == 1 else 2)),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A server that comes back is seen within 2 s (gRPC's default waits up to
        # 120 s between reconnects, failing calls fast meanwhile).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if cfg.tls_server_name:
        options.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
    return grpc.aio.secure_channel(server, creds, options=options)


class AsyncClient:
    """asyncio client for the resource API. Use ``async with`` or call ``close()``."""

    def __init__(self, config: ClientConfig, *, kinds: KindTable | None = None,
                 timeout: float = 30.0) -> None:
        self.config = config
        self.kinds = kinds or builtin_kinds()
        self.timeout = timeout
        self.namespace = config.namespace or "default"
        # One channel per apiserver of the config; calls go to the failover's
        # current one and move on when it is unavailable (shoal.failover).
        self.failover = Failover(tuple(config.servers))
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kw: Any) -> AsyncClient:
        return cls(configmod.load(path), **kw)

    @property
    def server(self) -> str:
        """The apiserver calls go to now."""
        return self.failover.current()

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the current apiserver (streams use it as they start)."""
        return self._channel_to(self.failover.current())

    def _channel_to(self, server: str) -> grpc.aio.Channel:
        channel = self._channels.get(server)
        if channel is None:
            channel = self._channels[server] = _channel(self.config, server)
        return channel

    def use_credentials(self, config: ClientConfig) -> None:
        """Switch to renewed credentials (certificate rotation): new calls and
        streams open channels with them. Channels already open keep serving
        the calls and watches on them (TLS authenticated them at connect) and
        are closed with the client."""
        self._retired.extend(self._channels.values())
        self._channels = {}
        self.config = replace(config, namespace=self.config.namespace)

    async def close(self) -> None:
        channels, self._channels = [*self._retired, *self._channels.values()], {}
        self._retired = []
        for channel in channels:
            await channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------

    def kind_of(self, kind: type[Message] | Kind | Message) -> Kind:
        if isinstance(kind, Kind):
            return kind
        if isinstance(kind, Message):
            return self.kinds.by_message(kind)
        return self.kinds.by_type(kind.DESCRIPTOR.full_name)

    async def _call(self, method: str, request: Message, response_type: type[Message],
                    timeout: float | None = None) -> Any:
        """One unary call. On ``UNAVAILABLE`` (connection lost or refused, or the
        server is going away) it is tried on each other apiserver of the config,
        in failover order, for up to three rounds (the failover's back-off
        between rounds); any other answer is final."""
        tries = 1 if len(self.failover.servers) == 1 else 3 * len(self.failover.servers)
        for attempt in range(tries):
            server = self.failover.current()
            wait = self.failover.delay()
            if wait:
                await asyncio.sleep(wait)
            rpc = self._channel_to(server).unary_unary(
                f"/{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString)
            try:
                response = await self._throttled(rpc, request, timeout or self.timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == tries - 1:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        self.failover.failed(server)
                    raise classify(e) from e
                moved = self.failover.failed(server)
                log.info("%s via %s: unavailable (%s); trying %s", method, server,
                         e.details(), moved)
                continue
            self.failover.succeeded(server)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _throttled(self, rpc: Any, request: Message, timeout: float) -> Any:
        """One call, waiting out the apiserver's rate limit: a call refused with
        ``TooManyRequests`` did nothing, so it is sent again after the server's
        ``retry-after``, as long as that fits in the call's timeout (client-go
        does the same with HTTP 429). Then the ``TooManyRequests`` is raised,
        naming the limit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(MAX_THROTTLE_RETRIES):
            try:
                return await rpc(request, timeout=max(0.001, deadline - loop.time()))
            except grpc.aio.AioRpcError as e:
                wait = _retry_after(e)
                if wait is None or loop.time() + wait >= deadline:
                    raise
                log.info("apiserver rate limit: %s; retrying in %gs", e.details(), wait)
                await asyncio.sleep(wait)
        return await rpc(request, timeout=max(0.001, deadline - loop.time()))

    async def _unary(self, path: str, request: Message, parse: Callable[[bytes], Any],
                     timeout: float) -> Any:
        """One unary call on the current channel to a service other than
        Resources (no failover, no rate-limit retries); errors are Shoal's."""
        rpc = self.channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=parse)
        try:
            return await rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e

    def _unpack(self, packed: any_pb2.Any) -> Any:
        kind = self.kinds.by_type_url(packed.type_url)
        obj = kind.new()
        obj.ParseFromString(packed.value)
        return obj

    def _pack(self, obj: Message) -> any_pb2.Any:
        kind = self.kind_of(obj)
        meta = obj.metadata  # type: ignore[attr-defined]
        if kind.namespaced and not meta.namespace:
            copy = type(obj)()
            copy.CopyFrom(obj)
            copy.metadata.namespace = self.namespace  # type: ignore[attr-defined]
            obj = copy
        return any_pb2.Any(type_url=kind.type_url, value=obj.SerializeToString())

    def _ns(self, kind: Kind, namespace: str | None) -> str:
        if not kind.namespaced:
            return ""
        return self.namespace if namespace is None else namespace

    # -- the API ----------------------------------------------------------------

    async def create(self, obj: T, *, dry_run: bool = False) -> T:
        """Create ``obj`` (namespace defaults to the client's). Returns what was stored."""
        resp = await self._call("Create", pb.CreateRequest(object=self._pack(obj),
                                                           dry_run=dry_run), pb.ObjectResponse)
        return cast(T, self._unpack(resp.object))

    async def get(self, kind: type[T], name: str, *, namespace: str | None = None) -> T:
        k = self.kind_of(kind)
        resp = await self._call("Get", pb.GetRequest(
            group=k.group, resource=k.resource, namespace=self._ns(k, namespace), name=name),
            pb.ObjectResponse)
        return cast(T, self._unpack(resp.object))

    async def list(
        self,
        kind: type[T],
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = 0,
        continue_token: str = "",
        resource_version: str = "",
    ) -> ObjectList[T]:
        """One list call; with ``limit``, one page (pass ``continue_token`` on)."""
        k = self.kind_of(kind)
        req = pb.ListRequest(
            group=k.group, resource=k.resource,
            namespace="" if all_namespaces else self._ns(k, namespace),
            label_selector=label_selector, field_selector=field_selector, limit=limit,
            resource_version=resource_version)
        setattr(req, "continue", continue_token)
        resp = await self._call("List", req, pb.ListResponse, timeout=max(self.timeout, 120))
        return ObjectList(
            items=[cast(T, self._unpack(a)) for a in resp.items],
            resource_version=resp.resource_version,
            continue_token=getattr(resp, "continue"),
            remaining_item_count=(resp.remaining_item_count
                                  if resp.HasField("remaining_item_count") else None))

    async def list_all(self, kind: type[T], *, page_size: int = 500, **kw: Any) -> ObjectList[T]:
        """Every page of a list, read at one revision."""
        items: list[T] = []
        token = ""
        while True:
            page = await self.list(kind, limit=page_size, continue_token=token, **kw)
            items.extend(page.items)
            token = page.continue_token
            if not token:
                return ObjectList(items=items, resource_version=page.resource_version)

    async def update(self, obj: T, *, dry_run: bool = False) -> T:
        """Replace everything but status. A set resourceVersion must be current."""
        resp = await self._call("Update", pb.UpdateRequest(object=self._pack(obj),
                                                           dry_run=dry_run), pb.ObjectResponse)
        return cast(T, self._unpack(resp.object))

    async def update_status(self, obj: T, *, dry_run: bool = False) -> T:
        """Replace status only."""
        resp = await self._call("UpdateStatus", pb.UpdateRequest(
            object=self._pack(obj), dry_run=dry_run), pb.ObjectResponse)
        return cast(T, self._unpack(resp.object))

    async def delete(
        self,
        kind: type[T],
        name: str,
        *,
        namespace: str | None = None,
        grace_period: int | None = None,
        propagation_policy: str = "",
        uid: str = "",
        resource_version: str = "",
        dry_run: bool = False,
    ) -> T:
        """Delete (or, with finalizers, mark for deletion). Returns the object."""
        k = self.kind_of(kind)
        req = pb.DeleteRequest(
            group=k.group, resource=k.resource, namespace=self._ns(k, namespace), name=name,
            preconditions=pb.Preconditions(uid=uid, resource_version=resource_version),
            propagation_policy=propagation_policy, dry_run=dry_run)
        if grace_period is not None:
            req.grace_period_seconds = grace_period
        resp = await self._call("Delete", req, pb.ObjectResponse)
        return cast(T, self._unpack(resp.object))

    async def logs(
        self,
        pod: str,
        *,
        namespace: str | None = None,
        container: str = "",
        follow: bool = False,
        tail: int | None = None,
        previous: bool = False,
        timestamps: bool = False,
    ) -> AsyncGenerator[bytes, None]:
        """A container's log, chunk by chunk (through the apiserver to the node)."""
        req = node_pb2.LogsRequest(
            namespace=self.namespace if namespace is None else namespace, pod=pod,
            container=container, follow=follow, previous=previous, timestamps=timestamps)
        if tail is not None:
            req.tail_lines = tail
        rpc = self.channel.unary_stream(
            "/shoal.resources.v1.PodProxy/Logs",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=node_pb2.LogChunk.FromString)
        call = rpc(req)
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e
        finally:
            call.cancel()

    async def exec(self, pod: str, command: builtins.list[str], *,
                   namespace: str | None = None, container: str = "",
                   timeout: int = 60) -> node_pb2.ExecResponse:
        """Run ``command`` in a running container; stdout, stderr and exit code."""
        req = node_pb2.ExecRequest(namespace=self.namespace if namespace is None else namespace,
                                   pod=pod, container=container, command=command,
                                   timeout_seconds=timeout)
        return cast(node_pb2.ExecResponse, await self._unary(
            "/shoal.resources.v1.PodProxy/Exec", req, node_pb2.ExecResponse.FromString,
            timeout + 15))

    def exec_stream(self, start: node_pb2.ExecStart) -> Duplex:
        """An interactive command: write ExecInput (stdin, resize), read
        ExecOutput until the exit code. ``start.namespace`` defaults to ours."""
        if not start.namespace:
            start.namespace = self.namespace
        return self._duplex("ExecStream", node_pb2.ExecInput(start=start),
                            node_pb2.ExecOutput.FromString)

    def port_forward(self, start: node_pb2.PortForwardStart) -> Duplex:
        """One TCP connection to a port in a pod: write PortForwardInput(data),
        read PortForwardOutput until the pod side closes."""
        if not start.namespace:
            start.namespace = self.namespace
        return self._duplex("PortForward", node_pb2.PortForwardInput(start=start),
                            node_pb2.PortForwardOutput.FromString)

    async def add_ephemeral_container(self, pod: str, container: Any, *,
                                      namespace: str | None = None) -> Any:
        """Add an EphemeralContainer to a running pod (pods/ephemeralcontainers);
        returns the pod. Its node agent starts the container."""
        from shoal.api.resources.v1 import podproxy_pb2

        req = podproxy_pb2.EphemeralContainerRequest(
            namespace=self.namespace if namespace is None else namespace, pod=pod,
            container=container)
        return await self._unary("/shoal.resources.v1.PodProxy/AddEphemeralContainer", req,
                                 self.kinds.by_resource("", "pods").message.FromString,
                                 self.timeout)

    def _duplex(self, method: str, first: Any, parse: Callable[[bytes], Any]) -> Duplex:
        rpc = self.channel.stream_stream(
            f"/shoal.resources.v1.PodProxy/{method}",
            request_serializer=lambda m: m.SerializeToString(), response_deserializer=parse)
        return Duplex(rpc(), first)  # type: ignore[call-arg]

    async def import_image(self, node: str, archive: Path, *, image: str = "",
                           digest: str = "", timeout: float | None = 600.0,
                           chunk_size: int = IMPORT_CHUNK_BYTES) -> node_pb2.ImportResult:
        """Load an OCI image archive into ``node``'s containerd, through the
        apiserver to the node agent. ``image`` and ``digest``, when given, are
        what the node must find in the archive (it refuses anything else).
        Idempotent. Returns the image name and manifest digest the node has.
        An unreadable archive is an ``OSError``, raised before anything is sent."""
        size = (await asyncio.to_thread(archive.stat)).st_size

        async def chunks() -> AsyncIterator[node_pb2.ImportChunk]:
            f = await asyncio.to_thread(archive.open, "rb")
            try:
                data = await asyncio.to_thread(f.read, chunk_size)
                yield node_pb2.ImportChunk(node=node, image=image, digest=digest, size=size,
                                           data=data)
                while data := await asyncio.to_thread(f.read, chunk_size):
                    yield node_pb2.ImportChunk(data=data)
            finally:
                f.close()

        rpc = self.channel.stream_unary(
            "/shoal.resources.v1.PodProxy/ImportImage",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=node_pb2.ImportResult.FromString)
        try:
            return cast(node_pb2.ImportResult, await rpc(chunks(), timeout=timeout))
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e

    async def create_token(self, service_account: str, *, namespace: str | None = None,
                           audiences: builtins.list[str] | None = None,
                           expiration_seconds: int = 0, pod: str = "", pod_uid: str = "",
                           ) -> tokens_pb2.TokenResponse:
        """A service-account token (Kubernetes' TokenRequest), bound to ``pod`` when
        given. Admins may ask for any; a node only for pods it runs."""
        ref = tokens_pb2.BoundObjectReference(kind="Pod", name=pod, uid=pod_uid) if pod \
            else None
        req = tokens_pb2.TokenRequest(
            namespace=self.namespace if namespace is None else namespace,
            service_account=service_account, audiences=audiences or [],
            expiration_seconds=expiration_seconds, bound_object_ref=ref)
        return cast(tokens_pb2.TokenResponse, await self._unary(
            "/shoal.authentication.v1.ServiceAccountTokens/CreateToken", req,
            tokens_pb2.TokenResponse.FromString, self.timeout))

    async def mesh_status(self, *, node: str = "",
                          query: mesh_pb2.StatusRequest | None = None,
                          timeout: float | None = None) -> mesh_pb2.MeshStatusResponse:
        """Each node's meshagent status (one node with ``node``), through the
        apiserver; an agent that cannot be reached has ``error`` set on its entry."""
        req = mesh_pb2.MeshStatusRequest(node=node, query=query or mesh_pb2.StatusRequest())
        return cast(mesh_pb2.MeshStatusResponse, await self._unary(
            "/shoal.mesh.v1.MeshProxy/MeshStatus", req,
            mesh_pb2.MeshStatusResponse.FromString, timeout or self.timeout))

    async def node_metrics(self, *, name: str = "", label_selector: str = ""
                           ) -> metrics_pb2.NodeMetricsList:
        """Nodes' recent CPU and memory use (the metrics API)."""
        req = metrics_pb2.ListMetricsRequest(name=name, label_selector=label_selector)
        return cast(metrics_pb2.NodeMetricsList, await self._unary(
            "/shoal.metrics.v1beta1.Metrics/ListNodeMetrics", req,
            metrics_pb2.NodeMetricsList.FromString, self.timeout))

    async def pod_metrics(self, *, namespace: str | None = None, name: str = "",
                          label_selector: str = "") -> metrics_pb2.PodMetricsList:
        """Pods' recent CPU and memory use (the metrics API); ``namespace=""``: all."""
        req = metrics_pb2.ListMetricsRequest(
            namespace=self.namespace if namespace is None else namespace, name=name,
            label_selector=label_selector)
        return cast(metrics_pb2.PodMetricsList, await self._unary(
            "/shoal.metrics.v1beta1.Metrics/ListPodMetrics", req,
            metrics_pb2.PodMetricsList.FromString, self.timeout))

    async def discover(self) -> builtins.list[pb.APIResource]:
        resp = await self._call("Discover", pb.DiscoverRequest(), pb.DiscoverResponse)
        return list(resp.resources)

    async def version(self) -> pb.VersionResponse:
        return cast(pb.VersionResponse,
                    await self._call("Version", pb.VersionRequest(), pb.VersionResponse))

    async def watch(
        self,
        kind: type[T],
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
        label_selector: str = "",
        field_selector: str = "",
        resource_version: str = "",
        bookmarks: bool = False,
    ) -> AsyncGenerator[WatchEvent[T], None]:
        """Changes to matching objects after ``resource_version``.

        ``""`` first yields every current object as ADDED. The stream survives
        server restarts and network failures: it reconnects with back-off and
        resumes after the last version it yielded (or the last bookmark).
        Raises ``Expired`` when that version has left the server's history. A
        start refused by the rate limit is tried again after its retry-after.
        BOOKMARK events are yielded only when ``bookmarks`` is set.
        """
        k = self.kind_of(kind)
        rv = resource_version
        backoff = Backoff(base=0.1, cap=5.0)
        while True:
            server = self.failover.current()
            rpc = self._channel_to(server).unary_stream(
                f"/{SERVICE}/Watch", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.WatchEvent.FromString)
            req = pb.WatchRequest(
                group=k.group, resource=k.resource,
                namespace="" if all_namespaces else self._ns(k, namespace),
                label_selector=label_selector, field_selector=field_selector,
                resource_version=rv, allow_bookmarks=True)
            call = rpc(req)
            try:
                async for ev in call:
                    backoff.reset()
                    self.failover.succeeded(server)
                    if ev.resource_version:
                        rv = ev.resource_version
                    if ev.type == pb.BOOKMARK:
                        if bookmarks:
                            yield WatchEvent("BOOKMARK", None, ev.resource_version)
                        continue
                    obj = cast(T, self._unpack(ev.object))
                    yield WatchEvent(EVENT_NAMES.get(ev.type, "UNKNOWN"), obj,
                                     ev.resource_version)
            except grpc.aio.AioRpcError as e:
                err = classify(e)
                if isinstance(err, errors.TooManyRequests):
                    # Rate limited as it (re)started: resume after the retry-after.
                    delay = max(err.retry_after, backoff.next())
                    log.info("watch %s: %s; resuming in %.2fs", k.resource, err, delay)
                    await asyncio.sleep(delay)
                    continue
                if not isinstance(err, errors.Unavailable):
                    raise err from e
                if len(self.failover.servers) > 1:
                    # Resume on the next apiserver: they share etcd's revisions, and
                    # each watch cache replays its history window from there.
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        self.failover.failed(server)
                    delay = self.failover.delay() if e.code() == grpc.StatusCode.UNAVAILABLE \
                        else backoff.next()
                else:
                    delay = backoff.next()
                log.debug("watch %s via %s: %s; resuming from %s via %s in %.2fs", k.resource,
                          server, err, rv, self.failover.current(), delay)
                await asyncio.sleep(delay)
            finally:
                call.cancel()


E = TypeVar("E")


class Client:
    """Synchronous facade over :class:`AsyncClient`, on a private loop thread."""

    def __init__(self, config: ClientConfig, *, kinds: KindTable | None = None,
                 timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shoal-client",
                                        daemon=True)
        self._thread.start()
        self.aio = AsyncClient(config, kinds=kinds, timeout=timeout)
        self.kinds = self.aio.kinds
        self.config = config

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kw: Any) -> Client:
        return cls(configmod.load(path), **kw)

    @classmethod
    def in_cluster(cls, **kw: Any) -> Client:
        """From inside a pod: its mounted service-account token (see config.in_cluster)."""
        return cls(configmod.in_cluster(), **kw)

    @property
    def namespace(self) -> str:
        return self.aio.namespace

    @namespace.setter
    def namespace(self, value: str) -> None:
        self.aio.namespace = value

    def _run(self, coro: Coroutine[Any, Any, E]) -> E:
        fut: concurrent.futures.Future[E] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.aio.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, obj: T, *, dry_run: bool = False) -> T:
        return self._run(self.aio.create(obj, dry_run=dry_run))

    def get(self, kind: type[T], name: str, *, namespace: str | None = None) -> T:
        return self._run(self.aio.get(kind, name, namespace=namespace))

    def list(self, kind: type[T], **kw: Any) -> ObjectList[T]:
        return self._run(self.aio.list(kind, **kw))

    def list_all(self, kind: type[T], **kw: Any) -> ObjectList[T]:
        return self._run(self.aio.list_all(kind, **kw))

    def update(self, obj: T, *, dry_run: bool = False) -> T:
        return self._run(self.aio.update(obj, dry_run=dry_run))

    def update_status(self, obj: T, *, dry_run: bool = False) -> T:
        return self._run(self.aio.update_status(obj, dry_run=dry_run))

    def delete(self, kind: type[T], name: str, **kw: Any) -> T:
        return self._run(self.aio.delete(kind, name, **kw))

    def import_image(self, node: str, archive: Path, **kw: Any) -> node_pb2.ImportResult:
        return self._run(self.aio.import_image(node, archive, **kw))

    def create_token(self, service_account: str, **kw: Any) -> tokens_pb2.TokenResponse:
        return self._run(self.aio.create_token(service_account, **kw))

    def mesh_status(self, **kw: Any) -> mesh_pb2.MeshStatusResponse:
        return self._run(self.aio.mesh_status(**kw))

    def node_metrics(self, **kw: Any) -> metrics_pb2.NodeMetricsList:
        return self._run(self.aio.node_metrics(**kw))

    def pod_metrics(self, **kw: Any) -> metrics_pb2.PodMetricsList:
        return self._run(self.aio.pod_metrics(**kw))

    def discover(self) -> builtins.list[pb.APIResource]:
        return self._run(self.aio.discover())

    def version(self) -> pb.VersionResponse:
        return self._run(self.aio.version())

    def watch(self, kind: type[T], **kw: Any) -> Iterator[WatchEvent[T]]:
        """Blocking iterator over :meth:`AsyncClient.watch`; close it to stop."""
        agen = self.aio.watch(kind, **kw)
        try:
            while True:
                try:
                    yield self._run(_next(agen))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():
                self._run(agen.aclose())


async def _next(agen: AsyncGenerator[E, None]) -> E:
    return await agen.__anext__()


class Duplex:
    """A bidirectional stream: ``open`` sends the start, then ``write``
    messages (one writer at a time) and ``read`` them (None at the end);
    ``done_writing`` half-closes, ``cancel`` ends it. Errors are Shoal's."""

    def __init__(self, call: Any, first: Any) -> None:
        self.call = call
        self.first = first

    async def open(self) -> None:
        await self.write(self.first)

    async def write(self, message: Any) -> None:
        try:
            await self.call.write(message)
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e

    async def done_writing(self) -> None:
        try:
            await self.call.done_writing()
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e

    async def read(self) -> Any | None:
        try:
            message = await self.call.read()
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e
        return None if message is grpc.aio.EOF else message  # type: ignore[attr-defined]

    def cancel(self) -> None:
        self.call.cancel()
