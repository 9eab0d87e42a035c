"""DaemonSet planner: eligible nodes, one pod each, failed pods, rolling update, status."""

from __future__ import annotations

import pytest

from apiserver.controllers import daemonsets as dsc
from apiserver.controllers import revisions as rv
from apiserver.controllers import taints as tn
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2

NOW = 1_000_000.0
NEW = "newhash"
OLD = "oldhash"


def ds(*, node_selector: dict[str, str] | None = None, max_unavailable: int | str = 1,
       min_ready: int = 0, tolerations: tuple[core_pb2.Toleration, ...] = (),
       strategy: str = "RollingUpdate") -> apps_pb2.DaemonSet:
    d = apps_pb2.DaemonSet()
    d.metadata.namespace, d.metadata.name, d.metadata.uid = "ns", "agent", "ds-uid"
    d.metadata.generation = 3
    d.spec.selector.match_labels["app"] = "agent"
    d.spec.template.metadata.labels["app"] = "agent"
    d.spec.template.spec.containers.add(name="c", image="busybox")
    d.spec.template.spec.node_selector.update(node_selector or {})
    d.spec.template.spec.tolerations.extend(tolerations)
    d.spec.min_ready_seconds = min_ready
    d.spec.update_strategy.type = strategy
    mu = d.spec.update_strategy.rolling_update.max_unavailable
    if isinstance(max_unavailable, int):
        mu.int_val = max_unavailable
    else:
        mu.str_val = max_unavailable
    return d


def node(name: str, *, labels: dict[str, str] | None = None,
         taints: tuple[tuple[str, str], ...] = ()) -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = name
    n.metadata.labels.update(labels or {})
    for key, effect in taints:
        n.spec.taints.add(key=key, effect=effect)
    return n


def pod(name: str, on: str, *, hash_: str = NEW, ready: bool = True, phase: str = "Running",
        created: int = 100, terminating: bool = False, ready_at: float = NOW - 100,
        bound: bool = True) -> core_pb2.Pod:
    d = ds()
    p = dsc.pod_for_node(d, node=on, name=name, template=d.spec.template, hash_=hash_)
    p.metadata.uid = f"uid-{name}"
    p.metadata.creation_timestamp.seconds = created
    if bound:
        p.spec.node_name = on
    p.status.phase = phase
    c = p.status.conditions.add(type="Ready", status="True" if ready else "False")
    c.last_transition_time.FromNanoseconds(int(ready_at * 1e9))
    if terminating:
        p.metadata.deletion_timestamp.seconds = 200
    return p


NODES = [node("n1"), node("n2"), node("n3")]


def names(refs: tuple[dsc.PodRef, ...]) -> list[str]:
    return sorted(r.name for r in refs)


@pytest.mark.parametrize(("name", "d", "nodes", "pods", "create", "delete"), [
    ("empty cluster", ds(), [], [], [], []),
    ("every node gets a pod", ds(), NODES, [], ["n1", "n2", "n3"], []),
    ("only missing nodes", ds(), NODES, [pod("a", "n1"), pod("b", "n3", bound=False)],
     ["n2"], []),
    ("nodeSelector", ds(node_selector={"disk": "ssd"}),
     [node("n1", labels={"disk": "ssd"}), node("n2")], [], ["n1"], []),
    ("label removed: pod goes", ds(node_selector={"disk": "ssd"}),
     [node("n1")], [pod("a", "n1")], [], ["a"]),
    ("NoSchedule taint not tolerated: no new pod, the old one stays", ds(),
     [node("n1", taints=(("dedicated", tn.NO_SCHEDULE),)), node("n2", taints=(
         ("dedicated", tn.NO_SCHEDULE),))], [pod("a", "n1")], [], []),
    ("NoExecute taint not tolerated: pod goes", ds(),
     [node("n1", taints=(("dedicated", tn.NO_EXECUTE),))], [pod("a", "n1")], [], ["a"]),
    ("tolerated taint", ds(tolerations=(core_pb2.Toleration(
        key="dedicated", operator="Exists"),)),
     [node("n1", taints=(("dedicated", tn.NO_SCHEDULE),))], [], ["n1"], []),
    ("daemon pods tolerate unreachable and cordon", ds(),
     [node("n1", taints=((tn.UNREACHABLE, tn.NO_EXECUTE),
                         (tn.UNSCHEDULABLE, tn.NO_SCHEDULE)))], [pod("a", "n1")], [], []),
    ("but are not created on a not-ready node", ds(),
     [node("n1", taints=((tn.NOT_READY, tn.NO_SCHEDULE),))], [], [], []),
    ("two pods on a node: the newer goes", ds(), [node("n1")],
     [pod("old", "n1", created=1), pod("new", "n1", created=2)], [], ["new"]),
    ("failed pod is replaced (deleted first)", ds(), [node("n1")],
     [pod("a", "n1", phase="Failed")], [], ["a"]),
    ("terminating pod: wait before creating", ds(), [node("n1")],
     [pod("a", "n1", terminating=True)], [], []),
    ("pod of a deleted node goes", ds(), [node("n1")], [pod("a", "n1"), pod("b", "gone")],
     [], ["b"]),
])
def test_plan_pods(name: str, d: apps_pb2.DaemonSet, nodes: list[core_pb2.Node],
                   pods: list[core_pb2.Pod], create: list[str], delete: list[str]) -> None:
    got = dsc.plan(d, nodes, pods, update_hash=NEW, now=NOW)
    assert sorted(got.create_on) == create, name
    assert names(got.delete) == delete, name


@pytest.mark.parametrize(("name", "max_unavailable", "pods", "delete"), [
    ("one at a time", 1, [pod("a", "n1", hash_=OLD), pod("b", "n2", hash_=OLD),
                          pod("c", "n3", hash_=OLD)], ["a"]),
    ("two at a time", 2, [pod("a", "n1", hash_=OLD), pod("b", "n2", hash_=OLD),
                          pod("c", "n3", hash_=OLD)], ["a", "b"]),
    ("percent rounds up", "50%", [pod("a", "n1", hash_=OLD), pod("b", "n2", hash_=OLD),
                                  pod("c", "n3", hash_=OLD)], ["a", "b"]),
    ("a new pod still unready uses the budget", 1,
     [pod("a", "n1", ready=False), pod("b", "n2", hash_=OLD), pod("c", "n3", hash_=OLD)], []),
    ("a missing pod uses the budget", 1, [pod("b", "n2", hash_=OLD), pod("c", "n3", hash_=OLD)],
     []),
    ("unavailable old pods go at no cost", 1,
     [pod("a", "n1", hash_=OLD, ready=False), pod("b", "n2", hash_=OLD),
      pod("c", "n3", hash_=OLD)], ["a"]),
    ("done", 1, [pod("a", "n1"), pod("b", "n2"), pod("c", "n3")], []),
])
def test_rolling_update(name: str, max_unavailable: int | str, pods: list[core_pb2.Pod],
                        delete: list[str]) -> None:
    got = dsc.plan(ds(max_unavailable=max_unavailable), NODES, pods, update_hash=NEW, now=NOW)
    assert names(got.delete) == delete, name


def test_on_delete_strategy_never_replaces() -> None:
    pods = [pod("a", "n1", hash_=OLD), pod("b", "n2", hash_=OLD), pod("c", "n3", hash_=OLD)]
    got = dsc.plan(ds(strategy="OnDelete"), NODES, pods, update_hash=NEW, now=NOW)
    assert got.delete == ()


def test_status_counts() -> None:
    d = ds(min_ready=10, node_selector={"run": "yes"})
    nodes = [node("n1", labels={"run": "yes"}), node("n2", labels={"run": "yes"}),
             node("n3", labels={"run": "yes"}), node("n4")]
    pods = [pod("a", "n1"), pod("b", "n2", hash_=OLD, ready_at=NOW - 4),
            pod("c", "n4")]  # c is misscheduled (and deleted)
    got = dsc.plan(d, nodes, pods, update_hash=NEW, now=NOW)
    assert got.counts == dsc.Counts(desired=3, current=2, misscheduled=1, ready=2,
                                    updated=1, available=1)
    assert got.create_on == ("n3",)
    assert got.recheck_after == pytest.approx(6.0)  # b becomes available
    st = dsc.status_of(d, got.counts)
    assert (st.desired_number_scheduled, st.number_unavailable, st.observed_generation) == \
        (3, 2, 3)


def test_daemon_pod_names_its_node_by_affinity_and_tolerates_trouble() -> None:
    d = ds()
    p = dsc.pod_for_node(d, node="n2", name="agent-x", template=d.spec.template, hash_=NEW)
    assert not p.spec.node_name  # the scheduler binds it
    assert dsc.target_node(p) == "n2"
    assert p.metadata.labels[rv.REVISION_HASH_LABEL] == NEW
    assert p.metadata.owner_references[0].controller
    keys = {(t.key, t.effect) for t in p.spec.tolerations}
    assert (tn.UNREACHABLE, tn.NO_EXECUTE) in keys and (tn.UNSCHEDULABLE, tn.NO_SCHEDULE) in keys


def test_revisions_new_reuse_and_prune() -> None:
    d = ds()
    first = rv.plan_revisions(d, kind="DaemonSet", revisions=[], collision_count=0,
                              history_limit=1)
    assert first.create is not None and first.create.revision == 1
    assert first.update_name == f"agent-{first.update_hash}"
    assert rv.template_of(first.create) == d.spec.template
    same = rv.plan_revisions(d, kind="DaemonSet", revisions=[first.create], collision_count=0,
                             history_limit=1)
    assert same.create is None and same.update_hash == first.update_hash
    d2 = ds()
    d2.spec.template.spec.containers[0].image = "busybox:2"
    second = rv.plan_revisions(d2, kind="DaemonSet", revisions=[first.create],
                               collision_count=0, history_limit=1)
    assert second.create is not None and second.create.revision == 2
    assert second.update_hash != first.update_hash
    # Rolling back to the first template re-uses (and renumbers) its revision.
    back = rv.plan_revisions(d, kind="DaemonSet", revisions=[first.create, second.create],
                             collision_count=0, history_limit=0)
    assert back.create is None and back.renumber is not None and back.renumber.revision == 3
    assert back.prune == (second.create.metadata.name,)
    # ... unless a pod still runs that revision.
    kept = rv.plan_revisions(d, kind="DaemonSet", revisions=[first.create, second.create],
                             collision_count=0, history_limit=0,
                             in_use={second.update_hash})
    assert kept.prune == ()
    # A collision count changes the hash.
    assert rv.template_hash(d.spec.template, 1) != rv.template_hash(d.spec.template, 0)
