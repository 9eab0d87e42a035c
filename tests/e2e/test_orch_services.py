"""Services on the 3-node lab: ClusterIPs answer from every node, Endpoints follow
the pods, and the node agents' iptables rules come back after a flush.

Backends are busybox httpd pods (one per node, each page names its node) with a
readiness probe on a file the test can remove; clients are busybox pods on every
node that ``wget`` the ClusterIP through ``shoal exec``. Needs root; run with
``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_services.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for as _wait_for

pytestmark = pytest.mark.e2e

NS = "svc-e2e"
NODES = ("node-1", "node-2", "node-3")
IMAGE = "docker.io/library/busybox:1.36"
Cluster = Any  # tests/e2e/conftest.py's Cluster (conftest modules are not importable)




def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 60.0) -> Any:
    return _wait_for(what, check, timeout=timeout)

def web_pod(name: str, node: str, **labels: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels.update({"app": "web", "name": name, **labels})
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="httpd", image=IMAGE)
    c.command.extend(["sh", "-c", f"mkdir -p /www && echo hello from {name} > /www/index.html "
                      "&& touch /ready && exec httpd -f -p 8080 -h /www"])
    c.ports.add(name="http", container_port=8080)
    probe = c.readiness_probe
    probe.exec.command.extend(["cat", "/ready"])
    probe.period_seconds, probe.failure_threshold = 1, 1
    return p


def client_pod(node: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = f"client-{node}", NS
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    p.spec.containers.add(name="main", image=IMAGE).command.extend(["sleep", "3600"])
    return p


def service(name: str, selector: dict[str, str], *, headless: bool = False
            ) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, NS
    s.spec.selector.update(selector)
    if headless:
        s.spec.cluster_ip = "None"
    port = s.spec.ports.add(name="http", port=80)
    port.target_port.str_val = "http"  # the container port's name
    return s


def running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


def fetch(cluster: Cluster, pod: str, url: str) -> subprocess.CompletedProcess[str]:
    # busybox's `wget -T` segfaults: bound it from outside.
    return cluster.shoal("exec", pod, "-n", NS, "--", "timeout", "5", "wget", "-q", "-O", "-",
                         url)


def endpoints(cluster: Cluster, name: str) -> tuple[set[str], set[str]]:
    try:
        ep = cluster.client.get(core_pb2.Endpoints, name, namespace=NS)
    except errors.NotFound:
        return set(), set()
    return ({a.ip for s in ep.subsets for a in s.addresses},
            {a.ip for s in ep.subsets for a in s.not_ready_addresses})


def in_netns(node: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    netns = f"shoal-{node}"
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True,
                          check=False, timeout=30)


@pytest.fixture(scope="module")
def backends(cluster: Cluster) -> Iterator[dict[str, core_pb2.Pod]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    for node in NODES:
        cluster.client.create(web_pod(f"web-{node}", node))
        cluster.client.create(client_pod(node))
    pods = {node: wait_for(f"web-{node} running", lambda n=node: running(cluster, f"web-{n}"),
                           timeout=120) for node in NODES}
    for node in NODES:
        wait_for(f"client-{node} running", lambda n=node: running(cluster, f"client-{n}"),
                 timeout=120)
    yield pods
    cluster.client.delete(core_pb2.Namespace, NS)


@pytest.fixture(scope="module")
def web(cluster: Cluster, backends: dict[str, core_pb2.Pod]) -> core_pb2.Service:
    svc = cluster.client.create(service("web", {"app": "web"}))
    ips = {p.status.pod_ip for p in backends.values()}
    wait_for(f"web endpoints list every backend {sorted(ips)}",
             lambda: endpoints(cluster, "web")[0] == ips or None, timeout=60)
    return svc


def test_a_cluster_ip_answers_from_a_pod_on_every_node(
        cluster: Cluster, web: core_pb2.Service) -> None:
    ip = web.spec.cluster_ip
    assert ip.startswith("10.96."), ip
    seen: set[str] = set()
    for node in NODES:
        got = wait_for(f"http://{ip}/ from client-{node}",
                       lambda n=node: fetch(cluster, f"client-{n}", f"http://{ip}:80/").stdout,
                       timeout=60)
        assert got.strip() in {f"hello from web-{n}" for n in NODES}, got
        seen.add(got.strip())
        for _ in range(4):
            got = fetch(cluster, f"client-{node}", f"http://{ip}:80/")
            assert got.returncode == 0, got.stderr
            seen.add(got.stdout.strip())
    assert len(seen) >= 2, f"15 requests all went to one backend: {seen}"


def test_a_pod_reaches_itself_through_its_service(cluster: Cluster,
                                                  backends: dict[str, Any]) -> None:
    solo = cluster.client.create(service("solo", {"name": "web-node-2"}))
    got = wait_for("web-node-2 -> its own ClusterIP (hairpin)", lambda: fetch(
        cluster, "web-node-2", f"http://{solo.spec.cluster_ip}:80/").stdout, timeout=60)
    assert got.strip() == "hello from web-node-2"


def test_a_cluster_ip_without_endpoints_fails_at_once(cluster: Cluster,
                                                      backends: dict[str, Any]) -> None:
    """No endpoints: the client is told at once, it does not hang. Where the node
    routes the address (a default route, as real nodes have) the proxy's REJECT
    answers "connection refused"; the lab's nodes have no default route, so there
    the node answers "unreachable" before the filter table is reached."""
    empty = cluster.client.create(service("empty", {"app": "nothing-matches"}))
    wait_for("empty endpoints", lambda: cluster.client.list(
        core_pb2.Endpoints, namespace=NS, field_selector="metadata.name=empty").items,
        timeout=60)
    r = fetch(cluster, "client-node-1", f"http://{empty.spec.cluster_ip}:80/")
    said = (r.stdout + r.stderr).lower()
    assert r.returncode not in (0, 124), f"rc={r.returncode} {said!r}"  # 124: timed out
    assert "refused" in said or "unreachable" in said, said


def test_headless_service_has_no_ip_and_endpoints_with_labels(
        cluster: Cluster, backends: dict[str, core_pb2.Pod]) -> None:
    svc = cluster.client.create(service("web-headless", {"app": "web"}, headless=True))
    assert svc.spec.cluster_ip == "None"
    ips = {p.status.pod_ip for p in backends.values()}
    wait_for("headless endpoints", lambda: endpoints(cluster, "web-headless")[0] == ips,
             timeout=60)
    ep = cluster.client.get(core_pb2.Endpoints, "web-headless", namespace=NS)
    by_ip = {a.ip: a for s in ep.subsets for a in s.addresses}
    for node, pod in backends.items():
        addr = by_ip[pod.status.pod_ip]
        assert addr.node_name == node and addr.target_ref.name == f"web-{node}"
        assert dict(addr.labels) == {"app": "web", "name": f"web-{node}"}
    assert [p.port for s in ep.subsets for p in s.ports] == [8080]


def test_endpoints_follow_readiness_and_scaling(
        cluster: Cluster, web: core_pb2.Service, backends: dict[str, core_pb2.Pod]) -> None:
    node2 = backends["node-2"].status.pod_ip
    others = {p.status.pod_ip for n, p in backends.items() if n != "node-2"}
    got = cluster.shoal("exec", "web-node-2", "-n", NS, "--", "rm", "/ready")
    assert got.returncode == 0, got.stderr
    wait_for("web-node-2 not ready in the endpoints",
             lambda: endpoints(cluster, "web") == (others, {node2}), timeout=60)
    # The Endpoints changed in the API; node-1's proxy follows a moment later.
    dnat = f"--to-destination {node2}:"
    wait_for("node-1's proxy drops web-node-2", lambda: dnat not in in_netns(
        "node-1", "iptables-save", "-t", "nat").stdout, timeout=30)
    for _ in range(6):  # the unready backend gets no traffic
        r = fetch(cluster, "client-node-1", f"http://{web.spec.cluster_ip}:80/")
        assert r.returncode == 0 and r.stdout.strip() != "hello from web-node-2", r
    cluster.shoal("exec", "web-node-2", "-n", NS, "--", "touch", "/ready")
    wait_for("web-node-2 ready again", lambda: node2 in endpoints(cluster, "web")[0],
             timeout=60)

    cluster.client.create(web_pod("web-extra", "node-3"))
    extra = wait_for("web-extra running", lambda: running(cluster, "web-extra"), timeout=120)
    wait_for("scaled up: web-extra in the endpoints",
             lambda: extra.status.pod_ip in endpoints(cluster, "web")[0], timeout=60)
    cluster.client.delete(core_pb2.Pod, "web-extra", namespace=NS)
    wait_for("scaled down: web-extra gone from the endpoints",
             lambda: extra.status.pod_ip not in set().union(*endpoints(cluster, "web")),
             timeout=60)


def test_flushed_rules_are_put_back_by_the_node_agent(
        cluster: Cluster, web: core_pb2.Service) -> None:
    ip = web.spec.cluster_ip
    assert ip in in_netns("node-1", "iptables", "-t", "nat", "-S", "SHOAL-SERVICES").stdout
    flushed = in_netns("node-1", "iptables", "-w", "5", "-t", "nat", "-F", "SHOAL-SERVICES")
    assert flushed.returncode == 0, flushed.stderr
    jump = ["-m", "comment", "--comment", "shoal service portals", "-j", "SHOAL-SERVICES"]
    removed = in_netns("node-1", "iptables", "-w", "5", "-t", "nat", "-D", "PREROUTING", *jump)
    assert removed.returncode == 0, removed.stderr
    wait_for("SHOAL-SERVICES refilled", lambda: ip in in_netns(
        "node-1", "iptables", "-t", "nat", "-S", "SHOAL-SERVICES").stdout, timeout=60)
    wait_for("PREROUTING jump back", lambda: in_netns(
        "node-1", "iptables", "-t", "nat", "-C", "PREROUTING", *jump).returncode == 0,
        timeout=60)
    got = fetch(cluster, "client-node-1", f"http://{ip}:80/")
    assert got.returncode == 0 and got.stdout.startswith("hello from web-"), got


def test_node_agents_record_pod_events_sorted_by_time(
        cluster: Cluster, backends: dict[str, Any]) -> None:
    def listed() -> Any:
        r = cluster.shoal("get", "events", "-n", NS)
        return "Started" in r.stdout and r

    got = wait_for("Started events", listed, timeout=30)
    lines = got.stdout.splitlines()
    assert lines[0].split()[:5] == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT"]
    started = [line for line in lines if " Started " in line]
    assert {line.split()[3] for line in started} >= {f"pod/web-{n}" for n in NODES}
    page = cluster.shoal("describe", "pod", "web-node-1", "-n", NS)
    assert page.returncode == 0, page.stderr
    events = page.stdout[page.stdout.index("Events:"):]
    assert "Started container httpd" in events and "shoal-nodeagent" in events


def test_cleanup_removes_every_rule_of_ours_and_the_agent_restores_them(
        cluster: Cluster, web: core_pb2.Service) -> None:
    from nodeagent import serviceproxy

    # The node agent hears of every nf_tables change and puts its rules back at
    # once: paused, so that what cleanup leaves can be read.
    with cluster.paused("nodeagent/node-3"):
        assert serviceproxy.cleanup(netns="shoal-node-3") == []
        saved = in_netns("node-3", "iptables-save").stdout
    assert "SHOAL-SVC-" not in saved and "SHOAL-SERVICES" not in saved, saved
    # The agent runs again: it sees its rules gone and writes them again.
    wait_for("rules restored on node-3", lambda: web.spec.cluster_ip in in_netns(
        "node-3", "iptables", "-t", "nat", "-S", "SHOAL-SERVICES").stdout, timeout=30)
    got = fetch(cluster, "client-node-3", f"http://{web.spec.cluster_ip}:80/")
    assert got.returncode == 0 and got.stdout.startswith("hello from web-"), got
