"""The lab network, made and unmade with ``ip`` and ``iptables``.

    ensure_bridge      shoal0 10.77.0.1/24, up, its MAC pinned; its alias names the
                       owning lab dir
    ensure_netns       /var/run/netns/shoal-node-i
    ensure_node_link   veth shln-i (host, on shoal0) <-> eth0 (node, 10.77.0.x/24),
                       lo up, net.ipv4.ip_forward=1 inside the node only
    ensure_chain       an iptables chain of ours, its rules, and the jumps to it
    remove_*           the reverse; "already gone" is success

Contract: every ``ensure_*`` first looks at what exists and only adds what is
missing, so running it twice changes nothing; every ``remove_*`` is
idempotent. There is no default route and no NAT anywhere in the lab: no rule
here ever uses the nat table. Commands run in a node's namespace go through
``nsenter --net=`` (``ip -n`` for ``ip`` itself), never ``ip netns exec``.
A failed command raises ``NetError`` with the command and its stderr.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoal import errors
from shoal.lab.topology import NODE_IFACE, DropRule, Node

NETNS_DIR = Path("/var/run/netns")
SYS_NET = Path("/sys/class/net")
NET_ADDR_SET = "3"  # addr_assign_type: someone set the address (not random, not stolen)
BR_NETFILTER = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
ALIAS_PREFIX = "shoal-lab:"


class NetError(errors.InternalError):
    """An ``ip``/``iptables`` command failed."""


def run(argv: Sequence[str], *, netns: str | None = None, check: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    command = list(argv)
    if netns is not None:
        command = ["nsenter", f"--net={NETNS_DIR / netns}", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise NetError(f"{' '.join(command)}: {(done.stderr or done.stdout).strip()}")
    return done


def _ip_json(*args: str, netns: str | None = None) -> Any:
    cmd = ["ip", "-j", *(["-n", netns] if netns else []), *args]
    done = run(cmd, check=False)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout or "null")


# -- links ------------------------------------------------------------------------

def link(name: str, *, netns: str | None = None) -> dict[str, Any] | None:
    """``ip -d link show NAME`` as a dict, None if there is no such link."""
    found = _ip_json("-d", "link", "show", "dev", name, netns=netns)
    return found[0] if found else None


def link_exists(name: str, *, netns: str | None = None) -> bool:
    return link(name, netns=netns) is not None


def bridge_owner(name: str) -> str | None:
    """The lab dir recorded in the bridge's alias ("" if it has none), None if
    there is no such bridge."""
    found = link(name)
    if found is None:
        return None
    alias = str(found.get("ifalias", ""))
    return alias.removeprefix(ALIAS_PREFIX) if alias.startswith(ALIAS_PREFIX) else ""


def _addresses(name: str, *, netns: str | None = None) -> set[str]:
    found = _ip_json("addr", "show", "dev", name, netns=netns) or []
    return {f"{a['local']}/{a['prefixlen']}" for entry in found
            for a in entry.get("addr_info", []) if a.get("family") == "inet"}


def ensure_bridge(name: str, *, address: str, owner: str) -> None:
    if not link_exists(name):
        run(["ip", "link", "add", name, "type", "bridge"])
    pin_mac(name)
    run(["ip", "link", "set", "dev", name, "alias", ALIAS_PREFIX + owner])
    if address not in _addresses(name):
        run(["ip", "addr", "add", address, "dev", name])
    run(["ip", "link", "set", "dev", name, "up"])


def pin_mac(name: str) -> None:
    """Make link ``name`` keep the MAC it has now.

    A bridge whose MAC nobody set takes the lowest MAC of its ports, so a node
    (or a test's fourth node) joining or leaving the lab can change it. The
    nodes' ARP entries for 10.77.0.1 then point at a MAC that is gone, and every
    connection to the apiserver stalls until they expire: 30 to 50 s in which no
    node heartbeats. Setting the address, even to the same value, fixes it.
    (The CNI bridge plugin does the same for the pods' bridges.)"""
    if (SYS_NET / name / "addr_assign_type").read_text().strip() == NET_ADDR_SET:
        return
    found = link(name)
    if found is None:
        raise NetError(f"no link {name} to pin the MAC of")
    run(["ip", "link", "set", "dev", name, "address", str(found["address"])])


def ensure_address(name: str, address: str) -> None:
    """One more address on link ``name`` (idempotent)."""
    if address not in _addresses(name):
        run(["ip", "addr", "add", address, "dev", name])


def remove_link(name: str, *, netns: str | None = None) -> bool:
    """Delete a link (a veth takes its peer with it); True if it was there."""
    if not link_exists(name, netns=netns):
        return False
    run(["ip", *(["-n", netns] if netns else []), "link", "del", "dev", name])
    return True


# -- namespaces -------------------------------------------------------------------

def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def ensure_netns(name: str) -> None:
    if not netns_exists(name):
        run(["ip", "netns", "add", name])


def remove_netns(name: str) -> bool:
    if not netns_exists(name):
        return False
    run(["ip", "netns", "del", name])
    return True


def ensure_node_link(node: Node, *, bridge: str) -> None:
    """The node's veth pair, its address, loopback and forwarding."""
    if link_exists(node.host_veth) and not link_exists(NODE_IFACE, netns=node.netns):
        remove_link(node.host_veth)  # half a pair, from an interrupted run
    if not link_exists(node.host_veth):
        run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", NODE_IFACE,
             "netns", node.netns])
    run(["ip", "link", "set", "dev", node.host_veth, "master", bridge, "up"])
    if node.address not in _addresses(NODE_IFACE, netns=node.netns):
        run(["ip", "-n", node.netns, "addr", "add", node.address, "dev", NODE_IFACE])
    run(["ip", "-n", node.netns, "link", "set", "dev", NODE_IFACE, "up"])
    run(["ip", "-n", node.netns, "link", "set", "dev", "lo", "up"])
    run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=node.netns)


# -- iptables ---------------------------------------------------------------------

def br_netfilter_active() -> bool:
    """Does bridged traffic go through the host's iptables FORWARD chain?"""
    try:
        return BR_NETFILTER.read_text().strip() == "1"
    except OSError:
        return False


def _iptables(*args: str, netns: str | None = None, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
    return run(["iptables", "-w", "5", "-t", "filter", *args], netns=netns, check=check)


def chain_exists(chain: str, *, netns: str | None = None) -> bool:
    return _iptables("-S", chain, netns=netns, check=False).returncode == 0


def ensure_chain(chain: str, *, rules: Sequence[Sequence[str]], jumps_from: Sequence[str],
                 netns: str | None = None) -> None:
    """The chain exists, holds ``rules`` (each appended if missing), and each of
    ``jumps_from`` jumps to it first."""
    if not chain_exists(chain, netns=netns):
        _iptables("-N", chain, netns=netns)
    for rule in rules:
        if _iptables("-C", chain, *rule, netns=netns, check=False).returncode != 0:
            _iptables("-A", chain, *rule, netns=netns)
    for parent in jumps_from:
        if _iptables("-C", parent, "-j", chain, netns=netns, check=False).returncode != 0:
            _iptables("-I", parent, "1", "-j", chain, netns=netns)


def remove_chain(chain: str, *, jumps_from: Sequence[str], netns: str | None = None) -> bool:
    """Remove every jump to ``chain`` and the chain itself; True if it was there."""
    if netns is not None and not netns_exists(netns):
        return False
    for parent in jumps_from:
        while _iptables("-D", parent, "-j", chain, netns=netns, check=False).returncode == 0:
            pass
    if not chain_exists(chain, netns=netns):
        return False
    _iptables("-F", chain, netns=netns)
    _iptables("-X", chain, netns=netns)
    return True


def forward_rules(bridge: str) -> list[list[str]]:
    """Accept what the bridge forwards between lab ports (and nothing else)."""
    return [["-i", bridge, "-o", bridge, "-j", "ACCEPT"]]


def drop_rules(rules: Sequence[DropRule], netns: str) -> list[list[str]]:
    out: list[list[str]] = []
    for r in rules:
        if r.netns == netns:
            out.append(["-s", r.peer, "-j", "DROP"])
            out.append(["-d", r.peer, "-j", "DROP"])
    return out


def pod_routes(netns: str) -> dict[str, str]:
    """Pod CIDR -> node IP: the routes the node agent keeps in a node (proto 77)."""
    found = _ip_json("route", "show", "proto", "77", netns=netns) or []
    return {r["dst"]: r.get("gateway", "") for r in found if "dst" in r}
