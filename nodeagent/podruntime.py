"""The pod-level view of the container runtime that the pod workers use.

``PodRuntime`` speaks in pods and containers of the API (sandboxes named after
pods, containers labelled with the pod UID and container name), not in CRI
messages. ``nodeagent.criruntime.CRIPodRuntime`` implements it over CRI (the
real containerd, or the fake CRI runtime in unit tests).

Errors the worker turns into pod reasons, not crashes:

- :class:`ImagePullError`  -> ``ErrImagePull`` / ``ImagePullBackOff``
- :class:`StartError`      -> ``RunContainerError`` (the runtime's own message)
- ``shoal.errors.Unavailable`` -> the runtime is down; retried with back-off
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nodeagent.runtimestate import PodRecord, SandboxRecord
from nodeagent.volumes import Mount


class ImagePullError(Exception):
    """The image could not be pulled (or is absent under ``Never``)."""


class StartError(Exception):
    """The runtime refused to create or start the container."""


@dataclass(frozen=True)
class ContainerLaunch:
    """Everything needed to create and start one container instance."""

    spec: Any  # core_pb2.Container
    attempt: int
    init: bool
    env: list[tuple[str, str]]
    command: list[str]
    args: list[str]
    mounts: list[Mount]
    spec_hash: str
    restart_count: int
    image_ref: str
    # An ephemeral container joining this (running) container's PID namespace.
    target_id: str = ""


class PodRuntime(Protocol):
    async def version(self) -> tuple[str, bool, str]:
        """(runtime name/version, ready, why not)."""

    async def relist(self) -> dict[str, PodRecord]:
        """Every pod the runtime holds for this node, by pod UID."""

    async def create_sandbox(self, pod: Any, *, attempt: int) -> SandboxRecord:
        """A new pod sandbox with its network (CNI); its IP in the record."""

    async def stop_sandbox(self, sandbox_id: str) -> None: ...

    async def remove_sandbox(self, sandbox_id: str) -> None: ...

    async def ensure_image(self, image: str, *, policy: str,
                           on_pull: Callable[[], None] | None = None) -> str:
        """The image's ID, pulling it as the policy says (``on_pull`` is called just
        before a pull starts). Raises ImagePullError."""

    async def start_container(self, pod: Any, sandbox: SandboxRecord,
                              launch: ContainerLaunch) -> str:
        """Create and start a container in the sandbox; its ID. Raises StartError."""

    async def stop_container(self, container_id: str, *, grace: int) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent."""

    async def remove_container(self, container_id: str) -> None: ...

    async def exec_sync(self, container_id: str, command: list[str], *,
                        timeout: float) -> tuple[int, bytes, bytes]:
        """Run a command in the container; (exit code, stdout, stderr)."""
