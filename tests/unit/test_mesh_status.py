"""How far behind a meshagent is, as the apiserver works it out and the CLI
tells it; when ``apply --wait-propagated`` may return (pure, plus the wait loop
against a scripted client)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from apiserver.meshproxy import KindHistory, Lag, lag_of
from apiserver.watchcache import ADDED, DELETED, MODIFIED, CachedObject, CacheEvent
from shoal.api.core.v1 import core_pb2
from shoal.api.mesh.v1 import mesh_pb2 as pb
from shoal.cli import meshing
from shoal.cli.meshing import MeshCommandFailed, lag_text, propagation
from shoal.cli.reporting import UsageError
from shoal.cli.session import Session
from shoal.kinds import builtin_kinds


def _obj(name: str, revision: int, node: str | None = None) -> CachedObject:
    fields = {} if node is None else {"spec.nodeName": node}
    return CachedObject(key=f"/registry/x/default/{name}", namespace="default", name=name,
                        revision=revision, raw=b"", labels={}, fields=fields)


def _ev(type_: int, obj: CachedObject) -> CacheEvent:
    return CacheEvent(type=type_, obj=obj, prev=None, revision=obj.revision)


SERVICES = KindHistory(
    objects=[_obj("a", 10), _obj("b", 14)],
    events=[_ev(ADDED, _obj("a", 10)), _ev(ADDED, _obj("b", 12)), _ev(MODIFIED, _obj("b", 14)),
            _ev(DELETED, _obj("c", 15))],
    window_start=5)
PODS = KindHistory(
    objects=[_obj("here", 11, "n1"), _obj("there", 20, "n2")],
    events=[_ev(ADDED, _obj("here", 11, "n1")), _ev(ADDED, _obj("there", 20, "n2"))],
    window_start=5)


@pytest.mark.parametrize("generations,overall,lag", [
    ({"services": 15, "pods": 11}, 11, Lag(required=15, pending=0)),
    ({"services": 12, "pods": 11}, 11, Lag(required=15, pending=2)),  # 14 and the delete
    ({"services": 15, "pods": 10}, 10, Lag(required=15, pending=1)),  # n2's pod never counts
    ({"services": 3, "pods": 11}, 3, Lag(required=15, pending=-1)),  # before the window
    ({}, 30, Lag(required=30, pending=0)),  # no per-resource view: the cluster revision
    ({}, 29, Lag(required=30, pending=-1)),
    ({"gadgets": 1}, 30, Lag(required=30, pending=0)),  # unknown resources are ignored
])
def test_lag_counts_only_changes_the_node_should_apply(generations: dict[str, int],
                                                       overall: int, lag: Lag) -> None:
    got = lag_of(generations=generations, overall=overall,
                 kinds={"services": SERVICES, "pods": PODS}, node="n1", cluster_revision=30)
    assert got == lag


def _entry(node: str, *, generation: int = 0, generations: dict[str, int] | None = None,
           required: int = 0, pending: int = 0, error: str = "") -> pb.NodeMeshStatus:
    if error:
        return pb.NodeMeshStatus(node=node, error=error)
    return pb.NodeMeshStatus(node=node, required_generation=required, pending_changes=pending,
                             status=pb.AgentStatus(node=node, generation=generation,
                                                   generations=generations or {}))


@pytest.mark.parametrize("entry,text", [
    (_entry("n", generation=30, required=30), "SYNCED"),
    (_entry("n", generation=20, required=30, pending=1), "STALE (1 change not applied)"),
    (_entry("n", generation=20, required=30, pending=4), "STALE (4 changes not applied)"),
    (_entry("n", generation=20, required=30, pending=-1), "STALE (10 revisions behind)"),
    (_entry("n", generation=30, required=30, pending=-1), "SYNCED"),
    (_entry("n", error="cannot reach the meshagent at 10.0.0.3:15000: failed to connect "
                       "to all addresses; last error: UNKNOWN: ipv4:10.0.0.3:15000: "
                       "Connection refused"), "UNREACHABLE: Connection refused"),
    (_entry("n", error='user "bob" may not use the API of this node'),
     'UNREACHABLE: user "bob" may not use the API of this node'),
])
def test_lag_text(entry: pb.NodeMeshStatus, text: str) -> None:
    assert lag_text(entry) == text


def test_status_table_rows() -> None:
    resp = pb.MeshStatusResponse(cluster_revision=30, nodes=[
        _entry("n1", generation=30, required=30),
        _entry("n2", error="x: Connection refused")])
    resp.nodes[0].status.certificates.add(state="VALID")
    resp.nodes[0].status.certificates.add(state="PENDING")
    resp.nodes[0].status.captured_pods = 3
    table = meshing.status_table(resp, now=0.0)
    assert table.rows == (
        ("n1", "30", "30", "SYNCED", "2 (1 not valid)", "3", "<unknown>"),
        ("n2", "<none>", "30", "UNREACHABLE: Connection refused", "<none>", "<none>",
         "<none>"))


WRITTEN = {"configmaps": 40, "services": 38}


@pytest.mark.parametrize("entries,confirmed,lagging", [
    ([_entry("a", generation=45, generations={"configmaps": 41, "services": 38})],
     ["a"], {}),
    ([_entry("a", generation=39, generations={"configmaps": 39, "services": 45})],
     [], {"a": "configmaps at 39, wrote 40"}),
    # no per-resource generation for configmaps: the overall one counts
    ([_entry("a", generation=40, generations={"services": 50})], ["a"], {}),
    ([_entry("a", generation=39, generations={"services": 50})],
     [], {"a": "configmaps at 39, wrote 40"}),
    ([_entry("a", generation=50), _entry("b", error="boom")], ["a"], {"b": "UNREACHABLE: boom"}),
])
def test_propagation(entries: list[pb.NodeMeshStatus], confirmed: list[str],
                     lagging: dict[str, str]) -> None:
    state = propagation(pb.MeshStatusResponse(nodes=entries), WRITTEN)
    assert [n for n, _ in state.confirmed] == confirmed
    assert dict(state.lagging) == lagging
    assert state.done is (not lagging)


@pytest.mark.parametrize("text,want", [
    ("web", ("dflt", "web")), ("demo/web", ("demo", "web")),
])
def test_split_service(text: str, want: tuple[str, str]) -> None:
    assert meshing.split_service(text, "dflt") == want


@pytest.mark.parametrize("text", ["a/b/c", "demo/", ""])
def test_split_service_refuses_bad_names(text: str) -> None:
    with pytest.raises(UsageError):
        meshing.split_service(text, "dflt")


def test_endpoint_nodes_groups_ready_and_not_ready_addresses_by_node() -> None:
    eps = core_pb2.Endpoints()
    s = eps.subsets.add()
    s.addresses.add(ip="10.0.1.2", node_name="n1")
    s.addresses.add(ip="10.0.2.2", node_name="n2")
    s.not_ready_addresses.add(ip="10.0.1.3", node_name="n1")
    s.addresses.add(ip="10.0.9.9")  # no node: nobody to ask
    assert meshing.endpoint_nodes(eps) == {"n1": ["10.0.1.2", "10.0.1.3"], "n2": ["10.0.2.2"]}
    assert meshing.endpoint_nodes(None) == {}


class ScriptedClient:
    """mesh_status answers, one per call (the last repeats)."""

    def __init__(self, *answers: pb.MeshStatusResponse) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def mesh_status(self, **_: Any) -> pb.MeshStatusResponse:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def _session(client: ScriptedClient, t: FakeTime) -> Session:
    s = Session(kinds=builtin_kinds(), out=io.StringIO(), err=io.StringIO(),
                stdin=io.StringIO(), clock=t.clock)
    s._client = client  # type: ignore[assignment]
    return s


async def test_wait_returns_when_the_agents_catch_up() -> None:
    t = FakeTime()
    behind = pb.MeshStatusResponse(nodes=[_entry("a", generation=39), _entry("b", generation=41)])
    caught_up = pb.MeshStatusResponse(nodes=[_entry("a", generation=41),
                                             _entry("b", generation=41)])
    client = ScriptedClient(behind, behind, caught_up)
    session = _session(client, t)
    assert await meshing.wait_propagated(session, {"configmaps": 40}, timeout=10.0,
                                         sleep=t.sleep) == 0
    assert client.calls == 3
    assert session.out.getvalue() == "propagated to 2 meshagents: a, b\n"  # type: ignore[attr-defined]


async def test_wait_gives_up_at_the_deadline_naming_who_lags() -> None:
    t = FakeTime()
    client = ScriptedClient(pb.MeshStatusResponse(nodes=[_entry("a", generation=39),
                                                         _entry("b", generation=41)]))
    session = _session(client, t)
    with pytest.raises(MeshCommandFailed, match=r"timed out after 2s .* lagging: a \("):
        await meshing.wait_propagated(session, {"configmaps": 40}, timeout=2.0, sleep=t.sleep)
    assert t.now == pytest.approx(1002.0)
    assert "confirmed by: b" in session.err.getvalue()  # type: ignore[attr-defined]


async def test_wait_fails_at_once_when_no_agent_answers() -> None:
    t = FakeTime()
    client = ScriptedClient(pb.MeshStatusResponse(nodes=[_entry("a", error="refused"),
                                                         _entry("b", error="refused")]))
    with pytest.raises(MeshCommandFailed, match="no meshagent answers on any node.*a: refused"):
        await meshing.wait_propagated(_session(client, t), {"configmaps": 40}, timeout=60.0,
                                      sleep=t.sleep)
    assert client.calls == 1


async def test_wait_with_no_nodes_or_nothing_written_returns_at_once() -> None:
    t = FakeTime()
    client = ScriptedClient(pb.MeshStatusResponse())
    session = _session(client, t)
    assert await meshing.wait_propagated(session, {"configmaps": 40}, timeout=5.0,
                                         sleep=t.sleep) == 0
    assert "no nodes" in session.err.getvalue()  # type: ignore[attr-defined]
    assert await meshing.wait_propagated(session, {}, timeout=5.0, sleep=t.sleep) == 0
    assert client.calls == 1
