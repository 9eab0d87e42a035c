"""The lab's state file: a JSON record of everything ``up`` made, so ``down`` can
undo it, even after a crash.

    (no file) --up--> starting --all nodes Ready--> up --down--> down
                         |                           |             ^
                         +--failure / Ctrl-C--> failed --down------+

Contract:

- Intent is written before the act: a network namespace, interface or chain
  is recorded before it is created, so a crash in between leaves a record of
  something that may not exist. ``down`` treats "already gone" as done, so
  it is idempotent.
- A process is recorded right after it is spawned, as its PID *and* its
  start time (field 22 of ``/proc/PID/stat``). A PID is signalled only while
  both still match, so a PID reused by an unrelated process is never touched.
  A record also keeps what it takes to start the process again the same way
  (command line, environment, working directory, netns, log file) and, for a
  daemon the supervisor keeps running (``supervised``), how often it was
  restarted and how it last exited.
- Every change is saved at once, atomically (write a temporary file, then
  rename it over the old one): the file on disk is always a whole record, and
  a reader needs no lock. It is readable by root only (it holds environments).
- Once the lab's supervisor runs, two processes may change the state: it and
  the CLI commands. Every read-modify-write then happens inside
  ``StateFile.locked()`` (an exclusive ``flock`` on ``state.lock``), loading
  the state afresh inside the lock; a change made on a copy loaded earlier
  would undo the other writer's (say, put back the PID of a daemon the
  supervisor has just replaced). The lock is held for bookkeeping only, never
  across a wait for readiness.
- ``load`` of a missing file is ``None``; a file that is not a lab state is
  ``errors.Invalid`` naming the file (nothing is guessed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal import errors

VERSION = 1
STARTING, UP, FAILED, DOWN = "starting", "up", "failed", "down"
PHASES = (STARTING, UP, FAILED, DOWN)
LOCK_NAME = "state.lock"


@dataclass(frozen=True)
class ProcessRecord:
    """A process the lab started: by PID and start time, never by name."""

    name: str             # etcd, apiserver, registry, nodeagent/node-1, containerd/node-1
    pid: int
    start_time: int       # clock ticks since boot, /proc/PID/stat field 22
    argv: tuple[str, ...]  # as executed: with netns, it starts with nsenter --net=...
    log: str = ""
    # How to start it again the same way (argv and log above, plus these).
    netns: str | None = None
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # Kept running by the lab's supervisor; restarted when it dies unexpectedly.
    supervised: bool = False
    restarts: int = 0     # restarts by the supervisor since ``up`` (or ``start-node``)
    last_exit: str = ""   # how the previous incarnation ended ("killed by SIGKILL", ...)


@dataclass(frozen=True)
class ChainRecord:
    """An iptables chain of the lab's in the filter table, and the built-in
    chains that jump to it. ``netns`` None is the host."""

    chain: str
    jumps_from: tuple[str, ...]
    netns: str | None = None


@dataclass
class LabState:
    lab_dir: str
    nodes: list[str]
    phase: str = STARTING
    error: str = ""
    bridge: str = ""
    netns: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    chains: list[ChainRecord] = field(default_factory=list)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    partitions: list[list[str]] = field(default_factory=list)
    stopped_nodes: list[str] = field(default_factory=list)
    etcd_endpoint: str = ""
    registry: str = ""
    # Members of the control plane (`up --control-planes`): etcd and apiserver each.
    control_planes: int = 1
    # Seconds from the start of `up` to each stage (for progress and benchmarks).
    timings: dict[str, float] = field(default_factory=dict)

    def add_unique(self, items: list[str], item: str) -> None:
        if item not in items:
            items.append(item)

    def add_chain(self, record: ChainRecord) -> None:
        if record not in self.chains:
            self.chains.append(record)


def to_json(state: LabState) -> str:
    data = asdict(state)
    data["version"] = VERSION
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def from_json(text: str, *, source: str = "state") -> LabState:
    try:
        data: Any = json.loads(text)
    except ValueError as e:
        raise errors.Invalid(f"{source}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise errors.Invalid(f"{source}: not a version-{VERSION} lab state file")
    try:
        phase = data.get("phase", STARTING)
        if phase not in PHASES:
            raise errors.Invalid(f"{source}: unknown phase {phase!r}")
        return LabState(
            lab_dir=str(data["lab_dir"]),
            nodes=[str(n) for n in data.get("nodes", [])],
            phase=phase,
            error=str(data.get("error", "")),
            bridge=str(data.get("bridge", "")),
            netns=[str(n) for n in data.get("netns", [])],
            interfaces=[str(i) for i in data.get("interfaces", [])],
            chains=[ChainRecord(chain=c["chain"], jumps_from=tuple(c["jumps_from"]),
                                netns=c.get("netns")) for c in data.get("chains", [])],
            processes={k: _process(p) for k, p in data.get("processes", {}).items()},
            partitions=[[str(x) for x in pair] for pair in data.get("partitions", [])],
            stopped_nodes=[str(n) for n in data.get("stopped_nodes", [])],
            etcd_endpoint=str(data.get("etcd_endpoint", "")),
            registry=str(data.get("registry", "")),
            control_planes=int(data.get("control_planes", 1)),
            timings={str(k): float(v) for k, v in data.get("timings", {}).items()},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise errors.Invalid(f"{source}: malformed lab state ({e!r})") from None


def _process(p: Any) -> ProcessRecord:
    netns = p.get("netns")
    return ProcessRecord(name=str(p["name"]), pid=int(p["pid"]),
                         start_time=int(p["start_time"]),
                         argv=tuple(str(a) for a in p["argv"]), log=str(p.get("log", "")),
                         netns=str(netns) if netns is not None else None,
                         cwd=str(p.get("cwd", "")),
                         env={str(k): str(v) for k, v in p.get("env", {}).items()},
                         supervised=bool(p.get("supervised", False)),
                         restarts=int(p.get("restarts", 0)),
                         last_exit=str(p.get("last_exit", "")))


class StateFile:
    """The state of one lab directory, saved on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(LOCK_NAME)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab's state lock (exclusive ``flock``) for a read-modify-write.

        Blocks until the other holder is done. Not reentrant: a process that
        takes it twice waits for itself. The lock file stays; it holds nothing.
        """
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def load(self) -> LabState | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return from_json(text, source=str(self.path))

    def save(self, state: LabState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(to_json(state))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
