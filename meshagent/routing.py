"""Where a captured connection goes: ClusterIP:port -> a ready endpoint (L4).

    build_routes(services, endpoints) -> {(clusterIP, port): Route}    pure
    decide(routes, dst, pod_cidr) -> Decision                          pure
    Balancer.pick(route) -> endpoint   round robin (default) or least connections,
                                       per service, chosen by the Service annotation
                                       ``shoal.dev/load-balancer: least-connections``

Endpoints come from the Endpoints object's ready ``addresses`` only (the
endpoints controller has already mapped ``targetPort`` to numbers, by port
name); an endpoint that stops being ready disappears from the next table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shoal.api.core.v1 import core_pb2
from shoal.informer import key_of

LB_ANNOTATION = "shoal.dev/load-balancer"
ROUND_ROBIN = "round-robin"
LEAST_CONNECTIONS = "least-connections"
POLICIES = (ROUND_ROBIN, LEAST_CONNECTIONS)

Address = tuple[str, int]


@dataclass(frozen=True)
class Route:
    service: str  # namespace/name
    port_name: str
    endpoints: tuple[Address, ...]
    policy: str = ROUND_ROBIN

    @property
    def namespace(self) -> str:
        return self.service.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.service.split("/", 1)[1]


def _has_cluster_ip(svc: core_pb2.Service) -> bool:
    ip = svc.spec.cluster_ip
    return bool(ip) and ip != "None" and svc.spec.type != "ExternalName" and ":" not in ip


def build_routes(services: Iterable[core_pb2.Service],
                 endpoints: Mapping[str, core_pb2.Endpoints]) -> dict[Address, Route]:
    """Every TCP ClusterIP service port with its ready endpoints (pure)."""
    out: dict[Address, Route] = {}
    for svc in services:
        if not _has_cluster_ip(svc):
            continue
        policy = svc.metadata.annotations.get(LB_ANNOTATION, ROUND_ROBIN)
        if policy not in POLICIES:
            policy = ROUND_ROBIN
        ep = endpoints.get(key_of(svc))
        for sp in svc.spec.ports:
            if (sp.protocol or "TCP").upper() != "TCP":
                continue
            targets: set[Address] = set()
            for subset in ep.subsets if ep is not None else ():
                port = next((p for p in subset.ports if p.name == sp.name
                             and (p.protocol or "TCP").upper() == "TCP"), None)
                if port is None:
                    continue
                targets.update((a.ip, int(port.port)) for a in subset.addresses if a.ip)
            out[(svc.spec.cluster_ip, int(sp.port))] = Route(
                service=key_of(svc), port_name=sp.name,
                endpoints=tuple(sorted(targets)), policy=policy)
    return out


@dataclass(frozen=True)
class Decision:
    """``kind``: "service" (pick from ``route``), "passthrough" (connect to the
    original destination as is) or "refuse" (with ``reason``)."""

    kind: str
    route: Route | None = None
    reason: str = ""


def decide(routes: Mapping[Address, Route], dst: Address, *, pod_cidr: str) -> Decision:
    route = routes.get(dst)
    if route is not None:
        if not route.endpoints:
            return Decision("refuse", route, reason="no ready endpoints")
        return Decision("service", route)
    try:
        in_pods = ipaddress.IPv4Address(dst[0]) in ipaddress.IPv4Network(pod_cidr)
    except ValueError:
        in_pods = False
    if in_pods:
        return Decision("passthrough")
    return Decision("refuse", reason=f"{dst[0]}:{dst[1]} is neither a service port nor a pod")


@dataclass
class Balancer:
    """Per-service balancing state; ``active`` counts open connections by endpoint."""

    _next: dict[str, int] = field(default_factory=dict)
    active: dict[Address, int] = field(default_factory=dict)

    def pick(self, route: Route) -> Address:
        eps = route.endpoints
        if not eps:
            raise LookupError(f"{route.service}: no ready endpoints")
        i = self._next.get(route.service, 0)
        self._next[route.service] = i + 1
        if route.policy == LEAST_CONNECTIONS:
            # Fewest open connections; ties broken round robin.
            least = min(self.active.get(e, 0) for e in eps)
            tied = [e for e in eps if self.active.get(e, 0) == least]
            return tied[i % len(tied)]
        return eps[i % len(eps)]

    def opened(self, ep: Address) -> None:
        self.active[ep] = self.active.get(ep, 0) + 1

    def closed(self, ep: Address) -> None:
        n = self.active.get(ep, 0) - 1
        if n > 0:
            self.active[ep] = n
        else:
            self.active.pop(ep, None)
