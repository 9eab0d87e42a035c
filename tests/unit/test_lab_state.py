"""The lab's state file and preflight checks: round trips, atomic saves, clear problems."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

import pytest

from shoal import errors
from shoal.lab import preflight
from shoal.lab.state import (
    DOWN,
    UP,
    ChainRecord,
    LabState,
    ProcessRecord,
    StateFile,
    from_json,
    to_json,
)


def sample() -> LabState:
    state = LabState(lab_dir="/var/lib/shoal/lab", nodes=["node-1", "node-2"], phase=UP,
                     bridge="shoal0", etcd_endpoint="127.0.0.1:2379",
                     registry="10.77.0.1:5000")
    state.add_unique(state.netns, "shoal-node-1")
    state.add_unique(state.netns, "shoal-node-1")
    state.add_unique(state.interfaces, "shln-1")
    state.add_chain(ChainRecord(chain="SHOAL-LAB-FWD", jumps_from=("FORWARD",)))
    state.add_chain(ChainRecord(chain="SHOAL-LAB-FWD", jumps_from=("FORWARD",)))
    state.add_chain(ChainRecord(chain="SHOAL-LAB-PARTITION",
                                jumps_from=("INPUT", "OUTPUT", "FORWARD"),
                                netns="shoal-node-1"))
    state.processes["etcd"] = ProcessRecord(name="etcd", pid=123, start_time=4567,
                                            argv=("etcd", "--name", "shoal-lab"),
                                            log="/var/lib/shoal/lab/logs/etcd.log")
    state.processes["nodeagent/node-1"] = ProcessRecord(
        name="nodeagent/node-1", pid=124, start_time=4568,
        argv=("nsenter", "--net=/var/run/netns/shoal-node-1", "python", "-m", "nodeagent.main"),
        log="/var/lib/shoal/lab/logs/node-1.log", netns="shoal-node-1", cwd="/",
        env={"PATH": "/usr/bin:/usr/sbin"}, supervised=True, restarts=2,
        last_exit="killed by SIGKILL")
    state.partitions.append(["node-1", "node-2"])
    state.timings["ready"] = 4.25
    return state


def test_round_trip_keeps_everything() -> None:
    state = sample()
    assert state.netns == ["shoal-node-1"]
    assert len(state.chains) == 2
    again = from_json(to_json(state))
    assert again == state
    assert again.processes["etcd"].argv == ("etcd", "--name", "shoal-lab")
    assert again.chains[1].netns == "shoal-node-1"
    agent = again.processes["nodeagent/node-1"]
    assert (agent.netns, agent.cwd, agent.env) == ("shoal-node-1", "/",
                                                   {"PATH": "/usr/bin:/usr/sbin"})
    assert (agent.supervised, agent.restarts, agent.last_exit) == (True, 2, "killed by SIGKILL")


def test_a_record_written_before_supervision_loads_with_defaults() -> None:
    data = json.loads(to_json(sample()))
    data["processes"] = {"etcd": {"name": "etcd", "pid": 1, "start_time": 2, "argv": ["etcd"]}}
    etcd = from_json(json.dumps(data)).processes["etcd"]
    assert (etcd.supervised, etcd.restarts, etcd.last_exit, etcd.env, etcd.netns) == (
        False, 0, "", {}, None)


def test_save_is_atomic_and_load_reads_it_back(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "lab" / "state.json")
    assert f.load() is None
    f.save(sample())
    state = f.load()
    assert state is not None and state.phase == UP
    state.phase = DOWN
    f.save(state)
    loaded = f.load()
    assert loaded is not None and loaded.phase == DOWN
    assert [p.name for p in f.path.parent.iterdir()] == ["state.json"]  # no temp files
    assert stat.S_IMODE(f.path.stat().st_mode) == 0o600  # it holds environments


def test_the_lock_lets_one_writer_in_at_a_time(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "state.json")
    assert f.lock_path == tmp_path / "state.lock"

    def try_lock() -> bool:  # another writer (its own open file, as another process has)
        fd = os.open(f.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with f.locked():
        assert not try_lock()
    assert try_lock()


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not JSON"),
    ("[]", "not a version-1"),
    (json.dumps({"version": 99, "lab_dir": "/x"}), "not a version-1"),
    (json.dumps({"version": 1}), "malformed"),
    (json.dumps({"version": 1, "lab_dir": "/x", "phase": "dancing"}), "unknown phase"),
    (json.dumps({"version": 1, "lab_dir": "/x", "processes": {"a": {"pid": 1}}}),
     "malformed"),
])
def test_a_file_that_is_not_a_lab_state_is_invalid(tmp_path: Path, text: str,
                                                   message: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(errors.Invalid, match=message) as e:
        StateFile(path).load()
    assert str(path) in str(e.value)


class FakeHost:
    def __init__(self, *, euid: int = 0, missing: frozenset[str] = frozenset(),
                 files: frozenset[str] = frozenset(), sysctls: dict[str, int] | None = None,
                 filesystems: str = "nodev\toverlay\n", forward_writable: bool = True,
                 ports_free: bool = True) -> None:
        self._euid = euid
        self.missing = missing
        self.absent = files
        self.sysctls = sysctls or {}
        self.filesystems = filesystems
        self.forward_writable = forward_writable
        self.ports_free = ports_free

    def euid(self) -> int:
        return self._euid

    def which(self, command: str) -> str | None:
        return None if command in self.missing else f"/usr/bin/{command}"

    def exists(self, path: Path) -> bool:
        return str(path) not in self.absent

    def read(self, path: Path) -> str | None:
        if str(path) == "/proc/filesystems":
            return self.filesystems
        name = str(path).removeprefix("/proc/sys/").replace("/", ".")
        return f"{self.sysctls.get(name, 1_000_000)}\n"

    def writable(self, path: Path) -> bool:
        return self.forward_writable

    def port_free(self, address: str) -> bool:
        return self.ports_free


def test_a_ready_machine_has_no_problems() -> None:
    assert preflight.check(FakeHost(), nodes=3) == []


def test_every_problem_is_named_with_its_fix() -> None:
    host = FakeHost(euid=1000, missing=frozenset({"etcd", "docker-registry", "ctr"}),
                    files=frozenset({"/usr/lib/cni/bridge", "/bin/busybox"}),
                    filesystems="nodev\tproc\n", forward_writable=False, ports_free=False,
                    sysctls={"fs.inotify.max_user_instances": 128})
    problems = preflight.check(host, nodes=3)
    text = "\n".join(str(p) for p in problems)
    assert "must run as root" in text and "sudo" in text
    assert "missing etcd (Debian package etcd-server)" in text
    assert "apt-get install -y docker-registry" in text
    assert "missing ctr (Debian package containerd)" in text
    assert "/usr/lib/cni/bridge (Debian package containernetworking-plugins)" in text
    assert "/bin/busybox (Debian package busybox-static)" in text
    assert "modprobe overlay" in text
    assert "ip_forward is not writable" in text
    assert "port 9090 is taken (127.0.0.1:9090 is for the apiserver's metrics)" in text
    assert "systemctl disable --now docker-registry" in text
    warnings = [p for p in problems if not p.fatal]
    assert [str(w).splitlines()[1].strip() for w in warnings] == [
        "fix: sysctl -w fs.inotify.max_user_instances=512"]
    assert all(p.fatal for p in problems if p not in warnings)


def test_watch_limit_scales_with_the_node_count() -> None:
    host = FakeHost(sysctls={"fs.inotify.max_user_watches": 100_000})
    assert preflight.check(host, nodes=3) == []
    problems = preflight.check(host, nodes=20)
    assert [p.fix for p in problems] == ["sysctl -w fs.inotify.max_user_watches=163840"]
