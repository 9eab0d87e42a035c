"""L7 telemetry: Istio's request metrics, the access log, trace context, the Zipkin tracer."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meshagent.l7.telemetry import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    RequestRecord,
    RequestTelemetry,
    TraceContext,
    Tracer,
    hop_context,
    parse_b3_single,
    parse_endpoint,
    parse_traceparent,
    workload_labels,
)
from shoal import errors
from shoal.logs import JSONFormatter

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = "b7ad6b7169203331"


def record(**kw: Any) -> RequestRecord:
    base: dict[str, Any] = dict(
        reporter="destination", source_workload="client", source_workload_namespace="front",
        source_principal="cluster.local/ns/front/sa/client", destination_workload="web",
        destination_workload_namespace="shop",
        destination_principal="cluster.local/ns/shop/sa/web",
        destination_service="web.shop.svc.cluster.local", destination_service_name="web",
        destination_service_namespace="shop", request_protocol="http", response_code=200,
        response_flags="", connection_security_policy="mutual_tls", method="GET",
        path="/items?id=3", authority="web.shop:8080", duration_s=0.0123, request_bytes=0,
        response_bytes=1500, upstream="10.244.1.5:8080",
        route="VirtualService shop/web http[0]", trace_id=TRACE, start_time=1_800_000_000.25,
        request_id="abc-123")
    base.update(kw)
    return RequestRecord(**base)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- metrics


def test_istio_metrics_count_each_request_with_istios_labels() -> None:
    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry, access_log=False)
    for _ in range(3):
        telemetry.record(record())
    telemetry.record(record(response_code=403, response_flags="DENY", response_bytes=19))
    ok = sample(registry, "istio_requests_total", reporter="destination", response_code="200",
                response_flags="-", source_workload="client",
                destination_service="web.shop.svc.cluster.local",
                connection_security_policy="mutual_tls",
                source_principal="cluster.local/ns/front/sa/client",
                destination_principal="cluster.local/ns/shop/sa/web",
                grpc_response_status="", request_protocol="http",
                source_workload_namespace="front", destination_workload="web",
                destination_workload_namespace="shop", destination_service_name="web",
                destination_service_namespace="shop", source_app="unknown",
                source_version="unknown", source_canonical_service="unknown",
                source_canonical_revision="latest", destination_app="unknown",
                destination_version="unknown", destination_canonical_service="unknown",
                destination_canonical_revision="latest")
    assert ok == 3
    totals = {s.labels["response_code"]: s.value
              for m in registry.collect() if m.name == "istio_requests"
              for s in m.samples if s.name == "istio_requests_total"}
    assert totals == {"200": 3, "403": 1}
    flags = {s.labels["response_flags"] for m in registry.collect()
             if m.name == "istio_requests" for s in m.samples}
    assert flags == {"-", "DENY"}


def test_histograms_use_istios_buckets_and_units() -> None:
    registry = CollectorRegistry()
    RequestTelemetry(registry, access_log=False).record(record(duration_s=0.0123,
                                                                response_bytes=1500))
    buckets = {s.labels["le"]: s.value for m in registry.collect()
               if m.name == "istio_request_duration_milliseconds"
               for s in m.samples if s.name.endswith("_bucket")}
    assert [float(b) for b in buckets if b != "+Inf"] == [float(b) for b in DURATION_BUCKETS_MS]
    assert buckets["10.0"] == 0 and buckets["25.0"] == 1  # 12.3 ms
    resp = {s.labels["le"]: s.value for m in registry.collect()
            if m.name == "istio_response_bytes" for s in m.samples if s.name.endswith("_bucket")}
    assert [float(b) for b in resp if b != "+Inf"] == list(BYTES_BUCKETS)
    assert resp["1000.0"] == 0 and resp["10000.0"] == 1
    sums = {m.name: s.value for m in registry.collect() for s in m.samples
            if s.name.endswith("_sum")}
    assert sums["istio_request_duration_milliseconds"] == pytest.approx(12.3)
    assert sums["istio_request_bytes"] == 0 and sums["istio_response_bytes"] == 1500


@pytest.mark.parametrize(("changes", "label", "want"), [
    pytest.param({"source_principal": ""}, "source_principal", "unknown", id="plaintext-peer"),
    pytest.param({"connection_security_policy": ""}, "connection_security_policy", "unknown",
                 id="source-reporter-policy-unknown"),
    pytest.param({"response_code": 0, "response_flags": "UF"}, "response_code", "0",
                 id="no-response-code-0"),
    pytest.param({"response_flags": "UF,URX"}, "response_flags", "UF,URX", id="flags-kept"),
    pytest.param({"request_protocol": "grpc", "grpc_response_status": "14"},
                 "grpc_response_status", "14", id="grpc-status"),
    pytest.param({"destination_service": ""}, "destination_service", "unknown",
                 id="no-service-unknown"),
])
def test_labels_for_unknown_and_special_values(changes: dict[str, Any], label: str,
                                               want: str) -> None:
    assert record(**changes).metric_labels()[label] == want


def test_several_telemetry_objects_share_one_registry() -> None:
    registry = CollectorRegistry()
    RequestTelemetry(registry, access_log=False).record(record())
    RequestTelemetry(registry, access_log=False).record(record())
    total = sum(s.value for m in registry.collect() if m.name == "istio_requests"
                for s in m.samples if s.name == "istio_requests_total")
    assert total == 2


@pytest.mark.parametrize(("labels", "workload", "want"), [
    pytest.param({"app": "reviews", "version": "v2"}, "reviews-v2",
                 ("reviews", "v2", "reviews", "v2"), id="app-version"),
    pytest.param({}, "web", ("unknown", "unknown", "web", "latest"), id="no-labels"),
    pytest.param({"app.kubernetes.io/name": "shop", "app.kubernetes.io/version": "1.2",
                  "app": "x"}, "w", ("x", "unknown", "shop", "1.2"), id="k8s-recommended"),
    pytest.param({"service.istio.io/canonical-name": "c", "service.istio.io/canonical-revision":
                  "r", "app": "a", "version": "v"}, "w", ("a", "v", "c", "r"),
                 id="istio-canonical-wins"),
])
def test_workload_labels_as_istio_derives_them(labels: dict[str, str], workload: str,
                                               want: tuple[str, ...]) -> None:
    got: dict[str, Any] = workload_labels("destination", labels, workload)
    assert (got["destination_app"], got["destination_version"],
            got["destination_canonical_service"], got["destination_canonical_revision"]) == want
    assert RequestRecord(**got).destination_app == want[0]


# --------------------------------------------------------------------------- access log


def test_one_json_access_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = RequestTelemetry(CollectorRegistry())
    with caplog.at_level(logging.INFO, logger="meshagent.access"):
        telemetry.record(record())
        telemetry.record(record(response_code=503, response_flags="UO", upstream=""))
    lines = [json.loads(JSONFormatter().format(r)) for r in caplog.records
             if r.name == "meshagent.access"]
    assert len(lines) == 2
    first = lines[0]
    assert first["logger"] == "meshagent.access"
    assert {k: first[k] for k in ("method", "path", "protocol", "response_code",
                                  "response_flags", "bytes_received", "bytes_sent", "duration",
                                  "upstream_host", "x-request-id", "authority", "route_name",
                                  "trace_id", "start_time", "reporter")} == {
        "method": "GET", "path": "/items?id=3", "protocol": "HTTP/1.1", "response_code": 200,
        "response_flags": "-", "bytes_received": 0, "bytes_sent": 1500, "duration": 12,
        "upstream_host": "10.244.1.5:8080", "x-request-id": "abc-123",
        "authority": "web.shop:8080", "route_name": "VirtualService shop/web http[0]",
        "trace_id": TRACE, "start_time": "2027-01-15T08:00:00.250Z", "reporter": "destination"}
    assert (lines[1]["response_code"], lines[1]["response_flags"],
            lines[1]["upstream_host"]) == (503, "UO", "-")


def test_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meshagent.access"):
        RequestTelemetry(CollectorRegistry(), access_log=False).record(record())
    assert not [r for r in caplog.records if r.name == "meshagent.access"]


def test_record_never_raises_into_the_data_path(caplog: pytest.LogCaptureFixture) -> None:
    bad = record()
    bad.response_code = "not a number"  # type: ignore[assignment]
    RequestTelemetry(CollectorRegistry()).record(bad)
    assert "recording request telemetry failed" in caplog.text


# --------------------------------------------------------------------------- trace context


@pytest.mark.parametrize(("value", "want"), [
    pytest.param(f"00-{TRACE}-{SPAN}-01", (TRACE, SPAN, True), id="sampled"),
    pytest.param(f"00-{TRACE}-{SPAN}-00", (TRACE, SPAN, False), id="not-sampled"),
    pytest.param(f"00-{TRACE}-{SPAN}-09", (TRACE, SPAN, True), id="other-flag-bits"),
    pytest.param(f"  00-{TRACE}-{SPAN}-01 ", (TRACE, SPAN, True), id="surrounding-space"),
    pytest.param(f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", (TRACE, SPAN, True),
                 id="future-version-extra-fields"),
    pytest.param(f"ff-{TRACE}-{SPAN}-01", None, id="version-ff-invalid"),
    pytest.param(f"00-{TRACE}-{SPAN}-01-extra", None, id="version-00-extra-field"),
    pytest.param(f"0-{TRACE}-{SPAN}-01", None, id="short-version"),
    pytest.param(f"00-{TRACE[:-1]}-{SPAN}-01", None, id="short-trace-id"),
    pytest.param(f"00-{TRACE}-{SPAN}0-01", None, id="long-span-id"),
    pytest.param(f"00-{'0' * 32}-{SPAN}-01", None, id="zero-trace-id"),
    pytest.param(f"00-{TRACE}-{'0' * 16}-01", None, id="zero-span-id"),
    pytest.param(f"00-{TRACE.upper()}-{SPAN}-01", None, id="upper-case-hex"),
    pytest.param(f"00-{TRACE}-{SPAN}-1", None, id="short-flags"),
    pytest.param(f"00-{TRACE}-{SPAN}", None, id="missing-flags"),
    pytest.param("garbage", None, id="garbage"),
])
def test_traceparent_parse(value: str, want: tuple[str, str, bool] | None) -> None:
    ctx = parse_traceparent(value)
    assert (None if ctx is None else (ctx.trace_id, ctx.span_id, ctx.sampled)) == want


@pytest.mark.parametrize(("value", "want"), [
    pytest.param(f"{TRACE}-{SPAN}-1-{PARENT}", (TRACE, SPAN, PARENT, True), id="full"),
    pytest.param(f"{TRACE}-{SPAN}-0", (TRACE, SPAN, "", False), id="not-sampled"),
    pytest.param(f"{TRACE}-{SPAN}-d", (TRACE, SPAN, "", True), id="debug"),
    pytest.param(f"{TRACE}-{SPAN}", (TRACE, SPAN, "", True), id="deferred"),
    pytest.param(f"a3ce929d0e0e4736-{SPAN}-1", ("0" * 16 + "a3ce929d0e0e4736", SPAN, "", True),
                 id="64-bit-trace-id-widened"),
    pytest.param("1", None, id="sampling-only"),
    pytest.param("0", None, id="deny-only"),
    pytest.param(f"{TRACE}-{SPAN}-x", None, id="bad-sampling"),
    pytest.param(f"{TRACE}-{SPAN}-1-{PARENT}-9", None, id="too-many-fields"),
    pytest.param(f"{TRACE}-{SPAN[:-2]}-1", None, id="short-span"),
    pytest.param(f"{TRACE}-{SPAN}-1-zz", None, id="bad-parent"),
])
def test_b3_single_parse(value: str, want: tuple[str, str, str, bool] | None) -> None:
    ctx = parse_b3_single(value)
    assert (None if ctx is None
            else (ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled)) == want


@pytest.mark.parametrize(("headers", "want"), [
    pytest.param({"traceparent": f"00-{TRACE}-{SPAN}-01"}, (TRACE, SPAN, "", True),
                 id="w3c"),
    pytest.param({"X-B3-TraceId": TRACE, "X-B3-SpanId": SPAN, "X-B3-ParentSpanId": PARENT,
                  "X-B3-Sampled": "1"}, (TRACE, SPAN, PARENT, True), id="b3-multi-any-case"),
    pytest.param({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0"},
                 (TRACE, SPAN, "", False), id="b3-multi-not-sampled"),
    pytest.param({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0",
                  "x-b3-flags": "1"}, (TRACE, SPAN, "", True), id="b3-debug-flag"),
    pytest.param({"x-b3-traceid": TRACE}, None, id="b3-multi-no-span"),
    pytest.param({"x-b3-traceid": "0" * 32, "x-b3-spanid": SPAN}, None, id="b3-zero-trace"),
    pytest.param({"b3": f"{TRACE}-{SPAN}-1"}, (TRACE, SPAN, "", True), id="b3-single"),
    pytest.param({"traceparent": f"00-{TRACE}-{SPAN}-01", "x-b3-traceid": "1" * 32,
                  "x-b3-spanid": "2" * 16}, (TRACE, SPAN, "", True), id="w3c-wins"),
    pytest.param({"traceparent": "bogus", "x-b3-traceid": TRACE, "x-b3-spanid": SPAN},
                 (TRACE, SPAN, "", True), id="invalid-w3c-falls-back-to-b3"),
    pytest.param({"b3": f"{TRACE}-{SPAN}-0", "x-b3-traceid": "1" * 32, "x-b3-spanid": "2" * 16},
                 (TRACE, SPAN, "", False), id="b3-single-before-multi"),
    pytest.param({}, None, id="none"),
])
def test_from_headers(headers: dict[str, str], want: tuple[str, str, str, bool] | None) -> None:
    ctx = TraceContext.from_headers(headers)
    assert (None if ctx is None
            else (ctx.trace_id, ctx.span_id, ctx.parent_id, ctx.sampled)) == want


def test_child_keeps_trace_and_points_at_parent() -> None:
    parent = TraceContext(trace_id=TRACE, span_id=SPAN, sampled=False)
    child = parent.child()
    assert (child.trace_id, child.parent_id, child.sampled) == (TRACE, SPAN, False)
    assert len(child.span_id) == 16 and child.span_id != SPAN
    root = TraceContext.new_root()
    assert len(root.trace_id) == 32 and len(root.span_id) == 16 and root.parent_id == ""
    assert root.sampled and root.trace_id != TraceContext.new_root().trace_id


def test_inject_writes_w3c_and_b3_and_round_trips() -> None:
    ctx = TraceContext(trace_id=TRACE, span_id=SPAN, parent_id=PARENT, sampled=True)
    headers = {"host": "web", "X-B3-SpanId": "1" * 16, "b3": "stale", "x-b3-flags": "1"}
    ctx.inject(headers)
    assert headers == {"host": "web", "traceparent": f"00-{TRACE}-{SPAN}-01",
                       "x-b3-traceid": TRACE, "x-b3-spanid": SPAN,
                       "x-b3-parentspanid": PARENT, "x-b3-sampled": "1"}
    assert TraceContext.from_headers(headers) == TraceContext(TRACE, SPAN, "", True)
    assert parse_b3_single(ctx.b3()) == ctx
    b3_only = {k: v for k, v in headers.items() if k != "traceparent"}
    assert TraceContext.from_headers(b3_only) == ctx


# --------------------------------------------------------------------------- tracer


class Collector:
    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail = fail

    async def __call__(self, body: bytes) -> None:
        if self.fail:
            raise ConnectionRefusedError("refused")
        self.batches.append(json.loads(body))


def finish(tracer: Tracer, ctx: TraceContext, **kw: Any) -> None:
    args: dict[str, Any] = dict(name="web.shop.svc.cluster.local:8080/*", kind="SERVER",
                                start=1_800_000_000.5, duration_s=0.25,
                                tags={"http.status_code": "200"})
    args.update(kw)
    tracer.finish(ctx, **args)


async def test_tracer_sends_zipkin_v2_spans_in_batches() -> None:
    sent = Collector()
    registry = CollectorRegistry()
    tracer = Tracer("http://127.0.0.1:9411", local_service="agent", sender=sent,
                    registry=registry, batch_size=2)
    ctx = TraceContext(trace_id=TRACE, span_id=SPAN, parent_id=PARENT)
    finish(tracer, ctx, service="web.shop")
    finish(tracer, TraceContext.new_root())
    finish(tracer, TraceContext.new_root())
    finish(tracer, TraceContext.new_root(sampled=False))  # not sampled: no span
    await tracer.flush()
    assert [len(b) for b in sent.batches] == [2, 1]
    assert sent.batches[0][0] == {
        "traceId": TRACE, "id": SPAN, "parentId": PARENT,
        "name": "web.shop.svc.cluster.local:8080/*", "kind": "SERVER",
        "timestamp": 1_800_000_000_500_000, "duration": 250_000,
        "localEndpoint": {"serviceName": "web.shop"}, "tags": {"http.status_code": "200"}}
    assert sent.batches[0][1]["localEndpoint"] == {"serviceName": "agent"}
    assert "parentId" not in sent.batches[0][1]
    assert tracer.sent == 3 and registry.get_sample_value("shoal_mesh_spans_sent_total") == 3


async def test_tracer_drops_and_counts_when_full_or_collector_fails() -> None:
    registry = CollectorRegistry()
    sent = Collector(fail=True)
    tracer = Tracer("http://127.0.0.1:9411", local_service="agent", sender=sent,
                    registry=registry, max_queue=3, batch_size=10)
    for _ in range(5):
        finish(tracer, TraceContext.new_root())  # never blocks, never raises
    assert tracer.queued == 3 and tracer.dropped == 2
    await tracer.flush()
    assert tracer.queued == 0 and tracer.dropped == 5 and tracer.sent == 0
    drops = {r: registry.get_sample_value("shoal_mesh_spans_dropped_total", {"reason": r})
             for r in ("queue_full", "collector_error")}
    assert drops == {"queue_full": 2, "collector_error": 3}


async def test_tracer_background_task_sends_and_close_flushes() -> None:
    sent = Collector()
    tracer = Tracer("http://127.0.0.1:9411", local_service="agent", sender=sent,
                    batch_size=1, interval=3600)
    tracer.start()
    finish(tracer, TraceContext.new_root())  # a full batch wakes the task
    for _ in range(100):
        if sent.batches:
            break
        await asyncio.sleep(0)
    assert len(sent.batches) == 1
    tracer._batch = 10  # the next span stays queued until close()
    finish(tracer, TraceContext.new_root())
    await tracer.close()
    assert [len(b) for b in sent.batches] == [1, 1]


async def test_tracer_posts_over_http() -> None:
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        got.append(head.split(b"\r\n")[0] + b" " + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        tracer = Tracer(f"http://127.0.0.1:{port}", local_service="agent")
        finish(tracer, TraceContext(trace_id=TRACE, span_id=SPAN))
        await tracer.flush()
    assert tracer.sent == 1 and len(got) == 1
    assert got[0].startswith(b"POST /api/v2/spans HTTP/1.1 [")
    assert json.loads(got[0].split(b" ", 3)[3])[0]["traceId"] == TRACE


@pytest.mark.parametrize(("url", "want"), [
    ("http://10.0.0.1:9411", ("10.0.0.1", 9411, "/api/v2/spans")),
    ("http://zipkin/", ("zipkin", 80, "/api/v2/spans")),
    ("http://zipkin:9411/custom/spans", ("zipkin", 9411, "/custom/spans")),
])
def test_parse_endpoint(url: str, want: tuple[str, int, str]) -> None:
    assert parse_endpoint(url) == want


@pytest.mark.parametrize("url", ["https://zipkin:9411", "zipkin:9411", "http://", "http://h:x"])
def test_parse_endpoint_rejects(url: str) -> None:
    with pytest.raises(errors.Invalid, match="zipkin endpoint"):
        parse_endpoint(url)


def test_new_traces_are_sampled_at_the_tracers_percentage() -> None:
    def share(percent: float) -> float:
        tracer = Tracer("http://127.0.0.1:9411", local_service="a", sampling=percent)
        return sum(hop_context(None, tracer).sampled for _ in range(20_000)) / 20_000

    assert share(100.0) == 1.0 and share(0.0) == 0.0
    assert 0.005 < share(1.0) < 0.015  # Istio's default, 1 %
    assert 0.45 < share(50.0) < 0.55


def test_a_request_that_carries_a_trace_keeps_its_decision() -> None:
    never = Tracer("http://127.0.0.1:9411", local_service="a", sampling=0.0)
    parent = TraceContext(trace_id=TRACE, span_id=SPAN)  # sampled upstream
    child = hop_context(parent, never)
    assert child.sampled and child.trace_id == TRACE and child.parent_id == SPAN
    unsampled = TraceContext(trace_id=TRACE, span_id=SPAN, sampled=False)
    always = Tracer("http://127.0.0.1:9411", local_service="a", sampling=100.0)
    assert not hop_context(unsampled, always).sampled
    assert hop_context(None, None).sampled  # no tracer: headers still propagate


@pytest.mark.parametrize("bad", [-1.0, 100.5, float("inf"), float("nan")])
def test_trace_sampling_must_be_a_percentage(bad: float) -> None:
    with pytest.raises(errors.Invalid, match="trace sampling"):
        Tracer("http://127.0.0.1:9411", local_service="a", sampling=bad)
