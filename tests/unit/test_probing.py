"""Probes: handlers against loopback servers, thresholds with an instant clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodeagent.probing import ProbeLoop, resolve_port, run_probe
from nodeagent.runtimestate import ContainerRecord, ContainerState, ProbeView
from shoal.api.core.v1 import core_pb2


async def _http_server(status: int) -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def container(port: int = 8080) -> core_pb2.Container:
    c = core_pb2.Container(name="app", image="x")
    c.ports.add(name="http", container_port=port)
    return c


async def no_exec(cid: str, cmd: list[str], timeout: float) -> tuple[int, str]:
    raise AssertionError("exec must not be called")


@pytest.mark.parametrize(("status", "ok"), [(200, True), (302, True), (404, False),
                                            (500, False)])
async def test_http_get(status: int, ok: bool) -> None:
    server, port = await _http_server(status)
    async with server:
        probe = core_pb2.Probe(timeout_seconds=2)
        probe.http_get.path = "/healthz"
        probe.http_get.port.str_val = "http"
        out = await run_probe(probe, container=container(port), container_id="c",
                              pod_ip="127.0.0.1", exec_fn=no_exec)
    assert out.ok is ok
    if not ok:
        assert str(status) in out.message


async def test_tcp_socket_open_and_closed() -> None:
    server, port = await _http_server(200)
    probe = core_pb2.Probe(timeout_seconds=1)
    probe.tcp_socket.port.int_val = port
    async with server:
        assert (await run_probe(probe, container=container(), container_id="c",
                                pod_ip="127.0.0.1", exec_fn=no_exec)).ok
    closed = await run_probe(probe, container=container(), container_id="c",
                             pod_ip="127.0.0.1", exec_fn=no_exec)
    assert not closed.ok and "probe failed" in closed.message


async def test_exec_and_named_port_errors() -> None:
    async def fake_exec(cid: str, cmd: list[str], timeout: float) -> tuple[int, str]:
        return (0, "") if cmd == ["true"] else (1, "boom")

    probe = core_pb2.Probe()
    probe.exec.command.append("true")
    assert (await run_probe(probe, container=container(), container_id="c", pod_ip="",
                            exec_fn=fake_exec)).ok
    probe.exec.command[0] = "false"
    out = await run_probe(probe, container=container(), container_id="c", pod_ip="",
                          exec_fn=fake_exec)
    assert not out.ok and "exited 1" in out.message
    p = core_pb2.Probe()
    p.tcp_socket.port.str_val = "nope"
    with pytest.raises(ValueError, match="not a named port"):
        resolve_port(p.tcp_socket.port, container())


async def test_thresholds_flip_results_and_notify() -> None:
    results = iter([1, 1, 0, 1, 1, 1, 0, 0, 0])
    changes: list[bool | None] = []
    view = ProbeView()

    async def fake_exec(cid: str, cmd: list[str], timeout: float) -> tuple[int, str]:
        try:
            return next(results), ""
        except StopIteration:
            raise asyncio.CancelledError from None

    spec = container()
    probe = core_pb2.Probe(failure_threshold=3, success_threshold=1, period_seconds=5)
    probe.exec.command.append("check")
    loop = ProbeLoop(kind="liveness", probe=probe, container=spec,
                     record=ContainerRecord(id="c", name="app", attempt=0,
                                            state=ContainerState.RUNNING),
                     pod_ip="", view=view, exec_fn=fake_exec,
                     on_change=lambda: changes.append(view.live.get("app")),
                     sleep=lambda s: asyncio.sleep(0))
    with pytest.raises(asyncio.CancelledError):
        await loop.run()
    # Exit codes 1,1: two failures, below the threshold (no flip); 0 passes (True);
    # 1,1,1: three in a row flip it False; 0 flips it back.
    assert changes == [True, False, True]


async def test_startup_probe_gates_liveness() -> None:
    view = ProbeView()
    calls: list[str] = []

    async def fake_exec(cid: str, cmd: list[str], timeout: float) -> tuple[int, str]:
        calls.append(cmd[0])
        if len(calls) > 3:
            raise asyncio.CancelledError
        return 1, ""

    spec = container()
    spec.startup_probe.exec.command.append("start")
    spec.liveness_probe.exec.command.append("live")
    loop = ProbeLoop(kind="liveness", probe=spec.liveness_probe, container=spec,
                     record=ContainerRecord(id="c", name="app", attempt=0,
                                            state=ContainerState.RUNNING),
                     pod_ip="", view=view, exec_fn=fake_exec, on_change=lambda: None,
                     sleep=lambda s: asyncio.sleep(0))
    task: Any = asyncio.create_task(loop.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert calls == []  # gated until the startup probe passes
    view.started["app"] = True
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls and set(calls) == {"live"}
