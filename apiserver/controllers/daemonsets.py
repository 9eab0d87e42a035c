"""The DaemonSet controller: one pod of the template on every eligible node.

    DaemonSet / Pod / Node events --> DaemonSet keys --> WorkQueue
    worker(key):
      revisions: the ControllerRevision of the current template (created if new);
                 pods carry its hash in label controller-revision-hash
      plan(ds, nodes, pods, update_hash, now)                        [pure]
        per node:  fit = nodeSelector + required node affinity + taints
                   should run (NoSchedule+NoExecute tolerated)  and no pod -> create
                   should keep running (NoExecute tolerated)     else        -> delete
                   two or more pods                                           -> keep the oldest
                   a Failed pod                                               -> delete (recreated)
        rolling update (RollingUpdate, maxUnavailable):
                   old-hash pods that are not available                       -> delete
                   old-hash available pods, while unavailable < maxUnavailable -> delete
                   (the next pass creates the new pod on the freed node)
      executor: creates, deletes (uid preconditions), status; expectations
                hold back the next plan until the informer has seen our writes

Placement is Kubernetes' own: a daemon pod names its node through required node
affinity ``matchFields metadata.name In [<node>]`` (replacing the template's
required node affinity, which the controller already checked) and the scheduler
binds it. Daemon pods get the tolerations Kubernetes adds (not-ready and
unreachable NoExecute; disk/memory/pid-pressure and unschedulable NoSchedule),
so a daemon stays on a node that is unhealthy or cordoned.

Not modelled: ``maxSurge`` (read, but updates never surge), adoption of
orphan pods, and the crash-loop back-off for failed daemon pods.

Contract: the planner is pure and takes ``now``; writes carry uid
preconditions and fresh names; failures go back to the queue with per-key
back-off; the worker returns a delay when a pod's minReadySeconds is pending.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from apiserver.controllers import revisions as rv
from apiserver.controllers import taints as tn
from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import run_workers
from apiserver.controllers.placement import pod_info
from apiserver.controllers.replicasets import (
    Expectations,
    controller_of,
    generate_name,
    is_available,
    is_ready,
    owner_reference,
    random_suffix,
    ready_since,
    seconds,
)
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.informer import NAMESPACE_INDEX, Informer, key_of
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

KIND = "DaemonSet"
NAME_FIELD = "metadata.name"


# -- pure: which nodes ---------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    should_run: bool          # a pod should be created here
    should_continue: bool     # a pod already here may stay


def daemon_pod_tolerations(spec: core_pb2.PodSpec) -> list[core_pb2.Toleration]:
    """The template's tolerations plus the daemon ones it lacks."""
    out = list(spec.tolerations)
    for t in tn.daemon_tolerations():
        if t not in out:
            out.append(t)
    return out


def node_fit(template: core_pb2.PodTemplateSpec, node: core_pb2.Node) -> Fit:
    probe = core_pb2.Pod()
    probe.spec.CopyFrom(template.spec)
    info = pod_info(probe)
    labels = node.metadata.labels
    selected = all(labels.get(k) == v for k, v in info.node_selector) and (
        info.required is None
        or any(t.matches(node.metadata.name, labels) for t in info.required))
    if not selected:
        return Fit(False, False)
    tols = daemon_pod_tolerations(template.spec)
    hard = tn.untolerated(node.spec.taints, tols)
    return Fit(should_run=not hard,
               should_continue=not [t for t in hard if t.effect == tn.NO_EXECUTE])


def target_node(pod: core_pb2.Pod) -> str:
    """The node a daemon pod is for: where it is bound, else its matchFields term."""
    if pod.spec.node_name:
        return pod.spec.node_name
    req = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    for term in req.node_selector_terms:
        for f in term.match_fields:
            if f.key == NAME_FIELD and f.operator == "In" and len(f.values) == 1:
                return str(f.values[0])
    return ""


def max_unavailable(ds: apps_pb2.DaemonSet, desired: int) -> int:
    """``maxUnavailable`` of the rolling update, scaled to ``desired`` (rounded up)."""
    v = ds.spec.update_strategy.rolling_update.max_unavailable
    which = v.WhichOneof("value")
    if which == "str_val" and v.str_val.endswith("%"):
        try:
            pct = int(v.str_val[:-1])
        except ValueError:
            return 1
        n = math.ceil(desired * pct / 100)
    elif which == "int_val":
        n = v.int_val
    elif which == "str_val" and v.str_val.isdigit():
        n = int(v.str_val)
    else:
        n = 1
    return max(1, n)


# -- pure: the plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    name: str
    uid: str
    node: str


@dataclass(frozen=True)
class Counts:
    desired: int = 0
    current: int = 0
    misscheduled: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0


@dataclass(frozen=True)
class DaemonSetPlan:
    create_on: tuple[str, ...] = ()
    delete: tuple[PodRef, ...] = ()
    failed: tuple[PodRef, ...] = ()        # among delete: failed pods (warning events)
    counts: Counts = field(default_factory=Counts)
    recheck_after: float | None = None


def _ref(pod: core_pb2.Pod) -> PodRef:
    return PodRef(pod.metadata.name, pod.metadata.uid, target_node(pod))


def _age_key(pod: core_pb2.Pod) -> tuple[float, str]:
    return (seconds(pod.metadata.creation_timestamp) or math.inf, pod.metadata.name)


def plan(ds: apps_pb2.DaemonSet, nodes: Sequence[core_pb2.Node], pods: Iterable[core_pb2.Pod],
         *, update_hash: str, now: float) -> DaemonSetPlan:
    """``pods``: those ``ds`` controls (terminating ones included)."""
    min_ready = ds.spec.min_ready_seconds
    by_node: dict[str, list[core_pb2.Pod]] = {}
    for p in pods:
        by_node.setdefault(target_node(p), []).append(p)
    create: list[str] = []
    delete: list[PodRef] = []
    failed: list[PodRef] = []
    # The pod that stands for each node that should run one (after dedupe).
    kept: dict[str, core_pb2.Pod] = {}
    desired = current = misscheduled = 0
    known = {n.metadata.name for n in nodes}
    for name, here in by_node.items():
        if name not in known:  # node gone (or a pod we cannot place): remove it
            delete += [_ref(p) for p in here if not p.metadata.HasField("deletion_timestamp")]
    for node in sorted(nodes, key=lambda n: n.metadata.name):
        name = node.metadata.name
        fit = node_fit(ds.spec.template, node)
        here = by_node.get(name, [])
        live = [p for p in here if not p.metadata.HasField("deletion_timestamp")]
        terminating = len(live) < len(here)
        dead = [p for p in live if p.status.phase in ("Failed", "Succeeded")]
        for p in dead:
            failed.append(_ref(p))
            delete.append(_ref(p))
        live = sorted((p for p in live if p not in dead), key=_age_key)
        if fit.should_run:
            desired += 1
        if fit.should_continue and live:
            if fit.should_run:
                current += 1
            else:
                misscheduled += 1
            kept[name] = live[0]
            delete += [_ref(p) for p in live[1:]]
        elif live:
            misscheduled += 1
            delete += [_ref(p) for p in live]
        elif fit.should_run and not terminating and not dead:
            create.append(name)
    should_run = {n.metadata.name for n in nodes if node_fit(ds.spec.template, n).should_run}
    ready = sum(1 for n, p in kept.items() if n in should_run and is_ready(p))
    available = sum(1 for n, p in kept.items()
                    if n in should_run and is_available(p, min_ready, now))
    updated = sum(1 for n, p in kept.items() if n in should_run
                  and p.metadata.labels.get(rv.REVISION_HASH_LABEL) == update_hash)
    if ds.spec.update_strategy.type in ("", "RollingUpdate"):
        delete += _rolling(ds, kept, should_run, update_hash=update_hash, now=now)
    recheck = math.inf
    if min_ready > 0:
        for p in kept.values():
            since = ready_since(p)
            if since is not None and since + min_ready > now:
                recheck = min(recheck, since + min_ready - now)
    counts = Counts(desired=desired, current=current, misscheduled=misscheduled,
                    ready=ready, updated=updated, available=available)
    return DaemonSetPlan(create_on=tuple(create), delete=tuple(dict.fromkeys(delete)),
                         failed=tuple(failed), counts=counts,
                         recheck_after=None if recheck == math.inf else recheck)


def _rolling(ds: apps_pb2.DaemonSet, kept: Mapping[str, core_pb2.Pod], should_run: set[str],
             *, update_hash: str, now: float) -> list[PodRef]:
    min_ready = ds.spec.min_ready_seconds
    budget = max_unavailable(ds, len(should_run))
    unavailable = sum(1 for n in should_run
                      if n not in kept or not is_available(kept[n], min_ready, now))
    out: list[PodRef] = []
    old = [(n, p) for n, p in sorted(kept.items()) if n in should_run
           and p.metadata.labels.get(rv.REVISION_HASH_LABEL) != update_hash]
    for _, p in old:
        if not is_available(p, min_ready, now):
            out.append(_ref(p))  # already unavailable: replacing it costs nothing
    for _, p in old:
        if is_available(p, min_ready, now) and unavailable < budget:
            out.append(_ref(p))
            unavailable += 1
    return out


def status_of(ds: apps_pb2.DaemonSet, counts: Counts, *, collision_count: int | None = None
              ) -> apps_pb2.DaemonSetStatus:
    st = apps_pb2.DaemonSetStatus()
    st.CopyFrom(ds.status)
    st.desired_number_scheduled = counts.desired
    st.current_number_scheduled = counts.current
    st.number_misscheduled = counts.misscheduled
    st.number_ready = counts.ready
    st.updated_number_scheduled = counts.updated
    st.number_available = counts.available
    st.number_unavailable = max(0, counts.desired - counts.available)
    st.observed_generation = ds.metadata.generation
    if collision_count is not None:
        st.collision_count = collision_count
    return st


def pod_for_node(ds: apps_pb2.DaemonSet, *, node: str, name: str,
                 template: core_pb2.PodTemplateSpec, hash_: str) -> core_pb2.Pod:
    pod = core_pb2.Pod()
    pod.metadata.name = name
    pod.metadata.namespace = ds.metadata.namespace
    pod.metadata.labels.update(template.metadata.labels)
    pod.metadata.labels[rv.REVISION_HASH_LABEL] = hash_
    pod.metadata.annotations.update(template.metadata.annotations)
    pod.metadata.finalizers.extend(template.metadata.finalizers)
    pod.metadata.owner_references.append(owner_reference(ds, kind=KIND))
    pod.spec.CopyFrom(template.spec)
    del pod.spec.tolerations[:]
    pod.spec.tolerations.extend(daemon_pod_tolerations(template.spec))
    req = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    del req.node_selector_terms[:]
    term = req.node_selector_terms.add()
    term.match_fields.append(core_pb2.NodeSelectorRequirement(
        key=NAME_FIELD, operator="In", values=[node]))
    return pod


# -- the controller ------------------------------------------------------------------------


class DaemonSetController:
    name = "daemonset"

    def __init__(self) -> None:
        self.queue = WorkQueue()
        self.expectations = Expectations()
        self._ctx: ControllerContext | None = None
        self._ds: Informer[apps_pb2.DaemonSet] | None = None
        self._pods: Informer[core_pb2.Pod] | None = None
        self._nodes: Informer[core_pb2.Node] | None = None
        self._revs: Informer[apps_pb2.ControllerRevision] | None = None

    @property
    def ctx(self) -> ControllerContext:
        assert self._ctx is not None, "setup() first"
        return self._ctx

    @property
    def daemonsets(self) -> Informer[apps_pb2.DaemonSet]:
        assert self._ds is not None, "setup() first"
        return self._ds

    @property
    def pods(self) -> Informer[core_pb2.Pod]:
        assert self._pods is not None, "setup() first"
        return self._pods

    @property
    def nodes(self) -> Informer[core_pb2.Node]:
        assert self._nodes is not None, "setup() first"
        return self._nodes

    @property
    def revisions(self) -> Informer[apps_pb2.ControllerRevision]:
        assert self._revs is not None, "setup() first"
        return self._revs

    def setup(self, ctx: ControllerContext) -> None:
        self._ctx = ctx
        self._ds = ctx.informers.get(apps_pb2.DaemonSet)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._nodes = ctx.informers.get(core_pb2.Node)
        self._revs = ctx.informers.get(apps_pb2.ControllerRevision)
        self._ds.add_handlers(on_add=self._ds_changed,
                              on_update=lambda _o, n: self._ds_changed(n),
                              on_delete=self._ds_deleted)
        self._pods.add_handlers(on_add=self._pod_added,
                                on_update=lambda _o, n: self._pod_added(n),
                                on_delete=self._pod_deleted)
        self._nodes.add_handlers(on_add=lambda _n: self._all(),
                                 on_update=self._node_updated,
                                 on_delete=lambda _n: self._all())

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        try:
            await run_workers(self.queue, self.sync, count=ctx.settings.workers,
                              what="daemonset")
        finally:
            self.queue.close()

    # -- handlers (enqueue only) -------------------------------------------------------

    def _ds_changed(self, ds: apps_pb2.DaemonSet) -> None:
        self.queue.add(key_of(ds))

    def _ds_deleted(self, ds: apps_pb2.DaemonSet) -> None:
        self.expectations.forget(key_of(ds))

    def _owner_key(self, pod: core_pb2.Pod) -> str | None:
        ref = controller_of(pod.metadata)
        if ref is None or ref.kind != KIND:
            return None
        ds = self.daemonsets.get(pod.metadata.namespace, ref.name)
        return key_of(ds) if ds is not None and ds.metadata.uid == ref.uid else None

    def _pod_added(self, pod: core_pb2.Pod) -> None:
        key = self._owner_key(pod)
        if key is None:
            return
        self.expectations.created(key, pod.metadata.name)
        if pod.metadata.HasField("deletion_timestamp"):
            self.expectations.deleted(key, pod.metadata.uid)
        self.queue.add(key)

    def _pod_deleted(self, pod: core_pb2.Pod) -> None:
        key = self._owner_key(pod)
        if key is not None:
            self.expectations.deleted(key, pod.metadata.uid)
            self.queue.add(key)

    def _node_updated(self, old: core_pb2.Node, new: core_pb2.Node) -> None:
        if (dict(old.metadata.labels) != dict(new.metadata.labels)
                or list(old.spec.taints) != list(new.spec.taints)):
            self._all()

    def _all(self) -> None:
        for ds in self.daemonsets.list():
            self.queue.add(key_of(ds))

    # -- the worker ------------------------------------------------------------------------

    def _owned(self, ds: apps_pb2.DaemonSet, objs: Iterable[core_pb2.Pod]
               ) -> list[core_pb2.Pod]:
        return [p for p in objs if (ref := controller_of(p.metadata)) is not None
                and ref.uid == ds.metadata.uid]

    async def sync(self, key: str) -> float | None:
        ctx = self.ctx
        ds = self.daemonsets.get_by_key(key)
        if ds is None or ds.metadata.HasField("deletion_timestamp"):
            return None
        now = ctx.clock()
        if not self.expectations.satisfied(key, now):
            return None  # the informer event that satisfies it re-queues the key
        ns = ds.metadata.namespace
        pods = self._owned(ds, self.pods.by_index(NAMESPACE_INDEX, ns))
        revs = [r for r in self.revisions.by_index(NAMESPACE_INDEX, ns)
                if (ref := controller_of(r.metadata)) is not None
                and ref.uid == ds.metadata.uid]
        in_use = {p.metadata.labels.get(rv.REVISION_HASH_LABEL, "") for p in pods}
        limit = ds.spec.revision_history_limit if ds.spec.HasField(
            "revision_history_limit") else 10
        collision = ds.status.collision_count if ds.status.HasField("collision_count") else 0
        rplan = rv.plan_revisions(ds, kind=KIND, revisions=revs, collision_count=collision,
                                  history_limit=limit, in_use=in_use)
        if not await self._write_revision(ds, rplan, collision):
            return None
        actions = plan(ds, self.nodes.list(), pods, update_hash=rplan.update_hash, now=now)
        failure: errors.ShoalError | None = None
        try:
            await self._act(ds, key, actions, rplan.update_hash)
        except errors.ShoalError as e:
            failure = e
        for name in rplan.prune:
            try:
                await ctx.client.delete(apps_pb2.ControllerRevision, name, namespace=ns)
            except errors.NotFound:
                pass
        status = status_of(ds, actions.counts)
        if status != ds.status:
            fresh = apps_pb2.DaemonSet()
            fresh.CopyFrom(ds)
            fresh.status.CopyFrom(status)
            fresh.metadata.resource_version = ""
            try:
                await ctx.client.update_status(fresh)
            except errors.NotFound:
                return None
        if failure is not None:
            raise failure
        return actions.recheck_after

    async def _write_revision(self, ds: apps_pb2.DaemonSet, rplan: rv.RevisionPlan,
                              collision: int) -> bool:
        """Create or renumber the update revision; False after a hash collision."""
        client = self.ctx.client
        if rplan.renumber is not None:
            await client.update(rplan.renumber)
        if rplan.create is None:
            return True
        try:
            await client.create(rplan.create)
            return True
        except errors.AlreadyExists:
            found = await client.get(apps_pb2.ControllerRevision,
                                     rplan.create.metadata.name,
                                     namespace=ds.metadata.namespace)
            ref = controller_of(found.metadata)
            if found.data == rplan.create.data and ref is not None \
                    and ref.uid == ds.metadata.uid:
                return True
        fresh = apps_pb2.DaemonSet()
        fresh.CopyFrom(ds)
        fresh.status.collision_count = collision + 1
        fresh.metadata.resource_version = ""
        await client.update_status(fresh)
        return False

    async def _act(self, ds: apps_pb2.DaemonSet, key: str, actions: DaemonSetPlan,
                   hash_: str) -> None:
        ctx = self.ctx
        names = {node: generate_name(f"{ds.metadata.name}-", random_suffix())
                 for node in actions.create_on}
        if not names and not actions.delete:
            return
        self.expectations.expect(key, creates=names.values(),
                                 deletes=[r.uid for r in actions.delete], now=ctx.clock())
        results = await asyncio.gather(
            *(self._create(ds, key, node, name, hash_) for node, name in names.items()),
            *(self._delete(ds, key, ref, failed=ref in actions.failed)
              for ref in actions.delete),
            return_exceptions=True)
        for r in results:
            if isinstance(r, errors.ShoalError):
                raise r
            if isinstance(r, BaseException):
                raise errors.InternalError(str(r)) from r

    async def _create(self, ds: apps_pb2.DaemonSet, key: str, node: str, name: str,
                      hash_: str) -> None:
        pod = pod_for_node(ds, node=node, name=name, template=ds.spec.template, hash_=hash_)
        try:
            await self.ctx.client.create(pod)
        except errors.ShoalError as e:
            self.expectations.created(key, name)
            self.ctx.events.event(ds, "Warning", "FailedCreate", f"Error creating: {e.message}")
            raise
        log.info("daemonset %s: created pod %s for node %s", key, name, node)
        self.ctx.events.event(ds, "Normal", "SuccessfulCreate", f"Created pod: {name}")

    async def _delete(self, ds: apps_pb2.DaemonSet, key: str, ref: PodRef, *,
                      failed: bool) -> None:
        if failed:
            self.ctx.events.event(
                ds, "Warning", "FailedDaemonPod",
                f"Found failed daemon pod {ds.metadata.namespace}/{ref.name} on node "
                f"{ref.node}, will try to kill it")
        try:
            await self.ctx.client.delete(core_pb2.Pod, ref.name,
                                         namespace=ds.metadata.namespace, uid=ref.uid)
        except (errors.NotFound, errors.Conflict):
            self.expectations.deleted(key, ref.uid)
            return
        log.info("daemonset %s: deleted pod %s on node %s", key, ref.name, ref.node)
        self.ctx.events.event(ds, "Normal", "SuccessfulDelete", f"Deleted pod: {ref.name}")

