"""Where the HorizontalPodAutoscaler controller reads its metrics: a small interface and
the two real sources.

    MetricsSource.resource_usage(namespace, selector, resource) -> {pod: value}
        APIResourceUsage: the metrics API (``client.pod_metrics``), summed over
        each pod's containers: CPU in millicores, memory in bytes
    MetricsSource.pods_metric(namespace, metric, pods) -> {pod: value}
        MeshRequestRates (istio_requests_per_second): every node's meshagent
        ``:15020/metrics`` scraped; ``istio_requests_total`` with
        reporter="destination" for the pods' workloads (destination_workload,
        destination_workload_namespace) summed, as a rate between this scrape
        and the previous one of the same node; the workload's rate is shared
        evenly among its running pods (the mesh counts per workload, not per pod)

A rate needs two scrapes: the first call for a node only remembers it, so a
metric is unavailable (:class:`MetricUnavailable`) until the second. Scrapes
closer together than ``min_interval`` reuse the last one (several autoscalers
syncing at once share it). A node that cannot be scraped is left out and its
last good scrape kept, so the next rate spans the gap. A counter that went
down (a restarted meshagent) counts from zero.

Tests use a fake source (``tests/unit/test_podautoscaler.py``) and a fake
``fetch`` for the scraping.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from apiserver.nodedialing import internal_ip
from shoal import autoscaling, meshnames, quantity
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient

log = logging.getLogger(__name__)

MESH_METRICS_PORT = 15020
REQUESTS_TOTAL = "istio_requests_total"


class MetricUnavailable(Exception):
    """The metric cannot be computed now (a reason a person can read)."""


class MetricsSource(Protocol):
    async def resource_usage(self, *, namespace: str, selector: str,
                             resource: str) -> dict[str, float]:
        """Each pod's usage of ``resource``: CPU in millicores, memory in bytes."""

    async def pods_metric(self, *, namespace: str, metric: str,
                          pods: Sequence[core_pb2.Pod]) -> dict[str, float]:
        """Each pod's value of a per-pod metric (e.g. requests per second)."""


def workload_name(pod: core_pb2.Pod) -> str:
    """The mesh's destination_workload for a pod (as the meshagent names it)."""
    return meshnames.workload_name(pod.metadata.labels, pod.metadata.name)


class APIResourceUsage:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def resource_usage(self, *, namespace: str, selector: str,
                             resource: str) -> dict[str, float]:
        listed = await self.client.pod_metrics(namespace=namespace, label_selector=selector)
        out: dict[str, float] = {}
        for m in listed.items:
            total = 0
            for c in m.containers:
                q = c.usage.get(resource)
                if q is None or not q.value:
                    continue
                total += quantity.milli(q.value) if resource == "cpu" else \
                    quantity.to_int(q.value)
            out[m.metadata.name] = float(total)
        return out

    async def pods_metric(self, *, namespace: str, metric: str,
                          pods: Sequence[core_pb2.Pod]) -> dict[str, float]:
        raise MetricUnavailable(f"the metrics API has no per-pod metric {metric!r}")


# -- the mesh's request rates -------------------------------------------------------------


Counters = Mapping[tuple[str, str], float]  # (namespace, workload) -> requests


def destination_requests(text: str) -> dict[tuple[str, str], float]:
    """istio_requests_total reported by the destination, summed per workload."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name != REQUESTS_TOTAL or s.labels.get("reporter") != "destination":
                continue
            key = (s.labels.get("destination_workload_namespace", ""),
                   s.labels.get("destination_workload", ""))
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


@dataclass(frozen=True)
class Scrape:
    at: float
    counters: Counters


def rates_between(before: Scrape, after: Scrape) -> dict[tuple[str, str], float]:
    """Requests per second between two scrapes of one node. A series new in
    ``after`` started at zero; one that went down restarted from zero."""
    span = after.at - before.at
    if span <= 0:
        return {}
    out = {}
    for key, now in after.counters.items():
        was = before.counters.get(key, 0.0)
        out[key] = (now - was if now >= was else now) / span
    return out


def _http_get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode("utf-8", "replace"))


class MeshRequestRates:
    """``pods_metric`` for istio_requests_per_second (see the module docstring)."""

    def __init__(self, *, nodes: Callable[[], Iterable[core_pb2.Node]],
                 clock: Callable[[], float], port: int = MESH_METRICS_PORT,
                 fetch: Callable[[str], Awaitable[str]] | None = None,
                 min_interval: float = 1.0, timeout: float = 3.0) -> None:
        self.nodes = nodes
        self.clock = clock
        self.port = port
        self.timeout = timeout
        self.fetch = fetch or self._fetch
        self.min_interval = min_interval
        # Per node: the scrape before the last, and the last.
        self.scrapes: dict[str, tuple[Scrape | None, Scrape]] = {}
        self._lock = asyncio.Lock()

    async def _fetch(self, url: str) -> str:
        return await asyncio.to_thread(_http_get, url, self.timeout)

    async def _scrape(self, node: core_pb2.Node) -> None:
        name, ip = node.metadata.name, internal_ip(node)
        if not ip:
            return
        now = self.clock()
        kept = self.scrapes.get(name)
        if kept is not None and now - kept[1].at < self.min_interval:
            return
        host = f"[{ip}]" if ":" in ip else ip
        try:
            text = await self.fetch(f"http://{host}:{self.port}/metrics")
            counters = destination_requests(text)
        except (OSError, ValueError) as e:
            log.info("cannot scrape the meshagent on %s: %s", name, e)
            return
        self.scrapes[name] = (kept[1] if kept else None, Scrape(now, counters))

    async def workload_rates(self) -> dict[tuple[str, str], float]:
        """Requests per second per (namespace, workload), over every node with two scrapes."""
        async with self._lock:
            nodes = list(self.nodes())
            await asyncio.gather(*(self._scrape(n) for n in nodes))
            names = {n.metadata.name for n in nodes}
            for gone in set(self.scrapes) - names:
                del self.scrapes[gone]
        total: dict[tuple[str, str], float] = {}
        ready = 0
        for before, after in self.scrapes.values():
            if before is None:
                continue
            ready += 1
            for key, rate in rates_between(before, after).items():
                total[key] = total.get(key, 0.0) + rate
        if not ready:
            raise MetricUnavailable("the mesh's request counters were scraped once; a rate "
                                    "needs a second scrape")
        return total

    async def resource_usage(self, *, namespace: str, selector: str,
                             resource: str) -> dict[str, float]:
        raise MetricUnavailable("resource metrics come from the metrics API")

    async def pods_metric(self, *, namespace: str, metric: str,
                          pods: Sequence[core_pb2.Pod]) -> dict[str, float]:
        if metric != autoscaling.MESH_REQUEST_RATE:
            raise MetricUnavailable(f"no per-pod metric {metric!r}")
        rates = await self.workload_rates()
        running = [p for p in pods if p.status.phase == "Running"
                   and not p.metadata.HasField("deletion_timestamp")]
        if not running:
            return {}
        workloads = {workload_name(p) for p in running}
        total = sum(rates.get((namespace, w), 0.0) for w in workloads)
        share = total / len(running)
        return {p.metadata.name: share for p in running}


class CombinedSource:
    """Resource metrics from one source, per-pod metrics from another."""

    def __init__(self, *, resources: MetricsSource, pods: MetricsSource) -> None:
        self.resources = resources
        self.pods = pods

    async def resource_usage(self, *, namespace: str, selector: str,
                             resource: str) -> dict[str, float]:
        return await self.resources.resource_usage(namespace=namespace, selector=selector,
                                                   resource=resource)

    async def pods_metric(self, *, namespace: str, metric: str,
                          pods: Sequence[core_pb2.Pod]) -> dict[str, float]:
        return await self.pods.pods_metric(namespace=namespace, metric=metric, pods=pods)
