"""A worker partitioned from the control plane past the eviction timeout, then
healed: a StatefulSet's pod never runs twice (StatefulSet at-most-one).

Runs last (it evicts the partitioned node's other pods). ``shoal lab partition
NODE control-plane`` drops, in the node's netns, its traffic to and from every
control-plane member. The node goes NotReady after the grace period and its
pods are evicted ``--pod-eviction-timeout`` later: a Deployment's pods are
released at once and recreated elsewhere, but the StatefulSet's ``db-0`` stays
Terminating on the cut-off node (its agent cannot confirm it stopped), so no
second ``db-0`` starts. After ``heal`` the agent stops it, the deletion
completes, and the StatefulSet makes ``db-0`` again.

The invariant is checked on the machine, not only in the API: the container
runs ``sleep 7777``, and a thread counts such processes (every node's
containers are processes of this machine) every 0.1 s: never more than one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for

from .conftest import (
    IMAGE,
    NODE_MONITOR_GRACE,
    NS,
    POD_EVICTION_TIMEOUT,
    ChaosLab,
    cli,
    record,
    running,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

MARKER = [b"sleep", b"7777"]
HOLD = 8.0  # how long past the eviction the partition is kept


def _instances() -> int:
    n = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        n += argv[:2] == MARKER
    return n


class Counter:
    def __init__(self) -> None:
        self.most = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.most = max(self.most, _instances())
            self.samples += 1
            time.sleep(0.1)


def _statefulset() -> apps_pb2.StatefulSet:
    s = apps_pb2.StatefulSet()
    s.metadata.name, s.metadata.namespace = "db", NS
    s.spec.replicas = 1
    s.spec.service_name = "db"
    s.spec.selector.match_labels["app"] = "db"
    s.spec.template.metadata.labels["app"] = "db"
    s.spec.template.spec.termination_grace_period_seconds = 1
    s.spec.template.spec.containers.add(name="main", image=IMAGE, command=["sleep", "7777"])
    return s


def _ready(lab: ChaosLab, node: str) -> bool:
    n = lab.client.get(core_pb2.Node, node)
    return any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)


def test_a_partitioned_statefulset_pod_never_runs_twice(chaos_lab: ChaosLab,
                                                        namespace: str) -> None:
    chaos_lab.client.create(_statefulset())
    first = wait_for("db-0 running", lambda: running(chaos_lab, "db-0"), timeout=60)
    node = first.spec.node_name
    assert _instances() == 1
    counter = Counter()
    counter.thread.start()
    lab = ["--dir", str(chaos_lab.dir)]
    cut = cli("lab", "partition", node, "control-plane", *lab)
    assert cut.returncode == 0, cut.stdout + cut.stderr
    t0 = time.monotonic()
    try:
        wait_for(f"{node} NotReady", lambda: not _ready(chaos_lab, node),
                 timeout=NODE_MONITOR_GRACE + 30)
        not_ready = time.monotonic() - t0
        evicted = wait_for("db-0 evicted (Terminating)", lambda: (
            p := chaos_lab.client.get(core_pb2.Pod, "db-0", namespace=NS)
        ).metadata.HasField("deletion_timestamp") and p, timeout=POD_EVICTION_TIMEOUT + 30)
        evicted_s = time.monotonic() - t0
        assert evicted.metadata.uid == first.metadata.uid
        # Held past the eviction: db-0 is still the old pod, on the cut-off node,
        # and still running there (its agent cannot be told to stop it).
        end = time.monotonic() + HOLD
        while time.monotonic() < end:
            p = chaos_lab.client.get(core_pb2.Pod, "db-0", namespace=NS)
            assert p.metadata.uid == first.metadata.uid and p.spec.node_name == node, p
            time.sleep(0.5)
        assert _instances() == 1
    finally:
        healed = cli("lab", "heal", *lab)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    healed_at = time.monotonic()
    try:
        again = wait_for("a new db-0 running", lambda: (
            p := running(chaos_lab, "db-0")) and p.metadata.uid != first.metadata.uid and p,
            timeout=90)
        back_s = time.monotonic() - healed_at
        wait_for(f"{node} Ready again", lambda: _ready(chaos_lab, node), timeout=60)
        wait_for("one db-0 process", lambda: _instances() == 1, timeout=30)
    finally:
        counter.stop.set()
        counter.thread.join(timeout=5)
    assert counter.most == 1, f"{counter.most} db-0 processes at once"
    record("partition_statefulset", node=node, partitioned_s=round(healed_at - t0, 1),
           not_ready_after_s=round(not_ready, 1), evicted_after_s=round(evicted_s, 1),
           new_db0_after_heal_s=round(back_s, 1), new_db0_node=again.spec.node_name,
           most_db0_at_once=counter.most, samples=counter.samples)
