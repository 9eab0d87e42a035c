"""The mesh beyond the cluster: a mesh-only host, and egress control.

Runs with ``SHOAL_E2E_MESH=1`` (a lab with meshagents). The module adds a
mesh-only host to the session lab (``shoal lab meshhost add``: a network
namespace with only a meshagent and busybox httpd as nobody, joined with a
token; ``lab down`` removes it):

    node-1: client (sa client)     meshhost-1 (10.77.0.101): httpd :8080 "hello from
    node-2: server (sa server),    meshhost-1", WorkloadEntry legacy (sa legacy,
            Service server:80      app=legacy), Service legacy:80 selects it

- the pod calls the process by name (legacy.<ns>.svc.cluster.local) and the
  process calls the pod by name (server.<ns>.svc.cluster.local, through the
  agent's DNS), both over mTLS as the receiving agents' metrics show
  (reporter=destination, connection_security_policy=mutual_tls, the peer's
  SPIFFE principal);
- an AuthorizationPolicy DENY from the mesh-only host's principal refuses its
  calls; deleting it lets them through again;
- egress: in a namespace labelled shoal.dev/outbound-traffic-policy:
  REGISTRY_ONLY, a pod reaches the "external" host ext-a (a network namespace
  this test puts on the lab bridge) that a ServiceEntry names, by IP and by the
  entry's host name, and is refused the one no ServiceEntry names (ext-b),
  counted by its agent; without the label (ALLOW_ANY) ext-b is reachable.
  No test traffic leaves the lab.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.api.security.v1 import security_pb2
from shoal.api.traffic.v1 import traffic_pb2
from shoal.lab import meshhost
from shoal.lab.topology import Node
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "mesh-hosts"
EGRESS_NS = "mesh-egress"
IMAGE = "docker.io/library/busybox:1.36"
MARKER = f"server-{uuid.uuid4().hex[:12]}"
TD = "cluster.local"
NODE_IPS = {"node-1": "10.77.0.11", "node-2": "10.77.0.12"}
EXTERNAL = {"ext-a": "10.77.0.201", "ext-b": "10.77.0.202"}
Cluster = Any


def _pod(name: str, ns: str, node: str, command: list[str]) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, ns
    p.metadata.labels["app"] = name
    p.spec.node_name = node
    p.spec.service_account_name = name
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(command)
    if name == "server":
        c.ports.add(name="tcp-web", container_port=8080)
    return p


def _service(name: str, ns: str, target: int) -> core_pb2.Service:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = name, ns
    svc.spec.selector["app"] = name
    # A TCP port (named so): this module is about L4; an HTTP port takes the L7
    # engine, whose clusters hold the Endpoints' pods only so far.
    port = svc.spec.ports.add(name="tcp-web", port=80)
    port.target_port.int_val = target
    return svc


def _running(cluster: Cluster, name: str, ns: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=ns)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


def _namespace(cluster: Cluster, name: str, labels: dict[str, str]) -> None:
    ns = core_pb2.Namespace()
    ns.metadata.name = name
    ns.metadata.labels.update(labels)
    cluster.client.create(ns)


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _counted(address: str, name: str, *words: str) -> float:
    """The sum of the samples of metric ``name`` whose labels hold every word."""
    total = 0.0
    for line in _metrics(address).splitlines():
        if line.startswith(name + "{") and all(w in line for w in words):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wget(cluster: Cluster, pod: str, ns: str, url: str) -> str:
    # busybox's `wget -T` segfaults: bounded from outside.
    r = cluster.shoal("exec", pod, "-n", ns, "--", "timeout", "5", "wget", "-q", "-O", "-",
                      url)
    return r.stdout if r.returncode == 0 else f"ERR {r.returncode} {r.stderr.strip()}"


@pytest.fixture(scope="module")
def host(cluster: Cluster) -> Node:
    r = cluster.lab("meshhost", "add")
    assert r.returncode == 0, f"lab meshhost add failed:\n{r.stdout}\n{r.stderr}"
    status = cluster.lab("status")
    assert "meshagent/meshhost-1" in status.stdout and "meshhost-app/meshhost-1" in (
        status.stdout), status.stdout
    return meshhost.host(Path(cluster.dir), 1)


@pytest.fixture(scope="module")
def mesh(cluster: Cluster, host: Node) -> dict[str, core_pb2.Pod]:
    _namespace(cluster, NS, {})
    cluster.client.create(_pod("server", NS, "node-2", [
        "sh", "-c", f"mkdir -p /www && echo {MARKER} > /www/index.html && "
        "exec httpd -f -p 8080 -h /www"]))
    cluster.client.create(_pod("client", NS, "node-1", ["sleep", "3600"]))
    cluster.client.create(_service("server", NS, 8080))
    cluster.client.create(_service("legacy", NS, 8080))
    we = traffic_pb2.WorkloadEntry()
    we.metadata.name, we.metadata.namespace = "legacy", NS
    we.metadata.labels["shoal.dev/mesh-host"] = host.name
    we.spec.address, we.spec.service_account = host.ip, "legacy"
    we.spec.labels["app"] = "legacy"
    we.spec.ports["tcp-web"] = meshhost.APP_PORT
    cluster.client.create(we)
    r = cluster.shoal("get", "we", "-n", NS)
    assert r.returncode == 0 and "legacy" in r.stdout, r
    return {name: wait_for(f"{name} running", partial(_running, cluster, name, NS),
                           timeout=120) for name in ("server", "client")}


def _from_host(host: Node, url: str) -> str:
    r = subprocess.run(meshhost.command(host, ["timeout", "5", "busybox", "wget", "-q", "-O",
                                               "-", url], namespace=NS),
                       capture_output=True, text=True, timeout=30, check=False)
    return r.stdout if r.returncode == 0 else f"ERR {r.returncode} {r.stderr.strip()}"


def test_pod_and_mesh_only_host_call_each_other_by_name_over_mtls(
        cluster: Cluster, host: Node, mesh: dict[str, core_pb2.Pod]) -> None:
    host_metrics = f"{host.ip}:{meshhost.METRICS_PORT}"
    # The pod calls the process by its Service's name.
    got = wait_for("the pod reaches the mesh-only host by name", lambda: (
        r if "hello from meshhost-1" in (r := _wget(
            cluster, "client", NS, f"http://legacy.{NS}.svc.cluster.local/")) else None),
        timeout=60, interval=1)
    assert "hello from meshhost-1" in got
    assert _counted(host_metrics, "istio_tcp_connections_opened_total",
                    'reporter="destination"', f'source_principal="{TD}/ns/{NS}/sa/client"',
                    'connection_security_policy="mutual_tls"') >= 1
    # The process calls the pod by name, through its agent's DNS and mTLS.
    got = wait_for("the mesh-only host reaches the pod by name", lambda: (
        r if MARKER in (r := _from_host(host, f"http://server.{NS}.svc.cluster.local/"))
        else None), timeout=60, interval=1)
    assert MARKER in got
    assert _counted(f"{NODE_IPS['node-2']}:15020", "istio_tcp_connections_opened_total",
                    'reporter="destination"', f'source_principal="{TD}/ns/{NS}/sa/legacy"',
                    'connection_security_policy="mutual_tls"') >= 1
    certs = _metrics(host_metrics)
    assert f'spiffe_id="spiffe://{TD}/ns/{NS}/sa/legacy"' in certs


def test_authorization_policy_applies_to_the_mesh_only_hosts_identity(
        cluster: Cluster, host: Node, mesh: dict[str, core_pb2.Pod]) -> None:
    url = f"http://server.{NS}.svc.cluster.local/"
    assert MARKER in wait_for("allowed before the policy", lambda: (
        r if MARKER in (r := _from_host(host, url)) else None), timeout=60, interval=1)
    ap = security_pb2.AuthorizationPolicy()
    ap.metadata.name, ap.metadata.namespace = "deny-legacy", NS
    ap.spec.selector.match_labels["app"] = "server"
    ap.spec.action = "DENY"
    ap.spec.rules.add().from_.add().source.principals.append(f"{TD}/ns/{NS}/sa/legacy")
    cluster.client.create(ap)
    try:
        wait_for("the mesh-only host refused", lambda: MARKER not in _from_host(host, url),
                 timeout=30, interval=1)
        assert MARKER in _wget(cluster, "client", NS, url)  # the pod still gets in
    finally:
        cluster.client.delete(security_pb2.AuthorizationPolicy, "deny-legacy", namespace=NS)
    assert MARKER in wait_for("allowed again", lambda: (
        r if MARKER in (r := _from_host(host, url)) else None), timeout=30, interval=1)


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two "external" hosts: network namespaces on the lab bridge, each serving
    its name with busybox httpd on :8080."""
    made: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for name, ip in EXTERNAL.items():
            netns, veth = f"shoal-test-{name}", f"shlx-{name[-1]}"
            www = tmp_path_factory.mktemp(name)
            (www / "index.html").write_text(f"external {name}\n")
            for cmd in (["ip", "netns", "add", netns],
                        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                         "netns", netns],
                        ["ip", "link", "set", veth, "master", "shoal0", "up"],
                        ["ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0"],
                        ["ip", "-n", netns, "link", "set", "eth0", "up"],
                        ["ip", "-n", netns, "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            proc = subprocess.Popen(["ip", "netns", "exec", netns, "busybox", "httpd", "-f",
                                     "-p", f"{ip}:8080", "-h", str(www)])
            made.append((netns, proc))
        yield EXTERNAL
    finally:
        for _netns, proc in made:
            proc.terminate()
            proc.wait(timeout=10)
        for name in EXTERNAL:
            subprocess.run(["ip", "netns", "del", f"shoal-test-{name}"], check=False,
                           capture_output=True)


def test_registry_only_allows_service_entry_hosts_and_blocks_others(
        cluster: Cluster, external: dict[str, str]) -> None:
    _namespace(cluster, EGRESS_NS, {"shoal.dev/outbound-traffic-policy": "REGISTRY_ONLY"})
    cluster.client.create(_pod("client", EGRESS_NS, "node-1", ["sleep", "3600"]))
    se = traffic_pb2.ServiceEntry()
    se.metadata.name, se.metadata.namespace = "ext-a", EGRESS_NS
    se.spec.hosts.append("ext-a.lab.example")
    se.spec.resolution = "STATIC"
    se.spec.ports.add(number=8080, name="tcp-web", protocol="TCP")
    se.spec.endpoints.add(address=external["ext-a"])
    cluster.client.create(se)
    wait_for("client running", partial(_running, cluster, "client", EGRESS_NS), timeout=120)
    a, b = (f"http://{external[n]}:8080/" for n in ("ext-a", "ext-b"))
    metrics = f"{NODE_IPS['node-1']}:15020"
    # The ServiceEntry's host: by IP and by its name.
    assert "external ext-a" in wait_for("ext-a allowed", lambda: (
        r if "external ext-a" in (r := _wget(cluster, "client", EGRESS_NS, a)) else None),
        timeout=60, interval=1)
    assert "external ext-a" in _wget(cluster, "client", EGRESS_NS,
                                     "http://ext-a.lab.example:8080/")
    # No ServiceEntry: refused, and counted.
    blocked = _wget(cluster, "client", EGRESS_NS, b)
    assert "external ext-b" not in blocked, blocked
    assert _counted(metrics, "shoal_mesh_egress_blocked_total",
                    f'destination="{external["ext-b"]}:8080"',
                    f'source_workload_namespace="{EGRESS_NS}"') >= 1
    assert _counted(metrics, "istio_tcp_connections_opened_total",
                    'destination_service="BlackHoleCluster"', 'response_flags="NR"') >= 1
    # ALLOW_ANY (the agents' default) once the namespace drops the label.
    ns = cluster.client.get(core_pb2.Namespace, EGRESS_NS)
    ns.metadata.labels.clear()
    cluster.client.update(ns)
    assert "external ext-b" in wait_for("ext-b allowed under ALLOW_ANY", lambda: (
        r if "external ext-b" in (r := _wget(cluster, "client", EGRESS_NS, b)) else None),
        timeout=30, interval=1)
