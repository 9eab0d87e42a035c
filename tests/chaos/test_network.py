"""Network fault: 5% packet loss on the lab bridge (``tc qdisc ... netem loss 5%``)
under TCP traffic through the mesh.

The loss is set on every port of bridge shoal0 (the host ends of the nodes'
veths, which carry the bridged node-to-node traffic) and on the bridge device
itself (traffic to and from the control plane), and always removed in a
``finally``. A kernel without netem (``CONFIG_NET_SCH_NETEM``; the 2-core
development VM has none) gets the same loss from iptables instead: a random
5% (``-m statistic``) of what each receiver takes off the bridge is dropped,
in every node's netns (INPUT and FORWARD from eth0) and on the host (INPUT
from shoal0), so every packet crossing the bridge is dropped with
probability 5% exactly once, as with netem on every egress port.

Two tests, each under its own 20 s of loss: raw TCP through the meshagents
(HBONE over mTLS between the nodes), whose only retries are TCP's own
retransmissions; and HTTP requests to a Service whose VirtualService
configures retries (issue 7's L7 path in the meshagent).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing import meshapps
from shoal.testing.waiting import wait_for

from .conftest import LONG, NS, ChaosLab, Workloads, parse_traffic, record, start_traffic

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

LOSS = "5%"
SECONDS = 120.0 if LONG else 20.0
# Each request is a new connection (SYN, data, FIN through two mTLS hops) with
# 5 s to finish; a lost SYN is retried after 1 s, so a few requests may time out.
MIN_SUCCESS = 0.95
DROPPED = [0]  # packets the iptables fallback dropped (netem keeps no such count here)


def _ports(bridge: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show", "master", bridge],
                         capture_output=True, text=True, check=True).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=False)


def _netem_available() -> bool:
    """Whether this kernel has netem (tried on a throwaway dummy link)."""
    dummy = "shoalchaos0"
    if subprocess.run(["ip", "link", "add", dummy, "type", "dummy"], capture_output=True,
                      check=False).returncode != 0:
        return False
    try:
        return _tc("qdisc", "add", "dev", dummy, "root", "netem", "loss", LOSS).returncode == 0
    finally:
        subprocess.run(["ip", "link", "del", dummy], capture_output=True, check=False)


@contextlib.contextmanager
def _netem(devices: list[str]) -> Iterator[str]:
    added: list[str] = []
    try:
        for dev in devices:
            r = _tc("qdisc", "add", "dev", dev, "root", "netem", "loss", LOSS)
            assert r.returncode == 0, f"tc on {dev}: {r.stderr}"
            added.append(dev)
        shown = _tc("qdisc", "show", "dev", devices[-1]).stdout
        assert "netem" in shown and f"loss {LOSS}" in shown, shown
        yield "tc netem"
    finally:
        for dev in added:
            _tc("qdisc", "del", "dev", dev, "root", "netem")
    for dev in devices:  # removed again
        assert "netem" not in _tc("qdisc", "show", "dev", dev).stdout


def _ipt(netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["iptables", "-w", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def _iptables_loss(lab: ChaosLab) -> Iterator[str]:
    probability = f"{float(LOSS.rstrip('%')) / 100:.4f}"
    drop = ["-m", "statistic", "--mode", "random", "--probability", probability, "-j", "DROP"]
    places = [(n.netns, chain, "eth0") for n in lab.nodes for chain in ("INPUT", "FORWARD")]
    places.append((None, "INPUT", "shoal0"))
    DROPPED[0] = 0
    added: list[tuple[str | None, str, str]] = []
    try:
        for netns, chain, dev in places:
            r = _ipt(netns, "-I", chain, "1", "-i", dev, *drop)
            assert r.returncode == 0, f"iptables in {netns or 'host'}: {r.stderr}"
            added.append((netns, chain, dev))
        yield f"iptables statistic {probability}"
    finally:
        for netns, chain, _ in added:  # what was dropped, from the rules' counters
            listing = _ipt(netns, "-L", chain, "1", "-v", "-x", "-n").stdout.split()
            if listing and listing[0].isdigit():
                DROPPED[0] += int(listing[0])
        for netns, chain, dev in added:
            _ipt(netns, "-D", chain, "-i", dev, *drop)
    for netns, _, _ in places:  # removed again
        assert "statistic" not in _ipt(netns, "-S").stdout


def _loss(lab: ChaosLab, devices: list[str]) -> contextlib.AbstractContextManager[str]:
    return _netem(devices) if _netem_available() else _iptables_loss(lab)


def test_five_percent_packet_loss_on_the_bridge(chaos_lab: ChaosLab,
                                                workloads: Workloads) -> None:
    devices = ["shoal0", *_ports("shoal0")]
    assert any(d.startswith("shln-") for d in devices), devices
    with _loss(chaos_lab, devices) as method:
        traffic = start_traffic(workloads, seconds=SECONDS, interval=0.1, timeout=5.0)
        try:
            out, _ = traffic.communicate(timeout=SECONDS + 60)
        finally:
            traffic.kill()
    reqs = parse_traffic(out)
    ok = sum(r.ok for r in reqs)
    rate = ok / len(reqs)
    errors = sorted({r.detail for r in reqs if not r.ok})[:3]
    record("packet_loss", loss=LOSS, method=method, packets_dropped=DROPPED[0], seconds=SECONDS,
           requests=len(reqs), failed=len(reqs) - ok, success_rate=round(rate, 4),
           errors=errors)
    assert len(reqs) >= SECONDS * 2, len(reqs)
    assert rate >= MIN_SUCCESS, (rate, errors)
    # And without the loss, every request works again.
    after = parse_traffic(start_traffic(workloads, seconds=2.0).communicate(timeout=30)[0])
    assert after and all(r.ok for r in after), after


RETRIES_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hweb, namespace: NAMESPACE}
spec:
  hosts: [hweb]
  http:
  - timeout: 10s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure,reset"}
    route: [{destination: {host: hweb}}]
""".replace("NAMESPACE", NS)
HTTP_REQUESTS = 600 if LONG else 150


def _ready_pod(lab: ChaosLab, name: str) -> core_pb2.Pod | None:
    p = lab.client.get(core_pb2.Pod, name, namespace=NS)
    ready = any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)
    return p if p.status.phase == "Running" and p.status.pod_ip and ready else None


def test_http_with_retries_under_five_percent_packet_loss(
        chaos_lab: ChaosLab, workloads: Workloads, tmp_path: Path) -> None:
    chaos_lab.client.create(meshapps.app_pod("hweb", NS, app="hweb", node="node-2"))
    chaos_lab.client.create(meshapps.http_service("hweb", NS, app="hweb"))
    wait_for("hweb ready", lambda: _ready_pod(chaos_lab, "hweb"), timeout=60)
    wait_for("hweb's endpoint", lambda: sum(len(s.addresses) for s in chaos_lab.client.get(
        core_pb2.Endpoints, "hweb", namespace=NS).subsets) == 1, timeout=60)
    (tmp_path / "vs.yaml").write_text(RETRIES_VS)
    applied = chaos_lab.shoal("apply", "-f", str(tmp_path / "vs.yaml"), "--wait-propagated")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    ip = chaos_lab.client.get(core_pb2.Service, "hweb", namespace=NS).spec.cluster_ip
    control = meshapps.send(workloads.client_netns, ip, 80, count=10, timeout=5)
    assert control.by_status == {200: 10}, (control.by_status, control.errors[:3])
    devices = ["shoal0", *_ports("shoal0")]
    with _loss(chaos_lab, devices) as method:
        t0 = time.monotonic()
        tally = meshapps.send(workloads.client_netns, ip, 80, count=HTTP_REQUESTS, timeout=10)
        took = time.monotonic() - t0
    ok = tally.by_status.get(200, 0)
    rate = ok / HTTP_REQUESTS
    record("packet_loss_http_retries", loss=LOSS, method=method, packets_dropped=DROPPED[0],
           requests=HTTP_REQUESTS, ok=ok, statuses={str(k): v for k, v in
                                                   tally.by_status.items()},
           connection_errors=len(tally.errors), success_rate=round(rate, 4),
           seconds=round(took, 1))
    assert rate >= MIN_SUCCESS, (tally.by_status, tally.errors[:3])
