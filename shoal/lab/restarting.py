"""When the lab's supervisor restarts a daemon: decided here, done elsewhere (pure).

Per supervised daemon, one supervisor tick at a time::

    running --found dead (DIED)--> waiting --restart_at reached (RESTART)--> restarted
      ^  |   restart_at = now +       |      the executor draws the next,      |
      |  |   its back-off's delay     |      longer delay                      |
      |  |                            | stop-node, or gone from the            |
      |  | up STABLE_AFTER s since    | state (FORGET)                         |
      |  | its last restart (RESET)   v                                        |
      |  +--> running              forgotten: never restarted                  |
      +------------------------- seen alive at a later tick -------------------+

Contract:

- ``plan`` is pure. From the lab state (which daemons are recorded, which are
  supervised, which nodes were stopped on purpose), the names whose process
  is alive (by PID and start time), what the supervisor remembers from the
  last tick (``Track``, per daemon), the delay each daemon's back-off gives
  next and the time now, it returns a ``Plan``: what just died, what to
  restart now, whose back-off to reset, the new memory, and when to look
  again. It reads no clock, draws no random number and touches no process.
  The executor (:mod:`shoal.lab.supervisor`) keeps one
  ``shoal.backoff.Backoff`` per daemon (exponential, jitter, cap), passes
  its next delay in, draws a new one after each restart, and resets it when
  the plan says so.
- A daemon is restarted only if it is *wanted*: its record is ``supervised``
  (never containerd, which its node agent keeps running; never a one-shot
  join; never the supervisor itself), and for a node agent, its node is not
  in ``stopped_nodes`` (``stop-node``). A pending restart of a daemon that
  stops being wanted is dropped (FORGET).
- The delay is counted from when the daemon was found dead. A daemon that
  exits 0 is restarted too: the lab never asks a daemon to exit except
  through ``stop-node`` and ``down`` (which stops the supervisor first).
- A daemon that has run STABLE_AFTER seconds since the supervisor last
  restarted it gets its back-off reset (RESET), so an old crash does not make
  the next restart slow.
"""

from __future__ import annotations

import signal
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from shoal.lab.state import LabState, ProcessRecord

# The back-off of one daemon's restarts (see shoal.backoff.Backoff).
BASE = 0.5       # seconds before the first restart
FACTOR = 2.0
CAP = 30.0
JITTER = 0.2
STABLE_AFTER = 30.0  # seconds of running that reset the back-off
INTERVAL = 1.0       # the supervisor looks at least this often


class Action(StrEnum):
    DIED = "died"          # found dead: restart at ``at``
    WAIT = "wait"          # dead, its restart not due yet
    RESTART = "restart"    # start it again now
    RESET = "reset"        # stable again: reset its back-off
    FORGET = "forget"      # no longer wanted: its pending restart is dropped


@dataclass(frozen=True)
class Decision:
    name: str
    action: Action
    at: float | None = None  # DIED, WAIT: when it is due to be restarted
    reason: str = ""


@dataclass(frozen=True)
class Track:
    """What the supervisor remembers of one daemon between ticks."""

    running_since: float | None = None  # first seen running, or restarted
    dead_since: float | None = None     # found dead (None: not dead)
    restart_at: float | None = None     # due to be restarted
    backed_off: bool = False            # restarted since its back-off was last reset


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    tracks: Mapping[str, Track] = field(default_factory=dict)
    wake_at: float | None = None  # the earliest pending restart

    def names(self, action: Action) -> tuple[str, ...]:
        return tuple(d.name for d in self.decisions if d.action == action)


def wanted(state: LabState, record: ProcessRecord) -> bool:
    """Should the supervisor keep ``record``'s daemon running?"""
    if not record.supervised:
        return False
    kind, _, node = record.name.partition("/")
    return not (kind == "nodeagent" and node in state.stopped_nodes)


def plan(*, state: LabState, alive: Collection[str], tracks: Mapping[str, Track],
         delays: Mapping[str, float], now: float) -> Plan:
    """Decide, for every supervised daemon in ``state``, what to do at ``now``.

    ``alive``: names of the records whose process is running. ``delays``: the
    delay each daemon's back-off gives next (BASE for a name not in it).
    """
    decisions: list[Decision] = []
    kept: dict[str, Track] = {}
    for name, record in sorted(state.processes.items()):
        if not record.supervised:
            continue
        track = tracks.get(name, Track())
        if not wanted(state, record):
            if track.restart_at is not None:
                decisions.append(Decision(name, Action.FORGET,
                                          reason="stopped on purpose (stop-node)"))
            continue
        if name in alive:
            if track.running_since is None or track.dead_since is not None:
                track = Track(running_since=now, backed_off=track.backed_off)
            elif track.backed_off and now - track.running_since >= STABLE_AFTER:
                decisions.append(Decision(name, Action.RESET, reason=(
                    f"running {now - track.running_since:.0f}s since its last restart")))
                track = replace(track, backed_off=False)
            kept[name] = track
            continue
        just_died = track.dead_since is None or track.restart_at is None
        if just_died:
            delay = max(0.0, delays.get(name, BASE))
            track = Track(dead_since=now, restart_at=now + delay,
                          backed_off=track.backed_off)
            decisions.append(Decision(name, Action.DIED, at=track.restart_at,
                                      reason=f"restart in {delay:.1f}s"))
        assert track.restart_at is not None
        if track.restart_at <= now:
            decisions.append(Decision(name, Action.RESTART, reason=(
                f"dead since {track.dead_since:.1f}, due at {track.restart_at:.1f}")))
            track = Track(running_since=now, backed_off=True)
        elif not just_died:
            decisions.append(Decision(name, Action.WAIT, at=track.restart_at))
        kept[name] = track
    pending = [t.restart_at for t in kept.values() if t.restart_at is not None]
    return Plan(decisions=tuple(decisions), tracks=kept,
                wake_at=min(pending) if pending else None)


def describe_exit(code: int | None) -> str:
    """``Popen.returncode`` (``-N``: killed by signal N; None: unknown) for people."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"
