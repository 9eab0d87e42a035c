"""The lab's supervisor with real (harmless) processes: ``sleep`` stands in for the
daemons, a fake clock drives the back-off, the test process itself is the
recorded supervisor. No root, no network; every process started here is
killed by its PID at the end."""

from __future__ import annotations

import contextlib
import os
import platform
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.lab import restarting
from shoal.lab.state import DOWN, UP, LabState, ProcessRecord, StateFile
from shoal.lab.supervising import Supervisor, alive, exit_code, open_pidfd, start_time
from shoal.lab.supervisor import NAME, NOT_OURS, Restarter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Lab:
    def __init__(self, path: Path) -> None:
        self.dir = path
        self.file = StateFile(path / "state.json")
        self.spawner = Supervisor()  # the "up" that started the daemons: not the restarter
        self.pids: list[ProcessRecord] = []

    def state(self) -> LabState:
        state = self.file.load()
        assert state is not None
        return state

    def daemon(self, name: str, *, seconds: int = 300, supervised: bool = True
               ) -> ProcessRecord:
        record = self.spawner.spawn(name, ["sleep", str(seconds)], log=self.dir / f"{name}.log",
                                    cwd=Path("/"), env={"PATH": os.environ["PATH"],
                                                        "SHOAL_TEST": name},
                                    supervised=supervised)
        self.pids.append(record)
        return record

    def kill(self, record: ProcessRecord) -> None:
        os.kill(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while alive(record) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(record)


def _me() -> ProcessRecord:
    return ProcessRecord(name=NAME, pid=os.getpid(), start_time=start_time(os.getpid()) or 0,
                         argv=("pytest",))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(tmp_path / "lab")
    the_lab.dir.mkdir()
    yield the_lab
    state = the_lab.file.load()
    records = [*the_lab.pids, *(state.processes.values() if state else ())]
    for record in records:  # by PID and start time, as the lab does
        if record.name != NAME and alive(record):
            os.kill(record.pid, signal.SIGKILL)
    the_lab.spawner.reap()


def save(lab: Lab, *records: ProcessRecord, phase: str = UP,
         stopped: tuple[str, ...] = (), supervisor: ProcessRecord | None = None) -> None:
    state = LabState(lab_dir=str(lab.dir), nodes=["node-1", "node-2"], phase=phase,
                     stopped_nodes=list(stopped))
    for record in (supervisor or _me(), *records):
        state.processes[record.name] = record
    lab.file.save(state)


def test_a_killed_daemon_is_restarted_the_same_way_after_its_back_off(lab: Lab) -> None:
    api = lab.daemon("apiserver")
    save(lab, api)
    clock = FakeClock()
    restarter = Restarter(lab.dir, clock=clock)
    try:
        assert restarter.tick() == clock.now + restarting.INTERVAL
        assert lab.state().processes["apiserver"] == api  # running: untouched
        lab.kill(api)
        wake = restarter.tick()  # found dead: when, and how it ended
        assert wake is not None
        assert clock.now + 0.5 * 0.8 <= wake <= clock.now + 0.5 * 1.2  # BASE with jitter
        dead = lab.state().processes["apiserver"]
        assert (dead.pid, dead.last_exit, dead.restarts) == (api.pid, "killed by SIGKILL", 0)
        clock.now = wake - 0.01
        restarter.tick()
        assert lab.state().processes["apiserver"].pid == api.pid  # not due yet
        clock.now = wake
        restarter.tick()
        new = lab.state().processes["apiserver"]
        lab.pids.append(new)
        assert new.pid != api.pid and alive(new)
        assert (new.restarts, new.last_exit) == (1, "killed by SIGKILL")
        assert (new.argv, new.env, new.cwd, new.log) == (api.argv, api.env, api.cwd, api.log)
        assert Path(f"/proc/{new.pid}/cmdline").read_bytes().split(b"\0")[:2] == [
            b"sleep", b"300"]
        assert b"SHOAL_TEST=apiserver" in Path(f"/proc/{new.pid}/environ").read_bytes()
        # It dies again at once: the next restart waits longer (1 s, with jitter).
        lab.kill(new)
        wake = restarter.tick()
        assert wake is not None and wake - clock.now >= 1.0 * 0.8
        # Its exit status is read from its parent (the restarter) this time.
        assert lab.state().processes["apiserver"].last_exit == "killed by SIGKILL"
    finally:
        restarter.close()


def test_a_node_stopped_on_purpose_stays_stopped(lab: Lab) -> None:
    agent1 = lab.daemon("nodeagent/node-1")
    agent2 = lab.daemon("nodeagent/node-2")
    cd = lab.daemon("containerd/node-2", supervised=False)
    save(lab, agent1, agent2, cd, stopped=("node-1",))
    clock = FakeClock()
    restarter = Restarter(lab.dir, clock=clock)
    try:
        restarter.tick()
        for record in (agent1, agent2, cd):
            lab.kill(record)
        for _ in range(5):
            restarter.tick()
            clock.now += 10
        state = lab.state()
        assert state.processes["nodeagent/node-1"] == agent1  # stop-node: left alone
        assert state.processes["containerd/node-2"] == cd     # its agent's business
        again = state.processes["nodeagent/node-2"]
        lab.pids.append(again)
        assert again.pid != agent2.pid and again.restarts == 1
    finally:
        restarter.close()


@pytest.mark.parametrize(("phase", "supervisor", "present"), [
    (DOWN, None, True),
    (UP, ProcessRecord(name=NAME, pid=1, start_time=1, argv=("other",)), True),
    (UP, None, False),
])
def test_it_exits_when_the_lab_is_not_its_own(lab: Lab, phase: str,
                                              supervisor: ProcessRecord | None,
                                              present: bool) -> None:
    if present:
        save(lab, phase=phase, supervisor=supervisor)
    restarter = Restarter(lab.dir, clock=FakeClock())
    assert restarter.tick() is None


def test_exit_code_of_a_process_that_is_not_our_child(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = ProcessRecord(name="x", pid=proc.pid, start_time=start_time(proc.pid) or 0,
                               argv=("sleep",))
        fd = open_pidfd(record)
        assert fd is not None
        assert exit_code(record, pidfd=fd) is None  # still running
        os.kill(proc.pid, signal.SIGKILL)
        select.select([fd], [], [], 5)
        assert exit_code(record, pidfd=fd) == -9  # a zombie: /proc/PID/stat field 52
        proc.wait()
        major, minor = (int(x) for x in platform.release().split(".")[:2])
        if (major, minor) >= (6, 15):  # reaped: PIDFD_GET_INFO keeps the status
            assert exit_code(record, pidfd=fd) == -9
        assert exit_code(record) is None  # reaped, no pidfd: nobody knows
        os.close(fd)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def test_the_supervisor_process_restarts_a_daemon_and_stops_on_sigterm(lab: Lab) -> None:
    """``python -m shoal.lab.supervisor`` as ``up`` starts it: spawned and recorded
    inside the lock, ready on a pipe; SIGTERM stops it and not the daemons."""
    reg = lab.daemon("registry")
    ready_r, ready_w = os.pipe()
    with lab.file.locked():
        sup = lab.spawner.spawn(NAME, [sys.executable, "-P", "-m", "shoal.lab.supervisor",
                                       "--dir", str(lab.dir), "--ready-fd", str(ready_w)],
                                log=lab.dir / "logs" / "supervisor.log", pass_fds=(ready_w,))
        save(lab, reg, supervisor=sup)
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 30)[0], "the supervisor never said ready"
        assert os.read(ready_r, 64) == b"ready\n"
        lab.kill(reg)
        deadline = time.monotonic() + 10
        while lab.state().processes["registry"].pid == reg.pid:
            assert time.monotonic() < deadline, "not restarted"
            time.sleep(0.05)
        new = lab.state().processes["registry"]
        lab.pids.append(new)
        assert alive(new) and new.restarts == 1 and new.last_exit == "killed by SIGKILL"
        os.kill(sup.pid, signal.SIGTERM)
        assert lab.spawner.wait_exit(sup, 10)
        assert lab.spawner.exited(sup) == 0
        assert alive(new)  # the daemons keep running
        text = (lab.dir / "logs" / "supervisor.log").read_text()
        assert f"registry (pid {reg.pid}) killed by SIGKILL" in text
        assert f"restarted registry: pid {new.pid}" in text
    finally:
        os.close(ready_r)
        if alive(sup):
            os.kill(sup.pid, signal.SIGKILL)
            lab.spawner.wait_exit(sup, 5)


def test_a_supervisor_the_state_does_not_name_exits_at_once(lab: Lab) -> None:
    save(lab)  # the recorded supervisor is this test process, not the one started here
    done = subprocess.run([sys.executable, "-P", "-m", "shoal.lab.supervisor", "--dir",
                           str(lab.dir)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == NOT_OURS
    assert "the state file names another supervisor" in done.stderr


@pytest.mark.parametrize("python", [sys.executable, "/bin/true"])
def test_up_waits_for_the_supervisor_to_say_ready(lab: Lab, python: str) -> None:
    """``up``'s last stage: spawn and record the supervisor inside the lock, then
    wait for ``ready`` on the pipe; one that exits first fails ``up``."""
    from shoal.lab.lab import Lab as RealLab
    from shoal.lab.supervising import StartError
    from shoal.lab.topology import plan

    state = LabState(lab_dir=str(lab.dir), nodes=["node-1"])
    lab.file.save(state)
    real = RealLab(lab.dir, say=lambda line: None, python=python)
    if python == "/bin/true":
        with pytest.raises(StartError, match="supervisor exited"):
            real._start_supervisor(state, plan(nodes=1, lab_dir=lab.dir))
        return
    sup = real._start_supervisor(state, plan(nodes=1, lab_dir=lab.dir))
    try:
        assert lab.state().processes[NAME] == sup and alive(sup)
        assert Path(sup.log) == lab.dir / "logs" / "supervisor.log"
    finally:
        real.sup.stop(sup, grace=10)
    assert real.sup.exited(sup) is not None
