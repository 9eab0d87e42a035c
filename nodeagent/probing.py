"""Liveness, readiness and startup probes: exec, httpGet and tcpSocket.

One ``ProbeLoop`` per (container instance, probe kind). It waits
``initialDelaySeconds``, then probes every ``periodSeconds`` with a
``timeoutSeconds`` bound, and flips its result only after
``successThreshold`` successes or ``failureThreshold`` failures in a row
(Kubernetes' semantics). While a startup probe has not passed, liveness and
readiness do not run. Results land in the pod's :class:`ProbeView`; a flip
calls ``on_change(uid)`` so the pod worker re-plans (a failed liveness probe
becomes a kill-and-restart there, not here).

    initial: liveness True (no restart before evidence), readiness False,
             startup False
    loop: sleep period -> probe -> count -> maybe flip -> on_change

Contract: loops are cancelled by ``forget(uid)`` or ``sync_pod`` when the
container instance they watch is gone; nothing here touches the runtime except
through the ``exec_fn`` it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httptools

from nodeagent.runtimestate import ContainerRecord, ContainerState, PodRecord, ProbeView

log = logging.getLogger(__name__)

# (container id, command, timeout) -> (exit code, output)
ExecFn = Callable[[str, list[str], float], Awaitable[tuple[int, str]]]
KINDS = ("startup", "liveness", "readiness")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str = ""


def resolve_port(port: Any, container: Any) -> int:
    """An IntOrString probe port: a number, or a named container port."""
    if port.WhichOneof("value") == "str_val":
        for p in container.ports:
            if p.name == port.str_val:
                return int(p.container_port)
        raise ValueError(f"port {port.str_val!r} is not a named port of {container.name}")
    return int(port.int_val)


class _Response:
    def __init__(self) -> None:
        self.done = False

    def on_headers_complete(self) -> None:
        self.done = True


async def http_get(host: str, port: int, path: str, *, headers: list[tuple[str, str]],
                   timeout: float) -> Outcome:
    """Kubernetes counts 200-399 as success."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            lines = [f"GET {path or '/'} HTTP/1.1", f"Host: {host}:{port}",
                     "User-Agent: shoal-probe/0.1", "Accept: */*", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in headers]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
            resp = _Response()
            parser = httptools.HttpResponseParser(resp)
            while not resp.done:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                parser.feed_data(chunk)
            code = parser.get_status_code()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    if 200 <= code < 400:
        return Outcome(True)
    return Outcome(False, f"HTTP probe failed with statuscode: {code}")


async def run_probe(probe: Any, *, container: Any, container_id: str, pod_ip: str,
                    exec_fn: ExecFn) -> Outcome:
    timeout = float(probe.timeout_seconds or 1)
    try:
        if probe.HasField("exec"):
            code, out = await exec_fn(container_id, list(probe.exec.command), timeout)
            return Outcome(code == 0, "" if code == 0 else
                           f"command {list(probe.exec.command)} exited {code}: {out[:200]}")
        if probe.HasField("http_get"):
            h = probe.http_get
            return await http_get(h.host or pod_ip, resolve_port(h.port, container), h.path,
                                  headers=[(x.name, x.value) for x in h.http_headers],
                                  timeout=timeout)
        if probe.HasField("tcp_socket"):
            t = probe.tcp_socket
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(
                    t.host or pod_ip, resolve_port(t.port, container))
            writer.close()
            return Outcome(True)
        return Outcome(False, "probe has no handler")
    except TimeoutError:
        return Outcome(False, f"probe timed out after {timeout:g}s")
    except (OSError, ValueError, httptools.HttpParserError) as e:
        return Outcome(False, f"probe failed: {e}")
    except Exception as e:  # an exec error from the runtime (classified elsewhere)
        return Outcome(False, f"probe failed: {e}")


class ProbeLoop:
    def __init__(self, *, kind: str, probe: Any, container: Any, record: ContainerRecord,
                 pod_ip: str, view: ProbeView, exec_fn: ExecFn,
                 on_change: Callable[[], None],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.kind = kind
        self.probe = probe
        self.container = container
        self.record = record
        self.pod_ip = pod_ip
        self.view = view
        self.exec_fn = exec_fn
        self.on_change = on_change
        self.sleep = sleep
        # Told of every failed attempt, as "Liveness probe failed: ..." (an Event).
        self.on_failure = on_failure
        self.last: Outcome | None = None

    def _table(self) -> dict[str, bool]:
        return {"liveness": self.view.live, "readiness": self.view.ready,
                "startup": self.view.started}[self.kind]

    async def run(self) -> None:
        p = self.probe
        await self.sleep(float(p.initial_delay_seconds))
        successes = failures = 0
        table = self._table()
        name = self.container.name
        while True:
            gated = self.kind != "startup" and self.container.HasField("startup_probe") \
                and not self.view.started.get(name, False)
            if not gated:
                out = await run_probe(p, container=self.container, container_id=self.record.id,
                                      pod_ip=self.pod_ip, exec_fn=self.exec_fn)
                self.last = out
                if out.ok:
                    successes, failures = successes + 1, 0
                    if successes >= (p.success_threshold or 1) and table.get(name) is not True:
                        table[name] = True
                        self.on_change()
                else:
                    successes, failures = 0, failures + 1
                    if self.on_failure is not None:
                        self.on_failure(f"{self.kind.capitalize()} probe failed: {out.message}")
                    if failures >= (p.failure_threshold or 3) and table.get(name) is not False:
                        table[name] = False
                        log.info("%s probe of %s failed: %s", self.kind, name, out.message)
                        self.on_change()
                if self.kind == "startup" and table.get(name):
                    return  # a passed startup probe is done
            await self.sleep(float(p.period_seconds or 10))


class ProbeManager:
    """Probe loops for every pod on the node, started and stopped by the pod workers."""

    def __init__(self, *, exec_fn: ExecFn, on_change: Callable[[str], None],
                 on_failure: Callable[[str, str, str], None] | None = None) -> None:
        self.exec_fn = exec_fn
        self.on_change = on_change
        # (pod uid, container name, message) for every failed probe attempt.
        self.on_failure = on_failure
        self.views: dict[str, ProbeView] = {}
        self._loops: dict[tuple[str, str, str], tuple[str, asyncio.Task[None]]] = {}
        self.last: dict[tuple[str, str, str], ProbeLoop] = {}

    def view(self, uid: str) -> ProbeView:
        return self.views.setdefault(uid, ProbeView())

    def sync_pod(self, pod: Any, record: PodRecord) -> None:
        """Start loops for running container instances; stop loops of gone ones."""
        uid = pod.metadata.uid
        view = self.view(uid)
        sandbox = record.sandbox
        ip = sandbox.ip if sandbox else ""
        wanted: set[tuple[str, str, str]] = set()
        for spec in pod.spec.containers:
            c = record.latest(spec.name, init=False)
            if c is None or c.state is not ContainerState.RUNNING:
                continue
            for kind in KINDS:
                probe = getattr(spec, f"{kind}_probe")
                if not spec.HasField(f"{kind}_probe"):
                    continue
                k = (uid, spec.name, kind)
                wanted.add(k)
                current = self._loops.get(k)
                if current is not None and current[0] == c.id:
                    continue
                if current is not None:
                    current[1].cancel()
                self._reset(view, spec.name, kind)
                loop = ProbeLoop(kind=kind, probe=probe, container=spec, record=c, pod_ip=ip,
                                 view=view, exec_fn=self.exec_fn,
                                 on_change=self._notifier(uid),
                                 on_failure=self._failure_notifier(uid, spec.name))
                self.last[k] = loop
                self._loops[k] = (c.id, asyncio.create_task(loop.run(),
                                                            name=f"probe-{kind}-{spec.name}"))
        for k in [k for k in self._loops if k[0] == uid and k not in wanted]:
            self._loops.pop(k)[1].cancel()
            self._reset(view, k[1], k[2])

    def _notifier(self, uid: str) -> Callable[[], None]:
        return lambda: self.on_change(uid)

    def _failure_notifier(self, uid: str, name: str) -> Callable[[str], None] | None:
        report = self.on_failure
        if report is None:
            return None
        return lambda message: report(uid, name, message)

    @staticmethod
    def _reset(view: ProbeView, name: str, kind: str) -> None:
        {"liveness": view.live, "readiness": view.ready, "startup": view.started}[kind].pop(
            name, None)

    def forget(self, uid: str) -> None:
        for k in [k for k in self._loops if k[0] == uid]:
            self._loops.pop(k)[1].cancel()
        self.views.pop(uid, None)

    def close(self) -> None:
        for _, task in self._loops.values():
            task.cancel()
        self._loops.clear()
