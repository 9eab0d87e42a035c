"""``shoal port-forward TARGET [LOCAL:]REMOTE ...``: local TCP ports to a pod's ports.

    local client --TCP--> listener (--address, default localhost)
        --one PodProxy.PortForward stream per connection--> apiserver
        --> the pod's node agent --> CRI PortForward (dials the port inside
        the pod's network namespace)

TARGET is ``POD``, ``pod/NAME``, or a workload or Service (``deploy/NAME``,
``rs/NAME``, ``sts/NAME``, ``svc/NAME``): a ready pod is picked from its
selector. For a Service, REMOTE is the Service's port, mapped to its
targetPort (a number, or a container port's name) as kubectl does.

Reconnecting: each new local connection asks the :class:`PodPicker` for the
pod, which keeps the last one while it still exists, is not being deleted and
is ready, and otherwise picks again. So when the pod is replaced (deleted and
recreated by its ReplicaSet), the next connections go to the new pod without
restarting the command. A bare pod name keeps its name (a StatefulSet's pod
comes back under it); while it is gone, each connection fails on its own with
the reason, and the listeners stay up. Connections open at the time of the
replacement end with the old pod.

One stream per connection (not one multiplexed stream) keeps each
connection's flow control and failure to itself, and lets the apiserver
authorize each one (create pods/portforward) against the pod it reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal import errors, selectors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.node.v1 import node_pb2
from shoal.cli.session import Session

_WORKLOADS: dict[str, Any] = {
    "deploy": apps_pb2.Deployment, "deployment": apps_pb2.Deployment,
    "deployments": apps_pb2.Deployment, "rs": apps_pb2.ReplicaSet,
    "replicaset": apps_pb2.ReplicaSet, "replicasets": apps_pb2.ReplicaSet,
    "sts": apps_pb2.StatefulSet, "statefulset": apps_pb2.StatefulSet,
    "statefulsets": apps_pb2.StatefulSet, "ds": apps_pb2.DaemonSet,
    "daemonset": apps_pb2.DaemonSet, "daemonsets": apps_pb2.DaemonSet,
    "svc": core_pb2.Service, "service": core_pb2.Service, "services": core_pb2.Service,
}
_POD_WORDS = ("po", "pod", "pods")


@dataclass(frozen=True)
class Target:
    """What to forward to: a pod by name, or a kind/name whose selector picks one."""

    kind: str  # "pod", or a key of _WORKLOADS
    name: str


@dataclass(frozen=True)
class PortPair:
    local: int  # 0: pick a free port
    remote: int


def parse_target(text: str) -> Target:
    kind, slash, name = text.partition("/")
    if not slash:
        kind, name = "pod", text
    if not name:
        raise errors.BadRequest(f"{text!r}: name the pod or object, e.g. pod/web-0 or "
                                "deploy/web")
    kind = kind.lower()
    if kind in _POD_WORDS:
        return Target("pod", name)
    if kind not in _WORKLOADS:
        raise errors.BadRequest(f"cannot port-forward to {kind}: use a pod, a workload "
                                "(deploy, rs, sts, ds) or a service (svc)")
    return Target(kind, name)


def parse_ports(specs: list[str]) -> list[PortPair]:
    """kubectl's forms: ``8080`` (same port locally), ``8080:80``, ``:80`` (any
    free local port)."""
    if not specs:
        raise errors.BadRequest("at least one port is needed, e.g. 8080:80")
    pairs = []
    for spec in specs:
        local_text, colon, remote_text = spec.rpartition(":")
        if not colon:
            local_text = remote_text
        try:
            remote = int(remote_text)
            local = int(local_text) if local_text else 0
        except ValueError:
            raise errors.BadRequest(f"invalid port {spec!r}: use [LOCAL:]REMOTE, "
                                    "e.g. 8080:80") from None
        if not 0 < remote < 65536 or not 0 <= local < 65536:
            raise errors.BadRequest(f"invalid port {spec!r}: ports are 1-65535")
        pairs.append(PortPair(local, remote))
    return pairs


def listen_addresses(addresses: list[str]) -> list[str]:
    """--address values (comma-separated allowed): ``localhost`` is 127.0.0.1
    and ::1, as kubectl's default."""
    out: list[str] = []
    for item in addresses or ["localhost"]:
        for a in item.split(","):
            a = a.strip()
            for resolved in (["127.0.0.1", "::1"] if a == "localhost" else [a]):
                if resolved and resolved not in out:
                    out.append(resolved)
    return out


def service_target_port(svc: core_pb2.Service, port: int) -> int | str:
    """The targetPort behind a Service port: a number, or a container port's name."""
    for p in svc.spec.ports:
        if p.port == port:
            which = p.target_port.WhichOneof("value") if p.HasField("target_port") else None
            if which == "str_val" and p.target_port.str_val:
                return p.target_port.str_val
            if which == "int_val" and p.target_port.int_val:
                return int(p.target_port.int_val)
            return port
    raise errors.BadRequest(f'service "{svc.metadata.name}" does not have a service port '
                            f"{port}")


def named_port(pod: core_pb2.Pod, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for c in pod.spec.containers:
        for p in c.ports:
            if p.name == port:
                return int(p.container_port)
    raise errors.BadRequest(f'pod "{pod.metadata.name}" has no container port named {port}')


def is_ready(pod: core_pb2.Pod) -> bool:
    return (pod.status.phase == "Running" and not pod.metadata.HasField("deletion_timestamp")
            and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions))


def choose(pods: list[core_pb2.Pod]) -> core_pb2.Pod | None:
    """The pod to use: a ready one, the newest first (a replacement is the one
    that will stay); None when none is ready."""
    ready = [p for p in pods if is_ready(p)]
    ready.sort(key=lambda p: (p.metadata.creation_timestamp.seconds, p.metadata.name),
               reverse=True)
    return ready[0] if ready else None


class PodPicker:
    """Which pod a new connection goes to; keeps the current one while it is usable."""

    def __init__(self, session: Session, target: Target) -> None:
        self.session = session
        self.target = target
        self.current: core_pb2.Pod | None = None
        self._lock = asyncio.Lock()

    async def pod(self) -> core_pb2.Pod:
        async with self._lock:
            client = self.session.client()
            ns = self.session.namespace
            if self.current is not None:
                try:
                    now = await client.get(core_pb2.Pod, self.current.metadata.name,
                                           namespace=ns)
                except errors.NotFound:
                    now = None
                if now is not None and now.metadata.uid == self.current.metadata.uid \
                        and is_ready(now):
                    return now
                self.current = None
            if self.target.kind == "pod":
                pod = await client.get(core_pb2.Pod, self.target.name, namespace=ns)
                if pod.status.phase != "Running":
                    raise errors.BadRequest(f'pod "{pod.metadata.name}" is not running '
                                            f"(phase {pod.status.phase or 'Pending'})")
                self.current = pod
                return pod
            obj = await client.get(_WORKLOADS[self.target.kind], self.target.name,
                                   namespace=ns)
            if isinstance(obj, core_pb2.Service):
                sel = ",".join(f"{k}={v}" for k, v in sorted(obj.spec.selector.items()))
                if not sel:
                    raise errors.BadRequest(f'service "{self.target.name}" has no selector')
            else:
                sel = str(selectors.from_proto(obj.spec.selector))
            pods = await client.list(core_pb2.Pod, namespace=ns, label_selector=sel)
            chosen = choose(list(pods.items))
            if chosen is None:
                raise errors.NotFound(f"no ready pod for {self.target.kind}/{self.target.name}")
            self.current = chosen
            return chosen

    async def remote_port(self, pod: core_pb2.Pod, port: int) -> int:
        if self.target.kind not in ("svc", "service", "services"):
            return port
        svc = await self.session.client().get(core_pb2.Service, self.target.name,
                                              namespace=self.session.namespace)
        return named_port(pod, service_target_port(svc, port))


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               open_stream: Callable[[], Awaitable[Any]]) -> None:
    """One local connection through one PortForward stream, both ways."""
    stream = await open_stream()

    async def upstream() -> None:
        while data := await reader.read(65536):
            await stream.write(node_pb2.PortForwardInput(data=data))
        await stream.done_writing()

    up = asyncio.create_task(upstream())
    try:
        while (message := await stream.read()) is not None:
            writer.write(message.data)
            await writer.drain()
    finally:
        up.cancel()
        stream.cancel()
        with contextlib.suppress(Exception):
            writer.close()
            await writer.wait_closed()


async def run_port_forward(session: Session, *, target: str, ports: list[str],
                           addresses: list[str]) -> int:
    parsed = parse_target(target)
    pairs = parse_ports(ports)
    picker = PodPicker(session, parsed)
    first = await picker.pod()  # fail early, as kubectl does, on a bad target
    for pair in pairs:
        await picker.remote_port(first, pair.remote)
    servers: list[asyncio.Server] = []

    def handler(pair: PortPair, local: list[int]) -> Callable[..., Awaitable[None]]:
        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> None:
            session.print(f"Handling connection for {local[0]}")
            session.out.flush()
            try:
                pod = await picker.pod()
                remote = await picker.remote_port(pod, pair.remote)

                async def open_stream() -> Any:
                    stream = session.client().port_forward(node_pb2.PortForwardStart(
                        namespace=session.namespace, pod=pod.metadata.name, port=remote))
                    await stream.open()
                    return stream

                await pipe(reader, writer, open_stream)
            except (errors.ShoalError, OSError) as e:
                session.warn(f"error forwarding port {pair.remote}: "
                             f"{getattr(e, 'message', e)}")
                writer.close()
        return connected

    try:
        for pair in pairs:
            local = [pair.local]
            for address in listen_addresses(addresses):
                try:
                    server = await asyncio.start_server(handler(pair, local), address,
                                                        local[0])
                except OSError as e:
                    if address == "::1":
                        continue  # no IPv6 loopback here
                    raise errors.BadRequest(f"unable to listen on {address}:{local[0]}: "
                                            f"{e.strerror or e}") from e
                local[0] = server.sockets[0].getsockname()[1]
                servers.append(server)
                shown = f"[{address}]" if ":" in address else address
                session.print(f"Forwarding from {shown}:{local[0]} -> {pair.remote}")
        session.out.flush()
        await asyncio.gather(*(s.serve_forever() for s in servers))
    finally:
        for s in servers:
            s.close()
    return 0
