"""Which Service a request to a local pod was for: the destination reporter's
``destination_service`` (and its name and namespace), as Istio fills it.

The inbound agent sees a pod IP and port, not the Service the client used, so it
works it out from what it has::

    build_index(services, endpoints, ...)   table rebuild: (pod IP, target port)
                                            -> the Services with it as an endpoint
    resolve(index, ip=, port=, namespace=, host=, source_namespace=)
                                            per request: dict lookups
      1. the Host / :authority names a Service that has this pod as an endpoint on
         this port: short name (from the Service's own namespace), name.ns,
         name.ns.svc, name.ns.svc.<cluster domain>; any ":port" is ignored
      2. else the one Service of the pod's namespace that has it there (two or
         more: no guess)
      3. else a ServiceEntry host the request names: that host (name: the host,
         namespace: the entry's); otherwise unknown (an empty ServiceName), as
         Istio reports a host it does not know

Rule 1 only believes a host among the Services the pod really serves, so a
client cannot label a request as any Service it likes. (ztunnel, for rule 2,
takes the first Service it finds; here a pod behind several Services of its
namespace stays unknown unless the host says which.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from meshagent.l7 import upstream
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2

Address = tuple[str, int]


@dataclass(frozen=True)
class ServiceName:
    """destination_service (FQDN or a ServiceEntry host), its name and namespace;
    all empty: unknown."""

    host: str = ""
    name: str = ""
    namespace: str = ""


UNKNOWN = ServiceName()


@dataclass(frozen=True)
class Served:
    """The Services with one pod IP:port as an endpoint."""

    named: Mapping[str, ServiceName]  # name.ns, name.ns.svc, FQDN -> the Service
    short: Mapping[tuple[str, str], ServiceName]  # (namespace, name) -> the Service
    sole: Mapping[str, ServiceName]  # namespace -> its only Service here


@dataclass(frozen=True)
class Index:
    served: Mapping[Address, Served] = field(default_factory=dict)
    entries: Mapping[str, ServiceName] = field(default_factory=dict)  # ServiceEntry hosts


def build_index(services: Iterable[core_pb2.Service], endpoints: Iterable[core_pb2.Endpoints],
                *, domain: str,
                service_entries: Iterable[traffic_pb2.ServiceEntry] = (),
                workload_entries: Iterable[traffic_pb2.WorkloadEntry] = ()) -> Index:
    """The index :func:`resolve` reads (pure). A Service's endpoints are its
    Endpoints' addresses, ready or not, on each of their ports, and the
    WorkloadEntries its selector selects."""
    eps = {(e.metadata.namespace, e.metadata.name): e for e in endpoints}
    entries_list = list(workload_entries)
    at: dict[Address, dict[ServiceName, None]] = {}
    for svc in sorted(services, key=lambda s: (s.metadata.namespace, s.metadata.name)):
        ns, name = str(svc.metadata.namespace), str(svc.metadata.name)
        this = ServiceName(host=f"{name}.{ns}.svc.{domain}", name=name, namespace=ns)
        ep = eps.get((ns, name))
        for subset in ep.subsets if ep is not None else ():
            for addr in (*subset.addresses, *subset.not_ready_addresses):
                for p in subset.ports:
                    if addr.ip and p.port:
                        at.setdefault((addr.ip, int(p.port)), {})[this] = None
        if entries_list:
            for sp in svc.spec.ports:
                for we in upstream.workload_entry_endpoints(svc, sp, entries_list):
                    at.setdefault(we.key, {})[this] = None
    served = {addr: _served(list(found), domain=domain) for addr, found in at.items()}
    hosts: dict[str, ServiceName] = {}
    for se in sorted(service_entries, key=lambda s: (s.metadata.namespace, s.metadata.name)):
        for h in se.spec.hosts:
            host = h.lower().rstrip(".")
            if host and not host.startswith("*"):
                hosts.setdefault(host, ServiceName(host=host, name=host,
                                                   namespace=str(se.metadata.namespace)))
    return Index(served=served, entries=hosts)


def _served(found: list[ServiceName], *, domain: str) -> Served:
    named: dict[str, ServiceName] = {}
    short: dict[tuple[str, str], ServiceName] = {}
    per_ns: dict[str, list[ServiceName]] = {}
    for s in found:
        for host in (f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc", s.host):
            named.setdefault(host, s)
        short.setdefault((s.namespace, s.name), s)
        per_ns.setdefault(s.namespace, []).append(s)
    sole = {ns: only[0] for ns, only in per_ns.items() if len(only) == 1}
    return Served(named=named, short=short, sole=sole)


def host_name(authority: str) -> str:
    """A Host / :authority header as a name to look up: lower case, without a
    port or a trailing dot (an IPv6 literal keeps its brackets' contents)."""
    h = authority.strip().lower()
    if h.startswith("["):
        return h[1:].partition("]")[0]
    return h.partition(":")[0].rstrip(".")


def resolve(index: Index, *, ip: str, port: int, namespace: str, host: str,
            source_namespace: str = "") -> ServiceName:
    """The Service a request to the pod at ``ip``:``port`` (of ``namespace``) with
    this Host / :authority was for (the rules in the module docstring; pure). A
    short name resolves in the client's namespace (``source_namespace``; the
    pod's when the client is unknown), as DNS search paths do."""
    name = host_name(host) if host else ""
    served = index.served.get((ip, port))
    if served is not None:
        if name:
            found = served.named.get(name) or served.short.get(
                (source_namespace or namespace, name))
            if found is not None:
                return found
        sole = served.sole.get(namespace)
        if sole is not None:
            return sole
    if name:
        return index.entries.get(name, UNKNOWN)
    return UNKNOWN
