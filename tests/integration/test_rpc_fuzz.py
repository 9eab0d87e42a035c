"""Malformed and oversized requests at every RPC the apiserver serves.

The methods are the ones the server registers (recorded as it adds its gRPC
handlers), so a new RPC is fuzzed without touching this file. Each gets
hypothesis-generated request bytes -- random bytes, valid messages with random
field values (Any fields carry a known kind's type URL), those messages
truncated or with bytes flipped -- plus fixed oversized ones (beyond the
3 MiB message limit, and a message with a 2 MiB string or object), through a
real TLS channel as the admin (system:masters) and as a user with no bindings.

Every call must end with a gRPC status (a per-call deadline catches hangs;
a stream that starts answering is cancelled), never INTERNAL or UNKNOWN (an
unhandled exception); a call that did not answer OK must leave the storage
revision unchanged (every write moves it), and the server answers Health and
Version after each method.

CI time: ``EXAMPLES`` examples per method and caller (about 30 methods x 2
callers), about 30 s in all on two cores. ``SHOAL_FUZZ_EXAMPLES=500`` for a
longer run.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apiserver.ratelimit import RateLimits
from apiserver.server import MAX_RECEIVE_BYTES
from shoal.api.resources.v1 import resources_pb2 as pb
from shoal.config import ClientConfig
from shoal.kinds import builtin_kinds
from shoal.testing.apiserver import InProcessAPIServer

EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "25"))
CALL_DEADLINE = 10.0
REFUSED = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
           grpc.StatusCode.DEADLINE_EXCEEDED)
STARTED = "STREAM-STARTED"  # a streaming call sent a response (then cancelled)
KINDS = builtin_kinds()
# Strings that mean something to the API, so random requests reach past decoding.
NAMES = ["", "default", "kube-system", "a", "x" * 300, "../../etc", "A_B", "\x00",
         "system:masters", "-", "*", "apps", "v1", "fuzz-0",
         *sorted({k.resource for k in KINDS})[:40]]
TYPE_URLS = sorted(k.type_url for k in KINDS)
VALID_NAMES = ["fuzz-0", "fuzz-1", "default", "a.b"]


@dataclass(frozen=True)
class Method:
    path: str
    request_streaming: bool
    response_streaming: bool
    request_type: Any  # a protobuf message class, or None (raw bytes)


# -- the server, on a loop of its own (hypothesis tests are synchronous) ---------


class ServerThread:
    def __init__(self, data: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # Rate limits off: a limited answer would hide what the handler does.
        self.api = InProcessAPIServer(data, rate_limits=RateLimits(qps=0))

    def run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=60)

    def revision(self) -> int:
        assert self.api.server is not None
        rev: int = self.run(self.api.server.store.current_revision())
        return rev

    def settled_revision(self) -> int:
        """The revision once writes a successful call set off (e.g. a new
        namespace's default ServiceAccount) have landed."""
        rev, stable = self.revision(), 0
        while stable < 3:
            time.sleep(0.05)
            now = self.revision()
            stable = stable + 1 if now == rev else 0
            rev = now
        return rev

    def close(self) -> None:
        self.run(self.api.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _record_handlers(monkeypatch: pytest.MonkeyPatch) -> list[Method]:
    """Every method the server registers, as it registers them."""
    import grpc.aio._server as aio_server

    methods: list[Method] = []

    def add(path: str, h: Any) -> None:
        deser = h.request_deserializer
        methods.append(Method(path, h.request_streaming, h.response_streaming,
                              getattr(deser, "__self__", None) if deser else None))

    generic = aio_server.Server.add_generic_rpc_handlers
    registered = aio_server.Server.add_registered_method_handlers

    def add_generic(self: Any, handlers: Any) -> None:
        for h in handlers:
            table = getattr(h, "_method_handlers", None)
            if table is None:
                raise AssertionError(f"cannot enumerate the methods of {h!r}: give it "
                                     "grpc.method_handlers_generic_handler")
            for path, mh in table.items():
                add(path, mh)
        generic(self, handlers)

    def add_registered(self: Any, service: str, handlers: Any) -> None:
        for name, mh in handlers.items():
            add(f"/{service}/{name}", mh)
        registered(self, service, handlers)

    monkeypatch.setattr(aio_server.Server, "add_generic_rpc_handlers", add_generic)
    monkeypatch.setattr(aio_server.Server, "add_registered_method_handlers", add_registered)
    return methods


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread,
                                                                      list[Method]]]:
    mp = pytest.MonkeyPatch()
    methods = _record_handlers(mp)
    server = ServerThread(tmp_path_factory.mktemp("fuzz"))
    try:
        server.run(server.api.start())
    finally:
        mp.undo()
    yield server, sorted(set(methods), key=lambda m: m.path)
    server.close()


def _channel(cfg: ClientConfig) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=cfg.ca_pem,
                                         private_key=cfg.key_pem,
                                         certificate_chain=cfg.cert_pem)
    options: list[tuple[str, Any]] = [("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20)]
    if cfg.tls_server_name:
        options.append(("grpc.ssl_target_name_override", cfg.tls_server_name))
    return grpc.secure_channel(cfg.servers[0], creds, options=options)


# -- requests ---------------------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    cpp = fd.cpp_type
    if cpp in _INT_RANGES:
        lo, hi = _INT_RANGES[cpp]
        return st.one_of(st.sampled_from([0, 1, -1 if lo < 0 else 2, lo, hi]),
                         st.integers(lo, hi))
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]),
                         st.integers(-5, 1000))
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return st.floats(width=32 if cpp == FieldDescriptor.CPPTYPE_FLOAT else 64)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    return st.one_of(st.sampled_from(NAMES), st.text(max_size=40))


def _fill(msg: Any, desc: Descriptor, depth: int, draw: Callable[[Any], Any]) -> None:
    for fd in desc.fields:
        if not draw(st.booleans()):
            continue
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        repeated = fd.is_repeated
        if is_map:
            key_fd = fd.message_type.fields_by_name["key"]
            val_fd = fd.message_type.fields_by_name["value"]
            target = getattr(msg, fd.name)
            for _ in range(draw(st.integers(0, 3))):
                key = draw(_scalar(key_fd))
                if val_fd.message_type is not None:
                    if depth < 3:
                        _fill(target[key], val_fd.message_type, depth + 1, draw)
                else:
                    target[key] = draw(_scalar(val_fd))
            continue
        if fd.message_type is not None:
            if depth >= 3:
                continue
            count = draw(st.integers(0, 3)) if repeated else 1
            for _ in range(count):
                child = getattr(msg, fd.name).add() if repeated else getattr(msg, fd.name)
                if fd.message_type.full_name == "google.protobuf.Any":
                    child.type_url = draw(st.one_of(st.sampled_from(TYPE_URLS),
                                                    st.text(max_size=30)))
                    child.value = draw(_payloads(child.type_url, depth + 1))
                else:
                    _fill(child, fd.message_type, depth + 1, draw)
                    if not repeated:
                        child.SetInParent()
            continue
        if repeated:
            getattr(msg, fd.name).extend(draw(st.lists(_scalar(fd), max_size=3)))
        else:
            setattr(msg, fd.name, draw(_scalar(fd)))


def _payloads(type_url: str, depth: int) -> st.SearchStrategy[bytes]:
    """An Any's value: random bytes, or an object of the kind it names."""
    try:
        kind = KINDS.by_type_url(type_url)
    except Exception:
        return st.binary(max_size=64)
    def named(args: tuple[Any, str]) -> bytes:
        obj, name = args
        obj.metadata.name = name
        obj.metadata.namespace = "default" if kind.namespaced else ""
        return bytes(obj.SerializeToString())

    cls = type(kind.new())
    return st.one_of(st.binary(max_size=64),
                     messages(cls, depth).map(lambda m: m.SerializeToString()),
                     # Random fields, but a name and namespace that validate.
                     st.tuples(messages(cls, depth), st.sampled_from(VALID_NAMES)).map(named))


def messages(cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    @st.composite
    def build(draw: Callable[[Any], Any]) -> Any:
        msg = cls()
        _fill(msg, cls.DESCRIPTOR, depth, draw)
        return msg

    return build()


def requests(m: Method) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=300)
    if m.request_type is None:
        return raw
    valid = messages(m.request_type).map(lambda msg: msg.SerializeToString())
    truncated = st.tuples(valid, st.integers(0, 10_000)).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)])
    flipped = st.tuples(valid, st.integers(0, 10_000), st.integers(1, 255)).map(
        lambda t: (t[0][: t[1] % len(t[0])] + bytes([t[0][t[1] % len(t[0])] ^ t[2]])
                   + t[0][t[1] % len(t[0]) + 1:]) if t[0] else b"\xff")
    return st.one_of(raw, valid, truncated, flipped)


def oversized(m: Method) -> list[bytes]:
    """Beyond the message limit; and within it, a 2 MiB string or object."""
    out = [os.urandom(MAX_RECEIVE_BYTES + 64)]
    if m.request_type is None:
        return out
    big = m.request_type()
    for fd in big.DESCRIPTOR.fields:
        if fd.is_repeated:
            if fd.type == FieldDescriptor.TYPE_STRING and not fd.message_type:
                getattr(big, fd.name).extend(["y" * 100] * 5_000)
            continue
        if fd.type == FieldDescriptor.TYPE_STRING:
            setattr(big, fd.name, "x" * (2 << 20))
            break
        if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Any":
            cm = KINDS.by_resource("", "configmaps")
            obj = cm.new()
            obj.metadata.name, obj.metadata.namespace = "huge", "default"
            obj.data["blob"] = "z" * (2 << 20)
            getattr(big, fd.name).Pack(obj)
            break
    out.append(big.SerializeToString())
    return out


# -- calls ------------------------------------------------------------------------


def call(channel: grpc.Channel, m: Method, data: bytes) -> tuple[str, str]:
    """The status code the call ended with (STARTED: a stream answered) and details."""
    try:
        if not m.request_streaming and not m.response_streaming:
            channel.unary_unary(m.path)(data, timeout=CALL_DEADLINE)
            return "OK", ""
        if m.request_streaming and not m.response_streaming:
            channel.stream_unary(m.path)(iter([data]), timeout=CALL_DEADLINE)
            return "OK", ""
        if m.request_streaming:
            stream = channel.stream_stream(m.path)(iter([data]), timeout=CALL_DEADLINE)
        else:
            stream = channel.unary_stream(m.path)(data, timeout=CALL_DEADLINE)
        for _ in stream:
            stream.cancel()
            return STARTED, ""
        return "OK", ""
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        return code.name, e.details() or ""  # type: ignore[attr-defined]


def _alive(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    channel.unary_unary("/shoal.resources.v1.Resources/Version",
                        request_serializer=pb.VersionRequest.SerializeToString,
                        response_deserializer=pb.VersionResponse.FromString)(
        pb.VersionRequest(), timeout=10)


def _check(server: ServerThread, channel: grpc.Channel, m: Method, data: bytes,
           who: str) -> str:
    before = server.revision()
    code, details = call(channel, m, data)
    assert code not in {c.name for c in REFUSED}, (
        f"{m.path} as {who}: {code} {details!r} for {len(data)} bytes {data[:200]!r}")
    if code in ("OK", STARTED):
        server.settled_revision()
    else:
        after = server.revision()
        assert after == before, (
            f"{m.path} as {who} answered {code} ({details}) but wrote: revision "
            f"{before} -> {after}; request {data[:200]!r}")
    return code


def _fuzzer(server: ServerThread, channel: grpc.Channel, m: Method, who: str,
            seen: set[str]) -> Callable[[], None]:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=requests(m))
    def fuzz(data: bytes) -> None:
        seen.add(_check(server, channel, m, data, who))

    return fuzz  # type: ignore[no-any-return]


@pytest.mark.parametrize("who", ["admin", "nobody"])
def test_every_rpc_survives_malformed_and_oversized_requests(
        fuzzed: tuple[ServerThread, list[Method]], who: str) -> None:
    server, methods = fuzzed
    services = {m.path.split("/")[1] for m in methods}
    # The registered services (a sanity check that recording works, not a list to keep).
    assert {"shoal.resources.v1.Resources", "grpc.health.v1.Health"} <= services
    assert len(methods) >= 20, methods
    cfg = (server.api.client_config if who == "admin"
           else server.api.user_client_config("fuzzer", ["fuzzers"]))
    channel = _channel(cfg)
    codes: dict[str, set[str]] = {}
    try:
        for m in methods:
            seen = codes.setdefault(m.path, set())
            _fuzzer(server, channel, m, who, seen)()
            for data in oversized(m):
                code = _check(server, channel, m, data, who)
                seen.add(code)
                if len(data) > MAX_RECEIVE_BYTES:
                    # A client stream may be refused (authorization) before the
                    # oversized message is read.
                    assert code == "RESOURCE_EXHAUSTED" or (
                        m.request_streaming and code not in ("OK", STARTED)), (m.path, code)
            _alive(channel)
    finally:
        channel.close()
    print({path: sorted(c) for path, c in codes.items()})
