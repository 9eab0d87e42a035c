"""What the lab needs from this machine, checked before anything is made.

``check(host, nodes=N)`` is pure over a :class:`Host` (``SystemHost`` reads the
real machine; tests pass a fake). It returns every problem at once, each
naming exactly what is missing and the command that fixes it:

- fatal: not root, a missing command or CNI plugin, no network namespaces, no
  overlayfs, ip_forward not writable, a lab port already taken (by a socket on
  that address or on the wildcard address);
- warnings (the lab still comes up, but may run short later): sysctl limits
  below what several containerds and their pods need.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shoal.lab.topology import API_METRICS, API_PORT, GATEWAY, JOIN_PORT, REGISTRY_PORT

# command -> Debian package
COMMANDS = (
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("nsenter", "util-linux"),
    ("sysctl", "procps"),
    ("etcd", "etcd-server"),
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("docker-registry", "docker-registry"),
)
CNI_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
BUSYBOX = Path("/bin/busybox")
# sysctl -> the least the lab wants; per node, each containerd and agent uses some.
LIMITS = (
    ("fs.inotify.max_user_instances", 512),
    ("fs.inotify.max_user_watches", 65536),
)


@dataclass(frozen=True)
class Problem:
    what: str
    fix: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.what}\n    fix: {self.fix}"


class Host(Protocol):
    def euid(self) -> int: ...

    def which(self, command: str) -> str | None: ...

    def exists(self, path: Path) -> bool: ...

    def read(self, path: Path) -> str | None: ...

    def writable(self, path: Path) -> bool: ...

    def port_free(self, address: str) -> bool: ...


class SystemHost:
    """The real machine."""

    def euid(self) -> int:
        return os.geteuid()

    def which(self, command: str) -> str | None:
        return shutil.which(command, path=_search_path())

    def exists(self, path: Path) -> bool:
        return path.exists()

    def read(self, path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None

    def writable(self, path: Path) -> bool:
        return os.access(path, os.W_OK)

    def port_free(self, address: str) -> bool:
        host, _, port = address.rpartition(":")
        return not any(ip in (host, "0.0.0.0", "::") and p == int(port)
                       for ip, p in listening())


def listening() -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket in this netns."""
    found = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 4 or cols[3] != "0A":  # TCP_LISTEN
                continue
            raw, _, port = cols[1].partition(":")
            packed = bytes.fromhex(raw)
            # /proc/net/tcp* prints each 32-bit word in host (little-endian) order.
            words = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
            ip = socket.inet_ntop(family, words)
            found.append((ip, int(port, 16)))
    return found


def _search_path() -> str:
    """PATH plus the sbin directories (sudo and cron may leave them out)."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if extra not in parts:
            parts.append(extra)
    return os.pathsep.join(p for p in parts if p)


def _install(*packages: str) -> str:
    return f"apt-get install -y {' '.join(packages)}"


def check(host: Host, *, nodes: int) -> list[Problem]:
    problems: list[Problem] = []
    if host.euid() != 0:
        problems.append(Problem(
            "the lab must run as root (it makes network namespaces, a bridge, iptables "
            "rules and mounts)", "run it with sudo: sudo shoal lab up"))
    missing: dict[str, list[str]] = {}
    for command, package in COMMANDS:
        if host.which(command) is None:
            missing.setdefault(package, []).append(command)
    for plugin in CNI_PLUGINS:
        if not host.exists(CNI_DIR / plugin):
            missing.setdefault("containernetworking-plugins", []).append(
                str(CNI_DIR / plugin))
    if not host.exists(BUSYBOX):
        missing.setdefault("busybox-static", []).append(str(BUSYBOX))
    for package, what in missing.items():
        problems.append(Problem(f"missing {', '.join(what)} (Debian package {package})",
                                _install(package)))
    if not host.writable(Path("/proc/sys/net/ipv4/ip_forward")):
        problems.append(Problem(
            "/proc/sys/net/ipv4/ip_forward is not writable (nodes must route their pods)",
            "run as root on a kernel with IPv4 forwarding, outside a read-only /proc/sys"))
    filesystems = host.read(Path("/proc/filesystems")) or ""
    if "overlay" not in filesystems.split():
        problems.append(Problem("the kernel has no overlayfs (containerd's snapshotter)",
                                "modprobe overlay"))
    if not host.exists(Path("/proc/self/ns/net")):
        problems.append(Problem("no network namespaces (/proc/self/ns/net is missing)",
                                "use a kernel built with CONFIG_NET_NS"))
    for address, user, fix in (
        (API_METRICS, "the apiserver's metrics",
         "stop what listens there (an apiserver from an older scripts/up.sh: "
         "scripts/down.sh)"),
        (f"{GATEWAY}:{API_PORT}", "the apiserver", "stop what listens there"),
        (f"{GATEWAY}:{JOIN_PORT}", "the apiserver's join port", "stop what listens there"),
        (f"{GATEWAY}:{REGISTRY_PORT}", "the lab registry",
         "stop what listens there (Debian starts a docker-registry service on :5000 when "
         "it is installed: systemctl disable --now docker-registry)"),
    ):
        if not host.port_free(address):
            port = address.rpartition(":")[2]
            problems.append(Problem(f"port {port} is taken ({address} is for {user})", fix))
    for name, least in LIMITS:
        want = least if name.endswith("instances") else max(least, 8192 * nodes)
        raw = host.read(Path("/proc/sys") / name.replace(".", "/"))
        try:
            value = int((raw or "").strip())
        except ValueError:
            continue
        if value < want:
            problems.append(Problem(
                f"sysctl {name} is {value}, below {want}: containerd and the agents of "
                f"{nodes} nodes may run out", f"sysctl -w {name}={want}", fatal=False))
    return problems
