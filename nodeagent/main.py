"""``shoal-nodeagent``: Shoal's kubelet.

    shoal-nodeagent join --server HOST:PORT --token T --ca-cert-hash sha256:... \\
        [--node-name N] [--node-ip IP] [--data-dir /var/lib/shoal/nodeagent]
    shoal-nodeagent run --node-ip IP [--node-name N] [--data-dir D] [--cri-socket PATH]
        [--pod-cidr CIDR] [--netns NAME] [--listen 0.0.0.0:10250]
        [--registry-mirror REGISTRY=URL]...
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

from nodeagent import joining
from nodeagent.containerd import RegistryMirror, parse_registry_mirror
from shoal import errors, logs, sdnotify
from shoal.signals import until_stopped

DEFAULT_DATA_DIR = Path("/var/lib/shoal/nodeagent")


def _mirror(text: str) -> RegistryMirror:
    try:
        return parse_registry_mirror(text)
    except errors.BadRequest as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal-nodeagent", description="Shoal's node agent.")
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("join", help="get this node's identity from the cluster")
    j.add_argument("--server", required=True,
                   help="the apiserver's join address, HOST:PORT (its port 6444 by default)")
    j.add_argument("--token", required=True, help="from `shoal token create`")
    j.add_argument("--ca-cert-hash", required=True, help="sha256:<hex> of the cluster CA key")
    j.add_argument("--node-name", default=socket.gethostname().lower())
    j.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    j.add_argument("--api-server", action="append", default=[],
                   help="HOST:PORT of the API for the node's config (default: what the "
                        "apiserver advertises)")
    j.add_argument("--node-ip", action="append", default=[],
                   help="the node's IP, for its serving certificate (repeatable)")

    r = sub.add_parser("run", help="run the node agent")
    r.add_argument("--node-name", default=socket.gethostname().lower())
    r.add_argument("--node-ip", required=True, help="the address other nodes reach us on")
    r.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    r.add_argument("--config", type=Path, default=None,
                   help="client config (default: DATA_DIR/node.conf, written by join)")
    r.add_argument("--cri-socket", default="",
                   help="attach to this containerd; default: run our own under DATA_DIR")
    r.add_argument("--netns", default=None, help="run our containerd in this network namespace")
    r.add_argument("--pod-cidr", default="",
                   help="this node's pod CIDR; default: the one node IPAM gives the Node")
    r.add_argument("--no-routes", action="store_true",
                   help="do not manage routes to other nodes' pod CIDRs (and require "
                        "--pod-cidr)")
    r.add_argument("--no-service-proxy", action="store_true",
                   help="do not keep iptables rules for Service ClusterIPs (kube-proxy's "
                        "job); also off with --no-routes")
    r.add_argument("--no-network-policy", action="store_true",
                   help="do not enforce NetworkPolicies with iptables rules; also off with "
                        "--no-routes")
    r.add_argument("--cni-bridge", default="cni0")
    r.add_argument("--no-cni-gateway", action="store_true",
                   help="do not make the bridge the pods' gateway (shared hosts)")
    r.add_argument("--sandbox-image", default="docker.io/shoal/pause:1")
    r.add_argument("--registry-mirror", dest="registry_mirrors", action="append",
                   type=_mirror, default=[], metavar="REGISTRY=URL",
                   help="pull REGISTRY's images from URL, e.g. docker.io=http://10.77.0.1:5000 "
                        "(repeatable; our own containerd only; no fallback to REGISTRY)")
    r.add_argument("--listen", default="0.0.0.0:10250")
    r.add_argument("--metrics-listen", default="127.0.0.1:10255")
    r.add_argument("--relist-interval", type=float, default=1.0)
    r.add_argument("--lease-renew-interval", type=float, default=10.0, metavar="SECONDS",
                   help="renew the node's Lease this often; keep it well below the "
                        "apiserver's --node-monitor-grace-period (default 10)")
    r.add_argument("--restart-backoff", default="10,300",
                   help="initial,cap seconds of the crash-loop back-off (default 10,300)")
    r.add_argument("--log-level", default="info")
    r.add_argument("--log-format", choices=["json", "text"], default="json")
    return p


def _run(ns: argparse.Namespace) -> int:
    from nodeagent.daemon import AgentConfig, NodeAgentDaemon

    logs.setup(level=ns.log_level, fmt=ns.log_format)
    initial, _, cap = ns.restart_backoff.partition(",")
    config = AgentConfig(
        node_name=ns.node_name, data_dir=ns.data_dir, node_ip=ns.node_ip,
        client_config=ns.config, listen=ns.listen, metrics_listen=ns.metrics_listen,
        cri_socket=ns.cri_socket, netns=ns.netns, pod_cidr=ns.pod_cidr,
        cni_bridge=ns.cni_bridge, cni_gateway=not ns.no_cni_gateway,
        sandbox_image=ns.sandbox_image, relist_interval=ns.relist_interval,
        renew_interval=ns.lease_renew_interval,
        routes=not ns.no_routes, service_proxy=not ns.no_service_proxy,
        network_policy=not ns.no_network_policy,
        registry_mirrors=tuple(ns.registry_mirrors),
        restart_backoff=(float(initial), float(cap or initial)))

    async def main() -> None:
        daemon = NodeAgentDaemon(config)
        # READY=1 to systemd (Type=notify) on the signals /readyz answers from.
        await until_stopped(sdnotify.serving(daemon.run(), daemon.readiness,
                                             status=f"node {config.node_name} ready"))

    try:
        asyncio.run(main())
    except errors.ShoalError as e:
        print(f"shoal-nodeagent: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "run":
        return _run(ns)
    try:
        result = asyncio.run(joining.join(
            server=ns.server, token=ns.token, ca_cert_hash=ns.ca_cert_hash,
            node_name=ns.node_name, data_dir=ns.data_dir, api_servers=tuple(ns.api_server),
            node_ips=tuple(ns.node_ip)))
    except errors.ShoalError as e:
        print(f"shoal-nodeagent: join failed: {e}", file=sys.stderr)
        return 1
    verb = "joined" if result.joined else "already joined"
    print(f"node {result.node_name} {verb}; certificate valid until "
          f"{result.expires:%Y-%m-%d}; config: {result.config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
