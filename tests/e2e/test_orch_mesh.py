"""Pods' traffic through meshagents on the lab (opt-in: ``shoal lab up --mesh``).

Runs only with ``SHOAL_E2E_MESH=1`` (the session's lab then starts a capturing
meshagent on every node):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_mesh.py``.
A client pod on node-1 fetches a busybox httpd Service, by DNS name, whose only
replica runs on node-2; both agents' Istio-style metrics count the connection.
Plaintext for now (the mTLS tunnel comes next).
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from functools import partial
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "mesh-e2e"
IMAGE = "docker.io/library/busybox:1.36"
Cluster = Any


def _pod(name: str, node: str, command: list[str], **labels: str) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels.update(labels)
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(command)
    if labels.get("app") == "web":
        c.ports.add(name="http", container_port=8080)
    return p


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


def _metric(node_ip: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{node_ip}:15020/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _node_ip(cluster: Cluster, node: str) -> str:
    n = cluster.client.get(core_pb2.Node, node)
    return str(next(a.address for a in n.status.addresses if a.type == "InternalIP"))


def test_a_pod_reaches_a_service_on_another_node_by_name_through_the_meshagents(
        cluster: Cluster) -> None:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    cluster.client.create(_pod("web", "node-2", [
        "sh", "-c", "mkdir -p /www && echo hello from web > /www/index.html && "
        "exec httpd -f -p 8080 -h /www"], app="web"))
    cluster.client.create(_pod("client", "node-1", ["sleep", "3600"], app="client"))
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", NS
    svc.spec.selector["app"] = "web"
    port = svc.spec.ports.add(name="http", port=80)
    port.target_port.str_val = "http"
    cluster.client.create(svc)
    for name in ("web", "client"):
        wait_for(f"{name} running", partial(_running, cluster, name), timeout=120)

    def fetch(url: str) -> subprocess.CompletedProcess[str] | None:
        r = cluster.shoal("exec", "client", "-n", NS, "--", "timeout", "5", "wget", "-q",
                          "-O", "-", url)
        return r if r.returncode == 0 else None

    for url in ("http://web/", f"http://web.{NS}.svc.cluster.local/"):
        r = wait_for(f"client fetches {url}", partial(fetch, url), timeout=60)
        assert r.stdout.strip() == "hello from web"
    src = _metric(_node_ip(cluster, "node-1"), "istio_tcp_connections_opened_total",
                  reporter="source", destination_service=f"{NS}/web",
                  source_workload="client", source_workload_namespace=NS)
    dst = _metric(_node_ip(cluster, "node-2"), "istio_tcp_connections_opened_total",
                  reporter="destination", destination_workload="web",
                  destination_workload_namespace=NS)
    assert src >= 2 and dst >= 2
    rules = subprocess.run(["ip", "netns", "exec", "shoal-node-1", "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    prerouting = [line for line in rules.splitlines() if line.startswith("-A PREROUTING")]
    assert prerouting[0] == "-A PREROUTING -j SHOAL-MESH-PREROUTING"


def _nat(node: str) -> str:
    return subprocess.run(["ip", "netns", "exec", f"shoal-{node}", "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout


def test_flushed_capture_rules_come_back(cluster: Cluster) -> None:
    client = wait_for("client running", partial(_running, cluster, "client"), timeout=120)
    mine = f"-A SHOAL-MESH-PREROUTING -s {client.status.pod_ip}/32"
    assert mine in _nat("node-1")
    subprocess.run(["ip", "netns", "exec", "shoal-node-1", "iptables", "-t", "nat", "-F",
                    "SHOAL-MESH-PREROUTING"], check=True)
    assert mine not in _nat("node-1")
    wait_for("capture rules rewritten", lambda: mine in _nat("node-1"), timeout=10)
    assert _metric(_node_ip(cluster, "node-1"), "shoal_mesh_capture_rewrites") >= 2
