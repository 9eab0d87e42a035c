"""``shoal-nodeagent``: Shoal's kubelet.

    shoal-nodeagent join --server HOST:PORT --token T --ca-cert-hash sha256:... \\
        [--node-name N] [--data-dir /var/lib/shoal/nodeagent]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

from nodeagent import joining
from shoal import errors

DEFAULT_DATA_DIR = Path("/var/lib/shoal/nodeagent")


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
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        result = asyncio.run(joining.join(
            server=ns.server, token=ns.token, ca_cert_hash=ns.ca_cert_hash,
            node_name=ns.node_name, data_dir=ns.data_dir, api_servers=tuple(ns.api_server)))
    except errors.ShoalError as e:
        print(f"shoal-nodeagent: join failed: {e}", file=sys.stderr)
        return 1
    verb = "joined" if result.joined else "already joined"
    print(f"node {result.node_name} {verb}; certificate valid until "
          f"{result.expires:%Y-%m-%d}; config: {result.config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
