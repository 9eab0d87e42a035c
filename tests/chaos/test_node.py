"""Node faults: SIGKILL of a node's agents under traffic through the mesh, a
containerd restart under its node agent, a full emptyDir."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing import podnet
from shoal.testing.waiting import wait_for

from .conftest import (
    ECHO_PORT,
    LONG,
    NS,
    ChaosLab,
    Workloads,
    parse_traffic,
    pod,
    record,
    running,
    start_traffic,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

ROUNDS = 3 if LONG else 1
# Requests (one new connection every 0.1 s) that may fail while the agents are down:
# the supervisor restarts a dead daemon after 1 s or less, and a restarted meshagent
# restores capture and traffic within 2 s (tests/e2e/test_orch_mesh.py).
MAX_FAILED_PER_ROUND = 50
CALM_AFTER = 5.0  # traffic must keep working this long after recovery


def _containers(lab: ChaosLab, node: str) -> dict[str, list[tuple[str, int]]]:
    """Every pod on ``node``: its containers' (id, restartCount)."""
    pods = lab.client.list(core_pb2.Pod, all_namespaces=True,
                           field_selector=f"spec.nodeName={node}").items
    return {f"{p.metadata.namespace}/{p.metadata.name}":
            sorted((s.container_id, s.restart_count) for s in p.status.container_statuses)
            for p in pods if p.status.phase == "Running"}


def _ready(lab: ChaosLab, node: str) -> bool:
    n = lab.client.get(core_pb2.Node, node)
    return any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)


def _restarted(lab: ChaosLab, before: dict[str, int], names: list[str]) -> bool:
    now = lab.pids()
    return all(now.get(n, before[n]) != before[n] for n in names)


def test_killing_a_nodes_agents_in_random_order_under_traffic(
        chaos_lab: ChaosLab, workloads: Workloads) -> None:
    node = "node-1"  # the client's node: its meshagent captures the outbound traffic
    names = [f"nodeagent/{node}", f"meshagent/{node}"]
    containers = _containers(chaos_lab, node)
    assert f"{NS}/client" in containers
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rounds = []
    for _ in range(ROUNDS):
        order = rng.sample(names, 2)
        gap = round(rng.uniform(0.0, 1.0), 2)
        traffic = start_traffic(workloads, seconds=3 + 25)
        time.sleep(3)
        before = chaos_lab.pids()
        killed_at = time.monotonic()
        os.kill(before[order[0]], signal.SIGKILL)
        time.sleep(gap)
        os.kill(before[order[1]], signal.SIGKILL)
        wait_for("the supervisor restarts both agents",
                 lambda b=before: _restarted(chaos_lab, b, names), timeout=30)
        wait_for(f"{node} Ready", lambda: _ready(chaos_lab, node), timeout=30)
        out, _ = traffic.communicate(timeout=60)
        reqs = parse_traffic(out)
        failed = [r for r in reqs if not r.ok]
        last_failure = max((r.at for r in failed), default=killed_at)
        after = [r for r in reqs if r.at > last_failure]
        assert after, f"no request worked after the kills: {failed[-3:]}"
        recovered = after[0].at - killed_at
        calm = reqs[-1].at - after[0].at
        rounds.append({"order": order, "gap_s": gap, "requests": len(reqs),
                       "failed": len(failed), "recovered_s": round(recovered, 2),
                       "ok_after_recovery_s": round(calm, 1)})
        assert len(failed) <= MAX_FAILED_PER_ROUND, rounds[-1]
        # Recovered, and then nothing failed for the rest of the run.
        assert calm >= CALM_AFTER, rounds[-1]
    after_containers = _containers(chaos_lab, node)
    assert after_containers == containers, "a running container was restarted or replaced"
    record("agents_kill_under_traffic", node=node, seed=seed, rounds=rounds,
           containers_restarted=0, requests_failed=sum(r["failed"] for r in rounds))


def _containerd_pid(lab: ChaosLab, node: str) -> int:
    pidfile = lab.node(node).containerd_dir / "state" / "shoal-containerd.pid"
    return int(pidfile.read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_restarting_containerd_under_the_node_agent(chaos_lab: ChaosLab,
                                                    workloads: Workloads) -> None:
    node = "node-2"
    containers = _containers(chaos_lab, node)
    assert f"{NS}/web" in containers
    old = _containerd_pid(chaos_lab, node)
    os.kill(old, signal.SIGTERM)  # the node agent starts it again (its own containerd)
    t0 = time.monotonic()
    wait_for("containerd stopped", lambda: not _alive(old), timeout=30)
    new = wait_for("the node agent started containerd again", lambda: (
        (pid := _containerd_pid(chaos_lab, node)) != old and _alive(pid) and pid), timeout=30)
    back = time.monotonic() - t0
    wait_for(f"{node} Ready", lambda: _ready(chaos_lab, node), timeout=30)
    chaos_lab.client.create(pod("after-containerd", node, ["sleep", "3600"]))
    wait_for("a new pod runs on the node", lambda: running(chaos_lab, "after-containerd"),
             timeout=60)
    new_pod_s = time.monotonic() - t0
    now = _containers(chaos_lab, node)
    del now[f"{NS}/after-containerd"]
    assert now == containers, "a running container was restarted or replaced"
    assert _ready(chaos_lab, node)
    record("containerd_restart", node=node, old_pid=old, new_pid=new,
           containerd_back_s=round(back, 2), new_pod_running_s=round(new_pod_s, 1),
           containers_restarted=0)
    chaos_lab.client.delete(core_pb2.Pod, "after-containerd", namespace=NS)


def _memory_emptydir_pod(name: str, node: str, size: str) -> core_pb2.Pod:
    p = pod(name, node, ["sleep", "3600"])
    vol = p.spec.volumes.add(name="data")
    vol.empty_dir.medium = "Memory"
    vol.empty_dir.size_limit.value = size
    p.spec.containers[0].volume_mounts.add(name="data", mount_path="/data")
    return p


def test_a_full_emptydir_leaves_the_other_pods_alone(chaos_lab: ChaosLab,
                                                     workloads: Workloads) -> None:
    """Shoal bounds an emptyDir by its ``sizeLimit`` only for ``medium: Memory`` (a
    tmpfs of that size): a writer gets ENOSPC there. It does not evict a pod over a
    disk emptyDir's sizeLimit as the kubelet does (not implemented)."""
    node = "node-1"
    chaos_lab.client.create(_memory_emptydir_pod("filler", node, "16Mi"))
    chaos_lab.client.create(_memory_emptydir_pod("neighbour", node, "16Mi"))
    for name in ("filler", "neighbour"):
        wait_for(f"{name} running", lambda n=name: running(chaos_lab, n), timeout=60)
    containers = _containers(chaos_lab, node)
    fill = chaos_lab.shoal("exec", "filler", "-n", NS, "--", "dd", "if=/dev/zero",
                           "of=/data/fill", "bs=1M", "count=64")
    assert fill.returncode != 0 and "No space left on device" in fill.stderr + fill.stdout, \
        fill
    used = chaos_lab.shoal("exec", "filler", "-n", NS, "--", "du", "-m", "/data/fill")
    assert used.returncode == 0 and int(used.stdout.split()[0]) <= 16, used
    # The neighbour's own emptyDir still takes writes; nothing was restarted or evicted.
    write = chaos_lab.shoal("exec", "neighbour", "-n", NS, "--", "sh", "-c",
                            "dd if=/dev/zero of=/data/f bs=1M count=8 && echo written")
    assert write.returncode == 0 and "written" in write.stdout, write
    # Traffic from the node's other pod still works.
    reply = podnet.in_netns(workloads.client_netns, podnet.REQUEST, workloads.web_ip,
                            str(ECHO_PORT), "x")
    assert reply.stdout.startswith("OK x"), reply
    assert _containers(chaos_lab, node) == containers
    assert running(chaos_lab, "filler") is not None  # not evicted (Shoal has no such eviction)
    record("emptydir_full", node=node, size_limit="16Mi", filler_used_mb=int(
        used.stdout.split()[0]), others_affected=0)
    for name in ("filler", "neighbour"):
        chaos_lab.client.delete(core_pb2.Pod, name, namespace=NS)
