"""The pure parts of ``shoal rollout`` and ``shoal wait`` (no server)."""

from __future__ import annotations

import pytest

from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.cli.reporting import UsageError
from shoal.cli.rollouts import (
    Progress,
    RolloutFailed,
    daemonset_progress,
    deployment_progress,
    history,
    restarted,
    rolled_back,
    statefulset_progress,
    stuck_pod,
    undo_target,
)
from shoal.cli.waiting import WaitFor, check_condition, condition_met, parse_for
from shoal.kinds import builtin_kinds

KINDS = builtin_kinds()


def deploy(replicas: int = 3, *, gen: int = 2, observed: int = 2, updated: int = 3,
           total: int = 3, available: int = 3, timed_out: bool = False,
           image: str = "v2", revision: str = "2") -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.uid, d.metadata.generation = "web", "uid-d", gen
    d.metadata.annotations["deployment.kubernetes.io/revision"] = revision
    d.spec.replicas = replicas
    d.spec.template.metadata.labels["app"] = "web"
    d.spec.template.spec.containers.add(name="c", image=image)
    st = d.status
    st.observed_generation, st.updated_replicas, st.replicas = observed, updated, total
    st.available_replicas = available
    if timed_out:
        st.conditions.add(type="Progressing", status="False", reason="ProgressDeadlineExceeded")
    return d


@pytest.mark.parametrize(("case", "d", "want"), [
    ("spec not observed", deploy(gen=3, observed=2),
     Progress("Waiting for deployment spec update to be observed...")),
    ("updating", deploy(updated=1, total=4),
     Progress('Waiting for deployment "web" rollout to finish: 1 out of 3 new replicas have '
              "been updated...")),
    ("old pending termination", deploy(updated=3, total=4),
     Progress('Waiting for deployment "web" rollout to finish: 1 old replicas are pending '
              "termination...")),
    ("not yet available", deploy(available=2),
     Progress('Waiting for deployment "web" rollout to finish: 2 of 3 updated replicas are '
              "available...")),
    ("done", deploy(), Progress('deployment "web" successfully rolled out', done=True)),
    ("deadline exceeded", deploy(updated=1, timed_out=True),
     Progress("", failed='deployment "web" exceeded its progress deadline')),
])
def test_deployment_progress(case: str, d: apps_pb2.Deployment, want: Progress) -> None:
    assert deployment_progress(d) == want, case


def test_daemonset_and_statefulset_progress() -> None:
    ds = apps_pb2.DaemonSet()
    ds.metadata.name, ds.metadata.generation = "agent", 1
    ds.status.observed_generation, ds.status.desired_number_scheduled = 1, 3
    ds.status.updated_number_scheduled = 2
    assert "2 out of 3 new pods have been updated" in daemonset_progress(ds).message
    ds.status.updated_number_scheduled = ds.status.number_available = 3
    assert daemonset_progress(ds).done
    ds.spec.update_strategy.type = "OnDelete"
    assert daemonset_progress(ds).failed

    sts = apps_pb2.StatefulSet()
    sts.metadata.name, sts.metadata.generation = "web", 1
    sts.spec.replicas = 3
    assert "spec update to be observed" in statefulset_progress(sts).message
    sts.status.observed_generation, sts.status.ready_replicas = 1, 1
    assert statefulset_progress(sts).message == "Waiting for 2 pods to be ready..."
    sts.status.ready_replicas = 3
    sts.status.update_revision, sts.status.current_revision = "web-2", "web-1"
    assert not statefulset_progress(sts).done
    sts.status.current_revision, sts.status.current_replicas = "web-2", 3
    assert statefulset_progress(sts).done


def pod(name: str, *, waiting: str = "", init: bool = False, deleting: bool = False
        ) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    if deleting:
        p.metadata.deletion_timestamp.seconds = 1
    statuses = p.status.init_container_statuses if init else p.status.container_statuses
    cs = statuses.add(name="c")
    if waiting:
        cs.state.waiting.reason = waiting
    else:
        cs.state.running.started_at.seconds = 1
    return p


@pytest.mark.parametrize(("case", "pods", "want"), [
    ("all running", [pod("a"), pod("b")], ""),
    ("starting is fine", [pod("a", waiting="ContainerCreating")], ""),
    ("image pull back-off", [pod("a"), pod("b", waiting="ImagePullBackOff")],
     "pod b: container c is waiting: ImagePullBackOff"),
    ("pull error", [pod("a", waiting="ErrImagePull")], "pod a: container c is waiting: "
                                                      "ErrImagePull"),
    ("crash loop in an init container", [pod("a", waiting="CrashLoopBackOff", init=True)],
     "pod a: container c is waiting: CrashLoopBackOff"),
    ("terminating pods are ignored", [pod("a", waiting="ImagePullBackOff", deleting=True)], ""),
])
def test_stuck_pod(case: str, pods: list[core_pb2.Pod], want: str) -> None:
    assert stuck_pod(pods) == want, case


def rs(image: str, revision: int, *, owner: str = "uid-d") -> apps_pb2.ReplicaSet:
    r = apps_pb2.ReplicaSet()
    r.metadata.name = f"web-{image}"
    r.metadata.annotations["deployment.kubernetes.io/revision"] = str(revision)
    r.metadata.annotations["kubernetes.io/change-cause"] = f"to {image}"
    r.metadata.owner_references.add(kind="Deployment", uid=owner, controller=True)
    r.spec.template.CopyFrom(deploy(image=image).spec.template)
    r.spec.template.metadata.labels["pod-template-hash"] = image
    return r


SETS = [rs("v1", 1), rs("v2", 2), rs("v0", 5, owner="someone-else")]


@pytest.mark.parametrize(("case", "to", "want"), [
    ("previous", 0, "v1"),
    ("explicit", 2, "v2"),
])
def test_undo_target(case: str, to: int, want: str) -> None:
    got = undo_target(deploy(), SETS, to)
    assert got.template.spec.containers[0].image == want, case


@pytest.mark.parametrize(("case", "sets", "to", "message"), [
    ("missing revision", SETS, 7, "unable to find specified revision 7"),
    ("no history", [], 0, "no rollout history found"),
    ("nothing earlier", [rs("v2", 2)], 0, "no previous revision"),
])
def test_undo_target_errors(case: str, sets: list[apps_pb2.ReplicaSet], to: int,
                            message: str) -> None:
    with pytest.raises(RolloutFailed, match=message):
        undo_target(deploy(), sets, to)


def test_rolled_back_copies_the_template_without_the_hash() -> None:
    [v1] = [r for r in history(deploy(), SETS) if r.number == 1]
    out = rolled_back(deploy(), v1)
    assert out is not None
    assert out.spec.template.spec.containers[0].image == "v1"
    assert "pod-template-hash" not in out.spec.template.metadata.labels
    assert out.metadata.annotations["kubernetes.io/change-cause"] == "to v1"
    assert out.metadata.annotations["deployment.kubernetes.io/revision"] == "2"  # not copied
    assert rolled_back(deploy(image="v1"), v1) is None


def test_history_and_restart() -> None:
    assert [r.number for r in history(deploy(), SETS)] == [1, 2]
    assert [r.change_cause for r in history(deploy(), SETS)] == ["to v1", "to v2"]
    stamped = restarted(deploy(), 1_700_000_000)
    assert stamped.spec.template.metadata.annotations[
        "kubectl.kubernetes.io/restartedAt"] == "2023-11-14T22:13:20Z"


@pytest.mark.parametrize(("text", "want"), [
    ("delete", WaitFor(delete=True)),
    ("condition=Ready", WaitFor(condition="Ready")),
    ("condition=Available=false", WaitFor(condition="Available", value="false")),
])
def test_parse_for(text: str, want: WaitFor) -> None:
    assert parse_for(text) == want


@pytest.mark.parametrize("text", ["jsonpath={.x}", "condition=", "ready", "condition"])
def test_parse_for_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_for(text)


@pytest.mark.parametrize(("kind", "condition", "want"), [
    ("pods", "ready", "Ready"),
    ("pods", "PodScheduled", "PodScheduled"),
    ("deployments", "available", "Available"),
    ("nodes", "Ready", "Ready"),
])
def test_check_condition(kind: str, condition: str, want: str) -> None:
    assert check_condition(KINDS.by_name(kind), WaitFor(condition=condition)) == want


@pytest.mark.parametrize(("kind", "condition", "message"), [
    ("deployments", "Ready", 'no condition "Ready" (their conditions: Available, '
                             "Progressing, ReplicaFailure)"),
    ("configmaps", "Ready", "no conditions to wait for"),
    ("pods", "Available", 'no condition "Available"'),
])
def test_check_condition_refuses(kind: str, condition: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_condition(KINDS.by_name(kind), WaitFor(condition=condition))


def test_condition_met_ignores_case_of_the_value() -> None:
    d = deploy()
    d.status.conditions.add(type="Available", status="True")
    assert condition_met(d, "Available", "true")
    assert not condition_met(d, "Available", "False")
    assert not condition_met(d, "Progressing", "True")


def controller_revision(image: str, number: int) -> apps_pb2.ControllerRevision:
    rev = apps_pb2.ControllerRevision()
    rev.metadata.name = f"db-{image}"
    rev.metadata.owner_references.add(kind="StatefulSet", uid="uid-sts", controller=True)
    rev.data = deploy(image=image).spec.template.SerializeToString(deterministic=True)
    rev.revision = number
    return rev


def test_statefulset_history_and_undo_from_controller_revisions() -> None:
    sts = apps_pb2.StatefulSet()
    sts.metadata.name, sts.metadata.uid = "db", "uid-sts"
    sts.spec.template.CopyFrom(deploy(image="v2").spec.template)
    revs = [controller_revision("v1", 1), controller_revision("v2", 2)]
    assert [r.number for r in history(sts, revs)] == [1, 2]
    target = undo_target(sts, revs, 0)
    assert target.number == 1
    out = rolled_back(sts, target)
    assert out is not None and out.spec.template.spec.containers[0].image == "v1"
    with pytest.raises(RolloutFailed, match="no previous revision"):
        undo_target(sts, revs[1:], 0)
