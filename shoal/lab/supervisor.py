"""The lab's supervisor: one detached process that restarts the lab's daemons.

    python -P -m shoal.lab.supervisor --dir LAB_DIR [--ready-fd N]

``shoal lab up`` starts it last (in its own session, recorded in the state
file as ``supervisor``); ``shoal lab down`` stops it first::

    started --found its own record--> ready --phase up--> supervising --+
       |                             (writes    (tick at least every     |
       |                              --ready-fd) INTERVAL s, and at once |
       |                                          when a pidfd says a     |
       |                                          daemon exited)          |
       +-- not the lab's supervisor --> exits 2     ^                     |
                                                    +---------------------+
    SIGTERM/SIGINT (``down``), the state file gone, the phase failed or
    down, or another supervisor recorded -------------------------> exits 0

One tick, all inside the state lock (:meth:`StateFile.locked`): load the
state afresh, see which supervised daemons are alive (by PID and start time,
never by name), ``restarting.plan`` what to do, do it, save the state if
anything changed. Then wait, outside the lock.

Contract:

- A dead daemon is started again by ``Supervisor.respawn``: its recorded
  command line (with its ``nsenter --net``), environment, working directory
  and log file. Its new record (new PID and start time, ``restarts`` + 1,
  ``last_exit``) replaces the old one in the same locked write.
- Restarts back off per daemon (``shoal.backoff.Backoff``: exponential,
  jitter, capped at ``restarting.CAP``); see :mod:`shoal.lab.restarting`
  for who is restarted and when. A daemon stopped on purpose
  (``stop-node``) is never restarted.
- Every death and restart is logged (one JSON object a line, the lab's
  ``logs/supervisor.log``) with how the daemon ended: its exit code or the
  signal that killed it, or "exit status unknown" when the kernel no longer
  knows (see ``supervising.exit_code``).
- SIGTERM lets the current tick finish (a daemon it has just started is
  recorded) and then exits; the daemons keep running (each has its own
  session). Nothing here is retried by anyone: a supervisor that dies shows
  as not running in ``shoal lab status``; ``down`` and ``up`` start afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from shoal import errors, logs
from shoal.backoff import Backoff
from shoal.lab import restarting
from shoal.lab.restarting import Action, Plan, Track
from shoal.lab.state import DOWN, FAILED, UP, LabState, ProcessRecord, StateFile
from shoal.lab.supervising import (
    Supervisor,
    alive,
    exit_code,
    open_pidfd,
    start_time,
)

NAME = "supervisor"  # its key in the state file's processes
NOT_OURS = 2         # exit code: the state file does not name this process

log = logging.getLogger("shoal.lab.supervisor")

Identity = tuple[int, int]  # (pid, start time)


def _identity(record: ProcessRecord) -> Identity:
    return record.pid, record.start_time


class Restarter:
    """Keeps the daemons of one lab directory running (see the module doc)."""

    def __init__(self, lab_dir: Path, *, clock: Callable[[], float] = time.monotonic,
                 spawner: Supervisor | None = None) -> None:
        self.file = StateFile(lab_dir / "state.json")
        self.clock = clock
        self.spawner = spawner or Supervisor()
        self.me: Identity = (os.getpid(), start_time(os.getpid()) or 0)
        self.tracks: dict[str, Track] = {}
        self.backoffs: dict[str, Backoff] = {}
        self.delays: dict[str, float] = {}
        self.pidfds: dict[Identity, int] = {}
        self.running_fds: list[int] = []  # pidfds of the daemons alive at the last tick

    def why_exit(self, state: LabState | None) -> str | None:
        """A reason to stop supervising, or None to go on."""
        if state is None:
            return f"{self.file.path} is gone"
        if state.phase in (FAILED, DOWN):
            return f"the lab is {state.phase}"
        mine = state.processes.get(NAME)
        if mine is None or _identity(mine) != self.me:
            return "the state file names another supervisor"
        return None

    def tick(self) -> float | None:
        """Look at every daemon once, act, and return when to look again (the
        clock's time), or None to exit."""
        with self.file.locked():
            now = self.clock()
            state = self.file.load()
            why = self.why_exit(state)
            if why is not None:
                log.info("stopping: %s", why)
                return None
            assert state is not None
            if state.phase != UP:  # `up` is still at work; it owns the daemons
                return now + restarting.INTERVAL
            records = {n: r for n, r in state.processes.items() if r.supervised}
            running = {n for n, r in records.items() if alive(r)}
            for name in records:
                if name not in self.backoffs:
                    self.backoffs[name] = Backoff(base=restarting.BASE, cap=restarting.CAP,
                                                  factor=restarting.FACTOR,
                                                  jitter=restarting.JITTER)
                    self.delays[name] = self.backoffs[name].next()
            self._watch(records, running)
            plan = restarting.plan(state=state, alive=running, tracks=self.tracks,
                                   delays=self.delays, now=now)
            if self._act(state, plan):
                self.file.save(state)
        self.spawner.reap()
        self.tracks = dict(plan.tracks)
        for name in [n for n in self.backoffs if n not in self.tracks]:
            del self.backoffs[name], self.delays[name]
        keep = {_identity(r) for r in state.processes.values()}
        for key in [k for k in self.pidfds if k not in keep]:
            os.close(self.pidfds.pop(key))
        wake = now + restarting.INTERVAL
        return min(wake, plan.wake_at) if plan.wake_at is not None else wake

    def _watch(self, records: dict[str, ProcessRecord], running: set[str]) -> None:
        """Hold a pidfd for every running daemon: it wakes the wait when the
        daemon exits, and keeps its exit status readable after it is reaped."""
        self.running_fds = []
        for name in running:
            key = _identity(records[name])
            if key not in self.pidfds:
                fd = open_pidfd(records[name])
                if fd is None:
                    continue
                self.pidfds[key] = fd
            self.running_fds.append(self.pidfds[key])

    def _act(self, state: LabState, plan: Plan) -> bool:
        changed = False
        for d in plan.decisions:
            record = state.processes[d.name]
            match d.action:
                case Action.DIED:
                    code = self.spawner.child_exit(record)
                    if code is None:
                        code = exit_code(record, pidfd=self.pidfds.get(_identity(record)))
                    how = restarting.describe_exit(code)
                    state.processes[d.name] = replace(record, last_exit=how)
                    changed = True
                    log.warning("%s (pid %d) %s; %s", d.name, record.pid, how, d.reason,
                                extra={"daemon": d.name, "pid": record.pid, "exit": how})
                case Action.RESTART:
                    self.delays[d.name] = self.backoffs[d.name].next()
                    try:
                        new = self.spawner.respawn(record)
                    except OSError as e:
                        log.error("could not restart %s: %s; trying again in %.1fs", d.name,
                                  e, self.delays[d.name], extra={"daemon": d.name})
                        continue
                    new = replace(new, restarts=record.restarts + 1)
                    state.processes[d.name] = new
                    changed = True
                    log.info("restarted %s: pid %d (was %d, %s), restart %d", d.name,
                             new.pid, record.pid, record.last_exit or "ended", new.restarts,
                             extra={"daemon": d.name, "pid": new.pid,
                                    "exit": record.last_exit, "restarts": new.restarts})
                case Action.RESET:
                    self.backoffs[d.name].reset()
                    self.delays[d.name] = self.backoffs[d.name].next()
                    log.info("%s is stable (%s); its back-off is reset", d.name, d.reason)
                case Action.FORGET:
                    log.info("%s: not restarting it, %s", d.name, d.reason)
                case Action.WAIT:
                    pass
        return changed

    def close(self) -> None:
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds.clear()


def run(lab_dir: Path, *, ready_fd: int | None = None) -> int:
    """Supervise until told to stop (see the module doc); the exit code."""
    stopping = False
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # No signal is ignored here: an ignored one would stay ignored in every daemon
    # started again (exec keeps SIG_IGN). No terminal sends SIGHUP to this session.
    restarter = Restarter(lab_dir)
    try:
        with restarter.file.locked():
            why = restarter.why_exit(restarter.file.load())
        if why is not None:
            log.error("not supervising %s: %s", lab_dir, why)
            return NOT_OURS
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        log.info("supervising the daemons of %s (pid %d)", lab_dir, os.getpid())
        while not stopping:
            try:
                wake = restarter.tick()
            except (errors.ShoalError, OSError) as e:  # say, a state file edited by hand
                log.error("this look at the daemons failed: %s; trying again", e)
                wake = restarter.clock() + restarting.INTERVAL
            if wake is None:
                break
            timeout = max(0.0, wake - restarter.clock())
            ready, _, _ = select.select([wake_r, *restarter.running_fds], [], [], timeout)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
        if stopping:
            log.info("stopping: signalled; the daemons keep running")
        return 0
    finally:
        restarter.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.lab.supervisor",
                                 description="Restart the lab's daemons when they die.")
    ap.add_argument("--dir", type=Path, required=True, help="the lab's directory")
    ap.add_argument("--ready-fd", type=int, default=None,
                    help="write 'ready' to this file descriptor once supervising")
    ap.add_argument("--log-format", choices=("json", "text"), default="json")
    ns = ap.parse_args(argv)
    logs.setup(fmt=ns.log_format)
    return run(ns.dir.absolute(), ready_fd=ns.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
