"""Secrets at rest and service-account tokens on the 3-node lab.

- The lab's apiserver runs with an encryption config (the bootstrap writes one):
  what ``etcdctl get`` prints for a Secret is AES-GCM ciphertext.
- A pod with ``automountServiceAccountToken: true`` gets its token, CA and
  namespace at ``/var/run/secrets/kubernetes.io/serviceaccount``, and can call
  the API with that token as ``system:serviceaccount:<ns>:<sa>``; once the
  ServiceAccount is deleted, the same token is refused.

The pod image is busybox: no Python (and so no Shoal SDK) runs inside it. The
call is therefore made by the SDK's in-cluster config from the pod's network
namespace (``nsenter -n`` into the container's process), reading the token
and CA from the container's own filesystem (``/proc/<pid>/root/...``: the files
exactly as mounted in the pod).

The lab's control plane (the host side of the bridge) has no route to pod
CIDRs: the lab has no NAT and pods never needed the apiserver. For the call
from the pod, the module adds the return route to the pod's node for its
duration (a real cluster's network provides it). Needs root; run with
``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_security.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

NS = "security-e2e"
IMAGE = "docker.io/library/busybox:1.36"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# A command no other pod of the lab runs, to find the container's process.
MARKER = "3613"
Cluster = Any  # tests/e2e/conftest.py's Cluster (conftest modules are not importable)

CLIENT = """
import sys
from pathlib import Path
from shoal import config, errors
from shoal.api.core.v1 import core_pb2
from shoal.client import Client
cfg = config.in_cluster(directory=Path(sys.argv[1]), environ={
    "KUBERNETES_SERVICE_HOST": sys.argv[2], "KUBERNETES_SERVICE_PORT": sys.argv[3]})
with Client(cfg, timeout=10) as c:
    try:
        pods = c.list(core_pb2.Pod)
        print("OK", cfg.namespace, *sorted(p.metadata.name for p in pods.items))
    except errors.ShoalError as e:
        print(type(e).__name__, e.message)
"""


def _pod() -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = "reader", NS
    p.spec.node_name = "node-2"
    p.spec.service_account_name = "reader"
    p.spec.automount_service_account_token = True
    p.spec.termination_grace_period_seconds = 1
    p.spec.containers.add(name="main", image=IMAGE).command.extend(["sleep", MARKER])
    return p


def _container_pid() -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline == f"sleep\0{MARKER}\0".encode():
            return int(entry)
    return None


@pytest.fixture(scope="module")
def reader(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    ns = core_pb2.Namespace()
    ns.metadata.name = NS
    ns.metadata.labels["shoal.dev/mesh"] = "disabled"
    cluster.client.create(ns)
    sa = core_pb2.ServiceAccount()
    sa.metadata.name, sa.metadata.namespace = "reader", NS
    cluster.client.create(sa)
    # RBAC: the service account may read in its namespace (ClusterRole view).
    binding = tmp_path_factory.mktemp("rbac") / "binding.yaml"
    binding.write_text(f"""\
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: reader-view, namespace: {NS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects:
- {{kind: ServiceAccount, name: reader, namespace: {NS}}}
""")
    applied = cluster.shoal("apply", "-f", str(binding))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    cluster.client.create(_pod())

    def running() -> bool:
        p = cluster.client.get(core_pb2.Pod, "reader", namespace=NS)
        return p.status.phase == "Running"

    wait_for("the reader pod running", running, timeout=120)
    pid = wait_for("the reader container's process", _container_pid, timeout=30)
    node = cluster.client.get(core_pb2.Node, "node-2")
    node_ip = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    route = [node.spec.pod_cidr, "via", node_ip]
    subprocess.run(["ip", "route", "replace", *route], check=True, timeout=30)
    try:
        yield pid
    finally:
        subprocess.run(["ip", "route", "del", *route], check=False, timeout=30)
        cluster.client.delete(core_pb2.Namespace, NS)


def _call_from_pod(cluster: Cluster, pid: int) -> str:
    """The SDK's in-cluster client, in the pod's network namespace, with the
    token and CA the pod sees."""
    server = cluster.client.config.servers[0]
    host, _, port = server.rpartition(":")
    token_port = str(int(port) + 1)  # the port for callers without a client certificate
    out = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", sys.executable, "-c", CLIENT,
         f"/proc/{pid}/root{SA_DIR}", host, token_port],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_lab_keeps_secrets_encrypted_in_etcd(cluster: Cluster) -> None:
    s = core_pb2.Secret(type="Opaque")
    s.metadata.name, s.metadata.namespace = "at-rest", "default"
    s.data["password"] = b"e2e-plaintext-password"
    cluster.client.create(s)
    try:
        state = json.loads((cluster.dir / "state.json").read_text())
        out = subprocess.run(["etcdctl", "--endpoints", state["etcd_endpoint"], "get",
                              "/registry/secrets/default/at-rest", "--print-value-only"],
                             capture_output=True, timeout=30, check=True,
                             env={**os.environ, "ETCDCTL_API": "3"}).stdout
        assert out.startswith(b"k8s:enc:aesgcm:v1:")
        assert b"e2e-plaintext-password" not in out
        got = cluster.client.get(core_pb2.Secret, "at-rest", namespace="default")
        assert got.data["password"] == b"e2e-plaintext-password"
    finally:
        cluster.client.delete(core_pb2.Secret, "at-rest", namespace="default")


def test_a_pod_calls_the_api_with_its_token_until_its_service_account_is_deleted(
        cluster: Cluster, reader: int) -> None:
    # The token, CA and namespace are mounted where every Kubernetes client looks.
    listed = cluster.shoal("exec", "reader", "-n", NS, "--", "ls", SA_DIR)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {"token", "ca.crt", "namespace"}
    token = cluster.shoal("exec", "reader", "-n", NS, "--", "cat", f"{SA_DIR}/token").stdout
    assert token.count(".") == 2  # a JWT
    ns_file = cluster.shoal("exec", "reader", "-n", NS, "--", "cat", f"{SA_DIR}/namespace")
    assert ns_file.stdout.strip() == NS

    assert _call_from_pod(cluster, reader) == f"OK {NS} reader"

    cluster.client.delete(core_pb2.ServiceAccount, "reader", namespace=NS)
    refused = wait_for("the token refused", lambda: (
        r if (r := _call_from_pod(cluster, reader)).startswith("Unauthorized") else None),
        timeout=30)
    assert "has been deleted" in refused
