"""The lab's Zipkin span store (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.lab.zipkin import BadSpans, SpanStore, normalize


def span(trace: str, sid: str, *, service: str = "web", ts: int = 0, name: str = "get",
         parent: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"traceId": trace, "id": sid, "name": name, "timestamp": ts,
                           "localEndpoint": {"serviceName": service}}
    if parent:
        out["parentId"] = parent
    return out


T1, T2, T3 = "1" * 32, "2" * 32, "3" * 32


def test_traces_newest_first_filtered_by_service_and_name() -> None:
    store = SpanStore()
    store.add([span(T1, "a" * 16, service="Gateway", ts=2), span(T1, "b" * 16, ts=1)])
    store.add([span(T2, "c" * 16, service="db", name="query")])
    assert [t[0]["traceId"] for t in store.traces()] == [T2, T1]
    assert [t[0]["traceId"] for t in store.traces(service="gateway")] == [T1]
    assert [t[0]["traceId"] for t in store.traces(span_name="QUERY")] == [T2]
    assert store.traces(limit=1)[0][0]["traceId"] == T2
    got = store.trace(T1)
    assert got is not None and [s["id"] for s in got] == ["b" * 16, "a" * 16]  # by start
    assert store.services() == ["db", "gateway", "web"]


def test_store_is_bounded_oldest_trace_dropped_first() -> None:
    store = SpanStore(max_spans=3)
    store.add([span(T1, "a" * 16), span(T1, "b" * 16)])
    store.add([span(T2, "c" * 16)])
    store.add([span(T3, "d" * 16)])
    assert store.trace(T1) is None and len(store) == 2 and store.evicted == 2
    assert [t[0]["traceId"] for t in store.traces()] == [T3, T2]


def test_64_bit_trace_ids_are_widened() -> None:
    store = SpanStore()
    store.add([span("A" * 16, "b" * 16)])
    assert store.trace("a" * 16) == store.trace("0" * 16 + "a" * 16) is not None


@pytest.mark.parametrize(("raw", "says"), [
    ("x", "span 0: must be an object"),
    ({"id": "a" * 16}, "traceId"),
    ({"traceId": "g" * 32, "id": "a" * 16}, "traceId"),
    ({"traceId": "0" * 32, "id": "a" * 16}, "traceId"),
    ({"traceId": "a" * 32, "id": "a" * 15}, "id must be"),
    ({"traceId": "a" * 32, "id": "a" * 16, "parentId": "x"}, "parentId"),
])
def test_bad_spans(raw: Any, says: str) -> None:
    with pytest.raises(BadSpans, match=says):
        normalize(raw)


def test_a_bad_span_stores_nothing_of_its_post() -> None:
    store = SpanStore()
    with pytest.raises(BadSpans):
        store.add([span(T1, "a" * 16), {"traceId": T1}])
    assert len(store) == 0
    with pytest.raises(BadSpans, match="JSON list"):
        store.add({"traceId": T1})
