"""``FakeRuntime``: an in-memory container runtime whose behaviour tests script.

The idea is Nomad's mock driver: a real implementation of the interface
(``nodeagent.cri.Runtime``) whose containers do what the test says: fail to
pull, fail to start, exit with a code after a while, or run for ever. The pod
planner, the workers and the relist run against it unchanged.

Time. ``clock`` is a callable returning **seconds** since the epoch as a float
(``time.time`` by default; :class:`FakeClock` in tests), the same unit as every
other clock in the nodeagent. CRI timestamps in returned messages are those
seconds as int64 nanoseconds. Nothing happens between calls: each call first
brings the world up to date, so a container with ``run_for=5`` started at t
is EXITED for any call made at t+5 or later, with ``finished_at`` exactly t+5.

Scripting::

    clock = FakeClock(1000.0)
    rt = FakeRuntime(clock=clock)
    rt.add_image("busybox")                                  # present, no pull needed
    rt.behave(Behaviour(exit_code=3, run_for=5), name="app")  # containers named "app"
    rt.behave(Behaviour(pull_error="manifest unknown"), image="nope:1")
    rt.behave(Behaviour(exit_code=1, run_for=0), Behaviour(), name="flaky")
    #          ^ first "flaky" container fails at once; later ones run for ever

A new container takes its behaviour from its container name, else from its
image, else ``default`` (``Behaviour()``: runs until stopped). Given several
behaviours, each new container of that name or image takes the next one and
the last one repeats. The behaviour is fixed when the container is created; a
pull of an image uses the one the next container of that image would take.

A fake container::

    create_container --> CREATED --start_container--> RUNNING --+--> EXITED
                            |                                    |  run_for elapsed: exit_code
                            | start_error: start raises          |  crash(): the given code
                            | InternalError(message), and        |  stop_container: stop_exit_code
                            +--> EXITED (128, "StartError") <----+  sandbox stopped/removed: 137

Errors are what ``RuntimeClient`` raises for the same situation against
containerd: ``NotFound`` for unknown IDs and absent images, ``InternalError``
with the scripted message for pull and start errors, name clashes and calls
on containers in the wrong state, ``Unavailable`` while ``available`` is
False (a runtime that is down or restarting). Stop and remove are idempotent.
``fail_next(method, error)`` makes the next call(s) of a method raise.

Every call is recorded in ``calls`` as ``(method, args)``, ``args`` being a
dict of the arguments by name, before it runs (failed calls too).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent.cri import NETWORK_READY, RUNTIME_READY, ExecResult, Runtime
from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.images import normalize_reference

ExecHandler = Callable[[Sequence[str]], ExecResult]

CREATED = cri.CONTAINER_CREATED
RUNNING = cri.CONTAINER_RUNNING
EXITED = cri.CONTAINER_EXITED
SANDBOX_READY = cri.SANDBOX_READY
SANDBOX_NOTREADY = cri.SANDBOX_NOTREADY

START_ERROR_EXIT_CODE = 128      # what containerd reports for a failed start
KILLED_EXIT_CODE = 137           # 128 + SIGKILL
IMAGE_SIZE = 1 << 20
EXEC_OK = ExecResult(exit_code=0)


@dataclass(frozen=True)
class Behaviour:
    """What a fake container (or a pull of its image) does."""

    # PullImage raises InternalError(pull_error), verbatim.
    pull_error: str | None = None
    # CreateContainer raises InternalError(create_error), verbatim.
    create_error: str | None = None
    # StartContainer raises InternalError(start_error), verbatim; the container
    # is then EXITED with exit code 128, reason "StartError", this message.
    start_error: str | None = None
    # Once started, exit with exit_code after run_for seconds of the fake
    # clock; None runs until stopped.
    exit_code: int = 0
    run_for: float | None = None
    # Exit code when StopContainer ends it (128 + SIGTERM by default: the
    # process died of the stop signal).
    stop_exit_code: int = 143
    # What ExecSync returns: a fixed result, or a function of the command.
    exec_result: ExecResult | ExecHandler = EXEC_OK


class FakeClock:
    """A settable clock in seconds: ``clock()`` reads it, ``advance(dt)`` moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def _ns(seconds: float) -> int:
    return round(seconds * 1e9) if seconds else 0


def _image_id(ref: str) -> str:
    return "sha256:" + hashlib.sha256(ref.encode()).hexdigest()


def _reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def _labels_match(have: Mapping[str, str], want: Mapping[str, str] | None) -> bool:
    return all(have.get(k) == v for k, v in (want or {}).items())


@dataclass
class FakeSandbox:
    id: str
    config: cri.PodSandboxConfig
    created_at: float
    ip: str
    state: cri.PodSandboxState = SANDBOX_READY


@dataclass
class FakeContainer:
    id: str
    sandbox_id: str
    config: cri.ContainerConfig
    image_id: str
    behaviour: Behaviour
    created_at: float
    state: cri.ContainerState = CREATED
    started_at: float = 0.0
    finished_at: float = 0.0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    # What ContainerStats reports: cumulative CPU time (ns) and the working set;
    # tests set them to script usage.
    cpu_ns: int = 0
    working_set: int = 0

    @property
    def name(self) -> str:
        return self.config.metadata.name

    def end(self, *, at: float, exit_code: int, reason: str | None = None,
            message: str = "") -> None:
        self.state = EXITED
        self.finished_at = at
        self.exit_code = exit_code
        self.reason = reason or _reason(exit_code)
        self.message = message


@dataclass
class _Script:
    behaviours: tuple[Behaviour, ...]
    used: int = 0

    def take(self) -> Behaviour:
        b = self.behaviours[min(self.used, len(self.behaviours) - 1)]
        self.used += 1
        return b


class FakeRuntime:
    """In-memory :class:`nodeagent.cri.Runtime`. See the module docstring."""

    def __init__(self, *, clock: Callable[[], float] | None = None,
                 runtime_name: str = "fake", runtime_version: str = "0.0.1",
                 pod_cidr_prefix: str = "10.88.0.",
                 sandbox_image: str = "docker.io/shoal/pause:1") -> None:
        self.clock: Callable[[], float] = clock or time.time
        self.runtime_name = runtime_name
        self.runtime_version = runtime_version
        self.pod_cidr_prefix = pod_cidr_prefix
        self.sandbox_image = normalize_reference(sandbox_image)
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.containers: dict[str, FakeContainer] = {}
        self.images: dict[str, str] = {}          # normalized reference -> image ID
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # False: every call raises Unavailable (a runtime down or restarting).
        self.available = True
        self.runtime_ready = True
        self.network_ready = True
        self.default = Behaviour()
        self._by_name: dict[str, _Script] = {}
        self._by_image: dict[str, _Script] = {}
        self._failures: dict[str, list[Exception]] = {}
        self._next_id = 0
        self._next_ip = 2
        self.add_image(sandbox_image)

    # -- scripting --------------------------------------------------------------

    def behave(self, *behaviours: Behaviour, name: str | None = None,
               image: str | None = None) -> None:
        """Script containers by container ``name`` or by ``image`` (and pulls
        of that image). Replaces an earlier script for the same key."""
        if not behaviours or (name is None) == (image is None):
            raise ValueError("give one or more behaviours and exactly one of name, image")
        script = _Script(tuple(behaviours))
        if name is not None:
            self._by_name[name] = script
        else:
            self._by_image[normalize_reference(image or "")] = script

    def add_image(self, image: str) -> str:
        """Make ``image`` present, as if pulled; returns its image ID."""
        ref = normalize_reference(image)
        self.images[ref] = _image_id(ref)
        return self.images[ref]

    def fail_next(self, method: str, error: Exception, *, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` (e.g. "start_container") raise ``error``."""
        self._failures.setdefault(method, []).extend([error] * times)

    def crash(self, container_id: str, exit_code: int = KILLED_EXIT_CODE, *,
              reason: str | None = None, message: str = "") -> None:
        """A running container dies now (e.g. ``reason="OOMKilled"``)."""
        self._advance()
        c = self._container(container_id)
        if c.state != RUNNING:
            raise errors.InternalError(f"container {container_id} is not running")
        c.end(at=self.clock(), exit_code=exit_code, reason=reason, message=message)

    # -- looking at what happened -----------------------------------------------

    def calls_to(self, method: str) -> list[dict[str, Any]]:
        """The arguments of every call to ``method``, in order."""
        return [args for m, args in self.calls if m == method]

    def methods(self) -> list[str]:
        """The names of the methods called, in order."""
        return [m for m, _ in self.calls]

    def by_name(self, name: str) -> list[FakeContainer]:
        """Every container instance with that container name, oldest first."""
        self._advance()
        return sorted((c for c in self.containers.values() if c.name == name),
                      key=lambda c: (c.created_at, c.id))

    # -- plumbing ---------------------------------------------------------------

    def _enter(self, method: str, **args: Any) -> None:
        self.calls.append((method, args))
        if not self.available:
            raise errors.Unavailable("container runtime unavailable: connection refused",
                                     retry_after=1.0)
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)
        self._advance()

    def _advance(self) -> None:
        now = self.clock()
        for c in self.containers.values():
            run_for = c.behaviour.run_for
            if c.state == RUNNING and run_for is not None and c.started_at + run_for <= now:
                c.end(at=c.started_at + run_for, exit_code=c.behaviour.exit_code)

    def _new_id(self, kind: str) -> str:
        self._next_id += 1
        return f"{kind}-{self._next_id}"

    def _find(self, table: Mapping[str, Any], prefix: str, what: str) -> str:
        if prefix in table:
            return prefix
        matches = [k for k in table if prefix and k.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        raise errors.NotFound(f"an error occurred when try to find {what} {prefix!r}: "
                              f"not found")

    def _sandbox(self, sandbox_id: str) -> FakeSandbox:
        return self.sandboxes[self._find(self.sandboxes, sandbox_id, "sandbox")]

    def _container(self, container_id: str) -> FakeContainer:
        return self.containers[self._find(self.containers, container_id, "container")]

    def _behaviour_for(self, name: str, image: str) -> Behaviour:
        script = self._by_name.get(name) or self._by_image.get(image)
        return script.take() if script else self.default

    def _resolve_image(self, image: str) -> tuple[str, str] | None:
        """(reference, image ID) of a present image named by reference or ID."""
        for ref, image_id in self.images.items():
            if image in (image_id, image_id.removeprefix("sha256:")):
                return ref, image_id
        try:
            ref = normalize_reference(image)
        except errors.BadRequest:
            return None
        return (ref, self.images[ref]) if ref in self.images else None

    # -- runtime ----------------------------------------------------------------

    async def version(self) -> cri.VersionResponse:
        self._enter("version")
        return cri.VersionResponse(version="0.1.0", runtime_name=self.runtime_name,
                                   runtime_version=self.runtime_version,
                                   runtime_api_version="v1")

    async def status(self) -> cri.RuntimeStatus:
        self._enter("status")
        return cri.RuntimeStatus(conditions=[
            cri.RuntimeCondition(type=RUNTIME_READY, status=self.runtime_ready,
                                 reason="" if self.runtime_ready else "FakeNotReady"),
            cri.RuntimeCondition(type=NETWORK_READY, status=self.network_ready,
                                 reason="" if self.network_ready else "NetworkPluginNotReady",
                                 message="" if self.network_ready else
                                 "cni config uninitialized"),
        ])

    async def wait_ready(self, timeout: float) -> cri.VersionResponse:
        """Answers at once: the version when available and RuntimeReady, else
        ``Unavailable`` (fake time does not pass while waiting)."""
        self._enter("wait_ready", timeout=timeout)
        if not self.runtime_ready:
            raise errors.Unavailable("container runtime not ready: RuntimeReady=false",
                                     retry_after=1.0)
        return cri.VersionResponse(version="0.1.0", runtime_name=self.runtime_name,
                                   runtime_version=self.runtime_version,
                                   runtime_api_version="v1")

    # -- sandboxes --------------------------------------------------------------

    async def run_pod_sandbox(self, config: cri.PodSandboxConfig, *,
                              runtime_handler: str = "") -> str:
        self._enter("run_pod_sandbox", config=config, runtime_handler=runtime_handler)
        m = config.metadata
        for sb in self.sandboxes.values():
            o = sb.config.metadata
            if (o.name, o.namespace, o.uid, o.attempt) == (m.name, m.namespace, m.uid,
                                                           m.attempt):
                raise errors.InternalError(
                    f'failed to reserve sandbox name "{m.name}_{m.namespace}_{m.uid}_'
                    f'{m.attempt}": name is reserved for "{sb.id}"')
        copy = cri.PodSandboxConfig()
        copy.CopyFrom(config)
        sb = FakeSandbox(id=self._new_id("sandbox"), config=copy, created_at=self.clock(),
                         ip=f"{self.pod_cidr_prefix}{self._next_ip}")
        self._next_ip += 1
        self.sandboxes[sb.id] = sb
        return sb.id

    def _stop_sandbox(self, sb: FakeSandbox) -> None:
        now = self.clock()
        for c in self.containers.values():
            if c.sandbox_id == sb.id and c.state == RUNNING:
                c.end(at=now, exit_code=KILLED_EXIT_CODE)
        sb.state = SANDBOX_NOTREADY

    async def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._enter("stop_pod_sandbox", sandbox_id=sandbox_id)
        try:
            sb = self._sandbox(sandbox_id)
        except errors.NotFound:
            return
        self._stop_sandbox(sb)

    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._enter("remove_pod_sandbox", sandbox_id=sandbox_id)
        try:
            sb = self._sandbox(sandbox_id)
        except errors.NotFound:
            return
        self._stop_sandbox(sb)
        for cid in [c.id for c in self.containers.values() if c.sandbox_id == sb.id]:
            del self.containers[cid]
        del self.sandboxes[sb.id]

    def _sandbox_status(self, sb: FakeSandbox) -> cri.PodSandboxStatus:
        st = cri.PodSandboxStatus(
            id=sb.id, metadata=sb.config.metadata, state=sb.state,
            created_at=_ns(sb.created_at), labels=dict(sb.config.labels),
            annotations=dict(sb.config.annotations))
        st.network.ip = sb.ip
        st.linux.namespaces.options.CopyFrom(
            sb.config.linux.security_context.namespace_options)
        return st

    async def pod_sandbox_status(self, sandbox_id: str) -> cri.PodSandboxStatus:
        self._enter("pod_sandbox_status", sandbox_id=sandbox_id)
        return self._sandbox_status(self._sandbox(sandbox_id))

    async def list_pod_sandbox(self, *, labels: Mapping[str, str] | None = None,
                               state: cri.PodSandboxState | None = None,
                               sandbox_id: str = "") -> list[cri.PodSandbox]:
        self._enter("list_pod_sandbox", labels=labels, state=state, sandbox_id=sandbox_id)
        return [
            cri.PodSandbox(id=sb.id, metadata=sb.config.metadata, state=sb.state,
                           created_at=_ns(sb.created_at), labels=dict(sb.config.labels),
                           annotations=dict(sb.config.annotations))
            for sb in self.sandboxes.values()
            if sb.id.startswith(sandbox_id) and (state is None or sb.state == state)
            and _labels_match(sb.config.labels, labels)
        ]

    # -- containers -------------------------------------------------------------

    async def create_container(self, sandbox_id: str, config: cri.ContainerConfig, *,
                               sandbox_config: cri.PodSandboxConfig) -> str:
        self._enter("create_container", sandbox_id=sandbox_id, config=config,
                    sandbox_config=sandbox_config)
        sb = self._sandbox(sandbox_id)
        m = config.metadata
        for c in self.containers.values():
            if c.sandbox_id == sb.id and (c.name, c.config.metadata.attempt) == (m.name,
                                                                                  m.attempt):
                raise errors.InternalError(
                    f'failed to reserve container name "{m.name}_{sb.config.metadata.name}_'
                    f'{sb.config.metadata.namespace}_{sb.config.metadata.uid}_{m.attempt}": '
                    f'name is reserved for "{c.id}"')
        found = self._resolve_image(config.image.image)
        if found is None:
            raise errors.NotFound(f'failed to resolve image "{config.image.image}": not found')
        ref, image_id = found
        behaviour = self._behaviour_for(m.name, ref)
        if behaviour.create_error is not None:
            raise errors.InternalError(behaviour.create_error)
        copy = cri.ContainerConfig()
        copy.CopyFrom(config)
        c = FakeContainer(id=self._new_id("container"), sandbox_id=sb.id, config=copy,
                          image_id=image_id, behaviour=behaviour, created_at=self.clock())
        self.containers[c.id] = c
        return c.id

    async def start_container(self, container_id: str) -> None:
        self._enter("start_container", container_id=container_id)
        c = self._container(container_id)
        if c.state != CREATED:
            raise errors.InternalError(
                f"container {c.id} is in {cri.ContainerState.Name(c.state)} state")
        if self.sandboxes[c.sandbox_id].state != SANDBOX_READY:
            raise errors.InternalError(f"sandbox container {c.sandbox_id!r} is not running")
        now = self.clock()
        if c.behaviour.start_error is not None:
            c.end(at=now, exit_code=START_ERROR_EXIT_CODE, reason="StartError",
                  message=c.behaviour.start_error)
            raise errors.InternalError(c.behaviour.start_error)
        c.state = RUNNING
        c.started_at = now
        self._advance()      # run_for=0 exits at once

    async def stop_container(self, container_id: str, grace_seconds: float) -> None:
        self._enter("stop_container", container_id=container_id, grace_seconds=grace_seconds)
        try:
            c = self._container(container_id)
        except errors.NotFound:
            return
        if c.state == RUNNING:
            c.end(at=self.clock(), exit_code=c.behaviour.stop_exit_code)

    async def remove_container(self, container_id: str) -> None:
        self._enter("remove_container", container_id=container_id)
        try:
            c = self._container(container_id)
        except errors.NotFound:
            return
        if c.state == RUNNING:
            c.end(at=self.clock(), exit_code=KILLED_EXIT_CODE)
        del self.containers[c.id]

    async def list_containers(self, *, sandbox_id: str = "",
                              labels: Mapping[str, str] | None = None,
                              state: cri.ContainerState | None = None,
                              container_id: str = "") -> list[cri.Container]:
        self._enter("list_containers", sandbox_id=sandbox_id, labels=labels, state=state,
                    container_id=container_id)
        return [
            cri.Container(id=c.id, pod_sandbox_id=c.sandbox_id, metadata=c.config.metadata,
                          image=c.config.image, image_ref=c.image_id, state=c.state,
                          created_at=_ns(c.created_at), labels=dict(c.config.labels),
                          annotations=dict(c.config.annotations))
            for c in self.containers.values()
            if c.id.startswith(container_id) and c.sandbox_id.startswith(sandbox_id)
            and (state is None or c.state == state) and _labels_match(c.config.labels, labels)
        ]

    async def container_status(self, container_id: str) -> cri.ContainerStatus:
        self._enter("container_status", container_id=container_id)
        c = self._container(container_id)
        log_dir = self.sandboxes[c.sandbox_id].config.log_directory
        return cri.ContainerStatus(
            id=c.id, metadata=c.config.metadata, state=c.state,
            created_at=_ns(c.created_at), started_at=_ns(c.started_at),
            finished_at=_ns(c.finished_at), exit_code=c.exit_code, image=c.config.image,
            image_ref=c.image_id, reason=c.reason, message=c.message,
            labels=dict(c.config.labels), annotations=dict(c.config.annotations),
            mounts=list(c.config.mounts),
            log_path=os.path.join(log_dir, c.config.log_path)
            if log_dir and c.config.log_path else "")

    async def exec_sync(self, container_id: str, cmd: Sequence[str], *,
                        timeout: float) -> ExecResult:
        self._enter("exec_sync", container_id=container_id, cmd=list(cmd), timeout=timeout)
        c = self._container(container_id)
        if c.state != RUNNING:
            raise errors.InternalError(
                f"container {c.id} is in {cri.ContainerState.Name(c.state)} state")
        result = c.behaviour.exec_result
        return result if isinstance(result, ExecResult) else result(list(cmd))

    def _stats(self, c: FakeContainer) -> cri.ContainerStats:
        now = _ns(self.clock())
        st = cri.ContainerStats()
        st.attributes.id = c.id
        st.attributes.metadata.CopyFrom(c.config.metadata)
        st.attributes.labels.update(c.config.labels)
        st.attributes.annotations.update(c.config.annotations)
        st.cpu.timestamp = now
        st.cpu.usage_core_nano_seconds.value = c.cpu_ns
        st.memory.timestamp = now
        st.memory.working_set_bytes.value = c.working_set
        return st

    async def container_stats(self, container_id: str) -> cri.ContainerStats:
        self._enter("container_stats", container_id=container_id)
        return self._stats(self._container(container_id))

    async def list_container_stats(self, *, sandbox_id: str = "",
                                   labels: Mapping[str, str] | None = None
                                   ) -> list[cri.ContainerStats]:
        self._enter("list_container_stats", sandbox_id=sandbox_id, labels=labels)
        return [self._stats(c) for c in self.containers.values()
                if c.state == RUNNING and c.sandbox_id.startswith(sandbox_id)
                and _labels_match(c.config.labels, labels)]

    # -- images -----------------------------------------------------------------

    def _image(self, ref: str, image_id: str) -> cri.Image:
        return cri.Image(id=image_id, repo_tags=[ref],
                         repo_digests=[f"{ref.rsplit(':', 1)[0]}@{image_id}"],
                         size=IMAGE_SIZE, spec=cri.ImageSpec(image=image_id),
                         pinned=ref == self.sandbox_image)

    async def list_images(self) -> list[cri.Image]:
        self._enter("list_images")
        return [self._image(ref, iid) for ref, iid in sorted(self.images.items())]

    async def image_status(self, image: str) -> cri.Image | None:
        self._enter("image_status", image=image)
        found = self._resolve_image(image)
        return self._image(*found) if found else None

    async def pull_image(self, image: str, *,
                         sandbox_config: cri.PodSandboxConfig | None = None,
                         auth: cri.AuthConfig | None = None) -> str:
        self._enter("pull_image", image=image, sandbox_config=sandbox_config, auth=auth)
        ref = normalize_reference(image)
        script = self._by_image.get(ref)
        if script is not None:
            error = script.behaviours[min(script.used, len(script.behaviours) - 1)].pull_error
            if error is not None:
                raise errors.InternalError(error)
        return self.add_image(ref)

    async def remove_image(self, image: str) -> None:
        self._enter("remove_image", image=image)
        found = self._resolve_image(image)
        if found is not None:
            del self.images[found[0]]

    async def image_fs_info(self) -> list[cri.FilesystemUsage]:
        self._enter("image_fs_info")
        usage = cri.FilesystemUsage(timestamp=_ns(self.clock()))
        usage.fs_id.mountpoint = "/var/lib/fake/images"
        usage.used_bytes.value = IMAGE_SIZE * len(self.images)
        usage.inodes_used.value = len(self.images)
        return [usage]


def _conforms(fake: FakeRuntime) -> Runtime:
    """mypy checks here that FakeRuntime implements the Runtime protocol."""
    return fake
