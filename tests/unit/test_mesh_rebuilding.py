"""meshagent.rebuilding: the agent's tables are rebuilt once per burst of informer
events, off the connection path, and a connection never reads tables older than the
debounce. A fake clock and timers (shoal.testing.timers)."""

from __future__ import annotations

import logging

import pytest

from meshagent.rebuilding import Rebuilder
from shoal.testing.timers import FakeTimer

DELAY = 0.005


class Tables:
    """A build that copies a source: what the data path reads is ``built``."""

    def __init__(self) -> None:
        self.source = 0
        self.built = -1
        self.fail = False

    def build(self) -> None:
        if self.fail:
            raise RuntimeError("bad config")
        self.built = self.source


def started() -> tuple[Rebuilder, Tables, FakeTimer]:
    tables, timer = Tables(), FakeTimer()
    r = Rebuilder(tables.build, delay=DELAY, timer=timer)
    r.start()
    return r, tables, timer


def test_start_builds_what_the_informers_listed_once() -> None:
    tables, timer = Tables(), FakeTimer()
    r = Rebuilder(tables.build, delay=DELAY, timer=timer)
    for i in range(50):  # the informers' first lists: no timer, nothing built yet
        tables.source = i
        r.mark()
    assert (r.builds, timer.pending) == (0, 0)
    r.start()
    assert (r.builds, tables.built, r.dirty) == (1, 49, False)


@pytest.mark.parametrize("events", [1, 2, 100])
def test_a_burst_of_events_is_one_rebuild_before_the_next_request(events: int) -> None:
    r, tables, timer = started()
    for i in range(events):
        tables.source = i + 1
        r.mark()
    assert timer.pending == 1  # one rebuild scheduled for the whole burst
    assert r.builds == 1  # nothing rebuilt on the informer's path
    assert timer.advance(DELAY) == 1
    assert (r.builds, tables.built) == (2, events)
    r.current()  # the next request: reads, rebuilds nothing
    assert (r.builds, tables.built) == (2, events)


def test_a_request_within_the_debounce_reads_the_previous_tables() -> None:
    r, tables, timer = started()
    tables.source = 1
    r.mark()
    timer.advance(DELAY / 2)
    r.current()
    assert (r.builds, tables.built) == (1, 0)  # not rebuilt on the connection path


def test_a_request_after_the_debounce_rebuilds_inline_once_if_the_timer_is_late() -> None:
    r, tables, timer = started()
    tables.source = 1
    r.mark()
    timer.advance(DELAY, run=False)  # a busy loop: the timer has not run yet
    r.current()
    assert (r.builds, tables.built) == (2, 1)  # never older than the debounce
    r.current()
    timer.run_due()  # the late timer finds nothing to do
    assert r.builds == 2


def test_a_mark_after_an_inline_rebuild_is_built_by_the_pending_timer() -> None:
    r, tables, timer = started()
    r.mark()
    timer.advance(DELAY, run=False)
    r.current()
    tables.source = 7
    r.mark()
    assert timer.pending == 1  # no second timer
    timer.run_due()
    assert (r.builds, tables.built) == (3, 7)
    tables.source = 8
    r.mark()  # and the next burst arms a timer again
    assert timer.pending == 1
    timer.advance(DELAY)
    assert tables.built == 8


def test_before_start_a_request_rebuilds_inline_when_dirty() -> None:
    tables, timer = Tables(), FakeTimer()
    r = Rebuilder(tables.build, delay=DELAY, timer=timer)
    tables.source = 3
    r.mark()
    r.current()
    r.current()
    assert (r.builds, tables.built, timer.pending) == (1, 3, 0)


def test_a_failing_rebuild_is_logged_and_the_next_change_retries(
        caplog: pytest.LogCaptureFixture) -> None:
    r, tables, timer = started()
    tables.fail, tables.source = True, 1
    r.mark()
    with caplog.at_level(logging.ERROR, logger="meshagent.rebuilding"):
        timer.advance(DELAY)
    assert "rebuilding the tables failed" in caplog.text
    r.current()
    assert tables.built == 0  # the last good tables
    tables.fail = False
    r.mark()
    timer.advance(DELAY)
    assert tables.built == 1


def test_listeners_hear_every_build() -> None:
    r, tables, timer = started()
    heard: list[int] = []
    r.on_built(lambda: heard.append(tables.built))
    tables.source = 5
    r.mark()
    r.mark()
    timer.advance(DELAY)
    assert heard == [5]
