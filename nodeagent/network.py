"""The node's pod network: a CNI bridge + host-local config from the pod CIDR.

``cni_config(...)`` builds the conflist containerd's CRI plugin reads: the
``bridge`` plugin (pods' veths on one Linux bridge) with ``host-local`` IPAM
over the node's pod CIDR, then ``portmap`` for hostPorts. ``ipMasq`` is always
off: Shoal never NATs pod traffic out through the machine's uplink.
``isGateway`` gives the bridge the CIDR's first address and makes it the pods'
default route (on a node with its own network namespace, as in the lab); a
shared host keeps it off and gives the bridge its address itself.

``write_cni_config`` writes it atomically and only when it changed.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from shoal.files import write_atomic

CONFLIST_NAME = "10-shoal.conflist"


def cni_config(*, pod_cidr: str, bridge: str = "cni0", gateway: bool = True,
               data_dir: Path | None = None, mtu: int = 1500) -> dict[str, Any]:
    net = ipaddress.ip_network(pod_cidr, strict=True)
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
    }
    if gateway:
        ipam["routes"] = [{"dst": "0.0.0.0/0"}]
    if data_dir is not None:
        ipam["dataDir"] = str(data_dir)
    return {
        "cniVersion": "0.4.0",
        "name": "shoal",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": gateway, "ipMasq": False,
             "hairpinMode": True, "mtu": mtu, "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write_cni_config(conf_dir: Path, config: dict[str, Any]) -> bool:
    """Write the conflist; True when it changed."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / CONFLIST_NAME
    data = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == data:
        return False
    write_atomic(path, data.encode())
    return True
