"""Mesh capture in real network namespaces (root; no lab needed, run under the lock).

A "node" netns and a "pod" netns joined by a veth pair, as the CNI bridge joins
pods to their node. In the node netns: the capture rules, the outbound listener
(real SO_ORIGINAL_DST), the DNS responder and a backend. The pod dials a
ClusterIP and asks the node's IP for a service name; both are captured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

NODE_SCRIPT = r'''
import asyncio, sys
from prometheus_client import CollectorRegistry
from meshagent import capture, dns, proxy
from meshagent.routing import Balancer, Route

async def main():
    async def backend(r, w):
        w.write(b"backend:" + await r.read()); await w.drain(); w.close()
    await asyncio.start_server(backend, "10.244.1.1", 9000)
    routes = {("10.96.0.10", 80): Route("shop/web", "http", (("10.244.1.1", 9000),))}
    path = proxy.DataPath(node="node", trust_domain="cluster.local", routes=lambda: routes,
                          pod_cidr="10.244.0.0/16", workload=lambda ip: None,
                          balancer=Balancer(), metrics=proxy.Metrics(CollectorRegistry()))
    out = proxy.Listener(direction="outbound", host="0.0.0.0", port=15001, path=path)
    await out.start()
    names = {"web.shop.svc.cluster.local": ("10.96.0.10",)}
    d = dns.DNSServer(host="0.0.0.0", port=15053, names=lambda: names,
                      namespace_of=lambda ip: "shop" if ip == "10.244.1.5" else None)
    await d.start()
    cap = capture.Capture(config=capture.CaptureConfig(dns_ip="10.244.1.1"),
                          iptables=capture.IptablesNat(binary=await capture.detect_backend()))
    cap.set_pods(["10.244.1.5"])
    await cap.sync()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await cap.cleanup()
    print("clean", flush=True)

asyncio.run(main())
'''

POD_SCRIPT = r'''
import socket, dns.message, dns.query
s = socket.create_connection(("10.96.0.10", 80), timeout=5)
s.sendall(b"hello"); s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode())
q = dns.query.udp(dns.message.make_query("web", "A"), "10.244.1.1", timeout=5)
print(sorted(r.address for rr in q.answer if rr.rdtype == 1 for r in rr))
'''


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, iptables)")
    tag = uuid.uuid4().hex[:6]
    node, pod = f"shoalmesh-n-{tag}", f"shoalmesh-p-{tag}"
    _sh("ip", "netns", "add", node)
    _sh("ip", "netns", "add", pod)
    try:
        _sh("ip", "link", "add", f"mn{tag}", "netns", node, "type", "veth",
            "peer", "name", f"mp{tag}", "netns", pod)
        for ns, dev, addr in ((node, f"mn{tag}", "10.244.1.1/24"),
                              (pod, f"mp{tag}", "10.244.1.5/24")):
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", pod, "route", "add", "default", "via", "10.244.1.1")
        yield node, pod
    finally:
        subprocess.run(["ip", "netns", "del", pod], check=False)
        subprocess.run(["ip", "netns", "del", node], check=False)


def test_a_pods_cluster_ip_connection_and_dns_query_are_captured(
        netns: tuple[str, str]) -> None:
    node, pod = netns
    agent = subprocess.Popen(["ip", "netns", "exec", node, sys.executable, "-c", NODE_SCRIPT],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        assert agent.stdout.readline().strip() == "ready"
        rules = _sh("ip", "netns", "exec", node, "iptables-save", "-t", "nat")
        assert "-A PREROUTING -j SHOAL-MESH-PREROUTING" in rules
        out = _sh("ip", "netns", "exec", pod, sys.executable, "-c", POD_SCRIPT).splitlines()
        assert out == ["backend:hello", "['10.96.0.10']"]
        agent.stdin.close()
        assert agent.stdout.readline().strip() == "clean"
        assert agent.wait(timeout=10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert "SHOAL-MESH" not in _sh("ip", "netns", "exec", node, "iptables-save", "-t", "nat")
