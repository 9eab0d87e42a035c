"""The ReplicaSet controller's pure parts (apiserver.controllers.replicasets), no I/O.

Time is a number passed in (``NOW``); pods are built by small helpers with
only the fields the planner reads.
"""

from __future__ import annotations

from typing import Any

import pytest

from apiserver.controllers.replicasets import (
    Counts,
    Expectations,
    PodRef,
    ReplicaSetActions,
    claim,
    count,
    deletion_order,
    failure_of,
    generate_name,
    is_available,
    plan,
    pod_from_template,
    slow_start_batches,
    status_of,
)
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2

NOW = 1_000_000.0
RS_UID = "uid-rs"


def rs(replicas: int = 3, *, min_ready: int = 0, deleting: bool = False,
       selector: dict[str, str] | None = None, generation: int = 1) -> apps_pb2.ReplicaSet:
    r = apps_pb2.ReplicaSet()
    r.metadata.name, r.metadata.namespace, r.metadata.uid = "web", "ns", RS_UID
    r.metadata.generation = generation
    if deleting:
        r.metadata.deletion_timestamp.seconds = int(NOW)
    r.spec.replicas = replicas
    r.spec.min_ready_seconds = min_ready
    r.spec.selector.match_labels.update({"app": "web"} if selector is None else selector)
    r.spec.template.metadata.labels.update({"app": "web", "tier": "front"})
    r.spec.template.spec.containers.add(name="c", image="busybox")
    return r


def pod(name: str, *, owner: str | None = RS_UID, labels: dict[str, str] | None = None,
        phase: str = "Running", ready_since: float | None = NOW - 100, node: str = "n1",
        created: float = NOW - 200, restarts: int = 0, deleting: bool = False,
        cost: int | None = None, namespace: str = "ns") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace, p.metadata.uid = name, namespace, f"uid-{name}"
    p.metadata.labels.update({"app": "web", "tier": "front"} if labels is None else labels)
    p.metadata.creation_timestamp.seconds = int(created)
    if deleting:
        p.metadata.deletion_timestamp.seconds = int(NOW)
    if cost is not None:
        p.metadata.annotations["controller.kubernetes.io/pod-deletion-cost"] = str(cost)
    if owner is not None:
        kind = "ReplicaSet" if owner.startswith("uid-rs") else "StatefulSet"
        p.metadata.owner_references.add(api_version="apps/v1", kind=kind, name="x",
                                         uid=owner, controller=True)
    p.spec.node_name = node
    p.status.phase = phase
    c = p.status.conditions.add(type="Ready", status="True" if ready_since else "False")
    if ready_since is not None:
        c.last_transition_time.seconds = int(ready_since)
    p.status.container_statuses.add(name="c", restart_count=restarts)
    return p


def names(refs: Any) -> list[str]:
    return [r.name for r in refs]


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize(("case", "replicas", "pods", "satisfied", "want_create",
                          "want_delete"), [
    ("empty: create all", 3, [], True, 3, []),
    ("one short", 3, [pod("a"), pod("b")], True, 1, []),
    ("exact: nothing", 2, [pod("a"), pod("b")], True, 0, []),
    ("scale to zero", 0, [pod("a"), pod("b")], True, 0, ["a", "b"]),
    ("one too many: the not-ready one goes",
     2, [pod("a"), pod("b", ready_since=None), pod("c")], True, 0, ["b"]),
    ("terminating pods do not count", 2, [pod("a"), pod("b", deleting=True)], True, 1, []),
    ("finished pods do not count", 2, [pod("a"), pod("b", phase="Failed"),
                                       pod("c", phase="Succeeded")], True, 1, []),
    ("expectations pending: no creates", 3, [], False, 0, []),
    ("expectations pending: no deletes", 0, [pod("a")], False, 0, []),
    ("other controller's pods ignored", 2, [pod("a"), pod("s", owner="uid-sts")], True, 1, []),
    ("other namespace ignored", 1, [pod("a", namespace="other")], True, 1, []),
])
def test_plan_creates_and_deletes(case: str, replicas: int, pods: list[core_pb2.Pod],
                                  satisfied: bool, want_create: int,
                                  want_delete: list[str]) -> None:
    got = plan(rs(replicas), pods, NOW, satisfied=satisfied)
    assert got.create == want_create, case
    assert names(got.delete) == want_delete, case


def test_burst_caps_one_sync() -> None:
    assert plan(rs(1000), [], NOW, burst=500).create == 500
    many = [pod(f"p{i}") for i in range(10)]
    assert len(plan(rs(0), many, NOW, burst=4).delete) == 4


def test_deleting_rs_plans_nothing_but_status() -> None:
    got = plan(rs(5, deleting=True), [pod("a"), pod("o", owner=None)], NOW)
    assert (got.create, got.delete, got.adopt, got.release) == (0, (), (), ())
    assert got.counts.replicas == 1


# --------------------------------------------------------------------------- adopt / release


@pytest.mark.parametrize(("case", "pods", "owned", "adopt", "release"), [
    ("owned and matching", [pod("a")], ["a"], [], []),
    ("orphan matching: adopted", [pod("o", owner=None)], [], ["o"], []),
    ("orphan not matching: left", [pod("o", owner=None, labels={"app": "db"})], [], [], []),
    ("owned no longer matching: released", [pod("a", labels={"app": "db"})], [], [], ["a"]),
    ("orphan terminating: not adopted", [pod("o", owner=None, deleting=True)], [], [], []),
    ("controlled by another: left", [pod("s", owner="uid-sts")], [], [], []),
    ("owned by an older RS of the same name: left", [pod("a", owner="uid-rs-old")],
     [], [], []),
])
def test_claim(case: str, pods: list[core_pb2.Pod], owned: list[str], adopt: list[str],
               release: list[str]) -> None:
    got_owned, got_adopt, got_release = claim(rs(), pods)
    assert ([p.metadata.name for p in got_owned], [p.metadata.name for p in got_adopt],
            [p.metadata.name for p in got_release]) == (owned, adopt, release), case


def test_adopted_pods_count_toward_replicas() -> None:
    got = plan(rs(2), [pod("a"), pod("o", owner=None)], NOW)
    assert names(got.adopt) == ["o"] and got.create == 0 and got.counts.replicas == 2


def test_deleting_rs_adopts_nothing_and_releases_nothing() -> None:
    owned, adopt, release = claim(rs(deleting=True),
                                  [pod("o", owner=None), pod("a", labels={"app": "db"})])
    assert (owned, adopt, release) == ([], [], [])


def test_empty_selector_matches_nothing() -> None:
    owned, adopt, _ = claim(rs(selector={}), [pod("o", owner=None), pod("a")])
    assert not adopt and not owned


# --------------------------------------------------------------------------- deletion order


@pytest.mark.parametrize(("case", "pods", "first"), [
    ("unscheduled before scheduled", [pod("s"), pod("u", node="")], "u"),
    ("pending before running", [pod("r"), pod("p", phase="Pending")], "p"),
    ("unknown before running", [pod("r"), pod("k", phase="Unknown")], "k"),
    ("pending before unknown", [pod("k", phase="Unknown"), pod("p", phase="Pending")], "p"),
    ("not ready before ready", [pod("r"), pod("n", ready_since=None)], "n"),
    ("lower deletion cost first", [pod("hi", cost=10), pod("lo", cost=-5)], "lo"),
    ("doubled up on a node first", [pod("alone", node="n2"), pod("d1", node="n1"),
                                    pod("d2", node="n1")], "d1"),
    ("ready more recently first", [pod("old", ready_since=NOW - 500),
                                   pod("new", ready_since=NOW - 5)], "new"),
    ("more restarts first", [pod("calm", restarts=0), pod("flappy", restarts=7)], "flappy"),
    ("newer first", [pod("older", created=NOW - 900), pod("newer", created=NOW - 10)],
     "newer"),
    ("cost beats readiness time", [pod("fresh", ready_since=NOW - 1, cost=5),
                                   pod("stale", ready_since=NOW - 900)], "stale"),
])
def test_deletion_order(case: str, pods: list[core_pb2.Pod], first: str) -> None:
    assert deletion_order(pods)[0].metadata.name == first, case
    assert deletion_order(list(reversed(pods)))[0].metadata.name == first, case


# --------------------------------------------------------------------------- availability


@pytest.mark.parametrize(("case", "ready_since", "min_ready", "now", "want"), [
    ("not ready", None, 0, NOW, False),
    ("ready, no minReadySeconds", NOW, 0, NOW, True),
    ("ready for less than minReadySeconds", NOW - 5, 10, NOW, False),
    ("ready for exactly minReadySeconds", NOW - 10, 10, NOW, True),
    ("ready for longer", NOW - 60, 10, NOW, True),
])
def test_is_available(case: str, ready_since: float | None, min_ready: int, now: float,
                      want: bool) -> None:
    assert is_available(pod("a", ready_since=ready_since), min_ready, now) is want, case


def test_min_ready_seconds_as_the_clock_moves() -> None:
    r = rs(2, min_ready=10)
    pods = [pod("a", ready_since=NOW - 3), pod("b", ready_since=NOW - 30)]
    first = plan(r, pods, NOW)
    assert (first.counts.ready, first.counts.available) == (2, 1)
    assert first.recheck_after == pytest.approx(7.0)
    later = plan(r, pods, NOW + 7)
    assert later.counts.available == 2 and later.recheck_after is None


# --------------------------------------------------------------------------- status


def test_counts() -> None:
    pods = [pod("a"), pod("b", ready_since=None), pod("c", labels={"app": "web"})]
    assert count(rs(), pods, NOW) == Counts(replicas=3, fully_labeled=2, ready=2, available=2)


@pytest.mark.parametrize(("case", "actions", "error", "want"), [
    ("no error", ReplicaSetActions(create=2), None, None),
    ("create failed", ReplicaSetActions(create=2), errors.Forbidden("quota"),
     ("FailedCreate", "quota")),
    ("delete failed", ReplicaSetActions(delete=(PodRef("a", "u"),)), errors.Conflict("x"),
     ("FailedDelete", "x")),
])
def test_failure_of(case: str, actions: ReplicaSetActions, error: Exception | None,
                    want: tuple[str, str] | None) -> None:
    got = failure_of(rs(), actions, error)
    assert (got if got is None else (got[0], got[1].split(":")[-1].strip())) == want, case


def test_status_sets_and_clears_replica_failure() -> None:
    r = rs(3, generation=4)
    st = status_of(r, Counts(2, 2, 1, 1), now=NOW, failure=("FailedCreate", "quota"))
    assert (st.replicas, st.fully_labeled_replicas, st.ready_replicas,
            st.available_replicas, st.observed_generation) == (2, 2, 1, 1, 4)
    [cond] = st.conditions
    assert (cond.type, cond.status, cond.reason) == ("ReplicaFailure", "True", "FailedCreate")
    r.status.CopyFrom(st)
    again = status_of(r, Counts(2, 2, 1, 1), now=NOW + 50, failure=("FailedCreate", "other"))
    assert again.conditions[0].last_transition_time.seconds == int(NOW)  # kept, not bumped
    r.status.CopyFrom(again)
    cleared = status_of(r, Counts(3, 3, 3, 3), now=NOW + 60, failure=None)
    assert not cleared.conditions


# --------------------------------------------------------------------------- expectations


def test_expectations_lifecycle() -> None:
    e = Expectations(ttl=300)
    assert e.satisfied("ns/web", NOW)
    e.expect("ns/web", creates=["a", "b"], now=NOW)
    assert not e.satisfied("ns/web", NOW) and e.pending("ns/web") == (2, 0)
    e.created("ns/web", "a")
    e.created("ns/web", "zzz")  # not ours: no effect
    assert not e.satisfied("ns/web", NOW)
    e.created("ns/web", "b")
    assert e.satisfied("ns/web", NOW)
    e.expect("ns/web", deletes=["uid-a"], now=NOW)
    assert not e.satisfied("ns/web", NOW + 10)
    e.deleted("ns/web", "uid-a")
    assert e.satisfied("ns/web", NOW + 10)


def test_expectations_expire_so_a_lost_event_does_not_wedge() -> None:
    e = Expectations(ttl=300)
    e.expect("ns/web", creates=["a"], now=NOW)
    assert not e.satisfied("ns/web", NOW + 299)
    assert e.satisfied("ns/web", NOW + 301)
    e.forget("ns/web")
    assert e.pending("ns/web") == (0, 0)


# --------------------------------------------------------------------------- pods and names


def test_pod_from_template() -> None:
    r = rs()
    r.spec.template.metadata.annotations["a"] = "1"
    p = pod_from_template(r, "web-abcde")
    assert p.metadata.name == "web-abcde" and p.metadata.namespace == "ns"
    assert dict(p.metadata.labels) == {"app": "web", "tier": "front"}
    assert dict(p.metadata.annotations) == {"a": "1"}
    [ref] = p.metadata.owner_references
    assert (ref.kind, ref.uid, ref.controller, ref.block_owner_deletion) == (
        "ReplicaSet", RS_UID, True, True)
    assert p.spec.containers[0].image == "busybox"


@pytest.mark.parametrize(("total", "want"), [
    (0, []), (1, [1]), (3, [1, 2]), (7, [1, 2, 4]), (10, [1, 2, 4, 3]),
])
def test_slow_start_batches(total: int, want: list[int]) -> None:
    assert slow_start_batches(total) == want


def test_generated_names_fit() -> None:
    assert generate_name("web-", "abcde") == "web-abcde"
    assert len(generate_name("x" * 80, "abcde")) == 63
