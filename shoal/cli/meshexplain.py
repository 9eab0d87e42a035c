"""``shoal mesh explain SRC-POD DST-HOST[:PORT] [--path P --header K=V ... --method M]``:
what the mesh would do with one request, worked out by the agent's own code.

    route       meshagent/l7/routes.py     the VirtualService route and the object it came
                                           from (or the default route), timeout, retries,
                                           fault, mirror, rewrite, redirect
    upstream    meshagent/l7/upstream.py   the cluster of each destination (subset), its
                                           DestinationRule settings and its endpoints
    policy      meshagent/policy.py        each endpoint's mTLS mode and the
                                           AuthorizationPolicy verdict (L7 on HTTP ports)

The objects come from the API (every namespace's Services, Endpoints, Pods, Namespaces,
VirtualServices, DestinationRules, ServiceEntries, AuthorizationPolicies,
PeerAuthentications); nothing is asked of the agents, so what only the agent knows --
endpoints ejected by outlier detection, the connection-pool occupancy, the weighted
destination a given request drew -- is not shown, and the output says so.

DST-HOST is read as the source pod's DNS would: ``NAME`` (in the pod's namespace),
``NAME.NS``, ``NAME.NS.svc`` or ``NAME.NS.svc.<domain>``; PORT defaults to the Service's only
port, else to 80 when it has one. ``explain`` is pure (objects in, a JSON-ready dict out);
``run_mesh_explain`` reads the objects and prints.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshagent import policy
from meshagent.daemon import captured, service_account
from meshagent.l7 import routes, upstream
from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli.reporting import UsageError
from shoal.cli.session import Session
from shoal.manifests import dump_json, dump_yaml
from shoal.meshprotocol import port_protocol

Output = Literal["", "json", "yaml"]
DOMAIN = "cluster.local"
TRUST_DOMAIN = "cluster.local"
AGENT_ONLY = ("endpoints ejected by outlier detection and connection-pool occupancy are "
              "known only by the source pod's agent: every ready endpoint is listed")


@dataclass(frozen=True)
class MeshObjects:
    services: Sequence[core_pb2.Service] = ()
    endpoints: Sequence[core_pb2.Endpoints] = ()
    pods: Sequence[core_pb2.Pod] = ()
    namespaces: Sequence[core_pb2.Namespace] = ()
    virtual_services: Sequence[traffic_pb2.VirtualService] = ()
    destination_rules: Sequence[traffic_pb2.DestinationRule] = ()
    service_entries: Sequence[traffic_pb2.ServiceEntry] = ()
    authorization_policies: Sequence[security_pb2.AuthorizationPolicy] = ()
    peer_authentications: Sequence[security_pb2.PeerAuthentication] = ()


@dataclass(frozen=True)
class Ask:
    """The request to explain, as given on the command line."""
    pod: str                     # the source pod, in ``namespace``
    namespace: str
    target: str                  # DST-HOST[:PORT]
    method: str = "GET"
    path: str = "/"
    headers: Mapping[str, str] = field(default_factory=dict)   # lower-case names


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """``K=V`` (or ``K:V``) pairs; bad input raises UsageError naming it."""
    out: dict[str, str] = {}
    for v in values:
        sep = "=" if "=" in v else ":"
        name, found, value = v.partition(sep)
        if not found or not name.strip():
            raise UsageError(f"--header {v!r}: expected NAME=VALUE")
        out[name.strip().lower()] = value.strip()
    return out


def split_target(target: str) -> tuple[str, int | None]:
    host, sep, port = target.rpartition(":")
    if not sep:
        return target.lower(), None
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UsageError(f"DST-HOST[:PORT] {target!r}: the port must be a number 1-65535")
    return host.lower(), int(port)


def find_service(host: str, namespace: str, services: Sequence[core_pb2.Service]
                 ) -> core_pb2.Service:
    """The Service a pod in ``namespace`` reaches by ``host``, as its DNS search list does."""
    parts = host.rstrip(".").split(".")
    if len(parts) == 1:
        ns, name = namespace, parts[0]
    elif len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc"
                             and ".".join(parts[3:]) in ("", DOMAIN)):
        ns, name = parts[1], parts[0]
    else:
        raise UsageError(f"DST-HOST {host!r}: not a Service name (NAME, NAME.NS, NAME.NS.svc "
                         f"or NAME.NS.svc.{DOMAIN})")
    for svc in services:
        if svc.metadata.namespace == ns and svc.metadata.name == name:
            return svc
    raise UsageError(f'DST-HOST {host!r}: no Service "{name}" in namespace "{ns}"')


def choose_port(svc: core_pb2.Service, port: int | None) -> core_pb2.ServicePort:
    ports = list(svc.spec.ports)
    listed = ", ".join(str(p.port) for p in ports) or "none"
    if port is not None:
        for p in ports:
            if p.port == port:
                return p
        raise UsageError(f'service "{svc.metadata.namespace}/{svc.metadata.name}" has no port '
                         f"{port} (its ports: {listed})")
    if len(ports) == 1:
        return ports[0]
    for p in ports:
        if p.port == 80:
            return p
    raise UsageError(f'service "{svc.metadata.namespace}/{svc.metadata.name}" has ports '
                     f"{listed}: give one as DST-HOST:PORT")


def _retries(r: routes.Retries) -> dict[str, Any]:
    return {"attempts": r.attempts, "per_try_timeout_s": r.per_try_timeout,
            "retry_on": sorted(r.retry_on), "retriable_status_codes": sorted(r.status_codes)}


def _route(action: routes.Action) -> dict[str, Any]:
    out: dict[str, Any] = {"origin": action.origin, "timeout_s": action.timeout,
                           "retries": _retries(action.retries)}
    if action.fault is not None:
        f = action.fault
        out["fault"] = {"delay_s": f.delay, "delay_percent": f.delay_percent,
                        "abort_status": f.abort_status, "abort_percent": f.abort_percent}
    if action.mirror is not None:
        m = action.mirror
        out["mirror"] = {"host": m.host, "port": m.port, "subset": m.subset,
                         "percent": action.mirror_percent}
    if action.rewrite is not None:
        out["rewrite"] = {"uri": action.rewrite.uri, "authority": action.rewrite.authority}
    if action.redirect is not None:
        r = action.redirect
        out["redirect"] = {"uri": r.uri, "authority": r.authority, "port": r.port,
                           "scheme": r.scheme, "code": r.code}
    return out


def explain(objects: MeshObjects, ask: Ask) -> dict[str, Any]:
    """What the mesh does with the request ``ask`` describes (pure). UsageError on bad input."""
    pods = {(p.metadata.namespace, p.metadata.name): p for p in objects.pods}
    src = pods.get((ask.namespace, ask.pod))
    if src is None:
        raise UsageError(f'pod "{ask.pod}" not found in namespace "{ask.namespace}"')
    if not src.status.pod_ip:
        raise UsageError(f'pod "{ask.namespace}/{ask.pod}" has no IP yet')
    host, port_number = split_target(ask.target)
    svc = find_service(host, ask.namespace, objects.services)
    sport = choose_port(svc, port_number)
    fqdn = f"{svc.metadata.name}.{svc.metadata.namespace}.svc.{DOMAIN}"
    choice = port_protocol(name=sport.name,
                           app_protocol=sport.app_protocol if sport.HasField("app_protocol")
                           else None, transport=sport.protocol or "TCP")
    nss = {n.metadata.name: n for n in objects.namespaces}
    src_meshed = captured(src, nss)
    src_principal = (f"{TRUST_DOMAIN}/ns/{ask.namespace}/sa/{service_account(src)}"
                     if src_meshed else "")
    authority = ask.headers.get("host") or (ask.target if port_number is not None else host)
    notes: list[str] = []
    if not src_meshed:
        notes.append(f"pod {ask.namespace}/{ask.pod} is not in the mesh (opted out, or host "
                     "network): its requests bypass the agents, nothing below applies to them")
    table = routes.RouteTable(domain=DOMAIN)
    table.update(objects.virtual_services, objects.services, objects.service_entries)
    request = routes.Request(method=ask.method.upper(), path=ask.path, authority=authority,
                             headers=dict(ask.headers), port=int(sport.port),
                             source_labels=dict(src.metadata.labels),
                             source_namespace=ask.namespace)
    if choice.is_http:
        action = table.route(request, fqdn, int(sport.port))
    else:
        action = table.tcp_route(fqdn, int(sport.port), source_labels=dict(src.metadata.labels),
                                 source_namespace=ask.namespace) \
            or routes.Action(origin="default", destinations=(routes.Destination(
                host=fqdn, port=int(sport.port)),), retries=routes.NO_RETRIES)
        notes.append(f"port {sport.port} is {choice.protocol.value.upper()}: the agent relays "
                     "its connections at L4 (no HTTP routing, retries, timeouts or L7 policy; "
                     "endpoints are balanced per connection)")
    clusters = upstream.Clusters(clock=lambda: 0.0, rng=random.Random(0), domain=DOMAIN)
    clusters.update(services=objects.services, endpoints=objects.endpoints, pods=objects.pods,
                    destination_rules=objects.destination_rules)
    http_req = policy.HttpRequest(method=request.method, path=request.path, host=authority,
                                  headers=dict(ask.headers)) if choice.is_http else None
    dests = []
    for d in action.destinations:
        dests.append(_destination(d, clusters, pods=pods, nss=nss, objects=objects,
                                  src=src, src_principal=src_principal, http=http_req))
    if choice.is_http and not action.destinations and action.redirect is None:
        notes.append("no route matched: the agent answers 404 with response flag NR")
    if action.destinations:
        notes.append(AGENT_ONLY)
    return {
        "source": {"pod": f"{ask.namespace}/{ask.pod}", "ip": src.status.pod_ip,
                   "node": src.spec.node_name, "meshed": src_meshed,
                   "principal": src_principal, "labels": dict(src.metadata.labels)},
        "request": {"method": request.method, "authority": authority, "path": request.path,
                    "headers": dict(ask.headers)},
        "destination": {"host": fqdn, "port": int(sport.port), "port_name": sport.name,
                        "protocol": choice.protocol.value.upper(), "protocol_source":
                        choice.source},
        "route": _route(action),
        "destinations": dests,
        "notes": notes,
    }


def _destination(d: routes.Destination, clusters: upstream.Clusters, *,
                 pods: Mapping[tuple[str, str], core_pb2.Pod],
                 nss: Mapping[str, core_pb2.Namespace], objects: MeshObjects,
                 src: core_pb2.Pod, src_principal: str,
                 http: policy.HttpRequest | None) -> dict[str, Any]:
    out: dict[str, Any] = {"host": d.host, "port": d.port, "subset": d.subset,
                           "weight": d.weight}
    cluster = clusters.get(d.host, d.port, d.subset)
    if cluster is None:
        known = d.host.endswith(f".svc.{DOMAIN}") and clusters.get(d.host, d.port) is not None
        out["cluster"] = None
        out["problem"] = (f"no DestinationRule for {d.host} defines subset {d.subset!r}: 503 "
                          "(no cluster)" if known and d.subset else
                          f"no Service port {d.host}:{d.port} the agent knows: 503 (no cluster)")
        out["endpoints"] = []
        return out
    desc = cluster.describe()
    out["cluster"] = {k: v for k, v in desc.items() if k != "endpoints"}
    eps = []
    for e in cluster.endpoints:
        item: dict[str, Any] = {"address": e.address, "pod": e.pod, "node": "",
                                "labels": dict(e.labels)}
        ns, _, name = e.pod.partition("/")
        pod = pods.get((ns, name))
        if pod is not None:
            item["node"] = pod.spec.node_name
            labels = dict(pod.metadata.labels) or dict(e.labels)
            dst_meshed = captured(pod, nss)
            target = policy.Target(namespace=ns, labels=labels, port=e.port, ip=e.ip)
            mode = policy.mtls_mode(objects.peer_authentications, target)
            mtls = bool(src_principal) and dst_meshed
            item["mtls_mode"] = mode
            item["connection_security"] = "mutual_tls" if mtls else "none"
            if not dst_meshed:
                item["policy"] = {"allowed": True, "policy": "",
                                  "reason": "destination pod not in the mesh: no policy"}
            elif not mtls and mode == policy.STRICT:
                item["policy"] = {"allowed": False, "policy": "",
                                  "reason": "STRICT mTLS: plaintext refused"}
            else:
                peer = policy.Peer(principal=src_principal if mtls else "",
                                   namespace=src.metadata.namespace if mtls else "",
                                   ip=src.status.pod_ip)
                v = policy.authorize(objects.authorization_policies, peer, target,
                                     request=http)
                item["policy"] = {"allowed": v.allowed, "policy": v.policy, "reason": v.reason}
        eps.append(item)
    out["endpoints"] = eps
    if not eps:
        out["problem"] = "no ready endpoint: 503 with response flag UH"
    return out


# --------------------------------------------------------------------------- text


def _seconds(v: float | None, none: str) -> str:
    return none if v is None else f"{v:g}s"


def _cluster_lines(c: Mapping[str, Any]) -> list[str]:
    lb = c["load_balancer"]
    lines = [f"      cluster {c['name']}"
             + (f" (DestinationRule {c['destination_rule']})" if c["destination_rule"]
                else " (no DestinationRule: Istio's defaults)"),
             f"      load balancer: {lb['policy']}"
             + (f" by {lb['hash_key']}" if lb.get("hash_key") else "")]
    pool = c["connection_pool"]
    limits = [f"{k} {pool[k]}" for k in ("max_connections", "http1_max_pending_requests",
                                         "http2_max_requests") if pool[k] is not None]
    lines.append("      connection pool: " + (", ".join(limits) if limits else "no limits"))
    od = c["outlier_detection"]
    if od is None:
        lines.append("      outlier detection: off")
    else:
        lines.append(f"      outlier detection: consecutive 5xx {od['consecutive_5xx_errors']}"
                     f", gateway errors {od['consecutive_gateway_errors']}, interval "
                     f"{od['interval_s']:g}s, base ejection {od['base_ejection_time_s']:g}s, "
                     f"max ejection {od['max_ejection_percent']}%, min health "
                     f"{od['min_health_percent']}%")
    return lines


def render(doc: Mapping[str, Any]) -> str:
    s, r, d, route = doc["source"], doc["request"], doc["destination"], doc["route"]
    out = [f"Request: {r['method']} {r['path']} (authority {r['authority']}) from pod "
           f"{s['pod']} ({s['ip']} on {s['node'] or '-'})",
           f"Destination: {d['host']}:{d['port']} (port {d['port_name'] or '-'}, "
           f"{d['protocol']} by {d['protocol_source']})",
           f"Route: {route['origin']}"]
    if d["protocol"] in ("HTTP", "HTTP2"):
        retries = route["retries"]
        out.append(f"  timeout: {_seconds(route['timeout_s'], 'none')}")
        out.append(f"  retries: {retries['attempts']} (per try timeout "
                   f"{_seconds(retries['per_try_timeout_s'], 'none')}; on "
                   f"{','.join(retries['retry_on']) or '-'})")
    if "fault" in route:
        f = route["fault"]
        parts = []
        if f["delay_s"]:
            parts.append(f"delay {f['delay_s']:g}s for {f['delay_percent']:g}%")
        if f["abort_status"]:
            parts.append(f"abort {f['abort_status']} for {f['abort_percent']:g}%")
        out.append("  fault: " + ("; ".join(parts) or "none"))
    if "mirror" in route:
        m = route["mirror"]
        out.append(f"  mirror: {m['host']}:{m['port']}" + (f" subset {m['subset']}"
                                                          if m["subset"] else "")
                   + f" ({m['percent']:g}%)")
    if "rewrite" in route:
        out.append(f"  rewrite: uri {route['rewrite']['uri'] or '-'}, authority "
                   f"{route['rewrite']['authority'] or '-'}")
    if "redirect" in route:
        rd = route["redirect"]
        out.append(f"  redirect: {rd['code']} to {rd['scheme'] or '(same scheme)'}://"
                   f"{rd['authority'] or '(same host)'}{rd['uri'] or '(same path)'}")
    for dest in doc["destinations"]:
        out.append(f"  -> {dest['weight']}% {dest['host']}:{dest['port']}"
                   + (f" subset {dest['subset']}" if dest["subset"] else ""))
        if dest["cluster"] is not None:
            out += _cluster_lines(dest["cluster"])
        if "problem" in dest:
            out.append(f"      {dest['problem']}")
        for e in dest["endpoints"]:
            line = f"      endpoint {e['address']} pod {e['pod'] or '-'} node {e['node'] or '-'}"
            if "policy" in e:
                p = e["policy"]
                verdict = "ALLOW" if p["allowed"] else "DENY"
                line += (f": mTLS {e['mtls_mode']} ({e['connection_security']}), policy "
                         f"{verdict}" + (f" by {p['policy']}" if p["policy"] else "")
                         + (f" ({p['reason']})" if p["reason"] else ""))
            out.append(line)
    out += [f"Note: {n}" for n in doc["notes"]]
    return "\n".join(out) + "\n"


async def run_mesh_explain(session: Session, *, pod: str, target: str, method: str,
                           path: str, headers: Sequence[str], output: Output) -> int:
    ask = Ask(pod=pod, namespace=session.namespace, target=target, method=method or "GET",
              path=path or "/", headers=parse_headers(headers))
    split_target(target)                       # bad input fails before any call
    if not ask.path.startswith("/"):
        raise UsageError(f"--path {path!r}: must start with /")
    client = session.client()

    async def every(kind: Any) -> Any:
        return (await client.list_all(kind, all_namespaces=True)).items

    objects = MeshObjects(
        services=await every(core_pb2.Service), endpoints=await every(core_pb2.Endpoints),
        pods=await every(core_pb2.Pod),
        namespaces=(await client.list_all(core_pb2.Namespace)).items,
        virtual_services=await every(traffic_pb2.VirtualService),
        destination_rules=await every(traffic_pb2.DestinationRule),
        service_entries=await every(traffic_pb2.ServiceEntry),
        authorization_policies=await every(security_pb2.AuthorizationPolicy),
        peer_authentications=await every(security_pb2.PeerAuthentication))
    doc = explain(objects, ask)
    if output == "json":
        session.out.write(dump_json(doc) + "\n")
    elif output == "yaml":
        session.out.write(dump_yaml(doc))
    else:
        session.out.write(render(doc))
    return 0
