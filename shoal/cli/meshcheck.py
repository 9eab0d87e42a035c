"""``shoal mesh check [-n NS | -A]``: what in the mesh's config will not do what it
says, in the manner of ``istioctl analyze``.

Each finding is one line, ``<Level> [<code>] (<Kind> <namespace>/<name>) <message>``:

    IST0118  a Service port whose protocol nothing declares (no appProtocol, and
             a name without a protocol prefix): the mesh treats it as opaque TCP
             (shoal/meshprotocol.py decides, as the meshagent does)
    IST0101  a VirtualService route (or mirror) to a host that is no Service and no
             ServiceEntry host; or to a subset that no DestinationRule for that
             host defines (Istio accepts both, and the requests fail with 503);
             a VirtualService bound to a Gateway that does not exist; a Gateway
             whose selector matches no pod
    SHL0001  a DestinationRule subset that selects no pod of its host's Service

IST codes are Istio's for the same finding. Exit code: 0 when nothing is found;
79 (istioctl analyze's "analyzers found issues") when any finding is printed --
every finding is a Warning, and unlike istioctl's default ``--failure-threshold
Error``, a warning fails the check. ``-o json|yaml`` prints the findings as data.

``analyze`` is pure (objects in, findings out); ``run_mesh_check`` reads the
objects. References are resolved against every namespace; findings are only
reported for objects in the namespaces asked about.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.cli.session import Session
from shoal.manifests import dump_json, dump_yaml
from shoal.meshprotocol import port_protocol

# istioctl analyze's exit code when it reports issues at or above its threshold.
FOUND_ISSUES = 79

Output = Literal["", "json", "yaml"]


@dataclass(frozen=True)
class Finding:
    code: str
    kind: str
    namespace: str
    name: str
    message: str
    level: str = "Warning"

    def line(self) -> str:
        return f"{self.level} [{self.code}] ({self.kind} {self.namespace}/{self.name}) " \
               f"{self.message}"


@dataclass(frozen=True)
class MeshObjects:
    """What the analysis looks at (every namespace's, for resolving references)."""

    services: Sequence[core_pb2.Service] = ()
    pods: Sequence[core_pb2.Pod] = ()
    virtual_services: Sequence[traffic_pb2.VirtualService] = ()
    destination_rules: Sequence[traffic_pb2.DestinationRule] = ()
    service_entries: Sequence[traffic_pb2.ServiceEntry] = ()
    gateways: Sequence[traffic_pb2.Gateway] = ()


def service_key(host: str, namespace: str) -> tuple[str, str] | None:
    """The (namespace, name) of the Service a host names, as Istio reads hosts: a
    short name "web" (in ``namespace``) or "web.shop.svc[.<domain>]". None for
    any other host ("web.shop" included: Istio only expands names without dots)."""
    if "*" in host:
        return None
    parts = host.split(".")
    if len(parts) == 1:
        return namespace, parts[0]
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1], parts[0]
    return None


def _entry_has(hosts: Iterable[str], host: str) -> bool:
    """A ServiceEntry host equal to ``host``, or a wildcard one covering it."""
    return any(h == host or (h.startswith("*.") and host.endswith(h[1:])) for h in hosts)


def _ambiguous_ports(svc: core_pb2.Service) -> list[Finding]:
    found = []
    for port in svc.spec.ports:
        app = port.app_protocol if port.HasField("app_protocol") else None
        choice = port_protocol(name=port.name, app_protocol=app,
                               transport=port.protocol or "TCP")
        if not choice.ambiguous:
            continue
        if app:
            why = f"its appProtocol {app!r} is not a protocol Istio knows"
        elif port.name:
            why = f"its name {port.name!r} has no protocol prefix"
        else:
            why = "it has no name and no appProtocol"
        found.append(Finding(
            "IST0118", "Service", svc.metadata.namespace, svc.metadata.name,
            f"Port {port.port} declares no protocol ({why}): the mesh treats it as TCP. "
            "Name it http-*, http2-*, grpc-* or tcp-*, or set appProtocol."))
    return found


def _destinations(vs: traffic_pb2.VirtualService) -> Iterable[tuple[str, Any]]:
    for i, http in enumerate(vs.spec.http):
        for j, dest in enumerate(http.route):
            yield f"spec.http[{i}].route[{j}]", dest.destination
        if http.HasField("mirror"):
            yield f"spec.http[{i}].mirror", http.mirror
    for i, tcp in enumerate(vs.spec.tcp):
        for j, rd in enumerate(tcp.route):
            yield f"spec.tcp[{i}].route[{j}]", rd.destination


def _gateway_key(ref: str, namespace: str) -> tuple[str, str]:
    """A VirtualService's gateway reference: "<namespace>/<name>" or "<name>" (its own
    namespace)."""
    gw_ns, _, name = ref.rpartition("/")
    return gw_ns or namespace, name


def _gateway_findings(objects: MeshObjects, wanted: Any) -> list[Finding]:
    found = []
    gateways = {(g.metadata.namespace, g.metadata.name) for g in objects.gateways}
    for vs in objects.virtual_services:
        if not wanted(vs.metadata):
            continue
        for ref in vs.spec.gateways:
            if ref != "mesh" and _gateway_key(ref, vs.metadata.namespace) not in gateways:
                found.append(Finding("IST0101", "VirtualService", vs.metadata.namespace,
                                     vs.metadata.name,
                                     f"Referenced gateway not found: {ref!r}"))
    for gw in objects.gateways:
        selector = sorted(gw.spec.selector.items())
        if wanted(gw.metadata) and selector and not any(
                _matches(selector, p.metadata.labels) for p in objects.pods):
            labels = ",".join(f"{k}={v}" for k, v in selector)
            found.append(Finding("IST0101", "Gateway", gw.metadata.namespace, gw.metadata.name,
                                 f"Referenced selector not found: {labels!r} (no pod runs "
                                 "this gateway)"))
    return found


def _matches(selector: Iterable[tuple[str, str]], labels: Any) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def analyze(objects: MeshObjects, *, namespaces: frozenset[str] | None) -> list[Finding]:
    """Every finding about objects in ``namespaces`` (None: all), by object."""

    def wanted(meta: Any) -> bool:
        return namespaces is None or meta.namespace in namespaces

    services = {(s.metadata.namespace, s.metadata.name): s for s in objects.services}
    entry_hosts = sorted({h for se in objects.service_entries for h in se.spec.hosts})
    # Subsets defined per resolved host: a Service key, or the host as written.
    subsets: dict[object, set[str]] = {}
    for dr in objects.destination_rules:
        key = service_key(dr.spec.host, dr.metadata.namespace) or dr.spec.host
        subsets.setdefault(key, set()).update(s.name for s in dr.spec.subsets)

    found: list[Finding] = []
    for svc in objects.services:
        if wanted(svc.metadata):
            found += _ambiguous_ports(svc)
    for vs in objects.virtual_services:
        if not wanted(vs.metadata):
            continue
        ns, name = vs.metadata.namespace, vs.metadata.name
        for path, dest in _destinations(vs):
            svc_key = service_key(dest.host, ns)
            known = (svc_key in services or _entry_has(entry_hosts, dest.host)
                     or "*" in dest.host)
            if not known:
                found.append(Finding("IST0101", "VirtualService", ns, name,
                                     f"Referenced host not found: {dest.host!r} ({path}): "
                                     "no Service or ServiceEntry has it"))
                continue
            if dest.subset and dest.subset not in subsets.get(svc_key or dest.host, set()):
                found.append(Finding("IST0101", "VirtualService", ns, name,
                                     f"Referenced host+subset in destinationrule not found: "
                                     f"{dest.host!r} subset {dest.subset!r} ({path})"))
    for dr in objects.destination_rules:
        if not wanted(dr.metadata):
            continue
        svc_key = service_key(dr.spec.host, dr.metadata.namespace)
        target = services.get(svc_key) if svc_key else None
        if target is None or not target.spec.selector:
            continue
        backing = [p for p in objects.pods if p.metadata.namespace == target.metadata.namespace
                   and _matches(target.spec.selector.items(), p.metadata.labels)]
        for subset in dr.spec.subsets:
            if not any(_matches(subset.labels.items(), p.metadata.labels) for p in backing):
                labels = ",".join(f"{k}={v}" for k, v in sorted(subset.labels.items()))
                found.append(Finding(
                    "SHL0001", "DestinationRule", dr.metadata.namespace, dr.metadata.name,
                    f"Subset {subset.name!r} ({labels or 'no labels'}) selects no pod of "
                    f"Service {target.metadata.namespace}/{target.metadata.name}"))
    found += _gateway_findings(objects, wanted)
    # By object; each object's findings in the order of its fields.
    return sorted(found, key=lambda f: (f.namespace, f.kind, f.name))


def report(findings: Sequence[Finding], *, scope: str, output: Output) -> str:
    """What ``mesh check`` prints for these findings."""
    if output == "json":
        return dump_json([asdict(f) for f in findings]) + "\n"
    if output == "yaml":
        return dump_yaml([asdict(f) for f in findings])
    if not findings:
        return f"\u2714 No validation issues found when analyzing {scope}.\n"
    return "".join(f.line() + "\n" for f in findings)


async def run_mesh_check(session: Session, *, all_namespaces: bool, output: Output) -> int:
    client = session.client()
    objects = MeshObjects(
        services=(await client.list_all(core_pb2.Service, all_namespaces=True)).items,
        pods=(await client.list_all(core_pb2.Pod, all_namespaces=True)).items,
        virtual_services=(await client.list_all(traffic_pb2.VirtualService,
                                                all_namespaces=True)).items,
        destination_rules=(await client.list_all(traffic_pb2.DestinationRule,
                                                 all_namespaces=True)).items,
        service_entries=(await client.list_all(traffic_pb2.ServiceEntry,
                                               all_namespaces=True)).items,
        gateways=(await client.list_all(traffic_pb2.Gateway, all_namespaces=True)).items,
    )
    namespace = session.namespace
    findings = analyze(objects, namespaces=None if all_namespaces else frozenset({namespace}))
    scope = "all namespaces" if all_namespaces else f"namespace: {namespace}"
    session.out.write(report(findings, scope=scope, output=output))
    if findings and not output:
        session.warn(f"Error: Analyzers found issues when analyzing {scope}.")
    return FOUND_ISSUES if findings else 0
