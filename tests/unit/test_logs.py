"""Reading CRI log files: partial lines, tail, timestamps, follow."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nodeagent.logs import container_logs, parse_line, read_logs

LOG = (b"2026-01-01T00:00:01.000000000Z stdout F one\n"
       b"2026-01-01T00:00:02.000000000Z stderr P tw\n"
       b"2026-01-01T00:00:02.100000000Z stderr F o\n"
       b"2026-01-01T00:00:03.000000000Z stdout F three\n")


async def collect(path: Path, **kw: object) -> list[str]:
    return [t async for t in read_logs(path, **kw)]  # type: ignore[arg-type]


async def test_full_partial_and_tail(tmp_path: Path) -> None:
    p = tmp_path / "0.log"
    p.write_bytes(LOG)
    assert await collect(p) == ["one\n", "two\n", "three\n"]
    assert await collect(p, tail=2) == ["two\n", "three\n"]
    assert await collect(p, tail=0) == []
    stamped = await collect(p, tail=1, timestamps=True)
    assert stamped == ["2026-01-01T00:00:03.000000000Z three\n"]
    assert parse_line(b"garbage") is None


async def test_follow_sees_appended_lines_until_done(tmp_path: Path) -> None:
    p = tmp_path / "0.log"
    p.write_bytes(LOG[:44])
    state = {"done": False}
    got: list[str] = []

    async def reader() -> None:
        async for text in read_logs(p, follow=True, done=lambda: state["done"], poll=0.01):
            got.append(text)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    with open(p, "ab") as f:  # noqa: ASYNC230
        f.write(LOG[44:])
    async with asyncio.timeout(5):
        while len(got) < 3:
            await asyncio.sleep(0.01)
    state["done"] = True
    async with asyncio.timeout(5):
        await task
    assert got == ["one\n", "two\n", "three\n"]


def test_attempt_files_in_order(tmp_path: Path) -> None:
    d = tmp_path / "app"
    d.mkdir()
    for n in (10, 2, 0):
        (d / f"{n}.log").write_bytes(b"")
    assert [p.name for p in container_logs(tmp_path, "app")] == ["0.log", "2.log", "10.log"]
