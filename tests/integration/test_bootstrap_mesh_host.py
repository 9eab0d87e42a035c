"""``python -m shoal.bootstrap routes`` on a mesh-only host: the routes come from
the Nodes the API lists, read with the host's own node identity (node.conf)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shoal import bootstrap, errors
from shoal.api.core.v1 import core_pb2
from shoal.bootstrap import NodeSpec
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.waiting import eventually


async def _node_with_address(client: AsyncClient, name: str, ip: str) -> str:
    node = core_pb2.Node()
    node.metadata.name = name
    await client.create(node)

    async def cidr() -> str | None:
        n = await client.get(core_pb2.Node, name)
        return n.spec.pod_cidr or None

    pod_cidr = await eventually(f"{name}'s pod CIDR (node IPAM)", cidr, timeout=20)
    for _ in range(10):
        current = await client.get(core_pb2.Node, name)
        current.status.addresses.add(type="InternalIP", address=ip)
        try:
            await client.update_status(current)
            return str(pod_cidr)
        except errors.Conflict:
            continue
    raise AssertionError(f"could not set the address of node {name}")


async def test_a_mesh_only_host_routes_each_pod_cidr_through_its_node(
        apiserver: InProcessAPIServer, client: AsyncClient, tmp_path: Path) -> None:
    cidr_a = await _node_with_address(client, "mh-route-a", "192.168.56.21")
    cidr_b = await _node_with_address(client, "mh-route-b", "192.168.56.22")
    host = NodeSpec(name="meshhost-9", ip="192.168.56.109", data_dir=tmp_path,
                    api_server="127.0.0.1:1", registry="127.0.0.1:2", mesh=True,
                    mesh_host=True)
    apiserver.node_client_config("meshhost-9").save(host.node_config)

    routes = await asyncio.to_thread(bootstrap.mesh_host_routes_from_api, host)

    assert (cidr_a, "192.168.56.21") in routes and (cidr_b, "192.168.56.22") in routes
    assert routes[-1][0] == bootstrap.SERVICE_CIDR
