"""``shoal get events`` and ``shoal describe pod`` against a live in-process apiserver."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from shoal.api.core.v1 import core_pb2
from shoal.cli.main import main
from shoal.client import AsyncClient
from shoal.events import EventRecorder


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def shoal(apiserver: Any, capsys: pytest.CaptureFixture[str]) -> Any:
    async def run(*args: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(apiserver.config_path), *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Result(code, captured.out, captured.err)

    return run


def event(name: str, ns: str, reason: str, *, last: int = 0, event_time: int = 0
          ) -> core_pb2.Event:
    ev = core_pb2.Event(reason=reason, message=f"{reason} happened", type="Normal")
    ev.metadata.name, ev.metadata.namespace = name, ns
    ev.involved_object.kind, ev.involved_object.name = "Pod", "web"
    ev.involved_object.namespace = ns
    if last:
        ev.last_timestamp.CopyFrom(timestamp_pb2.Timestamp(seconds=last))
        ev.first_timestamp.CopyFrom(timestamp_pb2.Timestamp(seconds=last))
        ev.count = 1
    if event_time:
        ev.event_time.CopyFrom(timestamp_pb2.Timestamp(seconds=event_time))
    return ev


async def test_get_events_sorts_by_time_with_kubectls_columns(
        shoal: Any, client: AsyncClient, namespace: str) -> None:
    base = 1_700_000_000
    # Created out of order; one has only eventTime (the newer API's field).
    await client.create(event("c", namespace, "Third", last=base + 300))
    await client.create(event("a", namespace, "First", last=base + 100))
    await client.create(event("b", namespace, "Second", event_time=base + 200))
    r = await shoal("get", "events", "-n", namespace)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert [line.split()[2] for line in lines[1:]] == ["First", "Second", "Third"]
    assert all("pod/web" in line for line in lines[1:])


async def test_describe_pod_lists_the_events_a_recorder_wrote(
        shoal: Any, client: AsyncClient, namespace: str) -> None:
    p = core_pb2.Pod()
    p.metadata.name = "web"
    p.spec.containers.add(name="app", image="busybox")
    p = await client.create(p)
    recorder = EventRecorder(client, component="shoal-nodeagent", host="node-1")
    recorder.event(p, "Normal", "Pulled", 'Container image "busybox" already present on machine')
    recorder.event(p, "Warning", "BackOff", "Back-off restarting failed container app in pod web")
    recorder.event(p, "Warning", "BackOff", "Back-off restarting failed container app in pod web")
    await recorder.flush()
    r = await shoal("describe", "pod", "web", "-n", namespace)
    assert r.code == 0, r.err
    tail = r.out[r.out.index("Events:"):]
    assert "Pulled" in tail and "already present on machine" in tail
    backoff = next(line for line in tail.splitlines() if "BackOff" in line)
    assert "Warning" in backoff and "shoal-nodeagent" in backoff
    events = await client.list(core_pb2.Event, namespace=namespace)
    assert [e.count for e in events.items if e.reason == "BackOff"] == [2]  # counted, not new
