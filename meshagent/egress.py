"""Egress: where a meshed pod may connect outside the cluster (L4).

    build_registry(service_entries, resolved) -> Registry                    pure
    decide_egress(registry, mode, dst) -> Egress                             pure
    policy_for(default, namespace labels) -> mode                            pure

A captured connection to an address that is neither a Service port nor a pod
comes here (``proxy.DataPath``). The mesh's outbound traffic policy, as
Istio's ``meshConfig.outboundTrafficPolicy.mode``:

    ALLOW_ANY       (the default) a destination no ServiceEntry names is passed
                    through as is (Istio's PassthroughCluster)
    REGISTRY_ONLY   only ServiceEntry destinations; any other is refused, counted
                    in ``shoal_mesh_egress_blocked_total`` and in the TCP metrics
                    with destination_service "BlackHoleCluster" and response flag
                    "NR" (no route), as Envoy's BlackHoleCluster

The agent's ``--outbound-traffic-policy`` sets the mode; a namespace overrides it
for its pods with the label ``shoal.dev/outbound-traffic-policy: REGISTRY_ONLY``
(or ``ALLOW_ANY``). An unknown value on the label is ignored (the agent's mode
applies) and logged.

A ServiceEntry makes reachable, on each of its ports (``ports[].number``):

    addresses       every IP or CIDR in ``spec.addresses`` (its VIPs); with
                    resolution STATIC and endpoints, a connection to a VIP goes to
                    one of the endpoints (round robin), on the endpoint's own port
                    for that port name when it gives one
    STATIC          every endpoint IP (``spec.endpoints[].address``)
    DNS             every IP the agent resolved ``spec.hosts`` (or the endpoints'
                    host names) to, through its upstream DNS server, refreshed every
                    30 s (``resolved``)
    NONE            only its addresses (without addresses: nothing at L4, as Istio
                    cannot match a TCP connection to a host name either)

``exportTo`` is not applied: every ServiceEntry is visible to every namespace.
An HTTP port (protocol HTTP, HTTP2, GRPC) of a ServiceEntry does not come here
when its destination is a single IP (a VIP, a STATIC endpoint without VIPs, a
resolved DNS address): the agent serves it with the L7 engine
(``daemon.service_entry_http_ports``, clusters in ``l7.upstream``), with the
mesh's routes, retries, timeouts and telemetry. CIDR addresses and NONE
entries without addresses stay here, at L4.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import dns.asyncquery
import dns.exception
import dns.message
import dns.rdatatype

from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.informer import key_of

ALLOW_ANY = "ALLOW_ANY"
REGISTRY_ONLY = "REGISTRY_ONLY"
MODES = (ALLOW_ANY, REGISTRY_ONLY)
NAMESPACE_LABEL = "shoal.dev/outbound-traffic-policy"
PASSTHROUGH = "PassthroughCluster"
BLACKHOLE = "BlackHoleCluster"

Address = tuple[str, int]


@dataclass(frozen=True)
class Entry:
    """One ServiceEntry's reachable destinations."""

    name: str  # namespace/name
    host: str  # its first host, for metrics (destination_service)
    ports: Mapping[int, str]  # number -> port name
    vips: tuple[ipaddress.IPv4Network, ...]
    ips: frozenset[str]  # STATIC endpoints and resolved DNS addresses
    # VIP traffic goes here: (ip, {port name: endpoint port}) per STATIC endpoint.
    endpoints: tuple[tuple[str, Mapping[str, int]], ...] = ()


@dataclass(frozen=True)
class Registry:
    entries: tuple[Entry, ...] = ()


@dataclass(frozen=True)
class Egress:
    allowed: bool
    target: Address | None = None
    service: str = ""  # the ServiceEntry host, PassthroughCluster or BlackHoleCluster
    reason: str = ""


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def _network(text: str) -> ipaddress.IPv4Network | None:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        return None


def dns_hosts(se: pb.ServiceEntry) -> list[str]:
    """The names the agent resolves for a DNS ServiceEntry (pure)."""
    if not se.spec.resolution.startswith("DNS"):
        return []
    named = [ep.address for ep in se.spec.endpoints if _ip(ep.address) is None]
    if se.spec.endpoints:
        return sorted(set(named))
    return sorted({h for h in se.spec.hosts if not h.startswith("*")})


def build_registry(service_entries: Iterable[pb.ServiceEntry],
                   resolved: Mapping[str, tuple[str, ...]] | None = None,
                   workload_entries: Iterable[pb.WorkloadEntry] = ()) -> Registry:
    """Every ServiceEntry's destinations; ``resolved`` maps DNS names to IPs; a
    ServiceEntry's ``workloadSelector`` makes the matching WorkloadEntries of its
    namespace its STATIC endpoints (pure)."""
    resolved = resolved or {}
    wes = list(workload_entries)
    entries = []
    for se in sorted(service_entries, key=key_of):
        spec = se.spec
        ports = {int(p.number): p.name for p in spec.ports if p.number}
        vips = tuple(n for n in (_network(a) for a in spec.addresses) if n is not None)
        ips: set[str] = set()
        endpoints: list[tuple[str, Mapping[str, int]]] = []
        selected = []
        if spec.HasField("workload_selector") and spec.workload_selector.labels:
            want = dict(spec.workload_selector.labels)
            selected = [we.spec for we in wes if we.metadata.namespace == se.metadata.namespace
                        and all(we.spec.labels.get(k) == v for k, v in want.items())]
        if spec.resolution == "STATIC":
            for ep in [*spec.endpoints, *selected]:
                ip = _ip(ep.address)
                if ip is not None:
                    ips.add(ip)
                    endpoints.append((ip, {k: int(v) for k, v in ep.ports.items()}))
        elif spec.resolution.startswith("DNS"):
            for host in dns_hosts(se):
                ips.update(resolved.get(host, ()))
            ips.update(ip for ep in spec.endpoints if (ip := _ip(ep.address)) is not None)
        entries.append(Entry(name=key_of(se), host=spec.hosts[0] if spec.hosts else "",
                             ports=ports, vips=vips, ips=frozenset(ips),
                             endpoints=tuple(endpoints)))
    return Registry(entries=tuple(entries))


def service_entry_names(service_entries: Iterable[pb.ServiceEntry],
                        resolved: Mapping[str, tuple[str, ...]] | None = None
                        ) -> dict[str, tuple[str, ...]]:
    """Host -> IPs for the mesh DNS (pure): a ServiceEntry's single-IP addresses,
    else its STATIC endpoint IPs. DNS entries are left to the upstream server."""
    out: dict[str, tuple[str, ...]] = {}
    for se in sorted(service_entries, key=key_of):
        spec = se.spec
        ips = [ip for a in spec.addresses if (ip := _ip(a)) is not None]
        if not ips and spec.resolution == "STATIC":
            ips = [ip for ep in spec.endpoints if (ip := _ip(ep.address)) is not None]
        if not ips:
            continue
        for host in spec.hosts:
            if not host.startswith("*"):
                out.setdefault(host.lower().rstrip("."), tuple(ips))
    return out


@dataclass
class _Rotor:
    counters: dict[str, itertools.count[int]] = field(default_factory=dict)

    def next(self, name: str) -> int:
        return next(self.counters.setdefault(name, itertools.count()))


_rotor = _Rotor()


def decide_egress(registry: Registry, mode: str, dst: Address) -> Egress:
    """Where a connection to ``dst`` (outside the cluster) goes under ``mode``."""
    ip, port = dst
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        addr = None
    for e in registry.entries:
        if port not in e.ports:
            continue
        if addr is not None and any(addr in n for n in e.vips):
            if e.endpoints:
                name = e.ports[port]
                i = _rotor.next(e.name) % len(e.endpoints)
                ep_ip, ep_ports = e.endpoints[i]
                return Egress(True, (ep_ip, ep_ports.get(name, port)), e.host)
            return Egress(True, dst, e.host)
        if ip in e.ips:
            return Egress(True, dst, e.host)
    if mode == REGISTRY_ONLY:
        return Egress(False, None, BLACKHOLE,
                      f"{ip}:{port} is not in the mesh's registry (REGISTRY_ONLY: no "
                      f"ServiceEntry names it)")
    return Egress(True, dst, PASSTHROUGH)


def policy_for(default: str, namespace_labels: Mapping[str, str]) -> str:
    """The outbound traffic policy for a namespace's pods (pure)."""
    value = namespace_labels.get(NAMESPACE_LABEL, "")
    return value if value in MODES else default


async def resolve(hosts: Iterable[str], *, upstream: str = "",
                  timeout: float = 3.0) -> dict[str, tuple[str, ...]]:
    """A records of ``hosts`` from ``upstream`` (IP[:port]; "" = the system's
    resolver). A name that does not resolve is left out (and so unreachable
    under REGISTRY_ONLY)."""
    out: dict[str, tuple[str, ...]] = {}
    for host in hosts:
        try:
            if upstream:
                ip, _, port = upstream.partition(":")
                q = dns.message.make_query(host.rstrip(".") + ".", dns.rdatatype.A)
                r = await dns.asyncquery.udp(q, ip, port=int(port or 53), timeout=timeout)
                ips = [str(rd) for rrset in r.answer if rrset.rdtype == dns.rdatatype.A
                       for rd in rrset]
            else:
                infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                    host, None, family=socket.AF_INET, type=socket.SOCK_STREAM), timeout)
                ips = [str(i[4][0]) for i in infos]
        except (OSError, TimeoutError, ValueError, dns.exception.DNSException):
            continue
        if ips:
            out[host] = tuple(sorted(set(ips)))
    return out
