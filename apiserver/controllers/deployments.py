"""The Deployment controller: roll a pod template out through ReplicaSets.

Kubernetes' ``pkg/controller/deployment``, in the plan-then-act shape::

    Deployment events ─┐
    ReplicaSet events ─┼──> the owning Deployment's key ──> WorkQueue
    Pod readiness/gone ┘    (an orphan RS: every Deployment whose selector matches)
    worker(key):
        ReplicaSets of the namespace, pods by ReplicaSet (informer caches)
          └─ plan(deployment, replicasets, pods, now)                  [pure]
               adopt / release ReplicaSets (controller ownerReference)
               create   the new ReplicaSet  <name>-<pod-template-hash>
               update   ReplicaSets: revision / replica annotations, scale
               delete   old ReplicaSets beyond revisionHistoryLimit (0 replicas)
               revision annotation of the Deployment, status, events
        executor: create -> RS updates (CAS) -> events -> deletes ->
                  Deployment annotations (CAS) -> status (CAS)
                  -> requeue at the progress deadline

One sync does one step, as Kubernetes does::

    deleting ──────────────────────────────> status only
    paused, or replicas changed (scaling) ─> scale proportionally, status
    Recreate:      old RSs -> 0; wait until no old pod runs; new RS -> replicas
    RollingUpdate: scale the new RS up    (total <= replicas + maxSurge)
                   else scale old RSs down (available >= replicas - maxUnavailable)
                   complete -> clean up history

    Progressing: NewReplicaSetCreated / FoundNewReplicaSet / ReplicaSetUpdated
                 -> NewReplicaSetAvailable (complete)
                 -> False ProgressDeadlineExceeded (no progress for
                    progressDeadlineSeconds since the condition's lastUpdateTime)
                 Unknown DeploymentPaused / DeploymentResumed
    Available:   MinimumReplicasAvailable / MinimumReplicasUnavailable

Contract:
- ``plan`` is pure; time is passed in. It never writes; the executor does.
- Every write is safe to repeat or to lose: RS and Deployment updates are
  compare-and-swap on the cached resourceVersion (a stale cache is a
  Conflict, and the key is retried with back-off), the new RS has a
  deterministic name, deletes carry the RS's uid.
- Availability for scaling old ReplicaSets down is counted conservatively:
  per RS, the least of its status' availableReplicas, its spec.replicas and
  the available, non-terminating pods the pod cache holds. A lagging status
  can therefore never let a rolling update go below
  ``replicas - maxUnavailable`` available pods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apiserver.controllers import revisions as rv
from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import run_workers
from apiserver.controllers.replicasets import (
    controller_of,
    is_active,
    is_available,
    is_ready,
    owner_reference,
    replicas_of,
    seconds,
    selector_of,
)
from shoal import errors, validation
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.informer import NAMESPACE_INDEX, Informer, key_of
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
CHANGE_CAUSE = "kubernetes.io/change-cause"
# Deployment annotations never copied onto its ReplicaSets.
_NOT_COPIED = frozenset({LAST_APPLIED, REVISION, REVISION_HISTORY, DESIRED_REPLICAS,
                         MAX_REPLICAS, "deprecated.deployment.rollback.to"})
_MAX_HISTORY_CHARS = 2000

PROGRESSING, AVAILABLE, REPLICA_FAILURE = "Progressing", "Available", "ReplicaFailure"
NEW_RS_CREATED = "NewReplicaSetCreated"
FOUND_NEW_RS = "FoundNewReplicaSet"
RS_UPDATED = "ReplicaSetUpdated"
NEW_RS_AVAILABLE = "NewReplicaSetAvailable"
TIMED_OUT = "ProgressDeadlineExceeded"
PAUSED = "DeploymentPaused"
RESUMED = "DeploymentResumed"
MIN_AVAILABLE = "MinimumReplicasAvailable"
MIN_UNAVAILABLE = "MinimumReplicasUnavailable"
_NO_DEADLINE = 2**31 - 1

# Kubernetes' rand.SafeEncodeString alphabet: no vowels, no look-alikes.
_SAFE = "bcdfghjklmnpqrstvwxz2456789"


# --------------------------------------------------------------------------- templates


def template_hash(template: Any, collision_count: int = 0) -> str:
    """A stable short hash of a pod template (the ``pod-template-hash`` label).

    FNV-1a (32 bit) over the template's deterministic protobuf encoding and
    the collision count, written in decimal and mapped onto a safe alphabet,
    the shape Kubernetes gives it (up to 10 characters).
    """
    return rv.template_hash(template, collision_count, alphabet=_SAFE)


def _without_hash(template: Any) -> Any:
    t = type(template)()
    t.CopyFrom(template)
    t.metadata.labels.pop(HASH_LABEL, None)
    return t


def equal_ignore_hash(a: Any, b: Any) -> bool:
    """Two pod templates are the same but for the ``pod-template-hash`` label."""
    return bool(_without_hash(a) == _without_hash(b))


# --------------------------------------------------------------------------- numbers


def _is_rolling(d: apps_pb2.Deployment) -> bool:
    return d.spec.strategy.type != "Recreate"


def resolve_fenceposts(max_surge: meta_pb2.IntOrString, max_unavailable: meta_pb2.IntOrString,
                       desired: int) -> tuple[int, int]:
    """(surge, unavailable) in pods: surge rounds up, unavailable down; never both 0."""
    try:
        surge = validation.scaled_value(max_surge, desired, round_up=True)
        unavailable = validation.scaled_value(max_unavailable, desired, round_up=False)
    except ValueError as e:
        raise errors.Invalid(str(e)) from e
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def max_surge(d: apps_pb2.Deployment) -> int:
    if not _is_rolling(d):
        return 0
    rolling = d.spec.strategy.rolling_update
    return resolve_fenceposts(rolling.max_surge, rolling.max_unavailable, replicas_of(d))[0]


def max_unavailable(d: apps_pb2.Deployment) -> int:
    replicas = replicas_of(d)
    if not _is_rolling(d) or replicas == 0:
        return 0
    rolling = d.spec.strategy.rolling_update
    _, unavailable = resolve_fenceposts(rolling.max_surge, rolling.max_unavailable, replicas)
    return min(unavailable, replicas)


def revision_of(obj: Any) -> int:
    try:
        return int(obj.metadata.annotations.get(REVISION, "0"))
    except ValueError:
        return 0


def _int_annotation(rs: apps_pb2.ReplicaSet, name: str) -> int | None:
    try:
        return int(rs.metadata.annotations[name])
    except (KeyError, ValueError):
        return None


def _has_deadline(d: apps_pb2.Deployment) -> bool:
    return (d.spec.HasField("progress_deadline_seconds")
            and d.spec.progress_deadline_seconds != _NO_DEADLINE)


def _created(rs: apps_pb2.ReplicaSet) -> tuple[float, str]:
    return (seconds(rs.metadata.creation_timestamp) or 0.0, rs.metadata.name)


# --------------------------------------------------------------------------- conditions


def condition(status: apps_pb2.DeploymentStatus, type_: str
              ) -> apps_pb2.DeploymentCondition | None:
    for c in status.conditions:
        if c.type == type_:
            return c
    return None


def _new_condition(type_: str, status: str, reason: str, message: str, now: float
                   ) -> apps_pb2.DeploymentCondition:
    c = apps_pb2.DeploymentCondition(type=type_, status=status, reason=reason, message=message)
    c.last_update_time.seconds = int(now)
    c.last_transition_time.seconds = int(now)
    return c


def _remove_condition(status: apps_pb2.DeploymentStatus, type_: str) -> None:
    kept = [c for c in status.conditions if c.type != type_]
    del status.conditions[:]
    status.conditions.extend(kept)


def set_condition(status: apps_pb2.DeploymentStatus, cond: apps_pb2.DeploymentCondition
                  ) -> None:
    """Kubernetes' SetDeploymentCondition: same status and reason -> unchanged;
    same status -> the transition time is kept."""
    current = condition(status, cond.type)
    if current is not None and current.status == cond.status and current.reason == cond.reason:
        return
    if current is not None and current.status == cond.status:
        cond.last_transition_time.CopyFrom(current.last_transition_time)
    _remove_condition(status, cond.type)
    status.conditions.append(cond)


def complete(d: apps_pb2.Deployment, status: apps_pb2.DeploymentStatus) -> bool:
    """Every replica updated and available, and the latest spec observed."""
    n = replicas_of(d)
    return (status.updated_replicas == n and status.replicas == n
            and status.available_replicas == n
            and status.observed_generation >= d.metadata.generation)


def progressing(d: apps_pb2.Deployment, status: apps_pb2.DeploymentStatus) -> bool:
    """Did the rollout move since the status the Deployment carries?"""
    old = d.status
    return (status.updated_replicas > old.updated_replicas
            or status.replicas - status.updated_replicas < old.replicas - old.updated_replicas
            or status.ready_replicas > old.ready_replicas
            or status.available_replicas > old.available_replicas)


def timed_out(d: apps_pb2.Deployment, status: apps_pb2.DeploymentStatus, now: float) -> bool:
    if not _has_deadline(d):
        return False
    cond = condition(status, PROGRESSING)
    if cond is None or cond.reason == NEW_RS_AVAILABLE:
        return False
    if cond.reason == TIMED_OUT:
        return True
    since = seconds(cond.last_update_time) or now
    return since + d.spec.progress_deadline_seconds < now


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RSRef:
    name: str
    uid: str


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class DeploymentActions:
    """What one sync of a Deployment should do (``plan``'s answer)."""

    adopt: tuple[RSRef, ...] = ()
    release: tuple[RSRef, ...] = ()
    create: apps_pb2.ReplicaSet | None = None
    # Whole ReplicaSets to write (scaled and/or annotated), with the cached
    # resourceVersion as the precondition.
    update: tuple[apps_pb2.ReplicaSet, ...] = ()
    delete: tuple[RSRef, ...] = ()
    # The Deployment's annotations when they change (the revision), else None.
    annotations: Mapping[str, str] | None = None
    # The status to write when it changed, else None.
    status: apps_pb2.DeploymentStatus | None = None
    events: tuple[Event, ...] = ()
    # Seconds until the progress deadline should be checked again, if any.
    recheck_after: float | None = None


def claim_replicasets(d: apps_pb2.Deployment, rss: Iterable[apps_pb2.ReplicaSet]
                      ) -> tuple[list[apps_pb2.ReplicaSet], list[apps_pb2.ReplicaSet],
                                 list[apps_pb2.ReplicaSet]]:
    """(owned, to adopt, to release) among ``rss`` (Kubernetes' ClaimReplicaSets)."""
    sel = selector_of(d)
    deleting = d.metadata.HasField("deletion_timestamp")
    owned: list[apps_pb2.ReplicaSet] = []
    adopt: list[apps_pb2.ReplicaSet] = []
    release: list[apps_pb2.ReplicaSet] = []
    for rs in rss:
        if rs.metadata.namespace != d.metadata.namespace:
            continue
        ref = controller_of(rs.metadata)
        matches = sel.matches(rs.metadata.labels)
        if ref is not None:
            if ref.uid != d.metadata.uid:
                continue
            if matches:
                owned.append(rs)
            elif not deleting:
                release.append(rs)
            continue
        if matches and not deleting and not rs.metadata.HasField("deletion_timestamp"):
            adopt.append(rs)
    return owned, adopt, release


def live_available(rs: apps_pb2.ReplicaSet, pods: Sequence[core_pb2.Pod],
                   min_ready_seconds: int, now: float) -> int:
    """Available pods of ``rs`` the pod cache holds (not terminating, not finished)."""
    return sum(1 for p in pods
               if is_active(p) and is_available(p, min_ready_seconds, now)
               and (ref := controller_of(p.metadata)) is not None
               and ref.uid == rs.metadata.uid)


class _Pass:
    """One sync, worked out on copies: each step mirrors the Kubernetes function
    of the same name and records what the executor must write."""

    def __init__(self, d: apps_pb2.Deployment, rss: list[apps_pb2.ReplicaSet],
                 pods_by_rs: Mapping[str, Sequence[core_pb2.Pod]], now: float) -> None:
        self.d = apps_pb2.Deployment()
        self.d.CopyFrom(d)
        self.original = d
        self.now = now
        self.replicas = replicas_of(d)
        self.rss: dict[str, apps_pb2.ReplicaSet] = {}
        for rs in rss:
            copy = apps_pb2.ReplicaSet()
            copy.CopyFrom(rs)
            self.rss[rs.metadata.uid] = copy
        self.pods_by_rs = pods_by_rs
        self.create: apps_pb2.ReplicaSet | None = None
        self.changed: dict[str, apps_pb2.ReplicaSet] = {}
        self.delete: list[RSRef] = []
        self.events: list[Event] = []
        self.status: apps_pb2.DeploymentStatus | None = None
        self.recheck: float | None = None

    # -- bookkeeping --------------------------------------------------------

    def _touch(self, rs: apps_pb2.ReplicaSet) -> None:
        if rs is not self.create:
            self.changed[rs.metadata.uid] = rs

    def _event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def available(self, rs: apps_pb2.ReplicaSet) -> int:
        """The conservative count (see the module doc)."""
        live = live_available(rs, self.pods_by_rs.get(rs.metadata.uid, ()),
                              self.d.spec.min_ready_seconds, self.now)
        return max(0, min(rs.status.available_replicas, rs.spec.replicas, live))

    # -- new and old ReplicaSets ------------------------------------------------

    def split(self) -> tuple[apps_pb2.ReplicaSet | None, list[apps_pb2.ReplicaSet]]:
        """(the RS running the Deployment's template, every other one), oldest first."""
        ordered = sorted(self.rss.values(), key=_created)
        new = next((rs for rs in ordered
                    if equal_ignore_hash(rs.spec.template, self.d.spec.template)), None)
        if self.create is not None:
            new = self.create
        old = [rs for rs in ordered if rs is not new]
        return new, old

    def _copy_annotations(self, rs: apps_pb2.ReplicaSet) -> bool:
        changed = False
        for k, v in self.d.metadata.annotations.items():
            if k in _NOT_COPIED or rs.metadata.annotations.get(k) == v:
                continue
            rs.metadata.annotations[k] = v
            changed = True
        return changed

    def _set_new_rs_annotations(self, rs: apps_pb2.ReplicaSet, revision: int, *,
                                exists: bool) -> bool:
        changed = self._copy_annotations(rs)
        old = rs.metadata.annotations.get(REVISION, "")
        try:
            old_int = int(old) if old else 0
        except ValueError:
            old_int = 0
        if old_int < revision:
            rs.metadata.annotations[REVISION] = str(revision)
            changed = True
            if old:
                history = rs.metadata.annotations.get(REVISION_HISTORY, "")
                history = f"{history},{old}" if history else old
                while len(history) > _MAX_HISTORY_CHARS and "," in history:
                    history = history.split(",", 1)[1]
                rs.metadata.annotations[REVISION_HISTORY] = history
        if not exists:
            changed |= self._set_replicas_annotations(rs)
        return changed

    def _set_replicas_annotations(self, rs: apps_pb2.ReplicaSet) -> bool:
        want = {DESIRED_REPLICAS: str(self.replicas),
                MAX_REPLICAS: str(self.replicas + max_surge(self.d))}
        changed = False
        for k, v in want.items():
            if rs.metadata.annotations.get(k) != v:
                rs.metadata.annotations[k] = v
                changed = True
        return changed

    def _set_deployment_revision(self, revision: str) -> None:
        if self.d.metadata.annotations.get(REVISION) != revision:
            self.d.metadata.annotations[REVISION] = revision

    def new_and_old(self, *, create: bool
                    ) -> tuple[apps_pb2.ReplicaSet | None, list[apps_pb2.ReplicaSet]]:
        """Kubernetes' getAllReplicaSetsAndSyncRevision."""
        new, old = self.split()
        max_old = max((revision_of(rs) for rs in old), default=0)
        revision = max_old + 1
        if new is not None:
            if new is self.create:
                return new, old
            changed = self._set_new_rs_annotations(new, revision, exists=True)
            if new.spec.min_ready_seconds != self.d.spec.min_ready_seconds:
                new.spec.min_ready_seconds = self.d.spec.min_ready_seconds
                changed = True
            if changed:
                self._touch(new)
            self._set_deployment_revision(new.metadata.annotations.get(REVISION, ""))
            if _has_deadline(self.d) and condition(self.d.status, PROGRESSING) is None:
                set_condition(self.d.status, _new_condition(
                    PROGRESSING, "True", FOUND_NEW_RS,
                    f'Found new replica set "{new.metadata.name}"', self.now))
            return new, old
        if not create:
            return None, old
        new = self._new_replicaset(old, revision)
        self.create = new
        if new.spec.replicas > 0:
            self._event("Normal", "ScalingReplicaSet",
                        f"Scaled up replica set {new.metadata.name} to {new.spec.replicas} "
                        "from 0")
        self._set_deployment_revision(str(revision))
        if _has_deadline(self.d):
            set_condition(self.d.status, _new_condition(
                PROGRESSING, "True", NEW_RS_CREATED,
                f'Created new replica set "{new.metadata.name}"', self.now))
        return new, old

    def _new_replicaset(self, old: list[apps_pb2.ReplicaSet], revision: int
                        ) -> apps_pb2.ReplicaSet:
        d = self.d
        pod_hash = template_hash(d.spec.template, d.status.collision_count)
        rs = apps_pb2.ReplicaSet()
        rs.metadata.name = f"{d.metadata.name}-{pod_hash}"
        rs.metadata.namespace = d.metadata.namespace
        rs.metadata.owner_references.append(owner_reference(d, kind="Deployment"))
        rs.spec.template.CopyFrom(d.spec.template)
        rs.spec.template.metadata.labels[HASH_LABEL] = pod_hash
        rs.metadata.labels.update(rs.spec.template.metadata.labels)
        rs.spec.selector.CopyFrom(d.spec.selector)
        rs.spec.selector.match_labels[HASH_LABEL] = pod_hash
        rs.spec.min_ready_seconds = d.spec.min_ready_seconds
        rs.spec.replicas = 0
        rs.spec.replicas = self.new_rs_replicas([*old, rs], rs)
        self._set_new_rs_annotations(rs, revision, exists=False)
        return rs

    # -- sizes --------------------------------------------------------------

    def new_rs_replicas(self, all_rss: Sequence[apps_pb2.ReplicaSet],
                        new: apps_pb2.ReplicaSet) -> int:
        """Kubernetes' NewRSNewReplicas: how big the new RS may be now."""
        if not _is_rolling(self.d):
            return self.replicas
        current = sum(rs.spec.replicas for rs in all_rss)
        most = self.replicas + max_surge(self.d)
        if current >= most:
            return new.spec.replicas
        grow = min(most - current, max(0, self.replicas - new.spec.replicas))
        return new.spec.replicas + grow

    def scale(self, rs: apps_pb2.ReplicaSet, size: int, direction: str = "") -> bool:
        """Set ``rs``'s size and replica annotations; True when the size changed."""
        size = max(0, size)
        old = rs.spec.replicas
        annotated = self._set_replicas_annotations(rs)
        if old == size and not annotated:
            return False
        rs.spec.replicas = size
        self._touch(rs)
        if old == size:
            return False
        way = direction or ("up" if size > old else "down")
        self._event("Normal", "ScalingReplicaSet",
                    f"Scaled {way} replica set {rs.metadata.name} to {size} from {old}")
        return True

    # -- the strategies -----------------------------------------------------

    def rolling(self) -> None:
        new, old = self.new_and_old(create=True)
        assert new is not None
        all_rss = [*old, new]
        if self.reconcile_new(all_rss, new):
            self.rollout_status(all_rss, new)
            return
        if self.reconcile_old(all_rss, [rs for rs in old if rs.spec.replicas > 0], new):
            self.rollout_status(all_rss, new)
            return
        if complete(self.d, self.d.status):
            self.cleanup(old)
        self.rollout_status(all_rss, new)

    def reconcile_new(self, all_rss: list[apps_pb2.ReplicaSet],
                      new: apps_pb2.ReplicaSet) -> bool:
        if new.spec.replicas == self.replicas:
            return False
        if new.spec.replicas > self.replicas:
            return self.scale(new, self.replicas, "down")
        return self.scale(new, self.new_rs_replicas(all_rss, new), "up")

    def reconcile_old(self, all_rss: list[apps_pb2.ReplicaSet],
                      old: list[apps_pb2.ReplicaSet], new: apps_pb2.ReplicaSet) -> bool:
        old_pods = sum(rs.spec.replicas for rs in old)
        if old_pods == 0:
            return False
        all_pods = sum(rs.spec.replicas for rs in all_rss)
        min_available = self.replicas - max_unavailable(self.d)
        new_unavailable = new.spec.replicas - self.available(new)
        most = all_pods - min_available - new_unavailable
        if most <= 0:
            return False
        cleaned = self.cleanup_unhealthy(old, most)
        scaled = self.scale_down_old(all_rss, old)
        return cleaned + scaled > 0

    def cleanup_unhealthy(self, old: list[apps_pb2.ReplicaSet], most: int) -> int:
        """Scale old RSs down by their unavailable pods first (they serve nothing)."""
        total = 0
        for rs in sorted(old, key=_created):
            if total >= most:
                break
            if rs.spec.replicas == 0:
                continue
            unhealthy = rs.spec.replicas - self.available(rs)
            if unhealthy <= 0:
                continue
            step = min(most - total, unhealthy)
            self.scale(rs, rs.spec.replicas - step, "down")
            total += step
        return total

    def scale_down_old(self, all_rss: list[apps_pb2.ReplicaSet],
                       old: list[apps_pb2.ReplicaSet]) -> int:
        min_available = self.replicas - max_unavailable(self.d)
        available = sum(self.available(rs) for rs in all_rss)
        if available <= min_available:
            return 0
        budget = available - min_available
        total = 0
        for rs in sorted(old, key=_created):
            if total >= budget:
                break
            if rs.spec.replicas == 0:
                continue
            step = min(rs.spec.replicas, budget - total)
            self.scale(rs, rs.spec.replicas - step, "down")
            total += step
        return total

    def recreate(self) -> None:
        new, old = self.new_and_old(create=False)
        all_rss = [*old, *([new] if new is not None else [])]
        scaled = False
        for rs in old:
            if rs.spec.replicas > 0:
                scaled |= self.scale(rs, 0, "down")
        if scaled or self.old_pods_running(old):
            self.rollout_status(all_rss, new)
            return
        if new is None:
            new, old = self.new_and_old(create=True)
            assert new is not None
            all_rss = [*old, new]
        self.scale(new, self.replicas, "up")
        if complete(self.d, self.d.status):
            self.cleanup(old)
        self.rollout_status(all_rss, new)

    def old_pods_running(self, old: list[apps_pb2.ReplicaSet]) -> bool:
        if sum(rs.status.replicas for rs in old) > 0:
            return True
        for rs in old:
            for p in self.pods_by_rs.get(rs.metadata.uid, ()):
                if p.status.phase not in ("Failed", "Succeeded"):
                    return True
        return False

    def sync_scaling(self) -> None:
        """Kubernetes' sync: paused or scaled; no rollout progress."""
        new, old = self.new_and_old(create=False)
        self.proportional_scale(new, old)
        if self.d.spec.paused:
            self.cleanup(old)
        all_rss = [*old, *([new] if new is not None else [])]
        self.status = self.calculate_status(all_rss, new)

    def proportional_scale(self, new: apps_pb2.ReplicaSet | None,
                           old: list[apps_pb2.ReplicaSet]) -> None:
        all_rss = [*old, *([new] if new is not None else [])]
        active = [rs for rs in all_rss if rs.spec.replicas > 0]
        if len(active) <= 1:
            # One active RS (or none: the newest) takes the whole size.
            target = active[0] if active else (new or (sorted(old, key=_created)[-1]
                                                       if old else None))
            if target is not None:
                self.scale(target, self.replicas)
            return
        if new is not None and self._saturated(new):
            for rs in old:
                if rs.spec.replicas > 0:
                    self.scale(rs, 0, "down")
            return
        if not _is_rolling(self.d):
            return
        allowed = self.replicas + max_surge(self.d) if self.replicas > 0 else 0
        to_add = allowed - sum(rs.spec.replicas for rs in active)
        if to_add > 0:  # bigger first; newer first among equals
            active.sort(key=lambda rs: (-rs.spec.replicas, -_created(rs)[0], rs.metadata.name))
        elif to_add < 0:  # bigger first; older first among equals
            active.sort(key=lambda rs: (-rs.spec.replicas, _created(rs)))
        sizes: dict[str, int] = {}
        added = 0
        for rs in active:
            if to_add != 0:
                share = self._proportion(rs, to_add, added)
                sizes[rs.metadata.uid] = rs.spec.replicas + share
                added += share
            else:
                sizes[rs.metadata.uid] = rs.spec.replicas
        for i, rs in enumerate(active):
            size = sizes[rs.metadata.uid]
            if i == 0 and to_add != 0:
                size = max(0, size + to_add - added)
            self.scale(rs, size, "up" if to_add > 0 else "down" if to_add < 0 else "")

    def _saturated(self, rs: apps_pb2.ReplicaSet) -> bool:
        return (rs.spec.replicas == self.replicas
                and _int_annotation(rs, DESIRED_REPLICAS) == self.replicas
                and rs.status.available_replicas == self.replicas)

    def _proportion(self, rs: apps_pb2.ReplicaSet, to_add: int, added: int) -> int:
        if rs.spec.replicas == 0 or to_add in (0, added):
            return 0
        if self.replicas == 0:
            fraction = -rs.spec.replicas
        else:
            most = self.replicas + max_surge(self.d)
            before = _int_annotation(rs, MAX_REPLICAS) or self.d.status.replicas or 1
            fraction = int(rs.spec.replicas * most / before + 0.5) - rs.spec.replicas
        allowed = to_add - added
        return min(fraction, allowed) if to_add > 0 else max(fraction, allowed)

    def cleanup(self, old: list[apps_pb2.ReplicaSet]) -> None:
        """Delete the oldest revisions beyond revisionHistoryLimit (idle ones only)."""
        if not self.d.spec.HasField("revision_history_limit"):
            return
        alive = [rs for rs in old if not rs.metadata.HasField("deletion_timestamp")]
        extra = len(alive) - self.d.spec.revision_history_limit
        if extra <= 0:
            return
        alive.sort(key=lambda rs: (revision_of(rs), _created(rs)))
        for rs in alive[:extra]:
            if (rs.status.replicas != 0 or rs.spec.replicas != 0
                    or rs.metadata.generation > rs.status.observed_generation):
                continue
            self.delete.append(RSRef(rs.metadata.name, rs.metadata.uid))

    # -- status ---------------------------------------------------------------

    def calculate_status(self, all_rss: list[apps_pb2.ReplicaSet],
                         new: apps_pb2.ReplicaSet | None) -> apps_pb2.DeploymentStatus:
        available = sum(rs.status.available_replicas for rs in all_rss)
        total = sum(rs.spec.replicas for rs in all_rss)
        st = apps_pb2.DeploymentStatus(
            observed_generation=self.d.metadata.generation,
            replicas=sum(rs.status.replicas for rs in all_rss),
            updated_replicas=new.status.replicas if new is not None else 0,
            ready_replicas=sum(rs.status.ready_replicas for rs in all_rss),
            available_replicas=available,
            unavailable_replicas=max(0, total - available))
        if self.d.status.HasField("collision_count"):
            st.collision_count = self.d.status.collision_count
        st.conditions.extend(self.d.status.conditions)
        if available >= self.replicas - max_unavailable(self.d):
            set_condition(st, _new_condition(AVAILABLE, "True", MIN_AVAILABLE,
                                             "Deployment has minimum availability.", self.now))
        else:
            set_condition(st, _new_condition(AVAILABLE, "False", MIN_UNAVAILABLE,
                                             "Deployment does not have minimum availability.",
                                             self.now))
        return st

    def rollout_status(self, all_rss: list[apps_pb2.ReplicaSet],
                       new: apps_pb2.ReplicaSet | None) -> None:
        """Kubernetes' syncRolloutStatus: counts, Progressing, ReplicaFailure."""
        st = self.calculate_status(all_rss, new)
        if not _has_deadline(self.d):
            _remove_condition(st, PROGRESSING)
        current = condition(st, PROGRESSING)
        done = (st.replicas == st.updated_replicas and current is not None
                and current.reason == NEW_RS_AVAILABLE)
        name = new.metadata.name if new is not None else ""
        what = f'ReplicaSet "{name}"' if new is not None else \
            f'Deployment "{self.d.metadata.name}"'
        if _has_deadline(self.d) and not done:
            if complete(self.d, st):
                set_condition(st, _new_condition(PROGRESSING, "True", NEW_RS_AVAILABLE,
                                                 f"{what} has successfully progressed.",
                                                 self.now))
            elif progressing(self.d, st):
                cond = _new_condition(PROGRESSING, "True", RS_UPDATED, f"{what} is progressing.",
                                      self.now)
                if current is not None:
                    if current.status == "True":
                        cond.last_transition_time.CopyFrom(current.last_transition_time)
                    _remove_condition(st, PROGRESSING)
                set_condition(st, cond)
            elif timed_out(self.d, st, self.now):
                set_condition(st, _new_condition(PROGRESSING, "False", TIMED_OUT,
                                                 f"{what} has timed out progressing.",
                                                 self.now))
        failure = _replica_failure(all_rss, new)
        if failure is not None:
            set_condition(st, failure)
        else:
            _remove_condition(st, REPLICA_FAILURE)
        self.status = st
        self.recheck = self._stuck_recheck(st)

    def _stuck_recheck(self, st: apps_pb2.DeploymentStatus) -> float | None:
        cond = condition(st, PROGRESSING)
        if not _has_deadline(self.d) or cond is None:
            return None
        if complete(self.d, st) or cond.reason in (TIMED_OUT, NEW_RS_AVAILABLE):
            return None
        if cond.reason in (PAUSED,):
            return None
        since = seconds(cond.last_update_time) or self.now
        return max(0.5, since + self.d.spec.progress_deadline_seconds - self.now + 0.5)

    def paused_conditions(self) -> None:
        """Progressing=Unknown while paused, and once when resumed (the clock restarts)."""
        if not _has_deadline(self.d):
            return
        cond = condition(self.d.status, PROGRESSING)
        if cond is not None and cond.reason == TIMED_OUT:
            return
        paused_now = cond is not None and cond.reason == PAUSED
        if self.d.spec.paused and not paused_now:
            set_condition(self.d.status, _new_condition(PROGRESSING, "Unknown", PAUSED,
                                                        "Deployment is paused", self.now))
        elif not self.d.spec.paused and paused_now:
            set_condition(self.d.status, _new_condition(PROGRESSING, "Unknown", RESUMED,
                                                        "Deployment is resumed", self.now))

    def scaling_event(self) -> bool:
        new, old = self.split()
        for rs in [*old, *([new] if new is not None else [])]:
            if rs.spec.replicas <= 0:
                continue
            desired = _int_annotation(rs, DESIRED_REPLICAS)
            if desired is not None and desired != self.replicas:
                return True
        return False


def _replica_failure(all_rss: list[apps_pb2.ReplicaSet], new: apps_pb2.ReplicaSet | None
                     ) -> apps_pb2.DeploymentCondition | None:
    ordered = ([new] if new is not None else []) + [rs for rs in all_rss if rs is not new]
    for rs in ordered:
        for c in rs.status.conditions:
            if c.type == REPLICA_FAILURE:
                out = apps_pb2.DeploymentCondition(type=REPLICA_FAILURE, status=c.status,
                                                   reason=c.reason, message=c.message)
                out.last_update_time.CopyFrom(c.last_transition_time)
                out.last_transition_time.CopyFrom(c.last_transition_time)
                return out
    return None


def plan(d: apps_pb2.Deployment, replicasets: Sequence[apps_pb2.ReplicaSet], now: float, *,
         pods_by_rs: Mapping[str, Sequence[core_pb2.Pod]] | None = None
         ) -> DeploymentActions:
    """Everything one sync of ``d`` should do, given every RS of its namespace and
    the pods of each RS (by the RS's uid)."""
    pods = pods_by_rs or {}
    sel = d.spec.selector
    if not sel.match_labels and not sel.match_expressions:
        st = apps_pb2.DeploymentStatus()
        st.CopyFrom(d.status)
        st.observed_generation = d.metadata.generation
        return DeploymentActions(
            status=st if st != d.status else None,
            events=(Event("Warning", "SelectingAll", "This deployment is selecting all pods. "
                          "A non-empty selector is required."),))
    owned, adopt, release = claim_replicasets(d, replicasets)
    work = _Pass(d, [*owned, *adopt], pods, now)
    if d.metadata.HasField("deletion_timestamp"):
        new, old = work.new_and_old(create=False)
        work.status = work.calculate_status([*old, *([new] if new else [])], new)
    else:
        work.paused_conditions()
        if work.d.spec.paused or work.scaling_event():
            work.sync_scaling()
        elif d.spec.strategy.type == "Recreate":
            work.recreate()
        else:
            work.rolling()
    status = work.status
    annotations = (dict(work.d.metadata.annotations)
                   if dict(work.d.metadata.annotations) != dict(d.metadata.annotations)
                   else None)
    return DeploymentActions(
        adopt=tuple(RSRef(rs.metadata.name, rs.metadata.uid) for rs in adopt),
        release=tuple(RSRef(rs.metadata.name, rs.metadata.uid) for rs in release),
        create=work.create,
        update=tuple(work.changed.values()),
        delete=tuple(work.delete),
        annotations=annotations,
        status=status if status is not None and status != d.status else None,
        events=tuple(work.events),
        recheck_after=work.recheck)


# --------------------------------------------------------------------------- the controller


class DeploymentController:
    """Informer handlers enqueue keys; workers ``sync`` them (see the module doc)."""

    name = "deployment"

    def __init__(self) -> None:
        self.queue = WorkQueue()
        self._d: Informer[apps_pb2.Deployment] | None = None
        self._rs: Informer[apps_pb2.ReplicaSet] | None = None
        self._pods: Informer[core_pb2.Pod] | None = None

    # -- wiring ---------------------------------------------------------------

    def setup(self, ctx: ControllerContext) -> None:
        self._d = ctx.informers.get(apps_pb2.Deployment)
        self._rs = ctx.informers.get(apps_pb2.ReplicaSet)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._d.add_handlers(on_add=self._enqueue,
                             on_update=lambda _old, new: self._enqueue(new),
                             on_delete=self._enqueue)
        self._rs.add_handlers(on_add=self._rs_changed,
                              on_update=self._rs_updated,
                              on_delete=self._rs_changed)
        self._pods.add_handlers(on_update=self._pod_updated, on_delete=self._pod_changed)

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        try:
            await run_workers(self.queue, lambda key: self.sync(ctx, key),
                              count=ctx.settings.workers, what="deployment")
        finally:
            self.queue.close()

    @property
    def deployments(self) -> Informer[apps_pb2.Deployment]:
        assert self._d is not None, "setup() first"
        return self._d

    @property
    def replicasets(self) -> Informer[apps_pb2.ReplicaSet]:
        assert self._rs is not None, "setup() first"
        return self._rs

    @property
    def pods(self) -> Informer[core_pb2.Pod]:
        assert self._pods is not None, "setup() first"
        return self._pods

    # -- handlers (enqueue only) ----------------------------------------------

    def _enqueue(self, d: apps_pb2.Deployment) -> None:
        self.queue.add(key_of(d))

    def _owner_of(self, meta: meta_pb2.ObjectMeta) -> apps_pb2.Deployment | None:
        ref = controller_of(meta)
        if ref is None or ref.kind != "Deployment":
            return None
        d = self.deployments.get(meta.namespace, ref.name)
        return d if d is not None and d.metadata.uid == ref.uid else None

    def _rs_changed(self, rs: apps_pb2.ReplicaSet) -> None:
        d = self._owner_of(rs.metadata)
        if d is not None:
            self._enqueue(d)
        elif controller_of(rs.metadata) is None:
            for cand in self.deployments.by_index(NAMESPACE_INDEX, rs.metadata.namespace):
                if selector_of(cand).matches(rs.metadata.labels):
                    self._enqueue(cand)

    def _rs_updated(self, old: apps_pb2.ReplicaSet, new: apps_pb2.ReplicaSet) -> None:
        if old.metadata.resource_version == new.metadata.resource_version:
            return
        if controller_of(old.metadata) != controller_of(new.metadata):
            self._rs_changed(old)
        self._rs_changed(new)

    def _pod_changed(self, pod: core_pb2.Pod) -> None:
        ref = controller_of(pod.metadata)
        if ref is None or ref.kind != "ReplicaSet":
            return
        rs = self.replicasets.get(pod.metadata.namespace, ref.name)
        if rs is not None and rs.metadata.uid == ref.uid:
            self._rs_changed(rs)

    def _pod_updated(self, old: core_pb2.Pod, new: core_pb2.Pod) -> None:
        if (is_ready(old) != is_ready(new)
                or old.metadata.HasField("deletion_timestamp")
                != new.metadata.HasField("deletion_timestamp")
                or old.status.phase != new.status.phase):
            self._pod_changed(new)

    # -- the worker -------------------------------------------------------------

    async def sync(self, ctx: ControllerContext, key: str) -> float | None:
        """One pass over one Deployment; returns seconds until it needs another."""
        d = self.deployments.get_by_key(key)
        if d is None:
            return None
        namespace = d.metadata.namespace
        rss = self.replicasets.by_index(NAMESPACE_INDEX, namespace)
        mine = {rs.metadata.uid for rs in rss}
        pods_by_rs: dict[str, list[core_pb2.Pod]] = {}
        for p in self.pods.by_index(NAMESPACE_INDEX, namespace):
            ref = controller_of(p.metadata)
            if ref is not None and ref.uid in mine:
                pods_by_rs.setdefault(ref.uid, []).append(p)
        actions = plan(d, rss, ctx.clock(), pods_by_rs=pods_by_rs)
        await self._act(ctx, d, rss, actions)
        return actions.recheck_after

    async def _act(self, ctx: ControllerContext, d: apps_pb2.Deployment,
                   rss: Sequence[apps_pb2.ReplicaSet], actions: DeploymentActions) -> None:
        by_uid = {rs.metadata.uid: rs for rs in rss}
        if actions.adopt:
            fresh = await ctx.client.get(apps_pb2.Deployment, d.metadata.name,
                                         namespace=d.metadata.namespace)
            if (fresh.metadata.uid != d.metadata.uid
                    or fresh.metadata.HasField("deletion_timestamp")):
                raise errors.Conflict(f"deployment {key_of(d)} is gone or going; not adopting")
        for ref in actions.adopt:
            await self._set_owner(ctx, by_uid[ref.uid], d, adopt=True)
        for ref in actions.release:
            await self._set_owner(ctx, by_uid[ref.uid], d, adopt=False)
        if actions.create is not None:
            await self._create(ctx, d, actions.create)
        for rs in actions.update:
            await ctx.client.update(rs)  # CAS on the cached resourceVersion
        for ev in actions.events:  # what was scaled is done: tell it now
            ctx.events.event(d, ev.type, ev.reason, ev.message)
        for ref in actions.delete:
            try:
                await ctx.client.delete(apps_pb2.ReplicaSet, ref.name,
                                        namespace=d.metadata.namespace, uid=ref.uid)
            except errors.NotFound:
                pass
        current = d
        if actions.annotations is not None:
            edited = apps_pb2.Deployment()
            edited.CopyFrom(d)
            edited.metadata.annotations.clear()
            edited.metadata.annotations.update(actions.annotations)
            current = await ctx.client.update(edited)
        if actions.status is not None:
            out = apps_pb2.Deployment()
            out.CopyFrom(current)
            out.status.CopyFrom(actions.status)
            try:
                await ctx.client.update_status(out)
            except errors.NotFound:
                return

    async def _create(self, ctx: ControllerContext, d: apps_pb2.Deployment,
                      rs: apps_pb2.ReplicaSet) -> None:
        try:
            await ctx.client.create(rs)
            return
        except errors.AlreadyExists:
            pass
        existing = await ctx.client.get(apps_pb2.ReplicaSet, rs.metadata.name,
                                        namespace=rs.metadata.namespace)
        ref = controller_of(existing.metadata)
        if (ref is not None and ref.uid == d.metadata.uid
                and equal_ignore_hash(existing.spec.template, d.spec.template)):
            # Ours already: the cache had not seen it yet. The next pass uses it.
            raise errors.Conflict(f"replicaset {key_of(rs)} exists; waiting for the cache")
        # A hash collision: bump collisionCount so the next name differs.
        bumped = apps_pb2.Deployment()
        bumped.CopyFrom(d)
        bumped.status.collision_count = d.status.collision_count + 1
        await ctx.client.update_status(bumped)
        raise errors.Conflict(f"replicaset {key_of(rs)} exists with another template; "
                              f"collisionCount is now {bumped.status.collision_count}")

    async def _set_owner(self, ctx: ControllerContext, cached: apps_pb2.ReplicaSet,
                         d: apps_pb2.Deployment, *, adopt: bool) -> None:
        rs = apps_pb2.ReplicaSet()
        rs.CopyFrom(cached)
        refs = [r for r in rs.metadata.owner_references if r.uid != d.metadata.uid]
        if adopt:
            refs.append(owner_reference(d, kind="Deployment"))
        del rs.metadata.owner_references[:]
        rs.metadata.owner_references.extend(refs)
        try:
            await ctx.client.update(rs)
        except errors.NotFound:
            return
