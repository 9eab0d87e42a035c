"""Taints and tolerations as the node lifecycle and DaemonSet controllers read them (pure).

Kubernetes' rules (``ToleratesTaint``):

    effect      a toleration with no effect matches every effect
    key         an empty key with operator Exists matches every key
    operator    Exists: any value; Equal (or unset): the values are equal

The taints the node lifecycle controller puts on nodes, by condition:

    Ready=False   node.kubernetes.io/not-ready     NoSchedule + NoExecute
    Ready=Unknown node.kubernetes.io/unreachable   NoSchedule + NoExecute
    unschedulable node.kubernetes.io/unschedulable NoSchedule
    *Pressure     node.kubernetes.io/{memory,disk,pid}-pressure NoSchedule
"""

from __future__ import annotations

from collections.abc import Iterable

from shoal.api.core.v1 import core_pb2

NOT_READY = "node.kubernetes.io/not-ready"
UNREACHABLE = "node.kubernetes.io/unreachable"
UNSCHEDULABLE = "node.kubernetes.io/unschedulable"
MEMORY_PRESSURE = "node.kubernetes.io/memory-pressure"
DISK_PRESSURE = "node.kubernetes.io/disk-pressure"
PID_PRESSURE = "node.kubernetes.io/pid-pressure"
NETWORK_UNAVAILABLE = "node.kubernetes.io/network-unavailable"

NO_SCHEDULE = "NoSchedule"
PREFER_NO_SCHEDULE = "PreferNoSchedule"
NO_EXECUTE = "NoExecute"

# Taints this controller owns: it adds and removes them; any other taint is the user's.
MANAGED_KEYS = frozenset({NOT_READY, UNREACHABLE, UNSCHEDULABLE, MEMORY_PRESSURE,
                          DISK_PRESSURE, PID_PRESSURE})


def tolerates(toleration: core_pb2.Toleration, taint: core_pb2.Taint) -> bool:
    if toleration.effect and toleration.effect != taint.effect:
        return False
    if toleration.operator == "Exists":
        return not toleration.key or toleration.key == taint.key
    return toleration.key == taint.key and toleration.value == taint.value


def tolerated(taint: core_pb2.Taint, tolerations: Iterable[core_pb2.Toleration]) -> bool:
    return any(tolerates(t, taint) for t in tolerations)


def untolerated(taints: Iterable[core_pb2.Taint], tolerations: Iterable[core_pb2.Toleration],
                *, effects: frozenset[str] = frozenset({NO_SCHEDULE, NO_EXECUTE})
                ) -> list[core_pb2.Taint]:
    """The taints among ``effects`` that no toleration matches."""
    tols = list(tolerations)
    return [t for t in taints if t.effect in effects and not tolerated(t, tols)]


def toleration(key: str, effect: str, *, seconds: int | None = None) -> core_pb2.Toleration:
    t = core_pb2.Toleration(key=key, operator="Exists", effect=effect)
    if seconds is not None:
        t.toleration_seconds = seconds
    return t


def daemon_tolerations() -> list[core_pb2.Toleration]:
    """What the DaemonSet controller adds to every daemon pod, as Kubernetes does:
    a daemon keeps running on a node that is unhealthy or cordoned."""
    return [
        toleration(NOT_READY, NO_EXECUTE),
        toleration(UNREACHABLE, NO_EXECUTE),
        toleration(DISK_PRESSURE, NO_SCHEDULE),
        toleration(MEMORY_PRESSURE, NO_SCHEDULE),
        toleration(PID_PRESSURE, NO_SCHEDULE),
        toleration(UNSCHEDULABLE, NO_SCHEDULE),
    ]
