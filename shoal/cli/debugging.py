"""``shoal debug POD``: an ephemeral container in a running pod's namespaces.

    shoal debug POD [--image IMG] [-c NAME] [--target C] [-i] [-t] [-- CMD...]

    AddEphemeralContainer (update pods/ephemeralcontainers) --> the pod's
    spec.ephemeralContainers --> its node agent starts it in the pod's sandbox
    (network, IPC, UTS: the pod's; with --target, the PID namespace of that
    container: CRI NamespaceMode TARGET) --> status running
      -it / -i: attach to it (CRI Attach, as exec -it) and, when it ends, exit
                with its exit code from the pod's status
      neither:  wait until it ends, print its log, exit with its exit code

The container runs once (never restarted) and stays in the pod's spec, as in
Kubernetes; its name is ``debugger-xxxxx`` unless -c names it.
"""

from __future__ import annotations

import asyncio
import random
import string
from typing import Any

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.session import Session
from shoal.cli.terminal import stream_terminal

DEFAULT_IMAGE = "docker.io/library/busybox:1.36"
START_TIMEOUT = 120.0
POLL = 0.5


def debugger_name(rng: random.Random | None = None) -> str:
    r = rng or random.SystemRandom()
    return "debugger-" + "".join(r.choice(string.ascii_lowercase + string.digits)
                                 for _ in range(5))


def ephemeral_container(*, name: str, image: str, command: list[str], target: str,
                        stdin: bool, tty: bool) -> core_pb2.EphemeralContainer:
    c = core_pb2.EphemeralContainer(name=name, image=image, command=command,
                                    target_container_name=target, stdin=stdin, tty=tty)
    c.termination_message_policy = "File"
    return c


def state_of(pod: core_pb2.Pod, name: str) -> core_pb2.ContainerStatus | None:
    return next((s for s in pod.status.ephemeral_container_statuses if s.name == name), None)


async def _wait(session: Session, pod: str, name: str, *, until: str,
                timeout: float) -> core_pb2.ContainerStatus:
    """Poll the pod until the container is running (or ended) / ended."""
    client = session.client()
    deadline = asyncio.get_running_loop().time() + timeout
    last: core_pb2.ContainerStatus | None = None
    while asyncio.get_running_loop().time() < deadline:
        obj: Any = await client.get(core_pb2.Pod, pod, namespace=session.namespace)
        last = state_of(obj, name)
        if last is not None:
            if last.state.HasField("terminated"):
                return last
            if until == "running" and last.state.HasField("running"):
                return last
        await asyncio.sleep(POLL)
    why = ""
    if last is not None and last.state.HasField("waiting"):
        why = f": {last.state.waiting.reason} {last.state.waiting.message}".rstrip()
    raise errors.Unavailable(f'container "{name}" in pod "{pod}" did not '
                         f"{'start' if until == 'running' else 'end'} within "
                         f"{timeout:g}s{why}", retry_after=1.0)


async def run_debug(session: Session, *, pod: str, image: str, name: str, target: str,
                    command: list[str], stdin: bool, tty: bool) -> int:
    interactive = stdin or tty
    name = name or debugger_name()
    if not command and not interactive:
        raise errors.BadRequest("debug needs a command after --, or -it for a shell")
    client = session.client()
    current: Any = await client.get(core_pb2.Pod, pod, namespace=session.namespace)
    if target and target not in [c.name for c in current.spec.containers]:
        raise errors.BadRequest(f'container "{target}" is not in pod "{pod}"; choose one of: '
                                f"[{' '.join(c.name for c in current.spec.containers)}]")
    session.warn(f"Defaulting debug container name to {name}.")
    await client.add_ephemeral_container(pod, ephemeral_container(
        name=name, image=image, command=command, target=target, stdin=interactive,
        tty=tty), namespace=session.namespace)
    status = await _wait(session, pod, name, until="running", timeout=START_TIMEOUT)
    if interactive and not status.state.HasField("terminated"):
        if tty:
            session.warn("If you don't see a command prompt, try pressing enter.")
        code = await stream_terminal(session, pod=pod, container=name, command=[], tty=tty,
                                     attach=True)
        if code is not None:
            return code
    status = await _wait(session, pod, name, until="terminated", timeout=START_TIMEOUT)
    if not interactive:
        async for chunk in client.logs(pod, namespace=session.namespace, container=name):
            session.out.write(chunk.decode("utf-8", "replace"))
        session.out.flush()
    code = status.state.terminated.exit_code
    return code if 0 <= code < 256 else 1
