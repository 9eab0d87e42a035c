"""Start the lab's daemons detached, know them by PID and start time, stop them.

    spawn() --> running --stop(): SIGTERM, SIGKILL after the grace--> gone
                 ^  |
                 |  +-- exits or crashes --> gone: the lab's supervisor
                 |                           (:mod:`shoal.lab.supervisor`) notices,
                 +------- respawn() ---------+ reads how it ended (exit_code) and
                                               starts it again the same way

Contract:

- ``spawn`` starts a daemon in its own session (``start_new_session``), so it
  outlives the ``shoal lab up`` that started it and a Ctrl-C in that terminal
  never reaches it. stdin is /dev/null; stdout and stderr go to its log file.
  With ``netns`` it runs inside that network namespace through ``nsenter
  --net=...`` (never ``ip netns exec``, which remounts /sys and breaks runc).
  nsenter execs the daemon, so the PID is the daemon's. The record keeps the
  command as executed, its environment, working directory and log, so
  ``respawn`` starts the very same thing again (appending to the same log).
- A process is identified by its PID *and* its start time. ``alive`` and
  ``stop`` act only while both match, so a reused PID is never signalled; no
  process is ever looked up or killed by name.
- ``stop`` is idempotent: a process already gone is done.
- ``exit_code`` says how a process that is not our child ended when the
  kernel still knows: a zombie's ``/proc/PID/stat`` (field 52), or a pidfd
  opened while it ran (``PIDFD_GET_INFO``, Linux 6.15+). Otherwise None:
  unknown, never guessed.
- Readiness is polled from a signal the daemon gives (an HTTP endpoint, a
  socket answering, a readiness pipe), never assumed after a fixed sleep: see
  ``Supervisor.wait_until``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from shoal import errors
from shoal.lab.state import ProcessRecord

NETNS_DIR = Path("/var/run/netns")

# ioctl(pidfd, PIDFD_GET_INFO, struct pidfd_info): _IOWR(0xFF, 11, 64 bytes), <linux/pidfd.h>.
_PIDFD_INFO_SIZE = 64
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
_PIDFD_INFO_EXIT = 1 << 3
_PIDFD_INFO_EXIT_CODE_OFFSET = 60


# Lab addresses are local: never send them through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StartError(errors.InternalError):
    """A daemon exited, or never became ready."""


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is field 3 (state); field 22 is fields[19].
    return int(fields[19]) if len(fields) > 19 else None


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; empty if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def _state(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def alive(record: ProcessRecord) -> bool:
    """Is the very process ``record`` names still running (not a zombie)?"""
    return start_time(record.pid) == record.start_time and _state(record.pid) not in ("Z", "")


def open_pidfd(record: ProcessRecord) -> int | None:
    """A pidfd for the very process ``record`` names, if it is still running
    (checked again after opening, so a reused PID is never held). The caller
    closes it."""
    if not alive(record):
        return None
    try:
        fd = os.pidfd_open(record.pid)
    except OSError:
        return None
    if not alive(record):
        os.close(fd)
        return None
    return fd


def exit_code(record: ProcessRecord, *, pidfd: int | None = None) -> int | None:
    """How ``record``'s process ended, as ``Popen.returncode`` says it (``-N``:
    killed by signal N), for a process that is not our child; None if it is
    still running or nobody knows. ``pidfd`` must come from ``open_pidfd``."""
    fields = _stat_fields(record.pid)
    # A zombie (not reaped yet) still has its PID, start time and wait status.
    if len(fields) > 49 and fields[0] == "Z" and int(fields[19]) == record.start_time:
        return os.waitstatus_to_exitcode(int(fields[49]))
    if pidfd is None or alive(record):
        return None
    info = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", info, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, info)
    except OSError:  # an older kernel, or not reaped yet
        return None
    (mask,) = struct.unpack_from("=Q", info, 0)
    if not mask & _PIDFD_INFO_EXIT:
        return None
    (status,) = struct.unpack_from("=i", info, _PIDFD_INFO_EXIT_CODE_OFFSET)
    return os.waitstatus_to_exitcode(status)


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def log_tail(record: ProcessRecord, *, lines: int = 25) -> str:
    try:
        text = Path(record.log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Spawns and stops the lab's processes. It holds the ``Popen`` of what this
    invocation spawned (to reap it and read its exit status); a process from an
    earlier invocation is known by its record alone."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: Sequence[str], *, log: Path, netns: str | None = None,
              cwd: Path | None = None, env: Mapping[str, str] | None = None,
              supervised: bool = False, pass_fds: Sequence[int] = ()) -> ProcessRecord:
        """Start ``argv`` detached (see the module contract) and return its record.
        ``pass_fds`` stay open in the child (a readiness pipe)."""
        command = list(argv)
        if netns is not None:
            command = ["nsenter", f"--net={NETNS_DIR / netns}", *command]
        env = dict(env) if env is not None else dict(os.environ)
        pid = self._popen(command, log=log, cwd=cwd, env=env, pass_fds=pass_fds)
        return ProcessRecord(name=name, pid=pid, start_time=start_time(pid) or 0,
                             argv=tuple(command), log=str(log), netns=netns,
                             cwd=str(cwd) if cwd is not None else "", env=env,
                             supervised=supervised)

    def respawn(self, record: ProcessRecord) -> ProcessRecord:
        """Start ``record``'s command again the same way: the same argv (with its
        nsenter), environment, working directory and log file. Returns the new
        incarnation's record (restart count and last exit carried over)."""
        pid = self._popen(list(record.argv), log=Path(record.log or os.devnull),
                          cwd=Path(record.cwd) if record.cwd else None,
                          env=record.env or dict(os.environ))
        return replace(record, pid=pid, start_time=start_time(pid) or 0)

    def _popen(self, command: list[str], *, log: Path, cwd: Path | None,
               env: Mapping[str, str], pass_fds: Sequence[int] = ()) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=cwd, env=dict(env), pass_fds=tuple(pass_fds))
        self._children[proc.pid] = proc
        return proc.pid

    def child_exit(self, record: ProcessRecord) -> int | None:
        """If ``record`` is a child of this process that has exited: reap it and
        return its ``returncode``. None if it runs, or is not our child."""
        proc = self._children.get(record.pid)
        if proc is None or proc.poll() is None:
            return None
        del self._children[record.pid]
        return proc.returncode

    def reap(self) -> None:
        """Reap every child that has exited (no zombies left behind)."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def exited(self, record: ProcessRecord) -> int | None:
        """The exit status if ``record`` has exited (-1 if it was not our child),
        else None."""
        proc = self._children.get(record.pid)
        if proc is not None:
            return proc.poll()
        return None if alive(record) else -1

    def wait_exit(self, record: ProcessRecord, timeout: float) -> bool:
        """Wait until the process exits (a pidfd, no polling); False on timeout."""
        proc = self._children.get(record.pid)
        if proc is not None:
            try:
                proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        if not alive(record):
            return True
        try:
            fd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            return True
        try:
            if not alive(record):  # the PID may have been reused between the checks
                return True
            ready, _, _ = select.select([fd], [], [], timeout)
            return bool(ready) or not alive(record)
        finally:
            os.close(fd)

    def stop(self, record: ProcessRecord, *, grace: float = 15.0) -> bool:
        """SIGTERM, then SIGKILL after ``grace``. True if it had to be killed."""
        killed = False
        if alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)
            if not self.wait_exit(record, grace) and alive(record):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
                self.wait_exit(record, 5.0)
                killed = True
        proc = self._children.pop(record.pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
        return killed

    def wait_until(self, what: str, check: Callable[[], bool], *, timeout: float,
                   watch: Sequence[ProcessRecord] = (), interval: float = 0.05) -> float:
        """Poll ``check`` until it is true; return the seconds it took. Raises
        ``StartError`` when the deadline passes or a watched process exits first
        (with the tail of its log)."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            for record in watch:
                code = self.exited(record)
                if code is not None:
                    raise StartError(f"{record.name} exited ({code}) while waiting for "
                                     f"{what}; {record.log}:\n{log_tail(record)}")
            if check():
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                logs = "".join(f"\n{r.name} ({r.log}):\n{log_tail(r)}" for r in watch)
                raise StartError(f"{what}: not ready after {timeout:g}s{logs}")
            time.sleep(interval)


def http_ok(url: str, *, timeout: float = 1.0) -> bool:
    """Does ``url`` answer 200?"""
    try:
        with _OPENER.open(url, timeout=timeout) as answer:
            return int(answer.status) == 200
    except (OSError, ValueError):
        return False
