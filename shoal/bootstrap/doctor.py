"""``python -m shoal.bootstrap check``: what one machine needs, and whether its
components serve (``shoal lab doctor``-style checks for a VM or a real node).

Each check is a line and a verdict, in the order a person would fix them:
binaries, kernel settings, the node's address, the systemd units (where systemd
runs and they are installed), each component's health endpoint, and, on the control plane,
every Node's Ready condition from the API. Nothing is changed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from shoal import bootstrap, errors
from shoal.bootstrap import CONTAINERD, Spec

CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
NODE_COMMANDS = ("containerd", "runc", "iptables", "ip", "nsenter")
MESH_HOST_COMMANDS = ("iptables", "ip")
Check = tuple[str, bool]


def _local_address(ip: str) -> bool:
    """Is ``ip`` one of this machine's addresses (can we bind it)?"""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


UNIT_DIR = Path("/etc/systemd/system")


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def _unit_state(unit: str) -> tuple[str, str]:
    def ask(verb: str) -> str:
        done = subprocess.run(["systemctl", verb, unit], capture_output=True, text=True,
                              check=False, timeout=10)
        return done.stdout.strip() or done.stderr.strip()
    return ask("is-active"), ask("is-enabled")


def doctor(spec: Spec, *, python: str, http_ok: Callable[[str], bool]) -> list[Check]:
    checks: list[Check] = []
    components = spec.components()
    wanted = {bootstrap.command(spec, c, python=python).argv[0] for c in components}
    if spec.node is not None:  # a mesh-only host runs no containers
        wanted.update(MESH_HOST_COMMANDS if spec.node.mesh_host else NODE_COMMANDS)
    for binary in sorted(wanted):
        found = shutil.which(binary, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                             "/usr/bin:/sbin:/bin")
        checks.append((f"command {binary}: {found or 'MISSING'}", found is not None))
    node = spec.node
    if node is not None and not node.mesh_host:
        for plugin in CNI_PLUGINS:
            there = (CNI_DIR / plugin).exists()
            checks.append((f"CNI plugin {CNI_DIR / plugin}"
                           + ("" if there else " MISSING (apt-get install "
                              "containernetworking-plugins)"), there))
        forward = _read("/proc/sys/net/ipv4/ip_forward")
        checks.append((f"net.ipv4.ip_forward = {forward or '?'}"
                       + ("" if forward == "1" else " (fix: sysctl -w net.ipv4.ip_forward=1)"),
                       forward == "1"))
    if node is not None:
        local = _local_address(node.ip)
        checks.append((f"node IP {node.ip} is on this machine"
                       + ("" if local else " -- NOT FOUND: the spec's node.ip must be the "
                          "private network's address, never the NAT one"), local))
        joined = node.node_config.exists()
        checks.append((f"joined: {node.node_config}"
                       + ("" if joined else " missing (python -m shoal.bootstrap join "
                          "--token-file FILE)"), joined))
    if spec.control_plane is not None:
        admin = spec.control_plane.admin_config
        checks.append((f"admin config {admin}", admin.exists()))
    if _systemd_running():  # the units this machine has installed (not in a lab)
        for c in components:
            if not (UNIT_DIR / f"shoal-{c}.service").exists():
                continue
            active, enabled = _unit_state(f"shoal-{c}.service")
            checks.append((f"unit shoal-{c}.service: {active}, {enabled}",
                           active == "active" and enabled == "enabled"))
    for c in components:
        cmd = bootstrap.command(spec, c, python=python)
        if cmd.ready_url:
            good = http_ok(cmd.ready_url)
            checks.append((f"{c}: {cmd.ready_url} " + ("answers" if good else
                                                      "does NOT answer"), good))
        elif c == CONTAINERD and node is not None:
            there = node.containerd_socket.is_socket()
            checks.append((f"containerd: socket {node.containerd_socket}"
                           + ("" if there else " missing"), there))
    if spec.control_plane is not None and spec.control_plane.admin_config.exists():
        checks += _nodes(spec.control_plane.admin_config)
    return checks


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _nodes(admin: Path) -> list[Check]:
    from shoal import config as configmod
    from shoal.api.core.v1 import core_pb2
    from shoal.client import Client

    try:
        with Client(configmod.load(admin), timeout=5.0) as client:
            nodes = client.list(core_pb2.Node).items
    except (errors.ShoalError, OSError) as e:
        return [(f"the API with {admin}: {e}", False)]
    if not nodes:  # not a fault: the workers join after the control plane is up
        return [("Nodes: none has joined yet", True)]
    out = []
    for n in nodes:
        ready = any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)
        ip = next((a.address for a in n.status.addresses if a.type == "InternalIP"), "?")
        out.append((f"Node {n.metadata.name} ({ip}) " + ("Ready" if ready else "NOT Ready"),
                    ready))
    return out
