"""The pure parts of the operator's commands: port-forward targets and ports,
the pod a connection goes to, diff rendering, explain lookups, get -w's relist
after Expired, and the streaming server's WebSocket framing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from nodeagent.streaming import (
    ChannelSocket,
    accept_key,
    encode_frame,
    exit_status,
)
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.diffing import mask_secrets, object_diff, object_path
from shoal.cli.explaining import lookup, render
from shoal.cli.forwarding import (
    PortPair,
    Target,
    choose,
    listen_addresses,
    named_port,
    parse_ports,
    parse_target,
    service_target_port,
)
from shoal.cli.getting import relist_changes
from shoal.kinds import builtin_kinds

# --------------------------------------------------------------------------- port-forward


@pytest.mark.parametrize(("text", "want"), [
    ("web-0", Target("pod", "web-0")),
    ("pod/web-0", Target("pod", "web-0")),
    ("po/web-0", Target("pod", "web-0")),
    ("deploy/web", Target("deploy", "web")),
    ("svc/web", Target("svc", "web")),
    ("Deployment/web", Target("deployment", "web")),
])
def test_port_forward_targets(text: str, want: Target) -> None:
    assert parse_target(text) == want


@pytest.mark.parametrize(("text", "match"), [
    ("cm/settings", "cannot port-forward to cm"),
    ("deploy/", "name the pod"),
])
def test_port_forward_bad_targets_are_named(text: str, match: str) -> None:
    with pytest.raises(errors.BadRequest, match=match):
        parse_target(text)


@pytest.mark.parametrize(("specs", "want"), [
    (["8080"], [PortPair(8080, 8080)]),
    (["8080:80"], [PortPair(8080, 80)]),
    ([":80"], [PortPair(0, 80)]),
    (["5000", "6000:7000"], [PortPair(5000, 5000), PortPair(6000, 7000)]),
])
def test_port_forward_ports(specs: list[str], want: list[PortPair]) -> None:
    assert parse_ports(specs) == want


@pytest.mark.parametrize("spec", ["http", "80:x", "0", "70000", "8080:0", "-1:80"])
def test_port_forward_bad_ports_are_refused_by_name(spec: str) -> None:
    with pytest.raises(errors.BadRequest, match="invalid port"):
        parse_ports([spec])


def test_listen_addresses_localhost_is_both_loopbacks() -> None:
    assert listen_addresses([]) == ["127.0.0.1", "::1"]
    assert listen_addresses(["localhost,10.0.0.5"]) == ["127.0.0.1", "::1", "10.0.0.5"]
    assert listen_addresses(["0.0.0.0"]) == ["0.0.0.0"]


def pod(name: str, *, created: int, ready: bool = True, deleting: bool = False,
        phase: str = "Running") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.metadata.creation_timestamp.seconds = created
    if deleting:
        p.metadata.deletion_timestamp.seconds = created + 100
    p.status.phase = phase
    p.status.conditions.add(type="Ready", status="True" if ready else "False")
    c = p.spec.containers.add(name="web")
    c.ports.add(name="http", container_port=8080)
    return p


@pytest.mark.parametrize(("pods", "want"), [
    ([pod("old", created=1), pod("new", created=5)], "new"),
    ([pod("old", created=1), pod("new", created=5, ready=False)], "old"),
    ([pod("going", created=9, deleting=True), pod("staying", created=1)], "staying"),
    ([pod("pending", created=1, phase="Pending")], None),
    ([], None),
])
def test_the_pod_a_new_connection_goes_to(pods: list[core_pb2.Pod], want: str | None) -> None:
    chosen = choose(pods)
    assert (chosen.metadata.name if chosen else None) == want


def test_service_ports_map_to_target_ports_by_number_or_name() -> None:
    svc = core_pb2.Service()
    svc.metadata.name = "web"
    p = svc.spec.ports.add(port=80)
    p.target_port.str_val = "http"
    q = svc.spec.ports.add(port=81)
    q.target_port.int_val = 9090
    svc.spec.ports.add(port=82)
    assert named_port(pod("a", created=1), service_target_port(svc, 80)) == 8080
    assert service_target_port(svc, 81) == 9090
    assert service_target_port(svc, 82) == 82
    with pytest.raises(errors.BadRequest, match="does not have a service port 99"):
        service_target_port(svc, 99)
    with pytest.raises(errors.BadRequest, match="no container port named grpc"):
        named_port(pod("a", created=1), "grpc")


# --------------------------------------------------------------------------- diff


def cm(value: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "settings", "namespace": "prod", **meta},
            "data": {"k": value}, "status": {"ignored": True}}


def test_object_diff_is_empty_when_nothing_changes() -> None:
    assert object_diff(cm("one"), cm("one")) == ""


def test_object_diff_is_a_unified_diff_named_like_kubectls() -> None:
    text = object_diff(cm("one"), cm("two"))
    lines = text.splitlines()
    assert lines[0] == ("diff -u -N LIVE/v1.ConfigMap.prod.settings "
                        "MERGED/v1.ConfigMap.prod.settings")
    assert lines[1:3] == ["--- LIVE/v1.ConfigMap.prod.settings",
                          "+++ MERGED/v1.ConfigMap.prod.settings"]
    assert "-  k: one" in lines and "+  k: two" in lines
    assert "ignored" not in text  # status is never applied


def test_object_diff_of_a_new_object_adds_every_line() -> None:
    lines = object_diff(None, cm("one")).splitlines()[3:]
    assert lines and all(line.startswith(("+", "@@")) for line in lines)


def test_object_paths_carry_group_version_kind_namespace_and_name() -> None:
    assert object_path({"apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": "web", "namespace": "a"}}) == \
        "apps.v1.Deployment.a.web"
    assert object_path({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "a"}}) == "v1.Namespace.a"


def test_secret_values_are_masked_before_and_after() -> None:
    live = {"kind": "Secret", "data": {"same": "YQ==", "changed": "Yg==", "gone": "Yw=="}}
    merged = {"kind": "Secret", "data": {"same": "YQ==", "changed": "ZA==", "new": "ZQ=="}}
    mask_secrets(live, merged)
    assert live["data"] == {"same": "***", "changed": "*** (before)", "gone": "*** (before)"}
    assert merged["data"] == {"same": "***", "changed": "*** (after)", "new": "*** (after)"}


# --------------------------------------------------------------------------- explain


@pytest.mark.parametrize(("text", "field", "first_line_of_fields"), [
    ("deployment", None, "  apiVersion\t<string>"),
    ("deployments.apps.spec", "FIELD: spec <DeploymentSpec>", "  replicas\t<integer>"),
    ("deploy.spec.replicas", "FIELD: replicas <integer>", None),
    ("pod.spec.containers", "FIELD: containers <[]Container>", "  name\t<string>"),
    ("cm.data", "FIELD: data <map[string]string>", None),
    ("deploy.spec.min_ready_seconds", "FIELD: minReadySeconds <integer>", None),
    ("pod.kind", "FIELD: kind <string>", None),
])
def test_explain_walks_kinds_and_field_paths(text: str, field: str | None,
                                            first_line_of_fields: str | None) -> None:
    out = render(lookup(builtin_kinds(), text))
    lines = out.splitlines()
    assert lines[0].startswith(("KIND:", "GROUP:"))
    assert any(line.startswith("VERSION:") for line in lines[:3])
    if field:
        assert field in lines
    assert "DESCRIPTION:" in lines
    if first_line_of_fields:
        assert lines[lines.index("FIELDS:") + 1] == first_line_of_fields
    else:
        assert "FIELDS:" not in lines


def test_explain_descriptions_are_the_proto_comments() -> None:
    out = render(lookup(builtin_kinds(), "deploy.spec.replicas"))
    assert "Desired number of pods; unset means 1." in out


@pytest.mark.parametrize(("text", "match"), [
    ("frobnicator", 'resource type "frobnicator"'),
    ("pod.spec.frob", 'field "frob" does not exist'),
    ("deploy.spec.replicas.more", 'field "more" does not exist'),
])
def test_explain_refuses_unknown_kinds_and_fields_by_name(text: str, match: str) -> None:
    with pytest.raises(errors.NotFound, match=match):
        lookup(builtin_kinds(), text)


# --------------------------------------------------------------------------- get -w relist


def obj(name: str, uid: str, rv: str) -> core_pb2.ConfigMap:
    o = core_pb2.ConfigMap()
    o.metadata.name, o.metadata.namespace = name, "ns"
    o.metadata.uid, o.metadata.resource_version = uid, rv
    return o


def test_a_relist_after_expired_prints_only_what_changed() -> None:
    last = {"ns/same": obj("same", "u1", "5"), "ns/changed": obj("changed", "u2", "6"),
            "ns/gone": obj("gone", "u3", "7"), "ns/recreated": obj("recreated", "u4", "8")}
    now = [obj("same", "u1", "5"), obj("changed", "u2", "9"), obj("recreated", "u5", "10"),
           obj("new", "u6", "11")]
    got = [(t, o.metadata.name) for t, o in relist_changes(last, now)]
    assert got == [("DELETED", "gone"), ("DELETED", "recreated"), ("MODIFIED", "changed"),
                   ("ADDED", "recreated"), ("ADDED", "new")]


# --------------------------------------------------------------------------- streaming


def test_the_v4_error_channel_gives_the_exit_code() -> None:
    assert exit_status(b'{"status":"Success"}').code == 0
    failure = {"status": "Failure", "reason": "NonZeroExitCode",
               "details": {"causes": [{"reason": "ExitCode", "message": "7"}]}}
    assert exit_status(json.dumps(failure).encode()).code == 7
    broken = exit_status(b'{"status":"Failure","message":"exec: \\"nope\\": not found"}')
    assert (broken.code, broken.message) == (1, 'exec: "nope": not found')


def test_the_websocket_accept_key_is_rfc6455s_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_channel_messages_are_read_from_unmasked_server_frames() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode_frame(0x2, b"\x01hello", mask=None))
    reader.feed_data(encode_frame(0x9, b"ping", mask=None))  # answered, not returned
    reader.feed_data(encode_frame(0x2, b"\x03" + b"x" * 300, mask=None))  # 16-bit length
    reader.feed_data(encode_frame(0x8, b"\x03\xe8", mask=None))

    class Writer:
        sent: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.sent.append(data)

    sock = ChannelSocket(reader, Writer())  # type: ignore[arg-type]
    assert await sock.recv() == (1, b"hello")
    assert await sock.recv() == (3, b"x" * 300)
    assert await sock.recv() is None
    assert Writer.sent and Writer.sent[0][0] == 0x8A  # the pong


def test_client_frames_are_masked() -> None:
    frame = encode_frame(0x2, b"\x00abc", mask=b"\x01\x02\x03\x04")
    assert frame[:2] == bytes([0x82, 0x80 | 4])
    assert frame[2:6] == b"\x01\x02\x03\x04"
    assert bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:])) == b"\x00abc"


# --------------------------------------------------------------------------- completion


def completion_plan(line: str) -> Any:
    from shoal.cli.completing import plan
    from shoal.cli.main import build_parser

    return plan(build_parser(), builtin_kinds(), line.split(" "))


@pytest.mark.parametrize(("line", "has", "kind", "prefix", "namespace"), [
    ("ge", "get", "", "", None),
    ("get ", "deployments", "", "", None),
    ("get deployments ", None, "deployments", "", None),
    ("get -n prod deployments w", None, "deployments", "", "prod"),
    ("get --namespace=prod pods ", None, "pods", "", "prod"),
    ("describe deploy/", None, "deploy", "deploy/", None),
    ("get -o ", "yaml", "", "", None),
    ("get -n ", None, "namespaces", "", None),
    ("exec ", None, "pods", "", None),
    ("port-forward svc/", None, "svc", "svc/", None),
    ("logs -c main ", None, "pods", "", None),
    ("rollout ", "status", "", "", None),
    ("rollout status ", "deployments", "", "", None),
    ("exec --", "--tty", "", "", None),
    ("explain ", "pods", "", "", None),
])
def test_completion_plans(line: str, has: str | None, kind: str, prefix: str,
                          namespace: str | None) -> None:
    req = completion_plan(line)
    if has:
        assert has in req.words
    assert (req.kind, req.prefix, req.namespace) == (kind, prefix, namespace)


def test_the_hidden_completion_command_is_not_offered() -> None:
    assert "__complete" not in completion_plan("").words
    assert "completion" in completion_plan("").words


async def test_completion_candidates_list_names_and_survive_a_failing_server() -> None:
    from shoal.cli.completing import Request, candidates

    async def names(kind: str, ns: str | None) -> list[str]:
        return ["web", "api"]

    async def down(kind: str, ns: str | None) -> list[str]:
        raise errors.Unavailable("no server", retry_after=1.0)

    assert await candidates(Request(kind="deploy", prefix="deploy/"), names) == [
        "deploy/web", "deploy/api"]
    assert await candidates(Request(kind="pods"), down) == []


async def test_get_watch_relists_after_expired_and_prints_only_the_differences() -> None:
    """The SDK raises Expired when the watch's version left the server's
    history: get -w lists again, prints what differs from what it printed,
    and watches on from the new list's version."""
    import io

    from shoal.cli.getting import GetOptions, run_get
    from shoal.cli.session import Session
    from shoal.client import ObjectList, WatchEvent

    class FakeClient:
        def __init__(self) -> None:
            self.lists = [ObjectList([obj("a", "u1", "5"), obj("b", "u2", "6")], "6"),
                          ObjectList([obj("a", "u1", "9"), obj("c", "u3", "10")], "10")]
            self.watched_from: list[str] = []

        async def list_all(self, kind: Any, **kw: Any) -> Any:
            return self.lists.pop(0)

        async def watch(self, kind: Any, *, resource_version: str, **kw: Any) -> Any:
            self.watched_from.append(resource_version)
            if len(self.watched_from) == 1:
                yield WatchEvent("MODIFIED", obj("b", "u2", "7"), "7")
                raise errors.Expired("too old resource version: 7 (8)")
            yield WatchEvent("ADDED", obj("d", "u4", "11"), "11")
            raise TimeoutError  # what --request-timeout does: the watch ends, exit 0

        async def close(self) -> None:
            pass

    out = io.StringIO()
    session = Session(kinds=builtin_kinds(), out=out, err=io.StringIO(), stdin=io.StringIO(),
                      namespace_flag="ns")
    fake = FakeClient()
    session._client = fake  # type: ignore[assignment]
    code = await run_get(session, GetOptions(args=("configmaps",), watch=True,
                                             output_watch_events=True, output="name"))
    assert code == 0
    assert out.getvalue().splitlines() == [
        "ADDED configmap/a", "ADDED configmap/b",   # the first list
        "MODIFIED configmap/b",                      # watched
        "DELETED configmap/b", "MODIFIED configmap/a", "ADDED configmap/c",  # the relist
        "ADDED configmap/d"]                         # watching again
    assert fake.watched_from == ["6", "10"]
