"""``shoal logs`` and ``shoal exec``: into running containers, through the apiserver.

    shoal logs POD [-c C] [-f] [--tail N] [--previous] [--timestamps]
    shoal logs deploy/NAME [...]     every pod of the workload, lines prefixed
                                     [pod/NAME/CONTAINER]
    shoal exec POD [-c C] -- CMD...  stdout and stderr as they came; the exit
                                     code is the command's (as kubectl's)
"""

from __future__ import annotations

import asyncio
from typing import Any

from shoal import errors, selectors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.cli.reporting import ExitCode
from shoal.cli.session import Session

_WORKLOADS: dict[str, Any] = {
    "deploy": apps_pb2.Deployment, "deployment": apps_pb2.Deployment,
    "deployments": apps_pb2.Deployment, "rs": apps_pb2.ReplicaSet,
    "replicaset": apps_pb2.ReplicaSet, "replicasets": apps_pb2.ReplicaSet,
    "sts": apps_pb2.StatefulSet, "statefulset": apps_pb2.StatefulSet,
    "statefulsets": apps_pb2.StatefulSet, "ds": apps_pb2.DaemonSet,
    "daemonset": apps_pb2.DaemonSet, "daemonsets": apps_pb2.DaemonSet,
}


async def _targets(session: Session, target: str) -> tuple[list[str], bool]:
    """Pod names for ``target`` and whether to prefix lines (several pods)."""
    kind, _, name = target.rpartition("/")
    if not kind or kind.lower() in ("po", "pod", "pods"):
        return [name], False
    workload = _WORKLOADS.get(kind.lower())
    if workload is None:
        raise errors.BadRequest(f"cannot read logs of {kind}: use a pod or a workload "
                                "(deploy, rs, sts, ds)")
    client = session.client()
    obj = await client.get(workload, name, namespace=session.namespace)
    sel = selectors.from_proto(obj.spec.selector)
    pods = await client.list(core_pb2.Pod, namespace=session.namespace, label_selector=str(sel))
    names = sorted(p.metadata.name for p in pods.items)
    if not names:
        raise errors.NotFound(f"no pods found for {target}")
    return names, True


async def run_logs(session: Session, *, target: str, container: str, follow: bool,
                   tail: int | None, previous: bool, timestamps: bool) -> int:
    pods, prefixed = await _targets(session, target)
    client = session.client()
    out = session.out
    lock = asyncio.Lock()

    async def stream(pod: str) -> None:
        prefix = f"[pod/{pod}/{container or '*'}] " if prefixed else ""
        pending = ""
        async for chunk in client.logs(pod, namespace=session.namespace, container=container,
                                       follow=follow, tail=tail, previous=previous,
                                       timestamps=timestamps):
            text = pending + chunk.decode("utf-8", "replace")
            *lines, pending = text.split("\n")
            async with lock:
                for line in lines:
                    out.write(f"{prefix}{line}\n")
                out.flush()
        if pending:
            out.write(f"{prefix}{pending}")
            out.flush()

    if len(pods) == 1 or not follow:
        for pod in pods:
            await stream(pod)
    else:
        async with asyncio.TaskGroup() as tg:
            for pod in pods:
                tg.create_task(stream(pod))
    return ExitCode.OK


async def run_exec(session: Session, *, pod: str, container: str, command: list[str],
                   timeout: int) -> int:
    if not command:
        raise errors.BadRequest("exec needs a command after --, e.g. shoal exec web-0 -- ls /")
    resp = await session.client().exec(pod, command, namespace=session.namespace,
                                       container=container, timeout=timeout)
    session.out.write(resp.stdout.decode("utf-8", "replace"))
    session.out.flush()
    if resp.stderr:
        session.err.write(resp.stderr.decode("utf-8", "replace"))
        session.err.flush()
    return int(resp.exit_code) if 0 <= resp.exit_code < 256 else 1

