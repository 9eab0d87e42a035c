"""StatefulSet planner: ordered start and stop, Parallel, failed pods, rolling update, status."""

from __future__ import annotations

import pytest

from apiserver.controllers import revisions as rv
from apiserver.controllers import statefulsets as ssc
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2

NOW = 1_000_000.0
CUR = "web-aaa"
UPD = "web-bbb"


def sts(replicas: int = 3, *, parallel: bool = False, partition: int | None = None,
        strategy: str = "RollingUpdate", start: int = 0) -> apps_pb2.StatefulSet:
    s = apps_pb2.StatefulSet()
    s.metadata.namespace, s.metadata.name, s.metadata.uid = "ns", "web", "sts-uid"
    s.metadata.generation = 2
    s.spec.replicas = replicas
    s.spec.service_name = "web"
    s.spec.selector.match_labels["app"] = "web"
    s.spec.template.metadata.labels["app"] = "web"
    s.spec.template.spec.containers.add(name="c", image="busybox")
    s.spec.pod_management_policy = "Parallel" if parallel else "OrderedReady"
    s.spec.update_strategy.type = strategy
    if partition is not None:
        s.spec.update_strategy.rolling_update.partition = partition
    s.spec.ordinals.start = start
    return s


def pod(ordinal: int, *, rev: str = UPD, ready: bool = True, phase: str = "Running",
        terminating: bool = False) -> core_pb2.Pod:
    s = sts()
    p = ssc.pod_for(s, ordinal, template=s.spec.template, revision=rev)
    p.metadata.uid = f"uid-{ordinal}"
    p.status.phase = phase
    p.status.conditions.add(type="Ready", status="True" if ready else "False")
    if terminating:
        p.metadata.deletion_timestamp.seconds = 1
    return p


def run(s: apps_pb2.StatefulSet, pods: list[core_pb2.Pod], *, current: str = UPD
        ) -> ssc.StatefulSetPlan:
    return ssc.plan(s, pods, current_revision=current, update_revision=UPD, now=NOW)


@pytest.mark.parametrize(("name", "s", "pods", "create", "delete"), [
    ("ordered: first pod only", sts(), [], [0], []),
    ("ordered: next only after the previous is Running and Ready", sts(), [pod(0)], [1], []),
    ("ordered: wait while web-0 is not ready", sts(), [pod(0, ready=False)], [], []),
    ("ordered: wait while web-0 is pending", sts(), [pod(0, phase="Pending", ready=False)],
     [], []),
    ("ordered: a hole is refilled first", sts(), [pod(0), pod(2)], [1], []),
    ("ordered: all there, nothing to do", sts(), [pod(0), pod(1), pod(2)], [], []),
    ("ordered: a failed pod is deleted to be recreated", sts(),
     [pod(0), pod(1, phase="Failed", ready=False), pod(2)], [], [1]),
    ("ordered: scale down from the highest, one at a time", sts(1),
     [pod(0), pod(1), pod(2)], [], [2]),
    ("ordered: scale down waits for the terminating one", sts(1),
     [pod(0), pod(1), pod(2, terminating=True)], [], []),
    ("ordered: scale down waits for unhealthy pods", sts(1),
     [pod(0), pod(1, ready=False), pod(2)], [], []),
    ("parallel: all at once", sts(parallel=True), [], [0, 1, 2], []),
    ("parallel: no waiting", sts(parallel=True), [pod(0, ready=False)], [1, 2], []),
    ("parallel: scale down all at once", sts(1, parallel=True),
     [pod(0), pod(1, ready=False), pod(2)], [], [2, 1]),
    ("ordinals.start", sts(2, start=5), [pod(5)], [6], []),
    ("rolling: highest old pod first", sts(), [pod(0, rev=CUR), pod(1, rev=CUR),
                                             pod(2, rev=CUR)], [], [2]),
    ("rolling: then the next one down", sts(), [pod(0, rev=CUR), pod(1, rev=CUR), pod(2)],
     [], [1]),
    ("rolling: waits for the updated pod to be ready", sts(),
     [pod(0, rev=CUR), pod(1, rev=CUR), pod(2, ready=False)], [], []),
    ("rolling: partition keeps the lower ordinals", sts(partition=2),
     [pod(0, rev=CUR), pod(1, rev=CUR), pod(2)], [], []),
    ("OnDelete: never deletes for an update", sts(strategy="OnDelete"),
     [pod(0, rev=CUR), pod(1, rev=CUR), pod(2, rev=CUR)], [], []),
])
def test_plan(name: str, s: apps_pb2.StatefulSet, pods: list[core_pb2.Pod], create: list[int],
              delete: list[int]) -> None:
    got = run(s, pods, current=CUR)
    assert list(got.create) == create, name
    assert [r.ordinal for r in got.delete] == delete, name


def test_ordered_start_on_a_fake_timeline() -> None:
    """web-(i+1) is created only after web-i is Running and Ready."""
    s = sts()
    pods: list[core_pb2.Pod] = []
    created: list[str] = []
    for _ in range(10):
        got = run(s, pods)
        for o in got.create:
            created.append(f"web-{o}")
            pods.append(pod(o, ready=False, phase="Pending"))
        # The newest pod becomes Running and Ready before the next pass.
        for p in pods:
            p.status.phase = "Running"
            p.status.conditions[0].status = "True"
    assert created == ["web-0", "web-1", "web-2"]


def test_status_and_revision_roll_forward() -> None:
    s = sts()
    mid = run(s, [pod(0, rev=CUR), pod(1, rev=CUR), pod(2)], current=CUR)
    st = ssc.status_of(s, mid, update_revision=UPD)
    assert (st.replicas, st.ready_replicas, st.current_replicas, st.updated_replicas) == \
        (3, 3, 2, 1)
    assert (st.current_revision, st.update_revision, st.observed_generation) == (CUR, UPD, 2)
    done = run(s, [pod(0), pod(1), pod(2)], current=CUR)
    st = ssc.status_of(s, done, update_revision=UPD)
    assert st.current_revision == UPD and st.current_replicas == 3


@pytest.mark.parametrize(("ordinal", "partition", "want"), [
    (0, 2, CUR), (1, 2, CUR), (2, 2, UPD), (0, None, UPD),
])
def test_revision_below_the_partition(ordinal: int, partition: int | None, want: str) -> None:
    got = ssc.revision_for(sts(partition=partition), ordinal, current_revision=CUR,
                           update_revision=UPD)
    assert got == want


def test_pod_identity() -> None:
    s = sts()
    p = ssc.pod_for(s, 1, template=s.spec.template, revision=UPD)
    assert p.metadata.name == "web-1"
    assert (p.spec.hostname, p.spec.subdomain) == ("web-1", "web")
    assert p.metadata.labels[ssc.POD_NAME_LABEL] == "web-1"
    assert p.metadata.labels[ssc.POD_INDEX_LABEL] == "1"
    assert p.metadata.labels[rv.REVISION_HASH_LABEL] == UPD
    assert p.metadata.labels["app"] == "web"
    ref = p.metadata.owner_references[0]
    assert (ref.kind, ref.name, ref.controller) == ("StatefulSet", "web", True)


@pytest.mark.parametrize(("pod_name", "want"), [
    ("web-0", 0), ("web-12", 12), ("web", None), ("other-1", None), ("web-x", None),
    ("web-web-1", None),
])
def test_ordinal_of(pod_name: str, want: int | None) -> None:
    assert ssc.ordinal_of("web", pod_name) == want
