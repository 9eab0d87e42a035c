"""The node's side of pod networking: CNI config from our pod CIDR, routes to
everyone else's.

The apiserver's node IPAM gives each Node a ``spec.podCIDR``. This loop watches
Nodes and keeps, in the node's network namespace:

- the CNI bridge config for our own CIDR (written once it is known; until then
  the runtime reports NetworkReady=false and the Node is not Ready);
- one route per other Node: ``<its podCIDR> via <its InternalIP>``, tagged with
  our own route protocol number so we touch only routes we made. Routes are
  added as Nodes come, replaced when an address changes, removed when a Node
  goes, and put back if someone flushes them (a periodic reconcile).

``plan_routes`` is pure; ``IPRoutes`` is the small wrapper over ``ip route``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from nodeagent.network import cni_config, write_cni_config
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.informer import Informer
from shoal.queueing import wait_set

log = logging.getLogger(__name__)

ROUTE_PROTO = 77  # "proto 77" marks the routes this agent owns
RECONCILE_SECONDS = 10.0


def internal_ip(node: Any) -> str:
    return next((a.address for a in node.status.addresses if a.type == "InternalIP"), "")


def plan_routes(nodes: Iterable[Any], *, self_name: str) -> dict[str, str]:
    """podCIDR -> next hop, for every other Node that has both."""
    out: dict[str, str] = {}
    for n in nodes:
        if n.metadata.name == self_name or n.metadata.HasField("deletion_timestamp"):
            continue
        ip = internal_ip(n)
        for cidr in {n.spec.pod_cidr, *n.spec.pod_cidrs}:
            if cidr and ip:
                out[cidr] = ip
    return out


class Routes(Protocol):
    def current(self) -> dict[str, str]: ...

    def replace(self, cidr: str, via: str) -> None: ...

    def delete(self, cidr: str) -> None: ...


class IPRoutes:
    """Routes through iproute2 in the current network namespace."""

    def _ip(self, *args: str) -> str:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                           check=False)
        if r.returncode != 0:
            raise errors.InternalError(f"ip {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def current(self) -> dict[str, str]:
        data = json.loads(self._ip("-j", "route", "show", "proto", str(ROUTE_PROTO)) or "[]")
        return {r["dst"]: r.get("gateway", "") for r in data if "dst" in r}

    def replace(self, cidr: str, via: str) -> None:
        self._ip("route", "replace", cidr, "via", via, "proto", str(ROUTE_PROTO))

    def delete(self, cidr: str) -> None:
        self._ip("route", "del", cidr, "proto", str(ROUTE_PROTO))


def reconcile_routes(routes: Routes, desired: dict[str, str]) -> list[str]:
    """Make ``routes`` equal ``desired``; returns what was done, for the log."""
    have = routes.current()
    done = []
    for cidr, via in sorted(desired.items()):
        if have.get(cidr) != via:
            routes.replace(cidr, via)
            done.append(f"+{cidr} via {via}")
    for cidr in sorted(set(have) - set(desired)):
        routes.delete(cidr)
        done.append(f"-{cidr}")
    return done


class PodNetwork:
    def __init__(self, *, client: AsyncClient, node_name: str, cni_conf_dir: Path,
                 cni_data_dir: Path, bridge: str = "cni0", gateway: bool = True,
                 fixed_pod_cidr: str = "", routes: Routes | None = None) -> None:
        self.node_name = node_name
        self.cni_conf_dir = cni_conf_dir
        self.cni_data_dir = cni_data_dir
        self.bridge = bridge
        self.gateway = gateway
        self.fixed_pod_cidr = fixed_pod_cidr
        self.routes = routes or IPRoutes()
        self.pod_cidr = ""
        self.cni_ready = asyncio.Event()
        self.nodes: Informer[core_pb2.Node] = Informer(client, core_pb2.Node)
        self._changed = asyncio.Event()
        self.nodes.add_handlers(on_add=lambda n: self._changed.set(),
                                on_update=lambda o, n: self._changed.set(),
                                on_delete=lambda n: self._changed.set())
        if fixed_pod_cidr:
            self._write_cni(fixed_pod_cidr)

    def _write_cni(self, cidr: str) -> None:
        if write_cni_config(self.cni_conf_dir, cni_config(
                pod_cidr=cidr, bridge=self.bridge, gateway=self.gateway,
                data_dir=self.cni_data_dir)):
            log.info("CNI config written for pod CIDR %s", cidr)
        self.pod_cidr = cidr
        self.cni_ready.set()

    async def sync(self) -> None:
        """One level-triggered pass over the informer's Nodes. The routes are read
        and changed with ``ip`` from a worker thread: the agent's loop does not
        wait on the child (the Nodes are read here, on the loop)."""
        nodes = self.nodes.list()
        me = next((n for n in nodes if n.metadata.name == self.node_name), None)
        own = self.fixed_pod_cidr or (me.spec.pod_cidr if me is not None else "")
        if own and own != self.pod_cidr:
            self._write_cni(own)
        done = await asyncio.to_thread(reconcile_routes, self.routes,
                                       plan_routes(nodes, self_name=self.node_name))
        if done:
            log.info("pod routes: %s", ", ".join(done))

    async def run(self) -> None:
        informer = asyncio.create_task(self.nodes.run(), name="node-informer")
        try:
            await self.nodes.synced.wait()
            while True:
                try:
                    await self.sync()
                except errors.ShoalError as e:
                    log.warning("pod network: %s", e)
                self._changed.clear()
                await wait_set(self._changed, RECONCILE_SECONDS)
        finally:
            informer.cancel()
