"""``plan(pod, record)``: what to do for one pod, decided without doing it.

The kubelet's ``computePodActions``, small. Inputs are the desired pod (the
API object), what the runtime holds for it (:class:`PodRecord`), what the
prober concluded, the restart back-off, and the time. The output is a frozen
:class:`PodActions`; the pod worker carries it out. No I/O here.

Decision order::

    being deleted ............................ kill everything (graceful); start nothing
    finished (policy forbids more runs) ...... kill the sandbox if it is still up
    no ready sandbox ......................... kill what is left; new sandbox
                                               (attempt + 1); start from the first
                                               init container (or all containers)
    init containers, in order ................ start the first not yet succeeded;
                                               while one runs, nothing else starts;
                                               a failed one: restart with back-off
                                               (Never: the pod fails)
    containers ............................... start missing ones; restart exited
                                               ones per restartPolicy with back-off;
                                               kill-and-restart on a failed liveness
                                               probe or a changed spec (image)
    garbage .................................. remove exited instances older than
                                               the newest two of each container
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nodeagent.restarts import RestartTracker, key
from nodeagent.runtimestate import ContainerRecord, ContainerState, PodRecord, ProbeView


def as_container(ephemeral: Any) -> Any:
    """An EphemeralContainer read as the Container it is numbered like (its
    target is dropped: that is where it runs, not what it is)."""
    from shoal.api.core.v1 import core_pb2

    copy = core_pb2.EphemeralContainer()
    copy.CopyFrom(ephemeral)
    copy.ClearField("target_container_name")
    return core_pb2.Container.FromString(copy.SerializeToString())


def spec_hash(container: Any) -> str:
    """A short digest of a container's spec; a change means restart it."""
    return hashlib.sha256(container.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass(frozen=True)
class PodActions:
    kill_pod: bool = False
    create_sandbox: bool = False
    sandbox_attempt: int = 0
    # Start this init container (by name), or these regular containers, in order.
    start_init: str = ""
    start: tuple[str, ...] = ()
    # Ephemeral containers (shoal debug) never started yet: each runs once.
    start_ephemeral: tuple[str, ...] = ()
    # Container IDs to stop, with why (shown in events and logs).
    kill: tuple[tuple[str, str], ...] = ()
    # Exited instances no longer needed (older than the latest of their name).
    remove: tuple[str, ...] = ()
    # Containers waiting to restart: name -> (reason, message).
    waiting: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # Look at this pod again after this many seconds (a back-off ends).
    requeue_after: float | None = None
    # The pod has failed for good (an init container failed under Never).
    failed: bool = False
    # Nothing will ever run again for this pod (Succeeded or Failed).
    finished: bool = False

    @property
    def idle(self) -> bool:
        return not (self.kill_pod or self.create_sandbox or self.start_init or self.start
                    or self.start_ephemeral or self.kill or self.remove)


def _should_restart(policy: str, c: ContainerRecord) -> bool:
    if policy == "Always":
        return True
    if policy == "OnFailure":
        return c.exit_code != 0
    return False


def _finished(pod: Any, record: PodRecord) -> tuple[bool, bool]:
    """(finished, failed) for a pod whose restartPolicy forbids further runs."""
    policy = pod.spec.restart_policy or "Always"
    if policy == "Always":
        return False, False
    for ic in pod.spec.init_containers:
        c = record.latest(ic.name, init=True)
        if c is not None and c.state is ContainerState.EXITED and c.exit_code != 0 \
                and policy == "Never":
            return True, True
    results = []
    for spec in pod.spec.containers:
        c = record.latest(spec.name, init=False)
        if c is None or c.state is not ContainerState.EXITED:
            return False, False
        if _should_restart(policy, c):
            return False, False
        results.append(c.exit_code == 0)
    return True, not all(results)


def _garbage(record: PodRecord) -> tuple[str, ...]:
    """Exited instances beyond the newest two of each container: the current one
    and the one before it (its exit is the status' lastState and ``logs -p``)."""
    by_name: dict[tuple[str, bool], list[ContainerRecord]] = {}
    for c in record.containers:
        by_name.setdefault((c.name, c.init), []).append(c)
    out = []
    for instances in by_name.values():
        instances.sort(key=lambda c: (c.attempt, c.created_at), reverse=True)
        out += [c.id for c in instances[2:] if c.state is ContainerState.EXITED]
    return tuple(out)


def plan(pod: Any, record: PodRecord, *, probes: ProbeView, restarts: RestartTracker,
         now: float) -> PodActions:
    """Decide the next step for ``pod``. See the module docstring."""
    uid = pod.metadata.uid
    running = record.running()
    sandbox = record.sandbox
    if pod.metadata.HasField("deletion_timestamp"):
        return PodActions(kill_pod=bool(running) or bool(sandbox and sandbox.ready),
                          finished=True)
    finished, failed = _finished(pod, record)
    garbage = _garbage(record)
    if finished or (pod.status.phase in ("Succeeded", "Failed") and not running):
        return PodActions(kill_pod=bool(running) or bool(sandbox and sandbox.ready),
                          finished=True, failed=failed or pod.status.phase == "Failed",
                          remove=garbage)
    if sandbox is None or not sandbox.ready:
        first = pod.spec.init_containers[0].name if pod.spec.init_containers else ""
        return PodActions(
            kill_pod=bool(running) or sandbox is not None,
            create_sandbox=True,
            sandbox_attempt=(sandbox.attempt + 1) if sandbox else 0,
            start_init=first,
            start=() if first else tuple(c.name for c in pod.spec.containers))
    policy = pod.spec.restart_policy or "Always"
    waiting: dict[str, tuple[str, str]] = {}
    requeue: list[float] = []

    # Init containers: strictly one after another.
    for ic in pod.spec.init_containers:
        c = record.latest(ic.name, init=True)
        if c is None or c.state is ContainerState.CREATED:
            return PodActions(start_init=ic.name, remove=garbage)
        if c.state is ContainerState.RUNNING or c.state is ContainerState.UNKNOWN:
            return PodActions(remove=garbage)
        if c.exit_code == 0:
            continue
        if policy == "Never":
            return PodActions(kill_pod=True, failed=True, finished=True, remove=garbage)
        verdict = restarts.check(key(uid, ic.name), finished_at=c.finished_at, now=now)
        if verdict.go:
            return PodActions(start_init=ic.name, remove=garbage)
        return PodActions(waiting={ic.name: (verdict.reason,
                                              f"{verdict.message} {ic.name}"
                                              f" in pod {pod.metadata.name}")},
                          requeue_after=verdict.wait, remove=garbage)

    start: list[str] = []
    kill: list[tuple[str, str]] = []
    for spec in pod.spec.containers:
        c = record.latest(spec.name, init=False)
        if c is None or c.state is ContainerState.CREATED:
            start.append(spec.name)
            continue
        if c.state is ContainerState.RUNNING:
            if c.spec_hash and c.spec_hash != spec_hash(spec):
                kill.append((c.id, "the container's spec changed; it will be restarted"))
            elif probes.live.get(spec.name) is False:
                kill.append((c.id, "the liveness probe failed; the container will be "
                                   "restarted" if policy != "Never" else
                             "the liveness probe failed"))
            continue
        if c.state is ContainerState.UNKNOWN:
            continue
        if not _should_restart(policy, c):
            continue
        verdict = restarts.check(key(uid, spec.name), finished_at=c.finished_at, now=now)
        if verdict.go:
            start.append(spec.name)
        else:
            waiting[spec.name] = (verdict.reason, f"{verdict.message} {spec.name} in pod "
                                                  f"{pod.metadata.name}")
            requeue.append(verdict.wait)
    ephemeral = tuple(e.name for e in pod.spec.ephemeral_containers
                      if record.latest(e.name, init=False) is None)
    return PodActions(start=tuple(start), kill=tuple(kill), waiting=waiting, remove=garbage,
                      start_ephemeral=ephemeral,
                      requeue_after=min(requeue) if requeue else None)
