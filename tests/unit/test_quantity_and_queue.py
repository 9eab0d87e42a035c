"""Quantities, back-off and the work queue."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import pytest

from shoal import quantity
from shoal.backoff import Backoff
from shoal.queueing import WorkQueue


@pytest.mark.parametrize(("text", "value"), [
    ("1", Fraction(1)), ("50m", Fraction(1, 20)), ("64Mi", Fraction(64 * 2**20)),
    ("1.5Gi", Fraction(3 * 2**29)), ("2k", Fraction(2000)), ("1e3", Fraction(1000)),
    ("0.5", Fraction(1, 2)), ("100n", Fraction(1, 10**7)), ("+3", Fraction(3)),
])
def test_quantities_parse_exactly(text: str, value: Fraction) -> None:
    assert quantity.parse(text) == value


@pytest.mark.parametrize("bad", ["", "lots", "1Qi", "1.2.3", "m", "1 Gi"])
def test_bad_quantities(bad: str) -> None:
    with pytest.raises(quantity.QuantityError):
        quantity.parse(bad)


def test_quantity_helpers_compare_as_numbers() -> None:
    assert quantity.milli("250m") == 250 and quantity.milli("1.5") == 1500
    assert quantity.to_int("1Ki") == 1024 and quantity.to_int("1.5") == 2
    assert quantity.parse("1Gi") > quantity.parse("1G")
    assert quantity.format_bytes(64 * 2**20) == "64Mi"
    assert quantity.format_cpu_milli(2000) == "2" and quantity.format_cpu_milli(250) == "250m"


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(base=1, cap=8, jitter=0)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 8, 8]
    b.reset()
    assert b.next() == 1
    j = Backoff(base=1, cap=100, jitter=0.2)
    assert all(0.8 <= j.next() / (2**i) <= 1.2 for i in range(5))


async def test_queue_collapses_duplicates_and_never_hands_out_a_key_twice() -> None:
    q = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    k = await q.get()
    assert k == "a"
    q.add("a")  # while processing: comes back after done, once
    q.add("a")
    assert await q.get() == "b"
    q.done("b")
    assert len(q) == 0
    q.done("a")
    assert await q.get() == "a"


async def test_queue_rate_limit_and_forget() -> None:
    q = WorkQueue(base_delay=0.01, max_delay=0.04)
    delays = [q.add_rate_limited("k") for _ in range(4)]
    assert delays[0] < delays[-1] <= 0.04 * 1.2
    async with asyncio.timeout(2):
        assert await q.get() == "k"
    q.done("k")
    assert q.retries("k") == 4
    q.forget("k")
    assert q.retries("k") == 0
