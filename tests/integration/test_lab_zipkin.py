"""The lab's Zipkin collector over HTTP, fed by the meshagent's own Tracer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from meshagent.l7.telemetry import TraceContext, Tracer
from shoal.lab.zipkin import SpanStore, serve


@pytest.fixture
def collector() -> Iterator[str]:
    server = serve("127.0.0.1", 0, SpanStore(max_spans=100))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def test_tracer_spans_are_read_back_by_trace_and_service(collector: str) -> None:
    tracer = Tracer(collector, local_service="meshagent.node-1")
    root = TraceContext.new_root()
    child = root.child()
    now = time.time()
    tracer.finish(root, name="gateway", kind="SERVER", start=now, duration_s=0.003,
                  tags={"http.status_code": "200"}, service="istio-ingressgateway")
    tracer.finish(child, name="a.shop.svc.cluster.local:80/*", kind="SERVER",
                  start=now + 0.001, duration_s=0.001, tags={}, service="A.shop")
    tracer.finish(TraceContext.new_root(), name="other", kind="SERVER", start=now,
                  duration_s=0.001, tags={}, service="b.shop")
    await tracer.close()
    assert tracer.sent == 3 and tracer.dropped == 0

    status, spans = await asyncio.to_thread(get, f"{collector}/api/v2/trace/{root.trace_id}")
    assert status == 200
    assert [(s["id"], s.get("parentId"), s["localEndpoint"]["serviceName"]) for s in spans] == [
        (root.span_id, None, "istio-ingressgateway"), (child.span_id, root.span_id, "a.shop")]
    status, traces = await asyncio.to_thread(
        get, f"{collector}/api/v2/traces?serviceName=a.shop&limit=10")
    assert status == 200 and [t[0]["traceId"] for t in traces] == [root.trace_id]
    status, traces = await asyncio.to_thread(get, f"{collector}/api/v2/traces?limit=1")
    assert len(traces) == 1
    status, services = await asyncio.to_thread(get, f"{collector}/api/v2/services")
    assert services == ["a.shop", "b.shop", "istio-ingressgateway"]


def test_bad_posts_are_refused_and_store_nothing(collector: str) -> None:
    good = {"traceId": "a" * 32, "id": "b" * 16, "name": "x"}
    for body, status, says in [
        (b"{not json", 400, "not JSON"),
        (json.dumps({"traceId": "a"}).encode(), 400, "JSON list"),
        (json.dumps([good, {"traceId": "0" * 32, "id": "c" * 16}]).encode(), 400,
         "span 1: traceId"),
        (json.dumps([{**good, "id": "xyz"}]).encode(), 400, "span 0: id"),
    ]:
        code, text = post(f"{collector}/api/v2/spans", body)
        assert (code, says in text.decode()) == (status, True), text
    assert get(f"{collector}/api/v2/trace/{'a' * 32}")[0] == 404
    assert get(f"{collector}/api/v2/traces?limit=0")[0] == 400
    assert post(f"{collector}/api/v2/spans", json.dumps([good]).encode())[0] == 202
    assert get(f"{collector}/api/v2/trace/{'A' * 32}")[0] == 200  # ids in any case
    assert get(f"{collector}/health") == (200, {"status": "UP", "spans": 1})


def test_the_collector_runs_as_a_process_and_stops_on_sigterm() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-P", "-m", "shoal.lab.zipkin", "--listen",
                             f"127.0.0.1:{port}", "--max-spans", "10"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert get(f"http://127.0.0.1:{port}/health")[0] == 200
                break
            except urllib.error.URLError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "collector did not start"
                time.sleep(0.05)
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
