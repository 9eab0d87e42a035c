"""``shoal dashboard``: a small local web server showing the cluster live.

    shoal dashboard [--address 127.0.0.1] [--port 8001] [--graph-interval 5]

Like ``kubectl proxy`` or ``istioctl dashboard``, it runs in the CLI with the
user's own credentials (the client config) and serves a page on loopback by
default. A random token made for this run is in the URL it prints; every page
and API request must carry it (``?token=`` or ``Authorization: Bearer``), so
another local user who can reach the port cannot act as this user. Static
assets (our HTML/JS/CSS and Debian's d3 from /usr/share/javascript) carry no
cluster data and are served without it.

    GET /?token=T            the page (shoal/cli/dashboard_static/)
    GET /api/state           nodes, pods, deployments (with their ReplicaSets:
                             the rollout view), services, events, as JSON
    GET /api/graph           the service graph (see shoal.cli.servicegraph)
    GET /api/config?ns=&workload=   the Services, VirtualServices,
                             DestinationRules and AuthorizationPolicies that
                             apply to a workload (a graph node or an edge's target)
    GET /api/stream          server-sent events: "state" whenever an informer
                             saw a change (at most twice a second), "graph"
                             after each scrape

The cluster is read through the SDK's informers (list + watch), so the page
changes as the cluster does, with no reload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from apiserver.controllers.autoscalingmetrics import (
    MESH_METRICS_PORT,
    Scrape,
    _http_get,
    rates_between,
    workload_name,
)
from apiserver.nodedialing import internal_ip
from shoal import manifests
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli import servicegraph
from shoal.cli.reporting import UsageError
from shoal.cli.session import Session
from shoal.client import AsyncClient
from shoal.informer import Informer

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "dashboard_static"
D3 = Path("/usr/share/javascript/d3/d3.min.js")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
WINDOW = 60.0  # seconds of scrapes a rate spans (Kiali's default is 1m)

KINDS: dict[str, type[Message]] = {
    "nodes": core_pb2.Node, "pods": core_pb2.Pod, "deployments": apps_pb2.Deployment,
    "replicasets": apps_pb2.ReplicaSet, "services": core_pb2.Service,
    "events": core_pb2.Event, "virtualservices": traffic_pb2.VirtualService,
    "destinationrules": traffic_pb2.DestinationRule,
    "authorizationpolicies": security_pb2.AuthorizationPolicy,
}


# -- views (pure) --------------------------------------------------------------------------


def _ts(ts: Any) -> str:
    return manifests.format_time(ts) if ts.seconds else ""


def node_view(n: core_pb2.Node) -> dict[str, Any]:
    ready = next((c.status for c in n.status.conditions if c.type == "Ready"), "Unknown")
    return {"name": n.metadata.name, "ready": ready == "True", "ip": internal_ip(n),
            "unschedulable": n.spec.unschedulable}


def pod_view(p: core_pb2.Pod) -> dict[str, Any]:
    cs = p.status.container_statuses
    return {"namespace": p.metadata.namespace, "name": p.metadata.name,
            "phase": "Terminating" if p.metadata.HasField("deletion_timestamp")
            else p.status.phase or "Pending",
            "ready": f"{sum(1 for c in cs if c.ready)}/{len(p.spec.containers)}",
            "restarts": sum(c.restart_count for c in cs), "node": p.spec.node_name,
            "ip": p.status.pod_ip, "workload": workload_name(p)}


def service_view(s: core_pb2.Service) -> dict[str, Any]:
    return {"namespace": s.metadata.namespace, "name": s.metadata.name,
            "type": s.spec.type or "ClusterIP", "clusterIP": s.spec.cluster_ip,
            "ports": [f"{p.name + ':' if p.name else ''}{p.port}/{p.protocol or 'TCP'}"
                      for p in s.spec.ports]}


def _owned_by(obj: Any, owner: Any) -> bool:
    return any(r.uid == owner.metadata.uid for r in obj.metadata.owner_references)


def deployment_view(d: apps_pb2.Deployment,
                    replicasets: Iterable[apps_pb2.ReplicaSet]) -> dict[str, Any]:
    """A Deployment with its ReplicaSets, newest revision first (the rollout view)."""
    rs = [{"name": r.metadata.name,
           "revision": r.metadata.annotations.get("deployment.kubernetes.io/revision", ""),
           "replicas": r.spec.replicas, "ready": r.status.ready_replicas,
           "available": r.status.available_replicas}
          for r in replicasets if _owned_by(r, d)]
    rs.sort(key=lambda r: -int(str(r["revision"] or 0)))
    st = d.status
    return {"namespace": d.metadata.namespace, "name": d.metadata.name,
            "replicas": d.spec.replicas, "updated": st.updated_replicas,
            "ready": st.ready_replicas, "available": st.available_replicas,
            "revision": d.metadata.annotations.get("deployment.kubernetes.io/revision", ""),
            "replicasets": rs}


def event_view(e: core_pb2.Event) -> dict[str, Any]:
    last = e.last_timestamp if e.last_timestamp.seconds else e.event_time
    o = e.involved_object
    return {"namespace": e.metadata.namespace, "type": e.type, "reason": e.reason,
            "object": f"{o.kind}/{o.name}", "message": e.message, "count": e.count or 1,
            "last": _ts(last), "_at": last.seconds}


def _key(v: Mapping[str, Any]) -> tuple[str, str]:
    return (str(v.get("namespace", "")), str(v["name"]))


def state_view(objs: Mapping[str, list[Any]], *, max_events: int = 200) -> dict[str, Any]:
    events = sorted((event_view(e) for e in objs["events"]), key=lambda v: -v["_at"])
    for v in events:
        del v["_at"]
    return {
        "nodes": sorted((node_view(n) for n in objs["nodes"]), key=_key),
        "pods": sorted((pod_view(p) for p in objs["pods"]), key=_key),
        "deployments": sorted((deployment_view(d, objs["replicasets"])
                               for d in objs["deployments"]), key=_key),
        "services": sorted((service_view(s) for s in objs["services"]), key=_key),
        "events": events[:max_events],
    }


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _hosts_of(svc: core_pb2.Service) -> set[str]:
    ns, name = svc.metadata.namespace, svc.metadata.name
    return {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"}


def config_view(objs: Mapping[str, list[Any]], *, namespace: str,
                workload: str) -> dict[str, Any]:
    """What applies to a workload's traffic: the Services selecting its pods, the
    VirtualServices and DestinationRules for those Services' hosts, and the
    AuthorizationPolicies whose selector matches its pods (or the whole namespace)."""
    pods = [p for p in objs["pods"] if p.metadata.namespace == namespace
            and workload_name(p) == workload]
    labels = [p.metadata.labels for p in pods]
    services = [s for s in objs["services"] if s.metadata.namespace == namespace
                and s.spec.selector and any(_selects(s.spec.selector, lb) for lb in labels)]
    hosts = set().union(*(_hosts_of(s) for s in services)) if services else set()

    def for_hosts(o: Any, names: Iterable[str]) -> bool:
        short = {h if "." in h else f"{h}.{o.metadata.namespace}" for h in names}
        return bool((set(names) | short) & hosts)

    vs = [v for v in objs["virtualservices"] if for_hosts(v, v.spec.hosts)]
    dr = [d for d in objs["destinationrules"] if for_hosts(d, [d.spec.host])]
    ap = [a for a in objs["authorizationpolicies"] if a.metadata.namespace == namespace
          and (not a.spec.selector.match_labels
               or any(_selects(a.spec.selector.match_labels, lb) for lb in labels))]

    def enc(items: list[Any]) -> list[Any]:
        return [{"name": i.metadata.name, "namespace": i.metadata.namespace,
                 "spec": manifests.encode_message(i.spec)} for i in items]

    return {"namespace": namespace, "workload": workload,
            "pods": [p.metadata.name for p in pods],
            "services": [s.metadata.name for s in services],
            "virtualServices": enc(vs), "destinationRules": enc(dr),
            "authorizationPolicies": enc(ap)}


# -- the service graph's scraping ------------------------------------------------------------


class GraphScraper:
    """Scrapes every node's meshagent; rates span the scrapes of the last WINDOW s."""

    def __init__(self, *, nodes: Callable[[], Iterable[core_pb2.Node]],
                 clock: Callable[[], float], port: int = MESH_METRICS_PORT,
                 fetch: Callable[[str], str] | None = None, window: float = WINDOW,
                 timeout: float = 3.0) -> None:
        self.nodes = nodes
        self.clock = clock
        self.port = port
        self.fetch = fetch or (lambda url: _http_get(url, timeout))
        self.window = window
        self.scrapes: dict[str, collections.deque[Scrape]] = {}

    async def _scrape(self, node: core_pb2.Node) -> None:
        name, ip = node.metadata.name, internal_ip(node)
        if not ip:
            return
        host = f"[{ip}]" if ":" in ip else ip
        try:
            text = await asyncio.to_thread(self.fetch, f"http://{host}:{self.port}/metrics")
            counters = servicegraph.series(text)
        except (OSError, ValueError) as e:
            log.info("cannot scrape the meshagent on %s: %s", name, e)
            return
        now = self.clock()
        kept = self.scrapes.setdefault(name, collections.deque())
        kept.append(Scrape(now, counters))
        while len(kept) > 2 and now - kept[1].at >= self.window:
            kept.popleft()

    async def scrape(self) -> dict[str, Any]:
        nodes = list(self.nodes())
        await asyncio.gather(*(self._scrape(n) for n in nodes))
        for gone in set(self.scrapes) - {n.metadata.name for n in nodes}:
            del self.scrapes[gone]
        return self.graph()

    def graph(self) -> dict[str, Any]:
        rates: dict[tuple[str, str], float] = {}
        for kept in self.scrapes.values():
            if len(kept) < 2:
                # One scrape: the series exist (edges are drawn) but no rate yet.
                pairs = {k: 0.0 for k in kept[0].counters} if kept else {}
            else:
                pairs = rates_between(kept[0], kept[-1])
            for k, v in pairs.items():
                rates[k] = rates.get(k, 0.0) + v
        edges = servicegraph.merge(servicegraph.edges(rates))
        nodes = sorted({e.source for e in edges} | {e.target for e in edges})
        return {"nodes": [{"id": n} for n in nodes], "edges": [e.to_json() for e in edges],
                "scraped": sorted(self.scrapes)}


# -- the HTTP server ------------------------------------------------------------------------


class Dashboard:
    def __init__(self, client: AsyncClient, *, token: str, graph_interval: float = 5.0,
                 scraper: GraphScraper | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.token = token
        self.graph_interval = graph_interval
        self.informers: dict[str, Informer[Any]] = {
            name: Informer(client, kind) for name, kind in KINDS.items()}
        self.scraper = scraper or GraphScraper(nodes=self.informers["nodes"].list, clock=clock)
        self.graph: dict[str, Any] = {"nodes": [], "edges": [], "scraped": []}
        self.changed = asyncio.Event()
        self.subscribers: set[asyncio.Queue[tuple[str, str]]] = set()
        for inf in self.informers.values():
            inf.add_handlers(on_add=lambda _o: self.changed.set(),
                             on_update=lambda _o, _n: self.changed.set(),
                             on_delete=lambda _o: self.changed.set())

    def objects(self) -> dict[str, list[Any]]:
        return {name: inf.list() for name, inf in self.informers.items()}

    def state(self) -> dict[str, Any]:
        return state_view(self.objects())

    async def run(self, server: asyncio.Server) -> None:
        async with asyncio.TaskGroup() as tg:
            for inf in self.informers.values():
                tg.create_task(inf.run())
            tg.create_task(self._push_state())
            tg.create_task(self._scrape_loop())
            tg.create_task(server.serve_forever())

    def _publish(self, event: str, data: Any) -> None:
        text = json.dumps(data)
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait((event, text))

    async def _push_state(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            self._publish("state", self.state())
            await asyncio.sleep(0.5)

    async def _scrape_loop(self) -> None:
        await self.informers["nodes"].synced.wait()
        while True:
            self.graph = await self.scraper.scrape()
            self._publish("graph", self.graph)
            await asyncio.sleep(self.graph_interval)

    # -- requests --

    def authorized(self, query: Mapping[str, list[str]], headers: Mapping[str, str]) -> bool:
        given = (query.get("token") or [""])[0]
        auth = headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode("latin-1").split()
        headers: dict[str, str] = {}
        while True:
            h = (await reader.readline()).decode("latin-1")
            if h in ("\r\n", "\n", ""):
                break
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
        if len(line) < 2:
            return
        method, target = line[0], line[1]
        url = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(url.query)
        path = url.path
        if method != "GET":
            return await _respond(writer, 405, "text/plain", b"only GET\n")
        if path == "/static/d3.min.js":
            return await _file(writer, D3)
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if "/" in name or name.startswith("."):
                return await _respond(writer, 404, "text/plain", b"not found\n")
            return await _file(writer, STATIC / name)
        if not self.authorized(query, headers):
            return await _respond(writer, 401, "text/plain",
                                  b"a valid token is required (the URL shoal dashboard "
                                  b"printed)\n")
        if path == "/":
            return await _file(writer, STATIC / "index.html")
        if path == "/api/state":
            return await _json(writer, self.state())
        if path == "/api/graph":
            return await _json(writer, self.graph)
        if path == "/api/config":
            ns, wl = (query.get("ns") or [""])[0], (query.get("workload") or [""])[0]
            if not ns or not wl:
                return await _respond(writer, 400, "text/plain",
                                      b"ns and workload are required\n")
            return await _json(writer, config_view(self.objects(), namespace=ns,
                                                   workload=wl))
        if path == "/api/stream":
            return await self._stream(writer)
        return await _respond(writer, 404, "text/plain", b"not found\n")

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=64)
        self.subscribers.add(q)
        try:
            for event, data in (("state", json.dumps(self.state())),
                                ("graph", json.dumps(self.graph))):
                writer.write(f"event: {event}\ndata: {data}\n\n".encode())
            await writer.drain()
            while True:
                try:
                    event, data = await asyncio.wait_for(q.get(), timeout=15.0)
                    writer.write(f"event: {event}\ndata: {data}\n\n".encode())
                except TimeoutError:
                    writer.write(b": keep-alive\n\n")
                await writer.drain()
        finally:
            self.subscribers.discard(q)


async def _respond(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes) -> None:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              405: "Method Not Allowed"}.get(status, "")
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    await writer.drain()


async def _json(writer: asyncio.StreamWriter, data: Any) -> None:
    await _respond(writer, 200, "application/json", json.dumps(data).encode())


async def _file(writer: asyncio.StreamWriter, path: Path) -> None:
    try:
        body = await asyncio.to_thread(path.read_bytes)
    except OSError:
        return await _respond(writer, 404, "text/plain", f"{path.name} not found\n".encode())
    await _respond(writer, 200, _TYPES.get(path.suffix, "application/octet-stream"), body)


async def start(client: AsyncClient, *, address: str, port: int, graph_interval: float,
                token: str | None = None) -> tuple[Dashboard, asyncio.Server, str]:
    """The dashboard bound (not yet running) and the URL to open."""
    dash = Dashboard(client, token=token or secrets.token_urlsafe(24),
                     graph_interval=graph_interval)
    server = await asyncio.start_server(dash.handle, address, port)
    bound = server.sockets[0].getsockname()[1]
    host = f"[{address}]" if ":" in address else address
    return dash, server, f"http://{host}:{bound}/?token={dash.token}"


async def run_dashboard(session: Session, *, address: str, port: int,
                        graph_interval: float) -> int:
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number")
    if graph_interval <= 0:
        raise UsageError("--graph-interval must be more than 0")
    try:
        dash, server, url = await start(session.client(), address=address, port=port,
                                        graph_interval=graph_interval)
    except OSError as e:
        raise UsageError(f"cannot listen on {address}:{port}: {e.strerror or e}") from e
    session.print(f"Serving the dashboard at {url}")
    session.out.flush()
    if address not in ("127.0.0.1", "::1", "localhost"):
        session.warn(f"warning: listening on {address}, not only on this machine; the "
                     "token in the URL is all that guards your identity")
    await dash.run(server)
    return 0
