"""The apiserver's Prometheus metrics, on a registry of its own (no globals).

Names follow the apiserver's own conventions in Kubernetes where one exists
(``apiserver_request_total``), prefixed ``shoal_``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shoal_apiserver_request_total",
            "Requests served, by method, resource and result code.",
            ["method", "resource", "code"], registry=r)
        self.latency = Histogram(
            "shoal_apiserver_request_duration_seconds",
            "Time to serve a unary request, by method and resource.",
            ["method", "resource"], buckets=_LATENCY_BUCKETS, registry=r)
        self.watchers = Gauge(
            "shoal_apiserver_watchers", "Open client watches, by resource.",
            ["resource"], registry=r)
        self.watch_events = Counter(
            "shoal_apiserver_watch_events_sent_total",
            "Watch events written to clients, by resource.", ["resource"], registry=r)
        self.storage_latency = Histogram(
            "shoal_storage_request_duration_seconds",
            "Time of storage operations, by operation.", ["operation"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.storage_errors = Counter(
            "shoal_storage_errors_total", "Failed storage operations, by operation and reason.",
            ["operation", "reason"], registry=r)
        self.cache_revision = Gauge(
            "shoal_watch_cache_revision", "The storage revision the watch cache has reached.",
            registry=r)
        self.cache_objects = Gauge(
            "shoal_watch_cache_objects", "Objects held in the watch cache, by resource.",
            ["resource"], registry=r)

    def set_watchers(self, resource: str, count: int) -> None:
        self.watchers.labels(resource).set(count)

    @asynccontextmanager
    async def storage_op(self, operation: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        try:
            yield
        except Exception as e:
            self.storage_errors.labels(operation, type(e).__name__).inc()
            raise
        finally:
            self.storage_latency.labels(operation).observe(time.perf_counter() - start)

    def cache_collector(self, sizes: Callable[[], dict[str, int]], revision: Callable[[], int]
                        ) -> None:
        """Have the cache gauges read live values at scrape time."""
        self.cache_revision.set_function(revision)
        for resource in sizes():
            self.cache_objects.labels(resource).set_function(_size_of(sizes, resource))


def _size_of(sizes: Callable[[], dict[str, int]], resource: str) -> Callable[[], float]:
    return lambda: float(sizes().get(resource, 0))
