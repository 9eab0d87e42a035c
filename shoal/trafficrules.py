"""Istio's defaults and validation rules for the networking.istio.io kinds.

VirtualService, DestinationRule, Gateway and ServiceEntry, checked the way
istiod's validating webhook checks them (its rules, Kubernetes' wording in
the messages), each problem a :class:`~shoal.errors.FieldError` naming the
field path in manifest spelling (``spec.http[0].route``). Pure functions, run
by :mod:`shoal.validation` on every write (apiserver and CLI alike).

    default_virtual_service(vs) / default_service_entry(se)   fill in place
    VALIDATORS[kind](obj)                                     every problem
    parse_duration("1.5s") -> 1.5                              Istio's durations

Where Istio allows something it then warns about (a route naming a subset that
no DestinationRule defines), validation accepts it; ``shoal mesh check`` warns.
"""

from __future__ import annotations

import http
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shoal import fielderrors, naming
from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.errors import FieldError

Errors = list[FieldError]

__all__ = ["VALIDATORS", "DurationError", "default_service_entry", "default_virtual_service",
           "parse_duration"]

_MAX_PORT = 65535
_RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited",
             "retriable-4xx", "refused-stream", "retriable-status-codes",
             "retriable-headers", "cancelled", "deadline-exceeded", "internal",
             "resource-exhausted", "unavailable")
_LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN",
              "LEAST_REQUEST")
_CLIENT_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
_SERVER_TLS_MODES = ("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL",
                     "OPTIONAL_MUTUAL")
_PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "MYSQL", "REDIS", "TCP",
              "TLS")
_LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
_RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
_MESH_GATEWAY = "mesh"
_HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RE2 has no backreferences or lookaround; Python's re has both.
_NOT_RE2 = re.compile(r"\\[1-9]|\(\?[=!]|\(\?<[=!]|\(\?P=")

# --------------------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


class DurationError(ValueError):
    """Not one of Istio's durations."""


def parse_duration(text: str) -> float:
    """Seconds in an Istio duration: ``"1.5s"``, ``"100ms"``, ``"1m30s"``, ``"0s"``.

    Go's duration syntax (what Istio's YAML takes): one or more number+unit
    pairs, units ns, us, ms, s, m, h; no sign. Raises :class:`DurationError`.
    """
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(text):
        raise DurationError(f"{text!r} is not a duration")
    return total


# --------------------------------------------------------------------------- errors


_show = fielderrors.show
_required = fielderrors.required
_invalid = fielderrors.invalid
_not_supported = fielderrors.not_supported
_forbidden = fielderrors.forbidden
_duplicate = fielderrors.duplicate


# --------------------------------------------------------------------------- small checks


def _duration(path: str, text: str, *, allow_zero: bool = False) -> Errors:
    """Istio's rule: at least 1ms, to ms precision (``allow_zero`` for a cookie ttl)."""
    if not text:
        return []
    try:
        seconds = parse_duration(text)
    except DurationError:
        return [_invalid(path, text, 'must be a duration such as "1.5s", "100ms" or "1m30s"')]
    millis = seconds * 1000
    if seconds == 0 and allow_zero:
        return []
    if millis < 1 - 1e-9:
        return [_invalid(path, text, "duration must be greater than 1ms")]
    if abs(millis - round(millis)) > 1e-6:
        return [_invalid(path, text, "only durations to ms precision are supported")]
    return []


def _port(path: str, number: int) -> Errors:
    if 1 <= number <= _MAX_PORT:
        return []
    return [_invalid(path, number, f"must be between 1 and {_MAX_PORT}, inclusive")]


def _percent(path: str, value: float) -> Errors:
    if 0 <= value <= 100:
        return []
    return [_invalid(path, value, "must be between 0 and 100, inclusive")]


def _percentage(path: str, msg: Any, field: str) -> Errors:
    """A Percent field ``{value: ...}``, checked when set; ``path`` names the field."""
    if not msg.HasField(field):
        return []
    return _percent(f"{path}.value", getattr(msg, field).value)


def _one_of(path: str, value: str, supported: Sequence[str], *, required: bool = False) -> Errors:
    if value in supported or (not value and not required):
        return []
    return [_required(path)] if not value else [_not_supported(path, value, supported)]


def _labels(path: str, labels: Mapping[str, str]) -> Errors:
    errs: Errors = []
    for key, value in sorted(labels.items()):
        for problem in naming.check_qualified_name(key):
            errs.append(_invalid(path, key, problem))
        for problem in naming.check_label_value(value):
            errs.append(_invalid(f"{path}[{key}]", value, problem))
    return errs


def _dns_label(path: str, value: str) -> Errors:
    """Istio's IsDNS1123Label: Kubernetes' label rule, upper case letters allowed."""
    return [_invalid(path, value, p) for p in naming.check_dns1123_label(value.lower())]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ip_or_cidr(path: str, text: str) -> Errors:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return [_invalid(path, text, "must be an IP address or a CIDR")]
    return []


def _domain_problem(host: str, *, wildcard: bool) -> str:
    """Why ``host`` is no (wildcard) DNS name, or "" when it is one."""
    name = host[2:] if wildcard and host.startswith("*.") else host
    if wildcard and host == "*":
        return ""
    if len(host) > 255:
        return "domain name is too long, the limit is 255 characters"
    labels = name.split(".")
    for label in labels:
        if not label:
            return "domain name has an empty label"
        if naming.check_dns1123_label(label.lower()):
            return f"domain name label {label!r} is invalid: a DNS-1123 label is lower case " \
                   "letters, digits and '-'"
    return ""


def _host(path: str, host: str) -> Errors:
    """A destination host: a (wildcard) DNS name, never "*" alone."""
    if not host:
        return [_required(path)]
    if host == "*":
        return [_invalid(path, host, "invalid destination host *")]
    problem = _domain_problem(host, wildcard=True)
    return [_invalid(path, host, problem)] if problem else []


def _export_to(path: str, values: Sequence[str]) -> Errors:
    errs: Errors = []
    seen: set[str] = set()
    for i, v in enumerate(values):
        if v in seen:
            errs.append(_duplicate(f"{path}[{i}]", v))
        seen.add(v)
        if v not in (".", "*", "~"):
            errs += _dns_label(f"{path}[{i}]", v)
    if "*" in seen and len(seen) > 1:
        errs.append(_forbidden(path, "exportTo '*' may not be combined with other values"))
    if "~" in seen and len(seen) > 1:
        errs.append(_forbidden(path, "exportTo '~' may not be combined with other values"))
    return errs


def _gateway_names(path: str, names: Sequence[str]) -> Errors:
    errs: Errors = []
    for i, name in enumerate(names):
        gpath = f"{path}[{i}]"
        if name == _MESH_GATEWAY:
            continue
        namespace, _, gw = name.rpartition("/")
        if not name or (("/" in name) and not (namespace and gw)):
            errs.append(_invalid(gpath, name, "config namespace and gateway name cannot be "
                                              "empty; use \"<namespace>/<name>\" or \"<name>\""))
            continue
        if "/" in name:
            errs += [_invalid(gpath, name, f"invalid value for namespace: {namespace!r}")
                     for _ in naming.check_dns1123_label(namespace)[:1]]
            errs += [_invalid(gpath, name, f"invalid value for gateway name: {gw!r}")
                     for _ in naming.check_dns1123_subdomain(gw)[:1]]
        elif naming.check_dns1123_subdomain(name):
            errs.append(_invalid(gpath, name, "must be \"<namespace>/<name>\", \"<name>\" or "
                                              "\"mesh\""))
    return errs


def _regex(path: str, pattern: str) -> Errors:
    if _NOT_RE2.search(pattern):
        return [_invalid(path, pattern, "Istio uses RE2 regular expressions, which have no "
                                        "backreferences or lookaround")]
    try:
        re.compile(pattern)
    except re.error as e:
        return [_invalid(path, pattern, f"not a valid regular expression: {e}")]
    return []


def _string_match(path: str, m: pb.StringMatch) -> Errors:
    set_ = [f for f in ("exact", "prefix", "regex") if m.HasField(f)]
    if len(set_) > 1:
        return [_forbidden(path, f"only one of exact, prefix or regex may be set, not "
                                 f"{' and '.join(set_)}")]
    if m.HasField("regex"):
        return _regex(f"{path}.regex", m.regex)
    return []


def _header_name(path: str, name: str) -> Errors:
    if not name:
        return [_invalid(path, name, "header name cannot be empty")]
    if not _HEADER_TOKEN.match(name.lstrip(":")):
        return [_invalid(path, name, "must be a valid HTTP header name")]
    return []


def _header_value(path: str, value: str) -> Errors:
    if any(c in value for c in "\r\n\0"):
        return [_invalid(path, value, "header value may not contain CR, LF or NUL")]
    return []


def _is_internal(name: str) -> bool:
    return name.startswith(":") or name.lower() == "host"


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def _header_operations(path: str, ops: pb.Headers.HeaderOperations, *, request: bool) -> Errors:
    errs: Errors = []
    for field in ("set", "add"):
        for name, value in sorted(getattr(ops, field).items()):
            hpath = f"{path}.{field}[{name}]"
            errs += _header_name(hpath, name)
            errs += _header_value(hpath, value)
            if _is_internal(name) and not (request and _is_authority(name)):
                errs.append(_invalid(hpath, name, "header cannot be internal"))
    for i, name in enumerate(ops.remove):
        errs += _header_name(f"{path}.remove[{i}]", name)
        if _is_internal(name):
            errs.append(_invalid(f"{path}.remove[{i}]", name, "header cannot be internal"))
    return errs


def _headers(path: str, headers: pb.Headers) -> Errors:
    return (_header_operations(f"{path}.request", headers.request, request=True)
            + _header_operations(f"{path}.response", headers.response, request=False))


# --------------------------------------------------------------------------- VirtualService


def _destination(path: str, d: pb.Destination) -> Errors:
    errs = _host(f"{path}.host", d.host)
    if d.subset:
        errs += _dns_label(f"{path}.subset", d.subset)
    if d.HasField("port"):
        errs += _port(f"{path}.port.number", d.port.number)
    return errs


def _weighted(path: str, route: Sequence[Any]) -> Errors:
    """Each destination present and weighted 0..100; several add up to 100."""
    errs: Errors = []
    total = 0
    for k, dest in enumerate(route):
        dpath = f"{path}[{k}]"
        if not dest.HasField("destination"):
            errs.append(_required(f"{dpath}.destination", "destination is required"))
        else:
            errs += _destination(f"{dpath}.destination", dest.destination)
        errs += _percent(f"{dpath}.weight", dest.weight)
        total += dest.weight
        if isinstance(dest, pb.HTTPRouteDestination) and dest.HasField("headers"):
            errs += _headers(f"{dpath}.headers", dest.headers)
    if len(route) > 1 and total != 100:
        errs.append(_invalid(path, total, f"total destination weight {total} != 100: "
                                          "weights must sum to 100"))
    return errs


def _http_match(path: str, m: pb.HTTPMatchRequest) -> Errors:
    errs: Errors = []
    for field in ("uri", "scheme", "method", "authority"):
        if m.HasField(field):
            errs += _string_match(f"{path}.{field}", getattr(m, field))
    for field in ("headers", "query_params", "without_headers"):
        json_name = m.DESCRIPTOR.fields_by_name[field].json_name
        for name, sm in sorted(getattr(m, field).items()):
            mpath = f"{path}.{json_name}[{name}]"
            if field != "query_params":
                errs += _header_name(mpath, name)
            errs += _string_match(mpath, sm)
    if m.port:
        errs += _port(f"{path}.port", m.port)
    errs += _labels(f"{path}.sourceLabels", m.source_labels)
    errs += _gateway_names(f"{path}.gateways", m.gateways)
    if m.source_namespace:
        errs += _dns_label(f"{path}.sourceNamespace", m.source_namespace)
    return errs


def _retries(path: str, r: pb.HTTPRetry) -> Errors:
    errs: Errors = []
    if r.attempts < 0:
        errs.append(_invalid(f"{path}.attempts", r.attempts, "attempts cannot be negative"))
    if r.attempts == 0 and (r.per_try_timeout or r.retry_on):
        errs.append(_forbidden(path, "http retry policy configured when attempts are set to 0 "
                                     "(disabled)"))
    errs += _duration(f"{path}.perTryTimeout", r.per_try_timeout)
    if r.retry_on:
        for policy in r.retry_on.split(","):
            if policy in _RETRY_ON or _is_status_code(policy):
                continue
            errs.append(_invalid(f"{path}.retryOn", r.retry_on,
                                 f"{policy!r} is not a valid retryOn policy (one of "
                                 f"{', '.join(_RETRY_ON)}, or an HTTP status code)"))
    return errs


def _is_status_code(text: str) -> bool:
    if not (text.isascii() and text.isdigit()):
        return False
    try:
        http.HTTPStatus(int(text))
    except ValueError:
        return False
    return True


def _fault(path: str, f: pb.HTTPFaultInjection) -> Errors:
    errs: Errors = []
    if not f.HasField("delay") and not f.HasField("abort"):
        errs.append(_required(path, "HTTP fault injection must have an abort and/or a delay"))
    if f.HasField("delay"):
        dpath = f"{path}.delay"
        if not f.delay.fixed_delay:
            errs.append(_required(f"{dpath}.fixedDelay"))
        errs += _duration(f"{dpath}.fixedDelay", f.delay.fixed_delay)
        errs += _percentage(f"{dpath}.percentage", f.delay, "percentage")
    if f.HasField("abort"):
        apath = f"{path}.abort"
        status = f.abort.http_status
        if not status:
            errs.append(_required(f"{apath}.httpStatus"))
        elif not 200 <= status <= 599:
            errs.append(_invalid(f"{apath}.httpStatus", status,
                                 f"HTTP status {status} is not in range 200-599"))
        errs += _percentage(f"{apath}.percentage", f.abort, "percentage")
    return errs


def _redirect(path: str, r: pb.HTTPRedirect) -> Errors:
    errs: Errors = []
    if not (r.uri or r.authority or r.port or r.scheme):
        errs.append(_required(path, "redirect must specify URI, authority, scheme, or port"))
    if r.redirect_code and not 300 <= r.redirect_code <= 399:
        errs.append(_invalid(f"{path}.redirectCode", r.redirect_code,
                             "is not a valid redirect code, must be 3xx"))
    if r.scheme and r.scheme not in ("http", "https"):
        errs.append(_not_supported(f"{path}.scheme", r.scheme, ("http", "https")))
    if r.port:
        errs += _port(f"{path}.port", r.port)
    return errs


def _authority_set_once(path: str, route: pb.HTTPRoute) -> Errors:
    sources = ([("rewrite.authority", route.rewrite.authority)] if route.rewrite.authority
               else [])
    for field in ("set", "add"):
        ops = getattr(route.headers.request, field)
        sources += [(f"headers.request.{field}[{k}]", v) for k, v in sorted(ops.items())
                    if _is_authority(k)]
    if len(sources) <= 1:
        return []
    return [_forbidden(f"{path}.{sources[1][0]}",
                       f"authority header cannot be set multiple times: have "
                       f"{sources[0][1]!r}, attempting to set {sources[1][1]!r}")]


def _http_route(path: str, route: pb.HTTPRoute) -> Errors:
    errs: Errors = []
    if route.HasField("redirect"):
        for field, what in (("route", "route"), ("fault", "fault"), ("rewrite", "rewrite")):
            present = bool(route.route) if field == "route" else route.HasField(field)
            if present:
                errs.append(_forbidden(f"{path}.{field}",
                                       f"HTTP route cannot contain both {what} and redirect"))
        errs += _redirect(f"{path}.redirect", route.redirect)
    elif not route.route:
        errs.append(_required(f"{path}.route", "HTTP route or redirect is required"))
    for j, m in enumerate(route.match):
        errs += _http_match(f"{path}.match[{j}]", m)
    errs += _weighted(f"{path}.route", route.route)
    if route.HasField("rewrite") and not (route.rewrite.uri or route.rewrite.authority):
        errs.append(_required(f"{path}.rewrite", "rewrite must specify URI, authority, or both"))
    errs += _headers(f"{path}.headers", route.headers)
    errs += _authority_set_once(path, route)
    errs += _duration(f"{path}.timeout", route.timeout)
    if route.HasField("retries"):
        errs += _retries(f"{path}.retries", route.retries)
    if route.HasField("fault"):
        errs += _fault(f"{path}.fault", route.fault)
    if route.HasField("mirror"):
        errs += _destination(f"{path}.mirror", route.mirror)
    errs += _percentage(f"{path}.mirrorPercentage", route, "mirror_percentage")
    return errs


def _tcp_route(path: str, route: pb.TCPRoute) -> Errors:
    errs: Errors = []
    if not route.route:
        errs.append(_required(f"{path}.route", "TCP route is required"))
    for j, m in enumerate(route.match):
        mpath = f"{path}.match[{j}]"
        for k, subnet in enumerate(m.destination_subnets):
            errs += _ip_or_cidr(f"{mpath}.destinationSubnets[{k}]", subnet)
        if m.port:
            errs += _port(f"{mpath}.port", m.port)
        errs += _labels(f"{mpath}.sourceLabels", m.source_labels)
        errs += _gateway_names(f"{mpath}.gateways", m.gateways)
        if m.source_namespace:
            errs += _dns_label(f"{mpath}.sourceNamespace", m.source_namespace)
    return errs + _weighted(f"{path}.route", route.route)


def _validate_virtual_service(vs: pb.VirtualService) -> Errors:
    spec = vs.spec
    errs: Errors = []
    applies_to_mesh = not spec.gateways or _MESH_GATEWAY in spec.gateways
    if not spec.hosts:
        errs.append(_required("spec.hosts", "virtual service must have at least one host"))
    for i, host in enumerate(spec.hosts):
        hpath = f"spec.hosts[{i}]"
        if host == "*":
            if applies_to_mesh:
                errs.append(_invalid(hpath, host, "wildcard host * is not allowed for virtual "
                                                  "services bound to the mesh gateway"))
            continue
        problem = "" if _is_ip(host) else _domain_problem(host, wildcard=True)
        if problem:
            errs.append(_invalid(hpath, host, problem))
    errs += _gateway_names("spec.gateways", spec.gateways)
    if not spec.http and not spec.tcp:
        errs.append(_required("spec.http", "http or tcp must be provided in virtual service "
                                           "(tls routes are not supported by Shoal)"))
    for i, route in enumerate(spec.http):
        errs += _http_route(f"spec.http[{i}]", route)
    for i, tcp in enumerate(spec.tcp):
        errs += _tcp_route(f"spec.tcp[{i}]", tcp)
    errs += _export_to("spec.exportTo", spec.export_to)
    return errs


def default_virtual_service(vs: pb.VirtualService) -> None:
    """A lone destination takes all the traffic: its weight reads back as 100."""
    destinations: list[Any] = [r.route for r in vs.spec.http] + [r.route for r in vs.spec.tcp]
    for route in destinations:
        if len(route) == 1 and route[0].weight == 0:
            route[0].weight = 100


# --------------------------------------------------------------------------- DestinationRule


def _load_balancer(path: str, lb: pb.LoadBalancerSettings) -> Errors:
    errs = _one_of(f"{path}.simple", lb.simple, _LB_SIMPLE)
    if lb.simple and lb.HasField("consistent_hash"):
        errs.append(_forbidden(path, "only one of simple or consistentHash may be set"))
    if lb.HasField("consistent_hash"):
        ch = lb.consistent_hash
        cpath = f"{path}.consistentHash"
        keys = [name for name, present in (
            ("httpHeaderName", bool(ch.http_header_name)),
            ("httpCookie", ch.HasField("http_cookie")),
            ("useSourceIp", ch.HasField("use_source_ip") and ch.use_source_ip),
            ("httpQueryParameterName", bool(ch.http_query_parameter_name))) if present]
        if len(keys) != 1:
            found = ", ".join(keys) if keys else "none"
            errs.append(_invalid(cpath, found, "exactly one of httpHeaderName, httpCookie, "
                                               "useSourceIp or httpQueryParameterName must be "
                                               "set"))
        if ch.http_header_name:
            errs += _header_name(f"{cpath}.httpHeaderName", ch.http_header_name)
        if ch.HasField("http_cookie"):
            cookie = ch.http_cookie
            if not cookie.name:
                errs.append(_required(f"{cpath}.httpCookie.name", "name required for HttpCookie"))
            if not cookie.ttl:
                errs.append(_required(f"{cpath}.httpCookie.ttl", "ttl required for HttpCookie"))
            errs += _duration(f"{cpath}.httpCookie.ttl", cookie.ttl, allow_zero=True)
    return errs


def _connection_pool(path: str, cp: pb.ConnectionPoolSettings) -> Errors:
    errs: Errors = []
    if not cp.HasField("tcp") and not cp.HasField("http"):
        errs.append(_required(path, "connection pool must have at least one field"))
    checks = [(f"{path}.tcp.maxConnections", cp.tcp.max_connections)]
    checks += [(f"{path}.http.{cp.http.DESCRIPTOR.fields_by_name[f].json_name}",
                getattr(cp.http, f))
               for f in ("http1_max_pending_requests", "http2_max_requests",
                         "max_requests_per_connection", "max_retries")]
    errs += [_invalid(p, v, "must be greater than or equal to 0") for p, v in checks if v < 0]
    errs += _duration(f"{path}.tcp.connectTimeout", cp.tcp.connect_timeout)
    errs += _duration(f"{path}.http.idleTimeout", cp.http.idle_timeout)
    return errs


def _outlier_detection(path: str, od: pb.OutlierDetection) -> Errors:
    errs = _duration(f"{path}.interval", od.interval)
    errs += _duration(f"{path}.baseEjectionTime", od.base_ejection_time)
    errs += _percent(f"{path}.maxEjectionPercent", od.max_ejection_percent)
    errs += _percent(f"{path}.minHealthPercent", od.min_health_percent)
    if od.consecutive_errors < 0:
        errs.append(_invalid(f"{path}.consecutiveErrors", od.consecutive_errors,
                             "outlier detection consecutive errors cannot be negative"))
    return errs


def _client_tls(path: str, tls: pb.ClientTLSSettings) -> Errors:
    errs = _one_of(f"{path}.mode", tls.mode, _CLIENT_TLS_MODES)
    if tls.mode == "MUTUAL" and not tls.credential_name:
        errs.append(_required(f"{path}.credentialName",
                              "client certificate required for mutual tls (Shoal reads it from "
                              "the Secret named by credentialName)"))
    return errs


def _policy_parts(path: str, p: Any) -> Errors:
    errs: Errors = []
    if p.HasField("load_balancer"):
        errs += _load_balancer(f"{path}.loadBalancer", p.load_balancer)
    if p.HasField("connection_pool"):
        errs += _connection_pool(f"{path}.connectionPool", p.connection_pool)
    if p.HasField("outlier_detection"):
        errs += _outlier_detection(f"{path}.outlierDetection", p.outlier_detection)
    if p.HasField("tls"):
        errs += _client_tls(f"{path}.tls", p.tls)
    return errs


_POLICY_FIELDS = ("load_balancer", "connection_pool", "outlier_detection", "tls")


def _traffic_policy(path: str, p: pb.TrafficPolicy) -> Errors:
    errs: Errors = []
    if not any(p.HasField(f) for f in _POLICY_FIELDS) and not p.port_level_settings:
        errs.append(_required(path, "traffic policy must have at least one field"))
    errs += _policy_parts(path, p)
    seen: set[int] = set()
    for i, pl in enumerate(p.port_level_settings):
        ppath = f"{path}.portLevelSettings[{i}]"
        if not pl.HasField("port"):
            errs.append(_required(f"{ppath}.port", "portTrafficPolicy must have valid port"))
        else:
            errs += _port(f"{ppath}.port.number", pl.port.number)
            if pl.port.number in seen:
                errs.append(_duplicate(f"{ppath}.port.number", pl.port.number))
            seen.add(pl.port.number)
        if not any(pl.HasField(f) for f in _POLICY_FIELDS):
            errs.append(_required(ppath, "port traffic policy must have at least one field"))
        errs += _policy_parts(ppath, pl)
    return errs


def _validate_destination_rule(dr: pb.DestinationRule) -> Errors:
    spec = dr.spec
    errs: Errors = []
    if not spec.host:
        errs.append(_required("spec.host", "the host this rule applies to"))
    else:
        problem = _domain_problem(spec.host, wildcard=True)
        if problem:
            errs.append(_invalid("spec.host", spec.host, problem))
    if spec.HasField("traffic_policy"):
        errs += _traffic_policy("spec.trafficPolicy", spec.traffic_policy)
    names: set[str] = set()
    for i, subset in enumerate(spec.subsets):
        spath = f"spec.subsets[{i}]"
        if not subset.name:
            errs.append(_required(f"{spath}.name", "subset name cannot be empty"))
        else:
            errs += _dns_label(f"{spath}.name", subset.name)
        if subset.name in names:
            errs.append(_duplicate(f"{spath}.name", subset.name))
        names.add(subset.name)
        errs += _labels(f"{spath}.labels", subset.labels)
        if subset.HasField("traffic_policy"):
            errs += _traffic_policy(f"{spath}.trafficPolicy", subset.traffic_policy)
    errs += _export_to("spec.exportTo", spec.export_to)
    return errs


# --------------------------------------------------------------------------- Gateway


def _server_host(path: str, host: str) -> Errors:
    namespace, slash, name = host.rpartition("/")
    if slash:
        if not namespace or not name:
            return [_invalid(path, host, "config namespace and dnsName in host entry cannot "
                                         "be empty")]
        if namespace not in ("*", ".") and naming.check_dns1123_label(namespace):
            return [_invalid(path, host, f"invalid namespace value {namespace!r} in gateway")]
    else:
        name = host
    if name == "*" or _is_ip(name):
        return []
    problem = _domain_problem(name, wildcard=True)
    return [_invalid(path, host, problem)] if problem else []


def _server_tls(path: str, server: pb.Server, protocol: str) -> Errors:
    tls = server.tls
    errs = _one_of(f"{path}.mode", tls.mode, _SERVER_TLS_MODES)
    if protocol not in ("HTTPS", "TLS") and not tls.https_redirect:
        errs.append(_forbidden(path, f"server cannot have TLS settings for plain text "
                                     f"{protocol or 'HTTP'} ports"))
    mode = tls.mode or "PASSTHROUGH"
    if mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL") and protocol in ("HTTPS", "TLS") \
            and not tls.credential_name:
        errs.append(_required(f"{path}.credentialName",
                              f"{mode} TLS needs a certificate: the Secret named by "
                              "credentialName (Shoal reads no certificate files)"))
    return errs


def _validate_gateway(gw: pb.Gateway) -> Errors:
    spec = gw.spec
    errs = _labels("spec.selector", spec.selector)
    if not spec.servers:
        errs.append(_required("spec.servers", "gateway must have at least one server"))
    port_names: set[str] = set()
    for i, server in enumerate(spec.servers):
        spath = f"spec.servers[{i}]"
        protocol = server.port.protocol.upper()
        if not server.HasField("port"):
            errs.append(_required(f"{spath}.port", "port is required"))
        else:
            errs += _port(f"{spath}.port.number", server.port.number)
            errs += _one_of(f"{spath}.port.protocol", protocol, _PROTOCOLS, required=True)
            if server.port.name:
                errs += _dns_label(f"{spath}.port.name", server.port.name)
                if server.port.name in port_names:
                    errs.append(_invalid(f"{spath}.port.name", server.port.name,
                                         "port names in servers must be unique"))
                port_names.add(server.port.name)
            if server.port.target_port:
                errs += _port(f"{spath}.port.targetPort", server.port.target_port)
        if not server.hosts:
            errs.append(_required(f"{spath}.hosts",
                                  "server config must contain at least one host"))
        for j, host in enumerate(server.hosts):
            errs += _server_host(f"{spath}.hosts[{j}]", host)
        if server.bind and not _is_ip(server.bind) and not server.bind.startswith("unix://"):
            errs.append(_invalid(f"{spath}.bind", server.bind, "must be an IP address"))
        if server.HasField("tls"):
            errs += _server_tls(f"{spath}.tls", server, protocol)
        elif protocol in ("HTTPS", "TLS"):
            errs.append(_required(f"{spath}.tls",
                                  "server must have TLS settings for HTTPS/TLS protocols"))
    return errs


# --------------------------------------------------------------------------- ServiceEntry


def _service_entry_ports(spec: pb.ServiceEntrySpec) -> Errors:
    errs: Errors = []
    names: set[str] = set()
    numbers: set[int] = set()
    for i, port in enumerate(spec.ports):
        ppath = f"spec.ports[{i}]"
        if not port.name:
            errs.append(_required(f"{ppath}.name", "port name must be set"))
        elif port.name in names:
            errs.append(_duplicate(f"{ppath}.name", port.name))
        else:
            errs += _dns_label(f"{ppath}.name", port.name)
        names.add(port.name)
        errs += _port(f"{ppath}.number", port.number)
        if port.number in numbers:
            errs.append(_duplicate(f"{ppath}.number", port.number))
        numbers.add(port.number)
        errs += _one_of(f"{ppath}.protocol", port.protocol.upper(), _PROTOCOLS, required=True)
        if port.target_port:
            errs += _port(f"{ppath}.targetPort", port.target_port)
    return errs


def _service_entry_endpoints(spec: pb.ServiceEntrySpec) -> Errors:
    errs: Errors = []
    port_names = {p.name for p in spec.ports}
    for i, ep in enumerate(spec.endpoints):
        epath = f"spec.endpoints[{i}]"
        if not ep.address:
            errs.append(_required(f"{epath}.address"))
        elif spec.resolution == "STATIC" and not ep.address.startswith("unix://") \
                and not _is_ip(ep.address):
            errs.append(_invalid(f"{epath}.address", ep.address,
                                 "must be an IP address with resolution STATIC"))
        elif spec.resolution.startswith("DNS") and not _is_ip(ep.address) \
                and _domain_problem(ep.address, wildcard=False):
            errs.append(_invalid(f"{epath}.address", ep.address,
                                 "endpoint address is not a valid FQDN or an IP address"))
        for name, number in sorted(ep.ports.items()):
            if name not in port_names:
                errs.append(_invalid(f"{epath}.ports[{name}]", number,
                                     f"endpoint port {name!r} is not defined by the service "
                                     "entry"))
            errs += _port(f"{epath}.ports[{name}]", number)
        errs += _labels(f"{epath}.labels", ep.labels)
    return errs


def _validate_service_entry(se: pb.ServiceEntry) -> Errors:
    spec = se.spec
    errs: Errors = []
    if not spec.hosts:
        errs.append(_required("spec.hosts", "service entry must have at least one host"))
    for i, host in enumerate(spec.hosts):
        problem = ("invalid host *" if host == "*"
                   else _domain_problem(host, wildcard=True))
        if problem:
            errs.append(_invalid(f"spec.hosts[{i}]", host, problem))
    cidr = False
    for i, address in enumerate(spec.addresses):
        cidr = cidr or "/" in address
        errs += _ip_or_cidr(f"spec.addresses[{i}]", address)
    errs += _one_of("spec.location", spec.location, _LOCATIONS, required=True)
    errs += _one_of("spec.resolution", spec.resolution, _RESOLUTIONS, required=True)
    if cidr and spec.resolution not in ("NONE", "STATIC"):
        errs.append(_forbidden("spec.addresses", "CIDR addresses are allowed only for "
                                                 "NONE/STATIC resolution types"))
    errs += _service_entry_ports(spec)
    if spec.resolution == "NONE" and spec.endpoints:
        errs.append(_forbidden("spec.endpoints", "no endpoints should be provided for "
                                                 "resolution type NONE"))
    if spec.resolution == "STATIC" and not spec.endpoints and not spec.addresses \
            and not spec.HasField("workload_selector"):
        errs.append(_required("spec.endpoints", "resolution STATIC needs endpoints (or "
                                                "addresses) to send traffic to"))
    if spec.resolution.startswith("DNS") and not spec.endpoints:
        for i, host in enumerate(spec.hosts):
            if host != "*" and host.startswith("*"):
                errs.append(_invalid(f"spec.hosts[{i}]", host,
                                     f"hosts must be FQDN if no endpoints are provided for "
                                     f"resolution mode {spec.resolution}"))
    errs += _service_entry_endpoints(spec)
    if spec.HasField("workload_selector"):
        if spec.endpoints:
            errs.append(_forbidden("spec.workloadSelector", "only one of WorkloadSelector "
                                                            "or Endpoints is allowed"))
        errs += _labels("spec.workloadSelector.labels", spec.workload_selector.labels)
    errs += _export_to("spec.exportTo", spec.export_to)
    return errs


def default_service_entry(se: pb.ServiceEntry) -> None:
    """Istio's zero values, written out: location MESH_EXTERNAL, resolution NONE."""
    if not se.spec.location:
        se.spec.location = "MESH_EXTERNAL"
    if not se.spec.resolution:
        se.spec.resolution = "NONE"


# --------------------------------------------------------------------------- WorkloadEntry


MESH_HOST_LABEL = "shoal.dev/mesh-host"  # the mesh-only host that runs a WorkloadEntry


def _validate_workload_entry(we: pb.WorkloadEntry) -> Errors:
    """Istio's rules: an address (IP, FQDN or unix://) unless a network is given,
    valid port names and numbers, labels and service account."""
    spec = we.spec
    errs: Errors = []
    if not spec.address:
        if not spec.network:
            errs.append(_required("spec.address", "address is required unless network is "
                                                  "set"))
    elif spec.address.startswith("unix://"):
        if spec.ports:
            errs.append(_forbidden("spec.ports", "unix endpoint must not include ports"))
    elif not _is_ip(spec.address) and _domain_problem(spec.address, wildcard=False):
        errs.append(_invalid("spec.address", spec.address,
                             "must be an IP address, a FQDN or unix://"))
    for name, number in sorted(spec.ports.items()):
        errs += _dns_label(f"spec.ports[{name}]", name)
        errs += _port(f"spec.ports[{name}]", number)
    errs += _labels("spec.labels", spec.labels)
    if spec.service_account:
        errs += [_invalid("spec.serviceAccount", spec.service_account, p)
                 for p in naming.check_dns1123_subdomain(spec.service_account)]
    host = we.metadata.labels.get(MESH_HOST_LABEL, "")
    if host:
        errs += [_invalid(f"metadata.labels[{MESH_HOST_LABEL}]", host, p)
                 for p in naming.check_dns1123_subdomain(host)]
        if not _is_ip(spec.address):
            errs.append(_invalid("spec.address", spec.address, "a WorkloadEntry on a "
                                 f"mesh-only host ({MESH_HOST_LABEL}) needs an IP address"))
    return errs


VALIDATORS: Mapping[str, Callable[[Any], Errors]] = {
    "VirtualService": _validate_virtual_service,
    "DestinationRule": _validate_destination_rule,
    "Gateway": _validate_gateway,
    "ServiceEntry": _validate_service_entry,
    "WorkloadEntry": _validate_workload_entry,
}
DEFAULTERS: Mapping[str, Callable[[Any], None]] = {
    "VirtualService": default_virtual_service,
    "ServiceEntry": default_service_entry,
}
