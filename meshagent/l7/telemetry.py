"""Per-request telemetry for the L7 path: Istio's metrics, an access log, tracing.

    RequestTelemetry(registry).record(RequestRecord(...))
        -> istio_requests_total, istio_request_duration_milliseconds,
           istio_request_bytes, istio_response_bytes (Istio's names, labels, buckets)
        -> one JSON access-log line on the logger "meshagent.access"
    TraceContext.from_headers(headers) / .child() / .new_root() / .inject(headers)
        W3C ``traceparent`` and B3 (``x-b3-*`` headers or the single ``b3`` header)
    Tracer(endpoint, local_service=...).finish(ctx, name=, kind=, start=, duration_s=, tags=)
        Zipkin v2 JSON, POSTed to <endpoint>/api/v2/spans in batches

Metrics. The labels are Istio's standard ones, as far as the agent can fill
them truthfully: the reporter ("source": the client-side agent, "destination":
the agent delivering to the pod), source_/destination_ workload, namespace,
principal, app, version, canonical service and revision (from the pod's labels
as Istio derives them: :func:`workload_labels`), destination_service (FQDN),
its name and namespace, request_protocol, response_code ("0": no response),
response_flags ("-" for none, as Istio), grpc_response_status ("" unless the
request is gRPC) and connection_security_policy ("mutual_tls" | "none";
Istio sets it on the destination reporter only, "unknown" on the source one).
A value the agent does not know is "unknown", as in Istio. The cluster labels
are left out: there is one cluster.

Access log. One line per request, the fields of Envoy's default JSON format
that apply (start_time, method, path, protocol, response_code, response_flags,
bytes_received, bytes_sent, duration in ms, upstream_host, x-request-id,
authority, route_name, ...) plus the reporter and the trace id. The daemon's
JSON log formatter writes them as keys of the line's object.

Tracing. A context comes from ``traceparent`` when it is valid (version 2 hex
digits, not ``ff``; version 00 exactly ``00-<32 hex>-<16 hex>-<2 hex>``;
lower-case hex; ids not all zeros); otherwise from the single ``b3`` header,
otherwise from ``x-b3-traceid``/``x-b3-spanid`` (64-bit B3 trace ids are
widened to 128 bits with leading zeros). Anything invalid is ignored, so a
new root is started, as Envoy does. :meth:`TraceContext.inject` writes the
context in both formats.

Tracer contract: :meth:`Tracer.finish` never blocks and never raises into the
data path. Spans go into a bounded queue; when it is full the span is dropped
and counted. A background task (``start()`` or ``run()``) sends batches; a
failed POST drops its batch (counted) and the next batch is tried at the next
interval. ``close()`` sends what is queued, for at most a grace period, and
stops. Only ``http://`` collectors are supported (the lab's is on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import secrets
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from shoal import errors
from shoal.queueing import wait_set

log = logging.getLogger(__name__)
access_log = logging.getLogger("meshagent.access")

UNKNOWN = "unknown"
NO_FLAGS = "-"
MAX_CACHED_LABEL_SETS = 4096  # RequestTelemetry's labelled children kept at hand

# Istio's default buckets (its stats filter): milliseconds, and bytes (1 .. 1e9, x10).
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                       60000, 300000, 600000, 1800000, 3600000)
BYTES_BUCKETS = tuple(float(10**i) for i in range(10))

LABELS = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal",
    "source_app", "source_version", "source_canonical_service", "source_canonical_revision",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
)


def workload_labels(prefix: str, labels: Mapping[str, str], workload: str) -> dict[str, str]:
    """The app/version/canonical labels of a pod, keyed for :class:`RequestRecord`.

    ``prefix`` is "source" or "destination". As Istio: app is the ``app``
    label, version the ``version`` label; the canonical service is
    ``service.istio.io/canonical-name``, else ``app.kubernetes.io/name``, else
    ``app``, else the workload name; the canonical revision is
    ``service.istio.io/canonical-revision``, else ``app.kubernetes.io/version``,
    else ``version``, else "latest"."""
    canonical = (labels.get("service.istio.io/canonical-name")
                 or labels.get("app.kubernetes.io/name") or labels.get("app") or workload
                 or UNKNOWN)
    revision = (labels.get("service.istio.io/canonical-revision")
                or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest")
    return {
        f"{prefix}_app": labels.get("app", "") or UNKNOWN,
        f"{prefix}_version": labels.get("version", "") or UNKNOWN,
        f"{prefix}_canonical_service": canonical,
        f"{prefix}_canonical_revision": revision,
    }


@dataclass
class RequestRecord:
    """One request as one agent saw it (one record per reporter).

    Strings left empty are reported as "unknown" in metric labels."""

    reporter: str = "source"  # "source" | "destination"
    source_workload: str = ""
    source_workload_namespace: str = ""
    source_principal: str = ""  # Istio form "td/ns/NS/sa/SA" or a SPIFFE ID
    destination_workload: str = ""
    destination_workload_namespace: str = ""
    destination_principal: str = ""
    destination_service: str = ""  # FQDN: name.ns.svc.cluster.local
    destination_service_name: str = ""
    destination_service_namespace: str = ""
    request_protocol: str = "http"  # "http" | "grpc"
    response_code: int = 0  # 0: no response reached the client
    response_flags: str = ""  # Envoy's flags, comma separated; "" or "-" for none
    grpc_response_status: str = ""
    connection_security_policy: str = ""  # "mutual_tls" | "none"; "" = unknown
    method: str = ""
    path: str = ""  # with the query
    authority: str = ""
    duration_s: float = 0.0
    request_bytes: int = 0  # body bytes received from the client
    response_bytes: int = 0  # body bytes sent back to the client
    upstream: str = ""  # "ip:port" of the endpoint used
    route: str = ""  # Action.origin
    trace_id: str = ""
    start_time: float = 0.0  # epoch seconds
    # Beyond the design's interface: filled when known, defaults otherwise.
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = "latest"
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = "latest"
    protocol: str = "HTTP/1.1"  # the HTTP version, for the access log
    request_id: str = ""  # x-request-id
    user_agent: str = ""
    x_forwarded_for: str = ""
    downstream_remote_address: str = ""  # "ip:port" of the client
    upstream_cluster: str = ""  # Istio's "outbound|port|subset|host"
    span_id: str = ""
    response_code_details: str = ""  # "rbac_access_denied", "via_upstream", ...

    def metric_labels(self) -> dict[str, str]:
        return dict(zip(LABELS, self.label_values(), strict=True))

    def label_values(self) -> tuple[str, ...]:
        """The metric labels' values, in LABELS order ("unknown" for what is empty)."""
        u = UNKNOWN
        return (
            self.reporter or u,
            self.source_workload or u, self.source_workload_namespace or u,
            self.source_principal or u,
            self.source_app or u, self.source_version or u,
            self.source_canonical_service or u, self.source_canonical_revision or u,
            self.destination_workload or u, self.destination_workload_namespace or u,
            self.destination_principal or u,
            self.destination_app or u, self.destination_version or u,
            self.destination_canonical_service or u, self.destination_canonical_revision or u,
            self.destination_service or u, self.destination_service_name or u,
            self.destination_service_namespace or u,
            self.request_protocol or u, str(int(self.response_code)),
            self.grpc_response_status, self.response_flags or NO_FLAGS,
            self.connection_security_policy or u,
        )

    def access_fields(self) -> dict[str, str | int]:
        """The access-log line's fields (Envoy's default JSON names where there is one)."""
        return {
            "start_time": _utc_ms(self.start_time or time.time()),
            "reporter": self.reporter,
            "method": self.method or NO_FLAGS,
            "path": self.path or NO_FLAGS,
            "protocol": self.protocol,
            "response_code": int(self.response_code),
            "response_flags": _flags(self.response_flags),
            "response_code_details": self.response_code_details or NO_FLAGS,
            "bytes_received": int(self.request_bytes),
            "bytes_sent": int(self.response_bytes),
            "duration": round(self.duration_s * 1000),
            "upstream_host": self.upstream or NO_FLAGS,
            "upstream_cluster": self.upstream_cluster or NO_FLAGS,
            "downstream_remote_address": self.downstream_remote_address or NO_FLAGS,
            "x-request-id": self.request_id or NO_FLAGS,
            "x-forwarded-for": self.x_forwarded_for or NO_FLAGS,
            "user-agent": self.user_agent or NO_FLAGS,
            "authority": self.authority or NO_FLAGS,
            "route_name": self.route or NO_FLAGS,
            "trace_id": self.trace_id or NO_FLAGS,
            "source_workload": self.source_workload or UNKNOWN,
            "source_namespace": self.source_workload_namespace or UNKNOWN,
            "destination_workload": self.destination_workload or UNKNOWN,
            "destination_namespace": self.destination_workload_namespace or UNKNOWN,
            "destination_service": self.destination_service or UNKNOWN,
        }


def _flags(flags: str) -> str:
    return flags or NO_FLAGS


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _utc_ms(t: float) -> str:
    """``t`` (epoch seconds) as 2027-01-15T08:00:00.250Z, as ``datetime`` gives it
    (microseconds rounded half to even, then milliseconds truncated); the
    second's text is formatted once per second, not per request."""
    sec = math.floor(t)
    us = round((t - sec) * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    if _second[0] != sec:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
    return f"{_second[1]}{us // 1000:03d}Z"


class _Metrics:
    requests: Any
    duration: Any
    request_bytes: Any
    response_bytes: Any

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("istio_requests_total", "HTTP and gRPC requests", LABELS,
                                registry=registry)
        self.duration = Histogram("istio_request_duration_milliseconds",
                                  "duration of requests", LABELS,
                                  buckets=DURATION_BUCKETS_MS, registry=registry)
        self.request_bytes = Histogram("istio_request_bytes", "request body sizes", LABELS,
                                       buckets=BYTES_BUCKETS, registry=registry)
        self.response_bytes = Histogram("istio_response_bytes", "response body sizes",
                                        LABELS, buckets=BYTES_BUCKETS, registry=registry)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Metrics:
        """The metrics in ``registry``: registered now, or the ones already there
        (several RequestTelemetry objects may share the agent's registry)."""
        try:
            return cls(registry)
        except ValueError:  # already registered: reuse them
            known = registry._names_to_collectors
            found = object.__new__(cls)
            found.requests = known["istio_requests_total"]
            found.duration = known["istio_request_duration_milliseconds"]
            found.request_bytes = known["istio_request_bytes"]
            found.response_bytes = known["istio_response_bytes"]
            return found


class RequestTelemetry:
    """Records requests: Istio's metrics, an access-log line, nothing else.

    ``record`` never raises into the data path (a failure is logged)."""

    def __init__(self, registry: CollectorRegistry, *, tracer: Tracer | None = None,
                 access_log: bool = True) -> None:
        self._metrics = _Metrics.of(registry)
        self.tracer = tracer
        self.access_log = access_log
        # The labelled children by label values: prometheus_client's labels() costs
        # a dict of keyword arguments, a sort and a lock per call, four per request.
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}

    def _labelled(self, values: tuple[str, ...]) -> tuple[Any, Any, Any, Any]:
        found = self._children.get(values)
        if found is None:
            if len(self._children) >= MAX_CACHED_LABEL_SETS:
                self._children.clear()  # bounded; the registry keeps the series
            m = self._metrics
            found = (m.requests.labels(*values), m.duration.labels(*values),
                     m.request_bytes.labels(*values), m.response_bytes.labels(*values))
            self._children[values] = found
        return found

    def record(self, rec: RequestRecord) -> None:
        try:
            requests, duration, request_bytes, response_bytes = self._labelled(
                rec.label_values())
            requests.inc()
            duration.observe(max(0.0, rec.duration_s) * 1000.0)
            request_bytes.observe(max(0, rec.request_bytes))
            response_bytes.observe(max(0, rec.response_bytes))
            if self.access_log and access_log.isEnabledFor(logging.INFO):
                fields = rec.access_fields()
                # What access_log.info(..., extra=fields) makes, without its
                # per-call stack walk for the caller (findCaller): the line is
                # the same, its source location is not part of it.
                line = logging.LogRecord(
                    access_log.name, logging.INFO, __file__, 0, "%s %s %s %s",
                    (fields["method"], fields["path"], fields["response_code"],
                     fields["response_flags"]), None, "record")
                line.__dict__.update(fields)
                access_log.handle(line)
        except Exception:
            log.exception("recording request telemetry failed")


# --------------------------------------------------------------------------- trace context

_HEX = frozenset("0123456789abcdef")


def _hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX


def _nonzero(value: str) -> bool:
    return bool(value.strip("0"))


def _b3_trace_id(value: str) -> str | None:
    value = value.strip().lower()
    if _hex(value, 16):
        value = "0" * 16 + value
    return value if _hex(value, 32) and _nonzero(value) else None


def _b3_span_id(value: str) -> str | None:
    value = value.strip().lower()
    return value if _hex(value, 16) and _nonzero(value) else None


# Trace and span ids need to be unique, not secret (Envoy draws them from a PRNG
# too): a generator seeded from the OS, no getrandom() call per id.
_ids = random.Random(secrets.randbits(128))


def new_request_id() -> str:
    """An x-request-id in UUID version 4 form, drawn from the same generator as the
    trace ids (uuid.uuid4() asks the kernel for 16 bytes on every request)."""
    return str(uuid.UUID(int=_ids.getrandbits(128), version=4))


def _new_id(nbytes: int) -> str:
    while True:
        value = _ids.getrandbits(nbytes * 8)
        if value:
            return f"{value:0{nbytes * 2}x}"


def hop_context(parent: TraceContext | None, tracer: Tracer | None) -> TraceContext:
    """This hop's span: a child of the request's context, else the root of a new
    trace, sampled as the tracer says (always, without a tracer)."""
    if parent is not None:
        return parent.child()
    return TraceContext.new_root(sampled=tracer.sample() if tracer is not None else True)


@dataclass(frozen=True)
class TraceContext:
    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16 hex digits
    parent_id: str = ""  # 16 hex digits, "" for a root span
    sampled: bool = True

    @classmethod
    def new_root(cls, *, sampled: bool = True) -> TraceContext:
        return cls(trace_id=_new_id(16), span_id=_new_id(8), parent_id="", sampled=sampled)

    def child(self) -> TraceContext:
        return TraceContext(trace_id=self.trace_id, span_id=_new_id(8),
                            parent_id=self.span_id, sampled=self.sampled)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> TraceContext | None:
        """The context a request carries: traceparent, else b3, else x-b3-*; None if none
        is valid."""
        h = {k.lower(): v for k, v in headers.items()}
        if "traceparent" in h:
            ctx = parse_traceparent(h["traceparent"])
            if ctx is not None:
                return ctx
        if "b3" in h:
            ctx = parse_b3_single(h["b3"])
            if ctx is not None:
                return ctx
        return parse_b3_multi(h)

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def b3(self) -> str:
        out = f"{self.trace_id}-{self.span_id}-{'1' if self.sampled else '0'}"
        return f"{out}-{self.parent_id}" if self.parent_id else out

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write this context as traceparent and x-b3-* (and b3, if the request had one)."""
        for key in [k for k in headers if k.lower() in TRACE_HEADERS]:
            del headers[key]
        headers["traceparent"] = self.traceparent()
        headers["x-b3-traceid"] = self.trace_id
        headers["x-b3-spanid"] = self.span_id
        if self.parent_id:
            headers["x-b3-parentspanid"] = self.parent_id
        headers["x-b3-sampled"] = "1" if self.sampled else "0"


# Every header that carries a trace context (W3C and B3), lower-case.
TRACE_HEADERS = frozenset({"traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
                           "x-b3-sampled", "x-b3-flags", "b3"})


def with_trace(headers: Iterable[tuple[str, str]], ctx: TraceContext
               ) -> list[tuple[str, str]]:
    """``headers`` without any trace context of their own, then ``ctx`` as
    traceparent and x-b3-* (what a hop sends on in its span's name)."""
    injected: dict[str, str] = {}
    ctx.inject(injected)
    return [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS] + \
        list(injected.items())


def parse_traceparent(value: str) -> TraceContext | None:
    """W3C Trace Context ``traceparent``; None when invalid."""
    value = value.strip()
    parts = value.split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[:4]
    if not _hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not (_hex(trace_id, 32) and _hex(span_id, 16) and _hex(flags, 2)):
        return None
    if not (_nonzero(trace_id) and _nonzero(span_id)):
        return None
    return TraceContext(trace_id=trace_id, span_id=span_id, parent_id="",
                        sampled=bool(int(flags, 16) & 1))


def _b3_sampled(value: str | None) -> bool | None:
    if value is None:
        return None
    value = value.strip().lower()
    if value in ("1", "d", "true"):
        return True
    if value in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> TraceContext | None:
    """B3 single header ``{trace}-{span}[-{sampling}[-{parent}]]``; a sampling-only
    value ("0", "1", "d") carries no context (None)."""
    parts = value.strip().split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace_id, span_id = _b3_trace_id(parts[0]), _b3_span_id(parts[1])
    if trace_id is None or span_id is None:
        return None
    sampled = True
    if len(parts) >= 3:
        said = _b3_sampled(parts[2])
        if said is None:
            return None
        sampled = said
    parent = ""
    if len(parts) == 4:
        p = _b3_span_id(parts[3])
        if p is None:
            return None
        parent = p
    return TraceContext(trace_id=trace_id, span_id=span_id, parent_id=parent, sampled=sampled)


def parse_b3_multi(headers: Mapping[str, str]) -> TraceContext | None:
    """B3 multi headers (lower-case keys); None when trace or span id is missing/invalid.
    Sampling defers (absent) to sampled; ``x-b3-flags: 1`` (debug) is sampled."""
    if "x-b3-traceid" not in headers or "x-b3-spanid" not in headers:
        return None
    trace_id = _b3_trace_id(headers["x-b3-traceid"])
    span_id = _b3_span_id(headers["x-b3-spanid"])
    if trace_id is None or span_id is None:
        return None
    parent = ""
    if headers.get("x-b3-parentspanid"):
        p = _b3_span_id(headers["x-b3-parentspanid"])
        if p is None:
            return None
        parent = p
    sampled = _b3_sampled(headers.get("x-b3-sampled"))
    if headers.get("x-b3-flags", "").strip() == "1":
        sampled = True
    return TraceContext(trace_id=trace_id, span_id=span_id, parent_id=parent,
                        sampled=True if sampled is None else sampled)


# --------------------------------------------------------------------------- tracer

Sender = Callable[[bytes], Awaitable[None]]
SPAN_KINDS = frozenset({"SERVER", "CLIENT", "PRODUCER", "CONSUMER"})


def zipkin_span(ctx: TraceContext, *, name: str, kind: str, start: float, duration_s: float,
                tags: Mapping[str, str], service: str) -> dict[str, Any]:
    """A Zipkin v2 span (JSON object) for ctx."""
    span: dict[str, Any] = {
        "traceId": ctx.trace_id,
        "id": ctx.span_id,
        "name": name,
        "timestamp": int(start * 1_000_000),
        "duration": max(1, int(duration_s * 1_000_000)),
        "localEndpoint": {"serviceName": service},
        "tags": {str(k): str(v) for k, v in tags.items()},
    }
    if ctx.parent_id:
        span["parentId"] = ctx.parent_id
    if kind.upper() in SPAN_KINDS:
        span["kind"] = kind.upper()
    return span


def parse_endpoint(endpoint: str) -> tuple[str, int, str]:
    """(host, port, path of the spans API) of an http:// collector URL.

    A URL without a path (or "/") gets Zipkin's ``/api/v2/spans``."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme != "http" or not url.hostname:
        raise errors.Invalid(f"zipkin endpoint {endpoint!r}: want http://HOST[:PORT][/PATH]")
    try:
        port = url.port or 80
    except ValueError as e:
        raise errors.Invalid(f"zipkin endpoint {endpoint!r}: {e}") from None
    path = url.path if url.path not in ("", "/") else "/api/v2/spans"
    return url.hostname, port, path


class Tracer:
    """Sends spans to a Zipkin v2 collector (see the module's contract)."""

    def __init__(self, endpoint: str, *, local_service: str,
                 registry: CollectorRegistry | None = None, max_queue: int = 2048,
                 batch_size: int = 256, interval: float = 1.0, timeout: float = 2.0,
                 sender: Sender | None = None, sampling: float = 100.0) -> None:
        self.host, self.port, self.path = parse_endpoint(endpoint)
        if not 0.0 <= sampling <= 100.0:
            raise errors.Invalid(f"trace sampling {sampling:g}: must be a percentage, "
                                 "0 to 100")
        self.sampling = sampling  # percent of new traces sampled (Istio's tracing.sampling)
        self.endpoint = endpoint
        self.local_service = local_service
        self._queue: deque[dict[str, Any]] = deque()
        self._max_queue = max_queue
        self._batch = batch_size
        self._interval = interval
        self._timeout = timeout
        self._send = sender or self._post
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self._sent_metric: Any = None
        self._dropped_metric: Any = None
        if registry is not None:
            self._sent_metric = Counter("shoal_mesh_spans_sent", "spans sent to the collector",
                                        registry=registry)
            self._dropped_metric = Counter(
                "shoal_mesh_spans_dropped", "spans dropped: queue full or the collector "
                "failed", ("reason",), registry=registry)

    # -- the data path side: never blocks, never raises

    def sample(self) -> bool:
        """Whether a trace started here is sampled (the decision of the first hop;
        a request that carries a context keeps its own)."""
        return self.sampling >= 100.0 or _ids.random() * 100.0 < self.sampling

    def finish(self, ctx: TraceContext, *, name: str, kind: str, start: float,
               duration_s: float, tags: Mapping[str, str], service: str = "") -> None:
        """Queue a finished span (dropped, and counted, when the queue is full).

        ``service``: the Zipkin serviceName (default: the tracer's local_service)."""
        try:
            if not ctx.sampled:
                return
            if len(self._queue) >= self._max_queue:
                self._drop(1, "queue_full")
                return
            self._queue.append(zipkin_span(ctx, name=name, kind=kind, start=start,
                                           duration_s=duration_s, tags=tags,
                                           service=service or self.local_service))
            if len(self._queue) >= self._batch:
                self._wake.set()
        except Exception:
            log.exception("queueing a span failed")

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self._dropped_metric is not None:
            self._dropped_metric.labels(reason).inc(n)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the background side

    def start(self) -> None:
        """Start the sender task in the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="zipkin")

    async def run(self) -> None:
        while True:
            await wait_set(self._wake, self._interval)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything queued now, batch by batch."""
        while self._queue:
            n = min(self._batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            try:
                async with asyncio.timeout(self._timeout):
                    await self._send(json.dumps(batch).encode())
            except asyncio.CancelledError:
                self._drop(len(batch), "shutdown")
                raise
            except Exception as e:
                self._drop(len(batch), "collector_error")
                log.warning("zipkin collector %s: %d spans dropped: %s", self.endpoint,
                            len(batch), e)
                return
            self.sent += len(batch)
            if self._sent_metric is not None:
                self._sent_metric.inc(len(batch))

    async def close(self, grace: float = 2.0) -> None:
        """Stop the sender after trying, for at most ``grace`` seconds, to send the queue."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            async with asyncio.timeout(grace):
                await self.flush()
        except TimeoutError:
            pass
        if self._queue:
            self._drop(len(self._queue), "shutdown")
            self._queue.clear()

    async def _post(self, body: bytes) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ConnectionError(f"bad response {status_line[:80]!r}")
            status = int(parts[1])
            if not 200 <= status < 300:
                raise ConnectionError(f"HTTP {status}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass
class SpanTimer:
    """Helper for callers: when a span started (wall clock for Zipkin, monotonic for its
    length)."""

    wall: float = field(default_factory=time.time)
    mono: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.mono
