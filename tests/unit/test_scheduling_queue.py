"""The scheduler's queue of pending pods and its PodScheduled condition, pure (times passed in)."""

from __future__ import annotations

from apiserver.controllers.scheduling import SchedulingQueue, unschedulable_status
from shoal.api.core.v1 import core_pb2


def drain(q: SchedulingQueue, now: float) -> list[str]:
    out = []
    while (key := q.pop(now)) is not None:
        out.append(key)
    return out


def test_fifo_and_adds_collapse() -> None:
    q = SchedulingQueue()
    for k in ("a", "b", "a", "c"):
        q.add(k, 0.0)
    assert drain(q, 0.0) == ["a", "b", "c"]


def test_unschedulable_waits_for_a_cluster_change_with_back_off() -> None:
    q = SchedulingQueue(initial_backoff=1.0, max_backoff=10.0)
    q.add("p", 0.0)
    assert q.pop(0.0) == "p"
    q.failed("p", 0.0, unschedulable=True)
    assert q.unschedulable == {"p"}
    assert drain(q, 100.0) == []                   # nothing changed: stays put
    assert q.move_all(0.5) == 1                    # a node was added, still backing off
    assert q.pop(0.5) is None and q.next_wakeup() == 1.0
    assert q.pop(1.0) == "p"


def test_back_off_doubles_up_to_the_cap_and_resets() -> None:
    q = SchedulingQueue(initial_backoff=1.0, max_backoff=10.0)
    t = 0.0
    waits = []
    q.add("p", t)
    for _ in range(6):
        assert q.pop(t) == "p"
        q.failed("p", t, unschedulable=False)      # an error: back-off queue
        wake = q.next_wakeup()
        assert wake is not None
        waits.append(wake - t)
        t = wake
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert q.pop(t) == "p"
    q.succeeded("p")
    q.add("p", t)
    assert q.pop(t) == "p"


def test_affinity_only_moves_and_periodic_flush() -> None:
    q = SchedulingQueue(initial_backoff=0.0)
    for k, aff in (("plain", False), ("affine", True)):
        q.add(k, 0.0)
        q.pop(0.0)
        q.failed(k, 0.0, unschedulable=True, affinity=aff)
    assert q.move_all(5.0, affinity_only=True) == 1
    assert drain(q, 5.0) == ["affine"]
    assert q.flush(59.0, max_age=60.0) == 0
    assert q.flush(60.0, max_age=60.0) == 1
    assert drain(q, 60.0) == ["plain"]


def test_remove_drops_a_key_everywhere() -> None:
    q = SchedulingQueue()
    q.add("a", 0.0)
    q.add("b", 0.0)
    q.remove("a")
    assert "a" not in q and drain(q, 0.0) == ["b"]
    q.failed("b", 0.0, unschedulable=False)
    q.remove("b")
    assert len(q) == 0 and q.next_wakeup() is None


def test_unschedulable_condition_written_only_when_it_changes() -> None:
    pod = core_pb2.Pod()
    pod.metadata.name = "p"
    first = unschedulable_status(pod, "0/1 nodes are available: 1 Insufficient cpu.", now=100.0)
    assert first is not None
    cond = first.status.conditions[0]
    assert (cond.type, cond.status, cond.reason) == ("PodScheduled", "False", "Unschedulable")
    assert cond.last_transition_time.seconds == 100
    assert unschedulable_status(first, cond.message, now=200.0) is None
    again = unschedulable_status(first, "no nodes available to schedule pods", now=200.0)
    assert again is not None
    assert again.status.conditions[0].last_transition_time.seconds == 100
