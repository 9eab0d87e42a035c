"""DestinationRule, client side: clusters, load balancing, circuit breaking, outlier detection.

One :class:`Cluster` is Envoy's cluster for one (service host, port, subset), named as Istio
names it (``outbound|<port>|<subset>|<host FQDN>``). :class:`Clusters` builds them from the
Services, their Endpoints, the pods behind them and the DestinationRules (pure: no I/O, the
clock and the random source are passed in), and keeps the per-endpoint state (active requests,
outlier counters and ejections) and the per-cluster pool counters across :meth:`Clusters.update`
for every cluster and endpoint that remains.

Which DestinationRule applies to a service (Istio's lookup, ``exportTo`` ignored): a rule in the
service's namespace whose host matches, else one in the mesh root namespace. Among the rules of
one namespace the most specific host wins (exact, then the longest wildcard); equally specific
rules: the oldest (then by name), where Istio would merge them. A short host (no dot) means
``<host>.<rule's namespace>.svc.<domain>``.

The policy of a cluster: the rule's ``trafficPolicy``, with the ``portLevelSettings`` entry for the
service port overriding it field by field (loadBalancer, connectionPool, outlierDetection, tls),
then the subset's ``trafficPolicy`` (with its own port-level entry) overriding that, field by
field, as istiod merges them. Unset fields take Istio's defaults:

    loadBalancer      LEAST_REQUEST (also for UNSPECIFIED and the deprecated LEAST_CONN;
                      PASSTHROUGH is served as ROUND_ROBIN: there is no original destination
                      behind a Service port to pass through to)
    connectionPool    no limits (Istio sets Envoy's circuit breakers to 2^32-1)
    outlierDetection  off unless the field is present; then consecutive5xxErrors 5,
                      consecutiveGatewayErrors off, interval 10s, baseEjectionTime 30s,
                      maxEjectionPercent 10, minHealthPercent 0

Endpoints are the Endpoints object's ready addresses for the service port (by port name), their
labels the address's ``labels`` (Shoal's extension) or else the labels of the pod its
``targetRef`` names, plus the WorkloadEntries the Service's selector selects (their labels).
A ServiceEntry's hosts get clusters for its HTTP ports too (STATIC endpoints, DNS addresses as
resolved, NONE: its single-IP addresses, the original destination). A subset holds the
endpoints whose labels include the subset's labels.

Load balancing (``pick``), over the endpoints not ejected (all of them in panic mode: when
``minHealthPercent`` > 0 and fewer are healthy than that, as Envoy's panic threshold), minus
``exclude`` (the hosts a retry already tried) unless that leaves none:

    ROUND_ROBIN    in turn
    RANDOM         uniformly
    LEAST_REQUEST  Envoy's power of two choices: two random draws (with replacement), the one
                   with fewer active requests (:meth:`Cluster.started` / :meth:`Cluster.finished`)
    consistentHash a hash ring: every endpoint owns 128 points placed by a hash of its address,
                   a key goes to the owner of the next point. The ring is built from the healthy
                   endpoints only, with a fixed number of points each, so a key always maps to
                   the same endpoint and when one endpoint leaves (or is ejected) only its keys
                   move. Keys: the header (``httpHeaderName``), the cookie (``httpCookie.name``),
                   the query parameter (``httpQueryParameterName``, from ``path``) or the source
                   IP (``useSourceIp``). A request without its key is served at random, as
                   Envoy's ring does when the hash policy yields no hash.
                   Cookie absent: Envoy generates one. Here :meth:`Cluster.new_cookie` does it: the
                   engine calls it before ``pick``; when it returns a cookie, the engine adds
                   ``name=value`` to the request's cookies for ``pick`` and the ``Set-Cookie``
                   header to the response, so the client's next requests hash the same way.

Connection pool (Envoy's circuit breakers; HTTP/1.1 carries one request per connection, so an
active request is a connection): :meth:`Cluster.acquire` admits a request when fewer than
``tcp.maxConnections`` are active; otherwise it waits in a FIFO queue if fewer than
``http.http1MaxPendingRequests`` wait; otherwise, or when ``http.http2MaxRequests`` requests are
already active, it raises :class:`Overflow` at once (503, flag ``UO``). ``Ticket.release`` frees
the slot for the first waiter.

Outlier detection (Envoy's consecutive 5xx / gateway failure detectors, enforced 100%):
:meth:`Cluster.report` after every attempt: a 5xx counts towards ``consecutive5xxErrors``; 502,
503, 504 and ``status=None`` (connect failure, reset, timeout) count towards
``consecutiveGatewayErrors`` and ``consecutive5xxErrors``; anything else resets both counters.
Reaching a threshold ejects the endpoint unless ejecting it would put more than
``maxEjectionPercent`` of the cluster's endpoints out. An ejected endpoint is out for
``baseEjectionTime`` x its number of ejections (capped at max(300 s, baseEjectionTime), Envoy's
max_ejection_time) and comes back at the first ``interval`` tick after that (ticks every
``interval`` from the cluster's creation, as Envoy's timer); each tick it spends healthy lowers
its number of ejections by one.

    endpoint:  healthy --threshold reached, within maxEjectionPercent--> ejected
               ejected --first interval tick after ejections x baseEjectionTime--> healthy
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import ipaddress
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from meshagent import meshhost
from shoal import meshprotocol
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb
from shoal.informer import key_of
from shoal.trafficrules import DurationError, parse_duration

DEFAULT_ROOT_NAMESPACE = "istio-system"
DEFAULT_DOMAIN = "cluster.local"

ROUND_ROBIN = "ROUND_ROBIN"
LEAST_REQUEST = "LEAST_REQUEST"
RANDOM = "RANDOM"
CONSISTENT_HASH = "CONSISTENT_HASH"

UNLIMITED = 2**32 - 1          # Istio's circuit-breaker defaults
RING_POINTS = 128              # ring points per endpoint
MAX_EJECTION_TIME = 300.0      # Envoy's default max_ejection_time
GATEWAY_ERRORS = (502, 503, 504)

OUTLIER_DEFAULTS = {"consecutive_5xx_errors": 5, "consecutive_gateway_errors": 0,
                    "interval": 10.0, "base_ejection_time": 30.0,
                    "max_ejection_percent": 10, "min_health_percent": 0}

Clock = Callable[[], float]
_Key = tuple[str, int]


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    pod: str = ""                     # namespace/name when known
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def key(self) -> _Key:
        return (self.ip, self.port)


class Overflow(Exception):
    """The connection pool is full: answer 503 with response flag ``UO``."""

    flag = "UO"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoadBalancer:
    policy: str = LEAST_REQUEST
    hash_header: str = ""             # lower-case
    hash_cookie: str = ""
    cookie_path: str = ""
    cookie_ttl: float = 0.0           # 0: a session cookie
    hash_query: str = ""
    hash_source_ip: bool = False

    @property
    def hash_key(self) -> str:
        if self.hash_header:
            return f"header {self.hash_header}"
        if self.hash_cookie:
            return f"cookie {self.hash_cookie}"
        if self.hash_query:
            return f"query parameter {self.hash_query}"
        return "source IP" if self.hash_source_ip else ""


@dataclass(frozen=True)
class PoolLimits:
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED


@dataclass(frozen=True)
class OutlierSettings:
    consecutive_5xx_errors: int = 5
    consecutive_gateway_errors: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True)
class Policy:
    """The settings of one cluster, defaults filled in."""
    load_balancer: LoadBalancer = LoadBalancer()
    pool: PoolLimits = PoolLimits()
    outlier: OutlierSettings | None = None
    tls_mode: str = ""
    rule: str = ""                    # namespace/name of the DestinationRule, "" when none


def _seconds(text: str, default: float) -> float:
    if not text:
        return default
    try:
        return parse_duration(text)
    except DurationError:               # validated at admission; keep the default otherwise
        return default


def _load_balancer(lb: pb.LoadBalancerSettings) -> LoadBalancer:
    if lb.HasField("consistent_hash"):
        ch = lb.consistent_hash
        cookie = ch.http_cookie if ch.HasField("http_cookie") else None
        return LoadBalancer(policy=CONSISTENT_HASH, hash_header=ch.http_header_name.lower(),
                            hash_cookie=cookie.name if cookie else "",
                            cookie_path=cookie.path if cookie else "",
                            cookie_ttl=_seconds(cookie.ttl, 0.0) if cookie else 0.0,
                            hash_query=ch.http_query_parameter_name,
                            hash_source_ip=ch.HasField("use_source_ip") and ch.use_source_ip)
    simple = {"ROUND_ROBIN": ROUND_ROBIN, "RANDOM": RANDOM,
              "PASSTHROUGH": ROUND_ROBIN}.get(lb.simple, LEAST_REQUEST)
    return LoadBalancer(policy=simple)


def _pool(cp: pb.ConnectionPoolSettings) -> PoolLimits:
    def limit(value: int) -> int:
        return value if value > 0 else UNLIMITED
    return PoolLimits(max_connections=limit(cp.tcp.max_connections),
                      max_pending=limit(cp.http.http1_max_pending_requests),
                      max_requests=limit(cp.http.http2_max_requests))


def _outlier(od: pb.OutlierDetection) -> OutlierSettings:
    c5xx = od.consecutive_5xx_errors if od.HasField("consecutive_5xx_errors") else 5
    gateway = (od.consecutive_gateway_errors if od.HasField("consecutive_gateway_errors")
               else od.consecutive_errors)
    interval = _seconds(od.interval, 10.0)
    return OutlierSettings(
        consecutive_5xx_errors=c5xx, consecutive_gateway_errors=gateway,
        interval=interval if interval > 0 else 10.0,
        base_ejection_time=_seconds(od.base_ejection_time, 30.0),
        max_ejection_percent=od.max_ejection_percent or 10,
        min_health_percent=od.min_health_percent)


_PARTS = ("load_balancer", "connection_pool", "outlier_detection", "tls")


def _for_port(policy: pb.TrafficPolicy, port: int) -> dict[str, Any]:
    """The policy's parts for one port: the top level, overridden by its portLevelSettings."""
    parts = {f: getattr(policy, f) for f in _PARTS if policy.HasField(f)}
    for pl in policy.port_level_settings:
        if pl.port.number == port:
            parts.update({f: getattr(pl, f) for f in _PARTS if pl.HasField(f)})
    return parts


def resolve_policy(rule: pb.DestinationRule | None, *, port: int, subset: str) -> Policy:
    """The cluster settings a rule gives (host, port, subset), Istio's merge (pure)."""
    if rule is None:
        return Policy()
    parts: dict[str, Any] = {}
    if rule.spec.HasField("traffic_policy"):
        parts = _for_port(rule.spec.traffic_policy, port)
    for s in rule.spec.subsets:
        if s.name == subset and subset and s.HasField("traffic_policy"):
            parts.update(_for_port(s.traffic_policy, port))
    return Policy(
        load_balancer=(_load_balancer(parts["load_balancer"]) if "load_balancer" in parts
                       else LoadBalancer()),
        pool=_pool(parts["connection_pool"]) if "connection_pool" in parts else PoolLimits(),
        outlier=_outlier(parts["outlier_detection"]) if "outlier_detection" in parts else None,
        tls_mode=parts["tls"].mode if "tls" in parts else "",
        rule=key_of(rule))


def rule_host(rule: pb.DestinationRule, *, domain: str = DEFAULT_DOMAIN) -> str:
    host = rule.spec.host
    return f"{host}.{rule.metadata.namespace}.svc.{domain}" if "." not in host and host != "*" \
        else host


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return pattern == host


def find_rule(rules: Iterable[pb.DestinationRule], *, host: str, namespace: str,
              root_namespace: str = DEFAULT_ROOT_NAMESPACE,
              domain: str = DEFAULT_DOMAIN) -> pb.DestinationRule | None:
    """The DestinationRule for a service ``host`` (FQDN) in ``namespace`` (pure)."""
    rules = list(rules)
    for ns in (namespace, root_namespace):
        found = []
        for r in rules:
            if r.metadata.namespace != ns:
                continue
            pattern = rule_host(r, domain=domain)
            if _host_matches(pattern, host):
                exact = not pattern.startswith("*")
                found.append(((0 if exact else 1, -len(pattern)),
                              r.metadata.creation_timestamp.seconds, r.metadata.name, r))
        if found:
            found.sort(key=lambda t: t[:3])
            return found[0][3]
    return None


# --------------------------------------------------------------------------- runtime state


@dataclass
class _EndpointState:
    active: int = 0
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0
    ejected_at: float | None = None

    def reset_counters(self) -> None:
        self.consecutive_5xx = self.consecutive_gateway = 0


class Ticket:
    """One admitted request; :meth:`release` (idempotent) when it is done."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cluster._release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Cookie:
    """A session-affinity cookie to generate: ``name=value`` and its Set-Cookie header."""
    name: str
    value: str
    set_cookie: str


@dataclass
class Cluster:
    """Envoy's cluster: one (host, port, subset), see the module docstring."""
    name: str
    host: str
    port: int
    subset: str
    endpoints: tuple[Endpoint, ...]
    policy: Policy
    clock: Clock
    rng: random.Random
    _state: dict[_Key, _EndpointState] = field(default_factory=dict)
    _rr: int = 0
    _active: int = 0
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    _ring: tuple[tuple[_Key, ...], list[int], list[Endpoint]] | None = None
    _next_tick: float = 0.0

    def __post_init__(self) -> None:
        self._next_tick = self.clock() + self._interval()
        self._sync_state()

    # ----------------------------------------------------------------- updates
    def _interval(self) -> float:
        return self.policy.outlier.interval if self.policy.outlier else 10.0

    def _sync_state(self) -> None:
        keys = {ep.key for ep in self.endpoints}
        for k in list(self._state):
            if k not in keys:
                del self._state[k]
        for k in keys:
            self._state.setdefault(k, _EndpointState())

    def _reconfigure(self, *, endpoints: tuple[Endpoint, ...], policy: Policy) -> None:
        if policy.outlier != self.policy.outlier and policy.outlier is None:
            for st in self._state.values():      # detection turned off: everyone back
                st.ejected_at, st.ejections = None, 0
                st.reset_counters()
        if (policy.outlier and self.policy.outlier
                and policy.outlier.interval != self.policy.outlier.interval):
            self._next_tick = self.clock() + policy.outlier.interval
        self.endpoints, self.policy = endpoints, policy
        self._sync_state()
        self._ring = None
        self._wake()                              # limits may have grown

    # ----------------------------------------------------------------- outlier detection
    def _ejection_time(self, st: _EndpointState) -> float:
        od = self.policy.outlier
        assert od is not None
        return min(od.base_ejection_time * st.ejections,
                   max(MAX_EJECTION_TIME, od.base_ejection_time))

    def _advance(self) -> None:
        """Run the interval ticks that are due (un-ejection, ejection-count decay)."""
        od = self.policy.outlier
        if od is None:
            return
        now = self.clock()
        if now - self._next_tick > 1000 * od.interval:   # idle for long: all settled
            for st in self._state.values():
                st.ejected_at, st.ejections = None, 0
                st.reset_counters()
            self._ring = None
            self._next_tick = now + od.interval
            return
        while self._next_tick <= now:
            tick = self._next_tick
            for st in self._state.values():
                if st.ejected_at is not None:
                    if tick >= st.ejected_at + self._ejection_time(st):
                        st.ejected_at = None
                        st.reset_counters()
                        self._ring = None
                elif st.ejections:
                    st.ejections -= 1
            self._next_tick = tick + od.interval

    def _eject(self, key: _Key) -> None:
        od = self.policy.outlier
        assert od is not None
        st = self._state[key]
        ejected = sum(1 for s in self._state.values() if s.ejected_at is not None)
        if 100.0 * (ejected + 1) / len(self._state) <= od.max_ejection_percent:
            st.ejected_at = self.clock()
            st.ejections += 1
            self._ring = None

    def report(self, ep: Endpoint, *, status: int | None) -> None:
        """The outcome of one attempt: a status, or None for a connect failure/reset/timeout."""
        od = self.policy.outlier
        st = self._state.get(ep.key)
        if od is None or st is None:
            return
        self._advance()
        if st.ejected_at is not None:
            return
        if status is not None and status < 500:
            st.reset_counters()
            return
        trigger = False
        if status is None or status in GATEWAY_ERRORS:
            st.consecutive_gateway += 1
            trigger |= st.consecutive_gateway == od.consecutive_gateway_errors
        else:
            st.consecutive_gateway = 0
        st.consecutive_5xx += 1
        trigger |= st.consecutive_5xx == od.consecutive_5xx_errors
        if trigger:
            st.reset_counters()
            self._eject(ep.key)

    def ejected(self) -> tuple[Endpoint, ...]:
        self._advance()
        return tuple(ep for ep in self.endpoints
                     if self._state[ep.key].ejected_at is not None)

    # ----------------------------------------------------------------- load balancing
    def _healthy(self) -> list[Endpoint]:
        self._advance()
        healthy = [ep for ep in self.endpoints if self._state[ep.key].ejected_at is None]
        od = self.policy.outlier
        if (od and od.min_health_percent > 0 and self.endpoints
                and 100.0 * len(healthy) / len(self.endpoints) < od.min_health_percent):
            return list(self.endpoints)            # panic: all of them
        return healthy

    def _hash_key(self, headers: Mapping[str, str], source_ip: str, path: str) -> str | None:
        lb = self.policy.load_balancer
        if lb.hash_header:
            return headers.get(lb.hash_header)
        if lb.hash_cookie:
            return _cookie(headers, lb.hash_cookie)
        if lb.hash_query:
            query = urlsplit(path).query
            return next((v for k, v in parse_qsl(query, keep_blank_values=True)
                         if k == lb.hash_query), None)
        if lb.hash_source_ip:
            return source_ip or None
        return None

    def _ring_for(self, healthy: list[Endpoint]) -> tuple[list[int], list[Endpoint]]:
        keys = tuple(ep.key for ep in healthy)
        if self._ring is None or self._ring[0] != keys:
            points = sorted((_hash(f"{ep.address}_{i}"), ep.address, ep)
                            for ep in healthy for i in range(RING_POINTS))
            self._ring = (keys, [p[0] for p in points], [p[2] for p in points])
        return self._ring[1], self._ring[2]

    def pick(self, *, headers: Mapping[str, str], source_ip: str,
             exclude: Collection[Endpoint] = (), path: str = "") -> Endpoint | None:
        """An endpoint for one attempt; None when no healthy one is left (503 ``UH``).

        ``headers`` have lower-case names; ``exclude`` the endpoints earlier attempts of the
        same request used (ignored when nothing else is left); ``path`` (with the query) is
        needed only for ``httpQueryParameterName``.
        """
        healthy = self._healthy()
        if not healthy:
            return None
        excluded = {e.key for e in exclude}
        candidates = [ep for ep in healthy if ep.key not in excluded] or healthy
        lb = self.policy.load_balancer
        if lb.policy == CONSISTENT_HASH:
            key = self._hash_key(headers, source_ip, path)
            if key is None:
                return self.rng.choice(candidates)
            positions, owners = self._ring_for(healthy)
            allowed = {ep.key for ep in candidates}
            start = bisect.bisect_left(positions, _hash(key))
            for i in range(len(owners)):
                ep = owners[(start + i) % len(owners)]
                if ep.key in allowed:
                    return ep
            return candidates[0]
        if lb.policy == RANDOM:
            return self.rng.choice(candidates)
        if lb.policy == ROUND_ROBIN:
            self._rr += 1
            return candidates[(self._rr - 1) % len(candidates)]
        best = self.rng.choice(candidates)         # LEAST_REQUEST: power of two choices
        other = self.rng.choice(candidates)
        if self._state[other.key].active < self._state[best.key].active:
            best = other
        return best

    def new_cookie(self, headers: Mapping[str, str]) -> Cookie | None:
        """The cookie to generate for a request without the hash cookie (else None)."""
        lb = self.policy.load_balancer
        if not lb.hash_cookie or _cookie(headers, lb.hash_cookie) is not None:
            return None
        value = f"{self.rng.getrandbits(64):016x}"
        attrs = [f"{lb.hash_cookie}=\"{value}\""]
        if lb.cookie_path:
            attrs.append(f"Path={lb.cookie_path}")
        if lb.cookie_ttl > 0:
            attrs.append(f"Max-Age={int(lb.cookie_ttl)}")
        attrs.append("HttpOnly")
        return Cookie(name=lb.hash_cookie, value=value, set_cookie="; ".join(attrs))

    def started(self, ep: Endpoint) -> None:
        st = self._state.get(ep.key)
        if st is not None:
            st.active += 1

    def finished(self, ep: Endpoint) -> None:
        st = self._state.get(ep.key)
        if st is not None and st.active > 0:
            st.active -= 1

    # ----------------------------------------------------------------- connection pool
    async def acquire(self) -> Ticket:
        """Admit one request, waiting for a connection if the queue allows; else Overflow."""
        pool = self.policy.pool
        if self._active >= pool.max_requests:
            raise Overflow(f"{self.name}: {self._active} active requests (http2MaxRequests "
                           f"{pool.max_requests})")
        if self._active < pool.max_connections and not self._waiters:
            self._active += 1
            return Ticket(self)
        if len(self._waiters) >= pool.max_pending:
            raise Overflow(f"{self.name}: {self._active} connections busy and "
                           f"{len(self._waiters)} requests pending (maxConnections "
                           f"{pool.max_connections}, http1MaxPendingRequests {pool.max_pending})")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # admitted, then cancelled: pass it on
                self._release()
            else:
                self._waiters.remove(fut)
            raise
        return Ticket(self)

    def _release(self) -> None:
        self._active -= 1
        self._wake()

    def _wake(self) -> None:
        pool = self.policy.pool
        while (self._waiters and self._active < pool.max_connections
               and self._active < pool.max_requests):
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self._active += 1
            fut.set_result(None)

    # ----------------------------------------------------------------- views
    def describe(self) -> dict[str, Any]:
        """Settings and state, JSON-ready (for explain and the admin views)."""
        self._advance()
        lb, pool, od = self.policy.load_balancer, self.policy.pool, self.policy.outlier

        def limit(v: int) -> int | None:
            return None if v >= UNLIMITED else v
        eps = []
        for ep in self.endpoints:
            st = self._state[ep.key]
            item: dict[str, Any] = {"address": ep.address, "pod": ep.pod,
                                    "labels": dict(ep.labels), "active_requests": st.active,
                                    "ejected": st.ejected_at is not None,
                                    "ejections": st.ejections}
            if st.ejected_at is not None:
                item["ejected_for_s"] = round(st.ejected_at + self._ejection_time(st)
                                              - self.clock(), 3)
            eps.append(item)
        return {
            "name": self.name, "host": self.host, "port": self.port, "subset": self.subset,
            "destination_rule": self.policy.rule or None,
            "load_balancer": {"policy": lb.policy, **({"hash_key": lb.hash_key}
                                                      if lb.policy == CONSISTENT_HASH else {})},
            "connection_pool": {"max_connections": limit(pool.max_connections),
                                "http1_max_pending_requests": limit(pool.max_pending),
                                "http2_max_requests": limit(pool.max_requests),
                                "active_requests": self._active,
                                "pending_requests": len(self._waiters)},
            "outlier_detection": None if od is None else {
                "consecutive_5xx_errors": od.consecutive_5xx_errors,
                "consecutive_gateway_errors": od.consecutive_gateway_errors,
                "interval_s": od.interval, "base_ejection_time_s": od.base_ejection_time,
                "max_ejection_percent": od.max_ejection_percent,
                "min_health_percent": od.min_health_percent},
            "tls_mode": self.policy.tls_mode or None,
            "endpoints": eps,
        }


def _cookie(headers: Mapping[str, str], name: str) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


# --------------------------------------------------------------------------- the table


def _values(objs: Any) -> list[Any]:
    return list(objs.values()) if isinstance(objs, Mapping) else list(objs)


def service_endpoints(svc: core_pb2.Service, port: core_pb2.ServicePort,
                      ep: core_pb2.Endpoints | None,
                      pods: Mapping[str, core_pb2.Pod]) -> tuple[Endpoint, ...]:
    """The ready endpoints of one service port with their pods' labels (pure)."""
    out: dict[_Key, Endpoint] = {}
    for subset in ep.subsets if ep is not None else ():
        eport = next((p for p in subset.ports if p.name == port.name), None)
        if eport is None:
            continue
        for a in subset.addresses:
            if not a.ip:
                continue
            ref = a.target_ref
            pod = f"{ref.namespace or svc.metadata.namespace}/{ref.name}" if ref.name else ""
            labels: Mapping[str, str] = a.labels
            if not labels and pod in pods:
                labels = pods[pod].metadata.labels
            out[(a.ip, int(eport.port))] = Endpoint(
                ip=a.ip, port=int(eport.port), pod=pod, labels=tuple(sorted(labels.items())))
    return tuple(out[k] for k in sorted(out))


def workload_entry_endpoints(svc: core_pb2.Service, port: core_pb2.ServicePort,
                             entries: Iterable[pb.WorkloadEntry]) -> tuple[Endpoint, ...]:
    """The WorkloadEntries a Service's selector selects (its namespace, the entries'
    ``spec.labels``) as endpoints of one service port, their labels for subsets, as
    Istio does (pure). ``pod`` is the entry's namespace/name."""
    out: dict[_Key, Endpoint] = {}
    for we in entries:
        labels = dict(we.spec.labels)
        if (we.metadata.namespace != svc.metadata.namespace or not we.spec.address
                or not meshhost.selects(svc.spec.selector, labels)):
            continue
        ep_port = meshhost.entry_port(port, we)
        out[(we.spec.address, ep_port)] = Endpoint(
            ip=we.spec.address, port=ep_port, pod=key_of(we),
            labels=tuple(sorted(labels.items())))
    return tuple(out[k] for k in sorted(out))


def http_entry_ports(se: pb.ServiceEntry) -> list[pb.Port]:
    """A ServiceEntry's HTTP ports (protocol HTTP, HTTP2, GRPC, GRPC-WEB; by name when
    the protocol is unset), Istio's protocol selection (pure)."""
    return [p for p in se.spec.ports if p.number and meshprotocol.port_protocol(
        name=p.name, app_protocol=p.protocol or None).is_http]


def single_ip(text: str) -> str | None:
    try:
        net = ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        return None
    return str(net.network_address) if net.num_addresses == 1 else None


def service_entry_endpoints(se: pb.ServiceEntry, port: pb.Port, host: str, *,
                            resolved: Mapping[str, tuple[str, ...]],
                            workload_entries: Iterable[pb.WorkloadEntry] = ()
                            ) -> tuple[Endpoint, ...]:
    """The endpoints of one ServiceEntry host and port, by its resolution (pure):

        STATIC  its endpoints' IPs and the WorkloadEntries its workloadSelector selects
                (its namespace), each on its ``ports`` entry for the port's name, else the
                port's targetPort, else its number; their labels for subsets
        DNS     its endpoints (IPs as they are, names as ``resolved`` has them), or with
                no endpoints the host itself as resolved
        NONE    the original destination: the entry's addresses that are single IPs, on
                the port's number (a CIDR cannot be a cluster: it stays on the L4 path)
    """
    spec = se.spec
    number = int(port.number)
    default = int(port.target_port or number)
    out: dict[_Key, Endpoint] = {}

    def add(ip: str, ports: Mapping[str, int], labels: Mapping[str, str],
            name: str = "") -> None:
        ep_port = int(ports.get(port.name, default)) if port.name else default
        out.setdefault((ip, ep_port), Endpoint(ip=ip, port=ep_port, pod=name,
                                               labels=tuple(sorted(labels.items()))))
    if spec.resolution == "STATIC":
        for ep in spec.endpoints:
            if (ip := single_ip(ep.address)) is not None:
                add(ip, ep.ports, ep.labels)
        want = dict(spec.workload_selector.labels) if spec.HasField("workload_selector") \
            else {}
        for we in workload_entries if want else ():
            labels = dict(we.spec.labels)
            if (we.metadata.namespace == se.metadata.namespace and we.spec.address
                    and all(labels.get(k) == v for k, v in want.items())
                    and (ip := single_ip(we.spec.address)) is not None):
                add(ip, we.spec.ports, labels, key_of(we))
    elif spec.resolution.startswith("DNS"):
        if spec.endpoints:
            for ep in spec.endpoints:
                ip = single_ip(ep.address)
                for addr in [ip] if ip is not None else resolved.get(ep.address, ()):
                    add(addr, ep.ports, ep.labels)
        else:
            for addr in resolved.get(host, ()):
                add(addr, {}, {})
    elif spec.resolution in ("", "NONE"):
        for a in spec.addresses:
            if (ip := single_ip(a)) is not None:
                out.setdefault((ip, number), Endpoint(ip=ip, port=number))
    return tuple(out[k] for k in sorted(out))


def _in_subset(ep: Endpoint, labels: Mapping[str, str]) -> bool:
    have = dict(ep.labels)
    return all(have.get(k) == v for k, v in labels.items())


def cluster_name(*, host: str, port: int, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{host}"


class Clusters:
    """Every cluster of the mesh's services, rebuilt by :meth:`update`, state kept."""

    def __init__(self, *, clock: Clock = time.monotonic, rng: random.Random | None = None,
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                 domain: str = DEFAULT_DOMAIN) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._root = root_namespace
        self._domain = domain
        self._clusters: dict[str, Cluster] = {}

    def update(self, *, services: Any, endpoints: Any, pods: Any = (),
               destination_rules: Any = (), workload_entries: Any = (),
               service_entries: Any = (),
               resolved: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """Rebuild from the current objects (each a list or a mapping of key -> object).

        A Service's endpoints are its Endpoints object's and the WorkloadEntries its
        selector selects (:func:`workload_entry_endpoints`). Every host of a
        ServiceEntry gets a cluster per HTTP port (:func:`service_entry_endpoints`;
        ``resolved``: DNS names -> IPs), with the DestinationRule for that host."""
        eps = {key_of(e): e for e in _values(endpoints)}
        entries = _values(workload_entries)
        pod_map = {key_of(p): p for p in _values(pods)}
        rules = _values(destination_rules)
        fresh: dict[str, Cluster] = {}
        for svc in _values(services):
            ns, name = svc.metadata.namespace, svc.metadata.name
            host = f"{name}.{ns}.svc.{self._domain}"
            rule = find_rule(rules, host=host, namespace=ns, root_namespace=self._root,
                             domain=self._domain)
            subsets: list[tuple[str, Mapping[str, str]]] = [("", {})]
            if rule is not None:
                subsets += [(s.name, s.labels) for s in rule.spec.subsets if s.name]
            for sp in svc.spec.ports:
                if (sp.protocol or "TCP").upper() != "TCP":
                    continue
                all_eps = service_endpoints(svc, sp, eps.get(key_of(svc)), pod_map)
                if entries:
                    extra = workload_entry_endpoints(svc, sp, entries)
                    have = {e.key for e in all_eps}
                    all_eps = tuple(sorted([*all_eps, *(e for e in extra
                                                        if e.key not in have)],
                                           key=lambda e: e.key))
                self._build(fresh, host=host, port=int(sp.port), rule=rule,
                            subsets=subsets, all_eps=all_eps)
        for se in sorted(_values(service_entries), key=key_of):
            ns = se.metadata.namespace
            for raw in se.spec.hosts:
                host = raw.lower().rstrip(".")
                if host.startswith("*"):
                    continue
                rule = find_rule(rules, host=host, namespace=ns, root_namespace=self._root,
                                 domain=self._domain)
                subsets = [("", {})]
                if rule is not None:
                    subsets += [(s.name, s.labels) for s in rule.spec.subsets if s.name]
                for sep in http_entry_ports(se):
                    if cluster_name(host=host, port=int(sep.number)) in fresh:
                        continue  # a Service (or an older ServiceEntry) has this host:port
                    self._build(fresh, host=host, port=int(sep.number), rule=rule,
                                subsets=subsets, all_eps=service_entry_endpoints(
                                    se, sep, host, resolved=resolved or {},
                                    workload_entries=entries))
        self._clusters = fresh

    def _build(self, fresh: dict[str, Cluster], *, host: str, port: int,
               rule: pb.DestinationRule | None, subsets: list[tuple[str, Mapping[str, str]]],
               all_eps: tuple[Endpoint, ...]) -> None:
        for subset, labels in subsets:
            cname = cluster_name(host=host, port=port, subset=subset)
            members = tuple(e for e in all_eps if _in_subset(e, labels))
            policy = resolve_policy(rule, port=port, subset=subset)
            old = self._clusters.get(cname)
            if old is not None:
                old._reconfigure(endpoints=members, policy=policy)
                fresh[cname] = old
            else:
                fresh[cname] = Cluster(name=cname, host=host, port=port, subset=subset,
                                       endpoints=members, policy=policy, clock=self._clock,
                                       rng=self._rng)

    def get(self, host: str, port: int, subset: str = "") -> Cluster | None:
        """The cluster of a service host (FQDN ``name.ns.svc.<domain>``), port and subset."""
        return self._clusters.get(cluster_name(host=host, port=port, subset=subset))

    def all(self) -> list[Cluster]:
        return sorted(self._clusters.values(), key=lambda c: (c.host, c.port, c.subset))

    def describe(self) -> list[dict[str, Any]]:
        return [c.describe() for c in self.all()]
