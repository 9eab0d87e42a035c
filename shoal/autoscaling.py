"""HorizontalPodAutoscaler (autoscaling/v2): defaults, validation and the scaling rules.

Defaults, as Kubernetes: ``minReplicas`` 1; no ``metrics``: CPU at 80% average
utilization. :func:`rules_of` gives the behavior with every unset part filled
in (also what the controller uses when ``behavior`` is absent)::

    scaleUp:   stabilizationWindowSeconds 0,   selectPolicy Max,
               policies [Pods 4 per 15 s, Percent 100 per 15 s]
    scaleDown: stabilizationWindowSeconds 300, selectPolicy Max,
               policies [Percent 100 per 15 s]

Supported metrics: ``Resource`` (cpu or memory; Utilization or AverageValue)
and ``Pods`` with AverageValue (Shoal serves ``istio_requests_per_second``
from the mesh); Object, External and ContainerResource are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal import fielderrors, quantity
from shoal.api.autoscaling.v2 import autoscaling_pb2 as pb
from shoal.errors import FieldError

Errors = list[FieldError]

SCALABLE_KINDS = ("Deployment", "ReplicaSet", "StatefulSet")
METRIC_TYPES = ("Resource", "Pods")
RESOURCES = ("cpu", "memory")
MESH_REQUEST_RATE = "istio_requests_per_second"
POD_METRICS = (MESH_REQUEST_RATE,)
SELECT_POLICIES = ("Max", "Min", "Disabled")
POLICY_TYPES = ("Pods", "Percent")
DEFAULT_CPU_UTILIZATION = 80
MAX_WINDOW = 3600
MAX_PERIOD = 1800


@dataclass(frozen=True)
class Policy:
    type: str  # Pods | Percent
    value: int
    period_seconds: int


@dataclass(frozen=True)
class Rules:
    stabilization_window_seconds: int
    select_policy: str
    policies: tuple[Policy, ...]


DEFAULT_SCALE_UP = Rules(0, "Max", (Policy("Pods", 4, 15), Policy("Percent", 100, 15)))
DEFAULT_SCALE_DOWN = Rules(300, "Max", (Policy("Percent", 100, 15),))


def _rules(given: pb.HPAScalingRules | None, default: Rules) -> Rules:
    if given is None:
        return default
    window = given.stabilization_window_seconds if given.HasField(
        "stabilization_window_seconds") else default.stabilization_window_seconds
    policies = tuple(Policy(p.type, p.value, p.period_seconds) for p in given.policies)
    return Rules(window, given.select_policy or default.select_policy,
                 policies or default.policies)


def rules_of(hpa: pb.HorizontalPodAutoscaler) -> tuple[Rules, Rules]:
    """(scale up, scale down) with Kubernetes' defaults for what is unset."""
    b = hpa.spec.behavior
    up = b.scale_up if hpa.spec.HasField("behavior") and b.HasField("scale_up") else None
    down = b.scale_down if hpa.spec.HasField("behavior") and b.HasField("scale_down") \
        else None
    return _rules(up, DEFAULT_SCALE_UP), _rules(down, DEFAULT_SCALE_DOWN)


def min_replicas(hpa: pb.HorizontalPodAutoscaler) -> int:
    return int(hpa.spec.min_replicas) if hpa.spec.HasField("min_replicas") else 1


def default_hpa(hpa: pb.HorizontalPodAutoscaler) -> None:
    if not hpa.spec.HasField("min_replicas"):
        hpa.spec.min_replicas = 1
    if not hpa.spec.metrics:
        m = hpa.spec.metrics.add(type="Resource")
        m.resource.name = "cpu"
        m.resource.target.type = "Utilization"
        m.resource.target.average_utilization = DEFAULT_CPU_UTILIZATION
    if hpa.spec.HasField("behavior"):
        for rules, default in ((hpa.spec.behavior.scale_up, DEFAULT_SCALE_UP),
                               (hpa.spec.behavior.scale_down, DEFAULT_SCALE_DOWN)):
            if not rules.select_policy:
                rules.select_policy = default.select_policy
            if not rules.HasField("stabilization_window_seconds"):
                rules.stabilization_window_seconds = default.stabilization_window_seconds
            if not rules.policies:
                for p in default.policies:
                    rules.policies.add(type=p.type, value=p.value,
                                       period_seconds=p.period_seconds)


def _positive_quantity(path: str, q: Any) -> Errors:
    if not q.value:
        return [fielderrors.required(path)]
    try:
        value = quantity.parse(q.value)
    except quantity.QuantityError as e:
        return [fielderrors.invalid(path, q.value, str(e))]
    if value <= 0:
        return [fielderrors.invalid(path, q.value, "must be positive")]
    return []


def _target(path: str, target: pb.MetricTarget, *, allowed: Sequence[str]) -> Errors:
    if not target.type:
        return [fielderrors.required(f"{path}.type")]
    if target.type not in allowed:
        return [fielderrors.not_supported(f"{path}.type", target.type, allowed)]
    if target.type == "Utilization":
        if not target.HasField("average_utilization"):
            return [fielderrors.required(f"{path}.averageUtilization",
                                         "must be set for type Utilization")]
        if target.average_utilization <= 0:
            return [fielderrors.invalid(f"{path}.averageUtilization",
                                        target.average_utilization, "must be greater than 0")]
        return []
    if target.type == "AverageValue":
        return _positive_quantity(f"{path}.averageValue", target.average_value)
    return _positive_quantity(f"{path}.value", target.value)


def _metric(path: str, m: pb.MetricSpec) -> Errors:
    if not m.type:
        return [fielderrors.required(f"{path}.type")]
    if m.type not in METRIC_TYPES:
        return [fielderrors.not_supported(f"{path}.type", m.type, METRIC_TYPES)]
    if m.type == "Resource":
        errs: Errors = []
        if m.resource.name not in RESOURCES:
            errs.append(fielderrors.not_supported(f"{path}.resource.name", m.resource.name,
                                                  RESOURCES))
        return errs + _target(f"{path}.resource.target", m.resource.target,
                              allowed=("Utilization", "AverageValue"))
    errs = []
    name = m.pods.metric.name
    if not name:
        errs.append(fielderrors.required(f"{path}.pods.metric.name"))
    elif name not in POD_METRICS:
        errs.append(fielderrors.not_supported(f"{path}.pods.metric.name", name, POD_METRICS))
    return errs + _target(f"{path}.pods.target", m.pods.target, allowed=("AverageValue",))


def _scaling_rules(path: str, rules: pb.HPAScalingRules) -> Errors:
    errs: Errors = []
    if rules.select_policy and rules.select_policy not in SELECT_POLICIES:
        errs.append(fielderrors.not_supported(f"{path}.selectPolicy", rules.select_policy,
                                              SELECT_POLICIES))
    window = rules.stabilization_window_seconds
    if rules.HasField("stabilization_window_seconds") and not 0 <= window <= MAX_WINDOW:
        errs.append(fielderrors.invalid(f"{path}.stabilizationWindowSeconds", window,
                                        f"must be between 0 and {MAX_WINDOW}, inclusive"))
    for i, p in enumerate(rules.policies):
        here = f"{path}.policies[{i}]"
        if p.type not in POLICY_TYPES:
            errs.append(fielderrors.not_supported(f"{here}.type", p.type, POLICY_TYPES))
        if p.value <= 0:
            errs.append(fielderrors.invalid(f"{here}.value", p.value, "must be greater than 0"))
        if not 0 < p.period_seconds <= MAX_PERIOD:
            errs.append(fielderrors.invalid(f"{here}.periodSeconds", p.period_seconds,
                                            f"must be between 1 and {MAX_PERIOD}, inclusive"))
    return errs


def validate_hpa(hpa: pb.HorizontalPodAutoscaler) -> Errors:
    spec = hpa.spec
    errs: Errors = []
    ref = spec.scale_target_ref
    if not ref.kind:
        errs.append(fielderrors.required("spec.scaleTargetRef.kind"))
    elif ref.kind not in SCALABLE_KINDS:
        errs.append(fielderrors.not_supported("spec.scaleTargetRef.kind", ref.kind,
                                              SCALABLE_KINDS))
    if not ref.name:
        errs.append(fielderrors.required("spec.scaleTargetRef.name"))
    if ref.api_version and ref.api_version != "apps/v1":
        errs.append(fielderrors.not_supported("spec.scaleTargetRef.apiVersion",
                                              ref.api_version, ("apps/v1",)))
    low = min_replicas(hpa)
    if low < 1:
        errs.append(fielderrors.invalid("spec.minReplicas", low, "must be greater than or "
                                                                 "equal to 1"))
    if spec.max_replicas < 1:
        errs.append(fielderrors.invalid("spec.maxReplicas", spec.max_replicas,
                                        "must be greater than 0"))
    elif spec.max_replicas < low:
        errs.append(fielderrors.invalid("spec.maxReplicas", spec.max_replicas,
                                        "must be greater than or equal to `minReplicas`"))
    for i, m in enumerate(spec.metrics):
        errs += _metric(f"spec.metrics[{i}]", m)
    if spec.HasField("behavior"):
        errs += _scaling_rules("spec.behavior.scaleUp", spec.behavior.scale_up)
        errs += _scaling_rules("spec.behavior.scaleDown", spec.behavior.scale_down)
    return errs


VALIDATORS: Mapping[str, Callable[[Any], Errors]] = {"HorizontalPodAutoscaler": validate_hpa}
DEFAULTERS: Mapping[str, Callable[[Any], None]] = {"HorizontalPodAutoscaler": default_hpa}
