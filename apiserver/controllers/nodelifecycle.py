"""Node lifecycle: a node whose agent goes quiet is marked unreachable; its pods move.

    agent renews Lease kube-node-lease/<node> (every 10 s) and posts status
        |  a change of Lease renewTime or Ready heartbeat = a probe, timed on OUR clock
        v
    healthy --no probe for node_monitor_grace_period--> conditions Unknown
        ^                                               (NodeStatusUnknown), event NodeNotReady,
        |                                               taint unreachable:NoExecute+NoSchedule,
        |                                               its pods' Ready=False
        +--agent posts Ready=True----------------------- taints removed

    Ready=False (posted by the agent)  -> taint not-ready:NoExecute+NoSchedule
    spec.unschedulable (cordon)        -> taint unschedulable:NoSchedule
    *Pressure=True                     -> taint <x>-pressure:NoSchedule

Taint-based eviction (Kubernetes' taint manager), per pod on a node with
NoExecute taints:

    a NoExecute taint the pod does not tolerate  -> evicted now
    tolerated, with tolerationSeconds            -> evicted at taint.timeAdded + seconds
    tolerated, without tolerationSeconds         -> stays

A pod with no toleration for not-ready/unreachable is treated as tolerating
them for ``pod_eviction_timeout`` (Kubernetes' DefaultTolerationSeconds
admission gives every pod 300 s). Eviction deletes the pod. On an unreachable
node the agent cannot finish that deletion, so the controller also removes the
agent's finalizer (``shoal.dev/nodeagent``): the pod goes at once, its controller
recreates it elsewhere, and the agent cleans up the orphaned containers if it
comes back (it removes runtime pods that have no API object). StatefulSet pods
are the exception, as in Kubernetes: they stay Terminating until the node comes
back (or someone force-deletes them), so one identity never runs twice.

Contract: ``plan_node`` and ``plan_pods`` are pure and take ``now``; the worker
for a node key re-reads everything from the informers, writes with the cached
resourceVersion (a stale read is a Conflict, retried with back-off), and returns
the delay after which it must look again (grace expiry, eviction deadlines).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from apiserver.controllers import taints as tn
from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import every, run_workers
from shoal import errors
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "kube-node-lease"
# The node agent's finalizer (nodeagent/podsync.py); the apiserver may not import
# the agent, so the name is repeated here.
AGENT_FINALIZER = "shoal.dev/nodeagent"
AGENT = "shoal-nodeagent"
STOPPED_POSTING = f"{AGENT} stopped posting node status."
NEVER_POSTED = f"{AGENT} never posted node status."
WATCHED_CONDITIONS = ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")
_PRESSURE_TAINTS = {"MemoryPressure": tn.MEMORY_PRESSURE, "DiskPressure": tn.DISK_PRESSURE,
                    "PIDPressure": tn.PID_PRESSURE}
RESYNC_SECONDS = 30.0


# -- pure: health ------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """When this controller last saw the node's agent alive, on its own clock."""

    probe_time: float
    lease_renew: float | None
    heartbeat: float | None


def _seconds(ts: timestamp_pb2.Timestamp) -> float | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def _ts(now: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(now * 1e9))
    return ts


def ready_condition(node: core_pb2.Node) -> core_pb2.NodeCondition | None:
    return next((c for c in node.status.conditions if c.type == "Ready"), None)


def ready_status(node: core_pb2.Node) -> str:
    """True, False or Unknown; a node that never posted a Ready condition is Unknown."""
    cond = ready_condition(node)
    return cond.status if cond is not None and cond.status else "Unknown"


def observe(prev: Health | None, *, lease_renew: float | None, heartbeat: float | None,
            now: float) -> Health:
    """A node seen for the first time, or whose Lease or heartbeat moved, was probed now."""
    if prev is None or lease_renew != prev.lease_renew or heartbeat != prev.heartbeat:
        return Health(probe_time=now, lease_renew=lease_renew, heartbeat=heartbeat)
    return prev


# -- pure: the node ----------------------------------------------------------------


@dataclass(frozen=True)
class NodePlan:
    # New status conditions, or None to leave them.
    conditions: tuple[core_pb2.NodeCondition, ...] | None
    # The node's new taints, or None to leave them.
    taints: tuple[core_pb2.Taint, ...] | None
    ready: str
    became_not_ready: bool
    recheck_after: float | None


def _stale_conditions(node: core_pb2.Node, now: float) -> tuple[core_pb2.NodeCondition, ...]:
    """Every watched condition Unknown, as Kubernetes does for a silent node."""
    out: list[core_pb2.NodeCondition] = []
    seen: set[str] = set()
    for c in node.status.conditions:
        cond = core_pb2.NodeCondition()
        cond.CopyFrom(c)
        seen.add(c.type)
        if c.type in WATCHED_CONDITIONS and c.status != "Unknown":
            cond.status = "Unknown"
            cond.reason = "NodeStatusUnknown"
            cond.message = STOPPED_POSTING
            cond.last_transition_time.CopyFrom(_ts(now))
        out.append(cond)
    for type_ in WATCHED_CONDITIONS:
        if type_ not in seen:
            cond = core_pb2.NodeCondition(type=type_, status="Unknown",
                                          reason="NodeStatusNeverUpdated", message=NEVER_POSTED)
            cond.last_transition_time.CopyFrom(_ts(now))
            out.append(cond)
    return tuple(out)


def desired_taints(node: core_pb2.Node, conditions: Iterable[core_pb2.NodeCondition]
                   ) -> set[tuple[str, str]]:
    """The (key, effect) of every taint this controller wants on the node."""
    want: set[tuple[str, str]] = set()
    status = {c.type: c.status for c in conditions}
    ready = status.get("Ready")
    if ready == "False":
        want |= {(tn.NOT_READY, tn.NO_SCHEDULE), (tn.NOT_READY, tn.NO_EXECUTE)}
    elif ready == "Unknown":
        want |= {(tn.UNREACHABLE, tn.NO_SCHEDULE), (tn.UNREACHABLE, tn.NO_EXECUTE)}
    if node.spec.unschedulable:
        want.add((tn.UNSCHEDULABLE, tn.NO_SCHEDULE))
    for type_, key in _PRESSURE_TAINTS.items():
        if status.get(type_) == "True":
            want.add((key, tn.NO_SCHEDULE))
    return want


def _merged_taints(node: core_pb2.Node, want: set[tuple[str, str]], now: float
                   ) -> tuple[core_pb2.Taint, ...] | None:
    kept: list[core_pb2.Taint] = []
    have: set[tuple[str, str]] = set()
    changed = False
    for t in node.spec.taints:
        managed = t.key in tn.MANAGED_KEYS
        if managed and (t.key, t.effect) not in want:
            changed = True
            continue
        if managed:
            have.add((t.key, t.effect))
        kept.append(t)
    for key, effect in sorted(want - have):
        t = core_pb2.Taint(key=key, effect=effect)
        if effect == tn.NO_EXECUTE:
            t.time_added.CopyFrom(_ts(now))
        kept.append(t)
        changed = True
    return tuple(kept) if changed else None


def plan_node(node: core_pb2.Node, *, health: Health, now: float, grace: float,
              last_ready: str | None = None) -> NodePlan:
    """``last_ready``: the Ready status this controller saw on its previous look, so
    a transition the agent posted itself is reported too."""
    before = ready_status(node)
    deadline = health.probe_time + grace
    conditions: tuple[core_pb2.NodeCondition, ...] | None = None
    recheck: float | None = None
    if now >= deadline:
        stale = _stale_conditions(node, now)
        if list(stale) != list(node.status.conditions):
            conditions = stale
    else:
        recheck = deadline - now
    current = conditions if conditions is not None else tuple(node.status.conditions)
    after = next((c.status for c in current if c.type == "Ready"), "Unknown") or "Unknown"
    taints = _merged_taints(node, desired_taints(node, current), now)
    return NodePlan(conditions=conditions, taints=taints, ready=after,
                    became_not_ready=after != "True" and "True" in (before, last_ready),
                    recheck_after=recheck)


# -- pure: the pods on a node ----------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodPlan:
    evict: tuple[PodRef, ...]
    # Terminating pods on an unreachable node: drop the agent's finalizer.
    release: tuple[PodRef, ...]
    mark_not_ready: tuple[PodRef, ...]
    recheck_after: float | None


def ref_of(pod: core_pb2.Pod) -> PodRef:
    return PodRef(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid)


def effective_tolerations(pod: core_pb2.Pod, *, default_seconds: int
                          ) -> list[core_pb2.Toleration]:
    """The pod's tolerations plus Kubernetes' DefaultTolerationSeconds ones it lacks."""
    tols = list(pod.spec.tolerations)
    for key in (tn.NOT_READY, tn.UNREACHABLE):
        probe = core_pb2.Taint(key=key, effect=tn.NO_EXECUTE)
        if not tn.tolerated(probe, tols):
            tols.append(tn.toleration(key, tn.NO_EXECUTE, seconds=default_seconds))
    return tols


def eviction_time(pod: core_pb2.Pod, taints: Sequence[tuple[core_pb2.Taint, float]], *,
                  default_seconds: int) -> float:
    """When the pod must go: -inf (now), a time, or +inf (never).

    ``taints`` are the node's NoExecute taints with the time each was added."""
    tols = effective_tolerations(pod, default_seconds=default_seconds)
    when = math.inf
    for taint, added in taints:
        used = [t for t in tols if tn.tolerates(t, taint)]
        if not used:
            return -math.inf
        for t in used:
            if t.HasField("toleration_seconds"):
                when = min(when, added + max(0, t.toleration_seconds))
    return when


def _pod_ready(pod: core_pb2.Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)


def unreachable(node: core_pb2.Node) -> bool:
    """Marked unreachable: its agent can no longer act on the node's pods."""
    return any(t.key == tn.UNREACHABLE and t.effect == tn.NO_EXECUTE for t in node.spec.taints)


def releasable(pod: core_pb2.Pod) -> bool:
    """May the controller finish this pod's deletion for an unreachable node's agent?

    Not for a StatefulSet's pod: its replacement has the same name and
    identity, so it must wait until the old one is known to be stopped."""
    if AGENT_FINALIZER not in pod.metadata.finalizers:
        return False
    return not any(r.controller and r.kind == "StatefulSet"
                   for r in pod.metadata.owner_references)


def plan_pods(pods: Iterable[core_pb2.Pod], *, taints: Sequence[tuple[core_pb2.Taint, float]],
              unreachable: bool, now: float, default_seconds: int) -> PodPlan:
    """``taints``: the node's NoExecute taints with the time each was added;
    ``unreachable``: the node carries the unreachable NoExecute taint."""
    no_execute = [(t, added) for t, added in taints if t.effect == tn.NO_EXECUTE]
    evict: list[PodRef] = []
    release: list[PodRef] = []
    mark: list[PodRef] = []
    recheck = math.inf
    for pod in pods:
        terminating = pod.metadata.HasField("deletion_timestamp")
        if terminating:
            if unreachable and releasable(pod):
                release.append(ref_of(pod))
            continue
        if unreachable and _pod_ready(pod):
            mark.append(ref_of(pod))
        if not no_execute:
            continue
        when = eviction_time(pod, no_execute, default_seconds=default_seconds)
        if when <= now:
            evict.append(ref_of(pod))
        elif when < math.inf:
            recheck = min(recheck, when - now)
    return PodPlan(evict=tuple(evict), release=tuple(release), mark_not_ready=tuple(mark),
                   recheck_after=None if recheck == math.inf else recheck)


def earliest(*delays: float | None) -> float | None:
    known = [d for d in delays if d is not None]
    return min(known) if known else None


# -- the controller ----------------------------------------------------------------------


class NodeLifecycleController:
    name = "nodelifecycle"

    def __init__(self, *, resync_period: float = RESYNC_SECONDS) -> None:
        self.queue = WorkQueue(base_delay=0.05, max_delay=10.0)
        self.resync_period = resync_period
        self._health: dict[str, Health] = {}
        self._last_ready: dict[str, str] = {}
        # NoExecute taints that came without timeAdded: when we first saw them.
        self._taint_seen: dict[tuple[str, str, str], float] = {}
        self._pods_by_node: dict[str, set[str]] = {}
        self._node_of_pod: dict[str, str] = {}
        self._ctx: ControllerContext | None = None

    @property
    def ctx(self) -> ControllerContext:
        assert self._ctx is not None, "setup() first"
        return self._ctx

    def setup(self, ctx: ControllerContext) -> None:
        self._ctx = ctx
        self.nodes = ctx.informers.get(core_pb2.Node)
        self.leases = ctx.informers.get(coordination_pb2.Lease, namespace=LEASE_NAMESPACE)
        self.pods = ctx.informers.get(core_pb2.Pod)
        self.nodes.add_handlers(on_add=self._node_changed,
                                on_update=lambda _old, new: self._node_changed(new),
                                on_delete=self._node_changed)
        self.leases.add_handlers(on_add=self._lease_changed,
                                 on_update=lambda _old, new: self._lease_changed(new),
                                 on_delete=self._lease_changed)
        self.pods.add_handlers(on_add=self._pod_changed,
                               on_update=lambda _old, new: self._pod_changed(new),
                               on_delete=self._pod_deleted)

    def _node_changed(self, node: core_pb2.Node) -> None:
        self.queue.add(node.metadata.name)

    def _lease_changed(self, lease: coordination_pb2.Lease) -> None:
        self.queue.add(lease.metadata.name)

    def _pod_changed(self, pod: core_pb2.Pod) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        node = pod.spec.node_name
        old = self._node_of_pod.get(key)
        if old != node:
            if old is not None:
                self._pods_by_node.get(old, set()).discard(key)
            if node:
                self._node_of_pod[key] = node
                self._pods_by_node.setdefault(node, set()).add(key)
            else:
                self._node_of_pod.pop(key, None)
        if node and self._troubled(node):
            self.queue.add(node)

    def _pod_deleted(self, pod: core_pb2.Pod) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        node = self._node_of_pod.pop(key, None)
        if node is not None:
            self._pods_by_node.get(node, set()).discard(key)

    def _troubled(self, name: str) -> bool:
        node = self.nodes.get("", name)
        return node is not None and (ready_status(node) != "True" or any(
            t.effect == tn.NO_EXECUTE for t in node.spec.taints))

    def _resync(self) -> None:
        for node in self.nodes.list():
            self.queue.add(node.metadata.name)

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        self._resync()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_workers(self.queue, self.sync, count=ctx.settings.workers,
                                           what="nodelifecycle"))
                tg.create_task(every(self.resync_period, self._resync))
        finally:
            self.queue.close()

    # -- one node ----------------------------------------------------------------------

    def _pods_on(self, name: str) -> list[core_pb2.Pod]:
        out = []
        for key in sorted(self._pods_by_node.get(name, ())):
            pod = self.pods.get_by_key(key)
            if pod is not None and pod.spec.node_name == name:
                out.append(pod)
        return out

    def _no_execute(self, node: core_pb2.Node, now: float
                    ) -> list[tuple[core_pb2.Taint, float]]:
        out = []
        name = node.metadata.name
        live = set()
        for t in node.spec.taints:
            if t.effect != tn.NO_EXECUTE:
                continue
            added = _seconds(t.time_added)
            if added is None:
                k = (name, t.key, t.value)
                live.add(k)
                added = self._taint_seen.setdefault(k, now)
            out.append((t, added))
        for k in [k for k in self._taint_seen if k[0] == name and k not in live]:
            del self._taint_seen[k]
        return out

    async def sync(self, name: str) -> float | None:
        ctx = self.ctx
        node = self.nodes.get("", name)
        if node is None:
            self._health.pop(name, None)
            self._last_ready.pop(name, None)
            return None
        now = ctx.clock()
        lease = self.leases.get(LEASE_NAMESPACE, name)
        ready = ready_condition(node)
        health = observe(self._health.get(name),
                         lease_renew=_seconds(lease.spec.renew_time) if lease else None,
                         heartbeat=_seconds(ready.last_heartbeat_time) if ready else None,
                         now=now)
        self._health[name] = health
        grace = ctx.settings.node_monitor_grace_period
        plan = plan_node(node, health=health, now=now, grace=grace,
                         last_ready=self._last_ready.get(name))
        node = await self._apply_node(node, plan)
        self._last_ready[name] = plan.ready
        pod_plan = plan_pods(self._pods_on(name), taints=self._no_execute(node, now),
                             unreachable=unreachable(node), now=now,
                             default_seconds=math.ceil(ctx.settings.pod_eviction_timeout))
        await self._apply_pods(node, pod_plan)
        return earliest(plan.recheck_after, pod_plan.recheck_after)

    async def _apply_node(self, node: core_pb2.Node, plan: NodePlan) -> core_pb2.Node:
        ctx = self.ctx
        name = node.metadata.name
        if plan.conditions is not None:
            update = core_pb2.Node()
            update.CopyFrom(node)
            del update.status.conditions[:]
            update.status.conditions.extend(plan.conditions)
            node = await ctx.client.update_status(update)
            log.info("node %s: no heartbeat for %.0fs; Ready is now %s", name,
                     ctx.settings.node_monitor_grace_period, plan.ready)
        if plan.became_not_ready:
            ctx.events.event(node, "Normal", "NodeNotReady",
                             f"Node {name} status is now: NodeNotReady")
        if plan.taints is not None:
            update = core_pb2.Node()
            update.CopyFrom(node)
            del update.spec.taints[:]
            update.spec.taints.extend(plan.taints)
            node = await ctx.client.update(update)
            log.info("node %s: taints now %s", name,
                     ", ".join(f"{t.key}:{t.effect}" for t in node.spec.taints) or "none")
        return node

    async def _apply_pods(self, node: core_pb2.Node, plan: PodPlan) -> None:
        for ref in plan.mark_not_ready:
            await self._mark_not_ready(ref)
        for ref in plan.evict:
            pod = self.pods.get(ref.namespace, ref.name)
            log.info("node %s: evicting pod %s (NoExecute taint)", node.metadata.name, ref)
            try:
                deleted = await self.ctx.client.delete(core_pb2.Pod, ref.name,
                                                       namespace=ref.namespace, uid=ref.uid)
            except (errors.NotFound, errors.Conflict):
                continue
            self.ctx.events.event(pod or deleted, "Normal", "TaintManagerEviction",
                                  f"Marking for deletion Pod {ref}")
            if (unreachable(node) and deleted.metadata.HasField("deletion_timestamp")
                    and releasable(deleted)):
                await self._release(ref)
        for ref in plan.release:
            await self._release(ref)

    async def _mark_not_ready(self, ref: PodRef) -> None:
        pod = self.pods.get(ref.namespace, ref.name)
        if pod is None or pod.metadata.uid != ref.uid:
            return
        update = core_pb2.Pod()
        update.CopyFrom(pod)
        for c in update.status.conditions:
            if c.type == "Ready" and c.status == "True":
                c.status = "False"
                c.last_transition_time.CopyFrom(_ts(self.ctx.clock()))
        try:
            await self.ctx.client.update_status(update)
        except errors.NotFound:
            pass

    async def _release(self, ref: PodRef) -> None:
        """The agent of an unreachable node cannot finish a deletion: finish it here."""
        for _ in range(5):
            try:
                pod = await self.ctx.client.get(core_pb2.Pod, ref.name, namespace=ref.namespace)
            except errors.NotFound:
                return
            if pod.metadata.uid != ref.uid or AGENT_FINALIZER not in pod.metadata.finalizers:
                return
            pod.metadata.finalizers.remove(AGENT_FINALIZER)
            try:
                await self.ctx.client.update(pod)
                log.info("pod %s: node unreachable; removed %s so the deletion completes",
                         ref, AGENT_FINALIZER)
                return
            except errors.NotFound:
                return
            except errors.Conflict:
                continue
        raise errors.Conflict(f"pod {ref}: could not remove {AGENT_FINALIZER}")

