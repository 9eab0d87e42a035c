"""Opting a namespace into the mesh, and out again, with no pod restart.

Runs with ``SHOAL_E2E_MESH=1`` (a lab with meshagents; scripts/test.sh runs it in
the mesh pass). The namespace starts labelled ``istio.io/dataplane-mode: none``
(outside the mesh, as Istio's label says); removing the label brings its pods'
traffic onto mTLS, as the agents' connection view (``shoal mesh tls``) shows,
and putting it back removes their capture rules. The pods are the same pods
throughout: same uid, same container, no restart.

    node-1: client (sa client)      node-2: server (sa server): busybox httpd on 8080,
                                            behind Service server:80
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing.podnet import http_get, nat_rules, pod_netns, start_in_netns
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "mesh-optin"
IMAGE = "docker.io/library/busybox:1.36"
MARKER = f"optin-{uuid.uuid4().hex[:12]}"
OUT = {"istio.io/dataplane-mode": "none"}
Cluster = Any

# Holds an HTTP request half-sent for ``seconds`` (the connection stays live
# meanwhile), then finishes it and prints the reply. argv: host port seconds.
HOLD = """
    import socket, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: server\\r\\n")
        time.sleep(seconds)
        s.sendall(b"\\r\\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        print("OK", out.decode(errors="replace"))
    except OSError as e:
        print("ERR", e)
"""


def _pod(name: str, node: str, command: list[str]) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels["app"] = name
    p.spec.node_name = node
    p.spec.service_account_name = name
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(command)
    if name == "server":
        c.ports.add(name="http", container_port=8080)
    return p


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


@pytest.fixture(scope="module")
def pods(cluster: Cluster) -> Iterator[dict[str, core_pb2.Pod]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    ns.metadata.labels.update(OUT)
    cluster.client.create(ns)
    cluster.client.create(_pod("server", "node-2", [
        "sh", "-c", f"mkdir -p /www && echo {MARKER} > /www/index.html && "
        "exec httpd -f -p 8080 -h /www"]))
    cluster.client.create(_pod("client", "node-1", ["sleep", "3600"]))
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "server", NS
    svc.spec.selector["app"] = "server"
    port = svc.spec.ports.add(name="tcp-web", port=80)  # L4: this module is about capture
    port.target_port.str_val = "http"
    cluster.client.create(svc)
    yield {name: wait_for(f"{name} running", partial(_running, cluster, name), timeout=120)
           for name in ("server", "client")}


def _label_namespace(cluster: Cluster, labels: dict[str, str]) -> None:
    ns = cluster.client.get(core_pb2.Namespace, NS)
    ns.metadata.labels.clear()
    ns.metadata.labels.update(labels)
    cluster.client.update(ns)


def _captured(ip: str, netns: str) -> bool:
    """Whether the mesh's capture chain in ``netns`` has rules for the pod ``ip``."""
    return any(line.startswith("-A SHOAL-MESH-PREROUTING ") and f" {ip}/32 " in line
               for line in nat_rules(netns).splitlines())


def _connection_view(cluster: Cluster, client_netns: str, svc_ip: str) -> tuple[str, str]:
    """``shoal mesh tls client server`` while a connection through the Service is
    live, and what that connection got back."""
    hold = start_in_netns(client_netns, HOLD, svc_ip, "80", "4")
    try:
        def view() -> str | None:
            r = cluster.shoal("mesh", "tls", "client", "server", "-n", NS)
            return r.stdout if r.returncode == 0 else None
        try:
            seen = wait_for("the live connection in the agents' view", view, timeout=3.5,
                            interval=0.2)
        except AssertionError:  # not seen while the connection was live
            seen = ""
    finally:
        out, _ = hold.communicate(timeout=30)
    return seen, out


def _same_pods(cluster: Cluster, before: dict[str, core_pb2.Pod]) -> None:
    for name, old in before.items():
        now = cluster.client.get(core_pb2.Pod, name, namespace=NS)
        assert now.metadata.uid == old.metadata.uid, f"{name} was recreated"
        (status,) = now.status.container_statuses
        assert status.container_id == old.status.container_statuses[0].container_id
        assert status.restart_count == 0, f"{name} restarted"


def test_opting_a_namespace_in_moves_its_traffic_onto_mtls_without_restarts(
        cluster: Cluster, pods: dict[str, core_pb2.Pod]) -> None:
    client_ip, server_ip = pods["client"].status.pod_ip, pods["server"].status.pod_ip
    client_ns = pod_netns(client_ip)
    svc_ip = cluster.client.get(core_pb2.Service, "server", namespace=NS).spec.cluster_ip

    # Outside the mesh: plain traffic (the node agents' Service rules), no
    # capture, nothing in the agents' view.
    def plain_get() -> str | None:
        r = http_get(client_ns, svc_ip, 80, host="server")
        return r if MARKER in r else None
    assert MARKER in wait_for("a plaintext GET through the ClusterIP", plain_get, timeout=30)
    assert not _captured(client_ip, "shoal-node-1")
    assert not _captured(server_ip, "shoal-node-2")
    seen, out = _connection_view(cluster, client_ns, svc_ip)
    assert MARKER in out and seen == "", (seen, out)

    # Opt in: the label goes; the agents capture the same pods.
    _label_namespace(cluster, {})
    wait_for("both pods captured", lambda: _captured(client_ip, "shoal-node-1")
             and _captured(server_ip, "shoal-node-2"), timeout=30, interval=0.2)
    seen, out = _connection_view(cluster, client_ns, svc_ip)
    assert MARKER in out, out
    assert "TLSv1.3" in seen and "mTLS" in seen, seen
    assert f"cluster.local/ns/{NS}/sa/server" in seen and (
        f"cluster.local/ns/{NS}/sa/client" in seen), seen
    _same_pods(cluster, pods)

    # Opt out again: their rules go, traffic stays plain, still the same pods.
    _label_namespace(cluster, OUT)
    wait_for("capture rules removed", lambda: not _captured(client_ip, "shoal-node-1")
             and not _captured(server_ip, "shoal-node-2"), timeout=30, interval=0.2)
    assert MARKER in http_get(client_ns, server_ip, 8080, host="server")
    _same_pods(cluster, pods)
