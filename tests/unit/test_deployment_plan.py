"""The Deployment controller's pure planning (apiserver.controllers.deployments), no I/O.

A Deployment and its ReplicaSets are built by small helpers; ``NOW`` is the
fake clock. Each RS is described by (revision, spec replicas, status
replicas, available) and runs the template of its "image".
"""

from __future__ import annotations

import pytest

from apiserver.controllers.deployments import (
    HASH_LABEL,
    REVISION,
    DeploymentActions,
    equal_ignore_hash,
    max_surge,
    max_unavailable,
    plan,
    resolve_fenceposts,
    template_hash,
)
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2

NOW = 2_000_000.0
D_UID = "uid-d"


def ios(v: int | str) -> meta_pb2.IntOrString:
    return meta_pb2.IntOrString(int_val=v) if isinstance(v, int) else \
        meta_pb2.IntOrString(str_val=v)


def deploy(replicas: int = 3, *, image: str = "v2", surge: int | str = 1,
           unavailable: int | str = 0, strategy: str = "RollingUpdate",
           paused: bool = False, deadline: int | None = 600, history: int = 10,
           generation: int = 2, observed: int = 2, min_ready: int = 0,
           conditions: list[tuple[str, str, str, float]] | None = None,
           status: tuple[int, int, int, int] | None = None) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace, d.metadata.uid = "web", "ns", D_UID
    d.metadata.generation = generation
    d.spec.replicas = replicas
    d.spec.paused = paused
    d.spec.min_ready_seconds = min_ready
    d.spec.revision_history_limit = history
    if deadline is not None:
        d.spec.progress_deadline_seconds = deadline
    d.spec.selector.match_labels["app"] = "web"
    d.spec.template.metadata.labels["app"] = "web"
    d.spec.template.spec.containers.add(name="c", image=image)
    d.spec.strategy.type = strategy
    if strategy == "RollingUpdate":
        d.spec.strategy.rolling_update.max_surge.CopyFrom(ios(surge))
        d.spec.strategy.rolling_update.max_unavailable.CopyFrom(ios(unavailable))
    d.status.observed_generation = observed
    if status is not None:
        (d.status.replicas, d.status.updated_replicas, d.status.ready_replicas,
         d.status.available_replicas) = status
    for type_, st, reason, when in conditions or []:
        c = d.status.conditions.add(type=type_, status=st, reason=reason)
        c.last_update_time.seconds = int(when)
        c.last_transition_time.seconds = int(when)
    return d


def rs(image: str, revision: int, replicas: int, *, status: int | None = None,
       available: int | None = None, created: float | None = None,
       desired: int | None = None) -> apps_pb2.ReplicaSet:
    r = apps_pb2.ReplicaSet()
    tmpl = deploy(image=image).spec.template
    h = template_hash(tmpl)
    r.metadata.name, r.metadata.namespace, r.metadata.uid = f"web-{h}", "ns", f"uid-{image}"
    r.metadata.creation_timestamp.seconds = int(created or NOW - 1000 + revision)
    r.metadata.generation = 1
    r.metadata.annotations[REVISION] = str(revision)
    if desired is not None:
        r.metadata.annotations["deployment.kubernetes.io/desired-replicas"] = str(desired)
    r.metadata.owner_references.add(api_version="apps/v1", kind="Deployment", name="web",
                                     uid=D_UID, controller=True)
    r.spec.replicas = replicas
    r.spec.template.CopyFrom(tmpl)
    r.spec.template.metadata.labels[HASH_LABEL] = h
    r.metadata.labels.update(r.spec.template.metadata.labels)
    r.spec.selector.match_labels.update({"app": "web", HASH_LABEL: h})
    r.status.replicas = replicas if status is None else status
    r.status.ready_replicas = r.status.available_replicas = (
        r.status.replicas if available is None else available)
    r.status.observed_generation = 1
    return r


def pods_for(*sets: apps_pb2.ReplicaSet) -> dict[str, list[core_pb2.Pod]]:
    """Ready pods matching each RS's status (the pod cache agrees with it)."""
    out: dict[str, list[core_pb2.Pod]] = {}
    for r in sets:
        for i in range(r.status.replicas):
            p = core_pb2.Pod()
            p.metadata.name, p.metadata.namespace = f"{r.metadata.name}-{i}", "ns"
            p.metadata.owner_references.add(kind="ReplicaSet", name=r.metadata.name,
                                             uid=r.metadata.uid, controller=True)
            p.status.phase = "Running"
            ready = i < r.status.available_replicas
            c = p.status.conditions.add(type="Ready", status="True" if ready else "False")
            c.last_transition_time.seconds = int(NOW - 100)
            out.setdefault(r.metadata.uid, []).append(p)
    return out


def run(d: apps_pb2.Deployment, *sets: apps_pb2.ReplicaSet, now: float = NOW,
        pods: dict[str, list[core_pb2.Pod]] | None = None) -> DeploymentActions:
    return plan(d, list(sets), now, pods_by_rs=pods_for(*sets) if pods is None else pods)


def scaled(actions: DeploymentActions) -> dict[str, int]:
    """image -> new size, for every RS the plan writes."""
    return {r.spec.template.spec.containers[0].image: r.spec.replicas for r in actions.update}


def cond(status: apps_pb2.DeploymentStatus | None, type_: str) -> tuple[str, str]:
    assert status is not None
    for c in status.conditions:
        if c.type == type_:
            return c.status, c.reason
    return "", ""


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(("surge", "unavailable", "desired", "want"), [
    (1, 0, 3, (1, 0)),
    ("25%", "25%", 10, (3, 2)),   # surge rounds up, unavailable down
    ("25%", "25%", 1, (1, 0)),
    (0, 0, 3, (0, 1)),            # never both zero
    ("0%", "0%", 3, (0, 1)),
    ("100%", 0, 3, (3, 0)),
    (2, "50%", 5, (2, 2)),
])
def test_fenceposts(surge: int | str, unavailable: int | str, desired: int,
                    want: tuple[int, int]) -> None:
    assert resolve_fenceposts(ios(surge), ios(unavailable), desired) == want


def test_max_unavailable_is_capped_and_zero_for_recreate() -> None:
    assert max_unavailable(deploy(2, unavailable=5)) == 2
    assert max_unavailable(deploy(0, unavailable=1)) == 0
    assert max_unavailable(deploy(3, strategy="Recreate")) == 0
    assert max_surge(deploy(3, strategy="Recreate")) == 0


def test_template_hash_is_stable_and_follows_the_template() -> None:
    a, b = deploy(image="v1").spec.template, deploy(image="v1").spec.template
    assert template_hash(a) == template_hash(b)
    assert template_hash(a) != template_hash(deploy(image="v2").spec.template)
    assert template_hash(a, 1) != template_hash(a)
    assert template_hash(a).isalnum() and len(template_hash(a)) <= 10
    labelled = deploy(image="v1").spec.template
    labelled.metadata.labels[HASH_LABEL] = "xyz"
    assert equal_ignore_hash(a, labelled)
    assert not equal_ignore_hash(a, deploy(image="v2").spec.template)


# --------------------------------------------------------------------------- rolling update


@pytest.mark.parametrize(("case", "d", "sets", "want"), [
    ("new template: new RS created at surge size",
     deploy(3, surge=1, unavailable=0), [rs("v1", 1, 3)], {"create": 1}),
    ("surge full, new not available: wait",
     deploy(3), [rs("v1", 1, 3), rs("v2", 2, 1, available=0)], {}),
    ("one new available: one old goes",
     deploy(3), [rs("v1", 1, 3), rs("v2", 2, 1)], {"v1": 2}),
    ("room again: new grows",
     deploy(3), [rs("v1", 1, 2), rs("v2", 2, 1)], {"v2": 2}),
    ("last old pod goes once the new are available",
     deploy(3), [rs("v1", 1, 1), rs("v2", 2, 3)], {"v1": 0}),
    ("maxUnavailable 1, no surge: old first",
     deploy(3, surge=0, unavailable=1), [rs("v1", 1, 3), rs("v2", 2, 0)], {"v1": 2}),
    ("maxUnavailable 1: unhealthy old pods go first",
     deploy(3, surge=0, unavailable=1),
     [rs("v1", 1, 3, available=1), rs("v2", 2, 0)], {"v1": 2}),
    ("percentages: 25% of 4 is 1 surge, 1 unavailable",
     deploy(4, surge="25%", unavailable="25%"), [rs("v1", 1, 4), rs("v2", 2, 0)],
     {"v2": 1, }),
    ("new RS too big: scaled down",
     deploy(2), [rs("v2", 2, 5)], {"v2": 2}),
])
def test_rolling_steps(case: str, d: apps_pb2.Deployment, sets: list[apps_pb2.ReplicaSet],
                       want: dict[str, int]) -> None:
    got = run(d, *sets)
    expected_create = want.pop("create", None)
    if expected_create is None:
        assert got.create is None, case
    else:
        assert got.create is not None and got.create.spec.replicas == expected_create, case
    assert {k: v for k, v in scaled(got).items()
            if any(s.spec.replicas != v for s in sets
                   if s.spec.template.spec.containers[0].image == k)} == want, case


def test_new_replicaset_shape() -> None:
    got = run(deploy(3, surge=1, unavailable=0, status=(3, 0, 3, 3)), rs("v1", 4, 3))
    new = got.create
    assert new is not None
    h = template_hash(deploy().spec.template)
    assert new.metadata.name == f"web-{h}"
    assert new.spec.selector.match_labels[HASH_LABEL] == h
    assert new.spec.template.metadata.labels[HASH_LABEL] == h
    assert new.metadata.annotations[REVISION] == "5"
    assert new.metadata.annotations["deployment.kubernetes.io/desired-replicas"] == "3"
    assert new.metadata.annotations["deployment.kubernetes.io/max-replicas"] == "4"
    [ref] = new.metadata.owner_references
    assert (ref.kind, ref.uid, ref.controller) == ("Deployment", D_UID, True)
    assert got.annotations is not None and got.annotations[REVISION] == "5"
    assert cond(got.status, "Progressing") == ("True", "NewReplicaSetCreated")
    assert [e.message for e in got.events] == [
        f"Scaled up replica set web-{h} to 1 from 0"]


def test_stale_status_never_lets_availability_drop() -> None:
    """The old RS was just scaled 3 -> 2: its status still says 3 available, and the
    new RS's 2 are ready. Counting 3 would allow two more deletions (5 - 3);
    counting the least of status, spec and live pods allows exactly one."""
    old = rs("v1", 1, 2, status=3, available=3)
    new = rs("v2", 2, 2)
    pods = pods_for(rs("v1", 1, 3), new)
    pods[old.metadata.uid] = pods[old.metadata.uid][:2]  # one already terminating/gone
    got = run(deploy(3, surge=1, unavailable=0), old, new, pods=pods)
    assert scaled(got).get("v1") == 1


@pytest.mark.parametrize(("case", "live_ready"), [
    ("pod cache behind the status: trust the lower", 0),
    ("pod cache agrees", 1),
])
def test_availability_uses_the_pod_cache_too(case: str, live_ready: int) -> None:
    old, new = rs("v1", 1, 3), rs("v2", 2, 1)
    pods = pods_for(old, rs("v2", 2, 1, available=live_ready))
    got = run(deploy(3), old, new, pods=pods)
    assert scaled(got).get("v1", 3) == 3 - live_ready, case


# --------------------------------------------------------------------------- Recreate


def test_recreate_scales_old_down_first_then_waits_for_pods() -> None:
    d = deploy(2, strategy="Recreate")
    first = run(d, rs("v1", 1, 2))
    assert scaled(first) == {"v1": 0} and first.create is None
    waiting = run(d, rs("v1", 1, 0, status=2))  # pods still running
    assert waiting.create is None and not scaled(waiting)
    gone = run(d, rs("v1", 1, 0, status=0), pods={})
    assert gone.create is not None and gone.create.spec.replicas == 2


# --------------------------------------------------------------------------- scaling, pause


def test_scaling_event_scales_the_only_active_rs() -> None:
    got = run(deploy(5), rs("v2", 2, 3, desired=3))
    assert scaled(got) == {"v2": 5}
    [e] = got.events
    assert e.reason == "ScalingReplicaSet" and "Scaled up replica set" in e.message


def test_proportional_scaling_mid_rollout() -> None:
    # Rolling 3 -> 6 while v1 has 2 and v2 has 2 (maxSurge 1: 4 = 3 + 1 at most).
    d = deploy(6, surge=1, unavailable=0)
    v1 = rs("v1", 1, 2, desired=3)
    v2 = rs("v2", 2, 2, desired=3, available=0)
    for r in (v1, v2):
        r.metadata.annotations["deployment.kubernetes.io/max-replicas"] = "4"
    got = run(d, v1, v2)
    sizes = scaled(got)
    assert sum(sizes.values()) == 7  # 6 + 1 surge
    assert sizes == {"v1": 3, "v2": 4} or sizes == {"v1": 4, "v2": 3}


def test_paused_scales_but_does_not_roll_out() -> None:
    d = deploy(4, paused=True)  # template is v2, only v1 exists
    got = run(d, rs("v1", 1, 3))
    assert got.create is None
    assert scaled(got) == {"v1": 4}
    assert cond(got.status, "Progressing") == ("Unknown", "DeploymentPaused")


def test_resume_restarts_the_progress_clock() -> None:
    d = deploy(3, conditions=[("Progressing", "Unknown", "DeploymentPaused", NOW - 5000)])
    got = run(d, rs("v1", 1, 3))
    assert got.create is not None  # rolling again
    progressing = [c for c in (got.status or d.status).conditions if c.type == "Progressing"]
    assert progressing[0].last_update_time.seconds == int(NOW)


# --------------------------------------------------------------------------- conditions


def test_complete_rollout_conditions() -> None:
    d = deploy(3, status=(3, 3, 3, 3),
               conditions=[("Progressing", "True", "ReplicaSetUpdated", NOW - 10)])
    got = run(d, rs("v1", 1, 0), rs("v2", 2, 3))
    assert cond(got.status, "Progressing") == ("True", "NewReplicaSetAvailable")
    assert cond(got.status, "Available") == ("True", "MinimumReplicasAvailable")
    assert got.status is not None and (got.status.replicas, got.status.updated_replicas,
                                       got.status.available_replicas,
                                       got.status.unavailable_replicas) == (3, 3, 3, 0)
    assert got.recheck_after is None


@pytest.mark.parametrize(("case", "since", "want", "recheck"), [
    ("within the deadline: waits, rechecks at the deadline", NOW - 100,
     ("True", "ReplicaSetUpdated"), 500.5),
    ("past the deadline: exceeded", NOW - 601, ("False", "ProgressDeadlineExceeded"), None),
])
def test_progress_deadline(case: str, since: float, want: tuple[str, str],
                           recheck: float | None) -> None:
    sets = [rs("v1", 1, 3), rs("v2", 2, 1, available=0)]
    d = deploy(3, status=(4, 1, 3, 3),
               conditions=[("Progressing", "True", "ReplicaSetUpdated", since)])
    got = run(d, *sets)
    assert cond(got.status or d.status, "Progressing") == want, case
    assert got.recheck_after == (pytest.approx(recheck) if recheck else None), case


def test_progress_resets_the_deadline() -> None:
    sets = [rs("v1", 1, 3), rs("v2", 2, 1, available=1)]
    d = deploy(3, status=(4, 1, 3, 3),
               conditions=[("Progressing", "True", "ReplicaSetUpdated", NOW - 590)])
    got = run(d, *sets)
    assert got.status is not None
    [c] = [c for c in got.status.conditions if c.type == "Progressing"]
    assert c.last_update_time.seconds == int(NOW)
    assert c.last_transition_time.seconds == int(NOW - 590)


def test_unavailable_below_minimum() -> None:
    d = deploy(3, surge=1, unavailable=1)
    got = run(d, rs("v2", 2, 3, available=1))
    assert cond(got.status, "Available") == ("False", "MinimumReplicasUnavailable")


def test_replica_failure_is_copied_from_the_replicaset() -> None:
    new = rs("v2", 2, 3, available=0, status=0)
    new.status.conditions.add(type="ReplicaFailure", status="True", reason="FailedCreate",
                              message="quota")
    got = run(deploy(3), new)
    assert cond(got.status, "ReplicaFailure") == ("True", "FailedCreate")


# --------------------------------------------------------------------------- history


@pytest.mark.parametrize(("case", "history", "olds", "deleted"), [
    ("within the limit", 2, [("a", 1, 0), ("b", 2, 0)], []),
    ("oldest idle revisions go", 1, [("a", 1, 0), ("b", 2, 0), ("c", 3, 0)], ["a", "b"]),
    ("an RS whose pods are still going is kept", 0, [("a", 1, 2), ("b", 2, 0)], ["b"]),
])
def test_history_cleanup(case: str, history: int, olds: list[tuple[str, int, int]],
                         deleted: list[str]) -> None:
    """(image, revision, status.replicas): every old RS is scaled to 0 already."""
    d = deploy(3, history=history, status=(3, 3, 3, 3),
               conditions=[("Progressing", "True", "NewReplicaSetAvailable", NOW)])
    sets = [rs(img, rev, 0, status=n) for img, rev, n in olds] + [rs("v2", 9, 3)]
    d.metadata.generation = d.status.observed_generation
    got = run(d, *sets)
    by_uid = {s.metadata.uid: s.spec.template.spec.containers[0].image for s in sets}
    assert [by_uid[r.uid] for r in got.delete] == deleted, case


def test_existing_rs_for_the_template_becomes_the_newest_revision() -> None:
    """Rollback: the template equals revision 1's, so that RS gets revision 3."""
    d = deploy(3, image="v1")
    got = run(d, rs("v1", 1, 0), rs("v2", 2, 3))
    [old] = [r for r in got.update if r.spec.template.spec.containers[0].image == "v1"]
    assert old.metadata.annotations[REVISION] == "3"
    assert old.metadata.annotations["deployment.kubernetes.io/revision-history"] == "1"
    assert got.annotations is not None and got.annotations[REVISION] == "3"
    assert got.create is None


def test_empty_selector_selects_nothing_and_warns() -> None:
    d = deploy(3)
    d.spec.selector.Clear()
    got = run(d, rs("v2", 2, 3))
    assert got.create is None and not got.update
    assert [e.reason for e in got.events] == ["SelectingAll"]


def test_adopt_orphan_and_release_mismatch() -> None:
    orphan = rs("v2", 2, 3)
    del orphan.metadata.owner_references[:]
    stray = rs("v1", 1, 0)
    stray.metadata.labels["app"] = "other"
    got = run(deploy(3), orphan, stray)
    assert [r.uid for r in got.adopt] == [orphan.metadata.uid]
    assert [r.uid for r in got.release] == [stray.metadata.uid]


