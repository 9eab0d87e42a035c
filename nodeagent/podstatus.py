"""A pod's status from what the runtime holds: pure, so it can tell the truth.

Inputs: the pod, its :class:`PodRecord`, the prober's view, the planner's
waiting reasons (``CrashLoopBackOff``), and errors the worker met while
acting (``ErrImagePull``, ``ImagePullBackOff``, ``CreateContainerConfigError``,
``RunContainerError``), each per container name.

Phase (Kubernetes' meaning):
    Pending    the sandbox or some container has not started yet
    Running    every container has started at least once and one runs or restarts
    Succeeded  every container ended with 0 and none will restart
    Failed     every container ended, one failed, and none will restart

Conditions: PodScheduled, Initialized, ContainersReady, Ready. A condition's
``lastTransitionTime`` moves only when its status changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from nodeagent.planning import as_container
from nodeagent.runtimestate import ContainerRecord, ContainerState, PodRecord, ProbeView
from shoal.api.core.v1 import core_pb2

Reason = tuple[str, str]  # (reason, message)


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds))


def _terminated(state: Any, c: ContainerRecord) -> None:
    t = state.terminated
    t.exit_code = c.exit_code
    t.reason = c.reason or ("Completed" if c.exit_code == 0 else "Error")
    if c.message:
        t.message = c.message
    if c.started_at:
        t.started_at.CopyFrom(_ts(c.started_at))
    if c.finished_at:
        t.finished_at.CopyFrom(_ts(c.finished_at))
    t.container_id = f"containerd://{c.id}"


def container_status(spec: Any, c: ContainerRecord | None, *, previous: ContainerRecord | None,
                     waiting: Reason | None, probes: ProbeView, init: bool,
                     pending_reason: str) -> core_pb2.ContainerStatus:
    st = core_pb2.ContainerStatus(name=spec.name, image=spec.image)
    if c is not None:
        st.container_id = f"containerd://{c.id}"
        st.image_id = c.image_ref
        st.restart_count = c.restart_count
    if waiting is not None:
        st.state.waiting.reason, st.state.waiting.message = waiting
        if c is not None and c.state is ContainerState.EXITED:
            _terminated(st.last_state, c)
        elif previous is not None:
            _terminated(st.last_state, previous)
    elif c is None or c.state is ContainerState.CREATED:
        st.state.waiting.reason = pending_reason
    elif c.state is ContainerState.RUNNING:
        st.state.running.started_at.CopyFrom(_ts(c.started_at))
        if previous is not None:
            _terminated(st.last_state, previous)
    elif c.state is ContainerState.EXITED:
        _terminated(st.state, c)
        if previous is not None:
            _terminated(st.last_state, previous)
    else:
        st.state.waiting.reason = "ContainerStatusUnknown"
    running = c is not None and c.state is ContainerState.RUNNING and waiting is None
    if not init:
        has_startup = spec.HasField("startup_probe")
        started = running and (not has_startup or probes.started.get(spec.name, False))
        st.started = started
        has_readiness = spec.HasField("readiness_probe")
        st.ready = started and (probes.ready.get(spec.name, False) if has_readiness else True)
    else:
        st.ready = c is not None and c.state is ContainerState.EXITED and c.exit_code == 0
    return st


def _previous_instance(record: PodRecord, name: str, *, init: bool,
                       latest: ContainerRecord | None) -> ContainerRecord | None:
    older = [c for c in record.containers
             if c.name == name and c.init == init and latest is not None and c.id != latest.id
             and c.state is ContainerState.EXITED]
    return max(older, key=lambda c: (c.attempt, c.created_at)) if older else None


def _condition(status: Any, previous: Any, type_: str, value: bool, *, now: float,
               reason: str = "", message: str = "") -> None:
    cond = status.conditions.add(type=type_, status="True" if value else "False")
    if reason:
        cond.reason = reason
    if message:
        cond.message = message
    old = next((c for c in previous.conditions if c.type == type_), None)
    if old is not None and old.status == cond.status and old.HasField("last_transition_time"):
        cond.last_transition_time.CopyFrom(old.last_transition_time)
    else:
        cond.last_transition_time.CopyFrom(_ts(now))


def pod_status(
    pod: Any,
    record: PodRecord,
    *,
    probes: ProbeView,
    waiting: Mapping[str, Reason],
    failures: Mapping[str, Reason],
    finished: bool,
    failed: bool,
    host_ip: str,
    now: float,
) -> core_pb2.PodStatus:
    """The status to report for ``pod`` (pure). See the module docstring."""
    prev = pod.status
    st = core_pb2.PodStatus()
    st.qos_class = prev.qos_class
    st.host_ip = host_ip
    if host_ip:
        st.host_ips.add(ip=host_ip)
    sandbox = record.sandbox
    if sandbox is not None and sandbox.ready and sandbox.ip:
        st.pod_ip = sandbox.ip
        st.pod_ips.add(ip=sandbox.ip)
    elif finished and prev.pod_ip:
        st.pod_ip = prev.pod_ip
        st.pod_ips.extend(prev.pod_ips)
    st.start_time.CopyFrom(prev.start_time if prev.HasField("start_time") else _ts(now))

    init_done = True
    for spec in pod.spec.init_containers:
        c = record.latest(spec.name, init=True)
        reason = failures.get(spec.name) or waiting.get(spec.name)
        st.init_container_statuses.append(container_status(
            spec, c, previous=_previous_instance(record, spec.name, init=True, latest=c),
            waiting=reason, probes=probes, init=True, pending_reason="PodInitializing"))
        if c is None or c.state is not ContainerState.EXITED or c.exit_code != 0:
            init_done = False
    pending_reason = "ContainerCreating" if init_done else "PodInitializing"
    all_started = init_done
    any_running = False
    exits: list[int] = []
    for spec in pod.spec.containers:
        c = record.latest(spec.name, init=False)
        reason = failures.get(spec.name) or waiting.get(spec.name)
        cs = container_status(
            spec, c, previous=_previous_instance(record, spec.name, init=False, latest=c),
            waiting=reason, probes=probes, init=False, pending_reason=pending_reason)
        st.container_statuses.append(cs)
        if c is None or c.state is ContainerState.CREATED:
            all_started = False
        elif c.state is ContainerState.RUNNING:
            any_running = True
        elif c.state is ContainerState.EXITED:
            exits.append(c.exit_code)
    for eph in pod.spec.ephemeral_containers:  # never ready, never restarted
        e = record.latest(eph.name, init=False)
        es = container_status(as_container(eph), e, previous=None,
                              waiting=failures.get(eph.name) or waiting.get(eph.name),
                              probes=probes, init=False, pending_reason="ContainerCreating")
        es.ready = False
        st.ephemeral_container_statuses.append(es)
    if finished and not any_running and len(exits) == len(pod.spec.containers) and exits:
        st.phase = "Failed" if failed else "Succeeded"
    elif finished and failed:
        st.phase = "Failed"
    elif all_started and pod.spec.containers and (any_running or exits):
        st.phase = "Running"
    else:
        st.phase = "Pending"

    ready_all = bool(st.container_statuses) and all(c.ready for c in st.container_statuses)
    _condition(st, prev, "PodScheduled", True, now=now)
    _condition(st, prev, "Initialized", init_done, now=now,
               reason="" if init_done else "ContainersNotInitialized",
               message="" if init_done else "containers with incomplete status: [" +
               " ".join(s.name for s in st.init_container_statuses if not s.ready) + "]")
    not_ready = [c.name for c in st.container_statuses if not c.ready]
    msg = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready else ""
    if st.phase in ("Succeeded", "Failed"):
        ready_all, msg = False, ""
        why = "PodCompleted"
    else:
        why = "" if ready_all else "ContainersNotReady"
    _condition(st, prev, "ContainersReady", ready_all, now=now, reason=why, message=msg)
    _condition(st, prev, "Ready", ready_all, now=now, reason=why, message=msg)
    return st


def same_status(a: core_pb2.PodStatus, b: core_pb2.PodStatus) -> bool:
    return bool(a.SerializeToString(deterministic=True) ==
                b.SerializeToString(deterministic=True))
