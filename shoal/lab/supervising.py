"""Start the lab's daemons detached, know them by PID and start time, stop them.

    spawn() --> running --stop(): SIGTERM, SIGKILL after the grace--> gone
                   |
                   +-- exits or crashes --> gone (``status`` says so; the lab
                                            does not restart it: ``down`` + ``up``)

Contract:

- ``spawn`` starts a daemon in its own session (``start_new_session``), so it
  outlives the ``shoal lab up`` that started it and a Ctrl-C in that terminal
  never reaches it. stdin is /dev/null; stdout and stderr go to its log file.
  With ``netns`` it runs inside that network namespace through ``nsenter
  --net=...`` (never ``ip netns exec``, which remounts /sys and breaks runc).
  nsenter execs the daemon, so the PID is the daemon's.
- A process is identified by its PID *and* its start time. ``alive`` and
  ``stop`` act only while both match, so a reused PID is never signalled; no
  process is ever looked up or killed by name.
- ``stop`` is idempotent: a process already gone is done.
- Readiness is polled from a signal the daemon gives (an HTTP endpoint, a
  socket answering), never assumed after a fixed sleep: see ``Supervisor.wait_until``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shoal import errors
from shoal.lab.state import ProcessRecord

NETNS_DIR = Path("/var/run/netns")


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


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def alive(record: ProcessRecord) -> bool:
    """Is the very process ``record`` names still running (not a zombie)?"""
    return start_time(record.pid) == record.start_time and _state(record.pid) not in ("Z", "")


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
              cwd: Path | None = None, env: Mapping[str, str] | None = None
              ) -> ProcessRecord:
        """Start ``argv`` detached (see the module contract) and return its record."""
        command = list(argv)
        if netns is not None:
            command = ["nsenter", f"--net={NETNS_DIR / netns}", *command]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=cwd, env=dict(env) if env is not None else None)
        self._children[proc.pid] = proc
        return ProcessRecord(name=name, pid=proc.pid, start_time=start_time(proc.pid) or 0,
                             argv=tuple(command), log=str(log))

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
