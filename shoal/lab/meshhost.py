"""Mesh-only hosts in the lab (``shoal lab up --mesh --mesh-hosts N``, or
``shoal lab meshhost add`` on a lab up with --mesh): a VM's stand-in.

    network namespace shoal-meshhost-i     on the lab bridge, eth0 10.77.0.(100+i)/24
                                           (veth shlm-i), routes to every node's pod
                                           CIDR and to the service CIDR through the
                                           nodes; nothing else (no default route)
    join                                   ``shoal-nodeagent join`` run once, as a tool
                                           (the same token + CSR path as every node):
                                           the host's identity system:node:meshhost-i
                                           in <lab>/meshhosts/meshhost-i/node.conf. No
                                           node agent runs and no Node object exists.
    process meshagent/meshhost-i           ``shoal-meshagent run --mesh-host --capture``:
                                           its workloads are the WorkloadEntries
                                           labelled shoal.dev/mesh-host: meshhost-i
    process meshhost-app/meshhost-i        a plain process: busybox httpd on :8080 as
                                           user nobody, serving "hello from
                                           meshhost-i" (its index.html)

The host's own programs see the agent's DNS: ``command()`` runs one as nobody
in the host's network namespace with a resolv.conf naming the host's address
(``nameserver 10.77.0.(100+i)``, the cluster search path of a namespace),
which the capture sends to the agent.

``lab down`` stops both processes (the agent removes its rules), and removes
the namespace and the veth with the nodes'.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from shoal import config as configmod
from shoal import errors, tokens
from shoal.api.core.v1 import core_pb2
from shoal.client import Client
from shoal.lab import netsetup
from shoal.lab.supervising import NETNS_DIR, http_ok
from shoal.lab.topology import NETWORK, Node, NodeName

if TYPE_CHECKING:
    from shoal.lab.lab import Lab
    from shoal.lab.state import LabState
    from shoal.lab.topology import Topology

PREFIX = "meshhost-"
NETNS_PREFIX = "shoal-meshhost-"
VETH_PREFIX = "shlm-"
IP_OFFSET = 100
MAX_HOSTS = 20
AGENT = "meshagent/"  # + name: stopped with the meshagents at `down`
APP = "meshhost-app/"
APP_PORT = 8080
METRICS_PORT = 15020
NOBODY = "65534"
SERVICE_CIDR = "10.96.0.0/16"


def host(lab_dir: Path, index: int) -> Node:
    """Mesh-only host ``index`` (1-based): names and address (pure)."""
    if not 1 <= index <= MAX_HOSTS:
        raise errors.BadRequest(f"mesh-only host index {index}: must be 1..{MAX_HOSTS}")
    return Node(index=index, name=NodeName(f"{PREFIX}{index}"),
                netns=f"{NETNS_PREFIX}{index}", host_veth=f"{VETH_PREFIX}{index}",
                ip=str(NETWORK.network_address + IP_OFFSET + index),
                data_dir=lab_dir / "meshhosts" / f"{PREFIX}{index}")


def hosts_in(state: LabState, lab_dir: Path) -> list[Node]:
    """The mesh-only hosts this lab has (from its recorded agents)."""
    out = []
    for i in range(1, MAX_HOSTS + 1):
        h = host(lab_dir, i)
        if AGENT + h.name in state.processes:
            out.append(h)
    return out


def agent_argv(h: Node, *, python: str, trust_domain: str = "cluster.local") -> list[str]:
    return [python, "-P", "-m", "meshagent.main", "run", "--node-name", h.name,
            "--config", str(h.data_dir / "node.conf"), "--mesh-host", "--capture",
            "--trust-domain", trust_domain, "--metrics-listen", f"{h.ip}:{METRICS_PORT}",
            "--access-log"]


def app_argv(h: Node) -> list[str]:
    # httpd changes into its directory, then to nobody (-u): the lab dir is 0700.
    return ["busybox", "httpd", "-f", "-u", f"{NOBODY}:{NOBODY}", "-p", f"{h.ip}:{APP_PORT}",
            "-h", str(h.data_dir / "www")]


def resolv_conf(h: Node, namespace: str = "default") -> str:
    return (f"nameserver {h.ip}\nsearch {namespace}.svc.cluster.local svc.cluster.local "
            "cluster.local\noptions ndots:5\n")


def command(h: Node, argv: list[str], *, namespace: str = "default") -> list[str]:
    """``argv`` as a process of host ``h``: in its network namespace, as nobody, with
    the host's resolv.conf (a private mount namespace binds it over /etc/resolv.conf)."""
    conf = h.data_dir / f"resolv-{namespace}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(resolv_conf(h, namespace))
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["nsenter", f"--net={NETNS_DIR / h.netns}", "unshare", "--mount", "--propagation",
            "private", "sh", "-c", script, str(conf), "setpriv", f"--reuid={NOBODY}",
            f"--regid={NOBODY}", "--clear-groups", *argv]


def _routes(h: Node, client: Client) -> None:
    """Routes to the nodes' pod CIDRs and the service CIDR (through the first node)."""
    nodes = [n for n in client.list(core_pb2.Node).items if n.spec.pod_cidr]
    via = ""
    for n in nodes:
        ip = next((a.address for a in n.status.addresses if a.type == "InternalIP"), "")
        if not ip:
            continue
        via = via or ip
        netsetup.run(["ip", "-n", h.netns, "route", "replace", n.spec.pod_cidr, "via", ip])
    if via:
        netsetup.run(["ip", "-n", h.netns, "route", "replace", SERVICE_CIDR, "via", via])


def add(lab: Lab, state: LabState, topo: Topology, index: int, *, timeout: float) -> Node:
    """Bring mesh-only host ``index`` up in the lab (see the module docstring)."""
    h = host(lab.lab_dir, index)
    if AGENT + h.name in state.processes:
        raise errors.AlreadyExists(f"mesh-only host {h.name} is already in the lab")
    state.add_unique(state.netns, h.netns)
    state.add_unique(state.interfaces, h.host_veth)
    lab.file.save(state)
    netsetup.ensure_netns(h.netns)
    netsetup.ensure_node_link(h, bridge=topo.bridge)
    h.data_dir.mkdir(parents=True, exist_ok=True)
    www = h.data_dir / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text(f"hello from {h.name}\n")
    cfg = configmod.load(topo.admin_config)
    token = tokens.generate()
    with Client(cfg, timeout=10.0) as client:
        client.create(tokens.to_secret(token, ttl=dt.timedelta(hours=1),
                                        description=f"lab {h.name}"))
        _routes(h, client)
    join = subprocess.run(
        ["nsenter", f"--net={NETNS_DIR / h.netns}", lab.python, "-P", "-m", "nodeagent.main",
         "join", "--server", topo.join_server, "--token", str(token), "--ca-cert-hash",
         tokens.ca_cert_hash(cfg.ca_pem), "--node-name", h.name, "--node-ip", h.ip,
         "--data-dir", str(h.data_dir), "--api-server", topo.api_server],
        capture_output=True, text=True, check=False, timeout=timeout, cwd="/")
    if join.returncode != 0:
        raise errors.Unavailable(f"{h.name}: join failed: {join.stderr.strip()}")
    agent = lab._spawn(state, AGENT + h.name, agent_argv(h, python=lab.python),
                       log=topo.logs_dir / f"{h.name}-meshagent.log", netns=h.netns)
    lab._spawn(state, APP + h.name, app_argv(h), log=topo.logs_dir / f"{h.name}-app.log",
               netns=h.netns)
    lab.sup.wait_until(f"{AGENT + h.name} /readyz",
                       partial(http_ok, f"http://{h.ip}:{METRICS_PORT}/readyz"),
                       timeout=timeout, watch=[agent])
    return h
