"""Storage maintenance schedules (apiserver.maintenance) and etcd's disk-latency
figures (apiserver.storage.etcdadmin), pure, on a fake clock."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from apiserver.maintenance import CompactionSchedule, defrag_due, parse_window
from apiserver.storage.etcdadmin import disk_latency, histogram_quantile, restore_command
from shoal import errors


def test_compaction_keeps_the_retention_window() -> None:
    s = CompactionSchedule(retention=60.0)
    assert s.tick == 12.0
    # (time, current revision) as the loop observes them, and what it compacts to.
    steps = [(0, 10, None), (30, 20, None), (59, 25, None),
             (60, 30, 10),     # revision 10 was current 60 s ago: everything before goes
             (75, 30, None),   # nothing new has aged out
             (90, 31, 20),
             (130, 40, 30),    # 25 (t=59) and 30 (t=60) aged out: the newest of them
             (200, 40, 40)]   # 31 (t=90) and 40 (t=130) both aged out
    for now, revision, want in steps:
        s.observe(float(now), revision)
        got = s.target(float(now))
        assert got == want, f"at t={now}"
        if got is not None:
            s.compacted(got)


def test_a_quiet_store_is_compacted_once() -> None:
    s = CompactionSchedule(retention=10.0)
    s.observe(0.0, 5)
    assert s.target(10.0) == 5
    s.compacted(5)
    for t in (20.0, 30.0, 40.0):
        s.observe(t, 5)     # the revision does not move
        assert s.target(t) is None


UTC = dt.UTC


def at(hour: int, minute: int = 0, day: int = 1) -> dt.datetime:
    return dt.datetime(2026, 1, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(("now", "last", "interval", "window", "due"), [
    (at(12), None, 0.0, "", False),                    # off
    (at(12), None, 3600.0, "", True),                  # never done: now
    (at(12, 30), at(12), 3600.0, "", False),           # not an interval yet
    (at(13), at(12), 3600.0, "", True),
    (at(12), None, 3600.0, "02:00-05:00", False),      # outside the off-peak window
    (at(3), None, 3600.0, "02:00-05:00", True),
    (at(23, 30), None, 3600.0, "23:00-01:00", True),   # a window over midnight
    (at(0, 30), None, 3600.0, "23:00-01:00", True),
    (at(1, 30), None, 3600.0, "23:00-01:00", False),
    (at(3, day=2), at(3), 86400.0, "02:00-05:00", True),
])
def test_defrag_due(now: dt.datetime, last: dt.datetime | None, interval: float,
                    window: str, due: bool) -> None:
    assert defrag_due(now, last=last, interval=interval, window=parse_window(window)) is due


@pytest.mark.parametrize("bad", ["2-5", "02:00", "25:00-01:00", "a-b"])
def test_a_bad_defrag_window_is_named(bad: str) -> None:
    with pytest.raises(errors.BadRequest, match="defrag window"):
        parse_window(bad)


@pytest.mark.parametrize(("buckets", "want"), [
    ([], None),
    ([(0.001, 0.0), (math.inf, 0.0)], None),
    ([(0.001, 50.0), (0.002, 100.0), (math.inf, 100.0)], 0.00198),
    ([(0.001, 99.0), (0.008, 100.0), (math.inf, 100.0)], 0.001),
    ([(0.001, 0.0), (0.016, 90.0), (math.inf, 100.0)], 0.016),   # p99 in +Inf: its floor
])
def test_histogram_quantile(buckets: list[tuple[float, float]], want: float | None) -> None:
    got = histogram_quantile(0.99, buckets)
    assert (got is None and want is None) or got == pytest.approx(want)


METRICS = """# HELP etcd_disk_wal_fsync_duration_seconds ...
# TYPE etcd_disk_wal_fsync_duration_seconds histogram
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.001"} 10
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.008"} 20
etcd_disk_wal_fsync_duration_seconds_bucket{le="0.016"} 100
etcd_disk_wal_fsync_duration_seconds_bucket{le="+Inf"} 100
etcd_disk_wal_fsync_duration_seconds_sum 0.9
etcd_disk_wal_fsync_duration_seconds_count 100
etcd_disk_backend_commit_duration_seconds_bucket{le="0.001"} 0
etcd_disk_backend_commit_duration_seconds_bucket{le="0.002"} 100
etcd_disk_backend_commit_duration_seconds_bucket{le="+Inf"} 100
"""


def test_disk_latency_warns_on_a_slow_fsync_only() -> None:
    lat = disk_latency(METRICS)
    assert lat.fsync_p99 == pytest.approx(0.0159)
    assert lat.commit_p99 == pytest.approx(0.00199)
    assert lat.slow == ["WAL fsync p99 15.9 ms > 10 ms"]
    assert disk_latency("").slow == []


def test_restore_command() -> None:
    from pathlib import Path

    argv = restore_command(Path("/s.db"), data_dir=Path("/new"), name="m1",
                           peer_url="http://127.0.0.1:2380",
                           initial_cluster="m1=http://127.0.0.1:2380", tool="etcdctl")
    assert argv[:4] == ["etcdctl", "snapshot", "restore", "/s.db"]
    assert argv[argv.index("--data-dir") + 1] == "/new"
    assert argv[argv.index("--initial-cluster") + 1] == "m1=http://127.0.0.1:2380"
