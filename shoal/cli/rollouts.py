"""``shoal rollout status|history|undo|restart|pause|resume`` (kubectl's, client-side).

    rollout status  KIND/NAME [--timeout D]       deployments, statefulsets, daemonsets
    rollout history KIND/NAME [--revision N]      deployments, statefulsets, daemonsets
    rollout undo    KIND/NAME [--to-revision N]   deployments, statefulsets, daemonsets
    rollout restart KIND/NAME                     deployments, statefulsets, daemonsets
    rollout pause   deployment/NAME
    rollout resume  deployment/NAME

``status`` waits, printing a kubectl progress line each time it changes::

    get object ──progress(obj)──> done ─────────────> "successfully rolled out", exit 0
         ^                   ├──> deadline exceeded ─> error, exit 1
         │                   ├──> a pod of the new ReplicaSet waits on
         │                   │    ImagePullBackOff, CrashLoopBackOff... ─> error naming
         │                   │                                             pod and reason
         │                   └──> waiting: print the line if it changed
         └── the next watch event on the object, or 1 s (pods are looked at again)
    --timeout elapsed ──> "timed out waiting for the condition", exit 1

It returns as soon as the object says the rollout is done: nothing is left
running after success. History lives in the ReplicaSets of a Deployment
(``deployment.kubernetes.io/revision``) and in the ControllerRevisions of a
StatefulSet or DaemonSet. ``undo`` copies the target revision's pod template
into the object, as kubectl does; the controller then rolls it out as the
newest revision. ``restart`` stamps the template annotation
``kubectl.kubernetes.io/restartedAt``. Writes are compare-and-swap on the
object read just before, retried on a conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from apiserver.controllers.deployments import (
    CHANGE_CAUSE,
    DESIRED_REPLICAS,
    HASH_LABEL,
    LAST_APPLIED,
    MAX_REPLICAS,
    REVISION,
    REVISION_HISTORY,
    TIMED_OUT,
    equal_ignore_hash,
    revision_of,
)
from apiserver.controllers.revisions import template_of
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.cli.fetching import drain_cancelled_stream
from shoal.cli.printing import kind_label
from shoal.cli.progress import ProgressLine, bar
from shoal.cli.reporting import CLIError, ExitCode, UsageError
from shoal.cli.session import Session
from shoal.cli.targets import parse_targets
from shoal.client import AsyncClient
from shoal.kinds import Kind
from shoal.manifests import dump_yaml, encode_message

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
# Waiting reasons of a container that mean the rollout will not finish by itself.
FAILING_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "CrashLoopBackOff",
                             "InvalidImageName", "ErrImageNeverPull", "RunContainerError",
                             "CreateContainerError", "CreateContainerConfigError"})
POLL_SECONDS = 1.0
_UPDATE_ATTEMPTS = 5
# Annotations of a ReplicaSet that `undo` does not copy back onto the Deployment.
_NOT_RESTORED = frozenset({LAST_APPLIED, REVISION, REVISION_HISTORY, DESIRED_REPLICAS,
                           MAX_REPLICAS, "deprecated.deployment.rollback.to"})

ROLLOUT_KINDS = {
    "status": ("Deployment", "StatefulSet", "DaemonSet"),
    "restart": ("Deployment", "StatefulSet", "DaemonSet"),
    "history": ("Deployment", "StatefulSet", "DaemonSet"),
    "undo": ("Deployment", "StatefulSet", "DaemonSet"),
    "pause": ("Deployment",),
    "resume": ("Deployment",),
}


class RolloutFailed(CLIError):
    """The rollout cannot finish; the message says why."""

    exit_code = ExitCode.SERVER_REFUSED


# --------------------------------------------------------------------------- status (pure)


@dataclass(frozen=True)
class Progress:
    message: str
    done: bool = False
    failed: str = ""  # why the rollout cannot finish, if it cannot


def deployment_progress(d: apps_pb2.Deployment) -> Progress:
    """kubectl's DeploymentStatusViewer."""
    name = d.metadata.name
    if d.metadata.generation > d.status.observed_generation:
        return Progress("Waiting for deployment spec update to be observed...")
    for c in d.status.conditions:
        if c.type == "Progressing" and c.reason == TIMED_OUT:
            return Progress("", failed=f'deployment "{name}" exceeded its progress deadline')
    st = d.status
    replicas = d.spec.replicas if d.spec.HasField("replicas") else 1
    if st.updated_replicas < replicas:
        return Progress(f'Waiting for deployment "{name}" rollout to finish: '
                        f"{st.updated_replicas} out of {replicas} new replicas have been "
                        "updated...")
    if st.replicas > st.updated_replicas:
        return Progress(f'Waiting for deployment "{name}" rollout to finish: '
                        f"{st.replicas - st.updated_replicas} old replicas are pending "
                        "termination...")
    if st.available_replicas < st.updated_replicas:
        return Progress(f'Waiting for deployment "{name}" rollout to finish: '
                        f"{st.available_replicas} of {st.updated_replicas} updated replicas "
                        "are available...")
    return Progress(f'deployment "{name}" successfully rolled out', done=True)


def daemonset_progress(ds: apps_pb2.DaemonSet) -> Progress:
    """kubectl's DaemonSetStatusViewer."""
    if ds.spec.update_strategy.type not in ("", "RollingUpdate"):
        return Progress("", failed="rollout status is only available for RollingUpdate "
                                   "strategy type")
    name, st = ds.metadata.name, ds.status
    if ds.metadata.generation > st.observed_generation:
        return Progress("Waiting for daemon set spec update to be observed...")
    if st.updated_number_scheduled < st.desired_number_scheduled:
        return Progress(f'Waiting for daemon set "{name}" rollout to finish: '
                        f"{st.updated_number_scheduled} out of {st.desired_number_scheduled} "
                        "new pods have been updated...")
    if st.number_available < st.desired_number_scheduled:
        return Progress(f'Waiting for daemon set "{name}" rollout to finish: '
                        f"{st.number_available} of {st.desired_number_scheduled} updated pods "
                        "are available...")
    return Progress(f'daemon set "{name}" successfully rolled out', done=True)


def statefulset_progress(sts: apps_pb2.StatefulSet) -> Progress:
    """kubectl's StatefulSetStatusViewer."""
    if sts.spec.update_strategy.type not in ("", "RollingUpdate"):
        return Progress("", failed="rollout status is only available for RollingUpdate "
                                   "strategy type")
    st = sts.status
    if st.observed_generation == 0 or sts.metadata.generation > st.observed_generation:
        return Progress("Waiting for statefulset spec update to be observed...")
    replicas = sts.spec.replicas if sts.spec.HasField("replicas") else 1
    if st.ready_replicas < replicas:
        return Progress(f"Waiting for {replicas - st.ready_replicas} pods to be ready...")
    rolling = sts.spec.update_strategy.rolling_update
    if rolling.HasField("partition") and rolling.partition > 0:
        want = replicas - rolling.partition
        if st.updated_replicas < want:
            return Progress(f"Waiting for partitioned roll out to finish: "
                            f"{st.updated_replicas} out of {want} new pods have been "
                            "updated...")
        return Progress(f"partitioned roll out complete: {st.updated_replicas} new pods have "
                        "been updated...", done=True)
    if st.update_revision and st.update_revision != st.current_revision:
        return Progress(f"waiting for statefulset rolling update to complete "
                        f"{st.updated_replicas} pods at revision {st.update_revision}...")
    return Progress(f"statefulset rolling update complete {st.current_replicas} pods at "
                    f"revision {st.current_revision}...", done=True)


def progress_of(obj: Any) -> Progress:
    if isinstance(obj, apps_pb2.Deployment):
        return deployment_progress(obj)
    if isinstance(obj, apps_pb2.DaemonSet):
        return daemonset_progress(obj)
    if isinstance(obj, apps_pb2.StatefulSet):
        return statefulset_progress(obj)
    raise UsageError(f"no rollout status for {type(obj).__name__}")


def replica_counts(obj: Any) -> str:
    """The rollout's replica counts as they move (the progress line of ``status``)."""
    if isinstance(obj, apps_pb2.DaemonSet):
        st = obj.status
        want = st.desired_number_scheduled
        return (f"updated {bar(st.updated_number_scheduled, want, width=10)}, "
                f"ready {st.number_ready}/{want}, available {st.number_available}/{want}")
    want = obj.spec.replicas if obj.spec.HasField("replicas") else 1
    st = obj.status
    return (f"updated {bar(st.updated_replicas, want, width=10)}, "
            f"ready {st.ready_replicas}/{want}, available {st.available_replicas}/{want}")


def stuck_pod(pods: Sequence[core_pb2.Pod]) -> str:
    """'pod web-x: container c is waiting: ImagePullBackOff (message)' or ''."""
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        if pod.metadata.HasField("deletion_timestamp"):
            continue
        for cs in [*pod.status.init_container_statuses, *pod.status.container_statuses]:
            reason = cs.state.waiting.reason if cs.state.HasField("waiting") else ""
            if reason in FAILING_REASONS:
                detail = f" ({cs.state.waiting.message})" if cs.state.waiting.message else ""
                return (f"pod {pod.metadata.name}: container {cs.name} is waiting: "
                        f"{reason}{detail}")
    return ""


def controlled_by(obj: Any, owner: Any) -> bool:
    return any(r.controller and r.uid == owner.metadata.uid
               for r in obj.metadata.owner_references)


def new_replicaset(d: apps_pb2.Deployment, rss: Sequence[apps_pb2.ReplicaSet]
                   ) -> apps_pb2.ReplicaSet | None:
    """The Deployment's RS running its current template (oldest first if several)."""
    mine = sorted((rs for rs in rss if controlled_by(rs, d)),
                  key=lambda rs: (rs.metadata.creation_timestamp.seconds, rs.metadata.name))
    return next((rs for rs in mine if equal_ignore_hash(rs.spec.template, d.spec.template)),
                None)


# --------------------------------------------------------------------------- history (pure)


@dataclass(frozen=True)
class Revision:
    """One entry of a workload's history: a ReplicaSet (Deployments) or a
    ControllerRevision (StatefulSets, DaemonSets)."""

    number: int
    template: core_pb2.PodTemplateSpec  # without the pod-template-hash label
    change_cause: str = ""
    # Annotations `undo` copies back onto a Deployment (a ReplicaSet's own).
    annotations: tuple[tuple[str, str], ...] = ()


def _plain_template(template: core_pb2.PodTemplateSpec) -> core_pb2.PodTemplateSpec:
    out = core_pb2.PodTemplateSpec()
    out.CopyFrom(template)
    out.metadata.labels.pop(HASH_LABEL, None)
    return out


def history(obj: Any, owned: Sequence[Any]) -> list[Revision]:
    """The revisions of ``obj``, oldest first, from the ReplicaSets or
    ControllerRevisions it controls (others in ``owned`` are ignored)."""
    out: list[Revision] = []
    for item in owned:
        if not controlled_by(item, obj):
            continue
        cause = item.metadata.annotations.get(CHANGE_CAUSE, "")
        if isinstance(item, apps_pb2.ControllerRevision):
            out.append(Revision(int(item.revision), template_of(item), cause))
            continue
        number = revision_of(item)
        if number > 0:
            kept = tuple(sorted((k, v) for k, v in item.metadata.annotations.items()
                                if k not in _NOT_RESTORED))
            out.append(Revision(number, _plain_template(item.spec.template), cause, kept))
    return sorted(out, key=lambda r: r.number)


def history_lines(kind: Kind, obj: Any, owned: Sequence[Any]) -> list[str]:
    rows = [("REVISION", "CHANGE-CAUSE")] + [
        (str(r.number), r.change_cause or "<none>") for r in history(obj, owned)]
    width = max(len(r[0]) for r in rows) + 2
    return [f"{kind_label(kind)}/{obj.metadata.name}",
            *[f"{a.ljust(width)}{b}" for a, b in rows], ""]


def revision_template_lines(kind: Kind, obj: Any, owned: Sequence[Any],
                            revision: int) -> list[str]:
    found = next((r for r in history(obj, owned) if r.number == revision), None)
    if found is None:
        raise RolloutFailed(f"unable to find the specified revision {revision}")
    return [f"{kind_label(kind)}/{obj.metadata.name} with revision #{revision}",
            "Pod Template:", *("  " + ln for ln in
                               dump_yaml(encode_message(found.template)).splitlines())]


def undo_target(obj: Any, owned: Sequence[Any], to_revision: int) -> Revision:
    """The revision to go back to: ``to_revision``, or (0) the one before the
    current (the newest whose template is the object's, else the newest)."""
    revisions = history(obj, owned)
    if to_revision > 0:
        for r in revisions:
            if r.number == to_revision:
                return r
        raise RolloutFailed(f"unable to find specified revision {to_revision} in history")
    if not revisions:
        raise RolloutFailed(f'no rollout history found for {type(obj).__name__.lower()} '
                            f'"{obj.metadata.name}"')
    mine = _plain_template(obj.spec.template)
    matching = [r.number for r in revisions if r.template == mine]
    current = max(matching) if matching else revisions[-1].number
    earlier = [r for r in revisions if r.number < current]
    if not earlier:
        raise RolloutFailed("no previous revision to roll back to")
    return earlier[-1]


def rolled_back(obj: Any, revision: Revision) -> Any | None:
    """``obj`` with the revision's template (and, for a Deployment, its
    ReplicaSet's annotations), or None if the template is already that one."""
    if revision.template == _plain_template(obj.spec.template):
        return None
    out = type(obj)()
    out.CopyFrom(obj)
    out.spec.template.CopyFrom(revision.template)
    for k, v in revision.annotations:
        out.metadata.annotations[k] = v
    return out


def restarted(obj: Any, now: float) -> Any:
    out = type(obj)()
    out.CopyFrom(obj)
    stamp = datetime.datetime.fromtimestamp(int(now), tz=datetime.UTC)
    out.spec.template.metadata.annotations[RESTARTED_AT] = stamp.isoformat().replace(
        "+00:00", "Z")
    return out


# --------------------------------------------------------------------------- commands


def _target(session: Session, action: str, args: Sequence[str]) -> tuple[Kind, str]:
    targets = parse_targets(args, session.kinds)
    names = [(t.kind, n) for t in targets for n in t.names]
    if len(targets) != 1 or len(names) != 1:
        raise UsageError(f"rollout {action} takes one object: TYPE/NAME or TYPE NAME "
                         "(e.g. deployment/web)")
    kind, name = names[0]
    allowed = ROLLOUT_KINDS[action]
    if kind.kind not in allowed:
        plural = ", ".join(a.lower() + "s" for a in allowed)
        raise UsageError(f'rollout {action} is not supported for {kind.resource}: '
                         f"use {plural}")
    return kind, name


async def _edit(client: AsyncClient, kind: Kind, name: str, namespace: str,
                change: Callable[[Any], Any | None]) -> tuple[Any, bool]:
    """Read, change, write with the read's resourceVersion; retry on Conflict.
    ``change`` returns the new object, or None when there is nothing to do."""
    for _ in range(_UPDATE_ATTEMPTS):
        obj = await client.get(kind.message, name, namespace=namespace)
        new = change(obj)
        if new is None:
            return obj, False
        try:
            return await client.update(new), True
        except errors.Conflict:
            continue
    raise errors.Conflict(f'{kind.resource} "{name}" kept changing; try again')


async def run_rollout(session: Session, *, action: str, args: Sequence[str],
                      to_revision: int = 0, revision: int = 0,
                      timeout: float | None = None) -> int:
    if action not in ROLLOUT_KINDS:
        raise UsageError(f"unknown rollout command {action!r}")
    kind, name = _target(session, action, args)
    client = session.client()
    namespace = session.namespace
    label = f"{kind_label(kind)}/{name}"
    if action == "status":
        return await _status(session, kind, name, namespace, timeout)
    if action == "history":
        obj = await client.get(kind.message, name, namespace=namespace)
        owned = await _owned_history(client, kind, namespace)
        lines = (revision_template_lines(kind, obj, owned, revision) if revision > 0
                 else history_lines(kind, obj, owned))
        for line in lines:
            session.print(line)
        return ExitCode.OK
    if action in ("pause", "resume"):
        want = action == "pause"

        def toggle(obj: Any) -> Any | None:
            if obj.spec.paused == want:
                return None
            out = type(obj)()
            out.CopyFrom(obj)
            out.spec.paused = want
            return out
        _, changed = await _edit(client, kind, name, namespace, toggle)
        if not changed:
            raise RolloutFailed(f'{kind.qualified_resource} "{name}" is '
                                f'{"already paused" if want else "not paused"}')
        session.print(f"{label} {'paused' if want else 'resumed'}")
        return ExitCode.OK
    if action == "restart":
        def restart(obj: Any) -> Any:
            if getattr(obj.spec, "paused", False):
                raise RolloutFailed(f"can't restart paused {kind.singular} (run rollout "
                                    "resume first)")
            return restarted(obj, session.clock())
        await _edit(client, kind, name, namespace, restart)
        session.print(f"{label} restarted")
        return ExitCode.OK
    return await _undo(session, kind, name, namespace, to_revision)


async def _owned_history(client: AsyncClient, kind: Kind, namespace: str) -> list[Any]:
    """What holds the history: ReplicaSets for Deployments, else ControllerRevisions."""
    if kind.kind == "Deployment":
        return list((await client.list(apps_pb2.ReplicaSet, namespace=namespace)).items)
    return list((await client.list(apps_pb2.ControllerRevision, namespace=namespace)).items)


async def _undo(session: Session, kind: Kind, name: str, namespace: str,
                to_revision: int) -> int:
    client = session.client()
    owned = await _owned_history(client, kind, namespace)
    skipped: list[int] = []

    def undo(obj: Any) -> Any | None:
        if getattr(obj.spec, "paused", False):
            raise RolloutFailed("you cannot rollback a paused deployment; resume it first "
                                "with 'shoal rollout resume' and try again")
        target = undo_target(obj, owned, to_revision)
        out = rolled_back(obj, target)
        if out is None:
            skipped.append(target.number)
        return out
    await _edit(client, kind, name, namespace, undo)
    label = f"{kind_label(kind)}/{name}"
    if skipped:
        session.print(f"{label} skipped rollback (current template already matches "
                      f"revision {skipped[0]})")
    else:
        session.print(f"{label} rolled back")
    return ExitCode.OK


async def _status(session: Session, kind: Kind, name: str, namespace: str,
                  timeout: float | None) -> int:
    client = session.client()
    changed = asyncio.Event()

    async def watch() -> None:
        events = client.watch(kind.message, namespace=namespace,
                              field_selector=f"metadata.name={name}")
        async with contextlib.aclosing(events):
            async for _ in events:
                changed.set()

    # On a terminal, stderr also shows the replica counts as they move.
    line = ProgressLine(session.err)

    async def until_done() -> int:
        last = ""
        while True:
            changed.clear()
            obj = await client.get(kind.message, name, namespace=namespace)
            progress = progress_of(obj)
            if progress.failed:
                raise RolloutFailed(progress.failed)  # the line is cleared below
            if not progress.done:
                await _check_pods(client, kind, obj, namespace)
            if progress.message and progress.message != last:
                line.clear()
                session.print(progress.message)
                last = progress.message
            if progress.done:
                line.clear()
                return ExitCode.OK
            line.update(replica_counts(obj))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await changed.wait()

    watcher = asyncio.create_task(watch(), name="rollout-status-watch")
    try:
        return await _bounded(until_done(), timeout)
    finally:
        line.clear()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.ShoalError):
            await watcher
        await drain_cancelled_stream()


async def _bounded(work: Awaitable[int], timeout: float | None) -> int:
    try:
        async with asyncio.timeout(timeout):
            return await work
    except TimeoutError:
        raise RolloutFailed("timed out waiting for the condition") from None


def _selector(obj: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(obj.spec.selector.match_labels.items()))


async def _check_pods(client: AsyncClient, kind: Kind, obj: Any, namespace: str) -> None:
    """Fail if a pod the rollout waits for is stuck: the new ReplicaSet's pods
    for a Deployment, the update revision's for a StatefulSet, every one of a
    DaemonSet's."""
    owner, label = obj, ""
    if isinstance(obj, apps_pb2.Deployment):
        rss = (await client.list(apps_pb2.ReplicaSet, namespace=namespace,
                                 label_selector=_selector(obj))).items
        new = new_replicaset(obj, rss)
        pod_hash = new.spec.template.metadata.labels.get(HASH_LABEL, "") if new else ""
        if new is None or not pod_hash:
            return
        owner, label = new, f"{HASH_LABEL}={pod_hash}"
    elif isinstance(obj, apps_pb2.StatefulSet) and obj.status.update_revision:
        label = f"controller-revision-hash={obj.status.update_revision}"
    selector = ",".join(x for x in (_selector(obj), label) if x)
    pods = (await client.list(core_pb2.Pod, namespace=namespace,
                              label_selector=selector)).items
    stuck = stuck_pod([p for p in pods if controlled_by(p, owner)])
    if stuck:
        raise RolloutFailed(f'{kind.singular} "{obj.metadata.name}" rollout failed: {stuck}')
