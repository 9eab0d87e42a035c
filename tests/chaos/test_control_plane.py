"""Control-plane faults: SIGKILL of the etcd leader under a stream of writes, and of
the apiserver the clients are using (and of the one holding the controller
Lease, when that is another) during a Deployment rollout."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from apiserver.storage import etcdadmin
from shoal import config as configmod
from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer
from shoal.testing.waiting import wait_for

from .conftest import IMAGE, LONG, ChaosLab, record

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

WRITES = 60 if LONG else 20  # acknowledged writes before and after the fault


class Writer:
    """Creates ConfigMaps w-00000, w-00001, ... one after the other, each carrying a
    unique id; a failed create is tried again under the same name and id
    (AlreadyExists then means an earlier try was committed: acknowledged)."""

    def __init__(self, lab: ChaosLab, ns: str) -> None:
        self.client = lab.new_client()
        self.ns = ns
        self.acked: list[tuple[str, str]] = []  # (name, id)
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        wid = uuid.uuid4().hex
        while not self.stop.is_set():
            name = f"w-{i:05d}"
            cm = core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name=name, namespace=self.ns),
                                    data={"id": wid})
            try:
                self.client.create(cm)
            except errors.AlreadyExists:
                pass
            except errors.ShoalError:
                self.failed += 1
                time.sleep(0.1)
                continue
            self.acked.append((name, wid))
            i += 1
            wid = uuid.uuid4().hex

    def wait_more(self, count: int, *, timeout: float = 60.0) -> float:
        """Until ``count`` more writes are acknowledged; the seconds until the first."""
        start, first = len(self.acked), None
        t0 = time.monotonic()
        while len(self.acked) < start + count:
            if first is None and len(self.acked) > start:
                first = time.monotonic() - t0
            assert time.monotonic() < t0 + timeout, (
                f"only {len(self.acked) - start} of {count} writes in {timeout:g}s "
                f"({self.failed} failed)")
            time.sleep(0.02)
        return first if first is not None else time.monotonic() - t0


def _etcd_process(lab: ChaosLab, endpoint: str) -> str:
    for i, cp in enumerate(lab.members(), start=1):
        if cp.etcd_endpoint == endpoint:
            return "etcd" if i == 1 else f"etcd/cp-{i}"
    raise AssertionError(f"no member has etcd {endpoint}")


def _etcd_report(lab: ChaosLab) -> list[etcdadmin.MemberReport]:
    return asyncio.run(etcdadmin.cluster_report(lab.members()[0].all_etcd_servers))


def test_killing_the_etcd_leader_loses_and_duplicates_no_acknowledged_write(
        chaos_lab: ChaosLab, namespace: str) -> None:
    ns = "chaos-writes"
    chaos_lab.client.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=ns)))
    rv = chaos_lab.client.list(core_pb2.ConfigMap, namespace=ns).resource_version
    seen: list[tuple[str, str, int]] = []
    ended: list[BaseException] = []
    watch_client = chaos_lab.new_client()

    def watch() -> None:
        try:
            for ev in watch_client.watch(core_pb2.ConfigMap, namespace=ns, resource_version=rv):
                assert ev.object is not None
                seen.append((ev.type, ev.object.metadata.name, int(ev.resource_version)))
        except BaseException as e:  # closed at the end of the test
            ended.append(e)

    threading.Thread(target=watch, daemon=True).start()
    writer = Writer(chaos_lab, ns)
    writer.thread.start()
    try:
        writer.wait_more(WRITES)
        leader = next(r for r in _etcd_report(chaos_lab) if r.status and r.status.is_leader)
        name = _etcd_process(chaos_lab, leader.endpoint)
        os.kill(chaos_lab.pids()[name], signal.SIGKILL)
        recovered = writer.wait_more(WRITES)
        failed = writer.failed
    finally:
        writer.stop.set()
        writer.thread.join(timeout=30)
        writer.client.close()

    stored = chaos_lab.client.list(core_pb2.ConfigMap, namespace=ns).items
    ids = Counter(o.data["id"] for o in stored)
    acked_ids = {wid for _, wid in writer.acked}
    missing = acked_ids - set(ids)
    duplicated = [i for i, n in ids.items() if n > 1]
    assert not missing, f"acknowledged writes lost: {sorted(missing)[:5]}"
    assert not duplicated, f"writes stored twice: {duplicated[:5]}"
    # At most the one in flight when the writer stopped is stored unacknowledged.
    assert len(set(ids) - acked_ids) <= 1
    names = {name for name, _ in writer.acked}
    try:
        wait_for("the watcher saw every acknowledged write",
                 lambda: names <= {n for t, n, _ in seen if t == "ADDED"}, timeout=30)
    except AssertionError:
        unseen = sorted(names - {n for t, n, _ in seen if t == "ADDED"})
        raise AssertionError(f"the watcher missed {len(unseen)} writes ({unseen[:3]}...; "
                             f"saw {len(seen)} events, last {seen[-1:]}); its watch ended "
                             f"with {ended!r}") from None
    finally:
        watch_client.close()
    added = [n for t, n, _ in seen if t == "ADDED"]
    revisions = [r for _, _, r in seen]
    assert len(added) == len(set(added)), "the watcher saw a write twice"
    assert revisions == sorted(revisions), "the watcher's events are out of order"
    record("etcd_leader_kill", killed=name, acknowledged=len(writer.acked),
           stored=sum(ids.values()), first_write_after_kill_s=round(recovered, 2),
           requests_failed=failed, lost=len(missing), duplicated=len(duplicated),
           events_lost=len(names - set(added)))


# -- the apiserver the clients use dies during a rollout ----------------------------


class DeploymentWatcher:
    """An SDK informer (its client fails over between apiservers) on one Deployment,
    in a thread of its own: the (resourceVersion, generation) of each version it
    was handed."""

    def __init__(self, lab: ChaosLab, ns: str, name: str) -> None:
        self.config = configmod.load(lab.config)
        self.ns, self.name = ns, name
        self.seen: list[tuple[int, int]] = []
        self.last: apps_pb2.Deployment | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.task: Any = None

    def _saw(self, d: apps_pb2.Deployment) -> None:
        if d.metadata.name == self.name:
            self.seen.append((int(d.metadata.resource_version), int(d.metadata.generation)))
            self.last = d

    async def _run(self) -> None:
        async with AsyncClient(self.config, timeout=10.0) as client:
            informer = Informer(client, apps_pb2.Deployment, namespace=self.ns)
            informer.add_handlers(on_add=self._saw, on_update=lambda _old, new: self._saw(new))
            await informer.run()

    def start(self) -> None:
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)

    def stop(self) -> None:
        self.task.cancel()
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _lease_holder(lab: ChaosLab) -> str:
    """The controller Lease's holder identity (LeaderElector: host_pid_id)."""
    return str(lab.client.get(coordination_pb2.Lease, "shoal-controller-manager",
                              namespace="kube-system").spec.holder_identity)


def _deployment(ns: str, name: str, replicas: int) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, ns
    d.spec.replicas = replicas
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    d.spec.template.spec.termination_grace_period_seconds = 1
    d.spec.template.spec.containers.add(name="main", image=IMAGE, command=["sleep", "3600"])
    return d


def _rolled_out(lab: ChaosLab, ns: str, name: str, generation: int) -> bool:
    d = lab.client.get(apps_pb2.Deployment, name, namespace=ns)
    s = d.status
    return (d.metadata.generation == generation and s.observed_generation == generation
            and s.updated_replicas == d.spec.replicas == s.available_replicas == s.replicas)


def test_killing_the_apiserver_in_use_during_a_rollout(chaos_lab: ChaosLab,
                                                       namespace: str) -> None:
    ns, name, replicas = namespace, "roll", 4
    chaos_lab.client.create(_deployment(ns, name, replicas))
    wait_for("the first rollout", lambda: _rolled_out(chaos_lab, ns, name, 1), timeout=120)
    watcher = DeploymentWatcher(chaos_lab, ns, name)
    watcher.start()
    try:
        wait_for("the informer synced", lambda: watcher.last is not None, timeout=30)
        # The clients (CLI, agents, SDK) all start on the first apiserver listed.
        first = configmod.load(chaos_lab.config).servers[0]
        index = next(i for i, cp in enumerate(chaos_lab.members(), start=1)
                     if cp.api_server == first)
        apiserver = "apiserver" if index == 1 else f"apiserver/cp-{index}"
        holder = _lease_holder(chaos_lab)
        pids = chaos_lab.pids()
        # The one holding the controller Lease (runs the Deployment controller) dies
        # too, if it is another: the rollout must survive both.
        leader = next(n for n, pid in pids.items()
                      if n.startswith("apiserver") and holder.split("_")[1] == str(pid))
        killed = list(dict.fromkeys([apiserver, leader]))
        # A new template (generation 2): the rollout starts; the apiserver dies.
        d = chaos_lab.client.get(apps_pb2.Deployment, name, namespace=ns)
        d.spec.template.metadata.annotations["chaos/round"] = "2"
        chaos_lab.client.update(d)
        for victim in killed:
            os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        # A second change during the outage, through a fresh client (fails over).
        with chaos_lab.new_client() as c:
            def bump() -> bool:
                try:
                    d = c.get(apps_pb2.Deployment, name, namespace=ns)
                    d.spec.template.metadata.annotations["chaos/round"] = "3"
                    c.update(d)
                except errors.Conflict:
                    return False
                return True
            wait_for("the second change accepted", bump, timeout=30)
            write_s = time.monotonic() - t0
        done = chaos_lab.shoal("rollout", "status", f"deployment/{name}", "-n", ns,
                               "--timeout", "120s", timeout=150)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for("the rollout of generation 3 complete",
                 lambda: _rolled_out(chaos_lab, ns, name, 3), timeout=60)
        rollout_s = time.monotonic() - t0
        lease_moved = _lease_holder(chaos_lab) != holder
        final = chaos_lab.client.get(apps_pb2.Deployment, name, namespace=ns)
        wait_for("the informer holds the final version", lambda: watcher.last is not None and (
            watcher.last.metadata.resource_version == final.metadata.resource_version),
            timeout=30)
    finally:
        watcher.stop()
    rvs = [rv for rv, _ in watcher.seen]
    gens = [g for _, g in watcher.seen]
    assert all(a < b for a, b in itertools.pairwise(rvs)), \
        f"resourceVersions not strictly increasing: {rvs}"
    distinct = sorted(set(gens))
    assert gens == sorted(gens) and distinct == list(range(distinct[0], 4)), \
        f"generations seen out of order or with a gap: {gens}"
    # The old ReplicaSets are scaled to 0; every pod runs the last template.
    sets = chaos_lab.client.list(apps_pb2.ReplicaSet, namespace=ns).items
    assert sum(rs.spec.replicas for rs in sets) == replicas
    assert sum(1 for rs in sets if rs.spec.replicas) == 1
    assert lease_moved, "the controller Lease is still held by the killed apiserver"
    record("apiserver_kill_rollout", killed=killed, lease_moved=lease_moved,
           first_write_after_kill_s=round(write_s, 2),
           rollout_complete_after_kill_s=round(rollout_s, 1),
           versions_seen=len(rvs), generations_seen=distinct, events_lost=0)
