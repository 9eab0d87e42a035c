"""Reaching into the lab's network namespaces from e2e tests and benches (root).

A program run with ``ip netns exec`` in a pod's network namespace sends the
pod's own traffic: captured by the mesh as such, and with no apiserver needed
(``shoal exec`` needs one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def pod_netns(ip: str) -> str:
    """The network namespace (under /var/run/netns) that holds ``ip``."""
    for entry in sorted(os.listdir("/var/run/netns")):
        out = subprocess.run(["ip", "-n", entry, "-4", "-o", "addr", "show"],
                             capture_output=True, text=True, check=False).stdout
        if f" {ip}/" in out:
            return entry
    raise AssertionError(f"no network namespace has {ip}")


def nat_rules(netns: str) -> str:
    """``iptables-save -t nat`` in ``netns``."""
    return subprocess.run(["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout


def in_netns(netns: str, script: str, *args: str, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
    """Run a Python ``script`` (dedented) with ``args`` in ``netns``."""
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c",
                           textwrap.dedent(script), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_in_netns(netns: str, script: str, *args: str) -> subprocess.Popen[str]:
    """The same, left running (stdout piped): stop it by its Popen."""
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                             textwrap.dedent(script), *args],
                            stdout=subprocess.PIPE, text=True)


# A bounded TCP request: connect, send, read to EOF; prints "OK <reply>" or
# "ERR <error>". argv: host port payload.
REQUEST = """
    import socket, sys
    host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    try:
        s = socket.create_connection((host, port), timeout=3)
        s.sendall(payload.encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        print("OK", out.decode(errors="replace"))
    except OSError as e:
        print("ERR", e)
"""


def http_get(netns: str, ip: str, port: int, path: str = "/", *, host: str = "web") -> str:
    """An HTTP/1.0 GET from ``netns``: "OK <response>" or "ERR <error>"."""
    r = in_netns(netns, REQUEST, ip, str(port),
                 f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")
    return r.stdout.strip()
