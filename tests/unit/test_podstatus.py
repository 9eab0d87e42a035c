"""Pod status from runtime records: phase, container states, conditions."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.podstatus import pod_status
from nodeagent.runtimestate import (
    ContainerRecord,
    ContainerState,
    PodRecord,
    ProbeView,
    SandboxRecord,
)
from shoal.api.core.v1 import core_pb2

RUNNING, EXITED = ContainerState.RUNNING, ContainerState.EXITED
SB = (SandboxRecord(id="sb", attempt=0, ready=True, ip="10.244.1.5"),)


def pod(*, init: tuple[str, ...] = (), readiness: bool = False) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = "web"
    for n in init:
        p.spec.init_containers.add(name=n, image="busybox")
    c = p.spec.containers.add(name="app", image="busybox:1")
    if readiness:
        c.readiness_probe.tcp_socket.port.int_val = 80
    return p


def rec(*cs: ContainerRecord, sandboxes: tuple[SandboxRecord, ...] = SB) -> PodRecord:
    return PodRecord(uid="u", sandboxes=sandboxes, containers=cs)


def c(state: ContainerState, *, exit_code: int = 0, attempt: int = 0, init: bool = False,
      name: str = "app", restarts: int = 0) -> ContainerRecord:
    return ContainerRecord(id=f"{name}{attempt}", name=name, attempt=attempt, state=state,
                           exit_code=exit_code, init=init, started_at=10.0, finished_at=20.0,
                           created_at=float(attempt), restart_count=restarts,
                           image_ref="sha256:abc")


def status(p: core_pb2.Pod, r: PodRecord, **kw: Any) -> core_pb2.PodStatus:
    args: dict[str, Any] = {"probes": ProbeView(), "waiting": {}, "failures": {},
                            "finished": False, "failed": False, "host_ip": "192.168.1.2",
                            "now": 100.0}
    args.update(kw)
    return pod_status(p, r, **args)


def cond(st: core_pb2.PodStatus, t: str) -> str:
    return next(x.status for x in st.conditions if x.type == t)


def test_creating() -> None:
    st = status(pod(), rec(sandboxes=()))
    assert st.phase == "Pending"
    assert st.container_statuses[0].state.waiting.reason == "ContainerCreating"
    assert cond(st, "Ready") == "False" and not st.pod_ip


def test_running_and_ready() -> None:
    st = status(pod(), rec(c(RUNNING)))
    assert st.phase == "Running" and st.pod_ip == "10.244.1.5" and st.host_ip == "192.168.1.2"
    cs = st.container_statuses[0]
    assert cs.ready and cs.started and cs.container_id == "containerd://app0"
    assert cs.image_id == "sha256:abc"
    assert cond(st, "Ready") == "True" and cond(st, "ContainersReady") == "True"


@pytest.mark.parametrize(("ready", "expect"), [(None, False), (False, False), (True, True)])
def test_readiness_probe_gates_ready(ready: bool | None, expect: bool) -> None:
    probes = ProbeView(ready={} if ready is None else {"app": ready})
    st = status(pod(readiness=True), rec(c(RUNNING)), probes=probes)
    assert st.container_statuses[0].ready is expect
    assert cond(st, "Ready") == ("True" if expect else "False")


def test_crash_loop_shows_waiting_and_last_state() -> None:
    st = status(pod(), rec(c(EXITED, exit_code=2, attempt=3, restarts=3)),
                waiting={"app": ("CrashLoopBackOff", "back-off 40s restarting failed")})
    cs = st.container_statuses[0]
    assert cs.state.waiting.reason == "CrashLoopBackOff"
    assert cs.last_state.terminated.exit_code == 2
    assert cs.last_state.terminated.reason == "Error"
    assert cs.restart_count == 3
    assert st.phase == "Running"


def test_image_pull_failure_is_a_reason_not_a_crash() -> None:
    st = status(pod(), rec(sandboxes=SB),
                failures={"app": ("ErrImagePull", "failed to resolve reference")})
    assert st.container_statuses[0].state.waiting.reason == "ErrImagePull"
    assert "resolve" in st.container_statuses[0].state.waiting.message
    assert st.phase == "Pending"


@pytest.mark.parametrize(("code", "failed", "phase", "reason"),
                         [(0, False, "Succeeded", "Completed"), (3, True, "Failed", "Error")])
def test_terminal_phases(code: int, failed: bool, phase: str, reason: str) -> None:
    st = status(pod(), rec(c(EXITED, exit_code=code)), finished=True, failed=failed)
    assert st.phase == phase
    assert st.container_statuses[0].state.terminated.reason == reason
    assert cond(st, "Ready") == "False"


def test_init_containers_hold_initialized() -> None:
    p = pod(init=("setup",))
    st = status(p, rec(c(RUNNING, init=True, name="setup")))
    assert cond(st, "Initialized") == "False" and st.phase == "Pending"
    assert st.container_statuses[0].state.waiting.reason == "PodInitializing"
    done = status(p, rec(c(EXITED, init=True, name="setup"), c(RUNNING)))
    assert cond(done, "Initialized") == "True" and done.phase == "Running"
    assert done.init_container_statuses[0].state.terminated.reason == "Completed"


def test_transition_times_hold_while_status_holds() -> None:
    p = pod()
    first = status(p, rec(c(RUNNING)), now=100.0)
    p.status.CopyFrom(first)
    second = status(p, rec(c(RUNNING)), now=500.0)
    t1 = next(x for x in first.conditions if x.type == "Ready").last_transition_time
    t2 = next(x for x in second.conditions if x.type == "Ready").last_transition_time
    assert t1 == t2 and second.start_time == first.start_time


def test_ephemeral_containers_have_their_own_statuses_and_never_count_as_ready() -> None:
    p = pod()
    p.spec.ephemeral_containers.add(name="dbg", image="busybox")
    st = status(p, rec(c(ContainerState.RUNNING), c(ContainerState.RUNNING, name="dbg")))
    (eph,) = st.ephemeral_container_statuses
    assert eph.name == "dbg" and eph.state.HasField("running") and not eph.ready
    assert [s.name for s in st.container_statuses] == ["app"]
    ended = status(p, rec(c(ContainerState.RUNNING),
                          c(ContainerState.EXITED, name="dbg", exit_code=3)))
    assert ended.ephemeral_container_statuses[0].state.terminated.exit_code == 3
    assert ended.phase == "Running"
