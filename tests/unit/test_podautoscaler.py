"""The HorizontalPodAutoscaler's algorithm, table-driven: Kubernetes' replica
calculator (tolerance, missing and unready pods), the behavior (stabilization
windows, Pods/Percent policies, selectPolicy, min/max), over a fake clock; the
mesh request rates from two scrapes; validation and ``get hpa``'s columns."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from apiserver.controllers.autoscalingmetrics import (
    MeshRequestRates,
    MetricUnavailable,
    Scrape,
    destination_requests,
    rates_between,
)
from apiserver.controllers.podautoscaler import (
    PodView,
    Recommendation,
    ScaleEvent,
    decide,
    propose,
)
from shoal import autoscaling
from shoal.api.autoscaling.v2 import autoscaling_pb2 as pb
from shoal.api.core.v1 import core_pb2
from shoal.autoscaling import DEFAULT_SCALE_DOWN, DEFAULT_SCALE_UP, Policy, Rules
from shoal.cli.printing import printer_for
from shoal.kinds import builtin_kinds
from shoal.testing.fakecri import FakeClock


def ready(name: str, request: float | None = 100.0) -> PodView:
    return PodView(name=name, phase="Running", ready=True, request=request)


def unready(name: str, request: float | None = 100.0) -> PodView:
    return PodView(name=name, phase="Running", ready=False, request=request)


def pending(name: str) -> PodView:
    return PodView(name=name, phase="Pending", ready=False, request=100.0)


# -- the replica calculator -------------------------------------------------------------------

CPU_CASES = [
    # (pods, samples (millicores), current, target %, want replicas)
    ("150% of requests against 50% triples",
     [ready("a"), ready("b")], {"a": 150, "b": 150}, 2, 50, 6),
    ("within the 10% tolerance nothing changes",
     [ready("a"), ready("b")], {"a": 52, "b": 52}, 2, 50, 2),
    ("just outside the tolerance scales",
     [ready("a"), ready("b")], {"a": 56, "b": 56}, 2, 50, 3),
    ("20% against 50% scales down",
     [ready("a"), ready("b")], {"a": 10, "b": 10}, 2, 50, 1),
    ("a pod without a sample counts as idle when scaling up",
     [ready("a"), ready("b"), ready("c")], {"a": 150, "b": 150}, 3, 50, 6),
    ("a pod without a sample counts as at its request when scaling down",
     [ready("a"), ready("b"), ready("c")], {"a": 0, "b": 0}, 3, 50, 2),
    ("an unready pod counts as idle when scaling up",
     [ready("a"), unready("b")], {"a": 200, "b": 500}, 2, 50, 4),
    ("an unready pod is left out when scaling down",
     [ready("a"), unready("b")], {"a": 10, "b": 500}, 2, 50, 1),
    ("a pending pod is left out when scaling down",
     [ready("a"), pending("b")], {"a": 10}, 2, 50, 1),
    ("deleting and failed pods are ignored",
     [ready("a"), PodView("b", "Running", True, deleting=True, request=100),
      PodView("c", "Failed", False, request=100)], {"a": 100, "b": 0, "c": 0}, 1, 50, 2),
    ("missing pods that would flip the direction keep the count",
     [ready("a"), ready("b"), ready("c"), ready("d")], {"a": 60}, 4, 50, 4),
]


@pytest.mark.parametrize(("why", "pods", "samples", "current", "target", "want"), CPU_CASES,
                         ids=[c[0] for c in CPU_CASES])
def test_cpu_utilization(why: str, pods: Sequence[PodView], samples: dict[str, float],
                         current: int, target: int, want: int) -> None:
    got = propose(current=current, pods=pods, samples=samples, target=target,
                  utilization=True, cpu=True)
    assert got.replicas == want, why


def test_utilization_is_reported_as_percent_of_requests() -> None:
    got = propose(current=2, pods=[ready("a", 200), ready("b", 200)],
                  samples={"a": 100, "b": 300}, target=50, utilization=True, cpu=True)
    assert (got.utilization, got.average) == (100, 200)


@pytest.mark.parametrize(("samples", "current", "target", "want"), [
    ({"a": 5.0, "b": 5.0, "c": 5.0}, 3, 1.0, 15),   # 5 rps each against 1 per pod
    ({"a": 1.05}, 1, 1.0, 1),                        # tolerance
    ({"a": 0.0, "b": 0.0, "c": 0.0}, 3, 1.0, 0),     # idle: min/max bound it later
    ({"a": 2.0}, 1, 0.5, 4),
])
def test_average_value_per_pod(samples: dict[str, float], current: int, target: float,
                               want: int) -> None:
    pods = [ready(n, None) for n in samples]
    got = propose(current=current, pods=pods, samples=samples, target=target,
                  utilization=False, cpu=False)
    assert got.replicas == want


@pytest.mark.parametrize(("pods", "samples", "match"), [
    ([ready("a")], {}, "no metrics"),
    ([unready("a")], {"a": 10}, "no metrics"),
    ([ready("a", None)], {"a": 10}, "missing request"),
])
def test_no_usable_sample_is_an_error(pods: Sequence[PodView], samples: dict[str, float],
                                      match: str) -> None:
    with pytest.raises(MetricUnavailable, match=match):
        propose(current=1, pods=pods, samples=samples, target=50, utilization=True, cpu=True)


# -- behavior -----------------------------------------------------------------------------------

NOW = 10_000.0
UP_1_PER_MIN = Rules(0, "Max", (Policy("Pods", 1, 60),))
DOWN_HALF_PER_MIN = Rules(0, "Max", (Policy("Percent", 50, 60),))
DOWN_DISABLED = Rules(0, "Disabled", (Policy("Percent", 100, 15),))
UP_MIN_POLICY = Rules(0, "Min", (Policy("Pods", 4, 15), Policy("Percent", 100, 15)))
UP_WINDOW_60 = Rules(60, "Max", DEFAULT_SCALE_UP.policies)

BEHAVIOR_CASES = [
    # (why, current, proposed, min, max, up, down, recommendations, events, want, reason)
    ("scale up within the default policies", 2, 5, 1, 10, DEFAULT_SCALE_UP,
     DEFAULT_SCALE_DOWN, [], [], 5, "DesiredWithinRange"),
    ("default scale up: at most 4 pods or 100% per 15 s", 2, 10, 1, 10, DEFAULT_SCALE_UP,
     DEFAULT_SCALE_DOWN, [], [], 6, "ScaleUpLimit"),
    ("maxReplicas bounds a scale up", 2, 10, 1, 5, DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN,
     [], [], 5, "TooManyReplicas"),
    ("selectPolicy Min takes the smaller change", 2, 10, 1, 10, UP_MIN_POLICY,
     DEFAULT_SCALE_DOWN, [], [], 4, "ScaleUpLimit"),
    ("scale-up events in the period count against the policy", 3, 6, 1, 10, UP_1_PER_MIN,
     DEFAULT_SCALE_DOWN, [], [ScaleEvent(NOW - 30, 1)], 3, "ScaleUpLimit"),
    ("an event older than the period does not", 3, 6, 1, 10, UP_1_PER_MIN,
     DEFAULT_SCALE_DOWN, [], [ScaleEvent(NOW - 90, 1)], 4, "ScaleUpLimit"),
    ("the scale-down window keeps the highest recent recommendation", 4, 1, 1, 10,
     DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN, [Recommendation(NOW - 100, 4)], [], 4,
     "DesiredWithinRange"),
    ("after the window it scales down", 4, 1, 1, 10, DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN,
     [Recommendation(NOW - 301, 4)], [], 1, "DesiredWithinRange"),
    ("minReplicas bounds a scale down", 4, 0, 2, 10, DEFAULT_SCALE_UP,
     Rules(0, "Max", DEFAULT_SCALE_DOWN.policies), [], [], 2, "TooFewReplicas"),
    ("scale down at most 50% per minute", 10, 1, 1, 10, DEFAULT_SCALE_UP, DOWN_HALF_PER_MIN,
     [], [], 5, "ScaleDownLimit"),
    ("selectPolicy Disabled never scales down", 5, 1, 1, 10, DEFAULT_SCALE_UP, DOWN_DISABLED,
     [], [], 5, "ScaleDownLimit"),
    ("a scale-up window keeps the lowest recent recommendation", 2, 5, 1, 10, UP_WINDOW_60,
     DEFAULT_SCALE_DOWN, [Recommendation(NOW - 30, 2)], [], 2, "DesiredWithinRange"),
]


@pytest.mark.parametrize(
    ("why", "current", "proposed", "low", "high", "up", "down", "recs", "events", "want",
     "reason"), BEHAVIOR_CASES, ids=[c[0] for c in BEHAVIOR_CASES])
def test_behavior(why: str, current: int, proposed: int, low: int, high: int, up: Rules,
                  down: Rules, recs: list[Recommendation], events: list[ScaleEvent],
                  want: int, reason: str) -> None:
    d = decide(current=current, proposed=proposed, min_replicas=low, max_replicas=high,
               up=up, down=down, recommendations=recs, events=events, now=NOW)
    assert (d.replicas, d.limited.reason) == (want, reason), why
    assert d.limited.status == ("False" if reason == "DesiredWithinRange" else "True")


def test_stabilized_conditions_say_which_way() -> None:
    d = decide(current=4, proposed=1, min_replicas=1, max_replicas=10, up=DEFAULT_SCALE_UP,
               down=DEFAULT_SCALE_DOWN, recommendations=[Recommendation(NOW - 5, 4)],
               events=[], now=NOW)
    assert d.able.reason == "ScaleDownStabilized"
    d = decide(current=2, proposed=5, min_replicas=1, max_replicas=10, up=UP_WINDOW_60,
               down=DEFAULT_SCALE_DOWN, recommendations=[Recommendation(NOW - 5, 2)],
               events=[], now=NOW)
    assert d.able.reason == "ScaleUpStabilized"
    d = decide(current=2, proposed=5, min_replicas=1, max_replicas=10, up=DEFAULT_SCALE_UP,
               down=DEFAULT_SCALE_DOWN, recommendations=[], events=[], now=NOW)
    assert d.able.reason == "ReadyForNewScale"


def test_up_to_three_and_back_down_after_the_window_on_a_fake_clock() -> None:
    """Load for a while, then none: up at once, down only when the scale-down
    window (60 s here) holds no higher recommendation; old ones are dropped."""
    clock = FakeClock(NOW)
    down = Rules(60, "Max", DEFAULT_SCALE_DOWN.policies)
    recs: tuple[Recommendation, ...] = (Recommendation(clock(), 1),)
    events: list[ScaleEvent] = []
    current, seen = 1, []
    for proposed in [3] * 4 + [1] * 8:
        d = decide(current=current, proposed=proposed, min_replicas=1, max_replicas=3,
                   up=DEFAULT_SCALE_UP, down=down, recommendations=recs, events=events,
                   now=clock())
        recs = d.recommendations
        if d.replicas != current:
            events.append(ScaleEvent(clock(), d.replicas - current))
            current = d.replicas
        seen.append(current)
        clock.advance(15)
    # t=0..45 load: 3 at once; from t=60 idle: the 3 recommended at t=45 holds
    # while it is inside the 60 s window, i.e. until t=105.
    assert seen == [3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1]
    assert all(r.at > clock() - 15 - 60 for r in recs)


# -- the mesh's request rates ---------------------------------------------------------------

METRICS = """\
# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{reporter="destination",destination_workload="web",\
destination_workload_namespace="shop",response_code="200"} 100
istio_requests_total{reporter="destination",destination_workload="web",\
destination_workload_namespace="shop",response_code="503"} 20
istio_requests_total{reporter="source",destination_workload="web",\
destination_workload_namespace="shop",response_code="200"} 999
istio_requests_total{reporter="destination",destination_workload="db",\
destination_workload_namespace="shop",response_code="200"} 7
"""


def test_destination_requests_sum_the_destination_reporter_per_workload() -> None:
    assert destination_requests(METRICS) == {("shop", "web"): 120.0, ("shop", "db"): 7.0}


@pytest.mark.parametrize(("before", "after", "span", "want"), [
    ({("n", "w"): 100.0}, {("n", "w"): 130.0}, 15, {("n", "w"): 2.0}),
    ({}, {("n", "w"): 30.0}, 15, {("n", "w"): 2.0}),                 # a new series
    ({("n", "w"): 500.0}, {("n", "w"): 30.0}, 15, {("n", "w"): 2.0}),  # agent restarted
    ({("n", "w"): 1.0}, {("n", "w"): 2.0}, 0, {}),
])
def test_rates_between_two_scrapes(before: dict[tuple[str, str], float],
                                   after: dict[tuple[str, str], float], span: float,
                                   want: dict[tuple[str, str], float]) -> None:
    assert rates_between(Scrape(100.0, before), Scrape(100.0 + span, after)) == want


def node(name: str, ip: str) -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = name
    n.status.addresses.add(type="InternalIP", address=ip)
    return n


def pod(name: str, app: str = "web", phase: str = "Running") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, "shop"
    p.metadata.labels["app"] = app
    p.status.phase = phase
    return p


def counter(value: float) -> str:
    return ('istio_requests_total{reporter="destination",destination_workload="web",'
            f'destination_workload_namespace="shop"}} {value}\n')


async def test_mesh_rates_need_two_scrapes_and_are_shared_by_running_pods() -> None:
    clock = FakeClock(NOW)
    served = {"10.0.0.1": counter(100), "10.0.0.2": counter(0)}
    fetched: list[str] = []

    async def fetch(url: str) -> str:
        fetched.append(url)
        host = url.split("//")[1].split(":", maxsplit=1)[0]
        if host not in served:
            raise OSError("connection refused")
        return served[host]

    source = MeshRequestRates(nodes=lambda: [node("a", "10.0.0.1"), node("b", "10.0.0.2")],
                              clock=clock, fetch=fetch)
    pods = [pod("web-1"), pod("web-2"), pod("web-3", phase="Pending")]
    with pytest.raises(MetricUnavailable, match="second scrape"):
        await source.pods_metric(namespace="shop", metric=autoscaling.MESH_REQUEST_RATE,
                                 pods=pods)
    assert fetched == ["http://10.0.0.1:15020/metrics", "http://10.0.0.2:15020/metrics"]
    clock.advance(10)
    served = {"10.0.0.1": counter(150), "10.0.0.2": counter(10)}  # 5 + 1 rps
    got = await source.pods_metric(namespace="shop", metric=autoscaling.MESH_REQUEST_RATE,
                                   pods=pods)
    assert got == {"web-1": 3.0, "web-2": 3.0}
    # Within min_interval the last scrape is reused.
    await source.pods_metric(namespace="shop", metric=autoscaling.MESH_REQUEST_RATE,
                             pods=pods)
    assert len(fetched) == 4


# -- validation and printing ----------------------------------------------------------------


def hpa(**spec: object) -> pb.HorizontalPodAutoscaler:
    h = pb.HorizontalPodAutoscaler()
    h.metadata.name, h.metadata.namespace = "web", "shop"
    h.spec.scale_target_ref.kind, h.spec.scale_target_ref.name = "Deployment", "web"
    h.spec.scale_target_ref.api_version = "apps/v1"
    h.spec.max_replicas = 3
    for k, v in spec.items():
        setattr(h.spec, k, v)
    return h


def test_defaults_are_kubernetes() -> None:
    h = hpa()
    autoscaling.default_hpa(h)
    assert h.spec.min_replicas == 1
    [m] = h.spec.metrics
    assert (m.type, m.resource.name, m.resource.target.average_utilization) == \
        ("Resource", "cpu", 80)
    up, down = autoscaling.rules_of(h)
    assert (up, down) == (DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN)
    h.spec.behavior.scale_down.stabilization_window_seconds = 5
    assert autoscaling.rules_of(h)[1] == Rules(5, "Max", DEFAULT_SCALE_DOWN.policies)


def _paths(h: pb.HorizontalPodAutoscaler) -> list[str]:
    return [e.field for e in autoscaling.validate_hpa(h)]


@pytest.mark.parametrize(("change", "path"), [
    (lambda h: setattr(h.spec.scale_target_ref, "kind", "DaemonSet"),
     "spec.scaleTargetRef.kind"),
    (lambda h: setattr(h.spec.scale_target_ref, "name", ""), "spec.scaleTargetRef.name"),
    (lambda h: setattr(h.spec, "min_replicas", 0), "spec.minReplicas"),
    (lambda h: setattr(h.spec, "min_replicas", 5), "spec.maxReplicas"),
    (lambda h: h.spec.metrics.add(type="External"), "spec.metrics[0].type"),
    (lambda h: h.spec.metrics.add(type="Resource").resource.target.CopyFrom(
        pb.MetricTarget(type="Utilization")), "spec.metrics[0].resource.name"),
    (lambda h: h.spec.metrics.add(type="Pods").pods.CopyFrom(pb.PodsMetricSource(
        metric=pb.MetricIdentifier(name="qps"))), "spec.metrics[0].pods.metric.name"),
    (lambda h: h.spec.behavior.scale_down.policies.add(type="Pods", value=1,
                                                       period_seconds=0),
     "spec.behavior.scaleDown.policies[0].periodSeconds"),
    (lambda h: setattr(h.spec.behavior.scale_up, "select_policy", "Most"),
     "spec.behavior.scaleUp.selectPolicy"),
])
def test_validation_names_the_field(change: object, path: str) -> None:
    h = hpa()
    change(h)  # type: ignore[operator]
    assert path in _paths(h)


def test_a_valid_mesh_rate_autoscaler_passes() -> None:
    h = hpa()
    m = h.spec.metrics.add(type="Pods")
    m.pods.metric.name = "istio_requests_per_second"
    m.pods.target.type = "AverageValue"
    m.pods.target.average_value.value = "1"
    h.spec.behavior.scale_down.stabilization_window_seconds = 10
    autoscaling.default_hpa(h)
    assert autoscaling.validate_hpa(h) == []


def test_get_hpa_columns() -> None:
    kind = builtin_kinds().by_name("hpa")
    h = hpa()
    h.spec.min_replicas = 1
    m = h.spec.metrics.add(type="Resource")
    m.resource.name, m.resource.target.type = "cpu", "Utilization"
    m.resource.target.average_utilization = 50
    p = printer_for(kind)
    assert p.headers == ("NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS",
                         "AGE")
    assert p.row(h, 0.0)[:6] == ("web", "Deployment/web", "cpu: <unknown>/50%", "1", "3",
                                 "0")
    st = h.status.current_metrics.add(type="Resource")
    st.resource.name = "cpu"
    st.resource.current.average_utilization = 120
    h.status.current_replicas = 2
    assert p.row(h, 0.0)[2] == "cpu: 120%/50%"


def test_describe_hpa_shows_metrics_behavior_and_conditions() -> None:
    from shoal.cli import describing

    h = hpa()
    m = h.spec.metrics.add(type="Pods")
    m.pods.metric.name = "istio_requests_per_second"
    m.pods.target.type, m.pods.target.average_value.value = "AverageValue", "1"
    h.spec.behavior.scale_down.stabilization_window_seconds = 20
    autoscaling.default_hpa(h)
    h.status.current_replicas, h.status.desired_replicas = 1, 3
    st = h.status.current_metrics.add(type="Pods")
    st.pods.current.average_value.value = "2500m"
    h.status.conditions.add(type="AbleToScale", status="True", reason="SucceededRescale",
                            message="the HPA controller was able to update the target "
                                    "scale to 3")
    lines = describing.describe_hpa(h)
    text = "\n".join(lines)
    assert lines[0].split() == ["Reference:", "Deployment/web"]
    assert '"istio_requests_per_second" on pods:' in text and "2500m / 1" in text
    assert "    Stabilization Window: 20 seconds" in lines
    assert "Deployment pods:  1 current / 3 desired" in text
    assert any(line.split()[:3] == ["AbleToScale", "True", "SucceededRescale"]
               for line in lines)
