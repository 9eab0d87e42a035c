"""``eventloop.PauseMetrics``: a callback that holds the loop and a garbage
collection show in the metrics, with how long they took."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from prometheus_client import CollectorRegistry

from shoal import eventloop


def _count(registry: CollectorRegistry, name: str, le: str, **labels: str) -> float:
    value = registry.get_sample_value(f"{name}_bucket", {**labels, "le": le})
    assert value is not None, f"{name} {labels} le={le} not exported"
    return value


@pytest.mark.asyncio
async def test_a_held_loop_and_a_collection_are_measured() -> None:
    registry = CollectorRegistry()
    pauses = eventloop.PauseMetrics(registry, interval=0.005)
    pauses.start()
    try:
        await asyncio.sleep(0.05)  # the sampler runs on time
        time.sleep(0.03)  # noqa: ASYNC251 - the point: a callback holding the loop 30 ms
        await asyncio.sleep(0.02)
        gc.collect()
    finally:
        pauses.stop()
    total = registry.get_sample_value("shoal_event_loop_lag_seconds_count")
    assert total is not None and total >= 5
    assert total - _count(registry, "shoal_event_loop_lag_seconds", "0.02") >= 1  # the hold
    assert _count(registry, "python_gc_pause_seconds", "+Inf", generation="2") >= 1
    # Stopped: no more samples, no callback left in the collector's list.
    await asyncio.sleep(0.02)
    assert registry.get_sample_value("shoal_event_loop_lag_seconds_count") == total
    assert pauses._on_gc not in gc.callbacks
