"""ClusterIPs on this node, as kube-proxy's iptables mode does them, in chains of our own.

    nat   PREROUTING, OUTPUT --> SHOAL-SERVICES
              -d <clusterIP> -p <proto> --dport <port> --> SHOAL-SVC-<hash>  (per service port)
          SHOAL-SVC-<hash>: statistic random 1/n, 1/(n-1) ... --> SHOAL-SEP-<hash>  (per endpoint)
          SHOAL-SEP-<hash>: -s <podIP> --> SHOAL-MARK-MASQ   (hairpin: a pod reaching itself)
                            DNAT --to-destination <podIP>:<port>
          POSTROUTING --> SHOAL-POSTROUTING: packets marked 0x4000 --> MASQUERADE
    filter FORWARD, OUTPUT --> SHOAL-SERVICES
              a ClusterIP port with no ready endpoint --> REJECT (icmp-port-unreachable)

Only ready addresses of a Service's Endpoints are used. A service port is
matched to an Endpoints port by name. ``sessionAffinity: ClientIP`` keeps a
client on its endpoint with ``-m recent`` for ``timeoutSeconds``. NodePorts and
externalIPs are not implemented.

Sync, level-triggered::

    Service/Endpoints informer change --> dirty --> sync (at most every min_interval)
    every check_period: read our rules back; different from what the last sync
        left (a flush, a deleted jump, an edited rule) --> sync
    sync: one generated ruleset -> ``iptables-restore -w --noflush`` in one
          transaction: the first sync (and any after drift or a failure)
          declares every chain of ours, so each is flushed and refilled, and
          deletes stale ones found with iptables-save; later syncs write only
          the chains that changed (kube-proxy's partial sync) -> jumps from the
          built-in chains ensured (-C, else -I 1) -> our rules read back and
          kept as the reference for drift checks

``plan_ruleset``, ``render``, ``changes``, ``build_ruleset``,
``service_ports`` and ``our_lines`` are pure. The proxy
never removes its rules when the agent stops (kube-proxy leaves them too, so
traffic keeps flowing across an agent restart); ``cleanup`` removes them
(``shoal lab down``). Failed syncs are retried with back-off by the loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal import errors, netfilter
from shoal.api.core.v1 import core_pb2
from shoal.backoff import Backoff
from shoal.client import AsyncClient
from shoal.informer import Informer, key_of

log = logging.getLogger(__name__)

SERVICES_CHAIN = "SHOAL-SERVICES"
POSTROUTING_CHAIN = "SHOAL-POSTROUTING"
MARK_MASQ_CHAIN = "SHOAL-MARK-MASQ"
SVC_PREFIX = "SHOAL-SVC-"
SEP_PREFIX = "SHOAL-SEP-"
MASQ_MARK = "0x4000"
FIXED_NAT_CHAINS = (SERVICES_CHAIN, POSTROUTING_CHAIN, MARK_MASQ_CHAIN)


@dataclass(frozen=True)
class Jump:
    table: str
    chain: str  # a built-in chain
    rule: tuple[str, ...]


JUMPS = (
    Jump("nat", "PREROUTING", ("-m", "comment", "--comment", "shoal service portals",
                               "-j", SERVICES_CHAIN)),
    Jump("nat", "OUTPUT", ("-m", "comment", "--comment", "shoal service portals",
                           "-j", SERVICES_CHAIN)),
    Jump("nat", "POSTROUTING", ("-m", "comment", "--comment", "shoal postrouting rules",
                                "-j", POSTROUTING_CHAIN)),
    Jump("filter", "FORWARD", ("-m", "comment", "--comment", "shoal service portals",
                               "-j", SERVICES_CHAIN)),
    Jump("filter", "OUTPUT", ("-m", "comment", "--comment", "shoal service portals",
                              "-j", SERVICES_CHAIN)),
)


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service with a ClusterIP, and its ready endpoints."""

    name: str  # namespace/service:port (port name may be empty)
    cluster_ip: str
    port: int
    protocol: str  # tcp, udp or sctp
    endpoints: tuple[tuple[str, int], ...]  # (pod IP, port), sorted
    # sessionAffinity ClientIP: seconds a client stays with its endpoint (0: off).
    affinity_seconds: int = 0


def _chain(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def svc_chain(sp: ServicePort) -> str:
    return _chain(SVC_PREFIX, sp.name, sp.protocol)


def sep_chain(sp: ServicePort, ip: str, port: int) -> str:
    return _chain(SEP_PREFIX, sp.name, sp.protocol, f"{ip}:{port}")


def _has_cluster_ip(svc: core_pb2.Service) -> bool:
    ip = svc.spec.cluster_ip
    return bool(ip) and ip != "None" and svc.spec.type != "ExternalName" and ":" not in ip


def service_ports(services: Iterable[core_pb2.Service],
                  endpoints: Mapping[str, core_pb2.Endpoints]) -> list[ServicePort]:
    """Every ClusterIP service port with its ready endpoints (by ``namespace/name``)."""
    out: list[ServicePort] = []
    for svc in services:
        if not _has_cluster_ip(svc):
            continue
        ep = endpoints.get(key_of(svc))
        for sp in svc.spec.ports:
            protocol = (sp.protocol or "TCP").lower()
            targets: set[tuple[str, int]] = set()
            for subset in ep.subsets if ep is not None else ():
                port = next((p for p in subset.ports if p.name == sp.name
                             and (p.protocol or "TCP").lower() == protocol), None)
                if port is None:
                    continue
                targets.update((a.ip, int(port.port)) for a in subset.addresses if a.ip)
            affinity = 0
            if svc.spec.session_affinity == "ClientIP":
                cfg = svc.spec.session_affinity_config.client_ip
                affinity = int(cfg.timeout_seconds) if cfg.HasField("timeout_seconds") \
                    else 10800
            out.append(ServicePort(
                name=f"{svc.metadata.namespace}/{svc.metadata.name}:{sp.name}",
                cluster_ip=svc.spec.cluster_ip, port=int(sp.port), protocol=protocol,
                endpoints=tuple(sorted(targets)), affinity_seconds=affinity))
    return sorted(out, key=lambda s: (s.name, s.protocol))


def _q(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


@dataclass(frozen=True)
class Ruleset:
    """Every chain of ours and its rules, in order (``-A ...`` lines)."""

    nat: Mapping[str, tuple[str, ...]]
    filter: Mapping[str, tuple[str, ...]]


def plan_ruleset(ports: Sequence[ServicePort]) -> Ruleset:
    """The chains and rules for these service ports (pure)."""
    nat: dict[str, list[str]] = {
        SERVICES_CHAIN: [],
        POSTROUTING_CHAIN: [
            f"-A {POSTROUTING_CHAIN} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-A {POSTROUTING_CHAIN} -j MARK --xor-mark {MASQ_MARK}",
            f"-A {POSTROUTING_CHAIN} -m comment --comment "
            f"{_q('shoal service traffic requiring SNAT')} -j MASQUERADE"],
        MARK_MASQ_CHAIN: [f"-A {MARK_MASQ_CHAIN} -j MARK --or-mark {MASQ_MARK}"],
    }
    rejects: list[str] = []
    # ClientIP affinity (``-m recent``, as kube-proxy): a client seen by an
    # endpoint within the timeout goes back to it before any random pick.
    recent = "-m recent --name {} --mask 255.255.255.255 --rsource"
    for sp in ports:
        match = f"-d {sp.cluster_ip}/32 -p {sp.protocol} -m {sp.protocol} --dport {sp.port}"
        if not sp.endpoints:
            rejects.append(
                f"-A {SERVICES_CHAIN} -m comment --comment {_q(sp.name + ' has no endpoints')} "
                f"{match} -j REJECT --reject-with icmp-port-unreachable")
            continue
        svc = svc_chain(sp)
        nat[SERVICES_CHAIN].append(f"-A {SERVICES_CHAIN} -m comment --comment "
                                   f"{_q(sp.name + ' cluster IP')} {match} -j {svc}")
        spread: list[str] = nat.setdefault(svc, [])
        if sp.affinity_seconds:
            for ip, port in sp.endpoints:
                sep = sep_chain(sp, ip, port)
                spread.append(f"-A {svc} -m comment --comment {_q(sp.name + ' -> ' + ip)} "
                              f"{recent.format(sep)} --rcheck --seconds "
                              f"{sp.affinity_seconds} --reap -j {sep}")
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            sep = sep_chain(sp, ip, port)
            share = (f"-m statistic --mode random --probability {1.0 / (n - i):.10f} "
                     if i < n - 1 else "")
            spread.append(f"-A {svc} -m comment --comment {_q(sp.name + ' -> ' + ip)} "
                          f"{share}-j {sep}")
            remember = f"{recent.format(sep)} --set " if sp.affinity_seconds else ""
            nat[sep] = [f"-A {sep} -s {ip}/32 -j {MARK_MASQ_CHAIN}",
                        f"-A {sep} {remember}-p {sp.protocol} -m {sp.protocol} "
                        f"-j DNAT --to-destination {ip}:{port}"]
    return Ruleset(nat={c: tuple(r) for c, r in nat.items()},
                   filter={SERVICES_CHAIN: tuple(rejects)})


def render(rules: Ruleset, *, nat_chains: Iterable[str] | None = None,
           stale: Iterable[str] = (), with_filter: bool = True) -> str:
    """``iptables-restore --noflush`` input writing ``nat_chains`` (all by default)
    and the filter chain, and deleting the ``stale`` chains (pure).

    A declared chain is flushed first, so each written chain is replaced whole."""
    write = list(rules.nat) if nat_chains is None else list(nat_chains)
    gone = sorted(set(stale))
    lines = ["*nat", *(f":{c} - [0:0]" for c in [*write, *gone])]
    for chain in write:
        lines += rules.nat[chain]
    lines += [f"-X {c}" for c in gone]
    lines.append("COMMIT")
    if with_filter:
        lines += ["*filter", *(f":{c} - [0:0]" for c in rules.filter)]
        for chain_rules in rules.filter.values():
            lines += chain_rules
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def build_ruleset(ports: Sequence[ServicePort], *, existing_chains: Iterable[str] = ()) -> str:
    """The full ``iptables-restore --noflush`` input for every chain of ours (pure).

    Each chain is declared, which flushes it; chains of ours that exist but are
    no longer wanted (``existing_chains``) are declared and then deleted."""
    rules = plan_ruleset(ports)
    return render(rules, stale=_stale(rules, existing_chains))


def _stale(rules: Ruleset, existing: Iterable[str]) -> list[str]:
    return sorted(c for c in set(existing)
                  if c.startswith((SVC_PREFIX, SEP_PREFIX)) and c not in rules.nat)


def changes(old: Ruleset, new: Ruleset) -> str | None:
    """The restore input turning ``old`` (what was written) into ``new``, writing
    only the chains that differ (kube-proxy's partial sync); None if equal (pure)."""
    write = [c for c, r in new.nat.items() if old.nat.get(c) != r]
    stale = _stale(new, old.nat)
    with_filter = dict(old.filter) != dict(new.filter)
    if not write and not stale and not with_filter:
        return None
    return render(new, nat_chains=write, stale=stale, with_filter=with_filter)


def _ours(chain: str) -> bool:
    return chain in FIXED_NAT_CHAINS or chain.startswith((SVC_PREFIX, SEP_PREFIX))


def our_lines(save: str) -> list[str]:
    """The lines of ``iptables-save`` output that are about our chains (pure).

    Table headers, chain declarations (counters dropped), rules in our chains,
    and jumps to them."""
    return netfilter.lines_about(save, _ours, tables=True)


def matches_plan(rules: Ruleset, ours: Sequence[str]) -> bool:
    """Whether a read-back (``our_lines`` of nat, then of filter) holds every chain
    of ``rules`` with as many rules as planned, and every jump (pure).

    The read-back after a sync becomes the reference for drift checks; this
    catches someone changing our chains while the sync was writing them, which
    would otherwise be taken for our own state."""
    counts: dict[tuple[str, str], int] = {}
    targets: set[tuple[str, str, str]] = set()
    table = ""
    for line in ours:
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            words = line.split()
            counts[(table, words[1])] = counts.get((table, words[1]), 0) + 1
            if "-j" in words[:-1]:
                targets.add((table, words[1], words[words.index("-j") + 1]))
    for table, chains in (("nat", rules.nat), ("filter", rules.filter)):
        if any(counts.get((table, c), 0) != len(lines) for c, lines in chains.items()):
            return False
    return all((j.table, j.chain, j.rule[-1]) in targets for j in JUMPS)


# The meshagent's capture chain: it must see the original ClusterIP, so its jump
# stays above ours (the meshagent keeps it first; we insert just below it).
MESH_CHAIN = "SHOAL-MESH-PREROUTING"


def jump_position(listing: str) -> int:
    """Where to insert our jump in a built-in chain, 1-based, from its
    ``iptables -S CHAIN`` listing: right after the mesh's jump, else first (pure)."""
    rules = [line.split() for line in listing.splitlines() if line.startswith("-A ")]
    for i, words in enumerate(rules, start=1):
        if "-j" in words[:-1] and words[words.index("-j") + 1] == MESH_CHAIN:
            return i + 1
    return 1


def existing_chains(save: str) -> set[str]:
    return {line[1:].split(" ", 1)[0] for line in save.splitlines() if line.startswith(":")}


# --------------------------------------------------------------------------- iptables


class Iptables(Protocol):
    async def save(self, table: str) -> str: ...

    async def restore(self, text: str) -> None: ...

    async def ensure_jump(self, jump: Jump) -> bool:
        """Insert the jump at the top of its chain unless present; True if inserted."""


class IptablesCommands(netfilter.IptablesCommands):
    """The ``iptables`` binaries of the namespace we run in (xtables lock: ``-w``)."""

    async def ensure_jump(self, jump: Jump) -> bool:
        base = [self.binary, "-w", self.wait, "-t", jump.table]
        code, _ = await netfilter.run([*base, "-C", jump.chain, *jump.rule], check=False)
        if code == 0:
            return False
        _, listing = await netfilter.run([*base, "-S", jump.chain])
        await netfilter.run([*base, "-I", jump.chain, str(jump_position(listing)), *jump.rule])
        return True


# --------------------------------------------------------------------------- the loop


# However slow a read-back, drift is looked for at least this often (seconds).
MAX_CHECK_SPACING = 30.0


class ServiceProxy:
    def __init__(self, *, client: AsyncClient, iptables: Iptables | None = None,
                 check_period: float = 5.0, min_interval: float = 0.5,
                 services: Informer[core_pb2.Service] | None = None,
                 endpoints: Informer[core_pb2.Endpoints] | None = None,
                 changes: netfilter.Polling | None = None) -> None:
        self.iptables: Iptables = iptables or IptablesCommands()
        self.check_period = check_period
        # nf_tables change notifications: drift is looked for when the ruleset
        # changes (and every WATCHED_CHECK_PERIOD), not every check_period.
        self.changes = changes or netfilter.Polling()
        self.min_interval = min_interval
        self.services = services or Informer(client, core_pb2.Service)
        self.endpoints = endpoints or Informer(client, core_pb2.Endpoints)
        for inf in (self.services, self.endpoints):
            inf.add_handlers(on_add=self._changed, on_update=self._changed2,
                             on_delete=self._changed)
        self._dirty = asyncio.Event()
        self.applied: list[str] | None = None  # our rules as read back after the last sync
        self._written: Ruleset | None = None  # what the last successful sync wrote
        self.syncs = 0
        self.repairs = 0

    def _changed(self, _obj: object) -> None:
        self._dirty.set()

    def _changed2(self, _old: object, _new: object) -> None:
        self._dirty.set()

    async def _read_back(self) -> tuple[str, list[str]]:
        """The nat table's ``iptables-save`` and our lines of both tables."""
        nat = await self.iptables.save("nat")
        return nat, our_lines(nat) + our_lines(await self.iptables.save("filter"))

    async def sync(self, *, full: bool = False) -> None:
        """Bring our rules to the informers' current state.

        The first sync, one after drift or a failure, and ``full`` write every
        chain (stale ones found with ``iptables-save``); otherwise only the
        chains that differ from what the last sync wrote."""
        ports = service_ports(self.services.list(),
                              {key_of(e): e for e in self.endpoints.list()})
        rules = plan_ruleset(ports)
        last, self._written = self._written, None  # unknown until this sync succeeds
        # Writing only what changed is right only if the rest is as we left it
        # (else the read-back below would take someone's flush for our state).
        nat: str | None = None
        if not full and last is not None:
            nat, ours = await self._read_back()
            if ours != self.applied:
                log.warning("service proxy: our iptables rules changed under us; rewriting all")
                self.repairs += 1
                full = True
        if full or last is None:
            if nat is None:
                nat = await self.iptables.save("nat")
            await self.iptables.restore(render(
                rules, stale=_stale(rules, existing_chains(nat))))
        else:
            text = changes(last, rules)
            if text is not None:
                await self.iptables.restore(text)
        for jump in JUMPS:
            await self.iptables.ensure_jump(jump)
        _, self.applied = await self._read_back()
        if not matches_plan(rules, self.applied):
            log.warning("service proxy: our iptables rules changed while we wrote them; "
                        "rewriting them at the next check")
            self.applied = None  # drifted() is then true
        self._written = rules
        self.syncs += 1
        log.debug("service proxy: %d service ports synced", len(ports))

    async def drifted(self) -> bool:
        """Do our rules differ from what the last sync left?"""
        return self.applied is None or (await self._read_back())[1] != self.applied

    async def run(self) -> None:
        backoff = Backoff(base=0.5, cap=30.0)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.services.run(), name="proxy-services")
            tg.create_task(self.endpoints.run(), name="proxy-endpoints")
            await self.services.synced.wait()
            await self.endpoints.synced.wait()
            self._dirty.set()
            check_cost = 0.0
            while True:
                # A read-back costs ~1 s at 5,000 services on nf_tables: look at
                # most a tenth of the time, but at least every 30 s.
                spacing = min(max(self.check_period, 10 * check_cost), MAX_CHECK_SPACING)
                await self.changes.wait(self._dirty, spacing)
                try:
                    if self._dirty.is_set():
                        self._dirty.clear()
                        await self.sync()
                        drifted = False
                    else:
                        self.changes.take()  # a change after the read-back wakes us again
                        started = time.monotonic()
                        drifted = await self.drifted()
                        check_cost = time.monotonic() - started
                    if drifted:
                        log.warning("service proxy: our iptables rules changed under us; "
                                    "putting them back")
                        self.repairs += 1
                        await self.sync(full=True)
                    backoff.reset()
                except errors.ShoalError as e:
                    self._dirty.set()
                    delay = backoff.next()
                    log.warning("service proxy: sync failed: %s; retrying in %.1fs", e, delay)
                    await asyncio.sleep(delay)
                    continue
                await asyncio.sleep(self.min_interval)


# --------------------------------------------------------------------------- cleanup


def cleanup(*, netns: str | None = None, binary: str = "iptables") -> list[str]:
    """Remove every rule and chain of ours (``shoal lab down``), and those of the
    agent's network policies (``networkpolicy.cleanup``). Returns problems."""
    from nodeagent import networkpolicy  # it builds on this module

    problems = [p for table in ("nat", "filter")
                if (p := netfilter.remove_ours(table, _ours, binary=binary, netns=netns))]
    return problems + networkpolicy.cleanup(netns=netns, binary=binary)
