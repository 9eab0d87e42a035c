"""``shoal cordon``, ``uncordon`` and ``drain``: take a node out of service, and back.

    cordon NODE      spec.unschedulable = true   (the scheduler places nothing new there)
    uncordon NODE    spec.unschedulable = false
    drain NODE [--ignore-daemonsets] [--delete-emptydir-data] [--force]
               [--grace-period S] [--timeout D]

Drain, as kubectl does it::

    list the node's pods --> plan_drain (pure): which to evict, skip or refuse
        refused (any)  --> error naming every pod and the flag that allows it;
                           nothing changed (kubectl would have cordoned already)
    cordon --> list again, plan again --> delete each pod to evict
        ("evicting pod ns/x"; grace: --grace-period, else the pod's own
        terminationGracePeriodSeconds) --> wait until each is gone
        ("pod/x evicted") --> "node/n drained"

Refused without a flag: pods no controller manages (``--force``), DaemonSet pods
(``--ignore-daemonsets`` skips them: their controller would only put them
back), pods with emptyDir data (``--delete-emptydir-data``). Finished pods
(Succeeded, Failed) are always deleted. ``--timeout`` bounds the wait (0:
wait as long as it takes); running out is exit code 1, with the pods still
there named. Eviction is a plain delete: there are no PodDisruptionBudgets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.deleting import Victim, wait_gone
from shoal.cli.progress import ProgressLine, bar
from shoal.cli.reporting import CLIError, ExitCode, InputError
from shoal.cli.session import Session
from shoal.client import AsyncClient

_ATTEMPTS = 5

NO_CONTROLLER = "cannot delete Pods that declare no controller (use --force to override)"
DAEMONSET = "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore)"
LOCAL_STORAGE = ("cannot delete Pods with local storage (use --delete-emptydir-data to "
                 "override)")


class DrainRefused(InputError):
    """Pods the flags do not allow to evict; nothing was changed."""


class DrainRefusedAfterCordon(DrainRefused):
    """Such pods appeared after the node was cordoned (it stays cordoned)."""

    exit_code = ExitCode.SERVER_REFUSED


class DrainTimeout(CLIError):
    exit_code = ExitCode.SERVER_REFUSED


@dataclass(frozen=True)
class DrainOptions:
    force: bool = False
    ignore_daemonsets: bool = False
    delete_emptydir_data: bool = False


@dataclass(frozen=True)
class DrainPlan:
    evict: tuple[core_pb2.Pod, ...]
    warnings: tuple[str, ...]      # one line per kind of pod skipped or forced
    refusals: tuple[str, ...]      # one line per reason: "<reason>: ns/a, ns/b"


def _ref(pod: core_pb2.Pod) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}"


def _controller_kind(pod: core_pb2.Pod) -> str:
    for ref in pod.metadata.owner_references:
        if ref.HasField("controller") and ref.controller:
            return ref.kind
    return ""


def plan_drain(pods: Iterable[core_pb2.Pod], options: DrainOptions) -> DrainPlan:
    """Which of a node's pods to evict, skip or refuse (kubectl's drain filters)."""
    evict: list[core_pb2.Pod] = []
    refused: dict[str, list[str]] = {}
    warned: dict[str, list[str]] = {}
    for pod in sorted(pods, key=_ref):
        finished = pod.status.phase in ("Succeeded", "Failed")
        owner = _controller_kind(pod)
        if owner == "DaemonSet" and not finished:
            if options.ignore_daemonsets:
                warned.setdefault("ignoring DaemonSet-managed Pods", []).append(_ref(pod))
            else:
                refused.setdefault(DAEMONSET, []).append(_ref(pod))
            continue
        problem = False
        if not finished and any(v.HasField("empty_dir") for v in pod.spec.volumes):
            if options.delete_emptydir_data:
                warned.setdefault("deleting Pods with local storage", []).append(_ref(pod))
            else:
                refused.setdefault(LOCAL_STORAGE, []).append(_ref(pod))
                problem = True
        if not finished and not owner:
            if options.force:
                warned.setdefault("deleting Pods that declare no controller",
                                  []).append(_ref(pod))
            else:
                refused.setdefault(NO_CONTROLLER, []).append(_ref(pod))
                problem = True
        if not problem:
            evict.append(pod)
    return DrainPlan(
        evict=tuple(evict),
        warnings=tuple(f"{what}: {', '.join(refs)}" for what, refs in warned.items()),
        refusals=tuple(f"{why}: {', '.join(refs)}" for why, refs in refused.items()))


async def set_unschedulable(client: AsyncClient, name: str, value: bool) -> bool:
    """Cordon (True) or uncordon (False); False when the node already was so."""
    for _ in range(_ATTEMPTS):
        node = await client.get(core_pb2.Node, name)
        if node.spec.unschedulable == value:
            return False
        node.spec.unschedulable = value
        try:
            await client.update(node)  # compare-and-swap on the read's resourceVersion
            return True
        except errors.Conflict:
            continue
    raise errors.Conflict(f'node "{name}" kept changing; try again')


async def run_cordon(session: Session, *, node: str, cordon: bool) -> int:
    changed = await set_unschedulable(session.client(), node, cordon)
    word = "cordoned" if cordon else "uncordoned"
    session.print(f"node/{node} {word}" if changed else f"node/{node} already {word}")
    return 0


async def _pods_on(client: AsyncClient, node: str) -> list[core_pb2.Pod]:
    got = await client.list_all(core_pb2.Pod, all_namespaces=True,
                                field_selector=f"spec.nodeName={node}")
    return list(got.items)


def _refuse(node: str, plan: DrainPlan, *, cordoned: bool) -> None:
    lines = [f'unable to drain node "{node}": {why}' for why in plan.refusals]
    raise (DrainRefusedAfterCordon if cordoned else DrainRefused)(lines)


async def run_drain(session: Session, *, node: str, options: DrainOptions,
                    grace_period: int | None, timeout: float | None) -> int:
    """Drain ``node``; ``grace_period`` None: each pod's own; ``timeout`` None: no limit."""
    client = session.client()
    await client.get(core_pb2.Node, node)  # NotFound before anything changes
    plan = plan_drain(await _pods_on(client, node), options)
    if plan.refusals:
        _refuse(node, plan, cordoned=False)
    changed = await set_unschedulable(client, node, True)
    session.print(f"node/{node} cordoned" if changed else f"node/{node} already cordoned")
    plan = plan_drain(await _pods_on(client, node), options)  # anything new meanwhile
    if plan.refusals:
        _refuse(node, plan, cordoned=True)
    for line in plan.warnings:
        session.warn(f"Warning: {line}")
    started = time.monotonic()
    for pod in plan.evict:
        session.print(f"evicting pod {_ref(pod)}")
        try:
            await client.delete(core_pb2.Pod, pod.metadata.name,
                                namespace=pod.metadata.namespace, uid=pod.metadata.uid,
                                grace_period=grace_period)
        except (errors.NotFound, errors.Conflict):
            pass  # already gone (or replaced by a new pod of that name)
    await _wait_gone(session, client, plan.evict, started=started, timeout=timeout)
    session.print(f"node/{node} drained")
    return 0


async def _wait_gone(session: Session, client: AsyncClient, pods: Sequence[core_pb2.Pod], *,
                     started: float, timeout: float | None) -> None:
    """Print each pod as it goes (a watch on it: ``shoal delete --wait``'s ``wait_gone``)."""
    kind = session.kinds.by_message(core_pb2.Pod())
    left = {pod.metadata.uid: pod for pod in pods}

    # On a terminal, stderr also shows how many of the pods are gone.
    line = ProgressLine(session.err)
    total = len(pods)

    def show() -> None:
        if total:
            line.update(f"evicted {bar(total - len(left), total)} pods")

    async def one(pod: core_pb2.Pod) -> None:
        victim = Victim(kind, pod.metadata.namespace, pod.metadata.name)
        await wait_gone(client, victim, uid=pod.metadata.uid)
        del left[pod.metadata.uid]
        line.clear()
        session.print(f"pod/{pod.metadata.name} evicted")
        show()

    until = None if timeout is None else asyncio.get_running_loop().time() + max(
        0.0, timeout - (time.monotonic() - started))
    try:
        show()
        async with asyncio.timeout_at(until), asyncio.TaskGroup() as tg:
            for pod in pods:
                tg.create_task(one(pod))
    except TimeoutError:
        line.clear()
        raise DrainTimeout(
            f"drain did not complete within {timeout:g}s; still terminating: "
            + ", ".join(_ref(p) for p in left.values())) from None
    line.clear()
