"""Progress lines: on a terminal only, rewritten in place, cleared before normal output."""

from __future__ import annotations

import io

import pytest

from shoal.api.apps.v1 import apps_pb2
from shoal.cli.progress import ProgressLine, bar
from shoal.cli.rollouts import replica_counts


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_is_written_when_the_stream_is_not_a_terminal() -> None:
    out = io.StringIO()
    line = ProgressLine(out)
    line.update("evicted 1/2")
    line.clear()
    assert out.getvalue() == ""


def test_on_a_terminal_the_line_is_rewritten_only_when_it_changes_and_cleared() -> None:
    out = Terminal()
    line = ProgressLine(out)
    line.update("a")
    line.update("a")
    line.update("b")
    line.clear()
    line.clear()
    assert out.getvalue() == "\r\033[Ka\r\033[Kb\r\033[K"


@pytest.mark.parametrize(("done", "total", "want"), [
    (0, 4, "[....] 0/4"), (1, 4, "[#...] 1/4"), (4, 4, "[####] 4/4"), (9, 4, "[####] 9/4"),
    (0, 0, "[....] 0/0"),
])
def test_bar(done: int, total: int, want: str) -> None:
    assert bar(done, total, width=4) == want


def test_replica_counts_of_a_deployment_and_a_daemonset() -> None:
    d = apps_pb2.Deployment()
    d.spec.replicas = 4
    d.status.updated_replicas, d.status.ready_replicas, d.status.available_replicas = 2, 3, 1
    assert replica_counts(d) == "updated [#####.....] 2/4, ready 3/4, available 1/4"
    ds = apps_pb2.DaemonSet()
    ds.status.desired_number_scheduled, ds.status.updated_number_scheduled = 3, 3
    ds.status.number_ready, ds.status.number_available = 3, 2
    assert replica_counts(ds) == "updated [##########] 3/3, ready 3/3, available 2/3"
