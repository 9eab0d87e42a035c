"""The Node object this agent keeps: who the machine is and whether it is Ready.

``gather_facts()`` reads the machine (cores, memory, kernel, OS, IDs);
``node_status(facts, ...)`` builds the Node status from them, a pure function.
``Ready`` is True only when the container runtime answers and says it is ready;
its reason and message say which part is missing when it is not.

Conditions keep their ``lastTransitionTime`` while their status is unchanged,
as Kubernetes does; ``lastHeartbeatTime`` moves on every update.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2

from shoal.api.core.v1 import core_pb2

AGENT_VERSION = "shoal-nodeagent/0.1.0"
DEFAULT_MAX_PODS = 110
AGENT_PORT = 10250
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
         "s390x": "s390x"}


@dataclass(frozen=True)
class NodeFacts:
    cpu_millis: int
    memory_bytes: int
    max_pods: int
    internal_ip: str
    hostname: str
    kernel_version: str
    os_image: str
    architecture: str
    machine_id: str
    boot_id: str
    system_uuid: str
    # Held back from pods (system daemons), as kubelet's --system-reserved.
    agent_port: int = 10250
    reserved_cpu_millis: int = 100
    reserved_memory_bytes: int = 256 * 1024 * 1024


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "Linux"


def _memory_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def gather_facts(*, internal_ip: str, hostname: str, max_pods: int = DEFAULT_MAX_PODS,
                 agent_port: int = AGENT_PORT) -> NodeFacts:
    return NodeFacts(
        cpu_millis=(os.cpu_count() or 1) * 1000,
        memory_bytes=_memory_bytes(),
        max_pods=max_pods,
        internal_ip=internal_ip,
        hostname=hostname,
        kernel_version=platform.release(),
        os_image=_os_image(),
        architecture=_ARCH.get(platform.machine(), platform.machine()),
        machine_id=_read("/etc/machine-id"),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        system_uuid=_read("/sys/class/dmi/id/product_uuid"),
        agent_port=agent_port,
    )


def _cpu(m: int) -> str:
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"


def _mem(b: int) -> str:
    return f"{b // 1024}Ki"


def _set_condition(status: Any, previous: Any, *, type_: str, value: str, reason: str,
                   message: str, now: timestamp_pb2.Timestamp) -> None:
    cond = status.conditions.add()
    cond.type, cond.status, cond.reason, cond.message = type_, value, reason, message
    cond.last_heartbeat_time.CopyFrom(now)
    old = next((c for c in previous.conditions if c.type == type_), None) \
        if previous is not None else None
    if old is not None and old.status == value:
        cond.last_transition_time.CopyFrom(old.last_transition_time)
    else:
        cond.last_transition_time.CopyFrom(now)


def node_status(
    facts: NodeFacts,
    *,
    runtime_version: str,
    runtime_ready: bool,
    runtime_message: str,
    previous: core_pb2.NodeStatus | None,
    now: float,
) -> core_pb2.NodeStatus:
    """The status to post for this node (pure)."""
    ts = timestamp_pb2.Timestamp(seconds=int(now))
    st = core_pb2.NodeStatus()
    st.capacity["cpu"].value = _cpu(facts.cpu_millis)
    st.capacity["memory"].value = _mem(facts.memory_bytes)
    st.capacity["pods"].value = str(facts.max_pods)
    st.allocatable["cpu"].value = _cpu(max(0, facts.cpu_millis - facts.reserved_cpu_millis))
    st.allocatable["memory"].value = _mem(
        max(0, facts.memory_bytes - facts.reserved_memory_bytes))
    st.allocatable["pods"].value = str(facts.max_pods)
    if facts.internal_ip:
        st.addresses.add(type="InternalIP", address=facts.internal_ip)
    st.addresses.add(type="Hostname", address=facts.hostname)
    info = st.node_info
    info.machine_id, info.system_uuid, info.boot_id = (facts.machine_id, facts.system_uuid,
                                                       facts.boot_id)
    info.kernel_version, info.os_image = facts.kernel_version, facts.os_image
    info.container_runtime_version = runtime_version
    info.kubelet_version = AGENT_VERSION
    info.operating_system, info.architecture = "linux", facts.architecture
    st.daemon_endpoints.kubelet_endpoint.port = facts.agent_port
    for type_, reason in (("MemoryPressure", "KubeletHasSufficientMemory"),
                          ("DiskPressure", "KubeletHasNoDiskPressure"),
                          ("PIDPressure", "KubeletHasSufficientPID")):
        _set_condition(st, previous, type_=type_, value="False", reason=reason,
                       message="", now=ts)
    if runtime_ready:
        _set_condition(st, previous, type_="Ready", value="True", reason="KubeletReady",
                       message="shoal-nodeagent is posting ready status", now=ts)
    else:
        _set_condition(st, previous, type_="Ready", value="False",
                       reason="KubeletNotReady",
                       message=f"container runtime not ready: {runtime_message}", now=ts)
    return st


def same_except_heartbeat(a: core_pb2.NodeStatus, b: core_pb2.NodeStatus) -> bool:
    """True when only heartbeat times differ (no need to write before the next beat)."""
    def strip(s: core_pb2.NodeStatus) -> bytes:
        c = core_pb2.NodeStatus()
        c.CopyFrom(s)
        for cond in c.conditions:
            cond.ClearField("last_heartbeat_time")
        return bytes(c.SerializeToString(deterministic=True))

    return strip(a) == strip(b)
