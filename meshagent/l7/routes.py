"""VirtualService routing: which route a request takes, and what to do with it (pure).

    RouteTable.update(virtual_services, services, service_entries)   compile
    RouteTable.route(request, host, port) -> Action                   an HTTP request
    RouteTable.tcp_route(host, port, ...) -> Action | None            a TCP connection

Istio's sidecar semantics:

- a VirtualService applies to requests for its ``hosts``: a short name
  (``reviews``) means ``reviews.<its namespace>.svc.cluster.local``; a name with
  dots is taken as written (an FQDN, or a ServiceEntry host); ``*.example.com``
  matches by suffix. For a host, an exact host beats the longest wildcard; of
  several VirtualServices naming the same host the oldest wins (Istio warns
  about the conflict, ``shoal mesh check`` does too). ``gateways`` empty or
  holding ``mesh`` applies to the mesh's agents, else only to those gateways;
  ``exportTo`` limits which client namespaces see it.
- ``http`` routes are tried in order; the first whose ``match`` list has a
  matching entry (OR) with every condition in it holding (AND) wins. An empty
  list matches everything.
- no VirtualService, or none of its routes matching: the default Action, to
  the Service itself (Istio answers 404 ``NR`` only when a VirtualService
  exists and no route matches; then ``Action.destinations`` is empty).

The Action is a frozen plan the engine carries out; it holds durations in
seconds and percentages as fractions of 100, as Istio writes them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.trafficrules import parse_duration

__all__ = ["Action", "Destination", "Fault", "HeaderOps", "Redirect", "Request", "Retries",
           "Rewrite", "RouteTable", "fqdn", "shadow_authority"]

DEFAULT_DOMAIN = "cluster.local"
MESH = "mesh"
# Istio's default retry policy (no ``retries`` on the route): 2 retries on
# these conditions, 503 being the retriable status code.
DEFAULT_RETRY_ON = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled",
                              "retriable-status-codes"})
# retryOn's gRPC conditions (Envoy's retry_grpc_on), by the grpc-status code each names.
GRPC_RETRY_ON = {"1": "cancelled", "4": "deadline-exceeded", "8": "resource-exhausted",
                 "13": "internal", "14": "unavailable"}


def shadow_authority(authority: str) -> str:
    """The authority of a mirrored request, as Envoy writes it: the host suffixed
    ``-shadow``, the port kept."""
    name, sep, port = authority.partition(":")
    return f"{name}-shadow{sep}{port}"


def fqdn(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """Istio's reading of a host in a config object of ``namespace``."""
    if not host or host.startswith("*") or "." in host:
        return host.lower()
    return f"{host.lower()}.{namespace}.svc.{domain}"


@dataclass(frozen=True)
class Request:
    """What matching looks at. ``path`` includes the query; ``headers`` keys are
    lower case."""

    method: str
    path: str
    authority: str
    headers: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    scheme: str = "http"


@dataclass(frozen=True)
class HeaderOps:
    """Istio's header operations: ``set`` replaces, ``add`` appends, ``remove`` deletes."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``headers`` (name, value) pairs with the operations done (names compared
        case-insensitively)."""
        if not (self.set or self.add or self.remove):
            return list(headers)  # the common case: nothing to do, per request
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out += list(self.set) + list(self.add)
        return out

    def merged(self, other: HeaderOps) -> HeaderOps:
        if not other:
            return self
        if not self:
            return other
        return HeaderOps(self.set + other.set, self.add + other.add,
                         self.remove + other.remove)


@dataclass(frozen=True)
class Destination:
    host: str  # FQDN
    port: int
    subset: str = ""
    weight: int = 100
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()


@dataclass(frozen=True)
class Rewrite:
    uri: str = ""
    authority: str = ""
    prefix: str = ""  # the matched uri prefix the new uri replaces; "" = the whole path

    def path(self, path: str) -> str:
        if not self.uri:
            return path
        bare, sep, query = path.partition("?")
        if self.prefix and bare.lower().startswith(self.prefix.lower()):
            bare = self.uri + bare[len(self.prefix):]
        else:
            bare = self.uri
        return bare + sep + query


@dataclass(frozen=True)
class Redirect:
    uri: str = ""
    authority: str = ""
    port: int = 0
    scheme: str = ""
    code: int = 301

    def location(self, *, scheme: str, authority: str, path: str) -> str:
        host = self.authority or authority
        if self.port:
            host = f"{host.rsplit(':', 1)[0] if ':' in host else host}:{self.port}"
        return f"{self.scheme or scheme}://{host}{self.uri or path}"


@dataclass(frozen=True)
class Retries:
    attempts: int = 2  # retries, not counting the first try
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    status_codes: frozenset[int] = frozenset({503})  # retriable-status-codes and "503"

    def retriable(self, status: int) -> bool:
        """Whether a try answered with ``status`` is tried again."""
        on = self.retry_on
        if status >= 500 and "5xx" in on:
            return True
        if status in (502, 503, 504) and "gateway-error" in on:
            return True
        if status == 409 and "retriable-4xx" in on:
            return True
        return status in self.status_codes and ("retriable-status-codes" in on
                                                or str(status) in on)

    def retriable_failure(self, flag: str, *, refused: bool = False) -> bool:
        """Whether a try that got no response is tried again, by how it ended
        (``flag``: UF the connect failed, UC reset, UT per-try timeout). As Envoy:
        5xx, gateway-error and reset cover all three; connect-failure only UF;
        refused-stream only a reset whose code is REFUSED_STREAM (``refused``: the
        peer says it did not process the request; any other reset may come after
        the request did something, so it is not retried under refused-stream)."""
        on = self.retry_on
        if on & {"5xx", "gateway-error", "reset"}:
            return True
        if flag == "UF":
            return "connect-failure" in on
        return flag == "UC" and refused and "refused-stream" in on

    @property
    def on_grpc(self) -> bool:
        """Whether some gRPC status is retried (retryOn names one of GRPC_RETRY_ON)."""
        return not self.retry_on.isdisjoint(GRPC_RETRY_ON.values())

    def retriable_grpc(self, grpc_status: str) -> bool:
        """Whether a gRPC response with this ``grpc-status`` is tried again."""
        return GRPC_RETRY_ON.get(grpc_status, "") in self.retry_on


NO_RETRIES = Retries(attempts=0, retry_on=frozenset(), status_codes=frozenset())


@dataclass(frozen=True)
class Fault:
    delay: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_percent: float = 0.0


@dataclass(frozen=True)
class Action:
    """What to do with one request (or, for ``tcp_route``, one connection)."""

    origin: str  # "VirtualService default/reviews http[1] (v2-testers)" or "default"
    destinations: tuple[Destination, ...]
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()
    timeout: float | None = None
    retries: Retries = Retries()
    fault: Fault | None = None
    mirror: Destination | None = None
    mirror_percent: float = 100.0

    def choose(self, r: float) -> Destination | None:
        """The destination for ``r`` in [0, 1) by weight; None when there is none
        (no route: 404 ``NR``)."""
        total = sum(d.weight for d in self.destinations)
        if total <= 0:
            return self.destinations[0] if self.destinations else None
        point = r * total
        for d in self.destinations:
            if point < d.weight:
                return d
            point -= d.weight
        return self.destinations[-1]


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class _StringMatch:
    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None

    def __call__(self, value: str | None, *, ignore_case: bool = False) -> bool:
        if value is None:
            return False
        if self.exact is not None:
            return value.lower() == self.exact.lower() if ignore_case else value == self.exact
        if self.prefix is not None:
            if ignore_case:
                return value.lower().startswith(self.prefix.lower())
            return value.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return True  # {}: present


def _string_match(m: pb.StringMatch) -> _StringMatch:
    if m.HasField("exact"):
        return _StringMatch(exact=m.exact)
    if m.HasField("prefix"):
        return _StringMatch(prefix=m.prefix)
    if m.HasField("regex"):
        return _StringMatch(regex=re.compile(m.regex))
    return _StringMatch()


@dataclass(frozen=True)
class _Match:
    name: str
    uri: _StringMatch | None
    ignore_uri_case: bool
    scheme: _StringMatch | None
    method: _StringMatch | None
    authority: _StringMatch | None
    headers: tuple[tuple[str, _StringMatch], ...]
    without_headers: tuple[tuple[str, _StringMatch], ...]
    query: tuple[tuple[str, _StringMatch], ...]
    port: int
    source_labels: tuple[tuple[str, str], ...]
    source_namespace: str
    gateways: tuple[str, ...]

    def __call__(self, req: Request, query: Mapping[str, str], gateway: str) -> bool:
        if self.gateways and gateway not in self.gateways:
            return False
        if self.port and req.port != self.port:
            return False
        if self.uri is not None and not self.uri(req.path.split("?", 1)[0],
                                                 ignore_case=self.ignore_uri_case):
            return False
        if self.scheme is not None and not self.scheme(req.scheme):
            return False
        if self.method is not None and not self.method(req.method):
            return False
        if self.authority is not None and not self.authority(req.authority):
            return False
        for name, m in self.headers:
            if not m(req.headers.get(name)):
                return False
        for name, m in self.without_headers:
            if m(req.headers.get(name)):
                return False
        for name, m in self.query:
            if not m(query.get(name)):
                return False
        if any(req.source_labels.get(k) != v for k, v in self.source_labels):
            return False
        return not self.source_namespace or req.source_namespace == self.source_namespace


def _gateway_name(name: str, namespace: str) -> str:
    return name if name == MESH or "/" in name else f"{namespace}/{name}"


def _compile_match(m: pb.HTTPMatchRequest, namespace: str) -> _Match:
    def opt(f: str) -> _StringMatch | None:
        return _string_match(getattr(m, f)) if m.HasField(f) else None
    return _Match(
        name=m.name, uri=opt("uri"), ignore_uri_case=m.ignore_uri_case, scheme=opt("scheme"),
        method=opt("method"), authority=opt("authority"),
        headers=tuple((k.lower(), _string_match(v)) for k, v in sorted(m.headers.items())),
        without_headers=tuple((k.lower(), _string_match(v))
                              for k, v in sorted(m.without_headers.items())),
        query=tuple((k, _string_match(v)) for k, v in sorted(m.query_params.items())),
        port=m.port, source_labels=tuple(sorted(m.source_labels.items())),
        source_namespace=m.source_namespace,
        gateways=tuple(_gateway_name(g, namespace) for g in m.gateways))


@dataclass(frozen=True)
class _HttpRoute:
    matches: tuple[_Match, ...]
    action: Action  # rewrite.prefix is filled per match at route time

    def match(self, req: Request, query: Mapping[str, str], gateway: str) -> _Match | None:
        """The first matching entry of the route's ``match`` list, or None."""
        for m in self.matches:
            if m(req, query, gateway):
                return m
        return None


_ANY = _Match("", None, False, None, None, None, (), (), (), 0, (), "", ())


@dataclass(frozen=True)
class _TcpRoute:
    ports: tuple[int, ...]
    source_labels: tuple[tuple[tuple[str, str], ...], ...]
    action: Action


@dataclass(frozen=True)
class _Compiled:
    """One VirtualService, compiled."""

    key: str  # namespace/name
    namespace: str
    hosts: tuple[str, ...]  # FQDNs or wildcards
    gateways: tuple[str, ...]
    export_to: tuple[str, ...]
    http: tuple[_HttpRoute, ...]
    tcp: tuple[_TcpRoute, ...]
    created: float

    def visible(self, namespace: str) -> bool:
        if not self.export_to or "*" in self.export_to:
            return True
        return (namespace == self.namespace and "." in self.export_to) or \
            namespace in self.export_to


def _ops(o: pb.Headers.HeaderOperations) -> HeaderOps:
    return HeaderOps(set=tuple(sorted((k.lower(), v) for k, v in o.set.items())),
                     add=tuple(sorted((k.lower(), v) for k, v in o.add.items())),
                     remove=tuple(k.lower() for k in o.remove))


def _duration(text: str) -> float | None:
    return parse_duration(text) if text else None


def _retries(r: pb.HTTPRetry) -> Retries:
    if r.attempts <= 0:
        return NO_RETRIES
    words = {w.strip() for w in r.retry_on.split(",") if w.strip()} if r.retry_on else \
        set(DEFAULT_RETRY_ON)
    codes = {int(w) for w in words if w.isdigit()}
    return Retries(attempts=r.attempts, per_try_timeout=_duration(r.per_try_timeout),
                   retry_on=frozenset(words),
                   status_codes=frozenset(codes or ({503} if "retriable-status-codes" in words
                                                    else set())))


def _fault(f: pb.HTTPFaultInjection) -> Fault:
    # An unset percentage is Istio's 100%.
    def pct(msg: pb.HTTPFaultInjection.Delay | pb.HTTPFaultInjection.Abort) -> float:
        return msg.percentage.value if msg.HasField("percentage") else 100.0
    return Fault(delay=_duration(f.delay.fixed_delay) or 0.0 if f.HasField("delay") else 0.0,
                 delay_percent=pct(f.delay) if f.HasField("delay") else 0.0,
                 abort_status=f.abort.http_status if f.HasField("abort") else 0,
                 abort_percent=pct(f.abort) if f.HasField("abort") else 0.0)


class RouteTable:
    """The compiled VirtualServices of the cluster; see the module docstring."""

    def __init__(self, *, domain: str = DEFAULT_DOMAIN) -> None:
        self.domain = domain
        self._vs: list[_Compiled] = []
        self._ports: dict[str, tuple[int, ...]] = {}  # host FQDN -> its service ports
        self.errors: dict[str, str] = {}  # namespace/name -> why it was left out
        self.has_tcp_routes = False  # any ``tcp`` route at all (the L4 path's quick check)

    # -- compiling --

    def update(self, virtual_services: Iterable[pb.VirtualService],
               services: Iterable[core_pb2.Service] = (),
               service_entries: Iterable[pb.ServiceEntry] = ()) -> None:
        ports: dict[str, tuple[int, ...]] = {}
        for svc in services:
            host = f"{svc.metadata.name}.{svc.metadata.namespace}.svc.{self.domain}"
            ports[host] = tuple(int(p.port) for p in svc.spec.ports)
        for se in service_entries:
            for h in se.spec.hosts:
                ports.setdefault(fqdn(h, se.metadata.namespace, self.domain),
                                 tuple(int(p.number) for p in se.spec.ports))
        self._ports = ports
        compiled: list[_Compiled] = []
        errors: dict[str, str] = {}
        for vs in virtual_services:
            key = f"{vs.metadata.namespace}/{vs.metadata.name}"
            try:
                compiled.append(self._compile(vs, key))
            except (ValueError, re.error) as e:  # a bad item alone is left out
                errors[key] = str(e)
        compiled.sort(key=lambda c: (c.created, c.key))
        self._vs = compiled
        self.errors = errors
        self.has_tcp_routes = any(c.tcp for c in compiled)

    def _dest(self, d: pb.Destination, namespace: str, weight: int, default_port: int,
              headers: pb.Headers | None = None) -> Destination:
        host = fqdn(d.host, namespace, self.domain)
        port = d.port.number if d.HasField("port") and d.port.number else 0
        if not port:
            known = self._ports.get(host, ())
            port = known[0] if len(known) == 1 else default_port
        return Destination(host=host, port=port, subset=d.subset, weight=weight,
                           request_headers=_ops(headers.request) if headers else HeaderOps(),
                           response_headers=_ops(headers.response) if headers else HeaderOps())

    def _compile(self, vs: pb.VirtualService, key: str) -> _Compiled:
        ns = vs.metadata.namespace
        spec = vs.spec
        http: list[_HttpRoute] = []
        for i, r in enumerate(spec.http):
            label = f"VirtualService {key} http[{i}]" + (f" ({r.name})" if r.name else "")
            dests = tuple(self._dest(d.destination, ns, d.weight or
                                     (100 if len(r.route) == 1 else 0), 0, d.headers)
                          for d in r.route)
            rw = r.rewrite
            action = Action(
                origin=label, destinations=dests,
                rewrite=Rewrite(uri=rw.uri, authority=rw.authority)
                if r.HasField("rewrite") else None,
                redirect=Redirect(uri=r.redirect.uri, authority=r.redirect.authority,
                                  port=r.redirect.port, scheme=r.redirect.scheme,
                                  code=r.redirect.redirect_code or 301)
                if r.HasField("redirect") else None,
                request_headers=_ops(r.headers.request),
                response_headers=_ops(r.headers.response),
                timeout=_duration(r.timeout),
                retries=_retries(r.retries) if r.HasField("retries") else Retries(),
                fault=_fault(r.fault) if r.HasField("fault") else None,
                mirror=self._dest(r.mirror, ns, 100, 0) if r.HasField("mirror") else None,
                mirror_percent=r.mirror_percentage.value
                if r.HasField("mirror_percentage") else 100.0)
            matches = tuple(_compile_match(m, ns) for m in r.match) or (_ANY,)
            http.append(_HttpRoute(matches, action))
        tcp: list[_TcpRoute] = []
        for i, t in enumerate(spec.tcp):
            dests = tuple(self._dest(d.destination, ns, d.weight or
                                     (100 if len(t.route) == 1 else 0), 0) for d in t.route)
            tcp.append(_TcpRoute(
                ports=tuple(m.port for m in t.match if m.port),
                source_labels=tuple(tuple(sorted(m.source_labels.items()))
                                    for m in t.match),
                action=Action(origin=f"VirtualService {key} tcp[{i}]", destinations=dests,
                              retries=NO_RETRIES)))
        created = vs.metadata.creation_timestamp
        return _Compiled(
            key=key, namespace=ns,
            hosts=tuple(fqdn(h, ns, self.domain) for h in spec.hosts),
            gateways=tuple(_gateway_name(g, ns) for g in spec.gateways) or (MESH,),
            export_to=tuple(spec.export_to), http=tuple(http), tcp=tuple(tcp),
            created=created.seconds + created.nanos / 1e9)

    # -- looking up --

    def virtual_service(self, host: str, *, namespace: str = "",
                        gateway: str = MESH) -> _Compiled | None:
        """The VirtualService that applies to ``host`` (an FQDN) for a client in
        ``namespace``: an exact host first, else the longest matching wildcard;
        of equals, the oldest."""
        host = host.lower()
        best: tuple[int, _Compiled] | None = None
        for vs in self._vs:
            if gateway not in vs.gateways or (namespace and not vs.visible(namespace)):
                continue
            for h in vs.hosts:
                if h == host:
                    rank = 1 << 16
                elif h == "*":
                    rank = 1
                elif h.startswith("*.") and host.endswith(h[1:]):
                    rank = len(h)
                else:
                    continue
                if best is None or rank > best[0]:
                    best = (rank, vs)
        return best[1] if best is not None else None

    def default(self, host: str, port: int) -> Action:
        return Action(origin="default", destinations=(Destination(host=host, port=port),))

    def route(self, req: Request, host: str, port: int, *, gateway: str = MESH) -> Action:
        """The Action for an HTTP request to ``host`` (an FQDN) ``port``."""
        vs = self.virtual_service(host, namespace=req.source_namespace, gateway=gateway)
        if vs is None or not vs.http:
            return self.default(host, port)
        query = dict(parse_qsl(req.path.partition("?")[2], keep_blank_values=True))
        for r in vs.http:
            m = r.match(req, query, gateway)
            if m is None:
                continue
            a = r.action
            dests = tuple(d if d.port else Destination(d.host, port, d.subset, d.weight,
                                                       d.request_headers, d.response_headers)
                          for d in a.destinations)
            changes: dict[str, object] = {"destinations": dests}
            if a.rewrite is not None and a.rewrite.uri and m.uri is not None \
                    and m.uri.prefix is not None:
                changes["rewrite"] = Rewrite(a.rewrite.uri, a.rewrite.authority,
                                             prefix=m.uri.prefix)
            elif a.rewrite is not None and a.rewrite.uri and m.uri is None:
                changes["rewrite"] = Rewrite(a.rewrite.uri, a.rewrite.authority, prefix="/")
            if a.mirror is not None and not a.mirror.port:
                changes["mirror"] = Destination(a.mirror.host, port, a.mirror.subset)
            if m.name:
                changes["origin"] = f"{a.origin} match {m.name}"
            return _replace(a, changes)
        return Action(origin=f"VirtualService {vs.key}: no route matched", destinations=(),
                      retries=NO_RETRIES)

    def tcp_route(self, host: str, port: int, *, source_labels: Mapping[str, str],
                  source_namespace: str = "") -> Action | None:
        """The weighted destinations of the first matching ``tcp`` route for a
        connection to ``host``:``port``; None: no TCP route (the L4 default)."""
        vs = self.virtual_service(host, namespace=source_namespace)
        if vs is None:
            return None
        for t in vs.tcp:
            if t.ports and port not in t.ports:
                continue
            if t.source_labels and not any(
                    all(source_labels.get(k) == v for k, v in sel)
                    for sel in t.source_labels):
                continue
            dests = tuple(d if d.port else Destination(d.host, port, d.subset, d.weight)
                          for d in t.action.destinations)
            return _replace(t.action, {"destinations": dests})
        return None

    def hosts(self) -> list[str]:
        return sorted({h for vs in self._vs for h in vs.hosts})


def _replace(a: Action, changes: Mapping[str, object]) -> Action:
    return dataclasses.replace(a, **changes)  # type: ignore[arg-type]


def weighted(destinations: Sequence[Destination], r: float) -> Destination | None:
    """``Action.choose`` for a bare list."""
    return Action(origin="", destinations=tuple(destinations)).choose(r)
