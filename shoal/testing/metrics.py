"""Reading a Prometheus text exposition in tests and benchmarks."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, *, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` (``..._total`` for a counter) whose
    labels include ``labels``; 0 when there are none."""
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
