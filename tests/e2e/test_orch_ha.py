"""The HA control plane on a lab of its own: ``shoal lab up --control-planes 3``.

Three etcd members (one cluster) and three apiservers, each on its own bridge
address, one node (kept small: this lab is brought up for this module alone,
before the shared 3-node lab). The faults are real: SIGKILL of the etcd leader
and of the apiserver holding the controller Lease, by the PIDs the lab state
records, during a stream of writes through the SDK. Afterwards every
acknowledged write is stored exactly once, a watcher saw each exactly once
and in order, the Lease moved to another apiserver, and a Deployment rolls out.

The figures measured are printed (pytest -s) and appended to
$SHOAL_E2E_FIGURES if set (docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from apiserver.storage import etcdadmin
from shoal import bootstrap, errors
from shoal import config as configmod
from shoal.api.apps.v1 import apps_pb2
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.client import Client
from shoal.testing.cli import shoal_process
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.own_lab]

NS = "ha-e2e"
IMAGE = "docker.io/library/busybox:1.36"
LEASE_NAME, LEASE_NS = "shoal-controller-manager", "kube-system"
LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 6.0, 4.0, 1.0
WRITES_BETWEEN_FAULTS = 15


def _cli(*args: str, config: Path | None = None, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    return shoal_process(*args, config=config, timeout=timeout)


@dataclass
class HALab:
    dir: Path
    config: Path
    figures: dict[str, float] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        state = json.loads((self.dir / "state.json").read_text())
        return {name: int(p["pid"]) for name, p in state["processes"].items()}

    def members(self) -> list[bootstrap.ControlPlane]:
        specs = [self.dir / "bootstrap.yaml",
                 *sorted((self.dir / "control-planes").glob("cp-*/bootstrap.yaml"))]
        out = []
        for path in specs:
            cp = bootstrap.load(path).control_plane
            assert cp is not None
            out.append(cp)
        return out

    def etcd_process(self, endpoint: str) -> str:
        for i, cp in enumerate(self.members(), start=1):
            if cp.etcd_endpoint == endpoint:
                return "etcd" if i == 1 else f"etcd/cp-{i}"
        raise AssertionError(f"no member has etcd {endpoint}")

    def etcd_report(self) -> list[etcdadmin.MemberReport]:
        return asyncio.run(etcdadmin.cluster_report(self.members()[0].all_etcd_servers))

    def lease_holder(self, client: Client) -> tuple[str, str]:
        """The Lease's holder: (identity, the apiserver process holding it)."""
        lease = client.get(coordination_pb2.Lease, LEASE_NAME, namespace=LEASE_NS)
        identity = lease.spec.holder_identity
        pid = int(identity.split("_")[1])  # LeaderElector identity: host_pid_id
        names = [n for n, p in self.pids().items() if p == pid and n.startswith("apiserver")]
        return identity, names[0] if names else f"pid {pid}"

    def client(self, **kw: Any) -> Client:
        return Client(configmod.load(self.config), timeout=10.0, **kw)


@pytest.fixture(scope="module")
def ha_lab(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[HALab]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if subprocess.run(["ip", "link", "show", "shoal0"], capture_output=True,
                      check=False).returncode == 0:
        pytest.skip("a lab is already up on this machine (bridge shoal0 exists)")
    lab_dir = tmp_path_factory.mktemp("ha") / "lab"
    up = _cli("lab", "up", "--nodes", "1", "--control-planes", "3", "--dir", str(lab_dir),
              f"--apiserver-arg=--leader-elect-lease-duration={LEASE_DURATION:g}",
              f"--apiserver-arg=--leader-elect-renew-deadline={RENEW_DEADLINE:g}",
              f"--apiserver-arg=--leader-elect-retry-period={RETRY_PERIOD:g}")
    try:
        assert up.returncode == 0, f"lab up failed:\n{up.stdout}\n{up.stderr}"
        lab = HALab(dir=lab_dir, config=lab_dir / "admin.conf")
        yield lab
        if lab.figures:
            line = json.dumps({"test": "test_orch_ha", **lab.figures})
            print(f"\nHA figures: {line}", file=sys.stderr)
            if os.environ.get("SHOAL_E2E_FIGURES"):
                with open(os.environ["SHOAL_E2E_FIGURES"], "a") as f:
                    f.write(line + "\n")
    finally:
        if request.session.testsfailed and (lab_dir / "logs").is_dir():
            kept = Path(os.environ.get("SHOAL_E2E_LOGS", "/tmp/shoal-e2e-logs")) / (
                "ha-" + time.strftime("%Y%m%dT%H%M%S"))
            shutil.copytree(lab_dir / "logs", kept, dirs_exist_ok=True)
            print(f"\nHA lab logs kept in {kept}", file=sys.stderr)
        _cli("lab", "down", "--purge", "--dir", str(lab_dir))


def test_three_members_serve_and_one_apiserver_leads(ha_lab: HALab) -> None:
    members = ha_lab.members()
    assert len(members) == 3
    report = ha_lab.etcd_report()
    assert all(r.status is not None for r in report), report
    leaders = {r.status.leader_id for r in report if r.status is not None}
    assert len(leaders) == 1 and sum(r.status.is_leader for r in report if r.status) == 1
    # Each apiserver answers on its own address with a certificate valid for it.
    base = configmod.load(ha_lab.config)
    assert set(base.servers) == {cp.api_server for cp in members}
    for cp in members:
        with Client(replace(base, servers=(cp.api_server,)), timeout=10.0) as one:
            one.list(core_pb2.Namespace)
    with ha_lab.client() as c:
        _, holder = ha_lab.lease_holder(c)
    assert holder in {"apiserver", "apiserver/cp-2", "apiserver/cp-3"}
    status = _cli("lab", "status", "--dir", str(ha_lab.dir))
    assert "ETCD MEMBER" in status.stdout and status.stdout.count("127.0.0.1:") >= 3, \
        status.stdout
    # The node (its agent and meshagent read node.conf) knows every apiserver.
    node_conf = configmod.load(ha_lab.dir / "nodes" / "node-1" / "node.conf")
    assert set(node_conf.servers) == set(base.servers)
    # shoal status: every apiserver asked alone, and etcd's members.
    spec = ["--spec", str(ha_lab.dir / "bootstrap.yaml")]
    overview = _cli("status", *spec, config=ha_lab.config)
    assert overview.stdout.count(": serving") == 3, overview.stdout + overview.stderr
    assert overview.stdout.count("127.0.0.1:") >= 3


def test_a_snapshot_of_the_cluster_restores_for_each_member(ha_lab: HALab,
                                                            tmp_path: Path) -> None:
    snapshot = tmp_path / "etcd.db"
    saved = _cli("etcd", "snapshot", "save", str(snapshot), "--spec",
                 str(ha_lab.dir / "bootstrap.yaml"))
    assert saved.returncode == 0, saved.stderr
    assert snapshot.stat().st_size > 0
    second = ha_lab.dir / "control-planes" / "cp-2" / "bootstrap.yaml"
    restored = _cli("etcd", "snapshot", "restore", str(snapshot), "--spec", str(second),
                    "--data-dir", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert "member shoal-lab-2" in restored.stdout
    assert (tmp_path / "restored" / "member" / "snap").is_dir()


class Writer:
    """Creates ConfigMaps w-00000, w-00001, ... one after the other through the SDK;
    a failed create is tried again under the same name (AlreadyExists then means
    an earlier try was committed: acknowledged)."""

    def __init__(self, lab: HALab) -> None:
        self.client = lab.client()
        self.acked: list[str] = []
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            name = f"w-{i:05d}"
            cm = core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name=name, namespace=NS),
                                    data={"i": str(i)})
            try:
                self.client.create(cm)
            except errors.AlreadyExists:
                pass
            except errors.ShoalError:
                self.failed += 1
                time.sleep(0.1)
                continue
            self.acked.append(name)
            i += 1

    def wait_more(self, count: int, *, timeout: float = 90.0) -> float:
        """Until ``count`` more writes are acknowledged; the seconds until the first."""
        start, first = len(self.acked), None
        t0 = time.monotonic()
        deadline = t0 + timeout
        while len(self.acked) < start + count:
            if first is None and len(self.acked) > start:
                first = time.monotonic() - t0
            assert time.monotonic() < deadline, (
                f"only {len(self.acked) - start} of {count} writes in {timeout:g}s "
                f"({self.failed} failed)")
            time.sleep(0.05)
        return first if first is not None else time.monotonic() - t0


class Watcher:
    """Watches the namespace's ConfigMaps through its own client from ``rv``."""

    def __init__(self, lab: HALab, rv: str) -> None:
        self.client = lab.client()
        self.rv = rv
        self.events: list[tuple[str, str, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for ev in self.client.watch(core_pb2.ConfigMap, namespace=NS,
                                        resource_version=self.rv):
                assert ev.object is not None
                self.events.append((ev.type, ev.object.metadata.name,
                                    int(ev.resource_version)))
        except Exception:  # the client is closed at the end of the test
            return


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _until(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    return wait_for(what, check, timeout=timeout)


def test_killing_the_etcd_leader_and_the_leading_apiserver_loses_no_write(
        ha_lab: HALab) -> None:
    with ha_lab.client() as c:
        c.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
        rv = c.list(core_pb2.ConfigMap, namespace=NS).resource_version
        holder_before, apiserver_before = ha_lab.lease_holder(c)
    watcher = Watcher(ha_lab, rv)
    watcher.thread.start()
    writer = Writer(ha_lab)
    writer.thread.start()
    try:
        writer.wait_more(WRITES_BETWEEN_FAULTS)

        # 1. The etcd leader dies (SIGKILL); the supervisor restarts it later.
        leader = next(r for r in ha_lab.etcd_report() if r.status and r.status.is_leader)
        etcd_name = ha_lab.etcd_process(leader.endpoint)
        failed_before = writer.failed
        _kill(ha_lab.pids()[etcd_name])
        ha_lab.figures["etcd_leader_kill_first_write_s"] = round(
            writer.wait_more(WRITES_BETWEEN_FAULTS), 2)
        ha_lab.figures["etcd_leader_kill_failed_requests"] = writer.failed - failed_before

        # 2. The apiserver holding the controller Lease dies.
        failed_before = writer.failed
        with ha_lab.client() as c:
            holder, apiserver = ha_lab.lease_holder(c)
            _kill(ha_lab.pids()[apiserver])
            t0 = time.monotonic()

            def new_holder() -> tuple[str, str] | None:
                try:
                    now = ha_lab.lease_holder(c)
                except errors.ShoalError:
                    return None
                return now if now[0] != holder else None

            moved = _until("the controller Lease held by another apiserver", new_holder,
                           timeout=4 * LEASE_DURATION)
            lease_moved = time.monotonic() - t0
        ha_lab.figures["lease_moved_s"] = round(lease_moved, 2)
        # Held by a live apiserver: one of the others, or the killed member once
        # the lab's supervisor has started it again (a new identity either way).
        assert moved[1].startswith("apiserver"), moved
        # A holder killed without releasing: the Lease expires after its duration,
        # then a candidate takes it at its next retry.
        assert lease_moved <= LEASE_DURATION + 2 * RETRY_PERIOD + 3.0, lease_moved
        ha_lab.figures["apiserver_kill_first_write_s"] = round(
            writer.wait_more(WRITES_BETWEEN_FAULTS), 2)
        ha_lab.figures["apiserver_kill_failed_requests"] = writer.failed - failed_before
    finally:
        writer.stop.set()
        writer.thread.join(timeout=30)
        writer.client.close()

    acked = list(writer.acked)
    assert acked == [f"w-{i:05d}" for i in range(len(acked))]
    with ha_lab.client() as c:
        stored = [o.metadata.name for o in c.list(core_pb2.ConfigMap, namespace=NS).items]
    assert len(stored) == len(set(stored))
    missing = sorted(set(acked) - set(stored))
    assert not missing, f"acknowledged writes lost: {missing}"
    extra = sorted(set(stored) - set(acked))
    assert len(extra) <= 1, f"writes stored that were never attempted: {extra}"

    _until("the watcher saw every acknowledged write",
           lambda: set(acked) <= {n for t, n, _ in watcher.events if t == "ADDED"})
    added = [n for t, n, _ in watcher.events if t == "ADDED"]
    assert len(added) == len(set(added)), "the watcher saw a write twice"
    revisions = [r for _, _, r in watcher.events]
    assert revisions == sorted(revisions), "the watcher's events are out of order"
    ha_lab.figures["events_lost"] = len(set(acked) - set(added))
    watcher.client.close()
    assert holder_before  # the Lease had a holder before the faults
    del apiserver_before


def test_a_deployment_rolls_out_after_the_faults(ha_lab: HALab) -> None:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = "after", NS
    d.spec.replicas = 2
    d.spec.selector.match_labels["app"] = "after"
    d.spec.template.metadata.labels["app"] = "after"
    d.spec.template.spec.termination_grace_period_seconds = 1
    d.spec.template.spec.containers.add(name="main", image=IMAGE,
                                        command=["sleep", "3600"])
    with ha_lab.client() as c:
        c.create(d)
        _until("the Deployment rolled out", lambda: (
            c.get(apps_pb2.Deployment, "after", namespace=NS).status.available_replicas
            == 2), timeout=120)
    # Every member is back (the supervisor restarted what was killed).

    def all_answer() -> list[etcdadmin.MemberReport] | None:
        report = ha_lab.etcd_report()
        return report if all(m.status for m in report) else None

    assert len(_until("all three etcd members answer", all_answer)) == 3


def test_the_lab_restores_etcd_from_a_snapshot(ha_lab: HALab, tmp_path: Path) -> None:
    snapshot = tmp_path / "before.db"
    with ha_lab.client() as c:
        c.create(core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name="in-snapshot",
                                                                 namespace=NS)))
        saved = _cli("etcd", "snapshot", "save", str(snapshot), "--spec",
                     str(ha_lab.dir / "bootstrap.yaml"))
        assert saved.returncode == 0, saved.stderr
        c.create(core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name="after-snapshot",
                                                                 namespace=NS)))
    restored = _cli("lab", "restore", str(snapshot), "--dir", str(ha_lab.dir))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    with ha_lab.client() as c:
        names = {o.metadata.name for o in c.list(core_pb2.ConfigMap, namespace=NS).items}
        assert "in-snapshot" in names and "w-00000" in names
        assert "after-snapshot" not in names
        c.create(core_pb2.ConfigMap(metadata=meta_pb2.ObjectMeta(name="after-restore",
                                                                 namespace=NS)))
    status = _cli("lab", "status", "--dir", str(ha_lab.dir))
    assert status.returncode == 0, status.stdout
