"""The dashboard's service graph, Kiali-style, from the meshagents' metrics.

Every node's meshagent serves Istio's metrics on ``:15020/metrics``. They are
scraped with the autoscaler's code (``apiserver.controllers.autoscalingmetrics``:
the same URL, fetch and per-node rate between two scrapes, a counter that went
down counting from zero) and reduced here to edges between workloads::

    series(text)                  -> {(edge key, series name): counter value}
    edges(rates)                  -> [Edge]   (pure: rates per second per series)

Only what the destination reported is counted, as the autoscaler does (one
record per request: a request seen by both agents is not counted twice).
HTTP edges come from istio_requests_total (the request rate, the error rate:
5xx or no response, over all requests) and istio_request_duration_milliseconds
(p99 from the histogram's buckets, as Prometheus' histogram_quantile); TCP
edges from istio_tcp_connections_opened_total and the byte counters. An edge
is mTLS when every series on it says connection_security_policy="mutual_tls".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"
UNKNOWN = "unknown"

# Series names inside an edge's counters.
S_REQUESTS, S_ERRORS, S_CONNS, S_BYTES = "requests", "errors", "connections", "bytes"
BUCKET_PREFIX = "le="


def edge_key(*, protocol: str, source: str, target: str, service: str, mtls: bool) -> str:
    return "|".join((protocol, source, target, service, "mtls" if mtls else "plain"))


def _workload(labels: Mapping[str, str], side: str) -> str:
    name = labels.get(f"{side}_workload") or UNKNOWN
    ns = labels.get(f"{side}_workload_namespace") or UNKNOWN
    return UNKNOWN if name == UNKNOWN else f"{ns}/{name}"


def _is_error(code: str) -> bool:
    return code in ("", "0", UNKNOWN) or code.startswith("5")


def series(text: str) -> dict[tuple[str, str], float]:
    """The destination-reported counters of one meshagent's /metrics, per edge."""
    out: dict[tuple[str, str], float] = {}

    def add(key: str, name: str, value: float) -> None:
        out[(key, name)] = out.get((key, name), 0.0) + value

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in (REQUESTS, DURATION_BUCKET, TCP_OPENED, TCP_SENT, TCP_RECEIVED):
                continue
            labels = s.labels
            if labels.get("reporter") != "destination":
                continue
            protocol = "tcp" if s.name.startswith("istio_tcp_") else "http"
            key = edge_key(protocol=protocol, source=_workload(labels, "source"),
                           target=_workload(labels, "destination"),
                           service=labels.get("destination_service") or UNKNOWN,
                           mtls=labels.get("connection_security_policy") == "mutual_tls")
            value = float(s.value)
            if s.name == REQUESTS:
                add(key, S_REQUESTS, value)
                if _is_error(labels.get("response_code", "")):
                    add(key, S_ERRORS, value)
            elif s.name == DURATION_BUCKET:
                add(key, BUCKET_PREFIX + labels.get("le", "+Inf"), value)
            elif s.name == TCP_OPENED:
                add(key, S_CONNS, value)
            else:
                add(key, S_BYTES, value)
    return out


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """histogram_quantile over cumulative bucket rates keyed by upper bound."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound
            if count == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return prev_bound


@dataclass(frozen=True)
class Edge:
    source: str  # "namespace/workload" or "unknown"
    target: str
    service: str  # destination_service (FQDN)
    protocol: str  # "http" | "tcp"
    mtls: bool
    rps: float  # requests (http) or connections (tcp) per second
    error_rate: float  # fraction of requests that failed (http)
    p99_ms: float | None  # http
    bytes_per_second: float  # tcp

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def edges(rates: Mapping[tuple[str, str], float]) -> list[Edge]:
    """Edges from per-second rates of :func:`series`' counters (summed over nodes).
    An edge whose counters did not move in the window has rate 0 but is kept."""
    per: dict[str, dict[str, float]] = {}
    for (key, name), rate in rates.items():
        per.setdefault(key, {})[name] = rate
    out = []
    for key, values in sorted(per.items()):
        protocol, source, target, service, security = key.split("|")
        buckets = {float(n[len(BUCKET_PREFIX):]): v for n, v in values.items()
                   if n.startswith(BUCKET_PREFIX)}
        if protocol == "http":
            rps = values.get(S_REQUESTS, 0.0)
            err = values.get(S_ERRORS, 0.0) / rps if rps > 0 else 0.0
            p99 = quantile(0.99, buckets)
        else:
            rps, err, p99 = values.get(S_CONNS, 0.0), 0.0, None
        out.append(Edge(source=source, target=target, service=service, protocol=protocol,
                        mtls=security == "mtls", rps=rps, error_rate=err, p99_ms=p99,
                        bytes_per_second=values.get(S_BYTES, 0.0)))
    return out


def merge(edge_list: list[Edge]) -> list[Edge]:
    """One edge per (source, target, protocol): rates summed, mTLS only when all are."""
    grouped: dict[tuple[str, str, str], list[Edge]] = {}
    for e in edge_list:
        grouped.setdefault((e.source, e.target, e.protocol), []).append(e)
    out = []
    for (source, target, protocol), group in sorted(grouped.items()):
        rps = sum(e.rps for e in group)
        moving = [e for e in group if e.rps > 0] or group
        errors = sum(e.error_rate * e.rps for e in group)
        p99s = [e.p99_ms for e in moving if e.p99_ms is not None]
        out.append(Edge(
            source=source, target=target, service=",".join(sorted({e.service for e in group})),
            protocol=protocol, mtls=all(e.mtls for e in moving), rps=rps,
            error_rate=errors / rps if rps > 0 else 0.0,
            p99_ms=max(p99s) if p99s else None,
            bytes_per_second=sum(e.bytes_per_second for e in group)))
    return out
