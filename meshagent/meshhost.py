"""WorkloadEntries in the mesh, and the agent of a mesh-only host (pure helpers).

A WorkloadEntry is a workload that is not a pod: a process on a VM or a
bare-metal host. Istio's semantics:

- a Service's ``selector`` selects WorkloadEntries of its namespace (their
  ``spec.labels``) as well as pods: the agents route the Service's ports to
  the entries' addresses too, on the entry's port (``spec.ports``) for the
  targetPort's name, else for the Service port's name, else the Service's
  numeric targetPort, else its port (``entry_port``: the L4 routes and the L7
  clusters both use it);
- a ServiceEntry's ``workloadSelector`` makes matching entries its endpoints;
- an entry labelled ``shoal.dev/mesh-host: H`` is a meshed workload living on
  the mesh-only host H, with the identity
  ``spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccount or default>``:
  peers reach it through the mTLS tunnel to ``<address>:15008`` (H's agent),
  and H's agent gets its certificate (the node authorizer lets H sign only for
  the entries naming it). An entry without that label is a plain, unmeshed
  endpoint (plaintext).

``shoal-meshagent run --mesh-host`` runs the agent of such a host: no pods and
no node agent; its local workloads are the entries naming it; its capture is
:class:`meshagent.capture.HostCapture` (the host's own processes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from meshagent.routing import Address, Route
from shoal import meshnames
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.informer import key_of

MESH_HOST_LABEL = "shoal.dev/mesh-host"

WorkloadEntry = traffic_pb2.WorkloadEntry


def mesh_host_of(we: WorkloadEntry) -> str:
    return str(we.metadata.labels.get(MESH_HOST_LABEL, ""))


def service_account_of(we: WorkloadEntry) -> str:
    return str(we.spec.service_account or "default")


def workload_name_of(we: WorkloadEntry) -> str:
    return meshnames.workload_name(we.spec.labels, we.metadata.name)


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def entry_port(sp: core_pb2.ServicePort, we: WorkloadEntry) -> int:
    """The port of a WorkloadEntry a Service port goes to (pure): the entry's
    ``ports`` entry for the targetPort's name, else for the Service port's name,
    else the numeric targetPort, else the Service port."""
    kind = sp.target_port.WhichOneof("value")
    ports = we.spec.ports
    if kind == "str_val" and sp.target_port.str_val in ports:
        return int(ports[sp.target_port.str_val])
    if sp.name and sp.name in ports:
        return int(ports[sp.name])
    number = sp.target_port.int_val if kind == "int_val" else 0
    return int(number or sp.port)


def with_workload_entries(routes: Mapping[Address, Route],
                          services: Iterable[core_pb2.Service],
                          entries: Iterable[WorkloadEntry]) -> dict[Address, Route]:
    """``routes`` with every selected WorkloadEntry's address added to its
    Services' ports (pure)."""
    by_ns: dict[str, list[WorkloadEntry]] = {}
    for we in entries:
        if we.spec.address:
            by_ns.setdefault(we.metadata.namespace, []).append(we)
    out = dict(routes)
    for svc in services:
        chosen = [we for we in by_ns.get(svc.metadata.namespace, ())
                  if selects(svc.spec.selector, we.spec.labels)]
        if not chosen:
            continue
        for sp in svc.spec.ports:
            key = (svc.spec.cluster_ip, int(sp.port))
            route = out.get(key)
            if route is None or route.service != key_of(svc):
                continue
            extra = {(we.spec.address, entry_port(sp, we)) for we in chosen}
            out[key] = replace(route, endpoints=tuple(sorted(set(route.endpoints) | extra)))
    return out
