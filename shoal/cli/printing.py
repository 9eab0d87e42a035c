"""Tables as ``kubectl get`` prints them: pure functions of objects and a clock.

``table_for(kind, objects, now=...)`` gives a :class:`Table` with kubectl's
columns for that kind (``-o wide`` adds its extra columns, ``-A`` a NAMESPACE
column first); ``render_table`` lays it out the way kubectl's tabwriter does
(each column as wide as its widest cell plus three spaces, at least six).

The cell helpers (``format_age``, ``pod_summary``, ``node_status``,
``service_external_ip``, ``endpoints_summary``...) follow kubectl's printers
in ``pkg/printers/internalversion/printers.go``, so a kubectl user reads the
same words: ``CrashLoopBackOff``, ``Init:0/1``, ``Terminating``, ``<none>``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from shoal.kinds import Kind

NONE = "<none>"
UNKNOWN = "<unknown>"
_PADDING = 3
_MIN_WIDTH = 6

Cells = tuple[str, ...]
RowFn = Callable[[Any, float], Cells]


# --------------------------------------------------------------------------- time


def seconds_of(ts: timestamp_pb2.Timestamp) -> float | None:
    """A timestamp as epoch seconds; None when it is unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.seconds + ts.nanos / 1e9


def format_age(seconds: float) -> str:
    """kubectl's HumanDuration: 5s, 3m12s, 15m, 4h, 4h30m, 2d, 3d4h, 2y."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        years, days = hours // 24 // 365, (hours // 24) % 365
        return f"{years}y" if days == 0 else f"{years}y{days}d"
    return f"{hours // 24 // 365}y"


def age(ts: timestamp_pb2.Timestamp, now: float) -> str:
    """Time since ``ts``, or ``<unknown>`` when it is unset."""
    when = seconds_of(ts)
    return UNKNOWN if when is None else format_age(now - when)


# --------------------------------------------------------------------------- names


def kind_label(kind: Kind) -> str:
    """'pod', 'deployment.apps', 'lease.coordination.k8s.io'."""
    return f"{kind.singular}.{kind.group}" if kind.group else kind.singular


def resource_name(kind: Kind, name: str) -> str:
    """The ``-o name`` form: ``pod/web-0``, ``deployment.apps/web``."""
    return f"{kind_label(kind)}/{name}"


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or NONE


# --------------------------------------------------------------------------- pods


@dataclass(frozen=True)
class PodSummary:
    """READY, STATUS and RESTARTS of a pod row."""

    ready: str
    status: str
    restarts: str


def _restartable(init_containers: Sequence[Any], name: str) -> bool:
    for c in init_containers:
        if c.name == name:
            return bool(c.HasField("restart_policy") and c.restart_policy == "Always")
    return False


def _has_condition(conditions: Iterable[Any], type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in conditions)


def _terminated_reason(t: Any, prefix: str = "") -> str:
    if t.reason:
        return f"{prefix}{t.reason}"
    if t.signal:
        return f"{prefix}Signal:{t.signal}"
    return f"{prefix}ExitCode:{t.exit_code}"


def pod_summary(pod: Any, now: float) -> PodSummary:
    """READY, STATUS and RESTARTS as kubectl computes them."""
    spec, status = pod.spec, pod.status
    restarts = 0
    restartable_restarts = 0
    total = len(spec.containers)
    ready = 0
    last_restart = 0.0
    last_restartable_restart = 0.0
    reason = status.reason or status.phase
    for cond in status.conditions:
        if cond.type == "PodScheduled" and cond.reason == "SchedulingGated":
            reason = "SchedulingGated"
    total += sum(1 for c in spec.init_containers
                 if c.HasField("restart_policy") and c.restart_policy == "Always")

    initializing = False
    for i, cs in enumerate(status.init_container_statuses):
        restarts += cs.restart_count
        finished = (seconds_of(cs.last_state.terminated.finished_at) or 0.0
                    if cs.last_state.HasField("terminated") else 0.0)
        last_restart = max(last_restart, finished)
        sidecar = _restartable(spec.init_containers, cs.name)
        if sidecar:
            restartable_restarts += cs.restart_count
            last_restartable_restart = max(last_restartable_restart, finished)
        state = cs.state
        if state.HasField("terminated") and state.terminated.exit_code == 0:
            continue
        if sidecar and cs.HasField("started") and cs.started:
            if cs.ready:
                ready += 1
            continue
        if state.HasField("terminated"):
            reason = _terminated_reason(state.terminated, "Init:")
        elif (state.HasField("waiting") and state.waiting.reason
              and state.waiting.reason != "PodInitializing"):
            reason = "Init:" + state.waiting.reason
        else:
            reason = f"Init:{i}/{len(spec.init_containers)}"
        initializing = True
        break

    if not initializing or _has_condition(status.conditions, "Initialized"):
        restarts = restartable_restarts
        last_restart = last_restartable_restart
        has_running = False
        for cs in reversed(status.container_statuses):
            restarts += cs.restart_count
            if cs.last_state.HasField("terminated"):
                finished = seconds_of(cs.last_state.terminated.finished_at) or 0.0
                last_restart = max(last_restart, finished)
            state = cs.state
            if state.HasField("waiting") and state.waiting.reason:
                reason = state.waiting.reason
            elif state.HasField("terminated"):
                reason = _terminated_reason(state.terminated)
            elif cs.ready and state.HasField("running"):
                has_running = True
                ready += 1
        if reason == "Completed" and has_running:
            reason = "Running" if _has_condition(status.conditions, "Ready") else "NotReady"

    if pod.metadata.HasField("deletion_timestamp"):
        if status.reason == "NodeLost":
            reason = "Unknown"
        elif status.phase not in ("Succeeded", "Failed"):
            reason = "Terminating"

    restarts_text = str(restarts)
    if restarts and last_restart:
        restarts_text = f"{restarts} ({format_age(now - last_restart)} ago)"
    return PodSummary(ready=f"{ready}/{total}", status=reason, restarts=restarts_text)


def _pod_row(pod: Any, now: float) -> Cells:
    s = pod_summary(pod, now)
    return (pod.metadata.name, s.ready, s.status, s.restarts, age(pod.metadata.creation_timestamp,
                                                                 now))


def _pod_wide(pod: Any, now: float) -> Cells:
    ip = pod.status.pod_ips[0].ip if pod.status.pod_ips else pod.status.pod_ip
    gates = NONE
    if pod.spec.readiness_gates:
        wanted = [g.condition_type for g in pod.spec.readiness_gates]
        true = {c.type for c in pod.status.conditions if c.status == "True"}
        gates = f"{sum(1 for g in wanted if g in true)}/{len(wanted)}"
    return (ip or NONE, pod.spec.node_name or NONE, pod.status.nominated_node_name or NONE,
            gates)


# --------------------------------------------------------------------------- nodes


def node_status(node: Any) -> str:
    """Ready / NotReady / Unknown, plus SchedulingDisabled when cordoned."""
    parts = []
    for cond in node.status.conditions:
        if cond.type == "Ready":
            parts = ["Ready" if cond.status == "True" else "NotReady"]
    if not parts:
        parts = ["Unknown"]
    if node.spec.unschedulable:
        parts.append("SchedulingDisabled")
    return ",".join(parts)


def node_roles(labels: Mapping[str, str]) -> str:
    roles = set()
    for key, value in labels.items():
        if key.startswith("node-role.kubernetes.io/"):
            role = key.removeprefix("node-role.kubernetes.io/")
            if role:
                roles.add(role)
        elif key == "kubernetes.io/role" and value:
            roles.add(value)
    return ",".join(sorted(roles)) or NONE


def _node_address(node: Any, type_: str) -> str:
    for a in node.status.addresses:
        if a.type == type_:
            return str(a.address)
    return NONE


def _node_row(node: Any, now: float) -> Cells:
    return (node.metadata.name, node_status(node), node_roles(node.metadata.labels),
            age(node.metadata.creation_timestamp, now), node.status.node_info.kubelet_version)


def _node_wide(node: Any, now: float) -> Cells:
    info = node.status.node_info
    return (_node_address(node, "InternalIP"), _node_address(node, "ExternalIP"),
            info.os_image or UNKNOWN, info.kernel_version or UNKNOWN,
            info.container_runtime_version or UNKNOWN)


# --------------------------------------------------------------------------- services


def service_external_ip(svc: Any) -> str:
    spec = svc.spec
    kind = spec.type or "ClusterIP"
    if kind in ("ClusterIP", "NodePort"):
        return ",".join(spec.external_ips) or NONE
    if kind == "LoadBalancer":
        found = [i.ip or i.hostname for i in svc.status.load_balancer.ingress
                 if i.ip or i.hostname]
        found += list(spec.external_ips)
        return ",".join(found) or "<pending>"
    if kind == "ExternalName":
        return str(spec.external_name)
    return UNKNOWN


def service_ports(svc: Any) -> str:
    parts = []
    for p in svc.spec.ports:
        proto = p.protocol or "TCP"
        if p.node_port:
            parts.append(f"{p.port}:{p.node_port}/{proto}")
        else:
            parts.append(f"{p.port}/{proto}")
    return ",".join(parts) or NONE


def _service_row(svc: Any, now: float) -> Cells:
    return (svc.metadata.name, svc.spec.type or "ClusterIP", svc.spec.cluster_ip or NONE,
            service_external_ip(svc), service_ports(svc),
            age(svc.metadata.creation_timestamp, now))


def _service_wide(svc: Any, now: float) -> Cells:
    return (labels_text(svc.spec.selector),)


def endpoints_summary(ep: Any, limit: int = 3) -> str:
    """'10.0.0.1:80,10.0.0.2:80 + 3 more...' as kubectl shows it."""
    shown: list[str] = []
    count = 0
    for subset in ep.subsets:
        if not subset.ports:
            count += len(subset.addresses)
            shown.extend(a.ip for a in subset.addresses)
            continue
        for port in subset.ports:
            count += len(subset.addresses)
            for a in subset.addresses:
                host = f"[{a.ip}]" if ":" in a.ip else a.ip
                shown.append(f"{host}:{port.port}")
    if not shown:
        return NONE
    text = ",".join(shown[:limit])
    return f"{text} + {count - limit} more..." if count > limit else text


def _endpoints_row(ep: Any, now: float) -> Cells:
    return (ep.metadata.name, endpoints_summary(ep), age(ep.metadata.creation_timestamp, now))


# --------------------------------------------------------------------------- workloads


def _replicas(spec: Any) -> int:
    """spec.replicas, which Kubernetes defaults to 1 when it is unset."""
    return int(spec.replicas) if spec.HasField("replicas") else 1


def _template_wide(obj: Any, *, selector: bool = True) -> Cells:
    containers = obj.spec.template.spec.containers
    cells: Cells = (",".join(c.name for c in containers) or NONE,
                    ",".join(c.image for c in containers) or NONE)
    if selector:
        cells += (label_selector_text(obj.spec.selector),)
    return cells


def label_selector_text(sel: Any) -> str:
    """A LabelSelector message as selector text: 'app=web,tier in (a,b)'."""
    parts = [f"{k}={v}" for k, v in sorted(sel.match_labels.items())]
    for e in sel.match_expressions:
        if e.operator == "Exists":
            parts.append(e.key)
        elif e.operator == "DoesNotExist":
            parts.append(f"!{e.key}")
        else:
            parts.append(f"{e.key} {e.operator.lower()} ({','.join(e.values)})")
    return ",".join(parts) or NONE


def _deployment_row(d: Any, now: float) -> Cells:
    st = d.status
    return (d.metadata.name, f"{st.ready_replicas}/{_replicas(d.spec)}",
            str(st.updated_replicas), str(st.available_replicas),
            age(d.metadata.creation_timestamp, now))


def _hpa_current(spec: Any, status: Any) -> str:
    if status is None:
        return "<unknown>"
    if spec.type == "Resource":
        cur = status.resource.current
        if spec.resource.target.type == "Utilization":
            return f"{cur.average_utilization}%" if cur.HasField("average_utilization") \
                else "<unknown>"
        return cur.average_value.value or "<unknown>"
    return status.pods.current.average_value.value or "<unknown>"


def _hpa_target(spec: Any) -> str:
    t = spec.resource.target if spec.type == "Resource" else spec.pods.target
    if t.type == "Utilization":
        return f"{t.average_utilization}%"
    return str(t.average_value.value if t.type == "AverageValue" else t.value.value)


def hpa_targets(hpa: Any) -> str:
    """kubectl's TARGETS: 'cpu: 45%/50%', per metric; '<none>' without metrics."""
    specs, current = list(hpa.spec.metrics), list(hpa.status.current_metrics)
    parts = []
    for i, m in enumerate(specs[:2]):
        name = m.resource.name if m.type == "Resource" else m.pods.metric.name
        cur = current[i] if len(current) == len(specs) else None
        parts.append(f"{name}: {_hpa_current(m, cur)}/{_hpa_target(m)}")
    if len(specs) > 2:
        parts.append(f"+ {len(specs) - 2} more...")
    return ", ".join(parts) or NONE


def _hpa_row(hpa: Any, now: float) -> Cells:
    ref = hpa.spec.scale_target_ref
    low = hpa.spec.min_replicas if hpa.spec.HasField("min_replicas") else 1
    return (hpa.metadata.name, f"{ref.kind}/{ref.name}", hpa_targets(hpa), str(low),
            str(hpa.spec.max_replicas), str(hpa.status.current_replicas),
            age(hpa.metadata.creation_timestamp, now))


def _replicaset_row(rs: Any, now: float) -> Cells:
    return (rs.metadata.name, str(_replicas(rs.spec)), str(rs.status.replicas),
            str(rs.status.ready_replicas), age(rs.metadata.creation_timestamp, now))


def _statefulset_row(s: Any, now: float) -> Cells:
    return (s.metadata.name, f"{s.status.ready_replicas}/{_replicas(s.spec)}",
            age(s.metadata.creation_timestamp, now))


def _daemonset_row(d: Any, now: float) -> Cells:
    st = d.status
    return (d.metadata.name, str(st.desired_number_scheduled),
            str(st.current_number_scheduled), str(st.number_ready),
            str(st.updated_number_scheduled), str(st.number_available),
            labels_text(d.spec.template.spec.node_selector),
            age(d.metadata.creation_timestamp, now))


def _controller_of(meta: Any) -> str:
    for ref in meta.owner_references:
        if ref.HasField("controller") and ref.controller:
            group = ref.api_version.split("/")[0] if "/" in ref.api_version else ""
            kind = f"{ref.kind.lower()}.{group}" if group else ref.kind.lower()
            return f"{kind}/{ref.name}"
    return NONE


def _revision_row(r: Any, now: float) -> Cells:
    return (r.metadata.name, _controller_of(r.metadata), str(r.revision),
            age(r.metadata.creation_timestamp, now))


# --------------------------------------------------------------------------- config, misc


def _namespace_row(ns: Any, now: float) -> Cells:
    return (ns.metadata.name, ns.status.phase or "Active", age(ns.metadata.creation_timestamp, now))


def _configmap_row(cm: Any, now: float) -> Cells:
    return (cm.metadata.name, str(len(cm.data) + len(cm.binary_data)),
            age(cm.metadata.creation_timestamp, now))


def _secret_row(s: Any, now: float) -> Cells:
    keys = set(s.data) | set(s.string_data)
    return (s.metadata.name, s.type or "Opaque", str(len(keys)),
            age(s.metadata.creation_timestamp, now))


def _serviceaccount_row(sa: Any, now: float) -> Cells:
    return (sa.metadata.name, str(len(sa.secrets)), age(sa.metadata.creation_timestamp, now))


def _lease_row(lease: Any, now: float) -> Cells:
    holder = lease.spec.holder_identity if lease.spec.HasField("holder_identity") else ""
    return (lease.metadata.name, holder or NONE, age(lease.metadata.creation_timestamp, now))


def _peer_authentication_row(pa: Any, now: float) -> Cells:
    return (pa.metadata.name, pa.spec.mtls.mode or NONE, age(pa.metadata.creation_timestamp, now))


def _network_policy_row(np: Any, now: float) -> Cells:
    return (np.metadata.name, label_selector_text(np.spec.pod_selector),
            age(np.metadata.creation_timestamp, now))


def _authorization_policy_row(ap: Any, now: float) -> Cells:
    return (ap.metadata.name, ap.spec.action or "ALLOW", age(ap.metadata.creation_timestamp, now))


def _json_list(values: Sequence[str]) -> str:
    """A list column as kubectl prints a CRD's printer column: ``["a","b"]``, or blank."""
    return json.dumps(list(values), separators=(",", ":")) if values else ""


def _virtual_service_row(vs: Any, now: float) -> Cells:
    return (vs.metadata.name, _json_list(vs.spec.gateways), _json_list(vs.spec.hosts),
            age(vs.metadata.creation_timestamp, now))


def _destination_rule_row(dr: Any, now: float) -> Cells:
    return (dr.metadata.name, dr.spec.host, age(dr.metadata.creation_timestamp, now))


def _service_entry_row(se: Any, now: float) -> Cells:
    return (se.metadata.name, _json_list(se.spec.hosts), se.spec.location, se.spec.resolution,
            age(se.metadata.creation_timestamp, now))


def _created_at(obj: Any, now: float) -> Cells:
    ts = seconds_of(obj.metadata.creation_timestamp)
    when = (dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if ts is not None else UNKNOWN)
    return (obj.metadata.name, when)


def _binding_row(b: Any, now: float) -> Cells:
    return (b.metadata.name, f"{b.role_ref.kind}/{b.role_ref.name}",
            age(b.metadata.creation_timestamp, now))


def _binding_wide(b: Any, now: float) -> Cells:
    def of(kind: str) -> str:
        names = [f"{s.namespace}/{s.name}" if kind == "ServiceAccount" else s.name
                 for s in b.subjects if s.kind == kind]
        return ", ".join(names)

    return (of("User"), of("Group"), of("ServiceAccount"))


def _generic_row(obj: Any, now: float) -> Cells:
    return (obj.metadata.name, age(obj.metadata.creation_timestamp, now))


# --------------------------------------------------------------------------- events


def event_time(ev: Any) -> float:
    """When an event last happened (for sorting): lastTimestamp, eventTime, creation."""
    for ts in (ev.last_timestamp, ev.event_time, ev.series.last_observed_time,
               ev.first_timestamp, ev.metadata.creation_timestamp):
        when = seconds_of(ts)
        if when is not None:
            return when
    return 0.0


def event_count(ev: Any) -> int:
    if ev.HasField("series") and ev.series.count:
        return int(ev.series.count)
    return int(ev.count) or 1


def event_last_seen(ev: Any, now: float) -> str:
    """'5s', or '5s (x3 over 2m)' for a repeated event."""
    last = format_age(now - event_time(ev)) if event_time(ev) else UNKNOWN
    count = event_count(ev)
    if count > 1:
        first = (seconds_of(ev.first_timestamp) or seconds_of(ev.event_time)
                 or seconds_of(ev.metadata.creation_timestamp))
        if first is not None:
            return f"{last} (x{count} over {format_age(now - first)})"
    return last


def event_source(ev: Any) -> str:
    if ev.source.component:
        return ", ".join(x for x in (ev.source.component, ev.source.host) if x)
    return str(ev.reporting_component)


def _involved(ev: Any) -> str:
    o = ev.involved_object
    return f"{o.kind.lower()}/{o.name}"


def _event_row(ev: Any, now: float) -> Cells:
    return (event_last_seen(ev, now), ev.type, ev.reason, _involved(ev), ev.message)


def _event_wide(ev: Any, now: float) -> Cells:
    first = seconds_of(ev.first_timestamp) or seconds_of(ev.event_time)
    return (ev.involved_object.field_path, event_source(ev),
            format_age(now - first) if first is not None else UNKNOWN,
            str(event_count(ev)), ev.metadata.name)


# --------------------------------------------------------------------------- tables


def _no_wide(obj: Any, now: float) -> Cells:
    return ()


@dataclass(frozen=True)
class Printer:
    """Columns of one kind: the plain ones, and what ``-o wide`` adds."""

    headers: Cells
    row: RowFn
    _: KW_ONLY
    wide_headers: Cells = ()
    wide_row: RowFn = _no_wide
    # Index of the NAME column (None for events, which have none).
    name_column: int | None = 0


def printer_for(kind: Kind) -> Printer:
    """kubectl's columns for a kind; NAME and AGE for kinds it has no printer for."""
    workload_wide = ("CONTAINERS", "IMAGES", "SELECTOR")
    match kind.kind:
        case "Pod":
            return Printer(("NAME", "READY", "STATUS", "RESTARTS", "AGE"), _pod_row,
                           wide_headers=("IP", "NODE", "NOMINATED NODE", "READINESS GATES"),
                           wide_row=_pod_wide)
        case "Node":
            return Printer(("NAME", "STATUS", "ROLES", "AGE", "VERSION"), _node_row,
                           wide_headers=("INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE",
                                         "KERNEL-VERSION", "CONTAINER-RUNTIME"),
                           wide_row=_node_wide)
        case "Service":
            return Printer(("NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"),
                           _service_row, wide_headers=("SELECTOR",), wide_row=_service_wide)
        case "Deployment":
            return Printer(("NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"),
                           _deployment_row, wide_headers=workload_wide,
                           wide_row=lambda o, now: _template_wide(o))
        case "ReplicaSet":
            return Printer(("NAME", "DESIRED", "CURRENT", "READY", "AGE"), _replicaset_row,
                           wide_headers=workload_wide, wide_row=lambda o, now: _template_wide(o))
        case "StatefulSet":
            return Printer(("NAME", "READY", "AGE"), _statefulset_row,
                           wide_headers=("CONTAINERS", "IMAGES"),
                           wide_row=lambda o, now: _template_wide(o, selector=False))
        case "DaemonSet":
            return Printer(("NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE",
                            "NODE SELECTOR", "AGE"), _daemonset_row, wide_headers=workload_wide,
                           wide_row=lambda o, now: _template_wide(o))
        case "Namespace":
            return Printer(("NAME", "STATUS", "AGE"), _namespace_row)
        case "ConfigMap":
            return Printer(("NAME", "DATA", "AGE"), _configmap_row)
        case "Secret":
            return Printer(("NAME", "TYPE", "DATA", "AGE"), _secret_row)
        case "ServiceAccount":
            return Printer(("NAME", "SECRETS", "AGE"), _serviceaccount_row)
        case "Endpoints":
            return Printer(("NAME", "ENDPOINTS", "AGE"), _endpoints_row)
        case "Event":
            return Printer(("LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"), _event_row,
                           wide_headers=("SUBOBJECT", "SOURCE", "FIRST SEEN", "COUNT", "NAME"),
                           wide_row=_event_wide, name_column=None)
        case "Lease":
            return Printer(("NAME", "HOLDER", "AGE"), _lease_row)
        case "HorizontalPodAutoscaler":
            return Printer(("NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS", "REPLICAS",
                            "AGE"), _hpa_row)
        case "ControllerRevision":
            return Printer(("NAME", "CONTROLLER", "REVISION", "AGE"), _revision_row)
        case "PeerAuthentication":
            return Printer(("NAME", "MODE", "AGE"), _peer_authentication_row)
        case "AuthorizationPolicy":
            return Printer(("NAME", "ACTION", "AGE"), _authorization_policy_row)
        case "NetworkPolicy":
            return Printer(("NAME", "POD-SELECTOR", "AGE"), _network_policy_row)
        # Istio's CRDs' printer columns (Gateway has only NAME and AGE).
        case "VirtualService":
            return Printer(("NAME", "GATEWAYS", "HOSTS", "AGE"), _virtual_service_row)
        case "DestinationRule":
            return Printer(("NAME", "HOST", "AGE"), _destination_rule_row)
        case "ServiceEntry":
            return Printer(("NAME", "HOSTS", "LOCATION", "RESOLUTION", "AGE"),
                           _service_entry_row)
        case "Role" | "ClusterRole":
            return Printer(("NAME", "CREATED AT"), _created_at)
        case "RoleBinding" | "ClusterRoleBinding":
            return Printer(("NAME", "ROLE", "AGE"), _binding_row,
                           wide_headers=("USERS", "GROUPS", "SERVICEACCOUNTS"),
                           wide_row=_binding_wide)
        case _:
            return Printer(("NAME", "AGE"), _generic_row)


@dataclass(frozen=True)
class Table:
    headers: Cells
    rows: tuple[Cells, ...]


@dataclass(frozen=True)
class TableOptions:
    wide: bool = False
    # A NAMESPACE column first (``-A``), for namespaced kinds.
    namespace_column: bool = False
    # Names as 'deployment.apps/web', when several kinds are printed together.
    qualify_names: bool = False
    # A LABELS column last (``--show-labels``).
    show_labels: bool = False


def table_headers(kind: Kind, options: TableOptions) -> Cells:
    p = printer_for(kind)
    headers = p.headers + (p.wide_headers if options.wide else ())
    if options.namespace_column and kind.namespaced:
        headers = ("NAMESPACE", *headers)
    if options.show_labels:
        headers = (*headers, "LABELS")
    return headers


def table_row(kind: Kind, obj: Any, *, now: float, options: TableOptions) -> Cells:
    """One object's row (used for each event of ``get -w``)."""
    p = printer_for(kind)
    cells = p.row(obj, now)
    if options.qualify_names and p.name_column is not None:
        i = p.name_column
        cells = (*cells[:i], resource_name(kind, cells[i]), *cells[i + 1:])
    if options.wide:
        cells += p.wide_row(obj, now)
    if options.namespace_column and kind.namespaced:
        cells = (obj.metadata.namespace, *cells)
    if options.show_labels:
        cells = (*cells, labels_text(obj.metadata.labels))
    return cells


def table_for(kind: Kind, objects: Iterable[Any], *, now: float,
              options: TableOptions | None = None) -> Table:
    """The table ``shoal get`` prints for these objects (events sorted by time)."""
    opts = options or TableOptions()
    items = list(objects)
    if kind.kind == "Event":
        items.sort(key=event_time)
    rows = tuple(table_row(kind, o, now=now, options=opts) for o in items)
    return Table(headers=table_headers(kind, opts), rows=rows)


def column_widths(rows: Iterable[Cells], *, padding: int = _PADDING,
                  min_width: int = _MIN_WIDTH) -> list[int]:
    widths: list[int] = []
    for row in rows:
        for i, cell in enumerate(row):
            w = max(len(cell) + padding, min_width)
            if i == len(widths):
                widths.append(w)
            elif w > widths[i]:
                widths[i] = w
    return widths


def format_row(cells: Cells, widths: Sequence[int]) -> str:
    """Cells padded to the widths; the last cell is not padded."""
    if not cells:
        return ""
    parts = [cell.ljust(widths[i]) if i < len(widths) else cell + "   "
             for i, cell in enumerate(cells[:-1])]
    return ("".join(parts) + cells[-1]).rstrip()


def render_table(table: Table, *, headers: bool = True) -> str:
    """The table as text, kubectl's layout; ends with a newline when not empty."""
    lines: list[Cells] = [table.headers] if headers else []
    lines.extend(table.rows)
    widths = column_widths(lines)
    return "".join(format_row(cells, widths) + "\n" for cells in lines)
