"""The nodeagent's one boundary to the container runtime: CRI over a unix socket.

``RuntimeClient`` speaks Kubernetes' CRI (``runtime.v1``, declared in
``proto/shoal/api/cri/v1/api.proto``) to containerd, one typed method per RPC
the agent needs. ``Runtime`` is the Protocol the rest of the nodeagent codes
against; ``shoal.testing.fakecri.FakeRuntime`` implements it in memory.

Errors are classified here, once, into ``shoal.errors``; nothing above this
module sees a ``grpc.StatusCode``:

    NOT_FOUND ................................ NotFound
    INVALID_ARGUMENT ......................... BadRequest
    ALREADY_EXISTS ........................... AlreadyExists
    UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED,
    or no connection at all .................. Unavailable(retry_after)
    UNKNOWN, INTERNAL and everything else .... InternalError, with the runtime's
                                               message verbatim (it ends up in the
                                               pod's status, e.g. ``exec: "nosuch":
                                               executable file not found in $PATH``)

Contract:

- Every call has a deadline: ``timeout`` (default 10 s). ``pull_image`` has its
  own ``pull_timeout``; ``stop_container`` and ``exec_sync`` add their own
  grace/command timeout on top of ``timeout``.
- Retries: gRPC itself retries ``UNAVAILABLE`` a few times (the channel's
  service config), which covers a runtime that is restarting. Nothing else is
  retried here; the pod worker's per-pod back-off decides when to try again.
- Stopping or removing a sandbox or container that the runtime does not know
  succeeds (``NotFound`` is swallowed), as the kubelet does: stop and remove
  are idempotent, so a worker may repeat them after a crash.
- Times in returned messages are CRI's: int64 nanoseconds since the epoch.

Lifecycle::

    RuntimeClient(address) --first call--> connected --close()--> closed
                               ^    | runtime restarts: calls raise Unavailable
                               +----+ until the channel reconnects by itself
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import grpc
from google.protobuf.message import Message

from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri

CRI_VERSION = "v1"
RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"
DEFAULT_TIMEOUT = 10.0
DEFAULT_PULL_TIMEOUT = 300.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# An exec without a time limit still gets a deadline, just a distant one.
_UNLIMITED_EXEC_DEADLINE = 24 * 3600.0

# Condition types in StatusResponse.status.conditions.
RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"

R = TypeVar("R", bound=Message)

_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": RUNTIME_SERVICE}, {"service": IMAGE_SERVICE}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.1s",
            "maxBackoff": "0.5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})

_CODE_ERRORS: dict[grpc.StatusCode, type[errors.ShoalError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: errors.BadRequest,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
}
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.CANCELLED)


def classify(code: grpc.StatusCode, details: str, *, retry_after: float = 1.0
             ) -> errors.ShoalError:
    """The Shoal error a failed CRI call stands for. Pure; see the module table."""
    details = details or code.name
    if code in _UNAVAILABLE_CODES:
        return errors.Unavailable(f"container runtime unavailable: {details}",
                                  retry_after=retry_after)
    cls = _CODE_ERRORS.get(code, errors.InternalError)
    return cls(details)


@dataclass(frozen=True)
class ExecResult:
    """What a command run by ``exec_sync`` produced."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def output(self) -> str:
        """stdout then stderr, decoded leniently (for probe messages and the CLI)."""
        return (self.stdout + self.stderr).decode("utf-8", "replace")


def runtime_ready(status: cri.RuntimeStatus) -> tuple[bool, bool, str]:
    """(runtime ready, network ready, message naming whatever is not ready)."""
    conds = {c.type: c for c in status.conditions}
    problems = []
    flags = []
    for kind in (RUNTIME_READY, NETWORK_READY):
        c = conds.get(kind)
        ok = c is not None and c.status
        flags.append(ok)
        if not ok:
            why = f"{c.reason}: {c.message}" if c is not None else "not reported"
            problems.append(f"{kind}=false ({why})")
    return flags[0], flags[1], "; ".join(problems)


class Runtime(Protocol):
    """What the nodeagent may ask of a container runtime. Every method raises
    only ``shoal.errors`` (see the module docstring for which)."""

    async def version(self) -> cri.VersionResponse:
        """Runtime name and version; cheap, answers as soon as the socket does."""

    async def status(self) -> cri.RuntimeStatus:
        """RuntimeReady and NetworkReady conditions (see ``runtime_ready``)."""

    async def wait_ready(self, timeout: float) -> cri.VersionResponse:
        """Return once the runtime answers and reports RuntimeReady; raise
        ``Unavailable`` after ``timeout`` seconds. NetworkReady is not awaited:
        the agent writes the CNI config only after it learns its pod CIDR."""

    async def run_pod_sandbox(self, config: cri.PodSandboxConfig, *,
                              runtime_handler: str = "") -> str:
        """Create and start a sandbox; returns its ID."""

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        """Kill the sandbox's containers and tear down its network. Idempotent."""

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        """Delete the sandbox and its containers. Idempotent."""

    async def pod_sandbox_status(self, sandbox_id: str) -> cri.PodSandboxStatus: ...

    async def list_pod_sandbox(self, *, labels: Mapping[str, str] | None = None,
                               state: cri.PodSandboxState | None = None,
                               sandbox_id: str = "") -> list[cri.PodSandbox]: ...

    async def create_container(self, sandbox_id: str, config: cri.ContainerConfig, *,
                               sandbox_config: cri.PodSandboxConfig) -> str:
        """Create (not start) a container in the sandbox; returns its ID."""

    async def start_container(self, container_id: str) -> None:
        """Start a created container. A bad command fails here, with the
        runtime's message in an ``InternalError``."""

    async def stop_container(self, container_id: str, grace_seconds: float) -> None:
        """Stop signal, then SIGKILL after ``grace_seconds``. Idempotent."""

    async def remove_container(self, container_id: str) -> None:
        """Delete the container (the runtime kills it first if needed). Idempotent."""

    async def list_containers(self, *, sandbox_id: str = "",
                              labels: Mapping[str, str] | None = None,
                              state: cri.ContainerState | None = None,
                              container_id: str = "") -> list[cri.Container]: ...

    async def container_status(self, container_id: str) -> cri.ContainerStatus: ...

    async def exec_sync(self, container_id: str, cmd: Sequence[str], *,
                        timeout: float) -> ExecResult:
        """Run ``cmd`` in the running container; the runtime kills it after
        ``timeout`` seconds (0: no limit)."""

    async def container_stats(self, container_id: str) -> cri.ContainerStats: ...

    async def list_container_stats(self, *, sandbox_id: str = "",
                                   labels: Mapping[str, str] | None = None
                                   ) -> list[cri.ContainerStats]: ...

    async def list_images(self) -> list[cri.Image]: ...

    async def image_status(self, image: str) -> cri.Image | None:
        """The image, or None when it is not present."""

    async def pull_image(self, image: str, *,
                         sandbox_config: cri.PodSandboxConfig | None = None,
                         auth: cri.AuthConfig | None = None) -> str:
        """Pull ``image``; returns its image reference (ID). A registry's
        refusal is an ``InternalError`` or ``NotFound`` carrying its message."""

    async def remove_image(self, image: str) -> None:
        """Remove the image. Idempotent."""

    async def image_fs_info(self) -> list[cri.FilesystemUsage]: ...


def _target(address: str) -> str:
    if address.startswith("unix:"):
        return address
    return "unix://" + address


def _seconds(value: float) -> int:
    """CRI takes whole seconds; never round a real grace period down to zero."""
    return max(0, math.ceil(value))


class RuntimeClient:
    """A CRI client on ``address`` (a socket path or ``unix:///path``).

    Use ``async with`` or call ``close()``. Safe to share between tasks: calls
    multiplex on one channel. Implements :class:`Runtime`.
    """

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT,
                 pull_timeout: float = DEFAULT_PULL_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self.pull_timeout = pull_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, Any] = {}

    # -- plumbing ---------------------------------------------------------------

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(_target(self.address), options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.enable_retries", 1),
                ("grpc.service_config", _SERVICE_CONFIG),
                # Reconnect quickly after the runtime restarts (gRPC's default
                # back-off grows to two minutes).
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._stubs.clear()
            await channel.close(None)

    async def __aenter__(self) -> RuntimeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, service: str, method: str, request: Message,
                    response_type: type[R], *, timeout: float | None = None) -> R:
        path = f"/{service}/{method}"
        rpc = self._stubs.get(path)
        if rpc is None:
            rpc = self.channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString)
            self._stubs[path] = rpc
        try:
            return cast(R, await rpc(request, timeout=timeout or self.timeout))
        except grpc.aio.AioRpcError as e:
            raise classify(e.code(), e.details() or "") from e

    async def _runtime(self, method: str, request: Message, response_type: type[R], *,
                       timeout: float | None = None) -> R:
        return await self._call(RUNTIME_SERVICE, method, request, response_type,
                                timeout=timeout)

    async def _image(self, method: str, request: Message, response_type: type[R], *,
                     timeout: float | None = None) -> R:
        return await self._call(IMAGE_SERVICE, method, request, response_type,
                                timeout=timeout)

    # -- runtime ----------------------------------------------------------------

    async def version(self) -> cri.VersionResponse:
        return await self._runtime("Version", cri.VersionRequest(version=CRI_VERSION),
                                   cri.VersionResponse)

    async def status(self) -> cri.RuntimeStatus:
        resp = await self._runtime("Status", cri.StatusRequest(), cri.StatusResponse)
        return resp.status

    async def wait_ready(self, timeout: float) -> cri.VersionResponse:
        """Poll Version, then Status, until RuntimeReady (see :class:`Runtime`)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        last = "no answer yet"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.Unavailable(
                    f"container runtime at {self.address} not ready after {timeout:g}s: "
                    f"{last}", retry_after=1.0)
            per_call = min(self.timeout, max(remaining, 0.05))
            try:
                version = await self._runtime(
                    "Version", cri.VersionRequest(version=CRI_VERSION),
                    cri.VersionResponse, timeout=per_call)
                status = await self._runtime("Status", cri.StatusRequest(),
                                             cri.StatusResponse, timeout=per_call)
                ready, _, message = runtime_ready(status.status)
                if ready:
                    return version
                last = message
            except errors.ShoalError as e:
                last = e.message
            # Poll quickly at first (containerd starts in well under a second),
            # then settle at a quarter second.
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.25)

    # -- sandboxes --------------------------------------------------------------

    async def run_pod_sandbox(self, config: cri.PodSandboxConfig, *,
                              runtime_handler: str = "") -> str:
        # Setting up the network (CNI) is the slow part; allow for it.
        resp = await self._runtime(
            "RunPodSandbox", cri.RunPodSandboxRequest(config=config,
                                                      runtime_handler=runtime_handler),
            cri.RunPodSandboxResponse, timeout=max(self.timeout, 60.0))
        return resp.pod_sandbox_id

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        try:
            await self._runtime("StopPodSandbox",
                                cri.StopPodSandboxRequest(pod_sandbox_id=sandbox_id),
                                cri.StopPodSandboxResponse, timeout=max(self.timeout, 60.0))
        except errors.NotFound:
            pass

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        try:
            await self._runtime("RemovePodSandbox",
                                cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                cri.RemovePodSandboxResponse, timeout=max(self.timeout, 60.0))
        except errors.NotFound:
            pass

    async def pod_sandbox_status(self, sandbox_id: str) -> cri.PodSandboxStatus:
        resp = await self._runtime("PodSandboxStatus",
                                   cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                   cri.PodSandboxStatusResponse)
        return resp.status

    async def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        """containerd's verbose detail for a sandbox (its ``info`` JSON: pid,
        runtime spec with the netns path, CNI result...). Not part of
        :class:`Runtime`: only containerd housekeeping uses it."""
        resp = await self._runtime(
            "PodSandboxStatus", cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id,
                                                            verbose=True),
            cri.PodSandboxStatusResponse)
        raw = resp.info.get("info", "")
        try:
            info = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    async def list_pod_sandbox(self, *, labels: Mapping[str, str] | None = None,
                               state: cri.PodSandboxState | None = None,
                               sandbox_id: str = "") -> list[cri.PodSandbox]:
        f = cri.PodSandboxFilter(id=sandbox_id, label_selector=dict(labels or {}))
        if state is not None:
            f.state.state = state
        resp = await self._runtime("ListPodSandbox", cri.ListPodSandboxRequest(filter=f),
                                   cri.ListPodSandboxResponse)
        return list(resp.items)

    # -- containers -------------------------------------------------------------

    async def create_container(self, sandbox_id: str, config: cri.ContainerConfig, *,
                               sandbox_config: cri.PodSandboxConfig) -> str:
        resp = await self._runtime(
            "CreateContainer",
            cri.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config,
                                       sandbox_config=sandbox_config),
            cri.CreateContainerResponse, timeout=max(self.timeout, 30.0))
        return resp.container_id

    async def start_container(self, container_id: str) -> None:
        await self._runtime("StartContainer",
                            cri.StartContainerRequest(container_id=container_id),
                            cri.StartContainerResponse, timeout=max(self.timeout, 30.0))

    async def stop_container(self, container_id: str, grace_seconds: float) -> None:
        grace = _seconds(grace_seconds)
        try:
            await self._runtime("StopContainer",
                                cri.StopContainerRequest(container_id=container_id,
                                                         timeout=grace),
                                cri.StopContainerResponse, timeout=grace + self.timeout)
        except errors.NotFound:
            pass

    async def remove_container(self, container_id: str) -> None:
        try:
            await self._runtime("RemoveContainer",
                                cri.RemoveContainerRequest(container_id=container_id),
                                cri.RemoveContainerResponse, timeout=max(self.timeout, 30.0))
        except errors.NotFound:
            pass

    async def list_containers(self, *, sandbox_id: str = "",
                              labels: Mapping[str, str] | None = None,
                              state: cri.ContainerState | None = None,
                              container_id: str = "") -> list[cri.Container]:
        f = cri.ContainerFilter(id=container_id, pod_sandbox_id=sandbox_id,
                                label_selector=dict(labels or {}))
        if state is not None:
            f.state.state = state
        resp = await self._runtime("ListContainers", cri.ListContainersRequest(filter=f),
                                   cri.ListContainersResponse)
        return list(resp.containers)

    async def container_status(self, container_id: str) -> cri.ContainerStatus:
        resp = await self._runtime("ContainerStatus",
                                   cri.ContainerStatusRequest(container_id=container_id),
                                   cri.ContainerStatusResponse)
        return resp.status

    async def exec_sync(self, container_id: str, cmd: Sequence[str], *,
                        timeout: float) -> ExecResult:
        limit = _seconds(timeout)
        resp = await self._runtime(
            "ExecSync", cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd),
                                            timeout=limit),
            cri.ExecSyncResponse,
            timeout=(limit + self.timeout) if limit else _UNLIMITED_EXEC_DEADLINE)
        return ExecResult(exit_code=resp.exit_code, stdout=resp.stdout, stderr=resp.stderr)

    async def exec_url(self, container_id: str, cmd: list[str], *, stdin: bool,
                       tty: bool) -> str:
        """A one-time URL on the streaming server for an interactive command
        (see ``nodeagent.streaming``); with a TTY, stderr is merged into stdout."""
        resp = await self._runtime("Exec", cri.ExecRequest(
            container_id=container_id, cmd=list(cmd), tty=tty, stdin=stdin, stdout=True,
            stderr=not tty), cri.ExecResponse)
        return str(resp.url)

    async def attach_url(self, container_id: str, *, stdin: bool, tty: bool) -> str:
        """A one-time URL on the streaming server attached to the container's
        own process (created with stdin/tty for it to read)."""
        resp = await self._runtime("Attach", cri.AttachRequest(
            container_id=container_id, stdin=stdin, tty=tty, stdout=True, stderr=not tty),
            cri.AttachResponse)
        return str(resp.url)

    async def port_forward_url(self, sandbox_id: str, port: int) -> str:
        """A one-time URL on the streaming server forwarding to ``port`` in the
        sandbox's network namespace."""
        resp = await self._runtime("PortForward", cri.PortForwardRequest(
            pod_sandbox_id=sandbox_id, port=[port]), cri.PortForwardResponse)
        return str(resp.url)

    async def container_stats(self, container_id: str) -> cri.ContainerStats:
        resp = await self._runtime("ContainerStats",
                                   cri.ContainerStatsRequest(container_id=container_id),
                                   cri.ContainerStatsResponse)
        return resp.stats

    async def list_container_stats(self, *, sandbox_id: str = "",
                                   labels: Mapping[str, str] | None = None
                                   ) -> list[cri.ContainerStats]:
        f = cri.ContainerStatsFilter(pod_sandbox_id=sandbox_id,
                                     label_selector=dict(labels or {}))
        resp = await self._runtime("ListContainerStats",
                                   cri.ListContainerStatsRequest(filter=f),
                                   cri.ListContainerStatsResponse)
        return list(resp.stats)

    # -- images -----------------------------------------------------------------

    async def list_images(self) -> list[cri.Image]:
        resp = await self._image("ListImages", cri.ListImagesRequest(),
                                 cri.ListImagesResponse)
        return list(resp.images)

    async def image_status(self, image: str) -> cri.Image | None:
        resp = await self._image("ImageStatus",
                                 cri.ImageStatusRequest(image=cri.ImageSpec(image=image)),
                                 cri.ImageStatusResponse)
        return resp.image if resp.HasField("image") and resp.image.id else None

    async def pull_image(self, image: str, *,
                         sandbox_config: cri.PodSandboxConfig | None = None,
                         auth: cri.AuthConfig | None = None) -> str:
        req = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        if sandbox_config is not None:
            req.sandbox_config.CopyFrom(sandbox_config)
        if auth is not None:
            req.auth.CopyFrom(auth)
        resp = await self._image("PullImage", req, cri.PullImageResponse,
                                 timeout=self.pull_timeout)
        return resp.image_ref

    async def remove_image(self, image: str) -> None:
        try:
            await self._image("RemoveImage",
                              cri.RemoveImageRequest(image=cri.ImageSpec(image=image)),
                              cri.RemoveImageResponse)
        except errors.NotFound:
            pass

    async def image_fs_info(self) -> list[cri.FilesystemUsage]:
        resp = await self._image("ImageFsInfo", cri.ImageFsInfoRequest(),
                                 cri.ImageFsInfoResponse)
        return list(resp.image_filesystems)


def _conforms(client: RuntimeClient) -> Runtime:
    """mypy checks here that RuntimeClient implements the Runtime protocol."""
    return client
