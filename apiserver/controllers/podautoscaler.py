"""The HorizontalPodAutoscaler controller: Kubernetes' algorithm on Shoal's metrics.

    HPA events --> keys --> WorkQueue; every key again after ``hpa_sync_period`` (15 s)
    worker(key):
      target (Deployment / ReplicaSet / StatefulSet) -> current replicas, selector
      pods (informer cache) + MetricsSource (metrics API; the mesh's request rates)
      clamp to [minReplicas, maxReplicas] when outside, else per metric:
          propose(current, pods, samples, target)                        [pure]
      decide(current, proposed, rules, recommendations, events, now)    [pure]
          stabilization window, then the scale-up / scale-down policies
      executor: target.spec.replicas (read-modify-write, conflicts retried),
                event SuccessfulRescale, HPA status (currentMetrics, conditions)

``propose`` is Kubernetes' replica calculator: the usage ratio is value / target
(CPU and memory: the pods' summed usage over their summed requests, against
``averageUtilization``; AverageValue: the pods' mean against it). Within 10%
of 1.0 nothing changes; otherwise ``ceil(ratio * ready pods)``. Pods being
deleted or failed are ignored. Pods without a sample count, when the others
say "scale down", as using exactly the target (100% of their request for
utilization), and as using nothing when they say "scale up"; for CPU, pods
not Ready (and Pending pods for every metric) count as using nothing when
scaling up and are left out otherwise. If that recount flips the direction or
lands within tolerance, nothing changes. (Kubernetes also ignores CPU samples
taken during a pod's first readiness transition; Shoal uses Ready only.)

``decide`` is Kubernetes' behavior: every proposal is recorded with its time;
the stabilized count is the current count pulled up to the lowest proposal
within the scale-up window and down to the highest within the scale-down
window (a new autoscaler starts with one recommendation of the current count).
Then the policies cap the change: the replicas at the start of each policy's
period (current minus what was added plus what was removed in it), plus
``value`` pods or ``value`` percent (rounded up for scale up, down for scale
down); ``Max`` picks the policy allowing the biggest change, ``Min`` the
smallest, ``Disabled`` forbids the direction. min/maxReplicas bound the result.

Conditions, as Kubernetes: AbleToScale (FailedGetScale, FailedUpdateScale,
ScaleUpStabilized / ScaleDownStabilized, ReadyForNewScale, SucceededRescale),
ScalingActive (ValidMetricFound, FailedGetResourceMetric, FailedGetPodsMetric,
ScalingDisabled when the target has 0 replicas), ScalingLimited
(TooManyReplicas, TooFewReplicas, ScaleUpLimit, ScaleDownLimit,
DesiredWithinRange). Recommendations and scale events are kept in memory,
per autoscaler, as Kubernetes does; a new leader starts them afresh.

Contract: ``propose`` and ``decide`` are pure (``now`` passed in). A sync is
idempotent; failures go back to the queue with per-key back-off, and a key
is synced again every period regardless.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from apiserver.controllers.autoscalingmetrics import (
    APIResourceUsage,
    CombinedSource,
    MeshRequestRates,
    MetricsSource,
    MetricUnavailable,
)
from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import run_workers
from apiserver.controllers.replicasets import is_ready
from shoal import autoscaling, errors, quantity, selectors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.autoscaling.v2 import autoscaling_pb2 as pb
from shoal.api.core.v1 import core_pb2
from shoal.autoscaling import Rules
from shoal.informer import NAMESPACE_INDEX, Informer, key_of
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

TOLERANCE = 0.1
TARGET_KINDS: Mapping[str, type[Any]] = {
    "Deployment": apps_pb2.Deployment,
    "ReplicaSet": apps_pb2.ReplicaSet,
    "StatefulSet": apps_pb2.StatefulSet,
}
_SCALE_ATTEMPTS = 5


# -- pure: the replica calculator -------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    """What the calculator needs of one pod."""

    name: str
    phase: str
    ready: bool
    deleting: bool = False
    # The summed request of the metric's resource (utilization only; None: not set).
    request: float | None = None


@dataclass(frozen=True)
class Proposal:
    replicas: int
    # Utilization: percent of the requests (None for plain values).
    utilization: int | None
    # The mean value per pod that had a sample (millicores, bytes, requests/s).
    average: float


def _ratio(values: Mapping[str, float], pods: Mapping[str, PodView], *, target: float,
           utilization: bool) -> tuple[float, int | None, float]:
    """(usage ratio, utilization %, mean value) over the pods in ``values``."""
    if not values:
        return 0.0, None, 0.0
    total = sum(values.values())
    mean = total / len(values)
    if utilization:
        requested = sum(pods[n].request or 0.0 for n in values)
        if requested <= 0:
            raise MetricUnavailable("the pods have no request for the resource")
        percent = total * 100 / requested
        return percent / target, int(percent), mean
    return mean / target, None, mean


def propose(*, current: int, pods: Sequence[PodView], samples: Mapping[str, float],
            target: float, utilization: bool, cpu: bool,
            tolerance: float = TOLERANCE) -> Proposal:
    """Kubernetes' replica calculator (see the module docstring).

    ``target``: the averageUtilization percent, or the average value per pod.
    Raises :class:`MetricUnavailable` when no pod has a usable sample."""
    by_name = {p.name: p for p in pods}
    ready_count = 0
    unready: set[str] = set()
    missing: set[str] = set()
    values: dict[str, float] = {}
    for p in pods:
        if p.deleting or p.phase in {"Failed", "Succeeded"}:
            continue
        if p.phase == "Pending":
            unready.add(p.name)
            continue
        if p.name not in samples:
            missing.add(p.name)
            continue
        if cpu and not p.ready:
            unready.add(p.name)
            continue
        if utilization and p.request is None:
            raise MetricUnavailable(f"missing request for the resource on pod {p.name}")
        values[p.name] = samples[p.name]
        ready_count += 1
    if not values:
        raise MetricUnavailable("no metrics for the targeted pods (they may be unready)")
    ratio, percent, mean = _ratio(values, by_name, target=target, utilization=utilization)
    up_with_unready = bool(unready) and ratio > 1.0
    if not up_with_unready and not missing:
        if abs(1.0 - ratio) <= tolerance:
            return Proposal(current, percent, mean)
        return Proposal(math.ceil(ratio * ready_count), percent, mean)
    recount = dict(values)
    for name in missing:
        pod = by_name[name]
        if utilization and pod.request is None:
            continue
        if ratio < 1.0:  # scaling down: assume they use the target (at least 100%)
            recount[name] = (pod.request or 0.0) * max(100.0, target) / 100 if utilization \
                else target
        elif ratio > 1.0:
            recount[name] = 0.0
    if up_with_unready:
        for name in unready:
            if not utilization or by_name[name].request is not None:
                recount[name] = 0.0
    new_ratio, _, _ = _ratio(recount, by_name, target=target, utilization=utilization)
    if abs(1.0 - new_ratio) <= tolerance or (ratio < 1.0 < new_ratio) \
            or (ratio > 1.0 > new_ratio):
        return Proposal(current, percent, mean)
    replicas = math.ceil(new_ratio * len(recount))
    if (new_ratio < 1.0 and replicas > current) or (new_ratio > 1.0 and replicas < current):
        return Proposal(current, percent, mean)
    return Proposal(replicas, percent, mean)


# -- pure: behavior (stabilization and policies) ----------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    at: float
    replicas: int


@dataclass(frozen=True)
class ScaleEvent:
    at: float
    change: int  # replicas added (positive) or removed (negative)


@dataclass(frozen=True)
class Condition:
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    replicas: int
    able: Condition
    limited: Condition
    recommendations: tuple[Recommendation, ...]


def _changed_within(events: Sequence[ScaleEvent], *, period: int, now: float,
                    up: bool) -> int:
    cutoff = now - period
    return sum(abs(e.change) for e in events if e.at > cutoff and (e.change > 0) == up)


def scale_up_limit(current: int, events: Sequence[ScaleEvent], rules: Rules, now: float
                   ) -> int:
    if rules.select_policy == "Disabled":
        return current
    pick = min if rules.select_policy == "Min" else max
    result: int | None = None
    for p in rules.policies:
        start = current - _changed_within(events, period=p.period_seconds, now=now, up=True) \
            + _changed_within(events, period=p.period_seconds, now=now, up=False)
        proposed = start + p.value if p.type == "Pods" else \
            math.ceil(start * (1 + p.value / 100))
        result = proposed if result is None else pick(result, proposed)
    return current if result is None else result


def scale_down_limit(current: int, events: Sequence[ScaleEvent], rules: Rules, now: float
                     ) -> int:
    if rules.select_policy == "Disabled":
        return current
    pick = max if rules.select_policy == "Min" else min
    result: int | None = None
    for p in rules.policies:
        start = current - _changed_within(events, period=p.period_seconds, now=now, up=True) \
            + _changed_within(events, period=p.period_seconds, now=now, up=False)
        proposed = start - p.value if p.type == "Pods" else \
            math.floor(start * (1 - p.value / 100))
        result = proposed if result is None else pick(result, proposed)
    return current if result is None else result


def decide(*, current: int, proposed: int, min_replicas: int, max_replicas: int, up: Rules,
           down: Rules, recommendations: Sequence[Recommendation],
           events: Sequence[ScaleEvent], now: float) -> Decision:
    """Stabilize ``proposed`` over the windows, then bound it by the policies."""
    up_cut = now - up.stabilization_window_seconds
    down_cut = now - down.stabilization_window_seconds
    up_rec = down_rec = proposed
    kept: list[Recommendation] = []
    for r in recommendations:
        if r.at > up_cut:
            up_rec = min(up_rec, r.replicas)
        if r.at > down_cut:
            down_rec = max(down_rec, r.replicas)
        if r.at > up_cut or r.at > down_cut:
            kept.append(r)
    kept.append(Recommendation(now, proposed))
    stabilized = min(max(current, up_rec), down_rec)
    if stabilized != proposed:
        able = Condition("True", "ScaleUpStabilized",
                         "recent recommendations were lower than current one, applying the "
                         "lowest recent recommendation") if proposed >= current else \
            Condition("True", "ScaleDownStabilized",
                      "recent recommendations were higher than current one, applying the "
                      "highest recent recommendation")
    else:
        able = Condition("True", "ReadyForNewScale", "recommended size matches current size")
    replicas, reason, message = stabilized, "DesiredWithinRange", \
        "the desired count is within the acceptable range"
    if stabilized > current:
        limit = max(scale_up_limit(current, events, up, now), current)
        if max_replicas > limit:
            allowed, why, text = limit, "ScaleUpLimit", \
                "the desired replica count is increasing faster than the maximum scale rate"
        else:
            allowed, why, text = max_replicas, "TooManyReplicas", \
                "the desired replica count is more than the maximum replica count"
        if stabilized > allowed:
            replicas, reason, message = allowed, why, text
    elif stabilized < current:
        limit = min(scale_down_limit(current, events, down, now), current)
        if min_replicas < limit:
            allowed, why, text = limit, "ScaleDownLimit", \
                "the desired replica count is decreasing faster than the maximum scale rate"
        else:
            allowed, why, text = min_replicas, "TooFewReplicas", \
                "the desired replica count is less than the minimum replica count"
        if stabilized < allowed:
            replicas, reason, message = allowed, why, text
    limited = Condition("True" if replicas != stabilized else "False", reason, message)
    return Decision(replicas=replicas, able=able, limited=limited,
                    recommendations=tuple(kept))


# -- reading the cluster -------------------------------------------------------------------


def _requests(pod: core_pb2.Pod, resource: str) -> float | None:
    """The pod's summed container requests of ``resource`` (millicores for cpu,
    bytes for memory); None when a container has none."""
    total = 0
    for c in pod.spec.containers:
        q = c.resources.requests.get(resource)
        if q is None or not q.value:
            return None
        total += quantity.milli(q.value) if resource == "cpu" else quantity.to_int(q.value)
    return float(total)


def pod_view(pod: core_pb2.Pod, resource: str = "") -> PodView:
    return PodView(name=pod.metadata.name, phase=pod.status.phase or "Pending",
                   ready=is_ready(pod), deleting=pod.metadata.HasField("deletion_timestamp"),
                   request=_requests(pod, resource) if resource else None)


@dataclass(frozen=True)
class MetricResult:
    replicas: int
    status: pb.MetricStatus
    description: str  # "cpu resource utilization (percentage of request)"


def _metric_status(spec: pb.MetricSpec, proposal: Proposal) -> pb.MetricStatus:
    st = pb.MetricStatus(type=spec.type)
    if spec.type == "Resource":
        st.resource.name = spec.resource.name
        cur = st.resource.current
        if proposal.utilization is not None:
            cur.average_utilization = proposal.utilization
        avg = int(proposal.average)
        cur.average_value.value = quantity.format_cpu_milli(avg) if \
            spec.resource.name == "cpu" else str(avg)
    else:
        st.pods.metric.CopyFrom(spec.pods.metric)
        # A milli-quantity, canonical: "5", "2500m".
        st.pods.current.average_value.value = quantity.format_cpu_milli(
            round(proposal.average * 1000))
    return st


async def evaluate_metric(spec: pb.MetricSpec, *, source: MetricsSource, namespace: str,
                          selector: str, pods: Sequence[core_pb2.Pod], current: int
                          ) -> MetricResult:
    """One metric's proposal (raises MetricUnavailable)."""
    if spec.type == "Resource":
        name, target = spec.resource.name, spec.resource.target
        samples = await source.resource_usage(namespace=namespace, selector=selector,
                                              resource=name)
        if target.type == "Utilization":
            prop = propose(current=current, pods=[pod_view(p, name) for p in pods],
                           samples=samples, target=float(target.average_utilization),
                           utilization=True, cpu=name == "cpu")
            what = f"{name} resource utilization (percentage of request)"
        else:
            want = float(quantity.milli(target.average_value.value)) if name == "cpu" else \
                float(quantity.to_int(target.average_value.value))
            prop = propose(current=current, pods=[pod_view(p) for p in pods],
                           samples=samples, target=want, utilization=False,
                           cpu=name == "cpu")
            what = f"{name} resource"
    else:
        metric = spec.pods.metric.name
        samples = await source.pods_metric(namespace=namespace, metric=metric, pods=pods)
        want = float(quantity.parse(spec.pods.target.average_value.value))
        prop = propose(current=current, pods=[pod_view(p) for p in pods], samples=samples,
                       target=want, utilization=False, cpu=False)
        what = f"pods metric {metric}"
    return MetricResult(prop.replicas, _metric_status(spec, prop), what)


# -- the controller --------------------------------------------------------------------------


@dataclass
class _Memory:
    """What Kubernetes keeps in memory per autoscaler."""

    recommendations: tuple[Recommendation, ...] = ()
    events: list[ScaleEvent] = field(default_factory=list)


def _timestamp(now: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(now * 1e9))
    return ts


def set_condition(status: pb.HorizontalPodAutoscalerStatus, type_: str, c: Condition,
                  now: float) -> None:
    for existing in status.conditions:
        if existing.type == type_:
            if existing.status != c.status:
                existing.last_transition_time.CopyFrom(_timestamp(now))
            existing.status, existing.reason, existing.message = c.status, c.reason, c.message
            return
    status.conditions.add(type=type_, status=c.status, reason=c.reason, message=c.message,
                          last_transition_time=_timestamp(now))


class HorizontalPodAutoscalerController:
    name = "horizontalpodautoscaling"

    def __init__(self, *, source: MetricsSource | None = None) -> None:
        self.queue = WorkQueue()
        self.source = source
        self.memory: dict[str, _Memory] = {}
        self._ctx: ControllerContext | None = None
        self._hpas: Informer[pb.HorizontalPodAutoscaler] | None = None
        self._pods: Informer[core_pb2.Pod] | None = None
        self._nodes: Informer[core_pb2.Node] | None = None

    @property
    def ctx(self) -> ControllerContext:
        assert self._ctx is not None, "setup() first"
        return self._ctx

    def setup(self, ctx: ControllerContext) -> None:
        self._ctx = ctx
        self._hpas = ctx.informers.get(pb.HorizontalPodAutoscaler)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._nodes = ctx.informers.get(core_pb2.Node)
        self._hpas.add_handlers(on_add=self._enqueue, on_update=lambda _o, n: self._enqueue(n),
                                on_delete=self._forget)
        if self.source is None:
            nodes = self._nodes
            self.source = CombinedSource(
                resources=APIResourceUsage(ctx.client),
                pods=MeshRequestRates(nodes=nodes.list, clock=ctx.clock))

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        try:
            await run_workers(self.queue, self.sync, count=ctx.settings.workers,
                              what="horizontalpodautoscaler")
        finally:
            self.queue.close()

    def _forget(self, hpa: pb.HorizontalPodAutoscaler) -> None:
        self.memory.pop(key_of(hpa), None)

    def _enqueue(self, hpa: pb.HorizontalPodAutoscaler) -> None:
        self.queue.add(key_of(hpa))

    def _period(self) -> float:
        return self.ctx.settings.hpa_sync_period

    async def sync(self, key: str) -> float | None:
        assert self._hpas is not None and self._pods is not None and self.source is not None
        hpa = self._hpas.get_by_key(key)
        if hpa is None or hpa.metadata.HasField("deletion_timestamp"):
            self.memory.pop(key, None)
            return None
        now = self.ctx.clock()
        status = pb.HorizontalPodAutoscalerStatus()
        status.CopyFrom(hpa.status)
        status.observed_generation = hpa.metadata.generation
        try:
            await self._reconcile(hpa, status, now)
        finally:
            await self._write_status(hpa, status)
        return self._period()

    async def _reconcile(self, hpa: pb.HorizontalPodAutoscaler,
                         status: pb.HorizontalPodAutoscalerStatus, now: float) -> None:
        assert self._pods is not None and self.source is not None
        ns, ref = hpa.metadata.namespace, hpa.spec.scale_target_ref
        kind = TARGET_KINDS.get(ref.kind)
        target: Any = None
        if kind is not None:
            try:
                target = await self.ctx.client.get(kind, ref.name, namespace=ns)
            except errors.NotFound:
                target = None
        if kind is None or target is None:
            set_condition(status, "AbleToScale", Condition(
                "False", "FailedGetScale",
                f"the HPA controller was unable to get the target's current scale: "
                f'{ref.kind.lower()} "{ref.name}" not found'), now)
            self.ctx.events.event(hpa, "Warning", "FailedGetScale",
                                  f'{ref.kind.lower()} "{ref.name}" not found')
            return
        current = int(target.spec.replicas) if target.spec.HasField("replicas") else 1
        status.current_replicas = current
        low, high = autoscaling.min_replicas(hpa), hpa.spec.max_replicas
        memory = self.memory.setdefault(key_of(hpa), _Memory())
        up, down = autoscaling.rules_of(hpa)
        if not memory.recommendations and down.stabilization_window_seconds > 0:
            memory.recommendations = (Recommendation(now, current),)
        reason = ""
        if current == 0 and low != 0:
            set_condition(status, "ScalingActive", Condition(
                "False", "ScalingDisabled",
                "scaling is disabled since the replica count of the target is zero"), now)
            status.desired_replicas = 0
            return
        if current > high:
            desired, reason = high, "Current number of replicas above Spec.MaxReplicas"
        elif current < low:
            desired, reason = low, "Current number of replicas below Spec.MinReplicas"
        else:
            selector = selectors.from_proto(target.spec.selector)
            pods = [p for p in self._pods.by_index(NAMESPACE_INDEX, ns)
                    if selector.matches(p.metadata.labels)]
            proposed, reason = await self._metrics(hpa, status, pods=pods, current=current,
                                                   selector=str(selector), now=now)
            if proposed is None:
                return
            decision = decide(current=current, proposed=proposed, min_replicas=low,
                              max_replicas=high, up=up, down=down,
                              recommendations=memory.recommendations,
                              events=memory.events, now=now)
            memory.recommendations = decision.recommendations
            set_condition(status, "AbleToScale", decision.able, now)
            set_condition(status, "ScalingLimited", decision.limited, now)
            desired = decision.replicas
        status.desired_replicas = desired
        if desired == current:
            return
        try:
            await self._scale(kind, ns, ref.name, desired)
        except errors.ShoalError as e:
            set_condition(status, "AbleToScale", Condition(
                "False", "FailedUpdateScale",
                f"the HPA controller was unable to update the target scale: {e.message}"), now)
            self.ctx.events.event(hpa, "Warning", "FailedRescale",
                                  f"New size: {desired}; reason: {reason}; error: {e.message}")
            raise
        longest = max((p.period_seconds for p in (*up.policies, *down.policies)), default=0)
        memory.events = [e for e in memory.events if e.at > now - longest]
        memory.events.append(ScaleEvent(now, desired - current))
        set_condition(status, "AbleToScale", Condition(
            "True", "SucceededRescale",
            f"the HPA controller was able to update the target scale to {desired}"), now)
        status.last_scale_time.CopyFrom(_timestamp(now))
        log.info("hpa %s: %s/%s scaled %d -> %d (%s)", key_of(hpa), ref.kind, ref.name,
                 current, desired, reason)
        self.ctx.events.event(hpa, "Normal", "SuccessfulRescale",
                              f"New size: {desired}; reason: {reason}")

    async def _metrics(self, hpa: pb.HorizontalPodAutoscaler,
                       status: pb.HorizontalPodAutoscalerStatus, *,
                       pods: Sequence[core_pb2.Pod], current: int, selector: str,
                       now: float) -> tuple[int | None, str]:
        """The largest proposal over the metrics (None: do not scale) and why."""
        assert self.source is not None
        best: int | None = None
        why = ""
        statuses: list[pb.MetricStatus] = []
        failed: Condition | None = None
        for spec in hpa.spec.metrics:
            try:
                result = await evaluate_metric(spec, source=self.source,
                                               namespace=hpa.metadata.namespace,
                                               selector=selector, pods=pods, current=current)
            except (MetricUnavailable, errors.ShoalError) as e:
                text = e.message if isinstance(e, errors.ShoalError) else str(e)
                failed = failed or Condition(
                    "False", "FailedGetResourceMetric" if spec.type == "Resource"
                    else "FailedGetPodsMetric",
                    f"the HPA was unable to compute the replica count: {text}")
                statuses.append(pb.MetricStatus(type=spec.type))
                continue
            statuses.append(result.status)
            if best is None or result.replicas > best:
                best = result.replicas
                direction = "above" if result.replicas > current else "below"
                why = f"{result.description} {direction} target"
        del status.current_metrics[:]
        status.current_metrics.extend(statuses)
        if failed is not None and (best is None or best < current):
            set_condition(status, "ScalingActive", failed, now)
            self.ctx.events.event(hpa, "Warning", failed.reason, failed.message)
            return None, ""
        set_condition(status, "ScalingActive", Condition(
            "True", "ValidMetricFound",
            "the HPA was able to successfully calculate a replica count"), now)
        return best, why

    async def _scale(self, kind: type[Any], namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas (what ``shoal scale`` does), retrying a conflicting write."""
        client = self.ctx.client
        for _ in range(_SCALE_ATTEMPTS):
            obj: Any = await client.get(kind, name, namespace=namespace)
            obj.spec.replicas = replicas
            try:
                await client.update(obj)
                return
            except errors.Conflict:
                continue
        raise errors.Conflict(f'"{name}" kept changing; try again')

    async def _write_status(self, hpa: pb.HorizontalPodAutoscaler,
                            status: pb.HorizontalPodAutoscalerStatus) -> None:
        if status == hpa.status:
            return
        fresh = pb.HorizontalPodAutoscaler()
        fresh.CopyFrom(hpa)
        fresh.status.CopyFrom(status)
        fresh.metadata.resource_version = ""
        try:
            await self.ctx.client.update_status(fresh)
        except errors.NotFound:
            pass
