"""The pod planner and the restart back-off, table-driven, with a fake clock."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from nodeagent.planning import plan, spec_hash
from nodeagent.restarts import RestartTracker, key
from nodeagent.runtimestate import (
    ContainerRecord,
    ContainerState,
    PodRecord,
    ProbeView,
    SandboxRecord,
)
from shoal.api.core.v1 import core_pb2

RUNNING, EXITED, CREATED = ContainerState.RUNNING, ContainerState.EXITED, ContainerState.CREATED


def pod(*, containers: tuple[str, ...] = ("app",), init: tuple[str, ...] = (),
        policy: str = "Always", deleting: bool = False, phase: str = "") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = "web"
    p.metadata.uid = "uid-1"
    p.spec.restart_policy = policy
    for name in init:
        c = p.spec.init_containers.add()
        c.name, c.image = name, "busybox"
    for name in containers:
        c = p.spec.containers.add()
        c.name, c.image = name, "busybox"
    if deleting:
        p.metadata.deletion_timestamp.seconds = 1
    p.status.phase = phase
    return p


def ctr(name: str, state: ContainerState, *, exit_code: int = 0, attempt: int = 0,
        init: bool = False, finished_at: float = 100.0, cid: str = "",
        spec: Any = None) -> ContainerRecord:
    return ContainerRecord(id=cid or f"{name}-{attempt}", name=name, attempt=attempt,
                           state=state, exit_code=exit_code, init=init,
                           finished_at=finished_at, created_at=float(attempt),
                           spec_hash=spec_hash(spec) if spec is not None else "")


SANDBOX = (SandboxRecord(id="sb-0", attempt=0, ready=True, ip="10.0.0.2"),)


def record(*containers: ContainerRecord, sandboxes: tuple[SandboxRecord, ...] = SANDBOX
           ) -> PodRecord:
    return PodRecord(uid="uid-1", sandboxes=sandboxes, containers=containers)


def go(p: core_pb2.Pod, r: PodRecord, *, now: float = 1000.0,
       probes: ProbeView | None = None, restarts: RestartTracker | None = None) -> Any:
    return plan(p, r, probes=probes or ProbeView(), restarts=restarts or RestartTracker(),
                now=now)


@pytest.mark.parametrize(("name", "the_pod", "the_record", "expect"), [
    ("new pod: sandbox and every container",
     pod(containers=("a", "b")), record(sandboxes=()),
     {"create_sandbox": True, "start": ("a", "b"), "kill_pod": False}),
    ("new pod with init: sandbox then the first init container only",
     pod(init=("i1", "i2")), record(sandboxes=()),
     {"create_sandbox": True, "start_init": "i1", "start": ()}),
    ("dead sandbox: kill what is left, next attempt",
     pod(), record(ctr("app", RUNNING),
                   sandboxes=(SandboxRecord(id="sb-0", attempt=0, ready=False),)),
     {"create_sandbox": True, "kill_pod": True, "sandbox_attempt": 1, "start": ("app",)}),
    ("running and healthy: nothing to do",
     pod(), record(ctr("app", RUNNING)), {"start": (), "kill": ()}),
    ("init i1 succeeded, i2 next",
     pod(init=("i1", "i2")), record(ctr("i1", EXITED, init=True)),
     {"start_init": "i2", "start": ()}),
    ("init container running: wait",
     pod(init=("i1",)), record(ctr("i1", RUNNING, init=True)),
     {"start_init": "", "start": ()}),
    ("all init done: containers start",
     pod(init=("i1",), containers=("a", "b")), record(ctr("i1", EXITED, init=True)),
     {"start": ("a", "b")}),
    ("init failed under Never: the pod fails",
     pod(init=("i1",), policy="Never"), record(ctr("i1", EXITED, exit_code=1, init=True)),
     {"failed": True, "finished": True, "start": ()}),
    ("exited under Always: restart",
     pod(), record(ctr("app", EXITED, exit_code=0)), {"start": ("app",)}),
    ("exited 0 under OnFailure: pod succeeded",
     pod(policy="OnFailure"), record(ctr("app", EXITED, exit_code=0)),
     {"start": (), "finished": True, "failed": False, "kill_pod": True}),
    ("exited 1 under OnFailure: restart",
     pod(policy="OnFailure"), record(ctr("app", EXITED, exit_code=1)), {"start": ("app",)}),
    ("exited 1 under Never: pod failed",
     pod(policy="Never"), record(ctr("app", EXITED, exit_code=1)),
     {"start": (), "finished": True, "failed": True}),
    ("one of two exited under Never: the other keeps running",
     pod(policy="Never", containers=("a", "b")),
     record(ctr("a", EXITED, exit_code=0), ctr("b", RUNNING)),
     {"start": (), "finished": False, "kill": ()}),
    ("being deleted: kill, start nothing",
     pod(deleting=True), record(ctr("app", RUNNING)),
     {"kill_pod": True, "start": (), "finished": True}),
    ("being deleted, already stopped: nothing left to kill",
     pod(deleting=True), record(ctr("app", EXITED),
                                sandboxes=(SandboxRecord(id="s", attempt=0, ready=False),)),
     {"kill_pod": False, "finished": True}),
    ("old exited instances are garbage; the one before the latest stays (lastState)",
     pod(), record(ctr("app", EXITED, attempt=0), ctr("app", EXITED, attempt=1),
                   ctr("app", RUNNING, attempt=2)),
     {"remove": ("app-0",)}),
    ("created but never started: start it",
     pod(), record(ctr("app", CREATED)), {"start": ("app",)}),
])
def test_plan(name: str, the_pod: core_pb2.Pod, the_record: PodRecord,
              expect: dict[str, Any]) -> None:
    actions = go(the_pod, the_record)
    for attr, value in expect.items():
        assert getattr(actions, attr) == value, f"{name}: {attr}"


def test_liveness_failure_kills_and_policy_decides_the_restart() -> None:
    p = pod()
    actions = go(p, record(ctr("app", RUNNING, cid="c1")),
                 probes=ProbeView(live={"app": False}))
    assert actions.kill == (("c1", "the liveness probe failed; the container will be "
                                   "restarted"),)


def test_changed_image_restarts_the_container() -> None:
    p = pod()
    old = core_pb2.Container()
    old.CopyFrom(p.spec.containers[0])
    p.spec.containers[0].image = "busybox:2"
    same = go(p, record(ctr("app", RUNNING, cid="c1", spec=p.spec.containers[0])))
    assert same.kill == ()
    changed = go(p, record(ctr("app", RUNNING, cid="c1", spec=old)))
    assert changed.kill and changed.kill[0][0] == "c1"


def test_crash_loop_back_off_grows_and_caps() -> None:
    tracker = RestartTracker()
    p = pod()
    now = 1000.0
    delays = []
    for attempt in range(8):
        r = record(ctr("app", EXITED, exit_code=1, attempt=attempt, finished_at=now))
        actions = go(p, r, now=now, restarts=tracker)
        if actions.start:
            tracker.restarted(key("uid-1", "app"), now=now)
            delays.append(0.0)
            continue
        reason, message = actions.waiting["app"]
        assert reason == "CrashLoopBackOff" and "back-off" in message
        assert actions.requeue_after is not None
        delays.append(actions.requeue_after)
        now += actions.requeue_after  # the fake clock moves to the end of the back-off
        again = go(p, r, now=now, restarts=tracker)
        assert again.start == ("app",)
        tracker.restarted(key("uid-1", "app"), now=now)
    assert delays[0] == 0.0  # the first restart is immediate
    assert delays[1:5] == [10.0, 20.0, 40.0, 80.0]
    assert max(delays) == 300.0


def test_back_off_resets_after_a_long_healthy_run() -> None:
    tracker = RestartTracker()
    k = key("uid-1", "app")
    tracker.restarted(k, now=0)
    tracker.restarted(k, now=1)
    assert not tracker.check(k, finished_at=5, now=6).go
    assert tracker.check(k, finished_at=700, now=700).go  # more than 10 min since
    assert tracker.delay(k) == 0.0


def test_init_failure_backs_off_under_always() -> None:
    tracker = RestartTracker()
    p = pod(init=("i1",))
    r = record(ctr("i1", EXITED, exit_code=2, init=True, finished_at=1000.0))
    first = go(p, r, restarts=tracker)
    assert first.start_init == "i1"
    tracker.restarted(key("uid-1", "i1"), now=1000.0)
    second = go(p, replace(r), restarts=tracker, now=1001.0)
    assert second.start_init == "" and second.waiting["i1"][0] == "CrashLoopBackOff"


def with_debugger(p: core_pb2.Pod, target: str = "") -> core_pb2.Pod:
    p.spec.ephemeral_containers.add(name="debugger-1", image="busybox",
                                    target_container_name=target)
    return p


@pytest.mark.parametrize(("the_record", "start_ephemeral"), [
    (record(ctr("app", RUNNING)), ("debugger-1",)),
    (record(ctr("app", RUNNING), ctr("debugger-1", RUNNING)), ()),
    # It ran and ended: never started again, whatever its exit code.
    (record(ctr("app", RUNNING), ctr("debugger-1", EXITED, exit_code=1)), ()),
])
def test_an_ephemeral_container_starts_once(the_record: PodRecord,
                                            start_ephemeral: tuple[str, ...]) -> None:
    actions = go(with_debugger(pod()), the_record)
    assert actions.start_ephemeral == start_ephemeral
    assert actions.start == () and actions.kill == ()


def test_an_ephemeral_container_does_not_keep_a_finished_pod_going() -> None:
    p = with_debugger(pod(policy="Never"))
    actions = go(p, record(ctr("app", EXITED), ctr("debugger-1", RUNNING)))
    assert actions.finished and actions.start_ephemeral == ()


def test_an_ephemeral_container_is_read_as_a_container_without_its_target() -> None:
    from nodeagent.planning import as_container

    e = with_debugger(pod(), target="app").spec.ephemeral_containers[0]
    e.command.append("sh")
    e.tty = True
    c = as_container(e)
    assert (c.name, c.image, list(c.command), c.tty) == ("debugger-1", "busybox", ["sh"], True)
    assert c.SerializeToString() == core_pb2.Container(
        name="debugger-1", image="busybox", command=["sh"], tty=True).SerializeToString()
