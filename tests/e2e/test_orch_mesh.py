"""Pods' traffic through the meshagents on the lab (``shoal lab up --mesh``).

Runs with ``SHOAL_E2E_MESH=1`` (the session's lab then starts a capturing
meshagent on every node; scripts/test.sh runs this module in a second pass):
``SHOAL_E2E_MESH=1 flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_mesh.py``.

The workloads, in namespace ``mesh-e2e``:

    node-1: sleep (sa sleep), other (sa other)   in the mesh
            outsider                             opted out: plaintext, outside the mesh
    node-2: web (sa web): busybox httpd on 8080, behind Service web:80

Some checks run programs inside a pod's network namespace from the host
(``ip netns exec cni-...``): that is the pod's own traffic, captured as such,
and it does not need the apiserver (``shoal exec`` does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing import podnet
from shoal.testing.metrics import metric_total, scrape
from shoal.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    os.environ.get("SHOAL_E2E_MESH") != "1", reason="needs a lab with --mesh (SHOAL_E2E_MESH=1)")]

NS = "mesh-e2e"
IMAGE = "docker.io/library/busybox:1.36"
MARKER = f"hello-from-web-{uuid.uuid4().hex[:12]}"
Cluster = Any


def _pod(name: str, node: str, command: list[str], *, sa: str = "",
         labels: dict[str, str] | None = None) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels.update(labels or {"app": name})
    p.spec.node_name = node
    p.spec.service_account_name = sa
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(command)
    if name == "web":
        c.ports.add(name="http", container_port=8080)
    return p


def _running(cluster: Cluster, name: str) -> core_pb2.Pod | None:
    p = cluster.client.get(core_pb2.Pod, name, namespace=NS)
    return p if p.status.phase == "Running" and p.status.pod_ip else None


@pytest.fixture(scope="module")
def mesh(cluster: Cluster) -> Iterator[dict[str, core_pb2.Pod]]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    cluster.client.create(ns)
    sleep = ["sleep", "3600"]
    cluster.client.create(_pod("web", "node-2", [
        "sh", "-c", f"mkdir -p /www && echo {MARKER} > /www/index.html && "
        "exec httpd -f -p 8080 -h /www"], sa="web"))
    cluster.client.create(_pod("sleep", "node-1", sleep, sa="sleep"))
    cluster.client.create(_pod("other", "node-1", sleep, sa="other"))
    cluster.client.create(_pod("outsider", "node-1", sleep, labels={
        "app": "outsider", "shoal.dev/mesh": "disabled"}))
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = "web", NS
    svc.spec.selector["app"] = "web"
    port = svc.spec.ports.add(name="tcp-web", port=80)  # L4: this module is about TCP
    port.target_port.str_val = "http"
    echo_port = svc.spec.ports.add(name="tcp-echo", port=9000)
    echo_port.target_port.int_val = 9000
    cluster.client.create(svc)
    pods = {name: wait_for(f"{name} running", partial(_running, cluster, name), timeout=120)
            for name in ("web", "sleep", "other", "outsider")}
    yield pods


# -- helpers ------------------------------------------------------------------------


def _wget(cluster: Cluster, pod: str, url: str) -> str | None:
    r = cluster.shoal("exec", pod, "-n", NS, "--", "timeout", "5", "wget", "-q", "-O", "-",
                      url)
    return r.stdout.strip() if r.returncode == 0 else None


def _metric(node_ip: str, name: str, **labels: str) -> float:
    return metric_total(scrape(f"http://{node_ip}:15020/metrics"), name, **labels)


def _node_ip(cluster: Cluster, node: str) -> str:
    n = cluster.client.get(core_pb2.Node, node)
    return str(next(a.address for a in n.status.addresses if a.type == "InternalIP"))


_nat = podnet.nat_rules
_pod_netns = podnet.pod_netns
_in_netns = podnet.in_netns
_http_get = podnet.http_get
REQUEST = podnet.REQUEST


def _processes(cluster: Cluster) -> dict[str, int]:
    state = json.loads((cluster.dir / "state.json").read_text())
    return {p["name"]: int(p["pid"]) for p in state["processes"].values()}


@contextlib.contextmanager
def _applied(cluster: Cluster, path: Path, manifest: str,
             *flags: str) -> Iterator[subprocess.CompletedProcess[str]]:
    """``shoal apply -f`` of ``manifest`` (asserted to succeed), deleted afterwards."""
    path.write_text(textwrap.dedent(manifest))
    r = cluster.shoal("apply", "-f", str(path), *flags)
    try:
        assert r.returncode == 0, r.stderr
        yield r
    finally:
        cluster.shoal("delete", "-f", str(path))


# -- tests ------------------------------------------------------------------------


def test_a_pod_reaches_a_service_on_another_node_by_name_over_mutual_tls(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod]) -> None:
    for url in ("http://web/", f"http://web.{NS}.svc.cluster.local/"):
        assert wait_for(f"sleep fetches {url}", partial(_wget, cluster, "sleep", url),
                        timeout=60) == MARKER
    node1, node2 = _node_ip(cluster, "node-1"), _node_ip(cluster, "node-2")
    service = f"web.{NS}.svc.cluster.local"  # Istio's form: the FQDN, both reporters
    assert _metric(node1, "istio_tcp_connections_opened_total", reporter="source",
                   destination_service=service, source_workload="sleep",
                   source_principal=f"cluster.local/ns/{NS}/sa/sleep",
                   destination_principal=f"cluster.local/ns/{NS}/sa/web",
                   connection_security_policy="mutual_tls") >= 2
    assert _metric(node2, "istio_tcp_connections_opened_total", reporter="destination",
                   destination_service=service,
                   destination_workload="web", destination_workload_namespace=NS,
                   source_principal=f"cluster.local/ns/{NS}/sa/sleep",
                   connection_security_policy="mutual_tls") >= 2
    assert _metric(node2, "shoal_mesh_tls_handshakes_total", direction="inbound",
                   result="ok") >= 1
    prerouting = [line for line in _nat("shoal-node-1").splitlines()
                  if line.startswith("-A PREROUTING")]
    assert prerouting[0] == "-A PREROUTING -j SHOAL-MESH-PREROUTING"


def test_between_nodes_the_bridge_carries_only_tls(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod], tmp_path: Path) -> None:
    web_ip = mesh["web"].status.pod_ip
    secret, control = f"/?secret-{uuid.uuid4().hex}", f"/?control-{uuid.uuid4().hex}"
    seen = tmp_path / "shln-2.txt"
    # node-2's port on the lab bridge (the bridge device itself only sees what is
    # addressed to the host): every packet between node-2 and the other nodes,
    # headers and payload as text (-A), written by us (tcpdump drops privileges).
    with seen.open("w") as out:
        dump = subprocess.Popen(["tcpdump", "-i", "shln-2", "-nn", "-l", "-A", "-s", "0",
                                 "tcp"], stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            assert dump.stderr is not None
            lines = [dump.stderr.readline() for _ in range(2)]
            assert any("listening on" in line for line in lines), lines
            sleep_ns = _pod_netns(mesh["sleep"].status.pod_ip)
            outsider_ns = _pod_netns(mesh["outsider"].status.pod_ip)
            # In the mesh: the request path and the page cross the bridge inside TLS.
            assert MARKER in _http_get(sleep_ns, web_ip, 8080, secret)
            # The control, outside the mesh: plaintext, which the capture must show.
            assert MARKER in _http_get(outsider_ns, web_ip, 8080, control)
            wait_for("tcpdump printed the control",
                     lambda: control in seen.read_text(errors="replace"), timeout=10)
        finally:
            dump.send_signal(signal.SIGINT)
            dump.wait(timeout=10)
    text = seen.read_text(errors="replace")
    assert secret not in text
    assert text.count(MARKER) == 1  # the control's page only
    assert f"> {web_ip}.15008:" in text  # the tunnel went to the pod's node agent


def test_strict_mtls_refuses_plaintext_from_outside_the_mesh(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod], tmp_path: Path) -> None:
    web_ip = mesh["web"].status.pod_ip
    outsider_ns = _pod_netns(mesh["outsider"].status.pod_ip)
    assert MARKER in _http_get(outsider_ns, web_ip, 8080)  # PERMISSIVE by default
    with _applied(cluster, tmp_path / "strict.yaml", f"""\
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata:
              name: strict
              namespace: {NS}
            spec:
              mtls:
                mode: STRICT
            """):
        wait_for("plaintext refused under STRICT",
                 lambda: MARKER not in _http_get(outsider_ns, web_ip, 8080), timeout=30)
        assert _wget(cluster, "sleep", "http://web/") == MARKER  # the mesh still works
        assert _metric(_node_ip(cluster, "node-2"), "shoal_mesh_connections_denied_total",
                       reporter="destination", destination_workload="web",
                       reason="STRICT mTLS: plaintext refused") >= 1
    wait_for("plaintext accepted again", lambda: MARKER in _http_get(outsider_ns, web_ip, 8080),
             timeout=30)


def test_a_deny_policy_by_principal_blocks_one_client_and_not_another(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod], tmp_path: Path) -> None:
    with _applied(cluster, tmp_path / "deny.yaml", f"""\
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata:
              name: deny-sleep
              namespace: {NS}
            spec:
              selector:
                matchLabels:
                  app: web
              action: DENY
              rules:
              - from:
                - source:
                    principals: ["cluster.local/ns/{NS}/sa/sleep"]
            """):
        wait_for("sleep denied", lambda: _wget(cluster, "sleep", "http://web/") is None,
                 timeout=30)
        assert _wget(cluster, "other", "http://web/") == MARKER
        assert _metric(_node_ip(cluster, "node-2"), "shoal_mesh_connections_denied_total",
                       reporter="destination",
                       source_principal=f"cluster.local/ns/{NS}/sa/sleep",
                       reason=f"denied by DENY policy {NS}/deny-sleep") >= 1
    assert wait_for("sleep allowed again",
                    partial(_wget, cluster, "sleep", "http://web/"), timeout=30) == MARKER


# A TLS client that proves an identity to a pod's tunnel port and asks for the
# HTTP/2 preface back. argv: ip cert key roots. Prints ACCEPTED or REFUSED why.
HANDSHAKE = """
    import socket, ssl, sys
    ip, cert, key, roots = sys.argv[1:5]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(roots)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((ip, 15008), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes(
                    [0, 0, 0, 4, 0, 0, 0, 0, 0]))
                frame = s.recv(9)
                print("ACCEPTED" if len(frame) == 9 and frame[3] == 4 else
                      f"REFUSED {frame!r}")
    except (OSError, ssl.SSLError) as e:
        print("REFUSED", e)
"""


def test_forged_and_expired_certificates_are_refused(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod], tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from apiserver import pki
    from apiserver.workloadcerts import issue_workload
    from shoal import spiffe

    pki_dir = cluster.dir / "apiserver" / "pki"
    name = "mesh-ca" if (pki_dir / "mesh-ca.crt").exists() else "ca"
    ca_key = serialization.load_pem_private_key((pki_dir / f"{name}.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    real = pki.CertificateAuthority(
        x509.load_pem_x509_certificate((pki_dir / f"{name}.crt").read_bytes()), ca_key)
    forged_ca = pki.CertificateAuthority.create(real.cert.subject.rfc4514_string())
    sleep_id = spiffe.SpiffeId("cluster.local", NS, "sleep")
    now = dt.datetime.now(dt.UTC)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pki.cert_pem(real.cert))
    results = {}
    for label, ca, when in (("valid", real, now), ("forged", forged_ca, now),
                            ("expired", real, now - dt.timedelta(days=2))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_workload(ca, key.public_key(), sleep_id, now=when,
                              lifetime=dt.timedelta(hours=24))
        (tmp_path / f"{label}.crt").write_bytes(pki.cert_pem(cert))
        (tmp_path / f"{label}.key").write_bytes(pki.key_pem(key))
        r = _in_netns("shoal-node-1", HANDSHAKE, mesh["web"].status.pod_ip,
                      str(tmp_path / f"{label}.crt"), str(tmp_path / f"{label}.key"),
                      str(roots))
        results[label] = r.stdout.strip() or r.stderr.strip()
    assert results["valid"] == "ACCEPTED", results  # the control: the right CA gets in
    assert results["forged"].startswith("REFUSED"), results
    assert results["expired"].startswith("REFUSED"), results
    assert _metric(_node_ip(cluster, "node-2"), "shoal_mesh_tls_handshakes_total",
                   direction="inbound", result="tls_failed") >= 2


# Keeps one connection busy (a line every 0.2 s, echoed) for ``seconds``; prints
# how many round trips worked and the first error. argv: ip port seconds.
STEADY = """
    import socket, sys, time
    ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ok, err = 0, ""
    try:
        s = socket.create_connection((ip, port), timeout=3)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(b"ping\\n")
            if s.recv(16) != b"ping\\n":
                err = "bad echo"
                break
            ok += 1
            time.sleep(0.2)
    except OSError as e:
        err = str(e)
    print(ok, err)
"""

ECHO = """
    import socket, sys, threading
    srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    def serve(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def echo(mesh: dict[str, core_pb2.Pod]) -> Iterator[None]:
    """An echo server on port 9000 in the web pod's network namespace."""
    web_ip = mesh["web"].status.pod_ip
    proc = subprocess.Popen(["ip", "netns", "exec", _pod_netns(web_ip), sys.executable, "-c",
                             textwrap.dedent(ECHO), "9000"])
    try:
        sleep_ns = _pod_netns(mesh["sleep"].status.pod_ip)
        wait_for("the echo server", lambda: _in_netns(
            sleep_ns, REQUEST, web_ip, "9000", "x").stdout.startswith("OK x"), timeout=20)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _steady(netns: str, ip: str, port: int, seconds: float) -> subprocess.Popen[str]:
    return podnet.start_in_netns(netns, STEADY, ip, str(port), str(seconds))


def test_stopping_the_apiserver_does_not_break_running_traffic(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod], echo: None) -> None:
    web_ip = mesh["web"].status.pod_ip
    sleep_ns = _pod_netns(mesh["sleep"].status.pod_ip)
    apiserver = _processes(cluster)["apiserver"]
    cluster_ip = cluster.client.get(core_pb2.Service, "web", namespace=NS).spec.cluster_ip
    steady = _steady(sleep_ns, web_ip, 9000, 6)
    time.sleep(1)
    os.kill(apiserver, signal.SIGSTOP)
    try:
        # New connections, by pod IP and by ClusterIP, while it is stopped.
        assert MARKER in _http_get(sleep_ns, web_ip, 8080)
        assert MARKER in _http_get(sleep_ns, cluster_ip, 80)
        out, _ = steady.communicate(timeout=30)
    finally:
        os.kill(apiserver, signal.SIGCONT)
    ok, _, err = out.strip().partition(" ")
    assert err == "" and int(ok) >= 25, out  # ~30 round trips in 6 s, none failed


def test_a_restarted_meshagent_restores_capture_and_traffic_within_two_seconds(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod]) -> None:
    web_ip = mesh["web"].status.pod_ip
    sleep_ip = mesh["sleep"].status.pod_ip
    sleep_ns = _pod_netns(sleep_ip)
    node1 = _node_ip(cluster, "node-1")
    old = _processes(cluster)["meshagent/node-1"]
    os.kill(old, signal.SIGKILL)  # a crash: the supervisor starts it again
    new = wait_for("the supervisor restarts the meshagent",
                   lambda: (_processes(cluster).get("meshagent/node-1") or old) != old
                   and _processes(cluster)["meshagent/node-1"], timeout=30)
    started = time.monotonic()

    def restored() -> bool:
        return (f"-A SHOAL-MESH-PREROUTING -s {sleep_ip}/32" in _nat("shoal-node-1")
                and MARKER in _http_get(sleep_ns, web_ip, 8080))
    wait_for("capture and traffic restored", restored, timeout=30, interval=0.05)
    took = time.monotonic() - started
    assert took <= 2.0, f"restored {took:.2f}s after meshagent {new} started"
    # Through the new agent (its counters start at zero), over mTLS again.
    assert _metric(node1, "istio_tcp_connections_opened_total", source_workload="sleep",
                   connection_security_policy="mutual_tls") >= 1


def test_mesh_commands_show_what_the_agents_hold_and_see(
        cluster: Cluster, mesh: dict[str, core_pb2.Pod], echo: None,
        tmp_path: Path) -> None:
    def synced() -> str | None:
        r = cluster.shoal("mesh", "status")
        return r.stdout if r.returncode == 0 and r.stdout.count("SYNCED") == 3 else None
    status = wait_for("every agent SYNCED", synced, timeout=30)
    assert all(f"node-{i}" in status for i in (1, 2, 3)), status

    certs = cluster.shoal("mesh", "certs", "node-1")
    assert certs.returncode == 0, certs.stderr
    for sa in ("sleep", "other"):
        line = next(x for x in certs.stdout.splitlines()
                    if f"spiffe://cluster.local/ns/{NS}/sa/{sa}" in x)
        assert "VALID" in line, certs.stdout

    rules = cluster.shoal("mesh", "netfilter", "node-1")
    assert rules.returncode == 0, rules.stderr
    assert f"-s {mesh['sleep'].status.pod_ip}/32" in rules.stdout
    assert "missing:" not in rules.stdout and "unexpected:" not in rules.stdout

    # No live connection: it says so, rather than what the config would do.
    idle = cluster.shoal("mesh", "tls", "sleep", "web", "-n", NS)
    assert idle.returncode != 0 and "no live connection" in idle.stderr
    svc_ip = cluster.client.get(core_pb2.Service, "web", namespace=NS).spec.cluster_ip
    steady = _steady(_pod_netns(mesh["sleep"].status.pod_ip), svc_ip, 9000, 8)
    try:
        def seen() -> str | None:
            r = cluster.shoal("mesh", "tls", "sleep", "web", "-n", NS)
            return r.stdout if r.returncode == 0 else None
        out = wait_for("the live connection seen", seen, timeout=10)
    finally:
        steady.communicate(timeout=30)
    assert "TLSv1.3" in out and "mTLS" in out, out
    assert f"cluster.local/ns/{NS}/sa/web" in out, out  # the peer the source verified
    assert f"cluster.local/ns/{NS}/sa/sleep" in out, out  # and the destination's

    with _applied(cluster, tmp_path / "allow.yaml", f"""\
            apiVersion: security.istio.io/v1beta1
            kind: AuthorizationPolicy
            metadata:
              name: allow-all
              namespace: {NS}
            spec:
              rules:
              - {{}}
            """, "--wait-propagated", "--timeout", "30s") as r:
        assert "propagated to 3 meshagents" in r.stdout, r.stdout
