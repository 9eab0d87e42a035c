"""Hollow meshagents for ``bench/mesh_propagation_bench.py``: one process hosting
``--count`` agents, each running the real agent's config pipeline and nothing else.

    python bench/hollow_meshagent.py --config NODE.conf [--config NODE2.conf ...]
        --count 25 --first 0 --host web.NS.svc.cluster.local --port 80

Each hollow agent is a real :class:`meshagent.daemon.MeshAgent` (constructed, never
started): its own ``AsyncClient`` (its own gRPC channel and TLS connection to the
apiserver, with a node's credentials, agent ``i`` taking ``--config`` number
``i % len(configs)``), its ten informers (Pods, Services, Endpoints, Namespaces,
PeerAuthentications, AuthorizationPolicies, ServiceEntries, WorkloadEntries,
VirtualServices, DestinationRules) listing and watching as the agent's do, and its
handlers scheduling the L4 and L7 rebuilds as the agent's do (``meshagent.rebuilding``:
one rebuild per burst, ``rebuild_delay`` after its first event; the L7 one is
``RouteTable.update`` and ``Clusters.update`` over the caches, the HTTP service
ports). When an L7 rebuild that follows a VirtualService event has run, the hollow
agent looks the route up for ``--host``:``--port`` (what the real agent's next
request reads) and prints

    APPLIED <agent> <VirtualService resourceVersion> <subsets routed to> <CLOCK_MONOTONIC s>

Left out: the listeners and the data path, capture (iptables), workload
certificates (no local pods), DNS, the admin and monitoring servers, tracing.

It prints ``SYNCED <agent>`` once an agent's informers have listed, and ``READY``
when all have.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshagent.daemon import MeshAgent, MeshConfig  # noqa: E402
from meshagent.l7 import routes as l7routes  # noqa: E402
from shoal import config as configmod  # noqa: E402
from shoal.client import AsyncClient  # noqa: E402


def say(text: str) -> None:
    print(text, flush=True)


class Hollow:
    def __init__(self, index: int, config: Path, host: str, port: int) -> None:
        self.index, self.host, self.port = index, host, port
        self.client = AsyncClient(configmod.load(config))
        self.agent = MeshAgent(MeshConfig(node_name=f"hollow-{index}", client_config=config,
                                          admin_listen="", metrics_listen="127.0.0.1:0"),
                               self.client)
        # After the agent's own handlers (they schedule the L7 rebuild).
        vs = self.agent.virtual_services
        vs.add_handlers(on_add=self._changed, on_update=lambda _o, n: self._changed(n),
                        on_delete=self._changed)
        self.agent.l7_tables.on_built(self._rebuilt)
        self.request = l7routes.Request(method="GET", path="/", authority=host, port=port)
        self._seen: object | None = None  # the last VirtualService event not yet rebuilt

    def _changed(self, obj: object) -> None:
        if self.agent.synced.is_set():
            self._seen = obj

    def _rebuilt(self) -> None:
        obj, self._seen = self._seen, None
        if obj is None:
            return
        table = self.agent.l7_routes()
        action = table.route(self.request, self.host, self.port)
        subsets = ",".join(f"{d.subset or '-'}:{d.weight}" for d in action.destinations)
        rv = getattr(getattr(obj, "metadata", None), "resource_version", "") or "0"
        say(f"APPLIED {self.index} {rv} {subsets} {time.monotonic():.6f}")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for inf in self.agent.informers():
                tg.create_task(inf.run())
            for inf in self.agent.informers():
                await inf.synced.wait()
            self.agent.mark_synced()  # the first rebuild; later ones as events come
            say(f"SYNCED {self.index}")


async def main_async(args: argparse.Namespace) -> None:
    hollows = [Hollow(args.first + i, args.config[(args.first + i) % len(args.config)],
                      args.host, args.port) for i in range(args.count)]
    tasks = [asyncio.create_task(h.run()) for h in hollows]

    async def all_synced() -> None:
        for h in hollows:
            await h.agent.synced.wait()
        gc.collect()
        gc.freeze()
        say("READY")

    tasks.append(asyncio.create_task(all_synced()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        for h in hollows:
            with contextlib.suppress(Exception):
                await h.client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, action="append", required=True,
                   help="a node's client config (node.conf); repeat for several")
    p.add_argument("--count", type=int, default=25)
    p.add_argument("--first", type=int, default=0, help="index of the first agent")
    p.add_argument("--host", required=True, help="FQDN whose routing is reported")
    p.add_argument("--port", type=int, default=80)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
