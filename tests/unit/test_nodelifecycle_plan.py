"""Node lifecycle planner: health from probes, conditions, taints, taint-based eviction."""

from __future__ import annotations

import math

import pytest

from apiserver.controllers import nodelifecycle as nl
from apiserver.controllers import taints as tn
from shoal.api.core.v1 import core_pb2

T0 = 1_000_000.0
GRACE = 40.0


def node(ready: str | None = "True", *, taints: tuple[core_pb2.Taint, ...] = (),
         unschedulable: bool = False, memory_pressure: str = "False") -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = "n1"
    n.spec.unschedulable = unschedulable
    n.spec.taints.extend(taints)
    if ready is not None:
        c = n.status.conditions.add(type="Ready", status=ready, reason="KubeletReady")
        c.last_heartbeat_time.FromSeconds(int(T0))
        n.status.conditions.add(type="MemoryPressure", status=memory_pressure)
    return n


def taint(key: str, effect: str, added: float | None = None) -> core_pb2.Taint:
    t = core_pb2.Taint(key=key, effect=effect)
    if added is not None:
        t.time_added.FromSeconds(int(added))
    return t


def pod(name: str, *tolerations: core_pb2.Toleration, ready: bool = True,
        terminating: bool = False, finalizer: bool = True) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.namespace, p.metadata.name, p.metadata.uid = "ns", name, f"uid-{name}"
    p.spec.node_name = "n1"
    p.spec.tolerations.extend(tolerations)
    p.status.conditions.add(type="Ready", status="True" if ready else "False")
    if terminating:
        p.metadata.deletion_timestamp.FromSeconds(int(T0))
    if finalizer:
        p.metadata.finalizers.append(nl.AGENT_FINALIZER)
    return p


# -- health -----------------------------------------------------------------------

@pytest.mark.parametrize(("prev", "renew", "heartbeat", "probe"), [
    (None, 5.0, 7.0, T0),                                   # first sight: a fresh grace period
    (nl.Health(T0 - 30, 5.0, 7.0), 5.0, 7.0, T0 - 30),      # nothing moved
    (nl.Health(T0 - 30, 5.0, 7.0), 6.0, 7.0, T0),           # lease renewed
    (nl.Health(T0 - 30, 5.0, 7.0), 5.0, 8.0, T0),           # status heartbeat
    (nl.Health(T0 - 30, None, None), None, None, T0 - 30),  # never any lease
])
def test_observe(prev: nl.Health | None, renew: float | None, heartbeat: float | None,
                 probe: float) -> None:
    got = nl.observe(prev, lease_renew=renew, heartbeat=heartbeat, now=T0)
    assert got.probe_time == probe


# -- the node -------------------------------------------------------------------------

def keys(taints: tuple[core_pb2.Taint, ...] | None) -> set[tuple[str, str]] | None:
    return None if taints is None else {(t.key, t.effect) for t in taints}


UNREACHABLE = {(tn.UNREACHABLE, tn.NO_SCHEDULE), (tn.UNREACHABLE, tn.NO_EXECUTE)}
NOT_READY = {(tn.NOT_READY, tn.NO_SCHEDULE), (tn.NOT_READY, tn.NO_EXECUTE)}


@pytest.mark.parametrize(("name", "n", "probe_age", "ready", "taint_keys", "became", "recheck"), [
    ("fresh and ready: nothing to do", node(), 10.0, "True", None, False, 30.0),
    ("silent past grace: unreachable", node(), 40.0, "Unknown", UNREACHABLE, True, None),
    ("already unknown and tainted: stable",
     node("Unknown", taints=(taint(tn.UNREACHABLE, tn.NO_SCHEDULE),
                             taint(tn.UNREACHABLE, tn.NO_EXECUTE, T0 - 5))),
     60.0, "Unknown", None, False, None),
    ("agent says not ready", node("False"), 1.0, "False", NOT_READY, False, 39.0),
    ("back to ready: taints go, user taints stay",
     node("True", taints=(taint(tn.UNREACHABLE, tn.NO_EXECUTE, T0 - 5),
                          taint("dedicated", tn.NO_SCHEDULE))),
     1.0, "True", {("dedicated", tn.NO_SCHEDULE)}, False, 39.0),
    ("cordoned", node(unschedulable=True), 1.0, "True",
     {(tn.UNSCHEDULABLE, tn.NO_SCHEDULE)}, False, 39.0),
    ("memory pressure", node(memory_pressure="True"), 1.0, "True",
     {(tn.MEMORY_PRESSURE, tn.NO_SCHEDULE)}, False, 39.0),
    ("never posted status, still in grace", node(None), 1.0, "Unknown", None, False, 39.0),
    ("never posted status, past grace", node(None), 41.0, "Unknown", UNREACHABLE, False, None),
])
def test_plan_node(name: str, n: core_pb2.Node, probe_age: float, ready: str,
                   taint_keys: set[tuple[str, str]] | None, became: bool,
                   recheck: float | None) -> None:
    health = nl.Health(T0 - probe_age, 1.0, 1.0)
    plan = nl.plan_node(n, health=health, now=T0, grace=GRACE)
    assert plan.ready == ready, name
    assert keys(plan.taints) == taint_keys, name
    assert plan.became_not_ready == became, name
    assert plan.recheck_after == recheck, name


def test_a_not_ready_posted_by_the_agent_is_reported_once() -> None:
    health = nl.Health(T0, 1.0, 1.0)
    plan = nl.plan_node(node("False"), health=health, now=T0, grace=GRACE, last_ready="True")
    assert plan.became_not_ready
    plan = nl.plan_node(node("False"), health=health, now=T0, grace=GRACE, last_ready="False")
    assert not plan.became_not_ready


def test_stale_node_conditions_become_unknown_with_reason() -> None:
    plan = nl.plan_node(node(), health=nl.Health(T0 - 41, 1.0, 1.0), now=T0, grace=GRACE)
    assert plan.conditions is not None
    by_type = {c.type: c for c in plan.conditions}
    assert set(by_type) == set(nl.WATCHED_CONDITIONS)
    ready = by_type["Ready"]
    assert (ready.status, ready.reason) == ("Unknown", "NodeStatusUnknown")
    assert ready.message == "shoal-nodeagent stopped posting node status."
    assert ready.last_transition_time.seconds == int(T0)
    assert ready.last_heartbeat_time.seconds == int(T0)  # kept: the agent's last heartbeat
    assert by_type["DiskPressure"].reason == "NodeStatusNeverUpdated"
    added = [t for t in plan.taints or () if t.effect == tn.NO_EXECUTE]
    assert [t.time_added.seconds for t in added] == [int(T0)]


def test_existing_taint_keeps_its_time_added() -> None:
    n = node("Unknown", taints=(taint(tn.UNREACHABLE, tn.NO_EXECUTE, T0 - 100),))
    plan = nl.plan_node(n, health=nl.Health(T0 - 200, 1.0, 1.0), now=T0, grace=GRACE)
    assert plan.taints is not None  # the NoSchedule one is added
    kept = [t for t in plan.taints if t.effect == tn.NO_EXECUTE]
    assert kept[0].time_added.seconds == int(T0 - 100)


# -- eviction ---------------------------------------------------------------------------

def tol(key: str, seconds: int | None = None, *, effect: str = tn.NO_EXECUTE
        ) -> core_pb2.Toleration:
    return tn.toleration(key, effect, seconds=seconds)


UNREACH_AT = [(taint(tn.UNREACHABLE, tn.NO_EXECUTE, T0 - 10), T0 - 10)]
DEFAULT = 300


@pytest.mark.parametrize(("name", "p", "taints", "when"), [
    ("no toleration: the default 300 s", pod("a"), UNREACH_AT, T0 - 10 + DEFAULT),
    ("own tolerationSeconds", pod("a", tol(tn.UNREACHABLE, 5)), UNREACH_AT, T0 - 5),
    ("tolerates forever", pod("a", tol(tn.UNREACHABLE)), UNREACH_AT, math.inf),
    ("wildcard Exists tolerates all", pod("a", core_pb2.Toleration(operator="Exists")),
     UNREACH_AT, math.inf),
    ("negative seconds: now", pod("a", tol(tn.UNREACHABLE, -1)), UNREACH_AT, T0 - 10),
    ("a user NoExecute taint not tolerated: now", pod("a"),
     [(taint("dedicated", tn.NO_EXECUTE), T0)], -math.inf),
    ("toleration for another effect does not count",
     pod("a", tol("dedicated", effect=tn.NO_SCHEDULE)),
     [(taint("dedicated", tn.NO_EXECUTE), T0)], -math.inf),
    ("Equal needs the value", pod("a", core_pb2.Toleration(key="k", value="v",
                                                          effect=tn.NO_EXECUTE)),
     [(core_pb2.Taint(key="k", value="w", effect=tn.NO_EXECUTE), T0)], -math.inf),
    ("Equal with the value: forever", pod("a", core_pb2.Toleration(key="k", value="v",
                                                                   effect=tn.NO_EXECUTE)),
     [(core_pb2.Taint(key="k", value="v", effect=tn.NO_EXECUTE), T0)], math.inf),
])
def test_eviction_time(name: str, p: core_pb2.Pod, taints: list[tuple[core_pb2.Taint, float]],
                       when: float) -> None:
    assert nl.eviction_time(p, taints, default_seconds=DEFAULT) == when, name


def stateful(name: str) -> core_pb2.Pod:
    p = pod(name, terminating=True)
    p.metadata.owner_references.add(api_version="apps/v1", kind="StatefulSet", name="web",
                                    uid="uid-web", controller=True)
    return p


def test_plan_pods_on_an_unreachable_node() -> None:
    pods = [
        pod("plain"),                                        # default 5 s: 10 s old -> evict
        pod("patient", tol(tn.UNREACHABLE, 60)),             # evict in 50 s
        pod("daemon", tol(tn.UNREACHABLE)),                  # stays; marked not ready
        pod("going", terminating=True),                      # already terminating: release
        pod("going-free", terminating=True, finalizer=False),
        stateful("web-0"),                                   # terminating, but a StatefulSet's
        pod("unready", tol(tn.UNREACHABLE), ready=False),
    ]
    plan = nl.plan_pods(pods, taints=UNREACH_AT, unreachable=True, now=T0, default_seconds=5)
    assert [r.name for r in plan.evict] == ["plain"]
    assert [r.name for r in plan.release] == ["going"]
    assert [r.name for r in plan.mark_not_ready] == ["plain", "patient", "daemon"]
    assert plan.recheck_after == 50.0


def test_plan_pods_on_a_not_ready_node_leaves_the_agent_its_work() -> None:
    taints = [(taint(tn.NOT_READY, tn.NO_EXECUTE, T0 - 10), T0 - 10)]
    pods = [pod("plain"), pod("going", terminating=True)]
    plan = nl.plan_pods(pods, taints=taints, unreachable=False, now=T0, default_seconds=5)
    assert [r.name for r in plan.evict] == ["plain"]
    assert plan.release == () and plan.mark_not_ready == ()


def test_plan_pods_on_a_healthy_node_does_nothing() -> None:
    plan = nl.plan_pods([pod("a")], taints=[], unreachable=False, now=T0, default_seconds=5)
    assert plan == nl.PodPlan(evict=(), release=(), mark_not_ready=(), recheck_after=None)


def test_fake_clock_walks_a_node_from_healthy_to_evicted() -> None:
    """Grace, then the eviction timeout, on a fake clock."""
    n = node()
    health = nl.observe(None, lease_renew=1.0, heartbeat=1.0, now=T0)
    now = T0 + 39
    plan = nl.plan_node(n, health=health, now=now, grace=GRACE)
    assert plan.ready == "True" and plan.recheck_after == pytest.approx(1.0)
    now = T0 + 40
    plan = nl.plan_node(n, health=health, now=now, grace=GRACE)
    assert plan.ready == "Unknown" and plan.conditions is not None and plan.taints is not None
    del n.status.conditions[:]
    n.status.conditions.extend(plan.conditions)
    del n.spec.taints[:]
    n.spec.taints.extend(plan.taints)
    no_exec = [(t, float(t.time_added.seconds)) for t in n.spec.taints
               if t.effect == tn.NO_EXECUTE]
    p = nl.plan_pods([pod("a")], taints=no_exec, unreachable=True, now=now + 4.0,
                     default_seconds=5)
    assert p.evict == () and p.recheck_after == pytest.approx(1.0)
    p = nl.plan_pods([pod("a")], taints=no_exec, unreachable=True, now=now + 5.0,
                     default_seconds=5)
    assert [r.name for r in p.evict] == ["a"]
