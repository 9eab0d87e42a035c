"""Istio's PeerAuthentication and AuthorizationPolicy, decided at L4 and L7 (pure).

    mtls_mode(peer_auths, target, root_namespace=) -> "STRICT" | "PERMISSIVE" | "DISABLE"
    authorize(policies, peer, target, root_namespace=, request=None)
        -> Verdict(allowed, policy, reason)
    l4_gaps(policy) -> what of an AuthorizationPolicy cannot be enforced at L4
    l7_gaps(policy) -> what of it cannot be enforced on an HTTP request
    enforcement_notes(policy) -> Note(warning, text)...: what the agent logs

No I/O and no clock: the callers (the meshagent's inbound path) pass the
policies from their informer caches and act on the answer.

PeerAuthentication (Istio's semantics):

- A policy without a selector (or with empty ``matchLabels``) in the root
  namespace is mesh-wide; without a selector elsewhere it is namespace-wide; a
  policy with a selector, in the workload's namespace, whose labels are a
  subset of the workload's, is workload-wide. Selector policies in the root
  namespace are ignored, as Istio does. Of several candidates at one level the
  oldest (creationTimestamp, then name) wins.
- The workload level overrides the namespace level, which overrides the mesh
  level; ``UNSET`` (or no ``mtls``) inherits from the level above. With no
  policy at all the mode is PERMISSIVE.
- ``portLevelMtls`` (workload policies only) sets the mode of one destination
  port; an ``UNSET`` port inherits the workload's resolved mode.
- The answer is Istio's resolved mode, DISABLE included. What to do with it is
  the caller's choice; ztunnel only acts on STRICT (plaintext refused) and
  treats DISABLE like PERMISSIVE on inbound.

AuthorizationPolicy (Istio's semantics, as ztunnel enforces them):

- A policy applies to a workload when it is in the workload's namespace or
  in the root namespace (mesh-wide) and its selector is empty or a subset of
  the workload's labels. Policies with ``targetRef``/``targetRefs`` are meant
  for waypoints and gateways and are ignored here, as ztunnel does.
- DENY first: if any applicable DENY policy matches, the connection is
  denied. Then, if no ALLOW policy applies to the workload, it is allowed; if
  one of them matches, it is allowed; otherwise denied.
- CUSTOM and AUDIT policies are ignored: ztunnel does not support them (istiod
  drops them with the status "ztunnel does not support the CUSTOM action").
  :func:`l4_gaps` names them so the caller can log or report it.
- A policy matches when any of its rules matches. A rule matches when each of
  its parts matches: ``from`` (any source), ``to`` (any operation) and every
  ``when`` condition; a part that is absent matches anything, so ``rules:
  [{}]`` matches everything, while an ALLOW policy without rules matches
  nothing ("allow nothing"). Within a source or operation every field that
  is set must match: one of its values, and none of its ``not`` values.
- Strings match exactly, or by one leading ``*`` (suffix) or trailing ``*``
  (prefix); ``*`` alone matches any non-empty value. A plaintext peer has no
  principal and no namespace, so ``principals: ["*"]`` never matches it and
  ``notPrincipals: ["*"]`` always does.
- HTTP attributes (``requestPrincipals``, ``remoteIpBlocks``, ``hosts``,
  ``methods``, ``paths``, their ``not`` forms, and ``when`` keys other than
  source.ip, source.namespace, source.principal, destination.ip and
  destination.port) cannot be checked at L4. As istiod does for ztunnel: an
  ALLOW rule that uses any of them never matches; in a DENY rule they are left
  out, so the rule matches on its L4 parts alone ("more restrictive than
  requested"). A DENY source or operation that had only HTTP attributes
  therefore matches every connection, as Istio's documentation and its
  validation warning ("will deny all traffic to TCP ports") describe; ztunnel's
  code instead skips such an emptied match, which lets traffic through, and
  we do not copy that.

AuthorizationPolicy on an HTTP request (``request=HttpRequest(...)``; Istio's
sidecar semantics, for a port that speaks HTTP): everything above holds, and
every HTTP attribute is evaluated instead of being left out:

- ``methods`` match the request method (case-sensitive, Istio's string match).
- ``paths`` match the path without its query or fragment, after RFC 3986
  dot-segment removal (Istio's default BASE normalization): exact, ``prefix*``,
  ``*suffix``, ``*``, and the path templates ``{*}`` (one segment) and ``{**}``
  (any remaining segments, last only).
- ``hosts`` match the Host/:authority case-insensitively, with or without its
  port: ``example.com`` matches ``example.com:8080``; ``example.com:8080``
  only that.
- ``remoteIpBlocks`` match the original client: the last X-Forwarded-For
  address when there is one (Envoy's default, no trusted hops), else the
  peer's address. Spoofable, as Istio's documentation warns.
- ``when: request.headers[Name]`` matches the header's value (the name is
  case-insensitive; an absent header matches no value, so it fails ``values``
  and passes ``notValues``); ``remote.ip`` as remoteIpBlocks.
- JWT attributes (``requestPrincipals``, ``notRequestPrincipals``,
  ``request.auth.*``): Shoal has no RequestAuthentication, so no request
  carries a validated JWT. An ALLOW rule that uses any of them never matches
  (it could only be honoured by validating tokens); a DENY rule evaluates them
  as Istio does for a request without a JWT: ``requestPrincipals`` and
  ``values`` never match, ``notRequestPrincipals``/``notValues`` always do
  (so ``notRequestPrincipals: ["*"]`` denies every request, as it denies
  requests without a token in Istio).
- ``when`` keys Shoal cannot know on this path (``connection.sni``,
  ``experimental.*``, unknown ones): an ALLOW rule never matches, a DENY rule
  is enforced without them (more restrictive), as at L4.
- Ports and every L4 attribute are evaluated as above.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.api.security.v1 import security_pb2

PeerAuthentication = security_pb2.PeerAuthentication
AuthorizationPolicy = security_pb2.AuthorizationPolicy

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
UNSET = "UNSET"
DEFAULT_ROOT_NAMESPACE = "istio-system"

ALLOW = "ALLOW"
DENY = "DENY"
# when keys ztunnel evaluates; any other key is an HTTP attribute.
L4_CONDITION_KEYS = frozenset({"source.ip", "source.namespace", "source.principal",
                               "destination.ip", "destination.port"})
_HTTP_SOURCE_FIELDS = ("request_principals", "not_request_principals", "remote_ip_blocks",
                       "not_remote_ip_blocks")
_HTTP_OPERATION_FIELDS = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")
# when keys evaluated on an HTTP request (besides the L4 ones); request.auth.* is JWT.
L7_CONDITION_KEYS = frozenset({"remote.ip"})
_HEADER_KEY = re.compile(r"^request\.headers\[([^\]]+)\]$")
_JWT_SOURCE_FIELDS = ("request_principals", "not_request_principals")


@dataclass(frozen=True)
class Peer:
    """Who is connecting."""

    # Istio form "cluster.local/ns/NS/sa/SA" (no spiffe://); "" = plaintext.
    principal: str
    # The peer identity's namespace; "" when unknown or plaintext.
    namespace: str
    ip: str


@dataclass(frozen=True)
class Target:
    """The destination workload: a pod on this node, and the port connected to."""

    namespace: str
    labels: Mapping[str, str] = field(hash=False)
    port: int
    # The destination address, for ``when: destination.ip``; "" when unknown.
    ip: str = ""


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request as the inbound agent parsed it (for L7 authorization)."""

    method: str
    path: str  # as received: with the query
    host: str  # Host / :authority, maybe with a port
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)  # lower-case keys


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # "namespace/name" of the deciding policy; "" when no policy decided.
    policy: str
    # Why, for logs and counters.
    reason: str


# --------------------------------------------------------------------------- helpers


def policy_key(obj: Any) -> str:
    return f"{obj.metadata.namespace}/{obj.metadata.name}"


def _age_key(obj: Any) -> tuple[int, int, str]:
    ts = obj.metadata.creation_timestamp
    return (int(ts.seconds), int(ts.nanos), str(obj.metadata.name))


def _selects(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def string_matches(pattern: str, value: str) -> bool:
    """Istio's string match: exact, "prefix*", "*suffix", or "*" (present)."""
    if not value:
        return False
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _in_blocks(blocks: Iterable[str], ip: str) -> Iterable[bool]:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return [False]
    out = []
    for block in blocks:
        try:
            out.append(addr in ipaddress.ip_network(block, strict=False))
        except ValueError:
            continue  # unparsable blocks are dropped, as istiod does
    return out


def _ports(values: Iterable[str]) -> list[int]:
    return [int(v) for v in values if v.isascii() and v.isdigit() and int(v) <= 65535]


def _identity(principal: str) -> tuple[str, str] | None:
    """(namespace, service account) of "td/ns/NS/sa/SA"; None otherwise."""
    parts = principal.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[2], parts[4]
    return None


def _peer_namespace(peer: Peer) -> str:
    if peer.namespace or not peer.principal:
        return peer.namespace
    ident = _identity(peer.principal)
    return ident[0] if ident else ""


def _check(positive: Sequence[str], negative: Sequence[str],
           matches: Callable[[str], bool]) -> bool:
    """Any positive value matches (if any are given) and no negative one does."""
    if positive and not any(matches(v) for v in positive):
        return False
    return not any(matches(v) for v in negative)


def normalize_path(path: str) -> str:
    """The path Istio's policies see: no query or fragment, dot segments removed."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return path
    out = posixpath.normpath(path)
    if out.startswith("//"):  # normpath keeps a leading "//"; RFC 3986 does not care
        out = "/" + out.lstrip("/")
    if path.endswith("/") and out != "/":
        out += "/"
    return out


def _template(pattern: str) -> re.Pattern[str] | None:
    """Istio's path template (``{*}``, ``{**}``) as a regex; None if not a template."""
    if "{*}" not in pattern and "{**}" not in pattern:
        return None
    parts = []
    for segment in pattern.split("/"):
        if segment == "{*}":
            parts.append("[^/]+")
        elif segment == "{**}":
            parts.append(".+")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


def path_matches(pattern: str, path: str) -> bool:
    """Istio's ``paths`` match against a normalized path."""
    template = _template(pattern)
    if template is not None:
        return template.fullmatch(path) is not None
    return string_matches(pattern, path)


def host_matches(pattern: str, host: str) -> bool:
    """Istio's ``hosts`` match: case-insensitive, the request's port optional."""
    pattern, host = pattern.lower(), host.lower()
    if string_matches(pattern, host):
        return True
    name, sep, port = host.rpartition(":")
    bare_ipv6 = ":" in name and not name.startswith("[")
    if sep and port.isdigit() and not bare_ipv6:
        return string_matches(pattern, name)
    return False


def remote_ip(peer: Peer, request: HttpRequest) -> str:
    """The original client: the last X-Forwarded-For address, else the peer's."""
    xff = request.headers.get("x-forwarded-for", "")
    last = xff.rsplit(",", 1)[-1].strip()
    if last:
        try:
            ipaddress.ip_address(last)
            return last
        except ValueError:
            pass
    return peer.ip


def _header(request: HttpRequest, name: str) -> str:
    name = name.strip().lower()
    for key, value in request.headers.items():
        if key.lower() == name:
            return value
    return ""


# --------------------------------------------------------------------------- mTLS


def _mode(mtls: security_pb2.MutualTLS, inherited: str) -> str:
    mode = mtls.mode
    return inherited if mode in ("", UNSET) else mode


def mtls_mode(peer_auths: Iterable[PeerAuthentication], target: Target, *,
              root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> str:
    """The mTLS mode Istio would enforce for connections to target.port."""
    mesh: list[PeerAuthentication] = []
    namespace: list[PeerAuthentication] = []
    workload: list[PeerAuthentication] = []
    for pa in peer_auths:
        ns = pa.metadata.namespace
        selector = pa.spec.selector.match_labels
        if not selector:
            if ns == root_namespace:
                mesh.append(pa)
            elif ns == target.namespace:
                namespace.append(pa)
        elif ns == target.namespace != root_namespace and _selects(selector, target.labels):
            workload.append(pa)
    levels = [min(c, key=_age_key) if c else None for c in (mesh, namespace, workload)]
    mode = PERMISSIVE
    for level in levels:
        if level is not None:
            mode = _mode(level.spec.mtls, mode)
    chosen = levels[2]
    if chosen is not None and target.port in chosen.spec.port_level_mtls:
        mode = _mode(chosen.spec.port_level_mtls[target.port], mode)
    return mode


# --------------------------------------------------------------------------- authorization


def _http_in_rule(rule: security_pb2.Rule) -> list[str]:
    """The HTTP-only attributes a rule uses, by their manifest names."""
    found: list[str] = []
    for src in rule.from_:
        found += [src.source.DESCRIPTOR.fields_by_name[f].json_name
                  for f in _HTTP_SOURCE_FIELDS if getattr(src.source, f)]
    for to in rule.to:
        found += [to.operation.DESCRIPTOR.fields_by_name[f].json_name
                  for f in _HTTP_OPERATION_FIELDS if getattr(to.operation, f)]
    found += [c.key for c in rule.when if c.key not in L4_CONDITION_KEYS]
    return sorted(set(found))


def _unsupported_at_l7(rule: security_pb2.Rule) -> list[str]:
    """What of a rule cannot be honoured on an HTTP request here (JWT, unknown keys)."""
    found: list[str] = []
    for src in rule.from_:
        found += [src.source.DESCRIPTOR.fields_by_name[f].json_name
                  for f in _JWT_SOURCE_FIELDS if getattr(src.source, f)]
    found += [c.key for c in rule.when
              if c.key not in L4_CONDITION_KEYS and c.key not in L7_CONDITION_KEYS
              and not _HEADER_KEY.match(c.key)]
    return sorted(set(found))


def _source_matches(src: security_pb2.Source, peer: Peer, *, policy_namespace: str,
                    request: HttpRequest | None = None) -> bool:
    ns = _peer_namespace(peer)
    ident = _identity(peer.principal) if peer.principal else None

    def sa_matches(value: str) -> bool:
        want_ns, _, want_sa = value.rpartition("/")
        return ident is not None and ident == (want_ns or policy_namespace, want_sa)

    l4 = (_check(src.principals, src.not_principals,
                 lambda p: string_matches(p, peer.principal))
          and _check(src.namespaces, src.not_namespaces, lambda p: string_matches(p, ns))
          and _check(src.service_accounts, src.not_service_accounts, sa_matches)
          and _blocks_check(src.ip_blocks, src.not_ip_blocks, peer.ip))
    if request is None or not l4:
        return l4
    # No request carries a validated JWT: its principal is absent ("").
    return (_check(src.request_principals, src.not_request_principals,
                   lambda p: string_matches(p, ""))
            and _blocks_check(src.remote_ip_blocks, src.not_remote_ip_blocks,
                              remote_ip(peer, request)))


def _operation_matches(op: security_pb2.Operation, target: Target,
                       request: HttpRequest | None) -> bool:
    if not _ports_check(op.ports, op.not_ports, target.port):
        return False
    if request is None:
        return True
    path = normalize_path(request.path)
    return (_check(op.methods, op.not_methods, lambda p: string_matches(p, request.method))
            and _check(op.paths, op.not_paths, lambda p: path_matches(p, path))
            and _check(op.hosts, op.not_hosts, lambda p: host_matches(p, request.host)))


def _blocks_check(positive: Sequence[str], negative: Sequence[str], ip: str) -> bool:
    if positive and not any(_in_blocks(positive, ip)):
        return False
    return not any(_in_blocks(negative, ip))


def _ports_check(positive: Sequence[str], negative: Sequence[str], port: int) -> bool:
    if positive and port not in _ports(positive):
        return False
    return port not in _ports(negative)


def _condition_matches(cond: security_pb2.Condition, peer: Peer, target: Target,
                       request: HttpRequest | None = None) -> bool:
    key = cond.key
    if request is not None:
        header = _HEADER_KEY.match(key)
        if header is not None:
            value = _header(request, header.group(1))
            return _check(cond.values, cond.not_values, lambda p: string_matches(p, value))
        if key == "remote.ip":
            return _blocks_check(cond.values, cond.not_values, remote_ip(peer, request))
        if key.startswith("request.auth."):  # no JWT: the attribute is absent
            return _check(cond.values, cond.not_values, lambda p: string_matches(p, ""))
    if key == "source.ip":
        return _blocks_check(cond.values, cond.not_values, peer.ip)
    if key == "destination.ip":
        return _blocks_check(cond.values, cond.not_values, target.ip)
    if key == "destination.port":
        return _ports_check(cond.values, cond.not_values, target.port)
    if key == "source.namespace":
        ns = _peer_namespace(peer)
        return _check(cond.values, cond.not_values, lambda p: string_matches(p, ns))
    if key == "source.principal":
        return _check(cond.values, cond.not_values,
                      lambda p: string_matches(p, peer.principal))
    return True  # not checkable here: left out (only reached for DENY rules)


def _rule_matches(rule: security_pb2.Rule, peer: Peer, target: Target, *,
                  policy_namespace: str, request: HttpRequest | None = None) -> bool:
    if rule.from_ and not any(_source_matches(f.source, peer, policy_namespace=policy_namespace,
                                              request=request)
                              for f in rule.from_):
        return False
    if rule.to and not any(_operation_matches(t.operation, target, request) for t in rule.to):
        return False
    return all(_condition_matches(c, peer, target, request) for c in rule.when)


def _policy_matches(policy: AuthorizationPolicy, peer: Peer, target: Target,
                    request: HttpRequest | None = None) -> bool:
    allow = policy.spec.action in ("", ALLOW)
    for rule in policy.spec.rules:
        if allow and request is None and _http_in_rule(rule):
            continue  # an ALLOW rule with HTTP attributes never matches at L4
        if allow and request is not None and _unsupported_at_l7(rule):
            continue  # nor one with JWT or unknown attributes on a request
        if _rule_matches(rule, peer, target, policy_namespace=policy.metadata.namespace,
                         request=request):
            return True
    return False


def _applies(policy: AuthorizationPolicy, target: Target, root_namespace: str) -> bool:
    spec = policy.spec
    if spec.HasField("target_ref") or spec.target_refs:
        return False
    if policy.metadata.namespace not in (target.namespace, root_namespace):
        return False
    return _selects(spec.selector.match_labels, target.labels)


def authorize(policies: Iterable[AuthorizationPolicy], peer: Peer, target: Target, *,
              root_namespace: str = DEFAULT_ROOT_NAMESPACE,
              request: HttpRequest | None = None) -> Verdict:
    """Whether Istio's authorization lets peer connect to target (``request`` None: at
    L4) or send it ``request`` (on an HTTP port); see the module doc."""
    applicable = sorted((p for p in policies if _applies(p, target, root_namespace)),
                        key=lambda p: (p.metadata.namespace, p.metadata.name))
    denies = [p for p in applicable if p.spec.action == DENY]
    allows = [p for p in applicable if p.spec.action in ("", ALLOW)]
    for policy in denies:
        if _policy_matches(policy, peer, target, request):
            key = policy_key(policy)
            return Verdict(False, key, f"denied by DENY policy {key}")
    if not allows:
        return Verdict(True, "", "no ALLOW policy applies")
    for policy in allows:
        if _policy_matches(policy, peer, target, request):
            key = policy_key(policy)
            return Verdict(True, key, f"allowed by ALLOW policy {key}")
    names = ", ".join(policy_key(p) for p in allows)
    return Verdict(False, "", f"no ALLOW policy matched ({names})")


def l4_gaps(policy: AuthorizationPolicy) -> tuple[str, ...]:
    """What of this policy cannot be enforced at L4 (on a TCP port), one sentence each.
    The agent logs ``enforcement_notes`` instead: it checks HTTP ports at L7."""
    spec = policy.spec
    if spec.HasField("target_ref") or spec.target_refs:
        return ("targetRefs are for waypoints and gateways; the policy is ignored at L4",)
    if spec.action in ("CUSTOM", "AUDIT"):
        return (f"action {spec.action} is not supported at L4; the policy is ignored",)
    allow = spec.action in ("", ALLOW)
    gaps = []
    for i, rule in enumerate(spec.rules):
        http = _http_in_rule(rule)
        if http:
            effect = ("the rule never matches" if allow
                      else "the rule is enforced without them (more restrictive)")
            gaps.append(f"rules[{i}]: HTTP attributes ({', '.join(http)}) cannot be checked "
                        f"at L4; {effect}")
    return tuple(gaps)


def _ignored(policy: AuthorizationPolicy) -> str | None:
    """Why the whole policy is ignored on every port, or None."""
    spec = policy.spec
    if spec.HasField("target_ref") or spec.target_refs:
        return "targetRefs are for waypoints and gateways; the policy is ignored"
    if spec.action in ("CUSTOM", "AUDIT"):
        return f"action {spec.action} is not supported; the policy is ignored"
    return None


def _l7_gap(i: int, rule: security_pb2.Rule, *, allow: bool) -> str | None:
    unsupported = _unsupported_at_l7(rule)
    if not unsupported:
        return None
    effect = ("the rule never matches" if allow
              else "the rule is enforced as for a request without a JWT, and "
              "without the other attributes (more restrictive)")
    return (f"rules[{i}]: {', '.join(unsupported)} cannot be checked (no JWT "
            f"validation; unknown keys); {effect}")


def l7_gaps(policy: AuthorizationPolicy) -> tuple[str, ...]:
    """What of this policy is not enforced on HTTP requests, one sentence each (for logs)."""
    if (why := _ignored(policy)) is not None:
        return (why,)
    allow = policy.spec.action in ("", ALLOW)
    return tuple(gap for i, rule in enumerate(policy.spec.rules)
                 if (gap := _l7_gap(i, rule, allow=allow)) is not None)


@dataclass(frozen=True)
class Note:
    """One sentence on how the meshagent enforces a policy, for its log."""

    warning: bool  # True: part of the policy is enforced on no port at all
    text: str


def enforcement_notes(policy: AuthorizationPolicy) -> tuple[Note, ...]:
    """What the agent logs about a policy (pure). The agent checks HTTP attributes on
    its workloads' HTTP ports (L7) and handles them as ztunnel does on TCP ports (L4;
    see the module doc), so such a rule is enforced on both, and only an information
    says how. A warning is kept for what no port enforces (``l7_gaps``): an ignored
    policy, JWT attributes, unknown ``when`` keys."""
    if (why := _ignored(policy)) is not None:
        return (Note(True, why),)
    allow = policy.spec.action in ("", ALLOW)
    notes: list[Note] = []
    for i, rule in enumerate(policy.spec.rules):
        gap = _l7_gap(i, rule, allow=allow)
        if gap is not None:
            notes.append(Note(True, gap))
            if allow:
                continue  # it never matches, on any port: the warning says all
        unsupported = set(_unsupported_at_l7(rule))
        checked = [a for a in _http_in_rule(rule) if a not in unsupported]
        if not checked:
            continue
        if allow:
            at_l4 = "an ALLOW rule with them never matches there"
        else:
            at_l4 = "the DENY rule is enforced without them there (more restrictive)"
            if not any(t.operation.ports for t in rule.to):
                at_l4 += "; set to.operation.ports to keep it to the HTTP ports"
        notes.append(Note(False, f"rules[{i}]: {', '.join(checked)} are checked on "
                                 f"requests to the target's HTTP ports (L7); on its TCP "
                                 f"ports (L4) they cannot be, and {at_l4}"))
    return tuple(notes)
