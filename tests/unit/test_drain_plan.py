"""shoal drain's pod filters (kubectl's): evict, skip with a warning, or refuse."""

from __future__ import annotations

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.cli.nodes import DAEMONSET, LOCAL_STORAGE, NO_CONTROLLER, DrainOptions, plan_drain


def pod(name: str, *, owner: str = "ReplicaSet", phase: str = "Running",
        empty_dir: bool = False) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.namespace, p.metadata.name = "ns", name
    if owner:
        p.metadata.owner_references.add(kind=owner, name="o", uid="u", controller=True)
    p.status.phase = phase
    if empty_dir:
        p.spec.volumes.add(name="scratch").empty_dir.SetInParent()
    return p


PODS = [pod("rs"), pod("bare", owner=""), pod("ds", owner="DaemonSet"),
        pod("scratch", empty_dir=True), pod("done", owner="", phase="Succeeded")]


@pytest.mark.parametrize(("name", "options", "evict", "refusals", "warnings"), [
    ("defaults refuse three kinds", DrainOptions(), ["done", "rs"],
     [f"{DAEMONSET}: ns/ds", f"{LOCAL_STORAGE}: ns/scratch", f"{NO_CONTROLLER}: ns/bare"],
     []),
    ("every flag", DrainOptions(force=True, ignore_daemonsets=True, delete_emptydir_data=True),
     ["bare", "done", "rs", "scratch"], [],
     ["ignoring DaemonSet-managed Pods: ns/ds", "deleting Pods that declare no controller: "
      "ns/bare", "deleting Pods with local storage: ns/scratch"]),
    ("--force alone still refuses daemon pods and emptyDir", DrainOptions(force=True),
     ["bare", "done", "rs"], [f"{DAEMONSET}: ns/ds", f"{LOCAL_STORAGE}: ns/scratch"],
     ["deleting Pods that declare no controller: ns/bare"]),
])
def test_plan_drain(name: str, options: DrainOptions, evict: list[str], refusals: list[str],
                    warnings: list[str]) -> None:
    got = plan_drain(PODS, options)
    assert sorted(p.metadata.name for p in got.evict) == evict, name
    assert sorted(got.refusals) == sorted(refusals), name
    assert sorted(got.warnings) == sorted(warnings), name


def test_an_empty_node_drains_at_once() -> None:
    got = plan_drain([], DrainOptions())
    assert got.evict == () and got.refusals == () and got.warnings == ()
