"""The lab's ingress gateway (``shoal lab up --mesh``): Istio's shape, on node-1.

    objects (admin, idempotent)      namespace istio-system, ServiceAccount and
                                     Pod istio-ingressgateway on node-1 (labels
                                     istio=ingressgateway, app=istio-ingressgateway;
                                     opted out of capture: the gateway is its own
                                     proxy), a Role + RoleBinding letting node-1
                                     read Secrets in istio-system (the TLS
                                     credentials of Gateway servers; Istio gives
                                     its gateway's service account the same Role)
    pod Running, IP P                the host gets a route P/32 via node-1 (the
                                     only way into the lab from the host; gone
                                     with the bridge at ``down``)
    process meshagent/ingressgateway ``python -m meshagent.gateway run`` in the
                                     pod's network namespace with node-1's
                                     credentials (its certificate comes from the
                                     mesh CA like every mesh pod's: node-1 runs a
                                     pod with that service account), supervised,
                                     ready on http://P:15021/readyz

Listeners: one per port of the Gateway servers selecting istio=ingressgateway,
on P, reachable from the host (``curl https://bookinfo.example.com:443/
--resolve bookinfo.example.com:443:P``); ``shoal lab status`` prints P.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from google.protobuf.message import Message

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.rbac.v1 import rbac_pb2
from shoal.client import Client

NAMESPACE = "istio-system"
NAME = "istio-ingressgateway"
PROCESS = "meshagent/ingressgateway"  # stopped with the meshagents at `down`
LABELS = {"istio": "ingressgateway", "app": NAME}
METRICS_PORT = 15021
IMAGE = "docker.io/library/busybox:1.36"
RBAC_GROUP = "rbac.authorization.k8s.io"


def objects(node: str) -> list[Message]:
    """What the gateway needs in the API (pure)."""
    ns = core_pb2.Namespace()
    ns.metadata.name = NAMESPACE
    sa = core_pb2.ServiceAccount()
    sa.metadata.name, sa.metadata.namespace = NAME, NAMESPACE
    role = rbac_pb2.Role(rules=[rbac_pb2.PolicyRule(
        verbs=["get", "list", "watch"], api_groups=[""], resources=["secrets"])])
    role.metadata.name, role.metadata.namespace = f"{NAME}-sds", NAMESPACE
    binding = rbac_pb2.RoleBinding(role_ref=rbac_pb2.RoleRef(
        api_group=RBAC_GROUP, kind="Role", name=f"{NAME}-sds"))
    binding.metadata.name, binding.metadata.namespace = f"{NAME}-sds-{node}", NAMESPACE
    binding.subjects.add(kind="User", api_group=RBAC_GROUP, name=f"system:node:{node}")
    pod = core_pb2.Pod()
    pod.metadata.name, pod.metadata.namespace = NAME, NAMESPACE
    pod.metadata.labels.update({**LABELS, "shoal.dev/mesh": "disabled"})
    pod.spec.node_name = node
    pod.spec.service_account_name = NAME
    pod.spec.termination_grace_period_seconds = 1
    c = pod.spec.containers.add(name="placeholder", image=IMAGE)
    c.command.extend(["sleep", "2147483647"])  # the gateway process runs beside it
    return [ns, sa, role, binding, pod]


def ensure(client: Client, node: str, *, timeout: float = 120.0) -> str:
    """Create what is missing and wait for the pod; its IP."""
    for obj in objects(node):
        try:
            client.create(obj)
        except errors.AlreadyExists:
            pass
    deadline = time.monotonic() + timeout
    while True:
        pod = client.get(core_pb2.Pod, NAME, namespace=NAMESPACE)
        if pod.status.phase == "Running" and pod.status.pod_ip:
            return str(pod.status.pod_ip)
        if time.monotonic() > deadline:
            raise errors.Unavailable(f"pod {NAMESPACE}/{NAME} not Running after {timeout:g}s "
                                     f"(phase {pod.status.phase or 'Pending'})")
        time.sleep(0.5)


def pod_netns(ip: str) -> str:
    """The network namespace (a name under /var/run/netns) holding ``ip``."""
    for entry in sorted(p.name for p in Path("/var/run/netns").iterdir()):
        out = subprocess.run(["ip", "-n", entry, "-j", "-4", "addr", "show"],
                             capture_output=True, text=True, check=False).stdout
        for link in json.loads(out or "[]"):
            if any(a.get("local") == ip for a in link.get("addr_info", [])):
                return entry
    raise errors.NotFound(f"no network namespace holds {ip}")


def route_to(ip: str, via: str) -> None:
    """The host's route to the gateway pod through its node (idempotent)."""
    subprocess.run(["ip", "route", "replace", f"{ip}/32", "via", via], check=True,
                   capture_output=True, text=True)


def argv(*, python: str, node: str, node_config: Path, zipkin: str,
         sampling: float = 100.0) -> list[str]:
    return [python, "-P", "-m", "meshagent.gateway", "run", "--node-name", node,
            "--pod", f"{NAMESPACE}/{NAME}", "--config", str(node_config),
            "--metrics-listen", f"0.0.0.0:{METRICS_PORT}",
            *(["--zipkin-endpoint", zipkin] if zipkin else []),
            "--trace-sampling", f"{sampling:g}"]


def address(client: Client) -> str:
    """The gateway pod's IP ("" if it has none)."""
    try:
        pod = client.get(core_pb2.Pod, NAME, namespace=NAMESPACE)
    except errors.NotFound:
        return ""
    return str(pod.status.pod_ip)
