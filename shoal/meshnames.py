"""The names the mesh's telemetry gives workloads (Istio's ``destination_workload``)."""

from __future__ import annotations

from collections.abc import Mapping

WORKLOAD_LABELS = ("app.kubernetes.io/name", "app")


def workload_name(labels: Mapping[str, str], name: str) -> str:
    """A workload's name: its ``app.kubernetes.io/name`` or ``app`` label, else
    the object's own name (a pod's or a WorkloadEntry's)."""
    for key in WORKLOAD_LABELS:
        if labels.get(key):
            return str(labels[key])
    return str(name)
