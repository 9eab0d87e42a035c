"""``shoal describe``: one readable page per object, and the events about it.

The page (``describe(...)``, pure) starts with Name, Namespace, Labels,
Annotations and Created, then a section per kind:

- Pod: Node, Start Time, Status, IP, Controlled By, (Init) Containers with image,
  ports, state, last state, ready, restarts, resources, env and mounts,
  Conditions, Volumes, QoS Class, Node-Selectors, Tolerations;
- Deployment: Selector, Replicas, StrategyType, RollingUpdateStrategy, Pod
  Template, Conditions;
- Service: Selector, Type, IP, IPs, then each port with its target and endpoints;
- Secret: Type and the size of each value (never the values);
- any other kind: its fields as YAML, indented.

It ends with ``Events:``, the Events whose involvedObject is this object
(sorted by time), or ``Events: <none>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from shoal import autoscaling
from shoal.api.core.v1 import core_pb2
from shoal.cli.fetching import fetch_targets, get_or_none
from shoal.cli.getting import check_selectors, no_resources_message
from shoal.cli.printing import (
    NONE,
    column_widths,
    endpoints_summary,
    event_last_seen,
    event_source,
    event_time,
    format_age,
    format_row,
    label_selector_text,
    seconds_of,
)
from shoal.cli.session import Session
from shoal.cli.targets import parse_targets
from shoal.kinds import Kind, KindTable
from shoal.manifests import dump_yaml, encode, format_time

Pairs = Sequence[tuple[str, str | Sequence[str]]]


# --------------------------------------------------------------------------- layout


def pairs(rows: Pairs, *, indent: int = 0) -> list[str]:
    """'Key:  value' lines with values aligned; a list value continues below."""
    if not rows:
        return []
    width = max(len(k) for k, _ in rows) + 3
    pad = " " * indent
    out: list[str] = []
    for key, value in rows:
        values = [value] if isinstance(value, str) else list(value)
        values = values or [NONE]
        out.append((pad + f"{key}:".ljust(width) + values[0]).rstrip())
        out.extend(pad + " " * width + v for v in values[1:])
    return out


def small_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
                indent: int = 2) -> list[str]:
    """A describe table: headers, a dashed rule, rows; two spaces between columns."""
    lines = [tuple(headers), tuple("-" * len(h) for h in headers), *map(tuple, rows)]
    widths = column_widths(lines, padding=2, min_width=0)
    return [" " * indent + format_row(cells, widths) for cells in lines]


def map_lines(values: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in sorted(values.items())]


def when(ts: timestamp_pb2.Timestamp, now: float) -> str:
    """'2024-05-01T10:00:00Z (5m ago)', or <none> when unset."""
    t = seconds_of(ts)
    if t is None:
        return NONE
    return f"{format_time(ts)} ({format_age(now - t)} ago)"


# --------------------------------------------------------------------------- sections


def header(kind: Kind, obj: Any, *, now: float) -> list[str]:
    meta = obj.metadata
    rows: list[tuple[str, str | Sequence[str]]] = [("Name", meta.name)]
    if kind.namespaced:
        rows.append(("Namespace", meta.namespace))
    rows += [("Labels", map_lines(meta.labels)),
             ("Annotations", map_lines(meta.annotations)),
             ("Created", when(meta.creation_timestamp, now))]
    if meta.HasField("deletion_timestamp"):
        rows.append(("Deleting Since", when(meta.deletion_timestamp, now)))
    if meta.finalizers:
        rows.append(("Finalizers", ", ".join(meta.finalizers)))
    return pairs(rows)


def _controlled_by(meta: Any) -> str:
    for ref in meta.owner_references:
        if ref.HasField("controller") and ref.controller:
            return f"{ref.kind}/{ref.name}"
    return ""


def container_state(state: Any, now: float, *, indent: int) -> tuple[str, list[str]]:
    """The state word and its detail lines ('Started: ...', 'Exit Code: 1')."""
    if state.HasField("running"):
        return "Running", pairs([("Started", when(state.running.started_at, now))],
                                indent=indent)
    if state.HasField("terminated"):
        t = state.terminated
        rows: list[tuple[str, str | Sequence[str]]] = []
        if t.reason:
            rows.append(("Reason", t.reason))
        if t.message:
            rows.append(("Message", t.message))
        rows.append(("Exit Code", str(t.exit_code)))
        if t.signal:
            rows.append(("Signal", str(t.signal)))
        rows += [("Started", when(t.started_at, now)), ("Finished", when(t.finished_at, now))]
        return "Terminated", pairs(rows, indent=indent)
    if state.HasField("waiting") and state.waiting.reason:
        rows = [("Reason", state.waiting.reason)]
        if state.waiting.message:
            rows.append(("Message", state.waiting.message))
        return "Waiting", pairs(rows, indent=indent)
    return "Waiting", []


def _resources(resources: Any) -> list[tuple[str, str | Sequence[str]]]:
    rows: list[tuple[str, str | Sequence[str]]] = []
    for label, values in (("Limits", resources.limits), ("Requests", resources.requests)):
        if values:
            rows.append((label, [f"{k}: {q.value}" for k, q in sorted(values.items())]))
    return rows


def _env(container: Any) -> list[str]:
    out = []
    for e in container.env:
        if e.HasField("value_from"):
            src = e.value_from
            if src.HasField("config_map_key_ref"):
                ref = src.config_map_key_ref
                out.append(f"{e.name}: <set to the key '{ref.key}' of config map '{ref.name}'>")
            elif src.HasField("secret_key_ref"):
                ref = src.secret_key_ref
                out.append(f"{e.name}: <set to the key '{ref.key}' in secret '{ref.name}'>")
            elif src.HasField("field_ref"):
                out.append(f"{e.name}:  ({src.field_ref.api_version or 'v1'}:"
                           f"{src.field_ref.field_path})")
            else:
                out.append(f"{e.name}: <set from a resource>")
        else:
            out.append(f"{e.name}: {e.value}")
    for src in container.env_from:
        name = src.config_map_ref.name or src.secret_ref.name
        what = "ConfigMap" if src.HasField("config_map_ref") else "Secret"
        out.append(f"{name} {what} Optional: false")
    return out


def container_lines(container: Any, status: Any | None, *, now: float,
                    indent: int = 2) -> list[str]:
    """One container of a pod (or a template, when status is None)."""
    lines = [" " * indent + f"{container.name}:"]
    inner = indent + 2
    rows: list[tuple[str, str | Sequence[str]]] = []
    if status is not None and status.container_id:
        rows.append(("Container ID", status.container_id))
    rows.append(("Image", container.image))
    if status is not None and status.image_id:
        rows.append(("Image ID", status.image_id))
    ports = [f"{p.container_port}/{p.protocol or 'TCP'}" + (f" ({p.name})" if p.name else "")
             for p in container.ports]
    rows.append(("Ports" if len(ports) > 1 else "Port", ports or [NONE]))
    if container.command:
        rows.append(("Command", list(container.command)))
    if container.args:
        rows.append(("Args", list(container.args)))
    lines += pairs(rows, indent=inner)
    if status is not None:
        state, detail = container_state(status.state, now, indent=inner + 2)
        lines += pairs([("State", state)], indent=inner) + detail
        if status.last_state.HasField("terminated") or status.last_state.HasField("running"):
            last, detail = container_state(status.last_state, now, indent=inner + 2)
            lines += pairs([("Last State", last)], indent=inner) + detail
        lines += pairs([("Ready", "True" if status.ready else "False"),
                        ("Restart Count", str(status.restart_count))], indent=inner)
    tail = _resources(container.resources)
    tail += [("Environment", _env(container) or [NONE]),
             ("Mounts", [f"{m.mount_path} from {m.name} ({'ro' if m.read_only else 'rw'})"
                         for m in container.volume_mounts] or [NONE])]
    lines += pairs(tail, indent=inner)
    return lines


def volume_lines(volumes: Sequence[Any], *, indent: int = 2) -> list[str]:
    if not volumes:
        return []
    out = []
    for v in volumes:
        out.append(" " * indent + f"{v.name}:")
        source = next((fd.name for fd, _ in v.ListFields() if fd.name != "name"), "")
        detail = ""
        if source == "config_map":
            detail = f"ConfigMap (a volume populated by a ConfigMap)  Name: {v.config_map.name}"
        elif source == "secret":
            detail = f"Secret (a volume populated by a Secret)  SecretName: {v.secret.secret_name}"
        elif source == "empty_dir":
            detail = "EmptyDir (a temporary directory that shares a pod's lifetime)"
        elif source == "host_path":
            detail = f"HostPath (bare host directory volume)  Path: {v.host_path.path}"
        elif source == "persistent_volume_claim":
            detail = ("PersistentVolumeClaim  ClaimName: "
                      f"{v.persistent_volume_claim.claim_name}")
        else:
            detail = "".join(p.capitalize() for p in source.split("_")) or NONE
        out.append(" " * (indent + 2) + f"Type: {detail}")
    return out


def conditions_lines(conditions: Sequence[Any], *, with_reason: bool = False) -> list[str]:
    if not conditions:
        return []
    headers = ["Type", "Status"] + (["Reason"] if with_reason else [])
    rows = [[c.type, c.status] + ([c.reason] if with_reason else []) for c in conditions]
    return small_table(headers, rows)


def describe_pod(pod: Any, *, now: float) -> list[str]:
    spec, st = pod.spec, pod.status
    status = st.phase or "Pending"
    if pod.metadata.HasField("deletion_timestamp"):
        status = "Terminating"
    node = spec.node_name + (f"/{st.host_ip}" if st.host_ip else "") if spec.node_name else NONE
    rows: list[tuple[str, str | Sequence[str]]] = [
        ("Node", node), ("Start Time", when(st.start_time, now)), ("Status", status)]
    if st.reason:
        rows.append(("Reason", st.reason))
    if st.message:
        rows.append(("Message", st.message))
    rows += [("IP", st.pod_ip or ""), ("IPs", [p.ip for p in st.pod_ips] or [NONE])]
    controller = _controlled_by(pod.metadata)
    if controller:
        rows.append(("Controlled By", controller))
    lines = pairs(rows)
    statuses = {s.name: s for s in st.container_statuses}
    init_statuses = {s.name: s for s in st.init_container_statuses}
    if spec.init_containers:
        lines.append("Init Containers:")
        for c in spec.init_containers:
            lines += container_lines(c, init_statuses.get(c.name, core_pb2.ContainerStatus()),
                                     now=now)
    lines.append("Containers:")
    for c in spec.containers:
        lines += container_lines(c, statuses.get(c.name, core_pb2.ContainerStatus()), now=now)
    if st.conditions:
        lines.append("Conditions:")
        lines += conditions_lines(st.conditions)
    lines.append("Volumes:" if spec.volumes else "Volumes:  <none>")
    lines += volume_lines(spec.volumes)
    tolerations = []
    for t in spec.tolerations:
        text = t.key or "<all>"
        if t.operator == "Equal" or t.value:
            text += f"={t.value}"
        if t.effect:
            text += f":{t.effect}"
        if t.HasField("toleration_seconds"):
            text += f" for {t.toleration_seconds}s"
        tolerations.append(text)
    lines += pairs([("QoS Class", st.qos_class or NONE),
                    ("Node-Selectors", map_lines(spec.node_selector)),
                    ("Tolerations", tolerations)])
    return lines


def _int_or_percent(v: Any, default: str) -> str:
    which = v.WhichOneof("value")
    if which == "int_val":
        return str(v.int_val)
    if which == "str_val":
        return str(v.str_val)
    return default


def describe_deployment(d: Any, *, now: float) -> list[str]:
    spec, st = d.spec, d.status
    desired = spec.replicas if spec.HasField("replicas") else 1
    strategy = spec.strategy.type or "RollingUpdate"
    rows: list[tuple[str, str | Sequence[str]]] = [
        ("Selector", label_selector_text(spec.selector)),
        ("Replicas", f"{desired} desired | {st.updated_replicas} updated | {st.replicas} total"
                     f" | {st.available_replicas} available | {st.unavailable_replicas} "
                     "unavailable"),
        ("StrategyType", strategy),
        ("MinReadySeconds", str(spec.min_ready_seconds))]
    if strategy == "RollingUpdate":
        ru = spec.strategy.rolling_update
        rows.append(("RollingUpdateStrategy",
                     f"{_int_or_percent(ru.max_unavailable, '25%')} max unavailable, "
                     f"{_int_or_percent(ru.max_surge, '25%')} max surge"))
    if spec.paused:
        rows.append(("Paused", "true"))
    lines = pairs(rows)
    lines.append("Pod Template:")
    tmpl = spec.template
    lines += pairs([("Labels", map_lines(tmpl.metadata.labels))], indent=2)
    if tmpl.metadata.annotations:
        lines += pairs([("Annotations", map_lines(tmpl.metadata.annotations))], indent=2)
    if tmpl.spec.service_account_name:
        lines += pairs([("Service Account", tmpl.spec.service_account_name)], indent=2)
    if tmpl.spec.init_containers:
        lines.append("  Init Containers:")
        for c in tmpl.spec.init_containers:
            lines += container_lines(c, None, now=now, indent=3)
    lines.append("  Containers:")
    for c in tmpl.spec.containers:
        lines += container_lines(c, None, now=now, indent=3)
    lines.append("  Volumes:" if tmpl.spec.volumes else "  Volumes:  <none>")
    lines += volume_lines(tmpl.spec.volumes, indent=3)
    if st.conditions:
        lines.append("Conditions:")
        lines += conditions_lines(st.conditions, with_reason=True)
    return lines


def _port_endpoints(endpoints: Any | None, port_name: str) -> str:
    if endpoints is None:
        return NONE
    found = []
    for subset in endpoints.subsets:
        for p in subset.ports:
            if p.name == port_name:
                found += [f"{a.ip}:{p.port}" for a in subset.addresses]
    return ",".join(found) or NONE


def describe_service(svc: Any, *, endpoints: Any | None) -> list[str]:
    spec = svc.spec
    rows: list[tuple[str, str | Sequence[str]]] = [
        ("Selector", ",".join(map_lines(spec.selector)) or NONE),
        ("Type", spec.type or "ClusterIP")]
    if spec.HasField("ip_family_policy"):
        rows.append(("IP Family Policy", spec.ip_family_policy))
    if spec.ip_families:
        rows.append(("IP Families", ",".join(spec.ip_families)))
    rows += [("IP", spec.cluster_ip or NONE), ("IPs", ",".join(spec.cluster_ips) or NONE)]
    if spec.external_ips:
        rows.append(("External IPs", ",".join(spec.external_ips)))
    if spec.external_name:
        rows.append(("External Name", spec.external_name))
    for p in spec.ports:
        proto = p.protocol or "TCP"
        target = _int_or_percent(p.target_port, str(p.port))
        rows += [("Port", f"{p.name or '<unset>'}  {p.port}/{proto}"),
                 ("TargetPort", f"{target}/{proto}")]
        if p.node_port:
            rows.append(("NodePort", f"{p.name or '<unset>'}  {p.node_port}/{proto}"))
        rows.append(("Endpoints", _port_endpoints(endpoints, p.name)))
    if not spec.ports and endpoints is not None:
        rows.append(("Endpoints", endpoints_summary(endpoints)))
    rows.append(("Session Affinity", spec.session_affinity or "None"))
    return pairs(rows)


def describe_secret(secret: Any) -> list[str]:
    """Type and the size of each value; never the values (as kubectl)."""
    lines = pairs([("Type", secret.type or "Opaque")])
    lines += ["", "Data", "===="]
    data = {k: len(v) for k, v in secret.data.items()}
    data.update({k: len(v.encode()) for k, v in secret.string_data.items()})
    lines += pairs([(k, f"{n} bytes") for k, n in sorted(data.items())])
    return lines


def _hpa_metric(spec: Any, status: Any | None) -> tuple[str, str]:
    """kubectl's metric line: its name, and 'current / target'."""
    if spec.type == "Resource":
        t, name = spec.resource.target, spec.resource.name
        cur = status.resource.current if status is not None else None
        if t.type == "Utilization":
            shown = "<unknown>" if cur is None or not cur.HasField("average_utilization") \
                else f"{cur.average_utilization}% ({cur.average_value.value})"
            return (f"resource {name} on pods  (as a percentage of request)",
                    f"{shown} / {t.average_utilization}%")
        shown = cur.average_value.value if cur is not None and cur.average_value.value \
            else "<unknown>"
        return f"resource {name} on pods", f"{shown} / {t.average_value.value}"
    cur_value = status.pods.current.average_value.value if status is not None else ""
    return (f'"{spec.pods.metric.name}" on pods',
            f"{cur_value or '<unknown>'} / {spec.pods.target.average_value.value}")


def _hpa_rules(title: str, rules: Any, *, window: int) -> list[str]:
    lines = [f"  {title}:",
             f"    Stabilization Window: {window} seconds",
             f"    Select Policy: {rules.select_policy}",
             "    Policies:"]
    lines += [f"      - Type: {p.type:<8} Value: {p.value:<4} Period: {p.period_seconds} "
              "seconds" for p in rules.policies]
    return lines


def describe_hpa(hpa: Any) -> list[str]:
    """kubectl's page: reference, metrics (current / target), bounds, behavior,
    replicas and conditions."""
    spec, st = hpa.spec, hpa.status
    ref = spec.scale_target_ref
    current = list(st.current_metrics)
    metric_rows = [_hpa_metric(m, current[i] if len(current) == len(spec.metrics) else None)
                   for i, m in enumerate(spec.metrics)]
    rows: list[tuple[str, str | Sequence[str]]] = [
        ("Reference", f"{ref.kind}/{ref.name}"), ("Metrics", "( current / target )")]
    lines = pairs(rows + [(f"  {k}", v) for k, v in metric_rows] + [
        ("Min replicas", str(autoscaling.min_replicas(hpa))),
        ("Max replicas", str(spec.max_replicas))])
    up, down = autoscaling.rules_of(hpa)
    lines.append("Behavior:")
    for title, rules in (("Scale Up", up), ("Scale Down", down)):
        lines += _hpa_rules(title, rules, window=rules.stabilization_window_seconds)
    lines += pairs([(f"{ref.kind} pods",
                     f"{st.current_replicas} current / {st.desired_replicas} desired")])
    if st.conditions:
        lines.append("Conditions:")
        rows2 = [[c.type, c.status, c.reason, c.message] for c in st.conditions]
        lines += small_table(["Type", "Status", "Reason", "Message"], rows2)
    return lines


def describe_generic(obj: Any, *, kinds: KindTable) -> list[str]:
    """Every field but apiVersion, kind and metadata, as indented YAML."""
    doc = encode(obj, kinds)
    lines = []
    for key, value in doc.items():
        if key in ("apiVersion", "kind", "metadata"):
            continue
        lines.append(f"{key[:1].upper()}{key[1:]}:")
        body = dump_yaml(value).rstrip("\n")
        lines += ["  " + line for line in body.splitlines()]
    return lines


def events_lines(events: Sequence[Any], *, now: float) -> list[str]:
    if not events:
        return ["Events:  <none>"]
    rows = [[e.type, e.reason, event_last_seen(e, now), event_source(e), e.message]
            for e in sorted(events, key=event_time)]
    return ["Events:", *small_table(["Type", "Reason", "Age", "From", "Message"], rows)]


def describe(kind: Kind, obj: Any, *, kinds: KindTable, events: Sequence[Any], now: float,
             endpoints: Any | None = None) -> str:
    """The whole page for one object (see the module docstring)."""
    lines = header(kind, obj, now=now)
    match kind.kind:
        case "Pod":
            lines += describe_pod(obj, now=now)
        case "Deployment":
            lines += describe_deployment(obj, now=now)
        case "Service":
            lines += describe_service(obj, endpoints=endpoints)
        case "Secret":
            lines += describe_secret(obj)
        case "HorizontalPodAutoscaler":
            lines += describe_hpa(obj)
        case _:
            lines += describe_generic(obj, kinds=kinds)
    lines += events_lines(events, now=now)
    return "\n".join(lines) + "\n"


def events_selector(kind: Kind, name: str) -> str:
    return f"involvedObject.name={name},involvedObject.kind={kind.kind}"


# --------------------------------------------------------------------------- command


async def run_describe(session: Session, *, args: Sequence[str], label_selector: str = "",
                       all_namespaces: bool = False) -> int:
    targets = parse_targets(args, session.kinds)
    check_selectors(targets, label_selector=label_selector, field_selector="")
    client = session.client()
    namespace = "" if all_namespaces else session.namespace
    events_kind = session.kinds.by_name("events")
    endpoints_kind = session.kinds.by_name("endpoints")
    found, code = await fetch_targets(session, targets, namespace=namespace,
                                      all_namespaces=all_namespaces,
                                      label_selector=label_selector)
    pages: list[str] = []
    for kind, objs in found:
        for obj in objs:
            meta = obj.metadata
            events = await client.list_all(
                events_kind.message, namespace=meta.namespace,
                all_namespaces=not kind.namespaced,
                field_selector=events_selector(kind, meta.name))
            endpoints = None
            if kind.kind == "Service":
                endpoints = await get_or_none(client, endpoints_kind, namespace=meta.namespace,
                                              name=meta.name)
            pages.append(describe(kind, obj, kinds=session.kinds, events=events.items,
                                  now=session.clock(), endpoints=endpoints))
    if not pages and not any(t.names for t in targets):
        session.warn(no_resources_message(targets, namespace=namespace,
                                          all_namespaces=all_namespaces))
    session.out.write("\n".join(pages))
    return code
