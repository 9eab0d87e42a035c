"""The meshagent's admin API (gRPC with TLS, port 15000): what the agent has
applied and what it sees, for ``shoal mesh status|certs|tls|netfilter`` and
``shoal apply --wait-propagated``.

    user --> apiserver MeshProxy --mTLS (kubelet client)--> AdminServer.Status
                 |                                              |
                 | asks every node's agent                      v
                 | (InternalIP:15000)             AdminSource (the agent):
                 |                                  generations()       always
                 |                                  certificate_rows()  always
                 |                                  captured_ips()      always
                 |                                  netfilter_report()  when asked
                 |                                  connections()       when asked, filtered

Served with the node's serving certificate (from join); who may call is
:mod:`shoal.nodeaccess` (the apiserver's kubelet client or system:masters).

Contract for an ``AdminSource``: every method reports state the agent already
holds (``netfilter_report`` may read the nat table); none changes anything, so
Status is safe to call at any rate. A failing netfilter report is answered as
a report carrying the error, not as a failed call.

Lifecycle: ``start()`` binds the port (a taken port fails there) and serves;
``close()`` stops serving, letting calls in flight finish for a grace period.
Everything above ``AdminServer`` is pure.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from meshagent import capture
from meshagent.identity import CertRow
from shoal import errors, nodeaccess
from shoal.api.mesh.v1 import mesh_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "shoal.mesh.v1.MeshAgent"
ADMIN_PORT = 15000
DEFAULT_PKI_DIR = Path("/var/lib/shoal/nodeagent/pki")
DIRECTIONS = ("outbound", "inbound")
MODES = ("mTLS", "plaintext", "local")


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Generations:
    """How far the agent's config is applied.

    ``overall``: the lowest resourceVersion up to which every config informer
    has applied its events; ``per_resource``: the same per informer, keyed by
    qualified resource ("pods", "services", "peerauthentications.security.istio.io");
    ``applied_at``: unix time of the last change applied (0: none yet)."""

    overall: int
    per_resource: Mapping[str, int] = field(default_factory=dict)
    applied_at: float = 0.0


def generations_from(versions: Mapping[str, str], *, applied_at: float = 0.0) -> Generations:
    """Generations from informers' resourceVersions (``""``, not listed yet, is 0)."""
    per = {name: int(rv) if rv.isdigit() else 0 for name, rv in versions.items()}
    return Generations(overall=min(per.values(), default=0), per_resource=per,
                       applied_at=applied_at)


@dataclass(frozen=True)
class NetfilterReport:
    """The capture rules: as the agent wants them, as the kernel holds them, and
    each difference. ``backend`` is "" (and ``error`` says why) when there is none."""

    backend: str
    wanted: tuple[str, ...] = ()
    current: tuple[str, ...] = ()
    drift: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class ConnectionRow:
    """One connection the agent carries now, as it saw it."""

    direction: str  # "outbound" | "inbound"
    source_ip: str
    destination: str  # what the client dialled: "10.96.0.10:80"
    mode: str  # "mTLS" | "plaintext" | "local"
    source_workload: str = ""
    source_namespace: str = ""
    source_principal: str = ""  # SPIFFE ID; "" outside the mesh
    destination_service: str = ""  # "namespace/name"
    endpoint: str = ""  # the pod chosen: "10.244.2.7:80"
    destination_workload: str = ""
    destination_namespace: str = ""
    peer_principal: str = ""  # the SPIFFE ID verified on the other side
    tls_version: str = ""  # "TLSv1.3"
    cipher: str = ""
    bytes_sent: int = 0
    bytes_received: int = 0
    opened_at: float = 0.0  # unix seconds


class AdminSource(Protocol):
    """What the admin API reads from the agent (see the module's contract)."""

    def generations(self) -> Generations: ...

    def certificate_rows(self) -> Sequence[CertRow]: ...

    def captured_ips(self) -> Sequence[str]: ...

    async def netfilter_report(self) -> NetfilterReport: ...

    def connections(self) -> Sequence[ConnectionRow]: ...


# --------------------------------------------------------------------------- netfilter


def _position(n: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(n, f"rule {n}")


def drift_lines(*, want: Sequence[str], save: str) -> tuple[str, ...]:
    """Each way ``iptables-save -t nat`` output differs from the wanted chain
    rules and the jump first in PREROUTING, one line each (pure)."""
    out: list[str] = []
    if f":{capture.CHAIN}" not in capture.our_lines(save):
        out.append(f"chain {capture.CHAIN} is missing from the nat table")
    targets = capture.hook_targets(save)
    jumps = [i for i, t in enumerate(targets) if t == capture.CHAIN]
    if not jumps:
        out.append(f"{capture.HOOK} has no jump to {capture.CHAIN}")
    else:
        if len(jumps) > 1:
            out.append(f"{capture.HOOK} jumps to {capture.CHAIN} {len(jumps)} times")
        if jumps[0] != 0:
            before = ", ".join(t or "(no target)" for t in targets[:jumps[0]])
            out.append(f"the jump to {capture.CHAIN} is the {_position(jumps[0] + 1)} rule of "
                       f"{capture.HOOK}, not the first (before it: {before})")
    have = capture.chain_rules(save)
    missing = [r for r in want if r not in have]
    extra = [r for r in have if r not in want]
    out += [f"missing: {r}" for r in missing]
    out += [f"unexpected: {r}" for r in extra]
    if not missing and not extra and tuple(want) != have:
        out.append(f"the rules of {capture.CHAIN} are out of order")
    return tuple(out)


def netfilter_report(*, backend: str, want: Sequence[str], save: str) -> NetfilterReport:
    """The report for wanted chain rules ``want`` (``capture.plan_rules``) and the
    nat table as ``iptables-save`` printed it (pure)."""
    wanted = (f":{capture.CHAIN}", f"-A {capture.HOOK} -j {capture.CHAIN}", *want)
    return NetfilterReport(backend=backend, wanted=wanted,
                           current=tuple(capture.our_lines(save)),
                           drift=drift_lines(want=want, save=save))


# --------------------------------------------------------------------------- filtering


def _host(address: str) -> str:
    """'10.0.0.1:80' -> '10.0.0.1'; '[fd00::1]:80' -> 'fd00::1'; a bare IP as is."""
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        host = address.rpartition(":")[0] if ":" in address else address
        return host.strip("[]")


@dataclass(frozen=True)
class ConnectionFilter:
    """Which connections a Status request asks for; empty fields match all."""

    source_ip: str = ""
    destination_service: str = ""
    destination_ips: frozenset[str] = frozenset()
    direction: str = ""

    @classmethod
    def of(cls, request: pb.StatusRequest) -> ConnectionFilter:
        if request.direction and request.direction not in DIRECTIONS:
            raise errors.BadRequest(f'direction must be one of {", ".join(DIRECTIONS)}, '
                                    f'not "{request.direction}"')
        return cls(source_ip=request.source_ip,
                   destination_service=request.destination_service,
                   destination_ips=frozenset(request.destination_ips),
                   direction=request.direction)

    def matches(self, row: ConnectionRow) -> bool:
        if self.direction and row.direction != self.direction:
            return False
        if self.source_ip and row.source_ip != self.source_ip:
            return False
        if not self.destination_service and not self.destination_ips:
            return True
        if self.destination_service and row.destination_service == self.destination_service:
            return True
        hosts = {_host(row.destination), _host(row.endpoint)} - {""}
        return bool(hosts & self.destination_ips)


# --------------------------------------------------------------------------- messages


def _timestamp(message: Any, when: float) -> None:
    if when > 0:
        message.FromNanoseconds(int(when * 1e9))


def connection_message(row: ConnectionRow) -> pb.Connection:
    msg = pb.Connection(
        direction=row.direction, source_ip=row.source_ip,
        source_workload=row.source_workload, source_namespace=row.source_namespace,
        source_principal=row.source_principal, destination=row.destination,
        destination_service=row.destination_service, endpoint=row.endpoint,
        destination_workload=row.destination_workload,
        destination_namespace=row.destination_namespace, peer_principal=row.peer_principal,
        tls_version=row.tls_version, cipher=row.cipher, mode=row.mode,
        bytes_sent=row.bytes_sent, bytes_received=row.bytes_received)
    _timestamp(msg.opened_time, row.opened_at)
    return msg


def netfilter_message(report: NetfilterReport) -> pb.NetfilterReport:
    return pb.NetfilterReport(backend=report.backend, wanted=report.wanted,
                              current=report.current, drift=report.drift, error=report.error)


async def agent_status(*, node: str, source: AdminSource,
                       request: pb.StatusRequest) -> pb.AgentStatus:
    """The answer to one Status request."""
    wanted = ConnectionFilter.of(request)
    gens = source.generations()
    status = pb.AgentStatus(node=node, generation=gens.overall,
                            generations=dict(gens.per_resource),
                            captured_pods=len(source.captured_ips()))
    _timestamp(status.applied_time, gens.applied_at)
    status.certificates.extend(
        pb.Certificate(spiffe_id=c.spiffe_id, serial=c.serial, not_after=c.not_after,
                       renew_at=c.renew_at, state=c.state) for c in source.certificate_rows())
    if request.include_netfilter:
        try:
            report = await source.netfilter_report()
        except (errors.ShoalError, OSError) as e:
            report = NetfilterReport(backend="", error=f"reading the nat table failed: {e}")
        status.netfilter.CopyFrom(netfilter_message(report))
    if request.include_connections:
        status.connections.extend(connection_message(r) for r in source.connections()
                                  if wanted.matches(r))
    return status


# --------------------------------------------------------------------------- server


class AdminServer:
    """Serves ``shoal.mesh.v1.MeshAgent`` for one agent.

    ``pki_dir`` holds the node's ``serving.crt``/``serving.key`` and the cluster
    ``ca.crt`` (the nodeagent's, from join); ``listen`` is host:port (port 0
    picks one; see ``port`` after ``start()``)."""

    def __init__(self, *, source: AdminSource, node_name: str,
                 pki_dir: Path = DEFAULT_PKI_DIR,
                 listen: str = f"0.0.0.0:{ADMIN_PORT}") -> None:
        self.source = source
        self.node_name = node_name
        self.pki_dir = pki_dir
        self.listen = listen
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Status": grpc.unary_unary_rpc_method_handler(
                self.status, request_deserializer=pb.StatusRequest.FromString,
                response_serializer=lambda m: m.SerializeToString()),
        })

    async def status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.AgentStatus:
        try:
            nodeaccess.authorize(context)
            return await agent_status(node=self.node_name, source=self.source,
                                      request=request)
        except errors.ShoalError as e:
            await nodeaccess.abort(context, e)
            raise  # pragma: no cover - abort raises

    async def start(self) -> None:
        """Bind and serve. Raises Unavailable when the port cannot be had, and
        OSError when the certificates cannot be read."""
        creds = nodeaccess.server_credentials(self.pki_dir)
        # No SO_REUSEPORT: a second agent on the port must fail, not share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((self.handler(),))
        try:
            self.port = server.add_secure_port(self.listen, creds)
        except RuntimeError as e:
            await server.stop(None)
            raise errors.Unavailable(f"cannot listen on {self.listen}: {e}") from None
        if not self.port:
            await server.stop(None)
            raise errors.Unavailable(f"cannot listen on {self.listen}")
        await server.start()
        self._server = server
        log.info("mesh admin API on %s (port %d)", self.listen, self.port)

    async def close(self, grace: float = 1.0) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)
