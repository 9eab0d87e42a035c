"""The monitoring port's ``shoal_asyncio_tasks`` gauge (issue 10's soak samples it
from every daemon): it counts the serving loop's unfinished tasks, so a task the
daemon starts shows up and one that ends goes away."""

from __future__ import annotations

import asyncio
import re

from prometheus_client import CollectorRegistry

from shoal.monitoring import MonitoringServer, Readiness

GAUGE = re.compile(rb"^shoal_asyncio_tasks (\d+)$", re.M)


async def _tasks(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = await reader.read()
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"# TYPE shoal_asyncio_tasks gauge" in body
    m = GAUGE.search(body)
    assert m, body[-300:]
    return int(m.group(1))


def test_the_gauge_follows_the_loops_tasks() -> None:
    async def main() -> None:
        server = MonitoringServer(host="127.0.0.1", port=0, registry=CollectorRegistry(),
                                  readiness=Readiness())
        await server.start()
        try:
            before = await _tasks(server.port)
            assert before >= 2  # this test's main task and the request's handler
            extra = [asyncio.create_task(asyncio.sleep(60)) for _ in range(5)]
            assert await _tasks(server.port) == before + 5
            for t in extra:
                t.cancel()
            await asyncio.gather(*extra, return_exceptions=True)
            assert await _tasks(server.port) == before
        finally:
            await server.close()

    asyncio.run(main())
