"""Kubernetes' defaults and validation rules for every kind Shoal serves.

Pure functions with no I/O. The apiserver runs them on every write, and its
verdict is the one that counts. The CLI runs the same functions before it
sends anything, so a user sees every problem at once.

    apply_defaults(kind, obj)         fill unset fields in place; idempotent
    validate(kind, obj)               every problem in a new object
    validate_update(kind, new, old)   validate(new), plus what may not change

Contract:

- ``validate`` expects ``apply_defaults`` to have run first. An empty
  ``restartPolicy`` or port ``protocol`` is reported as ``Required value``,
  because defaulting would have filled it in.
- Every problem is reported, not only the first. Each one is a
  :class:`~shoal.errors.FieldError` whose ``field`` is a path in manifest
  spelling (``spec.template.spec.containers[0].ports[1].containerPort``).
  Its ``message`` uses Kubernetes' wording, e.g.
  ``Invalid value: 70000: must be between 1 and 65535, inclusive``.
- Kinds with no specific rules get only their metadata checked.

Integer fields that are not ``optional`` in the protos (probe timings) cannot
tell "unset" apart from 0. There, 0 means unset, and only a negative value is
reported.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

from google.protobuf.message import Message

from shoal import autoscaling, errors, fielderrors, naming, quantity, selectors, trafficrules
from shoal.api.apps.v1 import apps_pb2
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.api.networking.v1 import networking_pb2
from shoal.api.rbac.v1 import rbac_pb2
from shoal.api.security.v1 import security_pb2
from shoal.errors import FieldError
from shoal.kinds import Kind
from shoal.manifests import encode_message

Errors = list[FieldError]
_M = TypeVar("_M", bound=Message)

_MAX_PORT = 65535
_MAX_INT32 = 2**31 - 1
_MAX_ANNOTATIONS_BYTES = 256 * 1024
_MAX_DATA_BYTES = 1024 * 1024
_MAX_EVENT_REASON = 128
_MAX_FILE_MODE = 0o777
_DEFAULT_FILE_MODE = 0o644
_MIN_TOKEN_SECONDS = 600
_PERCENT = re.compile(r"^[0-9]+%$")
_SIGNED_PERCENT = re.compile(r"^([+-]?[0-9]+)%$")

_PROTOCOLS = ("TCP", "UDP", "SCTP")
_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_TERMINATION_MESSAGE_POLICIES = ("File", "FallbackToLogsOnError")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_SESSION_AFFINITIES = ("None", "ClientIP")
_TRAFFIC_POLICIES = ("Cluster", "Local")
_IP_FAMILY_POLICIES = ("SingleStack", "PreferDualStack", "RequireDualStack")
_HOST_PATH_TYPES = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                    "CharDevice", "BlockDevice")
_MOUNT_PROPAGATIONS = ("None", "HostToContainer", "Bidirectional")
_QOS_RESOURCES = ("cpu", "memory")
_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")

# --------------------------------------------------------------------------- errors


_show = fielderrors.show
_required = fielderrors.required
_invalid = fielderrors.invalid
_duplicate = fielderrors.duplicate
_not_supported = fielderrors.not_supported
_not_found = fielderrors.not_found
_too_long = fielderrors.too_long
_forbidden = fielderrors.forbidden


# --------------------------------------------------------------------------- small checks


def _check(path: str, value: str, problems: Iterable[str]) -> Errors:
    """One Invalid error per problem a ``naming.check_*`` function found."""
    return [_invalid(path, value, p) for p in problems]


def _between(path: str, value: int, low: int, high: int) -> Errors:
    if low <= value <= high:
        return []
    return [_invalid(path, value, f"must be between {low} and {high}, inclusive")]


def _at_least(path: str, value: int, low: int) -> Errors:
    if value >= low:
        return []
    return [_invalid(path, value, f"must be greater than or equal to {low}")]


def _one_of(path: str, value: str, supported: Sequence[str], *, required: bool = True) -> Errors:
    """``value`` must be one of ``supported``; empty is ``Required`` unless allowed."""
    if value in supported or (not value and not required):
        return []
    if not value:
        return [_required(path)]
    return [_not_supported(path, value, supported)]


def _name(path: str, value: str, check: Callable[[str], list[str]]) -> Errors:
    """A name that must be present and well formed."""
    if not value:
        return [_required(path)]
    return _check(path, value, check(value))


def _optional_name(path: str, value: str, check: Callable[[str], list[str]]) -> Errors:
    return _check(path, value, check(value)) if value else []


def _labels(path: str, labels: Mapping[str, str]) -> Errors:
    errs: Errors = []
    for key, value in sorted(labels.items()):
        errs += _check(path, key, naming.check_qualified_name(key))
        errs += _check(path, value, naming.check_label_value(value))
    return errs


def _annotations(path: str, annotations: Mapping[str, str]) -> Errors:
    errs: Errors = []
    size = 0
    for key, value in sorted(annotations.items()):
        errs += _check(path, key, naming.check_qualified_name(key.lower()))
        size += len(key.encode()) + len(value.encode())
    if size > _MAX_ANNOTATIONS_BYTES:
        errs.append(_too_long(path, _MAX_ANNOTATIONS_BYTES))
    return errs


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ip(path: str, text: str) -> Errors:
    if not text:
        return [_required(path)]
    if _is_ip(text):
        return []
    return [_invalid(path, text, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")]


def _cidr(path: str, text: str) -> Errors:
    try:
        ipaddress.ip_network(text, strict=False)
        valid = "/" in text
    except ValueError:
        valid = False
    if valid:
        return []
    return [_invalid(path, text, "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)")]


def _relative_path(path: str, value: str) -> Errors:
    """A path inside a volume: relative, and never climbing out with '..'."""
    errs: Errors = []
    if value.startswith("/"):
        errs.append(_invalid(path, value, "must be a relative path"))
    if ".." in value.split("/"):
        errs.append(_invalid(path, value, "must not contain '..'"))
    return errs


def _file_mode(path: str, msg: Message, field: str) -> Errors:
    if not msg.HasField(field):
        return []
    mode = int(getattr(msg, field))
    if 0 <= mode <= _MAX_FILE_MODE:
        return []
    return [_invalid(path, mode, "must be a number between 0 and 0777 (octal), both inclusive")]


def _present(msg: Message, fields: Sequence[str]) -> list[str]:
    """Which of the given message fields are set, in the given order."""
    return [f for f in fields if msg.HasField(f)]


def _json_name(msg: Message, field: str) -> str:
    return str(msg.DESCRIPTOR.fields_by_name[field].json_name)


def _unique(values: Sequence[str], path_of: Callable[[int], str]) -> Errors:
    """A Duplicate error at ``path_of(i)`` for each repeat of an earlier, non-empty value."""
    seen: set[str] = set()
    errs: Errors = []
    for i, value in enumerate(values):
        if value and value in seen:
            errs.append(_duplicate(path_of(i), value))
        seen.add(value)
    return errs


# --------------------------------------------------------------------------- IntOrString


def scaled_value(v: meta_pb2.IntOrString, total: int, *, round_up: bool) -> int:
    """An absolute number from ``5`` or ``"25%"`` of ``total``, rounded as asked.

    An unset value counts as 0. Raises ValueError for a string that is not a
    whole-number percentage.
    """
    if v.WhichOneof("value") != "str_val":
        return int(v.int_val)
    m = _SIGNED_PERCENT.match(v.str_val)
    if m is None:
        raise ValueError(f"invalid value for IntOrString: {v.str_val!r} is not a percentage")
    product = int(m.group(1)) * total
    return -(-product // 100) if round_up else product // 100


def _int_or_percent(path: str, v: meta_pb2.IntOrString, *, cap_100: bool) -> Errors:
    """A non-negative integer or "N%" (N at most 100 when capped)."""
    which = v.WhichOneof("value")
    if which == "int_val":
        return _at_least(path, v.int_val, 0)
    if which != "str_val":
        return []
    if not _PERCENT.match(v.str_val):
        return [_invalid(path, v.str_val,
                         "a valid percent string must be a numeric string followed by an "
                         "ending '%' (e.g. '1%',  or '93%', regex used for validation is "
                         "'[0-9]+%')")]
    if cap_100 and int(v.str_val[:-1]) > 100:
        return [_invalid(path, v.str_val, "must not be greater than 100%")]
    return []


def _is_zero(v: meta_pb2.IntOrString) -> bool:
    which = v.WhichOneof("value")
    if which == "str_val":
        return v.str_val.rstrip("%") in ("0", "")
    return v.int_val == 0


def _port_num_or_name(path: str, v: meta_pb2.IntOrString) -> Errors:
    which = v.WhichOneof("value")
    if which == "int_val":
        return _between(path, v.int_val, 1, _MAX_PORT)
    if which == "str_val" and v.str_val:
        return _check(path, v.str_val, naming.check_port_name(v.str_val))
    return [_required(path)]


# --------------------------------------------------------------------------- defaults: pods


def _pull_policy(image: str) -> str:
    """Always for ``:latest`` or no tag; IfNotPresent for any other tag or a digest."""
    name, _, digest = image.partition("@")
    if digest:
        return "IfNotPresent"
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _default_probe(probe: core_pb2.Probe) -> None:
    probe.timeout_seconds = probe.timeout_seconds or 1
    probe.period_seconds = probe.period_seconds or 10
    probe.success_threshold = probe.success_threshold or 1
    probe.failure_threshold = probe.failure_threshold or 3
    if probe.HasField("http_get") and not probe.http_get.scheme:
        probe.http_get.scheme = "HTTP"
    if probe.HasField("grpc") and not probe.grpc.HasField("service"):
        probe.grpc.service = ""


def _default_lifecycle(lifecycle: core_pb2.Lifecycle) -> None:
    for handler in (lifecycle.post_start, lifecycle.pre_stop):
        if handler.HasField("http_get") and not handler.http_get.scheme:
            handler.http_get.scheme = "HTTP"


def _default_field_ref(ref: core_pb2.ObjectFieldSelector) -> None:
    if not ref.api_version:
        ref.api_version = "v1"


def _default_container(c: core_pb2.Container) -> None:
    c.termination_message_path = c.termination_message_path or "/dev/termination-log"
    c.termination_message_policy = c.termination_message_policy or "File"
    c.image_pull_policy = c.image_pull_policy or _pull_policy(c.image)
    for port in c.ports:
        port.protocol = port.protocol or "TCP"
    for probe_field in ("liveness_probe", "readiness_probe", "startup_probe"):
        if c.HasField(probe_field):
            _default_probe(getattr(c, probe_field))
    if c.HasField("lifecycle"):
        _default_lifecycle(c.lifecycle)
    for env in c.env:
        if env.value_from.HasField("field_ref"):
            _default_field_ref(env.value_from.field_ref)


_VOLUME_SOURCES = ("empty_dir", "config_map", "secret", "host_path", "persistent_volume_claim",
                   "projected", "downward_api", "nfs", "csi")


def _default_projection(source: core_pb2.VolumeProjection) -> None:
    for item in source.downward_api.items:
        if item.HasField("field_ref"):
            _default_field_ref(item.field_ref)
    token = source.service_account_token
    if source.HasField("service_account_token") and not token.HasField("expiration_seconds"):
        token.expiration_seconds = 3600


def _default_volume(v: core_pb2.Volume) -> None:
    if not _present(v, _VOLUME_SOURCES):
        v.empty_dir.SetInParent()
    for source_field in ("config_map", "secret", "projected", "downward_api"):
        source = getattr(v, source_field)
        if v.HasField(source_field) and not source.HasField("default_mode"):
            source.default_mode = _DEFAULT_FILE_MODE
    if v.HasField("host_path") and not v.host_path.HasField("type"):
        v.host_path.type = ""
    for item in v.downward_api.items:
        if item.HasField("field_ref"):
            _default_field_ref(item.field_ref)
    for projection in v.projected.sources:
        _default_projection(projection)


def _default_service_account(spec: core_pb2.PodSpec) -> None:
    if not spec.service_account_name:
        spec.service_account_name = spec.service_account or "default"


def _default_host_network_ports(spec: core_pb2.PodSpec) -> None:
    for c in (*spec.init_containers, *spec.containers):
        for port in c.ports:
            port.host_port = port.host_port or port.container_port


def _default_pod_spec(spec: core_pb2.PodSpec) -> None:
    spec.restart_policy = spec.restart_policy or "Always"
    spec.dns_policy = spec.dns_policy or "ClusterFirst"
    spec.scheduler_name = spec.scheduler_name or "default-scheduler"
    if not spec.HasField("termination_grace_period_seconds"):
        spec.termination_grace_period_seconds = 30
    if not spec.HasField("enable_service_links"):
        spec.enable_service_links = True
    _default_service_account(spec)
    spec.security_context.SetInParent()
    for c in (*spec.init_containers, *spec.containers):
        _default_container(c)
    if spec.host_network:
        _default_host_network_ports(spec)
    for v in spec.volumes:
        _default_volume(v)


def _default_requests_from_limits(resources: core_pb2.ResourceRequirements) -> None:
    for name, limit in resources.limits.items():
        if name not in resources.requests:
            resources.requests[name].CopyFrom(limit)


def _amount(q: meta_pb2.Quantity) -> Fraction:
    """A quantity's value, or 0 when it does not parse (validation reports it)."""
    try:
        return quantity.parse(q.value)
    except quantity.QuantityError:
        return Fraction(0)


def _qos_class(spec: core_pb2.PodSpec) -> str:
    """Guaranteed, Burstable or BestEffort, from cpu and memory requests and limits."""
    requests: dict[str, Fraction] = {}
    limits: dict[str, Fraction] = {}
    every_container_limited = True
    for c in (*spec.init_containers, *spec.containers):
        for name in _QOS_RESOURCES:
            request = _amount(c.resources.requests.get(name, meta_pb2.Quantity(value="0")))
            limit = _amount(c.resources.limits.get(name, meta_pb2.Quantity(value="0")))
            if request > 0:
                requests[name] = requests.get(name, Fraction(0)) + request
            if limit > 0:
                limits[name] = limits.get(name, Fraction(0)) + limit
            else:
                every_container_limited = False
    if not requests and not limits:
        return "BestEffort"
    if every_container_limited and requests == limits:
        return "Guaranteed"
    return "Burstable"


def _default_pod(pod: core_pb2.Pod) -> None:
    _default_pod_spec(pod.spec)
    for c in (*pod.spec.init_containers, *pod.spec.containers):
        _default_requests_from_limits(c.resources)
    pod.status.phase = pod.status.phase or "Pending"
    pod.status.qos_class = _qos_class(pod.spec)


# --------------------------------------------------------------------------- defaults: others


def _target_port_unset(v: meta_pb2.IntOrString) -> bool:
    which = v.WhichOneof("value")
    return which is None or (which == "int_val" and v.int_val == 0) or (
        which == "str_val" and not v.str_val
    )


def _default_service(svc: core_pb2.Service) -> None:
    spec = svc.spec
    spec.type = spec.type or "ClusterIP"
    spec.session_affinity = spec.session_affinity or "None"
    client_ip = spec.session_affinity_config.client_ip
    if spec.session_affinity == "ClientIP" and not client_ip.HasField("timeout_seconds"):
        client_ip.timeout_seconds = 10800
    for port in spec.ports:
        port.protocol = port.protocol or "TCP"
        if _target_port_unset(port.target_port):
            port.target_port.int_val = port.port
    if spec.type in ("NodePort", "LoadBalancer") and not spec.external_traffic_policy:
        spec.external_traffic_policy = "Cluster"
    if spec.type == "LoadBalancer" and not spec.HasField("allocate_load_balancer_node_ports"):
        spec.allocate_load_balancer_node_ports = True
    if spec.type != "ExternalName":
        if not spec.HasField("internal_traffic_policy"):
            spec.internal_traffic_policy = "Cluster"
        if spec.cluster_ip != "None" and not spec.HasField("ip_family_policy"):
            spec.ip_family_policy = "SingleStack"


def _default_int_or_string(v: meta_pb2.IntOrString, *, int_val: int | None = None,
                           str_val: str | None = None) -> None:
    if v.WhichOneof("value") is not None:
        return
    if str_val is not None:
        v.str_val = str_val
    elif int_val is not None:
        v.int_val = int_val


def _default_deployment(d: apps_pb2.Deployment) -> None:
    spec = d.spec
    if not spec.HasField("replicas"):
        spec.replicas = 1
    spec.strategy.type = spec.strategy.type or "RollingUpdate"
    if spec.strategy.type == "RollingUpdate":
        rolling = spec.strategy.rolling_update
        _default_int_or_string(rolling.max_unavailable, str_val="25%")
        _default_int_or_string(rolling.max_surge, str_val="25%")
    if not spec.HasField("revision_history_limit"):
        spec.revision_history_limit = 10
    if not spec.HasField("progress_deadline_seconds"):
        spec.progress_deadline_seconds = 600
    _default_pod_spec(spec.template.spec)


def _default_replicaset(rs: apps_pb2.ReplicaSet) -> None:
    if not rs.spec.HasField("replicas"):
        rs.spec.replicas = 1
    _default_pod_spec(rs.spec.template.spec)


def _default_claim_template(claim: core_pb2.PersistentVolumeClaim) -> None:
    if not claim.spec.HasField("volume_mode"):
        claim.spec.volume_mode = "Filesystem"
    claim.status.phase = claim.status.phase or "Pending"


def _default_statefulset(sts: apps_pb2.StatefulSet) -> None:
    spec = sts.spec
    if not spec.HasField("replicas"):
        spec.replicas = 1
    spec.pod_management_policy = spec.pod_management_policy or "OrderedReady"
    spec.update_strategy.type = spec.update_strategy.type or "RollingUpdate"
    rolling = spec.update_strategy.rolling_update
    if spec.update_strategy.type == "RollingUpdate" and not rolling.HasField("partition"):
        rolling.partition = 0
    if not spec.HasField("revision_history_limit"):
        spec.revision_history_limit = 10
    retention = spec.persistent_volume_claim_retention_policy
    retention.when_deleted = retention.when_deleted or "Retain"
    retention.when_scaled = retention.when_scaled or "Retain"
    for claim in spec.volume_claim_templates:
        _default_claim_template(claim)
    _default_pod_spec(spec.template.spec)


def _default_daemonset(ds: apps_pb2.DaemonSet) -> None:
    spec = ds.spec
    spec.update_strategy.type = spec.update_strategy.type or "RollingUpdate"
    if spec.update_strategy.type == "RollingUpdate":
        rolling = spec.update_strategy.rolling_update
        _default_int_or_string(rolling.max_unavailable, int_val=1)
        _default_int_or_string(rolling.max_surge, int_val=0)
    if not spec.HasField("revision_history_limit"):
        spec.revision_history_limit = 10
    _default_pod_spec(spec.template.spec)


def _default_secret(secret: core_pb2.Secret) -> None:
    secret.type = secret.type or "Opaque"


def _default_namespace(ns: core_pb2.Namespace) -> None:
    ns.status.phase = ns.status.phase or "Active"
    if ns.metadata.name:
        ns.metadata.labels["kubernetes.io/metadata.name"] = ns.metadata.name


def _default_network_policy(np: networking_pb2.NetworkPolicy) -> None:
    """Kubernetes': ports are TCP unless said; policyTypes is Ingress, plus Egress
    when there are egress rules."""
    spec = np.spec
    for ports in [*(r.ports for r in spec.ingress), *(r.ports for r in spec.egress)]:
        for port in ports:
            port.protocol = port.protocol or "TCP"
    if not spec.policy_types:
        spec.policy_types.append("Ingress")
        if spec.egress:
            spec.policy_types.append("Egress")


def _default_endpoints(ep: core_pb2.Endpoints) -> None:
    for subset in ep.subsets:
        for port in subset.ports:
            port.protocol = port.protocol or "TCP"


def _default_binding(binding: rbac_pb2.RoleBinding | rbac_pb2.ClusterRoleBinding) -> None:
    """Kubernetes' RBAC defaults: the RBAC group on roleRef and User/Group subjects."""
    binding.role_ref.api_group = binding.role_ref.api_group or _RBAC_GROUP
    for subject in binding.subjects:
        if not subject.api_group and subject.kind in ("User", "Group"):
            subject.api_group = _RBAC_GROUP


_DEFAULTERS: Mapping[str, Callable[[Any], None]] = {
    "Pod": _default_pod,
    "Service": _default_service,
    "Deployment": _default_deployment,
    "ReplicaSet": _default_replicaset,
    "StatefulSet": _default_statefulset,
    "DaemonSet": _default_daemonset,
    "Secret": _default_secret,
    "Namespace": _default_namespace,
    "Endpoints": _default_endpoints,
    "NetworkPolicy": _default_network_policy,
    "RoleBinding": _default_binding,
    "ClusterRoleBinding": _default_binding,
    **trafficrules.DEFAULTERS,
    **autoscaling.DEFAULTERS,
}

# --------------------------------------------------------------------------- metadata

_NAME_CHECKS: Mapping[str, Callable[[str], list[str]]] = {
    "Namespace": naming.check_dns1123_label,
    "Service": naming.check_dns1035_label,
    "Role": naming.check_path_segment_name,
    "ClusterRole": naming.check_path_segment_name,
    "RoleBinding": naming.check_path_segment_name,
    "ClusterRoleBinding": naming.check_path_segment_name,
}


def _object_name(kind: Kind, meta: meta_pb2.ObjectMeta) -> Errors:
    check = _NAME_CHECKS.get(kind.kind, naming.check_dns1123_subdomain)
    errs: Errors = []
    if meta.name:
        errs += _check("metadata.name", meta.name, check(meta.name))
    elif not meta.generate_name:
        errs.append(_required("metadata.name", "name or generateName is required"))
    if meta.generate_name:
        # The server appends a random suffix, so a trailing '-' is fine here.
        prefix = meta.generate_name
        masked = prefix[:-1] + "a" if prefix.endswith("-") else prefix
        errs += _check("metadata.generateName", prefix, check(masked))
    return errs


def _object_namespace(kind: Kind, meta: meta_pb2.ObjectMeta) -> Errors:
    if not kind.namespaced:
        if meta.namespace:
            return [_forbidden("metadata.namespace", "not allowed on this type")]
        return []
    return _name("metadata.namespace", meta.namespace, naming.check_dns1123_label)


def _finalizers(finalizers: Sequence[str]) -> Errors:
    errs: Errors = []
    for i, finalizer in enumerate(finalizers):
        errs += _check(f"metadata.finalizers[{i}]", finalizer,
                       naming.check_qualified_name(finalizer))
    return errs + _unique(finalizers, lambda i: f"metadata.finalizers[{i}]")


def _owner_references(refs: Sequence[meta_pb2.OwnerReference]) -> Errors:
    errs: Errors = []
    for i, ref in enumerate(refs):
        for field, value in (("apiVersion", ref.api_version), ("kind", ref.kind),
                             ("name", ref.name), ("uid", ref.uid)):
            if not value:
                errs.append(_required(f"metadata.ownerReferences[{i}].{field}"))
    controllers = [f"{r.kind}/{r.name}" for r in refs if r.HasField("controller") and r.controller]
    if len(controllers) > 1:
        errs.append(_invalid("metadata.ownerReferences", ", ".join(controllers),
                             "only one reference can have controller set to true"))
    return errs


def _validate_metadata(kind: Kind, meta: meta_pb2.ObjectMeta) -> Errors:
    return (
        _object_name(kind, meta)
        + _object_namespace(kind, meta)
        + _labels("metadata.labels", meta.labels)
        + _annotations("metadata.annotations", meta.annotations)
        + _finalizers(meta.finalizers)
        + _owner_references(meta.owner_references)
    )


def _label_selector(path: str, sel: meta_pb2.LabelSelector) -> Errors:
    """matchLabels syntax, and each matchExpression's operator and values."""
    errs = _labels(f"{path}.matchLabels", sel.match_labels)
    for i, expr in enumerate(sel.match_expressions):
        epath = f"{path}.matchExpressions[{i}]"
        errs += _check(f"{epath}.key", expr.key, naming.check_qualified_name(expr.key))
        errs += _set_operator(epath, expr.operator, expr.values)
        for j, value in enumerate(expr.values):
            errs += _check(f"{epath}.values[{j}]", value, naming.check_label_value(value))
    return errs


def _set_operator(path: str, operator: str, values: Sequence[str]) -> Errors:
    """In/NotIn need values; Exists/DoesNotExist must have none."""
    if operator in ("In", "NotIn"):
        return [] if values else [
            _required(f"{path}.values", "must be specified when `operator` is 'In' or 'NotIn'")
        ]
    if operator in ("Exists", "DoesNotExist"):
        return [_forbidden(f"{path}.values", "may not be specified when `operator` is 'Exists' "
                                             "or 'DoesNotExist'")] if values else []
    return [_not_supported(f"{path}.operator", operator, ("In", "NotIn", "Exists",
                                                          "DoesNotExist"))]


# --------------------------------------------------------------------------- pod: volumes


def _key_to_paths(path: str, items: Sequence[core_pb2.KeyToPath]) -> Errors:
    errs: Errors = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        errs += _name(f"{ipath}.key", item.key, naming.check_config_key)
        errs += [_required(f"{ipath}.path")] if not item.path else _relative_path(
            f"{ipath}.path", item.path)
        errs += _file_mode(f"{ipath}.mode", item, "mode")
    return errs


def _empty_dir(path: str, src: core_pb2.EmptyDirVolumeSource) -> Errors:
    errs: Errors = []
    if src.medium not in ("", "Memory", "HugePages") and not src.medium.startswith("HugePages-"):
        errs.append(_not_supported(f"{path}.medium", src.medium, ("", "Memory", "HugePages")))
    if src.HasField("size_limit"):
        errs += _quantity(f"{path}.sizeLimit", src.size_limit)[0]
    return errs


def _config_map_volume(path: str, src: core_pb2.ConfigMapVolumeSource) -> Errors:
    return (_name(f"{path}.name", src.name, naming.check_dns1123_subdomain)
            + _key_to_paths(f"{path}.items", src.items)
            + _file_mode(f"{path}.defaultMode", src, "default_mode"))


def _secret_volume(path: str, src: core_pb2.SecretVolumeSource) -> Errors:
    return (_name(f"{path}.secretName", src.secret_name, naming.check_dns1123_subdomain)
            + _key_to_paths(f"{path}.items", src.items)
            + _file_mode(f"{path}.defaultMode", src, "default_mode"))


def _host_path_volume(path: str, src: core_pb2.HostPathVolumeSource) -> Errors:
    errs = [] if src.path else [_required(f"{path}.path")]
    return errs + _one_of(f"{path}.type", src.type, _HOST_PATH_TYPES, required=False)


def _claim_volume(path: str, src: core_pb2.PersistentVolumeClaimVolumeSource) -> Errors:
    return [] if src.claim_name else [_required(f"{path}.claimName")]


def _downward_files(path: str, items: Sequence[core_pb2.DownwardAPIVolumeFile]) -> Errors:
    errs: Errors = []
    for i, item in enumerate(items):
        ipath = f"{path}[{i}]"
        errs += [_required(f"{ipath}.path")] if not item.path else _relative_path(
            f"{ipath}.path", item.path)
        errs += _file_mode(f"{ipath}.mode", item, "mode")
        sources = _present(item, ("field_ref", "resource_field_ref"))
        if len(sources) != 1:
            errs.append(_invalid(ipath, "", "must specify one of: `fieldRef` or "
                                            "`resourceFieldRef`"))
        elif sources[0] == "field_ref":
            errs += _field_ref(f"{ipath}.fieldRef", item.field_ref, _VOLUME_FIELD_PATHS)
        else:
            errs += _resource_field_ref(f"{ipath}.resourceFieldRef", item.resource_field_ref)
    return errs


def _downward_volume(path: str, src: core_pb2.DownwardAPIVolumeSource) -> Errors:
    return (_downward_files(f"{path}.items", src.items)
            + _file_mode(f"{path}.defaultMode", src, "default_mode"))


def _projected_object(path: str, src: core_pb2.SecretProjection | core_pb2.ConfigMapProjection
                      ) -> Errors:
    return (_name(f"{path}.name", src.name, naming.check_dns1123_subdomain)
            + _key_to_paths(f"{path}.items", src.items))


def _token_projection(path: str, token: core_pb2.ServiceAccountTokenProjection) -> Errors:
    errs = [] if token.path else [_required(f"{path}.path")]
    if token.HasField("expiration_seconds") and token.expiration_seconds < _MIN_TOKEN_SECONDS:
        errs.append(_invalid(f"{path}.expirationSeconds", token.expiration_seconds,
                             "may not specify a duration less than 10 minutes"))
    return errs


def _projection(path: str, source: core_pb2.VolumeProjection) -> Errors:
    kinds = _present(source, ("secret", "downward_api", "config_map", "service_account_token"))
    if len(kinds) != 1:
        return [_invalid(path, "", "must specify exactly one of: `secret`, `downwardAPI`, "
                                   "`configMap` or `serviceAccountToken`")]
    which = kinds[0]
    spath = f"{path}.{_json_name(source, which)}"
    if which == "downward_api":
        return _downward_files(f"{spath}.items", source.downward_api.items)
    if which == "service_account_token":
        return _token_projection(spath, source.service_account_token)
    return _projected_object(spath, getattr(source, which))


def _projected_volume(path: str, src: core_pb2.ProjectedVolumeSource) -> Errors:
    errs = _file_mode(f"{path}.defaultMode", src, "default_mode")
    for i, source in enumerate(src.sources):
        errs += _projection(f"{path}.sources[{i}]", source)
    return errs


def _nfs_volume(path: str, src: core_pb2.NFSVolumeSource) -> Errors:
    errs = [] if src.server else [_required(f"{path}.server")]
    if not src.path:
        errs.append(_required(f"{path}.path"))
    elif not src.path.startswith("/"):
        errs.append(_invalid(f"{path}.path", src.path, "must be an absolute path"))
    return errs


def _csi_volume(path: str, src: core_pb2.CSIVolumeSource) -> Errors:
    return [] if src.driver else [_required(f"{path}.driver")]


_VOLUME_CHECKS: Mapping[str, Callable[[str, Any], Errors]] = {
    "empty_dir": _empty_dir,
    "config_map": _config_map_volume,
    "secret": _secret_volume,
    "host_path": _host_path_volume,
    "persistent_volume_claim": _claim_volume,
    "projected": _projected_volume,
    "downward_api": _downward_volume,
    "nfs": _nfs_volume,
    "csi": _csi_volume,
}


def _volume_source(path: str, v: core_pb2.Volume) -> Errors:
    sources = _present(v, _VOLUME_SOURCES)
    if not sources:
        return [_required(path, "must specify a volume type")]
    errs = [_forbidden(f"{path}.{_json_name(v, s)}", "may not specify more than 1 volume type")
            for s in sources[1:]]
    for s in sources:
        errs += _VOLUME_CHECKS[s](f"{path}.{_json_name(v, s)}", getattr(v, s))
    return errs


def _volumes(path: str, volumes: Sequence[core_pb2.Volume]) -> Errors:
    errs: Errors = []
    for i, v in enumerate(volumes):
        errs += _name(f"{path}[{i}].name", v.name, naming.check_dns1123_label)
        errs += _volume_source(f"{path}[{i}]", v)
    return errs + _unique([v.name for v in volumes], lambda i: f"{path}[{i}].name")


# --------------------------------------------------------------------------- pod: containers

_ENV_FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
                    "spec.serviceAccountName", "status.hostIP", "status.hostIPs",
                    "status.podIP", "status.podIPs")
_VOLUME_FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid",
                       "metadata.labels", "metadata.annotations")
_SUBSCRIPTED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")
_RESOURCE_FIELDS = ("limits.cpu", "limits.memory", "limits.ephemeral-storage",
                    "requests.cpu", "requests.memory", "requests.ephemeral-storage")


def _field_ref(path: str, ref: core_pb2.ObjectFieldSelector, supported: Sequence[str]) -> Errors:
    errs = [] if ref.api_version else [_required(f"{path}.apiVersion")]
    fpath = f"{path}.fieldPath"
    if not ref.field_path:
        return [*errs, _required(fpath)]
    m = _SUBSCRIPTED_FIELD.match(ref.field_path)
    if m is not None:
        key = m.group(2).lower() if m.group(1) == "annotations" else m.group(2)
        return errs + _check(fpath, ref.field_path, naming.check_qualified_name(key))
    return errs + _one_of(fpath, ref.field_path, supported)


def _resource_field_ref(path: str, ref: core_pb2.ResourceFieldSelector) -> Errors:
    errs: Errors = []
    resource = ref.resource
    hugepages = resource.startswith(("limits.hugepages-", "requests.hugepages-"))
    if not hugepages:
        errs += _one_of(f"{path}.resource", resource, _RESOURCE_FIELDS)
    if ref.HasField("divisor"):
        errs += _quantity(f"{path}.divisor", ref.divisor)[0]
    return errs


def _key_selector(path: str, sel: core_pb2.ConfigMapKeySelector | core_pb2.SecretKeySelector
                  ) -> Errors:
    return (_name(f"{path}.name", sel.name, naming.check_dns1123_subdomain)
            + _name(f"{path}.key", sel.key, naming.check_config_key))


_ENV_SOURCES = ("field_ref", "resource_field_ref", "config_map_key_ref", "secret_key_ref")


def _env_source(path: str, env: core_pb2.EnvVar) -> Errors:
    src = env.value_from
    sources = _present(src, _ENV_SOURCES)
    if not sources:
        return [_invalid(path, "", "must specify one of: `fieldRef`, `resourceFieldRef`, "
                                   "`configMapKeyRef` or `secretKeyRef`")]
    errs: Errors = []
    if len(sources) > 1:
        errs.append(_invalid(path, "", "may not have more than one field specified at a time"))
    if env.value:
        errs.append(_invalid(path, "", "may not be specified when `value` is not empty"))
    for s in sources:
        spath = f"{path}.{_json_name(src, s)}"
        if s == "field_ref":
            errs += _field_ref(spath, src.field_ref, _ENV_FIELD_PATHS)
        elif s == "resource_field_ref":
            errs += _resource_field_ref(spath, src.resource_field_ref)
        else:
            errs += _key_selector(spath, getattr(src, s))
    return errs


def _env(path: str, env: Sequence[core_pb2.EnvVar]) -> Errors:
    errs: Errors = []
    for i, var in enumerate(env):
        errs += _name(f"{path}[{i}].name", var.name, naming.check_env_var_name)
        if var.HasField("value_from"):
            errs += _env_source(f"{path}[{i}].valueFrom", var)
    return errs


def _env_from(path: str, sources: Sequence[core_pb2.EnvFromSource]) -> Errors:
    errs: Errors = []
    for i, source in enumerate(sources):
        ipath = f"{path}[{i}]"
        errs += _optional_name(f"{ipath}.prefix", source.prefix, naming.check_env_var_name)
        refs = _present(source, ("config_map_ref", "secret_ref"))
        if len(refs) != 1:
            errs.append(_invalid(ipath, "", "must specify exactly one of: `configMapRef` or "
                                            "`secretRef`"))
        for ref in refs:
            errs += _name(f"{ipath}.{_json_name(source, ref)}.name", getattr(source, ref).name,
                          naming.check_dns1123_subdomain)
    return errs


def _container_ports(path: str, ports: Sequence[core_pb2.ContainerPort]) -> Errors:
    errs: Errors = []
    names: set[str] = set()
    for i, port in enumerate(ports):
        ipath = f"{path}[{i}]"
        if port.name:
            errs += _check(f"{ipath}.name", port.name, naming.check_port_name(port.name))
            if port.name in names:
                errs.append(_duplicate(f"{ipath}.name", port.name))
            names.add(port.name)
        if port.container_port == 0:
            errs.append(_required(f"{ipath}.containerPort"))
        else:
            errs += _between(f"{ipath}.containerPort", port.container_port, 1, _MAX_PORT)
        if port.host_port != 0:
            errs += _between(f"{ipath}.hostPort", port.host_port, 1, _MAX_PORT)
        errs += _one_of(f"{ipath}.protocol", port.protocol, _PROTOCOLS)
    return errs


def _quantity(path: str, q: meta_pb2.Quantity) -> tuple[Errors, Fraction | None]:
    """Parse a quantity; a bad or negative one is an error and yields no value."""
    try:
        value = quantity.parse(q.value)
    except quantity.QuantityError as e:
        return [_invalid(path, q.value, str(e))], None
    if value < 0:
        return [_invalid(path, q.value, "must be greater than or equal to 0")], None
    return [], value


def _resource_name(path: str, name: str) -> Errors:
    if name in _CONTAINER_RESOURCES:
        return []
    if name.startswith("hugepages-"):
        try:
            quantity.parse(name.removeprefix("hugepages-"))
        except quantity.QuantityError:
            return [_invalid(path, name, "must be a valid hugepages resource, e.g. hugepages-2Mi")]
        return []
    if "/" in name:
        return _check(path, name, naming.check_qualified_name(name))
    return [_invalid(path, name, "must be a standard resource for containers")]


def _resource_map(path: str, values: Mapping[str, meta_pb2.Quantity]
                  ) -> tuple[Errors, dict[str, Fraction]]:
    errs: Errors = []
    parsed: dict[str, Fraction] = {}
    for name in sorted(values):
        rpath = f"{path}[{name}]"
        errs += _resource_name(rpath, name)
        problems, value = _quantity(rpath, values[name])
        errs += problems
        if value is not None:
            parsed[name] = value
    return errs, parsed


def _resources(path: str, res: core_pb2.ResourceRequirements) -> Errors:
    limit_errs, limits = _resource_map(f"{path}.limits", res.limits)
    request_errs, requests = _resource_map(f"{path}.requests", res.requests)
    errs = limit_errs + request_errs
    for name in sorted(requests.keys() & limits.keys()):
        if requests[name] > limits[name]:
            errs.append(_invalid(f"{path}.requests[{name}]", res.requests[name].value,
                                 f"must be less than or equal to {name} limit of "
                                 f"{res.limits[name].value}"))
    return errs


def _volume_mounts(path: str, mounts: Sequence[core_pb2.VolumeMount],
                   volumes: frozenset[str]) -> Errors:
    errs: Errors = []
    mount_paths: set[str] = set()
    for i, mount in enumerate(mounts):
        ipath = f"{path}[{i}]"
        if not mount.name:
            errs.append(_required(f"{ipath}.name"))
        elif mount.name not in volumes:
            errs.append(_not_found(f"{ipath}.name", mount.name))
        if not mount.mount_path:
            errs.append(_required(f"{ipath}.mountPath"))
        elif mount.mount_path in mount_paths:
            errs.append(_invalid(f"{ipath}.mountPath", mount.mount_path, "must be unique"))
        mount_paths.add(mount.mount_path)
        if mount.sub_path:
            errs += _relative_path(f"{ipath}.subPath", mount.sub_path)
        if mount.HasField("mount_propagation"):
            errs += _one_of(f"{ipath}.mountPropagation", mount.mount_propagation,
                            _MOUNT_PROPAGATIONS)
    return errs


# --------------------------------------------------------------------------- pod: probes

_PROBE_HANDLERS = ("exec", "http_get", "tcp_socket", "grpc")
_LIFECYCLE_HANDLERS = ("exec", "http_get", "tcp_socket", "sleep")
_PROBES = (("liveness_probe", "livenessProbe"), ("readiness_probe", "readinessProbe"),
           ("startup_probe", "startupProbe"))


def _exec_action(path: str, action: core_pb2.ExecAction) -> Errors:
    return [] if action.command else [_required(f"{path}.command")]


def _http_get_action(path: str, action: core_pb2.HTTPGetAction) -> Errors:
    return (_port_num_or_name(f"{path}.port", action.port)
            + _one_of(f"{path}.scheme", action.scheme, ("HTTP", "HTTPS")))


def _tcp_socket_action(path: str, action: core_pb2.TCPSocketAction) -> Errors:
    return _port_num_or_name(f"{path}.port", action.port)


def _grpc_action(path: str, action: core_pb2.GRPCAction) -> Errors:
    return _between(f"{path}.port", action.port, 1, _MAX_PORT)


def _sleep_action(path: str, action: core_pb2.SleepAction) -> Errors:
    return _at_least(f"{path}.seconds", action.seconds, 0)


_HANDLER_CHECKS: Mapping[str, Callable[[str, Any], Errors]] = {
    "exec": _exec_action,
    "http_get": _http_get_action,
    "tcp_socket": _tcp_socket_action,
    "grpc": _grpc_action,
    "sleep": _sleep_action,
}


def _handler(path: str, msg: core_pb2.Probe | core_pb2.LifecycleHandler,
             handlers: Sequence[str]) -> Errors:
    """Exactly one handler is set, and it is valid."""
    present = _present(msg, handlers)
    if not present:
        return [_required(path, "must specify a handler type")]
    errs = [_forbidden(f"{path}.{_json_name(msg, h)}", "may not specify more than 1 handler type")
            for h in present[1:]]
    for h in present:
        errs += _HANDLER_CHECKS[h](f"{path}.{_json_name(msg, h)}", getattr(msg, h))
    return errs


def _probe(path: str, probe: core_pb2.Probe) -> Errors:
    errs = _handler(path, probe, _PROBE_HANDLERS)
    errs += _at_least(f"{path}.initialDelaySeconds", probe.initial_delay_seconds, 0)
    for field in ("timeout_seconds", "period_seconds", "success_threshold", "failure_threshold"):
        value = int(getattr(probe, field))
        if value != 0:  # 0 is unset; defaulting replaces it
            errs += _at_least(f"{path}.{_json_name(probe, field)}", value, 1)
    if probe.HasField("termination_grace_period_seconds"):
        errs += _at_least(f"{path}.terminationGracePeriodSeconds",
                          probe.termination_grace_period_seconds, 1)
    return errs


def _probes(path: str, c: core_pb2.Container, *, runs_alongside: bool) -> Errors:
    """Probe rules; ``runs_alongside`` is false for init containers that are not sidecars."""
    errs: Errors = []
    for field, json_name in _PROBES:
        if not c.HasField(field):
            continue
        ppath = f"{path}.{json_name}"
        if not runs_alongside:
            errs.append(_forbidden(ppath, "may not be set for init containers without "
                                          "restartPolicy=Always"))
            continue
        probe: core_pb2.Probe = getattr(c, field)
        errs += _probe(ppath, probe)
        if field != "readiness_probe" and probe.success_threshold not in (0, 1):
            errs.append(_invalid(f"{ppath}.successThreshold", probe.success_threshold,
                                 "must be 1"))
        if field == "readiness_probe" and probe.HasField("termination_grace_period_seconds"):
            errs.append(_invalid(f"{ppath}.terminationGracePeriodSeconds",
                                 probe.termination_grace_period_seconds,
                                 "must not be set for readinessProbes"))
    return errs


def _lifecycle(path: str, c: core_pb2.Container, *, runs_alongside: bool) -> Errors:
    if not c.HasField("lifecycle"):
        return []
    if not runs_alongside:
        return [_forbidden(f"{path}.lifecycle", "may not be set for init containers without "
                                                "restartPolicy=Always")]
    errs: Errors = []
    for field, json_name in (("post_start", "postStart"), ("pre_stop", "preStop")):
        if c.lifecycle.HasField(field):
            errs += _handler(f"{path}.lifecycle.{json_name}", getattr(c.lifecycle, field),
                             _LIFECYCLE_HANDLERS)
    return errs


# --------------------------------------------------------------------------- pod: spec


def _image(path: str, image: str) -> Errors:
    if not image:
        return [_required(path)]
    if image != image.strip():
        return [_invalid(path, image, "must not have leading or trailing whitespace")]
    return []


def _container_restart_policy(path: str, c: core_pb2.Container, *, init: bool) -> Errors:
    if not c.HasField("restart_policy"):
        return []
    if not init:
        return [_forbidden(f"{path}.restartPolicy", "may not be set for non-init containers")]
    return _one_of(f"{path}.restartPolicy", c.restart_policy, ("Always",))


def _container(path: str, c: core_pb2.Container, *, volumes: frozenset[str],
               init: bool) -> Errors:
    runs_alongside = not init or (c.HasField("restart_policy") and c.restart_policy == "Always")
    return (
        _name(f"{path}.name", c.name, naming.check_dns1123_label)
        + _image(f"{path}.image", c.image)
        + _container_ports(f"{path}.ports", c.ports)
        + _env(f"{path}.env", c.env)
        + _env_from(f"{path}.envFrom", c.env_from)
        + _resources(f"{path}.resources", c.resources)
        + _volume_mounts(f"{path}.volumeMounts", c.volume_mounts, volumes)
        + _probes(path, c, runs_alongside=runs_alongside)
        + _lifecycle(path, c, runs_alongside=runs_alongside)
        + _one_of(f"{path}.terminationMessagePolicy", c.termination_message_policy,
                  _TERMINATION_MESSAGE_POLICIES)
        + _one_of(f"{path}.imagePullPolicy", c.image_pull_policy, _PULL_POLICIES)
        + _container_restart_policy(path, c, init=init)
    )


def _all_containers(path: str, spec: core_pb2.PodSpec
                    ) -> list[tuple[str, core_pb2.Container, bool]]:
    """(path, container, is_init) for init containers, then containers."""
    return [
        *((f"{path}.initContainers[{i}]", c, True) for i, c in enumerate(spec.init_containers)),
        *((f"{path}.containers[{i}]", c, False) for i, c in enumerate(spec.containers)),
    ]


def _containers(path: str, spec: core_pb2.PodSpec, *, volumes: frozenset[str]) -> Errors:
    errs = [] if spec.containers else [_required(f"{path}.containers")]
    names: set[str] = set()
    for cpath, c, init in _all_containers(path, spec):
        errs += _container(cpath, c, volumes=volumes, init=init)
        if c.name and c.name in names:
            errs.append(_duplicate(f"{cpath}.name", c.name))
        names.add(c.name)
    return errs + _host_ports(path, spec)


def _host_ports(path: str, spec: core_pb2.PodSpec) -> Errors:
    """A host port may be claimed once per protocol and address across the pod."""
    errs: Errors = []
    claimed: set[tuple[int, str, str]] = set()
    for cpath, c, _ in _all_containers(path, spec):
        for j, port in enumerate(c.ports):
            ppath = f"{cpath}.ports[{j}].hostPort"
            if port.host_port == 0:
                continue
            if spec.host_network and port.host_port != port.container_port:
                errs.append(_invalid(ppath, port.host_port,
                                     "must match `containerPort` when `hostNetwork` is true"))
            key = (port.host_port, port.protocol, port.host_ip)
            if key in claimed:
                errs.append(_duplicate(ppath, f"{port.host_port}/{port.protocol}"))
            claimed.add(key)
    return errs


def _dns(path: str, spec: core_pb2.PodSpec) -> Errors:
    errs = _one_of(f"{path}.dnsPolicy", spec.dns_policy, _DNS_POLICIES)
    servers = spec.dns_config.nameservers
    if spec.dns_policy == "None" and not servers:
        errs.append(_required(f"{path}.dnsConfig.nameservers", "must provide at least one DNS "
                                                               "nameserver when `dnsPolicy` "
                                                               "is None"))
    if len(servers) > 3:
        errs.append(_invalid(f"{path}.dnsConfig.nameservers", ",".join(servers),
                             "must not have more than 3 nameservers"))
    for i, server in enumerate(servers):
        errs += _ip(f"{path}.dnsConfig.nameservers[{i}]", server)
    return errs


def _toleration(path: str, t: core_pb2.Toleration) -> Errors:
    errs = _optional_name(f"{path}.key", t.key, naming.check_qualified_name)
    if t.operator in ("", "Equal"):
        if not t.key:
            errs.append(_invalid(f"{path}.operator", t.operator,
                                 "operator must be Exists when `key` is empty, which means "
                                 '"match all values and all keys"'))
        errs += _check(f"{path}.value", t.value, naming.check_label_value(t.value))
    elif t.operator == "Exists":
        if t.value:
            errs.append(_invalid(f"{path}.value", t.value,
                                 "value must be empty when `operator` is 'Exists'"))
    else:
        errs.append(_not_supported(f"{path}.operator", t.operator, ("Equal", "Exists")))
    errs += _one_of(f"{path}.effect", t.effect, _TAINT_EFFECTS, required=False)
    if t.HasField("toleration_seconds") and t.effect != "NoExecute":
        errs.append(_invalid(f"{path}.effect", t.effect,
                             "effect must be 'NoExecute' when `tolerationSeconds` is set"))
    return errs


def _tolerations(path: str, tolerations: Sequence[core_pb2.Toleration]) -> Errors:
    errs: Errors = []
    for i, t in enumerate(tolerations):
        errs += _toleration(f"{path}[{i}]", t)
    return errs


def _node_requirement(path: str, req: core_pb2.NodeSelectorRequirement) -> Errors:
    errs = _name(f"{path}.key", req.key, naming.check_qualified_name)
    if req.operator in ("Gt", "Lt"):
        if len(req.values) != 1:
            return [*errs, _required(f"{path}.values", "must be specified single value when "
                                                       "`operator` is 'Lt' or 'Gt'")]
        if not req.values[0].lstrip("-").isdigit():
            errs.append(_invalid(f"{path}.values[0]", req.values[0], "must be an integer"))
        return errs
    if req.operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
        return [*errs, _not_supported(f"{path}.operator", req.operator,
                                      ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"))]
    errs += _set_operator(path, req.operator, req.values)
    for j, value in enumerate(req.values):
        errs += _check(f"{path}.values[{j}]", value, naming.check_label_value(value))
    return errs


def _node_field_requirement(path: str, req: core_pb2.NodeSelectorRequirement) -> Errors:
    errs = _one_of(f"{path}.key", req.key, ("metadata.name",))
    errs += _one_of(f"{path}.operator", req.operator, ("In", "NotIn"))
    if len(req.values) != 1:
        errs.append(_required(f"{path}.values", "must be only one value when `operator` is 'In' "
                                                "or 'NotIn' for node field selector"))
    return errs


def _node_selector_term(path: str, term: core_pb2.NodeSelectorTerm) -> Errors:
    errs: Errors = []
    for i, req in enumerate(term.match_expressions):
        errs += _node_requirement(f"{path}.matchExpressions[{i}]", req)
    for i, req in enumerate(term.match_fields):
        errs += _node_field_requirement(f"{path}.matchFields[{i}]", req)
    return errs


def _weight(path: str, weight: int) -> Errors:
    return _between(path, weight, 1, 100)


def _node_affinity(path: str, na: core_pb2.NodeAffinity) -> Errors:
    errs: Errors = []
    required = na.required_during_scheduling_ignored_during_execution
    rpath = f"{path}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
    if na.HasField("required_during_scheduling_ignored_during_execution"):
        if not required.node_selector_terms:
            errs.append(_required(rpath, "must have at least one node selector term"))
        for i, term in enumerate(required.node_selector_terms):
            errs += _node_selector_term(f"{rpath}[{i}]", term)
    ppath = f"{path}.preferredDuringSchedulingIgnoredDuringExecution"
    for i, pref in enumerate(na.preferred_during_scheduling_ignored_during_execution):
        errs += _weight(f"{ppath}[{i}].weight", pref.weight)
        errs += _node_selector_term(f"{ppath}[{i}].preference", pref.preference)
    return errs


def _pod_affinity_term(path: str, term: core_pb2.PodAffinityTerm) -> Errors:
    tpath = f"{path}.topologyKey"
    errs = [_required(tpath, "can not be empty")] if not term.topology_key else _check(
        tpath, term.topology_key, naming.check_qualified_name(term.topology_key))
    if term.HasField("label_selector"):
        errs += _label_selector(f"{path}.labelSelector", term.label_selector)
    if term.HasField("namespace_selector"):
        errs += _label_selector(f"{path}.namespaceSelector", term.namespace_selector)
    for i, ns in enumerate(term.namespaces):
        errs += _check(f"{path}.namespaces[{i}]", ns, naming.check_dns1123_label(ns))
    return errs


def _pod_affinity(path: str, pa: core_pb2.PodAffinity | core_pb2.PodAntiAffinity) -> Errors:
    errs: Errors = []
    rpath = f"{path}.requiredDuringSchedulingIgnoredDuringExecution"
    for i, term in enumerate(pa.required_during_scheduling_ignored_during_execution):
        errs += _pod_affinity_term(f"{rpath}[{i}]", term)
    ppath = f"{path}.preferredDuringSchedulingIgnoredDuringExecution"
    for i, weighted in enumerate(pa.preferred_during_scheduling_ignored_during_execution):
        errs += _weight(f"{ppath}[{i}].weight", weighted.weight)
        errs += _pod_affinity_term(f"{ppath}[{i}].podAffinityTerm", weighted.pod_affinity_term)
    return errs


def _affinity(path: str, a: core_pb2.Affinity) -> Errors:
    errs: Errors = []
    if a.HasField("node_affinity"):
        errs += _node_affinity(f"{path}.nodeAffinity", a.node_affinity)
    if a.HasField("pod_affinity"):
        errs += _pod_affinity(f"{path}.podAffinity", a.pod_affinity)
    if a.HasField("pod_anti_affinity"):
        errs += _pod_affinity(f"{path}.podAntiAffinity", a.pod_anti_affinity)
    return errs


def _topology_spread(path: str, constraints: Sequence[core_pb2.TopologySpreadConstraint]
                     ) -> Errors:
    errs: Errors = []
    seen: set[tuple[str, str]] = set()
    for i, c in enumerate(constraints):
        ipath = f"{path}[{i}]"
        if c.max_skew <= 0:
            errs.append(_invalid(f"{ipath}.maxSkew", c.max_skew, "must be greater than zero"))
        errs += _name(f"{ipath}.topologyKey", c.topology_key, naming.check_qualified_name)
        errs += _one_of(f"{ipath}.whenUnsatisfiable", c.when_unsatisfiable,
                        ("DoNotSchedule", "ScheduleAnyway"))
        if c.HasField("label_selector"):
            errs += _label_selector(f"{ipath}.labelSelector", c.label_selector)
        key = (c.topology_key, c.when_unsatisfiable)
        if key in seen:
            errs.append(_duplicate(ipath, f"{c.topology_key}, {c.when_unsatisfiable}"))
        seen.add(key)
    return errs


def _pod_spec(path: str, spec: core_pb2.PodSpec, *,
              restart_policies: Sequence[str] = _RESTART_POLICIES,
              extra_volumes: frozenset[str] = frozenset()) -> Errors:
    """Every rule of a pod spec; templates narrow ``restart_policies``."""
    volumes = frozenset(v.name for v in spec.volumes if v.name) | extra_volumes
    errs = _volumes(f"{path}.volumes", spec.volumes)
    errs += _containers(path, spec, volumes=volumes)
    errs += _one_of(f"{path}.restartPolicy", spec.restart_policy, restart_policies)
    errs += _dns(path, spec)
    if spec.HasField("termination_grace_period_seconds"):
        errs += _at_least(f"{path}.terminationGracePeriodSeconds",
                          spec.termination_grace_period_seconds, 0)
    if spec.HasField("active_deadline_seconds"):
        errs += _between(f"{path}.activeDeadlineSeconds", spec.active_deadline_seconds, 1,
                         _MAX_INT32)
    errs += _labels(f"{path}.nodeSelector", spec.node_selector)
    errs += _tolerations(f"{path}.tolerations", spec.tolerations)
    if spec.HasField("affinity"):
        errs += _affinity(f"{path}.affinity", spec.affinity)
    errs += _topology_spread(f"{path}.topologySpreadConstraints",
                             spec.topology_spread_constraints)
    errs += _optional_name(f"{path}.serviceAccountName", spec.service_account_name,
                           naming.check_dns1123_subdomain)
    errs += _optional_name(f"{path}.hostname", spec.hostname, naming.check_dns1123_label)
    errs += _optional_name(f"{path}.subdomain", spec.subdomain, naming.check_dns1123_label)
    return errs


def _validate_pod(pod: core_pb2.Pod) -> Errors:
    return _pod_spec("spec", pod.spec)


# --------------------------------------------------------------------------- workloads


def _pod_template(path: str, template: core_pb2.PodTemplateSpec, *, owner: str,
                  extra_volumes: frozenset[str] = frozenset()) -> Errors:
    """A controller's template: labels, annotations, and a pod spec that restarts Always."""
    errs = _labels(f"{path}.metadata.labels", template.metadata.labels)
    errs += _annotations(f"{path}.metadata.annotations", template.metadata.annotations)
    errs += _pod_spec(f"{path}.spec", template.spec, restart_policies=("Always",),
                      extra_volumes=extra_volumes)
    if template.spec.HasField("active_deadline_seconds"):
        errs.append(_forbidden(f"{path}.spec.activeDeadlineSeconds",
                               f"activeDeadlineSeconds in {owner} is not Supported"))
    return errs


def _workload_selector(path: str, spec: Any, *, owner: str) -> Errors:
    """Required, non-empty, well formed, and matching the template's labels."""
    if not spec.HasField("selector"):
        return [_required(f"{path}.selector")]
    sel: meta_pb2.LabelSelector = spec.selector
    if not sel.match_labels and not sel.match_expressions:
        return [_invalid(f"{path}.selector", sel, f"empty selector is invalid for {owner}")]
    errs = _label_selector(f"{path}.selector", sel)
    if errs:
        return errs
    try:
        parsed = selectors.from_proto(sel)
    except errors.BadRequest as e:
        return [_invalid(f"{path}.selector", sel, e.message)]
    labels = spec.template.metadata.labels
    if not parsed.matches(labels):
        errs.append(_invalid(f"{path}.template.metadata.labels", dict(labels),
                             "`selector` does not match template `labels`"))
    return errs


def _optional_at_least(path: str, msg: Message, field: str, low: int) -> Errors:
    return _at_least(path, int(getattr(msg, field)), low) if msg.HasField(field) else []


def _workload(spec: Any, *, owner: str, extra_volumes: frozenset[str] = frozenset()) -> Errors:
    """Rules every pod controller shares: selector, template, minReadySeconds."""
    return (
        _workload_selector("spec", spec, owner=owner)
        + _pod_template("spec.template", spec.template, owner=owner,
                        extra_volumes=extra_volumes)
        + _at_least("spec.minReadySeconds", spec.min_ready_seconds, 0)
    )


def _rolling_limits(path: str, rolling: Any, *, cap_surge: bool) -> Errors:
    """maxUnavailable and maxSurge: valid numbers or percentages, not both zero."""
    errs = _int_or_percent(f"{path}.maxUnavailable", rolling.max_unavailable, cap_100=True)
    errs += _int_or_percent(f"{path}.maxSurge", rolling.max_surge, cap_100=cap_surge)
    if not errs and _is_zero(rolling.max_unavailable) and _is_zero(rolling.max_surge):
        errs.append(_invalid(f"{path}.maxUnavailable", encode_message(rolling.max_unavailable),
                             "may not be 0 when `maxSurge` is 0"))
    return errs


def _deployment_strategy(path: str, strategy: apps_pb2.DeploymentStrategy) -> Errors:
    if strategy.type == "Recreate":
        if strategy.HasField("rolling_update"):
            return [_forbidden(f"{path}.rollingUpdate",
                               "may not be specified when strategy `type` is 'Recreate'")]
        return []
    if strategy.type == "RollingUpdate":
        if not strategy.HasField("rolling_update"):
            return [_required(f"{path}.rollingUpdate", "this should be defaulted and never "
                                                       "be nil")]
        return _rolling_limits(f"{path}.rollingUpdate", strategy.rolling_update,
                               cap_surge=False)
    return _one_of(f"{path}.type", strategy.type, ("Recreate", "RollingUpdate"))


def _validate_deployment(d: apps_pb2.Deployment) -> Errors:
    spec = d.spec
    errs = _workload(spec, owner="deployment")
    errs += _optional_at_least("spec.replicas", spec, "replicas", 0)
    errs += _deployment_strategy("spec.strategy", spec.strategy)
    errs += _optional_at_least("spec.revisionHistoryLimit", spec, "revision_history_limit", 0)
    if spec.HasField("progress_deadline_seconds"):
        deadline = spec.progress_deadline_seconds
        errs += _at_least("spec.progressDeadlineSeconds", deadline, 0)
        if deadline <= spec.min_ready_seconds:
            errs.append(_invalid("spec.progressDeadlineSeconds", deadline,
                                 "must be greater than minReadySeconds"))
    return errs


def _validate_replicaset(rs: apps_pb2.ReplicaSet) -> Errors:
    return (_workload(rs.spec, owner="replicaset")
            + _optional_at_least("spec.replicas", rs.spec, "replicas", 0))


def _statefulset_strategy(path: str, strategy: apps_pb2.StatefulSetUpdateStrategy) -> Errors:
    if strategy.type == "OnDelete":
        if strategy.HasField("rolling_update"):
            return [_invalid(f"{path}.rollingUpdate", encode_message(strategy.rolling_update),
                             "only allowed for updateStrategy 'RollingUpdate'")]
        return []
    if strategy.type != "RollingUpdate":
        return _one_of(f"{path}.type", strategy.type, ("RollingUpdate", "OnDelete"))
    rolling = strategy.rolling_update
    errs = _optional_at_least(f"{path}.rollingUpdate.partition", rolling, "partition", 0)
    if rolling.HasField("max_unavailable"):
        errs += _int_or_percent(f"{path}.rollingUpdate.maxUnavailable", rolling.max_unavailable,
                                cap_100=True)
    return errs


def _claim_templates(path: str, claims: Sequence[core_pb2.PersistentVolumeClaim]) -> Errors:
    errs: Errors = []
    for i, claim in enumerate(claims):
        errs += _name(f"{path}[{i}].metadata.name", claim.metadata.name,
                      naming.check_dns1123_subdomain)
    return errs + _unique([c.metadata.name for c in claims],
                          lambda i: f"{path}[{i}].metadata.name")


def _validate_statefulset(sts: apps_pb2.StatefulSet) -> Errors:
    spec = sts.spec
    claims = frozenset(c.metadata.name for c in spec.volume_claim_templates if c.metadata.name)
    errs = _workload(spec, owner="statefulset", extra_volumes=claims)
    errs += _optional_at_least("spec.replicas", spec, "replicas", 0)
    errs += _optional_at_least("spec.revisionHistoryLimit", spec, "revision_history_limit", 0)
    errs += _one_of("spec.podManagementPolicy", spec.pod_management_policy,
                    ("OrderedReady", "Parallel"))
    errs += _statefulset_strategy("spec.updateStrategy", spec.update_strategy)
    errs += _claim_templates("spec.volumeClaimTemplates", spec.volume_claim_templates)
    retention = spec.persistent_volume_claim_retention_policy
    for field, json_name in (("when_deleted", "whenDeleted"), ("when_scaled", "whenScaled")):
        errs += _one_of(f"spec.persistentVolumeClaimRetentionPolicy.{json_name}",
                        getattr(retention, field), ("Retain", "Delete"))
    return errs + _at_least("spec.ordinals.start", spec.ordinals.start, 0)


def _daemonset_strategy(path: str, strategy: apps_pb2.DaemonSetUpdateStrategy) -> Errors:
    if strategy.type == "OnDelete":
        return []
    if strategy.type != "RollingUpdate":
        return _one_of(f"{path}.type", strategy.type, ("RollingUpdate", "OnDelete"))
    if not strategy.HasField("rolling_update"):
        return [_required(f"{path}.rollingUpdate")]
    return _rolling_limits(f"{path}.rollingUpdate", strategy.rolling_update, cap_surge=True)


def _validate_daemonset(ds: apps_pb2.DaemonSet) -> Errors:
    spec = ds.spec
    return (_workload(spec, owner="daemonset")
            + _daemonset_strategy("spec.updateStrategy", spec.update_strategy)
            + _optional_at_least("spec.revisionHistoryLimit", spec, "revision_history_limit", 0))


# --------------------------------------------------------------------------- service


def _service_port(path: str, port: core_pb2.ServicePort, spec: core_pb2.ServiceSpec
                  ) -> Errors:
    errs: Errors = []
    if not port.name:
        if len(spec.ports) > 1:
            errs.append(_required(f"{path}.name"))
    else:
        errs += _check(f"{path}.name", port.name, naming.check_dns1123_label(port.name))
    errs += _between(f"{path}.port", port.port, 1, _MAX_PORT)
    errs += _one_of(f"{path}.protocol", port.protocol, _PROTOCOLS)
    errs += _port_num_or_name(f"{path}.targetPort", port.target_port)
    if port.node_port != 0:
        errs += _between(f"{path}.nodePort", port.node_port, 0, _MAX_PORT)
        if spec.type == "ClusterIP":
            errs.append(_forbidden(f"{path}.nodePort",
                                   "may not be used when `type` is 'ClusterIP'"))
    return errs


def _service_ports(spec: core_pb2.ServiceSpec) -> Errors:
    optional = spec.type == "ExternalName" or spec.cluster_ip == "None"
    errs = [] if spec.ports or optional else [_required("spec.ports")]
    names: set[str] = set()
    keys: set[tuple[int, str]] = set()
    for i, port in enumerate(spec.ports):
        ipath = f"spec.ports[{i}]"
        errs += _service_port(ipath, port, spec)
        if port.name and port.name in names:
            errs.append(_duplicate(f"{ipath}.name", port.name))
        names.add(port.name)
        if (port.port, port.protocol) in keys:
            errs.append(_duplicate(ipath, f"{port.port}/{port.protocol}"))
        keys.add((port.port, port.protocol))
    return errs


def _cluster_ips(spec: core_pb2.ServiceSpec) -> Errors:
    if spec.type == "ExternalName":
        if spec.cluster_ip:
            return [_forbidden("spec.clusterIP", "may not be set for ExternalName services")]
        return []
    errs: Errors = []
    for path, ip in (("spec.clusterIP", spec.cluster_ip),
                     *((f"spec.clusterIPs[{i}]", x) for i, x in enumerate(spec.cluster_ips))):
        if ip not in ("", "None") and not _is_ip(ip):
            errs.append(_invalid(path, ip, "must be empty, 'None', or a valid IP address"))
    if spec.cluster_ip == "None" and spec.type in ("NodePort", "LoadBalancer"):
        errs.append(_invalid("spec.clusterIP", spec.cluster_ip,
                             f"may not be set to 'None' for {spec.type} services"))
    return errs


def _external_name(spec: core_pb2.ServiceSpec) -> Errors:
    if spec.type != "ExternalName":
        return []
    name = spec.external_name
    if not name:
        return [_required("spec.externalName")]
    return _check("spec.externalName", name, naming.check_dns1123_subdomain(name.rstrip(".")))


def _service_policies(spec: core_pb2.ServiceSpec) -> Errors:
    errs = _one_of("spec.sessionAffinity", spec.session_affinity, _SESSION_AFFINITIES)
    timeout = spec.session_affinity_config.client_ip
    if timeout.HasField("timeout_seconds"):
        errs += _between("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                         timeout.timeout_seconds, 1, 86400)
    errs += _one_of("spec.externalTrafficPolicy", spec.external_traffic_policy,
                    _TRAFFIC_POLICIES, required=False)
    if spec.HasField("internal_traffic_policy"):
        errs += _one_of("spec.internalTrafficPolicy", spec.internal_traffic_policy,
                        _TRAFFIC_POLICIES)
    if spec.HasField("ip_family_policy"):
        errs += _one_of("spec.ipFamilyPolicy", spec.ip_family_policy, _IP_FAMILY_POLICIES)
    for i, family in enumerate(spec.ip_families):
        errs += _one_of(f"spec.ipFamilies[{i}]", family, ("IPv4", "IPv6"))
    return errs


def _validate_service(svc: core_pb2.Service) -> Errors:
    spec = svc.spec
    errs = _one_of("spec.type", spec.type, _SERVICE_TYPES)
    errs += _service_ports(spec)
    errs += _labels("spec.selector", spec.selector)
    errs += _cluster_ips(spec)
    errs += _external_name(spec)
    errs += _service_policies(spec)
    for i, ip in enumerate(spec.external_ips):
        errs += _ip(f"spec.externalIPs[{i}]", ip)
    return errs


# --------------------------------------------------------------------------- other kinds


def _config_keys(path: str, keys: Iterable[str]) -> Errors:
    errs: Errors = []
    for key in sorted(keys):
        errs += _check(f"{path}[{key}]", key, naming.check_config_key(key))
    return errs


def _validate_configmap(cm: core_pb2.ConfigMap) -> Errors:
    errs = _config_keys("data", cm.data) + _config_keys("binaryData", cm.binary_data)
    for key in sorted(cm.data.keys() & cm.binary_data.keys()):
        errs.append(_invalid(f"data[{key}]", key, "duplicate of key present in binaryData"))
    size = sum(len(v.encode()) for v in cm.data.values())
    size += sum(len(v) for v in cm.binary_data.values())
    if size > _MAX_DATA_BYTES:
        errs.append(_too_long("data", _MAX_DATA_BYTES))
    return errs


def _validate_secret(secret: core_pb2.Secret) -> Errors:
    errs = _config_keys("data", secret.data) + _config_keys("stringData", secret.string_data)
    size = sum(len(v) for v in secret.data.values())
    size += sum(len(v.encode()) for v in secret.string_data.values())
    if size > _MAX_DATA_BYTES:
        errs.append(_too_long("data", _MAX_DATA_BYTES))
    return errs


def _validate_node(node: core_pb2.Node) -> Errors:
    spec = node.spec
    errs: Errors = []
    seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(spec.taints):
        ipath = f"spec.taints[{i}]"
        errs += _check(f"{ipath}.key", taint.key, naming.check_qualified_name(taint.key))
        errs += _check(f"{ipath}.value", taint.value, naming.check_label_value(taint.value))
        errs += _one_of(f"{ipath}.effect", taint.effect, _TAINT_EFFECTS)
        if (taint.key, taint.effect) in seen:
            errs.append(_duplicate(ipath, f"{taint.key}:{taint.effect}"))
        seen.add((taint.key, taint.effect))
    if spec.pod_cidr:
        errs += _cidr("spec.podCIDR", spec.pod_cidr)
    for i, cidr in enumerate(spec.pod_cidrs):
        errs += _cidr(f"spec.podCIDRs[{i}]", cidr)
    return errs


def _validate_lease(lease: coordination_pb2.Lease) -> Errors:
    spec = lease.spec
    errs: Errors = []
    if spec.HasField("lease_duration_seconds") and spec.lease_duration_seconds <= 0:
        errs.append(_invalid("spec.leaseDurationSeconds", spec.lease_duration_seconds,
                             "must be greater than 0"))
    return errs + _optional_at_least("spec.leaseTransitions", spec, "lease_transitions", 0)


def _validate_event(event: core_pb2.Event) -> Errors:
    errs: Errors = []
    if len(event.reason.encode()) > _MAX_EVENT_REASON:
        errs.append(_too_long("reason", _MAX_EVENT_REASON))
    return errs + _one_of("type", event.type, ("Normal", "Warning"), required=False)


def _endpoint_addresses(path: str, addresses: Sequence[core_pb2.EndpointAddress]) -> Errors:
    errs: Errors = []
    for i, address in enumerate(addresses):
        ipath = f"{path}[{i}]"
        errs += _ip(f"{ipath}.ip", address.ip)
        errs += _optional_name(f"{ipath}.hostname", address.hostname, naming.check_dns1123_label)
        errs += _optional_name(f"{ipath}.nodeName", address.node_name,
                               naming.check_dns1123_subdomain)
    return errs


def _endpoint_ports(path: str, ports: Sequence[core_pb2.EndpointPort]) -> Errors:
    errs: Errors = []
    for i, port in enumerate(ports):
        ipath = f"{path}[{i}]"
        if port.name:
            errs += _check(f"{ipath}.name", port.name, naming.check_dns1123_label(port.name))
        elif len(ports) > 1:
            errs.append(_required(f"{ipath}.name"))
        errs += _between(f"{ipath}.port", port.port, 1, _MAX_PORT)
        errs += _one_of(f"{ipath}.protocol", port.protocol, _PROTOCOLS)
    return errs + _unique([p.name for p in ports], lambda i: f"{path}[{i}].name")


def _validate_endpoints(ep: core_pb2.Endpoints) -> Errors:
    errs: Errors = []
    for i, subset in enumerate(ep.subsets):
        spath = f"subsets[{i}]"
        errs += _endpoint_addresses(f"{spath}.addresses", subset.addresses)
        errs += _endpoint_addresses(f"{spath}.notReadyAddresses", subset.not_ready_addresses)
        errs += _endpoint_ports(f"{spath}.ports", subset.ports)
    return errs


# --------------------------------------------------------------------------- security.istio.io

_MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
_POLICY_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
_TARGET_REF_KINDS = (("", "Service"), ("networking.istio.io", "ServiceEntry"),
                     ("gateway.networking.k8s.io", "Gateway"),
                     ("gateway.networking.k8s.io", "GatewayClass"))
# Condition keys Istio knows, exact and "key[name]" prefixes.
_CONDITION_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.principal",
                   "request.auth.principal", "request.auth.audiences",
                   "request.auth.presenter", "destination.ip", "destination.port",
                   "connection.sni")
_CONDITION_MAP_KEYS = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
_NO_RULES = ("{action} action without `rules` is meaningless as it will never be triggered, "
             "add an empty rule `{{}}` if you want it be triggered for every request")


def _istio_selector(path: str, spec: Any) -> Errors:
    """Istio's rules: no empty key, no wildcard in a key or value."""
    errs: Errors = []
    for key, value in sorted(spec.selector.match_labels.items()):
        if not key:
            errs.append(_invalid(f"{path}.matchLabels", key, "empty key is not supported"))
        if "*" in key or "*" in value:
            errs.append(_invalid(f"{path}.matchLabels[{key}]", value,
                                 "wildcard is not supported in selector"))
    return errs


def _validate_peer_authentication(pa: security_pb2.PeerAuthentication) -> Errors:
    spec = pa.spec
    errs = _istio_selector("spec.selector", spec)
    errs += _one_of("spec.mtls.mode", spec.mtls.mode, _MTLS_MODES, required=False)
    if spec.port_level_mtls and not spec.selector.match_labels:
        errs.append(_forbidden("spec.portLevelMtls",
                               "mesh/namespace peer authentication cannot have port level mTLS "
                               "(set spec.selector)"))
    for port, mtls in sorted(spec.port_level_mtls.items()):
        errs += _between(f"spec.portLevelMtls[{port}]", port, 1, _MAX_PORT)
        errs += _one_of(f"spec.portLevelMtls[{port}].mode", mtls.mode, _MTLS_MODES,
                        required=False)
    return errs


def _target_refs(spec: security_pb2.AuthorizationPolicySpec) -> Errors:
    errs: Errors = []
    set_ = _present(spec, ("selector", "target_ref")) + (["target_refs"] if spec.target_refs
                                                          else [])
    if len(set_) > 1:
        errs.append(_forbidden("spec", "only one of selector, targetRef or targetRefs may be set"))
    refs = [("spec.targetRef", spec.target_ref)] if spec.HasField("target_ref") else []
    refs += [(f"spec.targetRefs[{i}]", r) for i, r in enumerate(spec.target_refs)]
    for path, ref in refs:
        if not ref.name:
            errs.append(_required(f"{path}.name"))
        if ref.namespace:
            errs.append(_forbidden(f"{path}.namespace",
                                   "cross namespace referencing is not supported"))
        group = "" if ref.group == "core" else ref.group
        if (group, ref.kind) not in _TARGET_REF_KINDS:
            errs.append(_not_supported(f"{path}.kind", f"{ref.group}/{ref.kind}".lstrip("/"),
                                       [f"{g}/{k}".lstrip("/") for g, k in _TARGET_REF_KINDS]))
    return errs


def _no_empty(path: str, values: Sequence[str]) -> Errors:
    return [_invalid(f"{path}[{i}]", v, "empty value not allowed")
            for i, v in enumerate(values) if not v]


def _ip_blocks(path: str, values: Sequence[str]) -> Errors:
    errs: Errors = []
    for i, v in enumerate(values):
        if v and "/" in v:
            errs += _cidr(f"{path}[{i}]", v)
        elif v and not _is_ip(v):
            errs.append(_invalid(f"{path}[{i}]", v, "must be an IP address or a CIDR"))
    return errs


def _port_strings(path: str, values: Sequence[str]) -> Errors:
    return [_invalid(f"{path}[{i}]", v, "must be a port number between 0 and 65535")
            for i, v in enumerate(values)
            if v and not (v.isascii() and v.isdigit() and int(v) <= _MAX_PORT)]


def _service_accounts(path: str, values: Sequence[str]) -> Errors:
    errs: Errors = []
    for i, v in enumerate(values):
        parts = v.split("/")
        if len(parts) > 2 or not all(parts) or "*" in v:
            errs.append(_invalid(f"{path}[{i}]", v,
                                 "must be \"<name>\" or \"<namespace>/<name>\", without wildcards"))
    return errs


_SOURCE_FIELDS = ("principals", "not_principals", "request_principals", "not_request_principals",
                  "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks", "remote_ip_blocks",
                  "not_remote_ip_blocks", "service_accounts", "not_service_accounts")
_OPERATION_FIELDS = ("hosts", "not_hosts", "ports", "not_ports", "methods", "not_methods", "paths",
                     "not_paths")
_CUSTOM_FORBIDDEN_SOURCE = ("namespaces", "not_namespaces", "service_accounts",
                            "not_service_accounts", "principals", "not_principals",
                            "request_principals", "not_request_principals")


def _source(path: str, src: security_pb2.Source, *, custom: bool) -> Errors:
    errs: Errors = []
    if not any(getattr(src, f) for f in _SOURCE_FIELDS):
        errs.append(_required(path, "must not be empty"))
    for f in _SOURCE_FIELDS:
        errs += _no_empty(f"{path}.{_json_name(src, f)}", getattr(src, f))
    if (src.principals or src.not_principals or src.namespaces or src.not_namespaces) and (
            src.service_accounts or src.not_service_accounts):
        errs.append(_forbidden(f"{path}.serviceAccounts",
                               "cannot be set together with namespaces or principals"))
    for f in ("ip_blocks", "not_ip_blocks", "remote_ip_blocks", "not_remote_ip_blocks"):
        errs += _ip_blocks(f"{path}.{_json_name(src, f)}", getattr(src, f))
    for f in ("service_accounts", "not_service_accounts"):
        errs += _service_accounts(f"{path}.{_json_name(src, f)}", getattr(src, f))
    if custom:
        errs += [_forbidden(f"{path}.{_json_name(src, f)}", "not supported with CUSTOM action")
                 for f in _CUSTOM_FORBIDDEN_SOURCE if getattr(src, f)]
    return errs


def _operation(path: str, op: security_pb2.Operation) -> Errors:
    errs: Errors = []
    if not any(getattr(op, f) for f in _OPERATION_FIELDS):
        errs.append(_required(path, "must not be empty"))
    for f in _OPERATION_FIELDS:
        errs += _no_empty(f"{path}.{_json_name(op, f)}", getattr(op, f))
    errs += _port_strings(f"{path}.ports", op.ports)
    errs += _port_strings(f"{path}.notPorts", op.not_ports)
    return errs


def _condition_values(path: str, key: str, values: Sequence[str]) -> Errors:
    errs = _no_empty(path, values)
    if key in ("source.ip", "remote.ip", "destination.ip"):
        errs += _ip_blocks(path, values)
    elif key == "destination.port":
        errs += _port_strings(path, values)
    return errs


def _condition(path: str, cond: security_pb2.Condition, *, custom: bool) -> Errors:
    key = cond.key
    if not key:
        return [_required(f"{path}.key")]
    errs: Errors = []
    if key.startswith(_CONDITION_MAP_KEYS):
        prefix = next(p for p in _CONDITION_MAP_KEYS if key.startswith(p))
        open_ = key.find("[")
        if not (key.endswith("]") and open_ >= len(prefix) and open_ < len(key) - 2):
            errs.append(_invalid(f"{path}.key", key, "should have the form a[b]"))
    elif key not in _CONDITION_KEYS:
        errs.append(_not_supported(f"{path}.key", key,
                                   [*_CONDITION_KEYS, *(f"{p}[...]" for p in _CONDITION_MAP_KEYS)]))
    if not cond.values and not cond.not_values:
        errs.append(_required(f"{path}.values", "at least one of values or notValues must be set"))
    errs += _condition_values(f"{path}.values", key, cond.values)
    errs += _condition_values(f"{path}.notValues", key, cond.not_values)
    if custom and (key in ("source.namespace", "source.serviceAccount", "source.principal")
                   or key.startswith("request.auth.")):
        errs.append(_forbidden(f"{path}.key", f"{key} is not supported with CUSTOM action"))
    return errs


def _rule(path: str, rule: security_pb2.Rule, *, custom: bool) -> Errors:
    errs: Errors = []
    for j, src in enumerate(rule.from_):
        spath = f"{path}.from[{j}].source"
        errs += (_source(spath, src.source, custom=custom) if src.HasField("source")
                 else [_required(spath)])
    for j, to in enumerate(rule.to):
        opath = f"{path}.to[{j}].operation"
        errs += _operation(opath, to.operation) if to.HasField("operation") else [_required(opath)]
    for j, cond in enumerate(rule.when):
        errs += _condition(f"{path}.when[{j}]", cond, custom=custom)
    return errs


def _validate_authorization_policy(ap: security_pb2.AuthorizationPolicy) -> Errors:
    spec = ap.spec
    errs = _target_refs(spec) + _istio_selector("spec.selector", spec)
    errs += _one_of("spec.action", spec.action, _POLICY_ACTIONS, required=False)
    custom = spec.action == "CUSTOM"
    if spec.action in ("DENY", "CUSTOM") and not spec.rules:
        errs.append(_required("spec.rules", _NO_RULES.format(action=spec.action)))
    if custom and not spec.provider.name:
        errs.append(_required("spec.provider.name", "a CUSTOM policy names its provider"))
    if not custom and spec.HasField("provider"):
        errs.append(_forbidden("spec.provider",
                               f"may only be set with action CUSTOM, not {spec.action or 'ALLOW'}"))
    for i, rule in enumerate(spec.rules):
        errs += _rule(f"spec.rules[{i}]", rule, custom=custom)
    return errs


# -------------------------------------------------------------------- rbac.authorization.k8s.io

_RBAC_GROUP = "rbac.authorization.k8s.io"
_SUBJECT_KINDS = ("ServiceAccount", "User", "Group")


def _policy_rules(rules: Sequence[rbac_pb2.PolicyRule], *, namespaced: bool) -> Errors:
    errs: Errors = []
    for i, rule in enumerate(rules):
        path = f"rules[{i}]"
        if not rule.verbs:
            errs.append(_required(f"{path}.verbs", "verbs must contain at least one value"))
        if rule.non_resource_urls:
            if namespaced:
                errs.append(_invalid(f"{path}.nonResourceURLs", list(rule.non_resource_urls),
                                     "namespaced rules cannot apply to non-resource URLs"))
            if rule.api_groups or rule.resources or rule.resource_names:
                errs.append(_invalid(f"{path}.nonResourceURLs", list(rule.non_resource_urls),
                                     "rules cannot apply to both regular resources and "
                                     "non-resource URLs"))
            continue
        if not rule.api_groups:
            errs.append(_required(f"{path}.apiGroups",
                                  "resource rules must supply at least one api group"))
        if not rule.resources:
            errs.append(_required(f"{path}.resources",
                                  "resource rules must supply at least one resource"))
    return errs


def _validate_role(role: rbac_pb2.Role) -> Errors:
    return _policy_rules(role.rules, namespaced=True)


def _validate_cluster_role(role: rbac_pb2.ClusterRole) -> Errors:
    errs = _policy_rules(role.rules, namespaced=False)
    for i, sel in enumerate(role.aggregation_rule.cluster_role_selectors):
        errs += _label_selector(f"aggregationRule.clusterRoleSelectors[{i}]", sel)
    return errs


def _subjects(subjects: Sequence[rbac_pb2.Subject], *, namespaced: bool) -> Errors:
    errs: Errors = []
    for i, subject in enumerate(subjects):
        path = f"subjects[{i}]"
        if not subject.name:
            errs.append(_required(f"{path}.name"))
        if subject.kind == "ServiceAccount":
            if subject.api_group:
                errs.append(_not_supported(f"{path}.apiGroup", subject.api_group, ("",)))
            if subject.name:
                errs += _check(f"{path}.name", subject.name,
                               naming.check_dns1123_subdomain(subject.name))
            if not namespaced and not subject.namespace:
                errs.append(_required(f"{path}.namespace"))
        elif subject.kind in ("User", "Group"):
            if subject.api_group != _RBAC_GROUP:
                errs.append(_not_supported(f"{path}.apiGroup", subject.api_group,
                                           (_RBAC_GROUP,)))
        else:
            errs.append(_not_supported(f"{path}.kind", subject.kind, _SUBJECT_KINDS))
    return errs


def _role_ref(ref: rbac_pb2.RoleRef, kinds: Sequence[str]) -> Errors:
    errs: Errors = []
    if ref.api_group != _RBAC_GROUP:
        errs.append(_not_supported("roleRef.apiGroup", ref.api_group, (_RBAC_GROUP,)))
    if ref.kind not in kinds:
        errs.append(_not_supported("roleRef.kind", ref.kind, kinds))
    return errs + _name("roleRef.name", ref.name, naming.check_path_segment_name)


def _validate_role_binding(binding: rbac_pb2.RoleBinding) -> Errors:
    return (_role_ref(binding.role_ref, ("Role", "ClusterRole"))
            + _subjects(binding.subjects, namespaced=True))


def _validate_cluster_role_binding(binding: rbac_pb2.ClusterRoleBinding) -> Errors:
    return (_role_ref(binding.role_ref, ("ClusterRole",))
            + _subjects(binding.subjects, namespaced=False))


# --------------------------------------------------------------------------- networking.k8s.io

_POLICY_TYPES = ("Ingress", "Egress")


def _network_policy_port(path: str, port: networking_pb2.NetworkPolicyPort) -> Errors:
    errs = _one_of(f"{path}.protocol", port.protocol, _PROTOCOLS)
    if port.HasField("port"):
        errs += _port_num_or_name(f"{path}.port", port.port)
    if port.HasField("end_port"):
        if not port.HasField("port"):
            errs.append(_required(f"{path}.port",
                                  "must be specified when `endPort` is specified"))
        elif port.port.WhichOneof("value") != "int_val":
            errs.append(_invalid(f"{path}.endPort", port.end_port,
                                 "may not be specified when `port` is non-numeric"))
        elif port.end_port < port.port.int_val:
            errs.append(_invalid(f"{path}.endPort", port.end_port,
                                 "must be greater than or equal to `port`"))
        errs += _between(f"{path}.endPort", port.end_port, 1, _MAX_PORT)
    return errs


def _ip_block(path: str, block: networking_pb2.IPBlock) -> Errors:
    if not block.cidr:
        return [_required(f"{path}.cidr")]
    errs = _cidr(f"{path}.cidr", block.cidr)
    if errs:
        return errs
    outer = ipaddress.ip_network(block.cidr, strict=False)
    for i, text in enumerate(block.except_):
        epath = f"{path}.except[{i}]"
        bad = _cidr(epath, text)
        if bad:
            errs += bad
            continue
        inner = ipaddress.ip_network(text, strict=False)
        if not _strict_subnet(inner, outer):
            errs.append(_invalid(epath, text, "must be a strict subset of `cidr`"))
    return errs


def _strict_subnet(inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
                   outer: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer) and inner != outer
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer) and inner != outer
    return False


def _network_policy_peer(path: str, peer: networking_pb2.NetworkPolicyPeer) -> Errors:
    errs: Errors = []
    for field in ("pod_selector", "namespace_selector"):
        if peer.HasField(field):
            errs += _label_selector(f"{path}.{_json_name(peer, field)}", getattr(peer, field))
    if peer.HasField("ip_block"):
        errs += _ip_block(f"{path}.ipBlock", peer.ip_block)
    present = _present(peer, ("pod_selector", "namespace_selector", "ip_block"))
    if not present:
        errs.append(_required(path, "must specify a peer"))
    elif len(present) > 1 and "ip_block" in present:
        errs.append(_forbidden(path, "may not specify both ipBlock and another peer"))
    return errs


def _validate_network_policy(np: networking_pb2.NetworkPolicy) -> Errors:
    """Kubernetes' rules: selectors, protocols, ports and endPort ranges, one kind
    of peer with ipBlock, except inside cidr, policyTypes Ingress/Egress."""
    spec = np.spec
    errs = _label_selector("spec.podSelector", spec.pod_selector)
    rules: list[tuple[str, Any, Sequence[networking_pb2.NetworkPolicyPeer]]] = [
        *((f"spec.ingress[{i}]", r, r.from_) for i, r in enumerate(spec.ingress)),
        *((f"spec.egress[{i}]", r, r.to) for i, r in enumerate(spec.egress))]
    for path, rule, peers in rules:
        peer_key = "from" if path.startswith("spec.ingress") else "to"
        for j, port in enumerate(rule.ports):
            errs += _network_policy_port(f"{path}.ports[{j}]", port)
        for j, peer in enumerate(peers):
            errs += _network_policy_peer(f"{path}.{peer_key}[{j}]", peer)
    for i, kind in enumerate(spec.policy_types):
        errs += _one_of(f"spec.policyTypes[{i}]", kind, _POLICY_TYPES)
    errs += _unique(list(spec.policy_types), lambda i: f"spec.policyTypes[{i}]")
    if len(spec.policy_types) > len(_POLICY_TYPES):
        errs.append(_invalid("spec.policyTypes", list(spec.policy_types),
                             "may not specify more than two policyTypes"))
    return errs


_VALIDATORS: Mapping[str, Callable[[Any], Errors]] = {
    "Pod": _validate_pod,
    "Service": _validate_service,
    "Deployment": _validate_deployment,
    "ReplicaSet": _validate_replicaset,
    "StatefulSet": _validate_statefulset,
    "DaemonSet": _validate_daemonset,
    "ConfigMap": _validate_configmap,
    "Secret": _validate_secret,
    "Node": _validate_node,
    "Lease": _validate_lease,
    "Event": _validate_event,
    "Endpoints": _validate_endpoints,
    "PeerAuthentication": _validate_peer_authentication,
    "AuthorizationPolicy": _validate_authorization_policy,
    "NetworkPolicy": _validate_network_policy,
    "Role": _validate_role,
    "ClusterRole": _validate_cluster_role,
    "RoleBinding": _validate_role_binding,
    "ClusterRoleBinding": _validate_cluster_role_binding,
    # networking.istio.io: VirtualService, DestinationRule, Gateway, ServiceEntry.
    **trafficrules.VALIDATORS,
    **autoscaling.VALIDATORS,
}

# --------------------------------------------------------------------------- updates

_POD_UPDATE_FORBIDDEN = (
    "pod updates may not change fields other than spec.containers[*].image, "
    "spec.initContainers[*].image, spec.activeDeadlineSeconds, spec.tolerations (only "
    "additions to existing tolerations) or spec.nodeName (only binding)"
)
_STATEFULSET_UPDATE_FORBIDDEN = (
    "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', "
    "'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and "
    "'minReadySeconds' are forbidden"
)
_IMMUTABLE = "field is immutable"
_IMMUTABLE_WHEN_SET = "field is immutable when `immutable` is set"


def _immutable(path: str, new: object, old: object) -> Errors:
    return [] if new == old else [_invalid(path, new, _IMMUTABLE)]


def _metadata_update(new: meta_pb2.ObjectMeta, old: meta_pb2.ObjectMeta) -> Errors:
    errs = _immutable("metadata.name", new.name, old.name)
    errs += _immutable("metadata.namespace", new.namespace, old.namespace)
    if new.uid and old.uid:
        errs += _immutable("metadata.uid", new.uid, old.uid)
    return errs


def _without(spec: _M, fields: Sequence[str]) -> _M:
    """A copy of ``spec`` with the given fields cleared, for comparing the rest."""
    stripped = copy.deepcopy(spec)
    for field in fields:
        stripped.ClearField(field)
    return stripped


def _pod_spec_rest(spec: core_pb2.PodSpec, *, clear_node: bool) -> core_pb2.PodSpec:
    """The parts of a pod spec that may never change on update."""
    fields = ["active_deadline_seconds", "tolerations"] + (["node_name"] if clear_node else [])
    rest = _without(spec, fields)
    for c in (*rest.init_containers, *rest.containers):
        c.ClearField("image")
    return rest


def _active_deadline_update(new: core_pb2.PodSpec, old: core_pb2.PodSpec) -> Errors:
    path = "spec.activeDeadlineSeconds"
    if not old.HasField("active_deadline_seconds"):
        return []
    if not new.HasField("active_deadline_seconds"):
        return [_invalid(path, "", "must not update from a positive integer to nil value")]
    if new.active_deadline_seconds > old.active_deadline_seconds:
        return [_invalid(path, new.active_deadline_seconds,
                         "must be less than or equal to previous value")]
    return []


def _tolerations_update(new: core_pb2.PodSpec, old: core_pb2.PodSpec) -> Errors:
    if all(t in new.tolerations for t in old.tolerations):
        return []
    return [_forbidden("spec.tolerations", "existing tolerations may not be removed or "
                                           "changed; only additions are allowed")]


def _pod_update(new: core_pb2.Pod, old: core_pb2.Pod) -> Errors:
    errs = _active_deadline_update(new.spec, old.spec) + _tolerations_update(new.spec, old.spec)
    binding = not old.spec.node_name
    if _pod_spec_rest(new.spec, clear_node=binding) != _pod_spec_rest(old.spec,
                                                                       clear_node=binding):
        errs.append(_forbidden("spec", _POD_UPDATE_FORBIDDEN))
    return errs


def _selector_update(new: Any, old: Any) -> Errors:
    if new.spec.selector == old.spec.selector:
        return []
    return [_invalid("spec.selector", new.spec.selector, _IMMUTABLE)]


_STATEFULSET_MUTABLE = ("replicas", "ordinals", "template", "update_strategy",
                        "revision_history_limit", "persistent_volume_claim_retention_policy",
                        "min_ready_seconds", "selector")


def _statefulset_update(new: apps_pb2.StatefulSet, old: apps_pb2.StatefulSet) -> Errors:
    errs = _selector_update(new, old)
    if _without(new.spec, _STATEFULSET_MUTABLE) != _without(old.spec, _STATEFULSET_MUTABLE):
        errs.append(_forbidden("spec", _STATEFULSET_UPDATE_FORBIDDEN))
    return errs


def _service_update(new: core_pb2.Service, old: core_pb2.Service) -> Errors:
    if not old.spec.cluster_ip or new.spec.type == "ExternalName":
        return []  # an ExternalName has no clusterIP: turning into one clears it
    return _immutable("spec.clusterIP", new.spec.cluster_ip, old.spec.cluster_ip)


def _is_immutable(obj: core_pb2.ConfigMap | core_pb2.Secret) -> bool:
    return obj.HasField("immutable") and obj.immutable


def _frozen_data_update(new: Any, old: Any, fields: Sequence[tuple[str, str]]) -> Errors:
    """Once ``immutable`` is true, it stays true and the data stays as it is."""
    if not _is_immutable(old):
        return []
    errs = [] if _is_immutable(new) else [_forbidden("immutable", _IMMUTABLE_WHEN_SET)]
    for field, json_name in fields:
        if dict(getattr(new, field)) != dict(getattr(old, field)):
            errs.append(_forbidden(json_name, _IMMUTABLE_WHEN_SET))
    return errs


def _configmap_update(new: core_pb2.ConfigMap, old: core_pb2.ConfigMap) -> Errors:
    return _frozen_data_update(new, old, (("data", "data"), ("binary_data", "binaryData")))


def _secret_update(new: core_pb2.Secret, old: core_pb2.Secret) -> Errors:
    return (_immutable("type", new.type, old.type)
            + _frozen_data_update(new, old, (("data", "data"), ("string_data", "stringData"))))


def _binding_update(new: Any, old: Any) -> Errors:
    if new.role_ref == old.role_ref:
        return []
    return [_invalid("roleRef", new.role_ref, "cannot change roleRef")]


_UPDATE_RULES: Mapping[str, Callable[[Any, Any], Errors]] = {
    "Pod": _pod_update,
    "Service": _service_update,
    "Deployment": _selector_update,
    "ReplicaSet": _selector_update,
    "StatefulSet": _statefulset_update,
    "DaemonSet": _selector_update,
    "ConfigMap": _configmap_update,
    "Secret": _secret_update,
    "RoleBinding": _binding_update,
    "ClusterRoleBinding": _binding_update,
}

# --------------------------------------------------------------------------- API


def apply_defaults(kind: Kind, obj: Message) -> None:
    """Fill Kubernetes' defaults in place (idempotent)."""
    defaulter = _DEFAULTERS.get(kind.kind)
    if defaulter is not None:
        defaulter(obj)


def validate(kind: Kind, obj: Message) -> list[FieldError]:
    """Every problem in a new object (after defaults), each naming its field path."""
    o: Any = obj
    errs = _validate_metadata(kind, o.metadata)
    rules = _VALIDATORS.get(kind.kind)
    if rules is not None:
        errs += rules(o)
    return errs


def validate_ephemeral_containers(new: core_pb2.Pod, old: core_pb2.Pod) -> Errors:
    """The pods/ephemeralcontainers subresource: containers may only be added
    (never changed or removed), each with a unique name and an image, and a
    target that is one of the pod's containers. Nothing else may change."""
    errs: Errors = []
    path = "spec.ephemeralContainers"
    before, after = list(old.spec.ephemeral_containers), list(new.spec.ephemeral_containers)
    if after[:len(before)] != before:
        errs.append(_forbidden(path, "existing ephemeral containers may not be changed or "
                                     "removed"))
    regular = {c.name for c in old.spec.containers}
    taken = regular | {c.name for c in old.spec.init_containers} | {c.name for c in before}
    for i, c in enumerate(after[len(before):], start=len(before)):
        here = f"{path}[{i}]"
        if not c.name:
            errs.append(_required(f"{here}.name"))
        else:
            errs += _name(f"{here}.name", c.name, naming.check_dns1123_label)
            if c.name in taken:
                errs.append(_duplicate(f"{here}.name", c.name))
            taken.add(c.name)
        if not c.image:
            errs.append(_required(f"{here}.image"))
        if c.target_container_name and c.target_container_name not in regular:
            errs.append(_not_found(f"{here}.targetContainerName", c.target_container_name))
    rest_new, rest_old = core_pb2.Pod(), core_pb2.Pod()
    rest_new.spec.CopyFrom(new.spec)
    rest_old.spec.CopyFrom(old.spec)
    rest_new.spec.ClearField("ephemeral_containers")
    rest_old.spec.ClearField("ephemeral_containers")
    if rest_new.spec != rest_old.spec:
        errs.append(_forbidden("spec", "only spec.ephemeralContainers may change through "
                                       "the ephemeralcontainers subresource"))
    return errs


def validate_update(kind: Kind, new: Message, old: Message) -> list[FieldError]:
    """validate(new) plus what may not change on update."""
    n: Any = new
    o: Any = old
    errs = validate(kind, new) + _metadata_update(n.metadata, o.metadata)
    rules = _UPDATE_RULES.get(kind.kind)
    if rules is not None:
        errs += rules(n, o)
    return errs
