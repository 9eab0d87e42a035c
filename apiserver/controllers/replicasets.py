"""The ReplicaSet controller: keep ``spec.replicas`` pods of one template alive.

Kubernetes' ``pkg/controller/replicaset``, in the plan-then-act shape::

    Pod events ──> the controlling RS's key (an orphan: every RS whose selector
    RS events  ──> the RS's key                       matches it)  ──> WorkQueue
    worker(key):
        RS gone ──────────────────────────────────────────> forget expectations
        pods of the namespace (informer cache)
          └─ plan(rs, pods, now, satisfied=expectations.satisfied(key))   [pure]
               adopt    orphans the selector matches (controller ownerReference)
               release  owned pods the selector no longer matches
               create   N pods  (only when expectations are satisfied)
               delete   these pods, best candidates first (idem)
               status   replicas, fullyLabeled, ready, available, observedGeneration
        executor: adopt/release (CAS on the pod) -> creates in slow-start batches
                  -> deletes -> UpdateStatus when the status changed
                  -> requeue when a ready pod becomes available (minReadySeconds)

Expectations (per RS key), so a burst of creates is not repeated before the
informer has seen the pods::

    satisfied ──plan creates {names} / deletes {uids}──> expecting
    expecting ──informer: pod added (name) / deleted or terminating (uid)──> shrinks
    expecting ──create or delete call failed──> that item dropped
    expecting ──empty, or older than EXPECTATIONS_TTL──> satisfied

Contract:
- ``plan`` and ``status_of`` are pure; time is passed in.
- Every write is safe to repeat: adoption and release are compare-and-swap
  updates of the pod, deletes carry the pod's UID as a precondition, and pod
  names are fresh random ones.
- A failed write raises to the worker, which re-queues the key with per-key
  back-off; success resets it. Nothing here retries by itself.

Pods are deleted in Kubernetes' order (``ActivePodsWithRanks``): unscheduled
before scheduled, Pending before Unknown before Running, not ready before ready,
lower ``controller.kubernetes.io/pod-deletion-cost`` first, pods doubled up on a
node before lone ones, ready for a shorter time, more restarts, newer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import run_workers
from shoal import errors, selectors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.informer import NAMESPACE_INDEX, Informer, key_of
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

# At most this many pods are created or deleted in one sync (Kubernetes' burstReplicas).
BURST_REPLICAS = 500
# Expectations older than this are considered satisfied (a lost watch event
# must not wedge a ReplicaSet forever).
EXPECTATIONS_TTL = 300.0
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Kubernetes' name generator: 5 characters from an alphabet without vowels.
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATED_BASE = 63 - 5


# --------------------------------------------------------------------------- pods


def seconds(ts: timestamp_pb2.Timestamp) -> float | None:
    """Epoch seconds of a timestamp, None when it is unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def is_active(pod: core_pb2.Pod) -> bool:
    """Neither finished nor being deleted (Kubernetes' FilterActivePods)."""
    return (pod.status.phase not in ("Succeeded", "Failed")
            and not pod.metadata.HasField("deletion_timestamp"))


def ready_condition(pod: core_pb2.Pod) -> core_pb2.PodCondition | None:
    for c in pod.status.conditions:
        if c.type == "Ready":
            return c
    return None


def is_ready(pod: core_pb2.Pod) -> bool:
    c = ready_condition(pod)
    return c is not None and c.status == "True"


def ready_since(pod: core_pb2.Pod) -> float | None:
    """When the pod last became ready; None when it is not ready."""
    c = ready_condition(pod)
    if c is None or c.status != "True":
        return None
    return seconds(c.last_transition_time)


def is_available(pod: core_pb2.Pod, min_ready_seconds: int, now: float) -> bool:
    """Ready for at least ``min_ready_seconds`` (Kubernetes' IsPodAvailable)."""
    if not is_ready(pod):
        return False
    if min_ready_seconds <= 0:
        return True
    since = ready_since(pod)
    return since is not None and since + min_ready_seconds <= now


def controller_of(meta: meta_pb2.ObjectMeta) -> meta_pb2.OwnerReference | None:
    """The owner reference with ``controller: true``, if any."""
    for ref in meta.owner_references:
        if ref.HasField("controller") and ref.controller:
            return ref
    return None


def owner_reference(owner: Any, *, kind: str, api_version: str = "apps/v1"
                    ) -> meta_pb2.OwnerReference:
    """A controller reference to ``owner`` that blocks its foreground deletion."""
    return meta_pb2.OwnerReference(api_version=api_version, kind=kind,
                                   name=owner.metadata.name, uid=owner.metadata.uid,
                                   controller=True, block_owner_deletion=True)


def selector_of(obj: Any) -> selectors.LabelSelector:
    """The object's ``spec.selector``; an empty or malformed one matches nothing.

    (The API requires a non-empty selector; a controller never takes every pod
    of a namespace because of a selector it could not read.)
    """
    sel = obj.spec.selector
    if not sel.match_labels and not sel.match_expressions:
        return selectors.NOTHING
    try:
        return selectors.from_proto(sel)
    except errors.ShoalError:
        return selectors.NOTHING


def replicas_of(obj: Any) -> int:
    return int(obj.spec.replicas) if obj.spec.HasField("replicas") else 1


def _restarts(pod: core_pb2.Pod) -> int:
    return max((c.restart_count for c in pod.status.container_statuses), default=0)


def _deletion_cost(pod: core_pb2.Pod) -> int:
    try:
        return int(pod.metadata.annotations.get(DELETION_COST_ANNOTATION, "0"))
    except ValueError:
        return 0


_PHASE_ORDER = {"Pending": 0, "Unknown": 1, "Running": 2}


def deletion_order(pods: Sequence[core_pb2.Pod]) -> list[core_pb2.Pod]:
    """``pods`` sorted so that the best ones to delete come first."""
    per_node: dict[str, int] = {}
    for p in pods:
        if p.spec.node_name:
            per_node[p.spec.node_name] = per_node.get(p.spec.node_name, 0) + 1

    def key(p: core_pb2.Pod) -> tuple[Any, ...]:
        since = ready_since(p)
        created = seconds(p.metadata.creation_timestamp)
        return (
            1 if p.spec.node_name else 0,
            _PHASE_ORDER.get(p.status.phase, 0),
            1 if is_ready(p) else 0,
            _deletion_cost(p),
            -per_node.get(p.spec.node_name, 0) if p.spec.node_name else 0,
            -(since or 0.0) if since is not None else float("-inf"),
            -_restarts(p),
            -(created or float("inf")),
            p.metadata.name,
        )

    return sorted(pods, key=key)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PodRef:
    name: str
    uid: str


@dataclass(frozen=True)
class Counts:
    """What ``status`` reports, counted from the claimed active pods."""

    replicas: int = 0
    fully_labeled: int = 0
    ready: int = 0
    available: int = 0


@dataclass(frozen=True)
class ReplicaSetActions:
    """What one sync of a ReplicaSet should do (``plan``'s answer)."""

    adopt: tuple[PodRef, ...] = ()
    release: tuple[PodRef, ...] = ()
    create: int = 0
    delete: tuple[PodRef, ...] = ()
    counts: Counts = field(default_factory=Counts)
    # Seconds until a ready pod becomes available (minReadySeconds), if any.
    recheck_after: float | None = None


def _ref(pod: core_pb2.Pod) -> PodRef:
    return PodRef(pod.metadata.name, pod.metadata.uid)


def claim(rs: apps_pb2.ReplicaSet, pods: Iterable[core_pb2.Pod]
          ) -> tuple[list[core_pb2.Pod], list[core_pb2.Pod], list[core_pb2.Pod]]:
    """(owned, to adopt, to release) among ``pods`` (Kubernetes' ClaimPods).

    An owned pod the selector still matches stays; one it no longer matches is
    released (unless the RS is being deleted). An orphan that matches, and is
    not being deleted, is adopted unless the RS is being deleted. Pods
    controlled by something else are left alone.
    """
    sel = selector_of(rs)
    deleting = rs.metadata.HasField("deletion_timestamp")
    owned: list[core_pb2.Pod] = []
    adopt: list[core_pb2.Pod] = []
    release: list[core_pb2.Pod] = []
    for pod in pods:
        if pod.metadata.namespace != rs.metadata.namespace:
            continue
        ref = controller_of(pod.metadata)
        matches = sel.matches(pod.metadata.labels)
        if ref is not None:
            if ref.uid != rs.metadata.uid:
                continue
            if matches:
                owned.append(pod)
            elif not deleting:
                release.append(pod)
            continue
        if matches and not deleting and not pod.metadata.HasField("deletion_timestamp"):
            adopt.append(pod)
    return owned, adopt, release


def count(rs: apps_pb2.ReplicaSet, pods: Iterable[core_pb2.Pod], now: float) -> Counts:
    """Status counts over the RS's active pods (Kubernetes' calculateStatus)."""
    template = selectors.from_map(rs.spec.template.metadata.labels)
    everything = not rs.spec.template.metadata.labels
    replicas = labeled = ready = available = 0
    min_ready = rs.spec.min_ready_seconds
    for pod in pods:
        replicas += 1
        if everything or template.matches(pod.metadata.labels):
            labeled += 1
        if is_ready(pod):
            ready += 1
            if is_available(pod, min_ready, now):
                available += 1
    return Counts(replicas, labeled, ready, available)


def _recheck_after(rs: apps_pb2.ReplicaSet, pods: Iterable[core_pb2.Pod],
                   now: float) -> float | None:
    min_ready = rs.spec.min_ready_seconds
    if min_ready <= 0:
        return None
    waits = []
    for pod in pods:
        since = ready_since(pod)
        if since is not None and since + min_ready > now:
            waits.append(since + min_ready - now)
    return min(waits) if waits else None


def plan(rs: apps_pb2.ReplicaSet, pods: Sequence[core_pb2.Pod], now: float, *,
         satisfied: bool = True, burst: int = BURST_REPLICAS) -> ReplicaSetActions:
    """Everything one sync of ``rs`` should do, given every pod of its namespace.

    ``satisfied`` is false while earlier creates or deletes have not been seen
    yet; then only adoption, release and status are planned.
    """
    active = [p for p in pods if is_active(p)]
    owned, adopt, release = claim(rs, active)
    mine = owned + adopt
    counts = count(rs, mine, now)
    create = 0
    delete: tuple[PodRef, ...] = ()
    if satisfied and not rs.metadata.HasField("deletion_timestamp"):
        diff = len(mine) - replicas_of(rs)
        if diff < 0:
            create = min(-diff, burst)
        elif diff > 0:
            delete = tuple(_ref(p) for p in deletion_order(mine)[:min(diff, burst)])
    return ReplicaSetActions(adopt=tuple(_ref(p) for p in adopt),
                             release=tuple(_ref(p) for p in release),
                             create=create, delete=delete, counts=counts,
                             recheck_after=_recheck_after(rs, mine, now))


def failure_of(rs: apps_pb2.ReplicaSet, actions: ReplicaSetActions,
               error: Exception | None) -> tuple[str, str] | None:
    """The ReplicaFailure reason and message for an error met while acting."""
    if error is None:
        return None
    reason = "FailedCreate" if actions.create else "FailedDelete" if actions.delete else ""
    return (reason, str(error)) if reason else None


def status_of(rs: apps_pb2.ReplicaSet, counts: Counts, *, now: float,
              failure: tuple[str, str] | None) -> apps_pb2.ReplicaSetStatus:
    """The status to write: counts, observedGeneration and ReplicaFailure."""
    st = apps_pb2.ReplicaSetStatus(
        replicas=counts.replicas, fully_labeled_replicas=counts.fully_labeled,
        ready_replicas=counts.ready, available_replicas=counts.available,
        observed_generation=rs.metadata.generation)
    old = [c for c in rs.status.conditions]
    current = next((c for c in old if c.type == "ReplicaFailure"), None)
    keep = [c for c in old if c.type != "ReplicaFailure"]
    st.conditions.extend(keep)
    if failure is not None:
        if current is not None:
            st.conditions.append(current)
        else:
            cond = apps_pb2.ReplicaSetCondition(type="ReplicaFailure", status="True",
                                                reason=failure[0], message=failure[1])
            cond.last_transition_time.seconds = int(now)
            st.conditions.append(cond)
    return st


def pod_from_template(rs: apps_pb2.ReplicaSet, name: str) -> core_pb2.Pod:
    """A new pod of ``rs``: the template's labels, annotations, finalizers and spec."""
    tmpl = rs.spec.template
    pod = core_pb2.Pod()
    pod.metadata.name = name
    pod.metadata.namespace = rs.metadata.namespace
    pod.metadata.labels.update(tmpl.metadata.labels)
    pod.metadata.annotations.update(tmpl.metadata.annotations)
    pod.metadata.finalizers.extend(tmpl.metadata.finalizers)
    pod.metadata.owner_references.append(owner_reference(rs, kind="ReplicaSet"))
    pod.spec.CopyFrom(tmpl.spec)
    return pod


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(NAME_ALPHABET) for _ in range(n))


def generate_name(base: str, suffix: str) -> str:
    """Kubernetes' SimpleNameGenerator: ``base`` (cut to 58) plus the suffix."""
    return base[:_MAX_GENERATED_BASE] + suffix


def slow_start_batches(total: int, initial: int = 1) -> list[int]:
    """Batch sizes 1, 2, 4, ... adding up to ``total`` (Kubernetes' slowStartBatch)."""
    out: list[int] = []
    size, left = max(1, initial), total
    while left > 0:
        step = min(size, left)
        out.append(step)
        left -= step
        size *= 2
    return out


# --------------------------------------------------------------------------- expectations


@dataclass
class _Expecting:
    creates: set[str]
    deletes: set[str]
    since: float


class Expectations:
    """Creates and deletes a controller made and has not yet seen (see module doc)."""

    def __init__(self, *, ttl: float = EXPECTATIONS_TTL) -> None:
        self.ttl = ttl
        self._by_key: dict[str, _Expecting] = {}

    def expect(self, key: str, *, creates: Iterable[str] = (), deletes: Iterable[str] = (),
               now: float) -> None:
        self._by_key[key] = _Expecting(set(creates), set(deletes), now)

    def created(self, key: str, name: str) -> None:
        """The informer saw the pod ``name`` (or its create failed)."""
        e = self._by_key.get(key)
        if e is not None:
            e.creates.discard(name)

    def deleted(self, key: str, uid: str) -> None:
        """The informer saw the pod ``uid`` go or start terminating (or the delete failed)."""
        e = self._by_key.get(key)
        if e is not None:
            e.deletes.discard(uid)

    def satisfied(self, key: str, now: float) -> bool:
        e = self._by_key.get(key)
        if e is None or (not e.creates and not e.deletes):
            return True
        return now - e.since > self.ttl

    def pending(self, key: str) -> tuple[int, int]:
        e = self._by_key.get(key)
        return (len(e.creates), len(e.deletes)) if e else (0, 0)

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)


# --------------------------------------------------------------------------- the controller


class ReplicaSetController:
    """Informer handlers enqueue keys; workers ``sync`` them (see the module doc)."""

    name = "replicaset"

    def __init__(self, *, suffix: Callable[[], str] = random_suffix) -> None:
        self.queue = WorkQueue()
        self.expectations = Expectations()
        self.suffix = suffix
        self._rs: Informer[apps_pb2.ReplicaSet] | None = None
        self._pods: Informer[core_pb2.Pod] | None = None

    # -- wiring ---------------------------------------------------------------

    def setup(self, ctx: ControllerContext) -> None:
        self._rs = ctx.informers.get(apps_pb2.ReplicaSet)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._rs.add_handlers(on_add=self._rs_changed,
                              on_update=lambda _old, new: self._rs_changed(new),
                              on_delete=self._rs_deleted)
        self._pods.add_handlers(on_add=self._pod_added, on_update=self._pod_updated,
                                on_delete=self._pod_deleted)

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        try:
            await run_workers(self.queue, lambda key: self.sync(ctx, key),
                              count=ctx.settings.workers, what="replicaset")
        finally:
            self.queue.close()

    @property
    def replicasets(self) -> Informer[apps_pb2.ReplicaSet]:
        assert self._rs is not None, "setup() first"
        return self._rs

    @property
    def pods(self) -> Informer[core_pb2.Pod]:
        assert self._pods is not None, "setup() first"
        return self._pods

    # -- handlers (enqueue only) ----------------------------------------------

    def _rs_changed(self, rs: apps_pb2.ReplicaSet) -> None:
        self.queue.add(key_of(rs))

    def _rs_deleted(self, rs: apps_pb2.ReplicaSet) -> None:
        key = key_of(rs)
        self.expectations.forget(key)
        self.queue.add(key)

    def _owner(self, pod: core_pb2.Pod, ref: meta_pb2.OwnerReference | None
               ) -> apps_pb2.ReplicaSet | None:
        if ref is None or ref.kind != "ReplicaSet":
            return None
        rs = self.replicasets.get(pod.metadata.namespace, ref.name)
        return rs if rs is not None and rs.metadata.uid == ref.uid else None

    def _enqueue_matching(self, pod: core_pb2.Pod) -> None:
        for rs in self.replicasets.by_index(NAMESPACE_INDEX, pod.metadata.namespace):
            if selector_of(rs).matches(pod.metadata.labels):
                self.queue.add(key_of(rs))

    def _pod_added(self, pod: core_pb2.Pod) -> None:
        if pod.metadata.HasField("deletion_timestamp"):
            self._pod_deleted(pod)
            return
        rs = self._owner(pod, controller_of(pod.metadata))
        if rs is not None:
            key = key_of(rs)
            self.expectations.created(key, pod.metadata.name)
            self.queue.add(key)
        elif controller_of(pod.metadata) is None:
            self._enqueue_matching(pod)

    def _pod_updated(self, old: core_pb2.Pod, new: core_pb2.Pod) -> None:
        if old.metadata.resource_version == new.metadata.resource_version:
            return
        labels_changed = dict(old.metadata.labels) != dict(new.metadata.labels)
        if new.metadata.HasField("deletion_timestamp"):
            self._pod_deleted(new)
            if labels_changed:
                self._pod_deleted(old)
            return
        old_ref, new_ref = controller_of(old.metadata), controller_of(new.metadata)
        if old_ref != new_ref:
            prev = self._owner(old, old_ref)
            if prev is not None:
                self.queue.add(key_of(prev))
        if new_ref is not None:
            rs = self._owner(new, new_ref)
            if rs is not None:
                self.queue.add(key_of(rs))
            return
        if labels_changed or old_ref != new_ref:
            self._enqueue_matching(new)

    def _pod_deleted(self, pod: core_pb2.Pod) -> None:
        rs = self._owner(pod, controller_of(pod.metadata))
        if rs is None:
            return
        key = key_of(rs)
        self.expectations.deleted(key, pod.metadata.uid)
        self.queue.add(key)

    # -- the worker -------------------------------------------------------------

    async def sync(self, ctx: ControllerContext, key: str) -> float | None:
        """One pass over one ReplicaSet; returns seconds until it needs another."""
        rs = self.replicasets.get_by_key(key)
        if rs is None:
            self.expectations.forget(key)
            return None
        now = ctx.clock()
        pods = self.pods.by_index(NAMESPACE_INDEX, rs.metadata.namespace)
        actions = plan(rs, pods, now, satisfied=self.expectations.satisfied(key, now))
        by_name = {p.metadata.name: p for p in pods}
        if actions.adopt:
            await self._check_can_adopt(ctx, rs)
        for ref in actions.adopt:
            await self._set_owner(ctx, by_name[ref.name], rs, adopt=True)
        for ref in actions.release:
            await self._set_owner(ctx, by_name[ref.name], rs, adopt=False)
        failure: Exception | None = None
        try:
            if actions.create:
                await self._create(ctx, rs, key, actions.create)
            elif actions.delete:
                await self._delete(ctx, rs, key, actions.delete)
        except errors.ShoalError as e:
            failure = e
        status = status_of(rs, actions.counts, now=now,
                           failure=failure_of(rs, actions, failure))
        if status != rs.status:
            fresh = apps_pb2.ReplicaSet()
            fresh.CopyFrom(rs)
            fresh.status.CopyFrom(status)
            fresh.metadata.resource_version = ""
            try:
                await ctx.client.update_status(fresh)
            except errors.NotFound:
                return None
        if failure is not None:
            raise failure
        return actions.recheck_after

    async def _check_can_adopt(self, ctx: ControllerContext, rs: apps_pb2.ReplicaSet) -> None:
        """Read the RS afresh: never adopt for one that is gone or going."""
        fresh = await ctx.client.get(apps_pb2.ReplicaSet, rs.metadata.name,
                                     namespace=rs.metadata.namespace)
        if fresh.metadata.uid != rs.metadata.uid:
            raise errors.Conflict(f"replicaset {key_of(rs)} was replaced; not adopting")
        if fresh.metadata.HasField("deletion_timestamp"):
            raise errors.Conflict(f"replicaset {key_of(rs)} is being deleted; not adopting")

    async def _set_owner(self, ctx: ControllerContext, cached: core_pb2.Pod,
                         rs: apps_pb2.ReplicaSet, *, adopt: bool) -> None:
        pod = core_pb2.Pod()
        pod.CopyFrom(cached)
        refs = [r for r in pod.metadata.owner_references if r.uid != rs.metadata.uid]
        if adopt:
            refs.append(owner_reference(rs, kind="ReplicaSet"))
        del pod.metadata.owner_references[:]
        pod.metadata.owner_references.extend(refs)
        try:
            await ctx.client.update(pod)
        except errors.NotFound:
            return
        log.info("replicaset %s %s pod %s", key_of(rs), "adopted" if adopt else "released",
                 pod.metadata.name)

    async def _create(self, ctx: ControllerContext, rs: apps_pb2.ReplicaSet, key: str,
                      n: int) -> None:
        base = f"{rs.metadata.name}-"
        names = [generate_name(base, self.suffix()) for _ in range(n)]
        self.expectations.expect(key, creates=names, now=ctx.clock())
        pending = list(names)
        for size in slow_start_batches(n):
            batch, pending = pending[:size], pending[size:]
            results = await asyncio.gather(*(self._create_one(ctx, rs, key, name)
                                             for name in batch), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                for name in pending:  # skipped: never coming
                    self.expectations.created(key, name)
                first = failed[0]
                if isinstance(first, errors.ShoalError):
                    raise first
                raise errors.InternalError(str(first)) from first

    async def _create_one(self, ctx: ControllerContext, rs: apps_pb2.ReplicaSet, key: str,
                          name: str) -> None:
        pod = pod_from_template(rs, name)
        try:
            await ctx.client.create(pod)
        except errors.ShoalError as e:
            self.expectations.created(key, name)
            if isinstance(e, errors.Forbidden) and "terminat" in e.message.lower():
                return  # the namespace is going away: nothing to report
            ctx.events.event(rs, "Warning", "FailedCreate", f"Error creating: {e.message}")
            raise
        ctx.events.event(rs, "Normal", "SuccessfulCreate", f"Created pod: {name}")

    async def _delete(self, ctx: ControllerContext, rs: apps_pb2.ReplicaSet, key: str,
                      refs: Sequence[PodRef]) -> None:
        self.expectations.expect(key, deletes=[r.uid for r in refs], now=ctx.clock())
        results = await asyncio.gather(*(self._delete_one(ctx, rs, key, r) for r in refs),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, errors.ShoalError):
                raise r
            if isinstance(r, BaseException):
                raise errors.InternalError(str(r)) from r

    async def _delete_one(self, ctx: ControllerContext, rs: apps_pb2.ReplicaSet, key: str,
                          ref: PodRef) -> None:
        try:
            await ctx.client.delete(core_pb2.Pod, ref.name, namespace=rs.metadata.namespace,
                                    uid=ref.uid)
        except errors.NotFound:
            self.expectations.deleted(key, ref.uid)
            return
        except errors.ShoalError as e:
            self.expectations.deleted(key, ref.uid)
            ctx.events.event(rs, "Warning", "FailedDelete",
                             f"Error deleting pod {ref.name}: {e.message}")
            raise
        ctx.events.event(rs, "Normal", "SuccessfulDelete", f"Deleted pod: {ref.name}")

