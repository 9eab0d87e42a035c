"""shoal.eventloop: the daemons' choice of event loop."""

from __future__ import annotations

import asyncio

import pytest

from shoal import eventloop


@pytest.mark.parametrize("name, module", [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_runs_the_coroutine_on_the_named_loop(name: str, module: str) -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    eventloop.run(main(), name)
    assert seen and seen[0].split(".")[0] == module


def test_an_unknown_loop_is_refused_without_running_anything() -> None:
    ran = []

    async def main() -> None:
        ran.append(True)

    with pytest.raises(ValueError, match="event loop 'tokio': want one of uvloop, asyncio"):
        eventloop.run(main(), "tokio")
    assert not ran
