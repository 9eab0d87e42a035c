"""The StatefulSet controller: pods with stable names, started and stopped in order.

    StatefulSet / Pod events --> StatefulSet keys --> WorkQueue
    worker(key):
      revisions: ControllerRevision <name>-<hash> of the current template; pods carry
                 its name in label controller-revision-hash
      plan(sts, pods, current_revision, update_revision, now)             [pure]
      executor: create / delete (uid preconditions), events, status

Pods are ``<name>-<ordinal>`` for ordinals ``start .. start+replicas-1``
(``spec.ordinals.start``, default 0); each gets ``hostname`` = its name and
``subdomain`` = ``spec.serviceName``, so a headless Service gives it the DNS
name ``web-0.web.<ns>.svc``, and labels ``statefulset.kubernetes.io/pod-name``,
``apps.kubernetes.io/pod-index`` and ``controller-revision-hash``.

One pass of ``plan`` (Kubernetes' ``updateStatefulSet``), OrderedReady::

    for each ordinal, lowest first:
        missing                    -> create it; stop (one at a time)
        Failed / Succeeded         -> delete it (recreated, same name, next pass); stop
        terminating or not Ready   -> stop (wait)
    scale down (ordinals >= replicas), highest first, only when all others are
        Running and Ready          -> delete one; stop
    RollingUpdate, from the highest ordinal down to ``partition``:
        pod of an old revision     -> delete it (recreated at the update revision); stop
        pod not Running and Ready  -> stop (wait)

Parallel does the first two steps for every pod at once, without waiting; the
rolling update is the same. A pod below the partition is (re)created from the
current revision, one at or above it from the update revision. When every pod
is updated and ready, the update revision becomes the current one.

Not modelled: volumeClaimTemplates (no persistent volumes yet; the claims are
ignored), ``maxUnavailable`` for StatefulSets (alpha in Kubernetes: updates go
one pod at a time), minReadySeconds gating of the ordered start.

Contract: ``plan`` is pure and takes ``now``. Pod names are the identity, so a
create is safe to repeat (AlreadyExists is success) and a delete carries the
pod's uid. Failures go back to the queue with per-key back-off.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from apiserver.controllers import revisions as rv
from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import run_workers
from apiserver.controllers.replicasets import (
    controller_of,
    is_available,
    is_ready,
    owner_reference,
    ready_since,
)
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.informer import NAMESPACE_INDEX, Informer, key_of
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

KIND = "StatefulSet"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
_ORDINAL = re.compile(r"^(.*)-(\d+)$")


# -- pure ----------------------------------------------------------------------------------


def ordinal_of(sts_name: str, pod_name: str) -> int | None:
    m = _ORDINAL.match(pod_name)
    if m is None or m.group(1) != sts_name:
        return None
    return int(m.group(2))


def replicas_of(sts: apps_pb2.StatefulSet) -> int:
    return int(sts.spec.replicas) if sts.spec.HasField("replicas") else 1


def partition_of(sts: apps_pb2.StatefulSet) -> int:
    rolling = sts.spec.update_strategy.rolling_update
    return int(rolling.partition) if rolling.HasField("partition") else 0


def revision_of(pod: core_pb2.Pod) -> str:
    return pod.metadata.labels.get(rv.REVISION_HASH_LABEL, "")


def _terminating(pod: core_pb2.Pod) -> bool:
    return pod.metadata.HasField("deletion_timestamp")


def _finished(pod: core_pb2.Pod) -> bool:
    return pod.status.phase in ("Failed", "Succeeded")


def running_and_ready(pod: core_pb2.Pod) -> bool:
    return pod.status.phase == "Running" and is_ready(pod) and not _terminating(pod)


@dataclass(frozen=True)
class PodRef:
    name: str
    uid: str
    ordinal: int


@dataclass(frozen=True)
class Counts:
    replicas: int = 0
    ready: int = 0
    available: int = 0
    current: int = 0
    updated: int = 0


@dataclass(frozen=True)
class StatefulSetPlan:
    create: tuple[int, ...] = ()                 # ordinals
    delete: tuple[PodRef, ...] = ()
    recreate_failed: tuple[PodRef, ...] = ()     # among delete: failed pods
    counts: Counts = field(default_factory=Counts)
    # The current revision after this pass (the update revision once it is complete).
    current_revision: str = ""
    waiting_for: str = ""                        # what an OrderedReady pass waits on
    recheck_after: float | None = None


def _ref(pod: core_pb2.Pod, ordinal: int) -> PodRef:
    return PodRef(pod.metadata.name, pod.metadata.uid, ordinal)


def plan(sts: apps_pb2.StatefulSet, pods: Iterable[core_pb2.Pod], *, current_revision: str,
         update_revision: str, now: float) -> StatefulSetPlan:
    """``pods``: those ``sts`` controls; ``current_revision`` may be "" (first pass)."""
    name = sts.metadata.name
    start = sts.spec.ordinals.start
    n = replicas_of(sts)
    monotonic = sts.spec.pod_management_policy != "Parallel"
    current_revision = current_revision or update_revision
    members: dict[int, core_pb2.Pod] = {}
    for p in pods:
        o = ordinal_of(name, p.metadata.name)
        if o is not None:
            members[o] = p
    in_range = range(start, start + n)
    condemned = sorted((o for o in members if o not in in_range), reverse=True)
    counts = _counts(sts, members.values(), current_revision=current_revision,
                     update_revision=update_revision, now=now)
    create: list[int] = []
    delete: list[PodRef] = []
    failed: list[PodRef] = []
    waiting = ""

    def done(why: str) -> StatefulSetPlan:
        return _result(sts, create, delete, failed=failed, counts=counts,
                       current_revision=current_revision, update_revision=update_revision,
                       pods=members.values(), waiting=why, now=now)

    for o in in_range:
        pod = members.get(o)
        if pod is None:
            create.append(o)
            if monotonic:
                return done(f"{name}-{o} to be created")
            continue
        if _finished(pod) and not _terminating(pod):
            failed.append(_ref(pod, o))
            delete.append(_ref(pod, o))
            if monotonic:
                return done(f"failed {pod.metadata.name} to be recreated")
            continue
        if monotonic and not running_and_ready(pod):
            return done(f"{pod.metadata.name} to be Running and Ready")
    for o in condemned:
        pod = members[o]
        if _terminating(pod):
            if monotonic:
                return done(f"{pod.metadata.name} to terminate")
            continue
        if monotonic and any(not running_and_ready(p) for k, p in members.items() if k != o):
            return done("every other pod to be Running and Ready before scaling down")
        delete.append(_ref(pod, o))
        if monotonic:
            return done("")
    if sts.spec.update_strategy.type in ("", "RollingUpdate") and not delete and not create:
        floor = start + partition_of(sts)
        for o in reversed(in_range):
            if o < floor:
                break
            pod = members.get(o)
            if pod is None:
                break
            if revision_of(pod) != update_revision and not _terminating(pod):
                delete.append(_ref(pod, o))
                break
            if not running_and_ready(pod):
                waiting = f"{pod.metadata.name} to be Running and Ready (update)"
                break
    return done(waiting)


def _counts(sts: apps_pb2.StatefulSet, pods: Iterable[core_pb2.Pod], *, current_revision: str,
            update_revision: str, now: float) -> Counts:
    live = [p for p in pods if not _terminating(p)]
    return Counts(
        replicas=len(live),
        ready=sum(1 for p in live if is_ready(p)),
        available=sum(1 for p in live if is_available(p, sts.spec.min_ready_seconds, now)),
        current=sum(1 for p in live if revision_of(p) == current_revision),
        updated=sum(1 for p in live if revision_of(p) == update_revision))


def _result(sts: apps_pb2.StatefulSet, create: Sequence[int], delete: Sequence[PodRef], *,
            failed: Sequence[PodRef], counts: Counts, current_revision: str,
            update_revision: str, pods: Iterable[core_pb2.Pod], waiting: str,
            now: float) -> StatefulSetPlan:
    n = replicas_of(sts)
    complete = (counts.updated == counts.replicas == counts.ready == n
                and not create and not delete)
    if complete and sts.spec.update_strategy.type in ("", "RollingUpdate"):
        current_revision = update_revision
    recheck = math.inf
    min_ready = sts.spec.min_ready_seconds
    if min_ready > 0:
        for p in pods:
            since = ready_since(p)
            if since is not None and since + min_ready > now:
                recheck = min(recheck, since + min_ready - now)
    return StatefulSetPlan(create=tuple(create), delete=tuple(delete),
                           recreate_failed=tuple(failed), counts=counts,
                           current_revision=current_revision, waiting_for=waiting,
                           recheck_after=None if recheck == math.inf else recheck)


def revision_for(sts: apps_pb2.StatefulSet, ordinal: int, *, current_revision: str,
                 update_revision: str) -> str:
    """Below the partition a pod keeps the current revision; from it on, the update one."""
    if sts.spec.update_strategy.type in ("", "RollingUpdate") and current_revision and \
            ordinal - sts.spec.ordinals.start < partition_of(sts):
        return current_revision
    return update_revision


def status_of(sts: apps_pb2.StatefulSet, actions: StatefulSetPlan, *, update_revision: str
              ) -> apps_pb2.StatefulSetStatus:
    st = apps_pb2.StatefulSetStatus()
    st.CopyFrom(sts.status)
    c = actions.counts
    st.observed_generation = sts.metadata.generation
    st.replicas = c.replicas
    st.ready_replicas = c.ready
    st.available_replicas = c.available
    st.updated_replicas = c.updated
    st.current_revision = actions.current_revision
    st.update_revision = update_revision
    st.current_replicas = c.updated if actions.current_revision == update_revision \
        else c.current
    return st


def pod_for(sts: apps_pb2.StatefulSet, ordinal: int, *, template: core_pb2.PodTemplateSpec,
            revision: str) -> core_pb2.Pod:
    name = f"{sts.metadata.name}-{ordinal}"
    pod = core_pb2.Pod()
    pod.metadata.name = name
    pod.metadata.namespace = sts.metadata.namespace
    pod.metadata.labels.update(template.metadata.labels)
    pod.metadata.labels[POD_NAME_LABEL] = name
    pod.metadata.labels[POD_INDEX_LABEL] = str(ordinal)
    pod.metadata.labels[rv.REVISION_HASH_LABEL] = revision
    pod.metadata.annotations.update(template.metadata.annotations)
    pod.metadata.finalizers.extend(template.metadata.finalizers)
    pod.metadata.owner_references.append(owner_reference(sts, kind=KIND))
    pod.spec.CopyFrom(template.spec)
    pod.spec.hostname = name
    if sts.spec.service_name:
        pod.spec.subdomain = sts.spec.service_name
    return pod


# -- the controller --------------------------------------------------------------------------


class StatefulSetController:
    name = "statefulset"

    def __init__(self) -> None:
        self.queue = WorkQueue()
        self._ctx: ControllerContext | None = None
        self._sts: Informer[apps_pb2.StatefulSet] | None = None
        self._pods: Informer[core_pb2.Pod] | None = None
        self._revs: Informer[apps_pb2.ControllerRevision] | None = None

    @property
    def ctx(self) -> ControllerContext:
        assert self._ctx is not None, "setup() first"
        return self._ctx

    @property
    def statefulsets(self) -> Informer[apps_pb2.StatefulSet]:
        assert self._sts is not None, "setup() first"
        return self._sts

    @property
    def pods(self) -> Informer[core_pb2.Pod]:
        assert self._pods is not None, "setup() first"
        return self._pods

    @property
    def revisions(self) -> Informer[apps_pb2.ControllerRevision]:
        assert self._revs is not None, "setup() first"
        return self._revs

    def setup(self, ctx: ControllerContext) -> None:
        self._ctx = ctx
        self._sts = ctx.informers.get(apps_pb2.StatefulSet)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._revs = ctx.informers.get(apps_pb2.ControllerRevision)
        self._sts.add_handlers(on_add=self._enqueue,
                               on_update=lambda _o, n: self._enqueue(n))
        self._pods.add_handlers(on_add=self._pod_changed,
                                on_update=lambda _o, n: self._pod_changed(n),
                                on_delete=self._pod_changed)

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        try:
            await run_workers(self.queue, self.sync, count=ctx.settings.workers,
                              what="statefulset")
        finally:
            self.queue.close()

    def _enqueue(self, sts: apps_pb2.StatefulSet) -> None:
        self.queue.add(key_of(sts))

    def _pod_changed(self, pod: core_pb2.Pod) -> None:
        ref = controller_of(pod.metadata)
        if ref is not None and ref.kind == KIND:
            self.queue.add(f"{pod.metadata.namespace}/{ref.name}")

    async def sync(self, key: str) -> float | None:
        ctx = self.ctx
        sts = self.statefulsets.get_by_key(key)
        if sts is None or sts.metadata.HasField("deletion_timestamp"):
            return None
        ns, uid = sts.metadata.namespace, sts.metadata.uid
        pods = [p for p in self.pods.by_index(NAMESPACE_INDEX, ns)
                if (ref := controller_of(p.metadata)) is not None and ref.uid == uid]
        revs = [r for r in self.revisions.by_index(NAMESPACE_INDEX, ns)
                if (ref := controller_of(r.metadata)) is not None and ref.uid == uid]
        limit = sts.spec.revision_history_limit if sts.spec.HasField(
            "revision_history_limit") else 10
        collision = sts.status.collision_count if sts.status.HasField("collision_count") \
            else 0
        in_use = {revision_of(p).rsplit("-", 1)[-1] for p in pods}
        in_use.add(sts.status.current_revision.rsplit("-", 1)[-1])
        rplan = rv.plan_revisions(sts, kind=KIND, revisions=revs, collision_count=collision,
                                  history_limit=limit, in_use=in_use)
        if not await self._write_revision(sts, rplan, collision):
            return None
        update = rplan.update_name
        templates = {r.metadata.name: rv.template_of(r) for r in revs}
        if rplan.create is not None:
            templates[update] = sts.spec.template
        current = sts.status.current_revision
        if current not in templates:
            current = ""  # its revision is gone: treat every pod as to be updated
        actions = plan(sts, pods, current_revision=current, update_revision=update,
                       now=ctx.clock())
        failure: errors.ShoalError | None = None
        try:
            for o in actions.create:
                rev = revision_for(sts, o, current_revision=current, update_revision=update)
                await self._create(sts, pod_for(sts, o, template=templates.get(
                    rev, sts.spec.template), revision=rev))
            for gone in actions.delete:
                await self._delete(sts, gone, failed=gone in actions.recreate_failed)
        except errors.ShoalError as e:
            failure = e
        for name in rplan.prune:
            try:
                await ctx.client.delete(apps_pb2.ControllerRevision, name, namespace=ns)
            except errors.NotFound:
                pass
        status = status_of(sts, actions, update_revision=update)
        if status != sts.status:
            fresh = apps_pb2.StatefulSet()
            fresh.CopyFrom(sts)
            fresh.status.CopyFrom(status)
            fresh.metadata.resource_version = ""
            try:
                await ctx.client.update_status(fresh)
            except errors.NotFound:
                return None
        if failure is not None:
            raise failure
        return actions.recheck_after

    async def _write_revision(self, sts: apps_pb2.StatefulSet, rplan: rv.RevisionPlan,
                              collision: int) -> bool:
        client = self.ctx.client
        if rplan.renumber is not None:
            await client.update(rplan.renumber)
        if rplan.create is None:
            return True
        try:
            await client.create(rplan.create)
            return True
        except errors.AlreadyExists:
            found = await client.get(apps_pb2.ControllerRevision, rplan.create.metadata.name,
                                     namespace=sts.metadata.namespace)
            ref = controller_of(found.metadata)
            if found.data == rplan.create.data and ref is not None \
                    and ref.uid == sts.metadata.uid:
                return True
        fresh = apps_pb2.StatefulSet()
        fresh.CopyFrom(sts)
        fresh.status.collision_count = collision + 1
        fresh.metadata.resource_version = ""
        await client.update_status(fresh)
        return False

    async def _create(self, sts: apps_pb2.StatefulSet, pod: core_pb2.Pod) -> None:
        name, set_name = pod.metadata.name, sts.metadata.name
        try:
            await self.ctx.client.create(pod)
        except errors.AlreadyExists:
            return  # the cache had not seen it yet
        except errors.ShoalError as e:
            self.ctx.events.event(sts, "Warning", "FailedCreate",
                                  f"create Pod {name} in StatefulSet {set_name} failed "
                                  f"error: {e.message}")
            raise
        log.info("statefulset %s: created pod %s", key_of(sts), name)
        self.ctx.events.event(sts, "Normal", "SuccessfulCreate",
                              f"create Pod {name} in StatefulSet {set_name} successful")

    async def _delete(self, sts: apps_pb2.StatefulSet, ref: PodRef, *, failed: bool) -> None:
        set_name = sts.metadata.name
        if failed:
            self.ctx.events.event(sts, "Warning", "RecreatingFailedPod",
                                  f"StatefulSet {key_of(sts)} is recreating failed Pod "
                                  f"{ref.name}")
        try:
            await self.ctx.client.delete(core_pb2.Pod, ref.name,
                                         namespace=sts.metadata.namespace, uid=ref.uid)
        except (errors.NotFound, errors.Conflict):
            return
        log.info("statefulset %s: deleted pod %s", key_of(sts), ref.name)
        self.ctx.events.event(sts, "Normal", "SuccessfulDelete",
                              f"delete Pod {ref.name} in StatefulSet {set_name} successful")
