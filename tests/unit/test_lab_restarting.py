"""The supervisor's restart decisions: pure, table-driven, with a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from shoal.backoff import Backoff
from shoal.lab import restarting
from shoal.lab.restarting import Action, Decision, Track, describe_exit, plan, wanted
from shoal.lab.state import UP, LabState, ProcessRecord

T0 = 1000.0


def rec(name: str, *, supervised: bool = True, pid: int = 100) -> ProcessRecord:
    return ProcessRecord(name=name, pid=pid, start_time=5, argv=("x",), supervised=supervised)


def lab(*names: str, stopped: tuple[str, ...] = (), unsupervised: tuple[str, ...] = ()
        ) -> LabState:
    state = LabState(lab_dir="/lab", nodes=["node-1", "node-2"], phase=UP,
                     stopped_nodes=list(stopped))
    for name in (*names, *unsupervised):
        state.processes[name] = rec(name, supervised=name not in unsupervised)
    return state


RUNNING = Track(running_since=T0 - 5)
RESTARTED = Track(running_since=T0 - 5, backed_off=True)
DEAD = Track(dead_since=T0 - 1, restart_at=T0 + 3)
DUE = Track(dead_since=T0 - 4, restart_at=T0)


@pytest.mark.parametrize(
    ("case", "state", "alive", "tracks", "delays", "decisions", "after"),
    [
        ("first seen running: remembered, nothing to do",
         lab("apiserver"), {"apiserver"}, {}, {}, [],
         {"apiserver": Track(running_since=T0)}),
        ("still running: unchanged",
         lab("apiserver"), {"apiserver"}, {"apiserver": RUNNING}, {}, [],
         {"apiserver": RUNNING}),
        ("found dead: restart after its back-off delay",
         lab("apiserver"), set(), {"apiserver": RUNNING}, {"apiserver": 2.0},
         [Decision("apiserver", Action.DIED, at=T0 + 2, reason="restart in 2.0s")],
         {"apiserver": Track(dead_since=T0, restart_at=T0 + 2)}),
        ("found dead at the supervisor's first look: the same",
         lab("etcd"), set(), {}, {"etcd": 0.5},
         [Decision("etcd", Action.DIED, at=T0 + 0.5, reason="restart in 0.5s")],
         {"etcd": Track(dead_since=T0, restart_at=T0 + 0.5)}),
        ("no delay known: BASE",
         lab("etcd"), set(), {}, {},
         [Decision("etcd", Action.DIED, at=T0 + restarting.BASE, reason="restart in 0.5s")],
         {"etcd": Track(dead_since=T0, restart_at=T0 + restarting.BASE)}),
        ("dead, not due yet: wait",
         lab("registry"), set(), {"registry": DEAD}, {},
         [Decision("registry", Action.WAIT, at=T0 + 3)], {"registry": DEAD}),
        ("dead and due: restart now",
         lab("registry"), set(), {"registry": DUE}, {},
         [Decision("registry", Action.RESTART,
                   reason=f"dead since {T0 - 4:.1f}, due at {T0:.1f}")],
         {"registry": Track(running_since=T0, backed_off=True)}),
        ("no delay at all: found dead and restarted in one look",
         lab("registry"), set(), {"registry": RUNNING}, {"registry": 0.0},
         [Decision("registry", Action.DIED, at=T0, reason="restart in 0.0s"),
          Decision("registry", Action.RESTART,
                   reason=f"dead since {T0:.1f}, due at {T0:.1f}")],
         {"registry": Track(running_since=T0, backed_off=True)}),
        ("a node agent of a node stopped on purpose: never restarted",
         lab("nodeagent/node-1", stopped=("node-1",)), set(),
         {"nodeagent/node-1": RUNNING}, {}, [], {}),
        ("stop-node while its restart is pending: the restart is dropped",
         lab("nodeagent/node-1", stopped=("node-1",)), set(),
         {"nodeagent/node-1": DEAD}, {},
         [Decision("nodeagent/node-1", Action.FORGET,
                   reason="stopped on purpose (stop-node)")], {}),
        ("another node's agent is still kept running",
         lab("nodeagent/node-1", "nodeagent/node-2", stopped=("node-1",)), set(),
         {"nodeagent/node-2": RUNNING}, {"nodeagent/node-2": 1.0},
         [Decision("nodeagent/node-2", Action.DIED, at=T0 + 1, reason="restart in 1.0s")],
         {"nodeagent/node-2": Track(dead_since=T0, restart_at=T0 + 1)}),
        ("not supervised (containerd, joins, the supervisor): ignored",
         lab(unsupervised=("containerd/node-1", "supervisor")), set(), {}, {}, [], {}),
        ("back after someone else restarted it (start-node): running again",
         lab("nodeagent/node-2"), {"nodeagent/node-2"},
         {"nodeagent/node-2": replace(DEAD, backed_off=True)}, {}, [],
         {"nodeagent/node-2": Track(running_since=T0, backed_off=True)}),
        ("running STABLE_AFTER since its restart: back-off reset",
         lab("apiserver"), {"apiserver"},
         {"apiserver": Track(running_since=T0 - restarting.STABLE_AFTER, backed_off=True)},
         {}, [Decision("apiserver", Action.RESET, reason="running 30s since its last restart")],
         {"apiserver": Track(running_since=T0 - restarting.STABLE_AFTER)}),
        ("running, but not that long since its restart: no reset yet",
         lab("apiserver"), {"apiserver"}, {"apiserver": RESTARTED}, {}, [],
         {"apiserver": RESTARTED}),
        ("a daemon gone from the state: forgotten",
         lab("etcd"), {"etcd"}, {"etcd": RUNNING, "nodeagent/node-9": DEAD}, {}, [],
         {"etcd": RUNNING}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_plan(case: str, state: LabState, alive: set[str], tracks: dict[str, Track],
              delays: dict[str, float], decisions: list[Decision],
              after: dict[str, Track]) -> None:
    got = plan(state=state, alive=alive, tracks=tracks, delays=delays, now=T0)
    assert list(got.decisions) == decisions, case
    assert dict(got.tracks) == after, case


def test_wake_at_is_the_earliest_pending_restart() -> None:
    state = lab("etcd", "apiserver", "registry")
    got = plan(state=state, alive={"registry"}, now=T0,
               tracks={"etcd": DEAD, "apiserver": RUNNING}, delays={"apiserver": 1.5})
    assert got.wake_at == T0 + 1.5
    assert got.names(Action.DIED) == ("apiserver",)
    assert got.names(Action.WAIT) == ("etcd",)
    assert plan(state=state, alive={"etcd", "apiserver", "registry"}, tracks={}, delays={},
                now=T0).wake_at is None


def test_a_crash_loop_backs_off_exponentially_up_to_the_cap() -> None:
    """The executor's part, played with a fake clock: a daemon that dies at once
    after every restart is restarted ever later (Backoff without jitter)."""
    state = lab("apiserver")
    backoff = Backoff(base=restarting.BASE, cap=restarting.CAP, factor=restarting.FACTOR,
                      jitter=0)
    delays = {"apiserver": backoff.next()}
    tracks: dict[str, Track] = {"apiserver": RUNNING}
    now, died_at = T0, T0
    waited: list[float] = []
    while len(waited) < 8:
        got = plan(state=state, alive=set(), tracks=tracks, delays=delays, now=now)
        tracks = dict(got.tracks)
        if "apiserver" in got.names(Action.DIED):
            died_at = now
        if "apiserver" in got.names(Action.RESTART):
            waited.append(now - died_at)
            delays["apiserver"] = backoff.next()
            now += 0.1  # it dies again at once
            continue
        assert got.wake_at is not None
        now = got.wake_at  # the supervisor sleeps until the restart is due
    assert waited == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])


def test_stable_again_resets_the_back_off() -> None:
    state = lab("etcd")
    tracks = {"etcd": Track(running_since=T0, backed_off=True)}
    now = T0 + restarting.STABLE_AFTER - 1
    assert plan(state=state, alive={"etcd"}, tracks=tracks, delays={}, now=now).decisions == ()
    got = plan(state=state, alive={"etcd"}, tracks=tracks, delays={},
               now=T0 + restarting.STABLE_AFTER)
    assert got.names(Action.RESET) == ("etcd",)
    again = plan(state=state, alive={"etcd"}, tracks=got.tracks, delays={}, now=T0 + 999)
    assert again.decisions == ()  # reset once, not at every look


@pytest.mark.parametrize(("name", "stopped", "supervised", "expected"), [
    ("apiserver", (), True, True),
    ("nodeagent/node-1", (), True, True),
    ("nodeagent/node-1", ("node-1",), True, False),
    ("nodeagent/node-2", ("node-1",), True, True),
    ("containerd/node-1", (), False, False),
    ("supervisor", (), False, False),
])
def test_wanted(name: str, stopped: tuple[str, ...], supervised: bool, expected: bool) -> None:
    state = lab(stopped=stopped)
    assert wanted(state, rec(name, supervised=supervised)) is expected


@pytest.mark.parametrize(("code", "text"), [
    (None, "exit status unknown"),
    (-9, "killed by SIGKILL"),
    (-15, "killed by SIGTERM"),
    (0, "exited with code 0"),
    (3, "exited with code 3"),
    (-200, "killed by signal 200"),
])
def test_describe_exit(code: int | None, text: str) -> None:
    assert describe_exit(code) == text
