"""Transparent capture: iptables rules in the node's network namespace.

    nat PREROUTING --> SHOAL-MESH-PREROUTING   (first rule: before the service proxy's
                                                SHOAL-SERVICES jump, so the mesh sees the
                                                original ClusterIP, not the DNAT'd pod IP)

    per captured pod P (a pod on this node, with an IP, not opted out), in order:
      -s P -d NODE_DNS -p udp/tcp --dport 53  -> REDIRECT 15053  (pod DNS)
      -s P -d SERVICE_CIDR -p tcp             -> REDIRECT 15001  (outbound to a ClusterIP)
      -s P -d POD_CIDR -p tcp                 -> REDIRECT 15001  (outbound to a pod)
          (with egress capture, the agent's default, these two are one rule
           ``-s P -p tcp``: every destination, so the outbound traffic policy
           of meshagent.egress can act; the node's own traffic is never matched)
      -d P -p tcp --dport 15008               -> REDIRECT 15008  (a peer agent's tunnel
                                                                 to the pod)
      -d P -p tcp                             -> REDIRECT 15006  (inbound to the pod)

Pods' packets reach the node's netns through the CNI bridge, so PREROUTING sees
them. The agent's own connections (to endpoints, to peer agents) start in the
node's netns and only traverse OUTPUT, which the mesh does not hook: they are
never captured on this node. On the destination node a peer agent's tunnel
(to ``POD:15008``) is redirected to this agent's tunnel listener, which reads
the pod from the original destination; other traffic to the pod from outside
the mesh goes to the plaintext inbound listener (15006).

Opt-out: label ``shoal.dev/mesh: disabled`` (or Istio's
``istio.io/dataplane-mode: none``) on the pod or on its namespace.

Applying: one ``iptables-restore -w --noflush`` input declares our chain (which
flushes it) and writes all its rules: atomic. The jump is then kept first in
PREROUTING; a reconcile loop reads back ``iptables-save`` and rewrites on drift
(also when the service proxy put its own jump above ours). On nf_tables the loop
is woken by the kernel's ruleset change notifications (``netfilter.Changes``)
instead of polling, so that no ``iptables-save`` is forked while nothing changes.
``cleanup`` removes the jump and the chain.

Everything above the ``Iptables`` section is pure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shoal import errors, netfilter

log = logging.getLogger(__name__)

CHAIN = "SHOAL-MESH-PREROUTING"
OUTPUT_CHAIN = "SHOAL-MESH-OUTPUT"  # a mesh-only host's own processes (HostCapture)
OUTPUT_HOOK = "OUTPUT"
SERVICES_CHAIN = "SHOAL-SERVICES"  # the nodeagent's service proxy
HOOK = "PREROUTING"

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
TUNNEL_PORT = 15008
DNS_PORT = 15053

OPT_OUT_LABELS: Mapping[str, str] = {
    "shoal.dev/mesh": "disabled",
    "istio.io/dataplane-mode": "none",
}


def opted_out(labels: Mapping[str, str]) -> bool:
    return any(labels.get(k) == v for k, v in OPT_OUT_LABELS.items())


@dataclass(frozen=True)
class CaptureConfig:
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    dns_ip: str = ""  # the node IP pods use as their DNS server; "" = no DNS capture
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    dns_port: int = DNS_PORT
    tunnel_port: int = TUNNEL_PORT
    # Capture a pod's TCP to any destination (for the outbound traffic policy),
    # not only to the pod and service CIDRs.
    egress: bool = False

    def __post_init__(self) -> None:
        for name in ("pod_cidr", "service_cidr"):
            value = getattr(self, name)
            try:
                ipaddress.IPv4Network(value)
            except ValueError:
                raise errors.BadRequest(f"{name}: {value!r} is not an IPv4 CIDR") from None
        if self.dns_ip:
            try:
                ipaddress.IPv4Address(self.dns_ip)
            except ValueError:
                raise errors.BadRequest(f"dns_ip: {self.dns_ip!r} is not an IPv4 address"
                                        ) from None


def _valid_ip(ip: str) -> bool:
    try:
        ipaddress.IPv4Address(ip)
    except ValueError:
        return False
    return True


def pod_rules(ip: str, cfg: CaptureConfig) -> list[str]:
    """The ``-A`` lines capturing one pod (pure)."""
    a = f"-A {CHAIN}"
    src = f"-s {ip}/32"
    out: list[str] = []
    if cfg.dns_ip:
        for proto in ("udp", "tcp"):
            out.append(f"{a} {src} -d {cfg.dns_ip}/32 -p {proto} -m {proto} --dport 53 "
                       f"-j REDIRECT --to-ports {cfg.dns_port}")
    if cfg.egress:
        out.append(f"{a} {src} -p tcp -j REDIRECT --to-ports {cfg.outbound_port}")
    else:
        out.append(f"{a} {src} -d {cfg.service_cidr} -p tcp -j REDIRECT "
                   f"--to-ports {cfg.outbound_port}")
        out.append(f"{a} {src} -d {cfg.pod_cidr} -p tcp -j REDIRECT "
                   f"--to-ports {cfg.outbound_port}")
    out.append(f"{a} -d {ip}/32 -p tcp -m tcp --dport {TUNNEL_PORT} -j REDIRECT "
               f"--to-ports {cfg.tunnel_port}")
    out.append(f"{a} -d {ip}/32 -p tcp -j REDIRECT --to-ports {cfg.inbound_port}")
    return out


def plan_rules(pod_ips: Iterable[str], cfg: CaptureConfig) -> tuple[str, ...]:
    """Our chain's rules for these captured pod IPs, sorted and deduplicated (pure).

    Every pod's outbound rules come before any pod's inbound rule, so a
    connection between two captured pods on this node goes out through 15001."""
    ips = sorted({ip for ip in pod_ips if _valid_ip(ip)},
                 key=ipaddress.IPv4Address)
    rules = [r for ip in ips for r in pod_rules(ip, cfg)]
    return tuple([r for r in rules if " -s " in r] + [r for r in rules if " -s " not in r])


def render(rules: Sequence[str]) -> str:
    """``iptables-restore --noflush`` input: declaring the chain flushes it (pure)."""
    return "\n".join(["*nat", f":{CHAIN} - [0:0]", *rules, "COMMIT", ""])


def render_cleanup(save: str) -> str | None:
    """Input that deletes our jumps and chains (a mesh-only host's OUTPUT chain too),
    or None when nothing is there (pure)."""
    lines = our_lines(save)
    host = netfilter.lines_about(save, lambda chain: chain == OUTPUT_CHAIN)
    jumps = [line for line in lines if line.startswith(f"-A {HOOK} ")]
    jumps += [line for line in host if line.startswith(f"-A {OUTPUT_HOOK} ")]
    declared = [c for c in (CHAIN, OUTPUT_CHAIN) if f":{c}" in lines + host]
    if not jumps and not declared:
        return None
    out = ["*nat"]
    out += ["-D" + j[2:] for j in jumps]
    for c in declared:
        out += [f"-F {c}", f"-X {c}"]
    return "\n".join([*out, "COMMIT", ""])


def our_lines(save: str) -> list[str]:
    """``iptables-save -t nat`` lines about our chain: declaration, rules, jumps (pure)."""
    return netfilter.lines_about(save, lambda chain: chain == CHAIN)


def chain_rules(save: str) -> tuple[str, ...]:
    return tuple(line for line in our_lines(save) if line.startswith(f"-A {CHAIN} "))


def hook_targets(save: str, hook: str = HOOK) -> list[str]:
    """The jump targets of ``hook``'s rules, in order (pure)."""
    out: list[str] = []
    for line in save.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "-A" and words[1] == hook:
            out.append(words[words.index("-j") + 1] if "-j" in words[:-1] else "")
    return out


@dataclass(frozen=True)
class Drift:
    rules: bool  # our chain is missing or its rules differ
    jump: bool  # the jump is missing, duplicated, or not first

    @property
    def any(self) -> bool:
        return self.rules or self.jump


def drift(save: str, want: Sequence[str]) -> Drift:
    """What differs between ``iptables-save -t nat`` output and what we want (pure)."""
    declared = f":{CHAIN}" in our_lines(save)
    targets = hook_targets(save)
    jump_ok = targets.count(CHAIN) == 1 and targets[0] == CHAIN
    return Drift(rules=not declared or chain_rules(save) != tuple(want), jump=not jump_ok)


def choose_backend(*, legacy_rules: int | None, nft_rules: int | None) -> str:
    """The iptables binary to use, as kube-proxy and Istio decide (pure).

    The backend that already holds rules wins (nf_tables when both do, or
    neither); None means that backend's binary is missing."""
    if legacy_rules is None and nft_rules is None:
        return "iptables"
    if nft_rules is None:
        return "iptables-legacy"
    if legacy_rules is None:
        return "iptables-nft"
    return "iptables-legacy" if legacy_rules > nft_rules else "iptables-nft"


def count_rules(save: str) -> int:
    return sum(1 for line in save.splitlines() if line.startswith("-A "))


# --------------------------------------------------------------------------- iptables


async def detect_backend() -> str:
    counts: dict[str, int | None] = {}
    for name in ("iptables-legacy", "iptables-nft"):
        if shutil.which(f"{name}-save") is None:
            counts[name] = None
            continue
        code, out = await netfilter.run([f"{name}-save"], check=False)
        counts[name] = count_rules(out) if code == 0 else None
    return choose_backend(legacy_rules=counts["iptables-legacy"],
                          nft_rules=counts["iptables-nft"])


class IptablesNat:
    """``*-save``/``*-restore`` of one backend's nat table (xtables lock: ``-w``)."""

    def __init__(self, *, binary: str = "iptables", wait_seconds: int = 5) -> None:
        self.commands = netfilter.IptablesCommands(binary=binary, wait_seconds=wait_seconds)

    async def save(self) -> str:
        return await self.commands.save("nat")

    async def restore(self, text: str) -> None:
        await self.commands.restore(text)


def render_apply(save: str, want: Sequence[str]) -> str:
    """One restore input: our chain rewritten, stale jumps deleted, the jump put
    first in PREROUTING (pure)."""
    out = ["*nat", f":{CHAIN} - [0:0]", *want]
    out += ["-D" + line[2:] for line in our_lines(save) if line.startswith(f"-A {HOOK} ")]
    out += [f"-I {HOOK} 1 -j {CHAIN}", "COMMIT", ""]
    return "\n".join(out)


class Capture:
    """Keeps the capture rules for a set of pod IPs; level-triggered."""

    def __init__(self, *, config: CaptureConfig, iptables: IptablesNat,
                 interval: float = 1.0, changes: netfilter.Polling | None = None) -> None:
        self.config = config
        self.iptables = iptables
        self.interval = interval
        # With nf_tables change notifications, the rules are read back when the
        # ruleset changes (and every WATCHED_CHECK_PERIOD), not every interval.
        self.changes = changes or netfilter.Polling()
        self.pod_ips: frozenset[str] = frozenset()
        self._wake = asyncio.Event()
        self.rewrites = 0

    def set_pods(self, ips: Iterable[str]) -> None:
        new = frozenset(ips)
        if new != self.pod_ips:
            self.pod_ips = new
            self._wake.set()

    async def sync(self) -> bool:
        """Rewrite our rules if they drifted from what we want; True if rewritten."""
        want = plan_rules(self.pod_ips, self.config)
        save = await self.iptables.save()
        d = drift(save, want)
        if not d.any:
            return False
        await self.iptables.restore(render_apply(save, want))
        self.rewrites += 1
        log.info("mesh capture: rules written for %d pods%s", len(self.pod_ips),
                 " (jump moved first)" if d.jump else "")
        return True

    async def run(self) -> None:
        while True:
            self._wake.clear()
            self.changes.take()  # before the read-back: a later change wakes us again
            try:
                await self.sync()
            except errors.ShoalError as e:
                log.error("mesh capture: %s", e)
            await self.changes.wait(self._wake, self.interval)

    async def cleanup(self) -> None:
        text = render_cleanup(await self.iptables.save())
        if text is not None:
            await self.iptables.restore(text)
            log.info("mesh capture: rules removed")


# --------------------------------------------------------------------------- mesh-only host

AGENT_PORTS = (15000, 15020, 15021, 15090)  # admin, metrics: never redirected inbound


def host_rules(ips: Iterable[str], cfg: CaptureConfig, *,
               agent_uid: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A mesh-only host's capture (pure): its processes are the workload, so

        PREROUTING (SHOAL-MESH-PREROUTING), per workload IP W:
          -d W --dport 15008                        -> REDIRECT tunnel  (peer agents)
          -d W --dport 15000,15020,15021,15090      -> RETURN           (this agent)
          -d W -p tcp                               -> REDIRECT 15006   (plaintext in)
        OUTPUT (SHOAL-MESH-OUTPUT), when there is a workload IP:
          -m owner --uid-owner AGENT                -> RETURN   (the agent's own
                                                                 connections: never)
          -p udp/tcp --dport 53                     -> REDIRECT DNS     (any resolver)
          -o lo                                     -> RETURN   (the host to itself)
          -p tcp                                    -> REDIRECT 15001   (every other
                                                                 destination)

    Processes must run as another user than the agent (as Istio's VM proxy's
    ``istio-proxy`` user is excluded)."""
    valid = sorted({ip for ip in ips if _valid_ip(ip)}, key=ipaddress.IPv4Address)
    a = f"-A {CHAIN}"
    pre: list[str] = []
    for ip in valid:
        d = f"-d {ip}/32 -p tcp -m tcp"
        pre.append(f"{a} {d} --dport {TUNNEL_PORT} -j REDIRECT --to-ports {cfg.tunnel_port}")
        pre += [f"{a} {d} --dport {p} -j RETURN" for p in AGENT_PORTS]
        pre.append(f"{a} -d {ip}/32 -p tcp -j REDIRECT --to-ports {cfg.inbound_port}")
    if not valid:
        return tuple(pre), ()
    o = f"-A {OUTPUT_CHAIN}"
    out = [f"{o} -m owner --uid-owner {agent_uid} -j RETURN"]
    out += [f"{o} -p {proto} -m {proto} --dport 53 -j REDIRECT --to-ports {cfg.dns_port}"
            for proto in ("udp", "tcp")]
    out.append(f"{o} -o lo -j RETURN")
    out.append(f"{o} -p tcp -j REDIRECT --to-ports {cfg.outbound_port}")
    return tuple(pre), tuple(out)


def render_host_apply(save: str, pre: Sequence[str], out: Sequence[str]) -> str:
    """One restore input writing both chains and putting both jumps first (pure)."""
    lines = ["*nat", f":{CHAIN} - [0:0]", f":{OUTPUT_CHAIN} - [0:0]", *pre, *out]
    lines += ["-D" + line[2:] for line in our_lines(save) if line.startswith(f"-A {HOOK} ")]
    lines += ["-D" + line[2:] for line in netfilter.lines_about(
        save, lambda chain: chain == OUTPUT_CHAIN) if line.startswith(f"-A {OUTPUT_HOOK} ")]
    lines += [f"-I {HOOK} 1 -j {CHAIN}", f"-I {OUTPUT_HOOK} 1 -j {OUTPUT_CHAIN}",
              "COMMIT", ""]
    return "\n".join(lines)


def host_drift(save: str, pre: Sequence[str], out: Sequence[str]) -> bool:
    """Whether a mesh-only host's rules differ from what we want (pure)."""
    host = netfilter.lines_about(save, lambda chain: chain == OUTPUT_CHAIN)
    out_rules = tuple(line for line in host if line.startswith(f"-A {OUTPUT_CHAIN} "))
    out_targets = hook_targets(save, OUTPUT_HOOK)
    return (drift(save, pre).any or f":{OUTPUT_CHAIN}" not in host
            or out_rules != tuple(out) or out_targets.count(OUTPUT_CHAIN) != 1
            or out_targets[0] != OUTPUT_CHAIN)


class HostCapture(Capture):
    """Capture on a mesh-only host: ``set_pods`` takes the host's WorkloadEntry IPs."""

    def __init__(self, *, config: CaptureConfig, iptables: IptablesNat,
                 interval: float = 1.0, agent_uid: int,
                 changes: netfilter.Polling | None = None) -> None:
        super().__init__(config=config, iptables=iptables, interval=interval, changes=changes)
        self.agent_uid = agent_uid

    def want(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return host_rules(self.pod_ips, self.config, agent_uid=self.agent_uid)

    async def sync(self) -> bool:
        pre, out = self.want()
        save = await self.iptables.save()
        if not host_drift(save, pre, out):
            return False
        await self.iptables.restore(render_host_apply(save, pre, out))
        self.rewrites += 1
        log.info("mesh capture: host rules written for %d workload addresses",
                 len(self.pod_ips))
        return True
