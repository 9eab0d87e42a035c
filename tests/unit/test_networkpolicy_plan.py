"""The node agent's NetworkPolicy planner (pure), table-driven.

Each case writes policies as users do (Kubernetes YAML, decoded and defaulted
by the API's own code), plans every node's chains, and then runs a packet
through them with a small evaluator of our rule lines (FORWARD on the sender's
node, and on the receiver's when it is another). So the tests check what a
user sees, allowed or blocked, and the rule text only where it matters.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from nodeagent.networkpolicy import (
    EGRESS_PREFIX,
    INGRESS_PREFIX,
    POLICY_CHAIN,
    NamedPort,
    NetworkPolicies,
    PodView,
    Ruleset,
    block_cidrs,
    egress_chain,
    ingress_chain,
    matches_plan,
    our_lines,
    plan_ruleset,
    pod_view,
    render,
    stale_chains,
)
from nodeagent.serviceproxy import Jump
from shoal.api.core.v1 import core_pb2
from shoal.api.networking.v1 import networking_pb2
from shoal.kinds import builtin_kinds
from shoal.manifests import decode
from shoal.validation import apply_defaults, validate

KINDS = builtin_kinds()

NAMESPACES: Mapping[str, Mapping[str, str]] = {
    "shop": {"kubernetes.io/metadata.name": "shop", "team": "a"},
    "other": {"kubernetes.io/metadata.name": "other", "team": "b"},
    "ops": {"kubernetes.io/metadata.name": "ops"},
}
PODS = {
    "db": PodView("shop", "db", "10.244.1.10", "node-1", {"app": "db", "tier": "data"},
                  (NamedPort("pg", "TCP", 5432), NamedPort("metrics", "TCP", 9090))),
    "web": PodView("shop", "web", "10.244.1.11", "node-1", {"app": "web"}),
    "api": PodView("shop", "api", "10.244.2.10", "node-2", {"app": "api"},
                   (NamedPort("http", "TCP", 8080), NamedPort("dns", "UDP", 53))),
    "other-web": PodView("other", "web", "10.244.2.11", "node-2", {"app": "web"}),
    "other-cron": PodView("other", "cron", "10.244.3.11", "node-3", {"app": "cron"}),
    "probe": PodView("ops", "probe", "10.244.3.10", "node-3", {"app": "probe"}),
}
EXTERNAL = "192.0.2.1"


def np(name: str, spec: dict[str, Any], namespace: str = "shop"
       ) -> networking_pb2.NetworkPolicy:
    kind, msg = decode({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                        "metadata": {"name": name, "namespace": namespace}, "spec": spec}, KINDS)
    apply_defaults(kind, msg)
    assert validate(kind, msg) == []
    assert isinstance(msg, networking_pb2.NetworkPolicy)
    return msg


# --------------------------------------------------------------------------- the evaluator


def _cidr_has(cidr: str, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def _run_chain(rules: Ruleset, chain: str, pkt: dict[str, Any]) -> str:
    """'RETURN' (fell through or returned) or 'REJECT'."""
    for line in rules.chains[chain]:
        words = shlex.split(line)
        assert words[:2] == ["-A", chain], line
        i, ok = 2, True
        target = ""
        while i < len(words):
            w = words[i]
            if w == "-s":
                ok &= _cidr_has(words[i + 1], pkt["src"])
                i += 2
            elif w == "-d":
                ok &= _cidr_has(words[i + 1], pkt["dst"])
                i += 2
            elif w == "-p":
                ok &= words[i + 1] == pkt["proto"]
                i += 2
            elif w == "-m":
                i += 2
            elif w == "--dport":
                low, _, high = words[i + 1].partition(":")
                ok &= int(low) <= pkt["port"] <= int(high or low)
                i += 2
            elif w == "--ctstate":
                ok &= pkt["established"] and words[i + 1] == "RELATED,ESTABLISHED"
                i += 2
            elif w == "--comment":
                i += 2
            elif w == "-j":
                target = words[i + 1]
                break
            else:
                raise AssertionError(f"unknown word {w!r} in {line}")
        if not ok:
            continue
        if target == "RETURN":
            return "RETURN"
        if target == "REJECT":
            return "REJECT"
        if _run_chain(rules, target, pkt) == "REJECT":
            return "REJECT"
    return "RETURN"


def allowed(policies: Sequence[networking_pb2.NetworkPolicy], src: str, dst: str,
            port: int = 5432, proto: str = "tcp", *, established: bool = False,
            pods: Mapping[str, PodView] = PODS) -> bool:
    """``src``/``dst``: a pod of PODS by its key there, or an IP outside the cluster."""
    views = list(pods.values())
    ends = [pods.get(src), pods.get(dst)]
    nodes = {p.node for p in ends if p is not None}
    pkt = {"src": pods[src].ip if src in pods else src, "dst": pods[dst].ip if dst in pods else dst,
           "proto": proto, "port": port, "established": established}
    for node in sorted(nodes):
        rules = plan_ruleset(local=[p for p in views if p.node == node], pods=views,
                             namespaces=NAMESPACES, policies=policies)
        assert rules.problems == ()
        if _run_chain(rules, POLICY_CHAIN, pkt) == "REJECT":
            return False
    return True


# --------------------------------------------------------------------------- semantics

DENY_INGRESS = np("deny", {"podSelector": {}})
DENY_EGRESS = np("deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
DB = {"matchLabels": {"app": "db"}}
FROM_WEB_5432 = np("from-web", {"podSelector": DB, "ingress": [{
    "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
    "ports": [{"port": 5432}]}]})


def ingress_to_db(peers: list[dict[str, Any]] | None = None,
                  ports: list[dict[str, Any]] | None = None,
                  name: str = "to-db") -> networking_pb2.NetworkPolicy:
    rule: dict[str, Any] = {}
    if peers is not None:
        rule["from"] = peers
    if ports is not None:
        rule["ports"] = ports
    return np(name, {"podSelector": DB, "ingress": [rule]})


def egress_from_web(peers: list[dict[str, Any]] | None = None,
                    ports: list[dict[str, Any]] | None = None) -> networking_pb2.NetworkPolicy:
    rule: dict[str, Any] = {}
    if peers is not None:
        rule["to"] = peers
    if ports is not None:
        rule["ports"] = ports
    return np("web-out", {"podSelector": {"matchLabels": {"app": "web"}},
                          "policyTypes": ["Egress"], "egress": [rule]})


CASES: list[tuple[str, list[networking_pb2.NetworkPolicy], str, str, int, str, bool]] = [
    # (what, policies, src, dst, port, proto, allowed)
    ("no policy: not isolated", [], "other-web", "db", 5432, "tcp", True),
    ("no policy: from outside", [], EXTERNAL, "db", 5432, "tcp", True),
    ("default deny: another node's pod", [DENY_INGRESS], "other-web", "db", 5432, "tcp", False),
    ("default deny: same node, same namespace", [DENY_INGRESS], "web", "db", 5432, "tcp",
     False),
    ("default deny: from outside", [DENY_INGRESS], EXTERNAL, "db", 5432, "tcp", False),
    ("default deny: udp too", [DENY_INGRESS], "web", "db", 53, "udp", False),
    ("default deny ingress leaves egress open", [DENY_INGRESS], "db", "other-web", 80, "tcp",
     True),
    ("a policy elsewhere does not isolate", [np("deny", {"podSelector": {}}, "other")],
     "web", "db", 5432, "tcp", True),
    ("a selector that misses does not isolate",
     [np("deny", {"podSelector": {"matchLabels": {"app": "nothing"}}})],
     "web", "db", 5432, "tcp", True),
    ("matchExpressions select", [np("deny", {"podSelector": {"matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["data"]}]}})], "web", "db", 5432, "tcp",
     False),
    ("podSelector peer: labelled pod, listed port", [DENY_INGRESS, FROM_WEB_5432],
     "web", "db", 5432, "tcp", True),
    ("podSelector peer: unlabelled pod", [DENY_INGRESS, FROM_WEB_5432], "api", "db", 5432,
     "tcp", False),
    ("podSelector peer: same labels in another namespace", [DENY_INGRESS, FROM_WEB_5432],
     "other-web", "db", 5432, "tcp", False),
    ("podSelector peer: other port", [DENY_INGRESS, FROM_WEB_5432], "web", "db", 9090, "tcp",
     False),
    ("podSelector peer: same port, udp", [DENY_INGRESS, FROM_WEB_5432], "web", "db", 5432,
     "udp", False),
    ("namespaceSelector peer: every pod there",
     [ingress_to_db([{"namespaceSelector": {"matchLabels": {"team": "b"}}}])],
     "other-cron", "db", 5432, "tcp", True),
    ("namespaceSelector peer: not the policy's own namespace",
     [ingress_to_db([{"namespaceSelector": {"matchLabels": {"team": "b"}}}])],
     "web", "db", 5432, "tcp", False),
    ("namespace name label",
     [ingress_to_db([{"namespaceSelector": {"matchLabels": {
         "kubernetes.io/metadata.name": "ops"}}}])], "probe", "db", 5432, "tcp", True),
    ("both selectors in one peer: both must match",
     [ingress_to_db([{"namespaceSelector": {"matchLabels": {"team": "b"}},
                      "podSelector": {"matchLabels": {"app": "web"}}}])],
     "other-web", "db", 5432, "tcp", True),
    ("both selectors in one peer: other pod of that namespace",
     [ingress_to_db([{"namespaceSelector": {"matchLabels": {"team": "b"}},
                      "podSelector": {"matchLabels": {"app": "web"}}}])],
     "other-cron", "db", 5432, "tcp", False),
    ("both selectors in one peer: that pod label in the own namespace",
     [ingress_to_db([{"namespaceSelector": {"matchLabels": {"team": "b"}},
                      "podSelector": {"matchLabels": {"app": "web"}}}])],
     "web", "db", 5432, "tcp", False),
    ("two peers are OR: namespace", [ingress_to_db([
        {"namespaceSelector": {"matchLabels": {"team": "b"}}},
        {"podSelector": {"matchLabels": {"app": "web"}}}])], "other-cron", "db", 5432, "tcp",
     True),
    ("two peers are OR: pod", [ingress_to_db([
        {"namespaceSelector": {"matchLabels": {"team": "b"}}},
        {"podSelector": {"matchLabels": {"app": "web"}}}])], "web", "db", 5432, "tcp", True),
    ("empty namespaceSelector: every namespace",
     [ingress_to_db([{"namespaceSelector": {}}])], "probe", "db", 5432, "tcp", True),
    ("empty namespaceSelector: not outside the cluster",
     [ingress_to_db([{"namespaceSelector": {}}])], EXTERNAL, "db", 5432, "tcp", False),
    ("a peer that matches no pod allows nothing",
     [ingress_to_db([{"podSelector": {"matchLabels": {"app": "gone"}}}])],
     "web", "db", 5432, "tcp", False),
    ("ipBlock: inside", [ingress_to_db([{"ipBlock": {
        "cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}])], "web", "db", 5432, "tcp",
     True),
    ("ipBlock: in the except", [ingress_to_db([{"ipBlock": {
        "cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}])], "api", "db", 5432, "tcp",
     False),
    ("ipBlock: outside", [ingress_to_db([{"ipBlock": {
        "cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}])], EXTERNAL, "db", 5432, "tcp",
     False),
    ("ipBlock: an outside host", [ingress_to_db([{"ipBlock": {"cidr": "192.0.2.0/24"}}])],
     EXTERNAL, "db", 5432, "tcp", True),
    ("named port: resolved on the pod", [ingress_to_db(ports=[{"port": "pg"}])],
     "web", "db", 5432, "tcp", True),
    ("named port: other port", [ingress_to_db(ports=[{"port": "pg"}])],
     "web", "db", 9090, "tcp", False),
    ("named port the pod does not have", [ingress_to_db(ports=[{"port": "http"}])],
     "web", "db", 8080, "tcp", False),
    ("endPort range: inside", [ingress_to_db(ports=[{"port": 5000, "endPort": 6000}])],
     "web", "db", 5432, "tcp", True),
    ("endPort range: the last port", [ingress_to_db(ports=[{"port": 5000, "endPort": 6000}])],
     "web", "db", 6000, "tcp", True),
    ("endPort range: outside", [ingress_to_db(ports=[{"port": 5000, "endPort": 6000}])],
     "web", "db", 9090, "tcp", False),
    ("protocol only: every port of it", [ingress_to_db(ports=[{"protocol": "UDP"}])],
     "web", "db", 9999, "udp", True),
    ("protocol only: not the others", [ingress_to_db(ports=[{"protocol": "UDP"}])],
     "web", "db", 9999, "tcp", False),
    ("sctp", [ingress_to_db(ports=[{"protocol": "SCTP", "port": 5432}])],
     "web", "db", 5432, "sctp", True),
    ("allow all ingress: empty rule", [DENY_INGRESS, ingress_to_db()], EXTERNAL, "db", 1,
     "tcp", True),
    ("ingress: [] denies all", [np("none", {"podSelector": DB, "ingress": []})],
     "web", "db", 5432, "tcp", False),
    ("additive: first policy", [
        ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}], [{"port": 5432}], "a"),
        ingress_to_db([{"podSelector": {"matchLabels": {"app": "api"}}}], [{"port": 9090}],
                      "b")], "web", "db", 5432, "tcp", True),
    ("additive: second policy", [
        ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}], [{"port": 5432}], "a"),
        ingress_to_db([{"podSelector": {"matchLabels": {"app": "api"}}}], [{"port": 9090}],
                      "b")], "api", "db", 9090, "tcp", True),
    ("additive: no cross product of policies", [
        ingress_to_db([{"podSelector": {"matchLabels": {"app": "web"}}}], [{"port": 5432}], "a"),
        ingress_to_db([{"podSelector": {"matchLabels": {"app": "api"}}}], [{"port": 9090}],
                      "b")], "web", "db", 9090, "tcp", False),
    ("egress deny: new connections out", [DENY_EGRESS], "db", "other-web", 80, "tcp", False),
    ("egress deny: same node", [DENY_EGRESS], "web", "db", 5432, "tcp", False),
    ("egress deny: outside", [DENY_EGRESS], "web", EXTERNAL, 443, "tcp", False),
    ("egress deny leaves ingress open", [DENY_EGRESS], "other-web", "db", 5432, "tcp", True),
    ("egress to a pod selector, listed port",
     [egress_from_web([{"podSelector": DB}], [{"port": 5432}])], "web", "db", 5432, "tcp",
     True),
    ("egress to a pod selector, other pod",
     [egress_from_web([{"podSelector": DB}], [{"port": 5432}])], "web", "api", 5432, "tcp",
     False),
    ("egress isolation is the sender's only",
     [egress_from_web([{"podSelector": DB}], [{"port": 5432}])], "db", "web", 80, "tcp", True),
    ("egress named port: the destination's", [egress_from_web(ports=[{"port": "http"}])],
     "web", "api", 8080, "tcp", True),
    ("egress named port: a pod without it", [egress_from_web(ports=[{"port": "http"}])],
     "web", "db", 8080, "tcp", False),
    ("egress named udp port", [egress_from_web(ports=[{"protocol": "UDP", "port": "dns"}])],
     "web", "api", 53, "udp", True),
    ("egress ipBlock with except: outside",
     [egress_from_web([{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}])],
     "web", EXTERNAL, 443, "tcp", True),
    ("egress ipBlock with except: the pods",
     [egress_from_web([{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.244.0.0/16"]}}])],
     "web", "db", 5432, "tcp", False),
    ("egress allowed, ingress denied on the receiver",
     [egress_from_web([{"podSelector": DB}]), DENY_INGRESS], "web", "db", 5432, "tcp", False),
    ("both sides allow", [egress_from_web([{"podSelector": DB}]), DENY_INGRESS, FROM_WEB_5432],
     "web", "db", 5432, "tcp", True),
]


@pytest.mark.parametrize(("policies", "src", "dst", "port", "proto", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_policy_blocks_and_allows_as_written(
        policies: list[networking_pb2.NetworkPolicy], src: str, dst: str, port: int,
        proto: str, expected: bool) -> None:
    assert allowed(policies, src, dst, port, proto) is expected


def test_replies_to_allowed_connections_pass_every_isolation() -> None:
    policies = [DENY_INGRESS, DENY_EGRESS]
    assert not allowed(policies, "web", "db")
    assert allowed(policies, "web", "db", established=True)
    assert allowed(policies, "db", "web", 40000, established=True)


# --------------------------------------------------------------------------- rule text


def test_no_isolated_pod_means_no_rules_but_the_empty_chain() -> None:
    rules = plan_ruleset(local=[PODS["db"]], pods=list(PODS.values()), namespaces=NAMESPACES,
                         policies=[np("deny", {"podSelector": {}}, "other")])
    assert rules.chains == {POLICY_CHAIN: ()}


def test_chains_per_isolated_pod_and_direction_end_in_reject() -> None:
    db = PODS["db"]
    rules = plan_ruleset(local=[db, PODS["web"]], pods=list(PODS.values()),
                         namespaces=NAMESPACES, policies=[FROM_WEB_5432])
    assert list(rules.chains) == [POLICY_CHAIN, ingress_chain(db)]
    assert rules.chains[POLICY_CHAIN] == (
        f"-A {POLICY_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f'-A {POLICY_CHAIN} -d 10.244.1.10/32 -m comment --comment "shop/db ingress" '
        f"-j {ingress_chain(db)}")
    assert rules.chains[ingress_chain(db)] == (
        f"-A {ingress_chain(db)} -s 10.244.1.11/32 -p tcp -m tcp --dport 5432 "
        '-m comment --comment "shop/from-web ingress[0]" -j RETURN',
        f'-A {ingress_chain(db)} -m comment --comment "shop/db ingress: no policy allows it" '
        "-j REJECT --reject-with icmp-port-unreachable")


def test_duplicate_allows_from_several_policies_are_written_once() -> None:
    again = np("again", {"podSelector": DB, "ingress": [{
        "from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}]})
    rules = plan_ruleset(local=[PODS["db"]], pods=list(PODS.values()), namespaces=NAMESPACES,
                         policies=[FROM_WEB_5432, again])
    assert len(rules.chains[ingress_chain(PODS["db"])]) == 2


def test_chain_names_are_stable_short_and_per_direction() -> None:
    db = PODS["db"]
    assert ingress_chain(db).startswith(INGRESS_PREFIX)
    assert egress_chain(db).startswith(EGRESS_PREFIX)
    assert ingress_chain(db) == ingress_chain(PodView("shop", "db", "10.9.9.9", "node-3"))
    assert len(ingress_chain(db)) <= 28 and ingress_chain(db) != ingress_chain(PODS["web"])


@pytest.mark.parametrize(("cidr", "excepts", "expected"), [
    ("10.0.0.0/8", [], ["10.0.0.0/8"]),
    ("10.0.0.5/8", [], ["10.0.0.0/8"]),
    ("10.0.0.0/24", ["10.0.0.0/25"], ["10.0.0.128/25"]),
    ("10.0.0.0/24", ["10.0.0.0/26", "10.0.0.192/26"], ["10.0.0.64/26", "10.0.0.128/26"]),
    ("10.0.0.0/24", ["10.0.0.0/25", "10.0.0.0/26"], ["10.0.0.128/25"]),
    ("0.0.0.0/0", ["128.0.0.0/1"], ["0.0.0.0/1"]),
    ("2001:db8::/64", [], []),  # IPv4 iptables only
])
def test_ip_blocks_minus_their_excepts(cidr: str, excepts: list[str],
                                       expected: list[str]) -> None:
    assert block_cidrs(cidr, excepts) == expected


def test_ip_block_except_becomes_a_few_cidrs() -> None:
    got = block_cidrs("0.0.0.0/0", ["10.244.0.0/16"])
    assert len(got) == 16
    assert not any(ipaddress.ip_network("10.244.1.1/32").subnet_of(
        ipaddress.ip_network(c)) for c in got)  # type: ignore[arg-type]


def pod(*, ip: str = "10.244.1.5", phase: str = "Running", host_network: bool = False
        ) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = "p", "shop"
    p.metadata.labels["app"] = "db"
    p.spec.node_name, p.spec.host_network = "node-1", host_network
    c = p.spec.containers.add(name="c")
    c.ports.add(name="pg", container_port=5432)
    c.ports.add(container_port=80)
    p.status.pod_ip, p.status.phase = ip, phase
    return p


@pytest.mark.parametrize(("p", "seen"), [
    (pod(), True), (pod(ip=""), False), (pod(phase="Succeeded"), False),
    (pod(phase="Failed"), False), (pod(host_network=True), False), (pod(ip="fd00::5"), False),
    (pod(phase="Pending"), True),
])
def test_which_pods_policies_see(p: core_pb2.Pod, seen: bool) -> None:
    assert (pod_view(p) is not None) is seen


def test_a_pod_view_has_named_ports_tcp_by_default() -> None:
    view = pod_view(pod())
    assert view is not None and view.ports == (NamedPort("pg", "TCP", 5432),)
    assert view.key == "shop/p" and dict(view.labels) == {"app": "db"}


def test_render_declares_every_chain_and_deletes_stale_ones() -> None:
    rules = plan_ruleset(local=[PODS["db"]], pods=list(PODS.values()), namespaces=NAMESPACES,
                         policies=[FROM_WEB_5432])
    stale = stale_chains(rules, {"FORWARD", POLICY_CHAIN, ingress_chain(PODS["web"]),
                                 "KUBE-OTHER"})
    assert stale == [ingress_chain(PODS["web"])]
    text = render(rules, stale=stale)
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT"
    assert f":{POLICY_CHAIN} - [0:0]" in lines and f":{ingress_chain(PODS['db'])} - [0:0]" in lines
    assert f"-X {ingress_chain(PODS['web'])}" in lines


SAVED = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [10:20]
:SHOAL-NETPOL - [5:6]
:SHOAL-NP-I-AAAA - [0:0]
:SHOAL-SERVICES - [0:0]
-A FORWARD -m comment --comment "shoal network policies" -j SHOAL-NETPOL
-A FORWARD -j SHOAL-SERVICES
-A SHOAL-NETPOL -d 10.244.1.10/32 -j SHOAL-NP-I-AAAA
-A SHOAL-NP-I-AAAA -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""


def test_our_lines_and_the_plan_check() -> None:
    ours = our_lines(SAVED)
    assert ours == [":SHOAL-NETPOL", ":SHOAL-NP-I-AAAA",
                    '-A FORWARD -m comment --comment "shoal network policies" -j SHOAL-NETPOL',
                    "-A SHOAL-NETPOL -d 10.244.1.10/32 -j SHOAL-NP-I-AAAA",
                    "-A SHOAL-NP-I-AAAA -j REJECT --reject-with icmp-port-unreachable"]
    plan = Ruleset(chains={POLICY_CHAIN: ("x",), "SHOAL-NP-I-AAAA": ("y",)})
    assert matches_plan(plan, ours)
    assert not matches_plan(plan, [line for line in ours if "FORWARD" not in line])
    assert not matches_plan(Ruleset(chains={POLICY_CHAIN: ("x", "y")}), ours)


# --------------------------------------------------------------------------- the sync loop


class FakeIptables:
    def __init__(self) -> None:
        self.chains: dict[str, list[str]] = {"INPUT": [], "FORWARD": [], "OUTPUT": []}
        self.restores = 0

    async def save(self, table: str) -> str:
        assert table == "filter"
        lines = ["*filter", *(f":{c} - [0:0]" for c in self.chains)]
        lines += [rule for rules in self.chains.values() for rule in rules]
        return "\n".join([*lines, "COMMIT"]) + "\n"

    async def restore(self, text: str) -> None:
        self.restores += 1
        for line in text.splitlines():
            if line.startswith(":"):
                self.chains[line[1:].split()[0]] = []
            elif line.startswith("-A "):
                self.chains[line.split()[1]].append(line)
            elif line.startswith("-X "):
                del self.chains[line.split()[1]]

    async def ensure_jump(self, jump: Jump) -> bool:
        rule = f"-A {jump.chain} " + " ".join(f'"{w}"' if " " in w else w for w in jump.rule)
        if rule in self.chains[jump.chain]:
            return False
        self.chains[jump.chain].insert(0, rule)
        return True


class FakeInformer:
    def __init__(self, items: list[object]) -> None:
        self.items = items

    def add_handlers(self, **_: object) -> None:
        pass

    def list(self) -> list[object]:
        return self.items


def namespace(name: str) -> core_pb2.Namespace:
    ns = core_pb2.Namespace()
    ns.metadata.name = name
    ns.metadata.labels["kubernetes.io/metadata.name"] = name
    return ns


async def test_sync_writes_once_puts_back_a_flush_and_drops_stale_chains() -> None:
    ipt = FakeIptables()
    policies = FakeInformer([DENY_INGRESS])
    syncer = NetworkPolicies(
        client=None, node_name="node-1", iptables=ipt,  # type: ignore[arg-type]
        pods=FakeInformer([pod()]),  # type: ignore[arg-type]
        namespaces=FakeInformer([namespace("shop")]),  # type: ignore[arg-type]
        policies=policies, bridge_filtering=None)  # type: ignore[arg-type]
    assert await syncer.drifted()  # never synced
    await syncer.sync()
    chain = ingress_chain(PodView("shop", "p", "10.244.1.5", "node-1"))
    assert ipt.chains[chain][-1].endswith("-j REJECT --reject-with icmp-port-unreachable")
    assert any(r.endswith(f"-j {POLICY_CHAIN}") for r in ipt.chains["FORWARD"])
    assert not await syncer.drifted()
    await syncer.sync()
    assert ipt.restores == 1  # nothing changed: nothing written
    ipt.chains[POLICY_CHAIN].clear()  # someone flushes our chain
    assert await syncer.drifted()
    await syncer.sync(full=True)
    assert len(ipt.chains[POLICY_CHAIN]) == 2 and not await syncer.drifted()
    ipt.chains["FORWARD"].clear()  # or removes the jump
    assert await syncer.drifted()
    await syncer.sync(full=True)
    assert any(r.endswith(f"-j {POLICY_CHAIN}") for r in ipt.chains["FORWARD"])
    policies.items = []  # the policy is deleted: the pod is no longer isolated
    await syncer.sync()
    assert chain not in ipt.chains and ipt.chains[POLICY_CHAIN] == []
    assert syncer.syncs == 4


def test_ensure_bridge_filtering_sets_the_switch(tmp_path: Any) -> None:
    from nodeagent.networkpolicy import ensure_bridge_filtering

    switch = tmp_path / "bridge-nf-call-iptables"
    switch.write_text("0\n")
    assert ensure_bridge_filtering(switch) == ""
    assert switch.read_text() == "1\n"
