"""``shoal mesh status|certs|tls|check|netfilter`` and ``shoal apply --wait-propagated``:
what each node's meshagent has applied and what it sees, asked through the
apiserver (``MeshProxy``) from every agent's admin API.

    mesh status              per node: generation applied, cluster revision, lag
                             (SYNCED / STALE / UNREACHABLE: why), certificates,
                             captured pods, when the agent last applied a change
    mesh certs [NODE]        the workload certificates each agent holds
    mesh tls SRC-POD DST-SVC the live connections from that pod to that Service,
                             from the source pod's agent, and the destination
                             side's view from the agents of the Service's endpoints
    mesh check [-n NS | -A]  config that will not do what it says, like istioctl
                             analyze (shoal/cli/meshcheck.py; reads the API only)
    mesh explain SRC-POD DST-HOST[:PORT]  what the mesh would do with one request,
                             by the agent's own code (shoal/cli/meshexplain.py; reads
                             the API only)
    mesh netfilter NODE      the capture rules the agent keeps, as the kernel
                             holds them, and each difference
    apply --wait-propagated  after the writes, until every agent reports a
                             generation at or above what the apply wrote

They report what the agents saw, never what the config says should happen:
``mesh tls`` without a live connection says so and exits 1. An agent that
cannot be reached is a row (status) or a line on stderr and exit code 1
(certs, netfilter, tls). ``-o json|yaml`` prints the agents' answers.

Deciding is pure (``lag_text``, ``propagation``, the table builders); the
``run_*`` executors at the end do the calls.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf import json_format

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.mesh.v1 import mesh_pb2 as pb
from shoal.cli.meshcheck import FOUND_ISSUES, run_mesh_check
from shoal.cli.printing import NONE, Table, age, render_table
from shoal.cli.reporting import CLIError, ExitCode, UsageError
from shoal.cli.session import Session
from shoal.client import AsyncClient
from shoal.manifests import dump_json, dump_yaml

Output = Literal["", "json", "yaml"]
OUTPUTS = ("json", "yaml")
DEFAULT_PROPAGATION_TIMEOUT = 60.0
POLL_INTERVAL = 0.25


class MeshCommandFailed(CLIError):
    """An agent could not be asked, or saw nothing to report."""

    exit_code = ExitCode.SERVER_REFUSED


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    """Add ``mesh`` and its commands to the ``shoal`` parser."""
    p = sub.add_parser("mesh", parents=[common], help="what the meshagents applied and see",
                       description="Ask every node's meshagent (through the apiserver) what "
                                   "config it has applied, its certificates, its capture "
                                   "rules and its live connections.")
    cmds = p.add_subparsers(dest="mesh_command", metavar="COMMAND", required=True)
    s = cmds.add_parser("status", parents=[common], help="applied generation and lag per node")
    s.add_argument("-o", "--output", choices=OUTPUTS, default="")
    c = cmds.add_parser("certs", parents=[common],
                        help="workload certificates each agent holds")
    c.add_argument("node", nargs="?", default="", metavar="NODE")
    c.add_argument("-o", "--output", choices=OUTPUTS, default="")
    t = cmds.add_parser("tls", parents=[common],
                        help="live connections from a pod to a Service, as the agents saw them")
    t.add_argument("pod", metavar="SRC-POD")
    t.add_argument("service", metavar="DST-SVC", help="NAME (in -n) or NAMESPACE/NAME")
    t.add_argument("-o", "--output", choices=OUTPUTS, default="")
    k = cmds.add_parser("check", parents=[common],
                        help="config that will not do what it says (like istioctl analyze)",
                        description="Warn about Service ports whose protocol nothing declares, "
                                    "VirtualService routes to unknown hosts or subsets, and "
                                    "DestinationRule subsets that select no pod. Exit code 0 "
                                    f"when nothing is found, {FOUND_ISSUES} when anything is.")
    k.add_argument("-A", "--all-namespaces", action="store_true")
    k.add_argument("-o", "--output", choices=OUTPUTS, default="")
    x = cmds.add_parser("explain", parents=[common],
                        help="what the mesh would do with one request (route, subset, "
                             "endpoints, policy, timeout, retries)",
                        description="Work out, with the meshagent's own routing, "
                                    "DestinationRule and policy code, what happens to a request "
                                    "from SRC-POD (in -n) to DST-HOST[:PORT]. Reads the API "
                                    "only (shoal/cli/meshexplain.py).")
    x.add_argument("pod", metavar="SRC-POD")
    x.add_argument("target", metavar="DST-HOST[:PORT]",
                   help="NAME, NAME.NS, NAME.NS.svc[.cluster.local], with an optional :PORT")
    x.add_argument("--path", default="/", help="the request path, with a query (default /)")
    x.add_argument("--method", default="GET")
    x.add_argument("--header", action="append", default=[], metavar="K=V",
                   help="a request header (repeatable)")
    x.add_argument("-o", "--output", choices=OUTPUTS, default="")
    n = cmds.add_parser("netfilter", parents=[common],
                        help="a node's capture rules and their drift")
    n.add_argument("node", metavar="NODE")
    n.add_argument("-o", "--output", choices=OUTPUTS, default="")


async def run_mesh(session: Session, ns: argparse.Namespace) -> int:
    match ns.mesh_command:
        case "status":
            return await run_mesh_status(session, output=ns.output)
        case "certs":
            return await run_mesh_certs(session, node=ns.node, output=ns.output)
        case "tls":
            return await run_mesh_tls(session, pod=ns.pod, service=ns.service,
                                      output=ns.output)
        case "netfilter":
            return await run_mesh_netfilter(session, node=ns.node, output=ns.output)
        case "check":
            return await run_mesh_check(session, all_namespaces=ns.all_namespaces,
                                        output=ns.output)
        case "explain":  # imported here: it loads the meshagent's code
            from shoal.cli.meshexplain import run_mesh_explain
            return await run_mesh_explain(session, pod=ns.pod, target=ns.target,
                                          method=ns.method, path=ns.path, headers=ns.header,
                                          output=ns.output)
    raise CLIError(f"unknown mesh command {ns.mesh_command!r}")  # pragma: no cover


# --------------------------------------------------------------------------- pure


def document(message: Any) -> Any:
    return json_format.MessageToDict(message)


def dump(doc: Any, output: Output) -> str:
    return dump_json(doc) + "\n" if output == "json" else dump_yaml(doc)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def short_error(text: str) -> str:
    """The last clause of a relayed error ("...: Connection refused" -> "Connection
    refused"), for a table cell; the whole text goes to stderr."""
    return text.rsplit(": ", 1)[-1].strip() or text


def lag_text(entry: pb.NodeMeshStatus) -> str:
    """SYNCED, STALE (how far behind) or UNREACHABLE: why (in short)."""
    if entry.error:
        return f"UNREACHABLE: {short_error(entry.error)}"
    gen = entry.status.generation
    if entry.pending_changes > 0:
        return f"STALE ({_plural(entry.pending_changes, 'change')} not applied)"
    if entry.pending_changes == 0 or gen >= entry.required_generation:
        return "SYNCED"
    return f"STALE ({_plural(entry.required_generation - gen, 'revision')} behind)"


def certs_cell(status: pb.AgentStatus) -> str:
    total = len(status.certificates)
    bad = sum(1 for c in status.certificates if c.state != "VALID")
    return f"{total} ({bad} not valid)" if bad else str(total)


def status_table(resp: pb.MeshStatusResponse, *, now: float) -> Table:
    rows = []
    for e in resp.nodes:
        if e.error:
            rows.append((e.node, NONE, str(resp.cluster_revision), lag_text(e), NONE, NONE,
                         NONE))
            continue
        s = e.status
        rows.append((e.node, str(s.generation), str(resp.cluster_revision), lag_text(e),
                     certs_cell(s), str(s.captured_pods), age(s.applied_time, now)))
    return Table(headers=("NODE", "GENERATION", "CLUSTER REVISION", "LAG", "CERTS",
                          "CAPTURED PODS", "APPLIED"), rows=tuple(rows))


def certs_table(resp: pb.MeshStatusResponse) -> Table:
    rows = []
    for e in resp.nodes:
        if e.error:
            continue
        for c in e.status.certificates:
            rows.append((e.node, c.spiffe_id, c.serial or NONE, c.not_after or NONE,
                         c.renew_at or NONE, c.state))
    return Table(headers=("NODE", "SPIFFE ID", "SERIAL", "NOT AFTER", "RENEW AT", "STATE"),
                 rows=tuple(rows))


def netfilter_text(node: str, report: pb.NetfilterReport) -> str:
    if not report.backend:
        why = report.error or "the agent captures nothing"
        return f"Node:     {node}\nCapture:  none ({why})\n"
    lines = [f"Node:     {node}", f"Backend:  {report.backend}",
             "Wanted (nat table):", *(f"  {r}" for r in report.wanted),
             "Current (nat table):", *(f"  {r}" for r in report.current or ["<none>"])]
    if report.drift:
        lines += ["Drift:", *(f"  {d}" for d in report.drift)]
    else:
        lines.append("Drift:    none")
    return "\n".join(lines) + "\n"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class SeenConnection:
    side: str  # "source" | "destination"
    node: str
    connection: pb.Connection


def tls_table(seen: Sequence[SeenConnection], *, now: float) -> Table:
    rows = []
    for s in seen:
        c = s.connection
        dest = c.destination + (f" ({c.destination_service})" if c.destination_service else "")
        rows.append((s.side, s.node, c.direction, c.source_ip, dest, c.endpoint or NONE,
                     c.mode, c.tls_version or NONE, c.cipher or NONE,
                     c.source_principal or NONE, c.peer_principal or NONE,
                     f"{_bytes(c.bytes_sent)}/{_bytes(c.bytes_received)}",
                     age(c.opened_time, now)))
    return Table(headers=("SIDE", "NODE", "DIRECTION", "SOURCE", "DESTINATION", "ENDPOINT",
                          "MODE", "TLS", "CIPHER", "SOURCE PRINCIPAL", "PEER PRINCIPAL",
                          "SENT/RECEIVED", "AGE"), rows=tuple(rows))


@dataclass(frozen=True)
class Propagation:
    confirmed: tuple[tuple[str, int], ...] = ()  # (node, generation)
    lagging: Mapping[str, str] = field(default_factory=dict)  # node -> why

    @property
    def done(self) -> bool:
        return not self.lagging


def propagation(resp: pb.MeshStatusResponse, written: Mapping[str, int]) -> Propagation:
    """Which agents have applied every write (``written``: qualified resource ->
    the highest resourceVersion the apply wrote of it). An agent's generation
    for that resource counts when it reports one, else its overall generation."""
    confirmed: list[tuple[str, int]] = []
    lagging: dict[str, str] = {}
    for e in resp.nodes:
        if e.error:
            lagging[e.node] = f"UNREACHABLE: {e.error}"
            continue
        s = e.status
        gens = {r: s.generations.get(r, s.generation) for r in sorted(written)}
        behind = [f"{r} at {gen}, wrote {written[r]}" for r, gen in gens.items()
                  if gen < written[r]]
        if behind:
            lagging[e.node] = "; ".join(behind)
        else:
            confirmed.append((e.node, min(gens.values(), default=s.generation)))
    return Propagation(confirmed=tuple(confirmed), lagging=lagging)


def split_service(text: str, namespace: str) -> tuple[str, str]:
    """'web' -> (namespace, 'web'); 'demo/web' -> ('demo', 'web')."""
    ns, _, name = text.rpartition("/")
    if not name or "/" in ns:
        raise UsageError(f'"{text}" is not a Service: use NAME or NAMESPACE/NAME')
    return ns or namespace, name


def endpoint_nodes(endpoints: core_pb2.Endpoints | None) -> dict[str, list[str]]:
    """node -> IPs of the Service's endpoints on it (ready or not)."""
    out: dict[str, list[str]] = {}
    if endpoints is None:
        return out
    for subset in endpoints.subsets:
        for a in [*subset.addresses, *subset.not_ready_addresses]:
            if a.node_name and a.ip not in out.get(a.node_name, []):
                out.setdefault(a.node_name, []).append(a.ip)
    return out


# --------------------------------------------------------------------------- executors


def _warn_unreachable(session: Session, entries: Iterable[pb.NodeMeshStatus]) -> bool:
    any_bad = False
    for e in entries:
        if e.error:
            session.warn(f"error: node {e.node}: cannot ask its meshagent: {e.error}")
            any_bad = True
    return any_bad


async def run_mesh_status(session: Session, *, output: Output) -> int:
    resp = await session.client().mesh_status()
    if output:
        session.out.write(dump(document(resp), output))
        return ExitCode.OK
    if not resp.nodes:
        session.warn("No nodes found.")
        return ExitCode.OK
    session.out.write(render_table(status_table(resp, now=session.clock())))
    for e in resp.nodes:
        if e.error:
            session.warn(f"node {e.node}: {e.error}")
    return ExitCode.OK


async def run_mesh_certs(session: Session, *, node: str, output: Output) -> int:
    resp = await session.client().mesh_status(node=node)
    bad = _warn_unreachable(session, resp.nodes)
    if output:
        session.out.write(dump({"nodes": [
            {"node": e.node, "error": e.error} if e.error else
            {"node": e.node, "certificates": [document(c) for c in e.status.certificates]}
            for e in resp.nodes]}, output))
    else:
        table = certs_table(resp)
        if table.rows:
            session.out.write(render_table(table))
        elif not bad:
            session.warn("No workload certificates: no meshagent holds one yet.")
    return ExitCode.SERVER_REFUSED if bad else ExitCode.OK


async def run_mesh_netfilter(session: Session, *, node: str, output: Output) -> int:
    resp = await session.client().mesh_status(
        node=node, query=pb.StatusRequest(include_netfilter=True))
    entry = resp.nodes[0]
    if entry.error:
        raise MeshCommandFailed(f"node {entry.node}: cannot ask its meshagent: {entry.error}")
    report = entry.status.netfilter
    if output:
        session.out.write(dump(document(report), output))
    else:
        session.out.write(netfilter_text(entry.node, report))
    if not report.backend and report.error:
        return ExitCode.SERVER_REFUSED
    return ExitCode.OK


async def _get_or_none(client: AsyncClient, kind: Any, name: str, namespace: str) -> Any:
    try:
        return await client.get(kind, name, namespace=namespace)
    except errors.NotFound:
        return None


async def run_mesh_tls(session: Session, *, pod: str, service: str, output: Output) -> int:
    svc_ns, svc_name = split_service(service, "")  # bad input fails before any call
    client = session.client()
    namespace = session.namespace
    svc_ns = svc_ns or namespace
    src: core_pb2.Pod = await client.get(core_pb2.Pod, pod, namespace=namespace)
    if not src.spec.node_name or not src.status.pod_ip:
        raise MeshCommandFailed(f'pod "{pod}" is not running on a node yet (no node or IP)')
    svc: core_pb2.Service = await client.get(core_pb2.Service, svc_name, namespace=svc_ns)
    eps = await _get_or_none(client, core_pb2.Endpoints, svc_name, svc_ns)
    by_node = endpoint_nodes(eps)
    endpoint_ips = sorted({ip for ips in by_node.values() for ip in ips})
    cluster_ips = list(dict.fromkeys(ip for ip in [svc.spec.cluster_ip, *svc.spec.cluster_ips]
                                     if ip and ip != "None"))
    source_ip = src.status.pod_ip
    outbound = pb.StatusRequest(include_connections=True, source_ip=source_ip,
                                destination_service=f"{svc_ns}/{svc_name}",
                                destination_ips=sorted({*cluster_ips, *endpoint_ips}),
                                direction="outbound")
    asks = [client.mesh_status(node=src.spec.node_name, query=outbound)]
    dest_nodes = sorted(by_node)
    for n in dest_nodes:
        asks.append(client.mesh_status(node=n, query=pb.StatusRequest(
            include_connections=True, source_ip=source_ip, destination_ips=by_node[n],
            direction="inbound")))
    answers = await asyncio.gather(*asks, return_exceptions=True)
    seen: list[SeenConnection] = []
    src_entry: pb.NodeMeshStatus | None = None
    for i, answer in enumerate(answers):
        side = "source" if i == 0 else "destination"
        node = src.spec.node_name if i == 0 else dest_nodes[i - 1]
        if isinstance(answer, errors.NotFound):
            answer = pb.MeshStatusResponse(nodes=[pb.NodeMeshStatus(
                node=node, error=f'node "{node}" not found')])
        if isinstance(answer, BaseException):
            raise answer
        entry = answer.nodes[0]
        if i == 0:
            src_entry = entry
        if entry.error:
            if i > 0:
                session.warn(f"warning: node {node} (destination side): cannot ask its "
                             f"meshagent: {entry.error}")
            continue
        seen += [SeenConnection(side, node, c) for c in entry.status.connections]
    assert src_entry is not None
    if src_entry.error:
        raise MeshCommandFailed(f"node {src_entry.node} (where {pod} runs): cannot ask its "
                                f"meshagent: {src_entry.error}")
    target = f"service {svc_ns}/{svc_name}" + (f" ({', '.join(cluster_ips)})"
                                                if cluster_ips else "")
    source = f"pod {namespace}/{pod} ({source_ip} on {src.spec.node_name})"
    if output:
        session.out.write(dump({"source": {"pod": f"{namespace}/{pod}", "ip": source_ip,
                                           "node": src.spec.node_name},
                                "service": f"{svc_ns}/{svc_name}",
                                "connections": [{"side": s.side, "node": s.node,
                                                 **document(s.connection)} for s in seen]},
                               output))
    if not any(s.side == "source" for s in seen):
        raise MeshCommandFailed(
            f"no live connection from {source} to {target}: the meshagent on "
            f"{src.spec.node_name} carries none now (this reports what the agents saw, "
            "so open one, e.g. a long-running request, and ask again)")
    if not output:
        session.print(f"Live connections from {source} to {target}:")
        session.out.write(render_table(tls_table(seen, now=session.clock())))
        if dest_nodes and not any(s.side == "destination" for s in seen):
            session.print("(the agents of the endpoints' nodes "
                          f"{', '.join(dest_nodes)} report no matching inbound connection)")
    return ExitCode.OK


async def wait_propagated(session: Session, written: Mapping[str, int], *,
                          timeout: float | None,
                          sleep: Callable[[float], Any] = asyncio.sleep) -> int:
    """Wait until every node's meshagent has applied ``written`` (qualified
    resource -> highest resourceVersion written); print who confirmed. Exit code
    1 on timeout (naming the lagging nodes) or when no agent answers at all."""
    if not written:
        return ExitCode.OK
    client = session.client()
    limit = DEFAULT_PROPAGATION_TIMEOUT if timeout is None else timeout
    deadline = session.clock() + limit
    first = True
    while True:
        left = deadline - session.clock()
        resp = await client.mesh_status(timeout=max(1.0, min(left, 30.0)))
        state = propagation(resp, written)
        if not resp.nodes:
            session.warn("warning: the cluster has no nodes, so no meshagent to wait for")
            return ExitCode.OK
        if first and not state.confirmed and all(e.error for e in resp.nodes):
            raise MeshCommandFailed(
                "no meshagent answers on any node, so the change cannot be confirmed: " +
                "; ".join(f"{e.node}: {e.error}" for e in resp.nodes))
        first = False
        if state.done:
            nodes = ", ".join(n for n, _ in state.confirmed)
            session.print(f"propagated to {_plural(len(state.confirmed), 'meshagent')}: "
                          f"{nodes}")
            return ExitCode.OK
        if session.clock() >= deadline:
            confirmed = ", ".join(n for n, _ in state.confirmed) or "none"
            session.warn(f"confirmed by: {confirmed}")
            raise MeshCommandFailed(
                f"timed out after {limit:g}s waiting for the meshagents to apply the "
                "change; lagging: " +
                "; ".join(f"{n} ({why})" for n, why in sorted(state.lagging.items())))
        await sleep(min(POLL_INTERVAL, max(0.0, deadline - session.clock())))
