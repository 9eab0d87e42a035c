"""The meshagent admin API end to end: ``shoal mesh ...`` and ``shoal apply
--wait-propagated`` -> the apiserver's MeshProxy -> each node's admin server
(real TLS with the serving certificate the node got at join) -> a scripted
agent (FakeAdminSource).

Two reachable "nodes" share one admin port on two loopback addresses
(127.0.0.1, 127.0.0.2); a third points at 127.0.0.3, where nothing listens.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from apiserver import pki
from meshagent import admin
from meshagent.admin import AdminServer, ConnectionRow
from meshagent.identity import CertRow
from nodeagent import joining
from shoal import errors, tokens
from shoal.api.core.v1 import core_pb2
from shoal.api.mesh.v1 import mesh_pb2 as pb
from shoal.cli.main import main
from shoal.client import AsyncClient, classify
from shoal.testing.apiserver import InProcessAPIServer, free_port
from shoal.testing.meshadmin import FakeAdminSource

CIPHER = "TLS_AES_256_GCM_SHA384"


@dataclass
class Agent:
    node: str
    ip: str
    source: FakeAdminSource
    server: AdminServer
    pki_dir: Path


@dataclass
class Mesh:
    api: InProcessAPIServer
    client: AsyncClient
    a: Agent
    b: Agent
    port: int


async def _node(client: AsyncClient, name: str, ip: str) -> None:
    node = core_pb2.Node()
    node.metadata.name = name
    await client.create(node)
    for _ in range(10):  # node IPAM writes the new Node too
        current = await client.get(core_pb2.Node, name)
        current.status.addresses.add(type="InternalIP", address=ip)
        try:
            await client.update_status(current)
            return
        except errors.Conflict:
            continue
    raise AssertionError(f"could not set the address of node {name}")


async def _agent(api: InProcessAPIServer, client: AsyncClient, *, node: str, ip: str,
                 port: int, root: Path) -> Agent:
    """Join like a node does (its serving certificate names ``ip``), then serve."""
    token = tokens.generate()
    await client.create(tokens.to_secret(token, ttl=dt.timedelta(hours=1)))
    assert api.server is not None
    data = root / node
    await joining.join(server=f"127.0.0.1:{api.server.join_port}", token=str(token),
                       ca_cert_hash=tokens.ca_cert_hash(api.client_config.ca_pem),
                       node_name=node, data_dir=data, node_ips=(ip,))
    await _node(client, node, ip)
    source = FakeAdminSource()
    server = AdminServer(source=source, node_name=node, pki_dir=data / "pki",
                         listen=f"{ip}:{port}")
    await server.start()
    return Agent(node=node, ip=ip, source=source, server=server, pki_dir=data / "pki")


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    port = free_port()
    root = tmp_path_factory.mktemp("mesh-admin")
    api = InProcessAPIServer(root / "apiserver", mesh_admin_port=port)
    async with api, api.client() as client:
        a = await _agent(api, client, node="mesh-a", ip="127.0.0.1", port=port, root=root)
        b = await _agent(api, client, node="mesh-b", ip="127.0.0.2", port=port, root=root)
        try:
            yield Mesh(api=api, client=client, a=a, b=b, port=port)
        finally:
            await a.server.close(0)
            await b.server.close(0)


@pytest.fixture
async def unreachable_node(mesh: Mesh) -> AsyncIterator[str]:
    await _node(mesh.client, "mesh-c", "127.0.0.3")
    yield "mesh-c"
    await mesh.client.delete(core_pb2.Node, "mesh-c")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def shoal(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> Any:
    async def run(*args: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(mesh.api.config_path), *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Result(code, captured.out, captured.err)

    return run


async def _revision(client: AsyncClient) -> int:
    return int((await client.list(core_pb2.Namespace)).resource_version)


def _lines(text: str) -> dict[str, str]:
    """Table rows by their first cell."""
    return {line.split()[0]: line for line in text.splitlines()[1:] if line.strip()}


def _cert(ns: str, sa: str, state: str = "VALID") -> CertRow:
    return CertRow(spiffe_id=f"spiffe://cluster.local/ns/{ns}/sa/{sa}", serial="3f2a",
                   not_after="2026-11-28T02:00:00+00:00",
                   renew_at="2026-11-27T14:00:00+00:00", state=state)


# --------------------------------------------------------------------------- access


async def test_only_the_apiserver_may_call_an_agent(mesh: Mesh) -> None:
    """A node's own client certificate (system:nodes) is refused; the admin API is
    not a way around the apiserver."""
    ca = pki.CertificateAuthority.load(mesh.api.data_dir / "pki")
    key = pki.new_key()
    cert = ca.issue(key.public_key(), common_name="system:node:mesh-b",
                    organizations=["system:nodes"], client=True)
    creds = grpc.ssl_channel_credentials(root_certificates=pki.cert_pem(ca.cert),
                                         private_key=pki.key_pem(key),
                                         certificate_chain=pki.cert_pem(cert))
    async with grpc.aio.secure_channel(f"127.0.0.1:{mesh.port}", creds) as ch:
        rpc = ch.unary_unary(f"/{admin.SERVICE}/Status",
                             request_serializer=lambda m: m.SerializeToString(),
                             response_deserializer=pb.AgentStatus.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc(pb.StatusRequest(), timeout=5)
    err = classify(e.value)
    assert isinstance(err, errors.Forbidden)
    assert "system:node:mesh-b" in err.message


async def test_a_taken_admin_port_fails_at_start(mesh: Mesh) -> None:
    server = AdminServer(source=FakeAdminSource(), node_name="mesh-a",
                         pki_dir=mesh.a.pki_dir, listen=f"127.0.0.1:{mesh.port}")
    with pytest.raises(errors.Unavailable, match="cannot listen"):
        await server.start()
    await server.close(0)


# --------------------------------------------------------------------------- status


async def test_status_shows_synced_stale_and_unreachable_nodes(
        mesh: Mesh, shoal: Any, unreachable_node: str) -> None:
    svc = core_pb2.Service()
    svc.metadata.name = f"web-{uuid.uuid4().hex[:6]}"
    svc.metadata.namespace = "default"
    svc.spec.ports.add(port=80)
    created = await mesh.client.create(svc)
    rv = int(created.metadata.resource_version)
    revision = await _revision(mesh.client)
    mesh.a.source.set_generation(revision, per_resource={"services": revision,
                                                         "endpoints": revision})
    mesh.a.source.certs = [_cert("demo", "web"), _cert("demo", "api", "PENDING")]
    mesh.a.source.pod_ips = ["10.244.1.5", "10.244.1.6"]
    mesh.b.source.set_generation(rv - 1, per_resource={"services": rv - 1})

    r = await shoal("mesh", "status")
    assert r.code == 0, r.err
    header, *_ = r.out.splitlines()
    assert header.split()[:4] == ["NODE", "GENERATION", "CLUSTER", "REVISION"]
    rows = _lines(r.out)
    assert rows["mesh-a"].split()[1] == str(revision)
    assert "SYNCED" in rows["mesh-a"]
    assert "2 (1 not valid)" in rows["mesh-a"]
    assert "STALE (1 change not applied)" in rows["mesh-b"]
    assert "UNREACHABLE: Connection refused" in rows["mesh-c"]
    assert "node mesh-c: cannot reach the meshagent at 127.0.0.3" in r.err

    r = await shoal("mesh", "status", "-o", "json")
    doc = json.loads(r.out)
    by_node = {n["node"]: n for n in doc["nodes"]}
    assert int(doc["clusterRevision"]) >= revision
    assert by_node["mesh-b"]["pendingChanges"] == "1"
    assert by_node["mesh-a"]["status"]["capturedPods"] == 2
    assert "error" in by_node["mesh-c"]


# --------------------------------------------------------------------------- certs, netfilter


async def test_certs_lists_each_agents_certificates(mesh: Mesh, shoal: Any) -> None:
    mesh.a.source.certs = [_cert("demo", "web")]
    mesh.b.source.certs = [_cert("demo", "db", "VALID (signing failing: CA unavailable)")]
    r = await shoal("mesh", "certs", "mesh-b")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0].split() == ["NODE", "SPIFFE", "ID", "SERIAL", "NOT", "AFTER",
                                             "RENEW", "AT", "STATE"]
    assert "spiffe://cluster.local/ns/demo/sa/db" in r.out
    assert "2026-11-28T02:00:00+00:00" in r.out and "signing failing" in r.out
    assert "sa/web" not in r.out

    r = await shoal("mesh", "certs", "-o", "yaml")
    doc = yaml.safe_load(r.out)
    certs = {n["node"]: [c["spiffeId"] for c in n["certificates"]] for n in doc["nodes"]}
    assert certs == {"mesh-a": ["spiffe://cluster.local/ns/demo/sa/web"],
                     "mesh-b": ["spiffe://cluster.local/ns/demo/sa/db"]}

    r = await shoal("mesh", "certs", "no-such-node")
    assert r.code == 1 and "not found" in r.err


async def test_certs_with_an_unreachable_agent_exits_1_naming_it(
        mesh: Mesh, shoal: Any, unreachable_node: str) -> None:
    mesh.a.source.certs = [_cert("demo", "web")]
    r = await shoal("mesh", "certs")
    assert r.code == 1
    assert "sa/web" in r.out
    assert "node mesh-c: cannot ask its meshagent" in r.err


async def test_netfilter_shows_wanted_current_and_drift(mesh: Mesh, shoal: Any) -> None:
    chain = "SHOAL-MESH-PREROUTING"
    rule = f"-A {chain} -s 10.244.1.5/32 -d 10.96.0.0/16 -p tcp -j REDIRECT --to-ports 15001"
    save = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", f":{chain} - [0:0]",
                      "-A PREROUTING -j SHOAL-SERVICES", f"-A PREROUTING -j {chain}",
                      "COMMIT", ""])
    mesh.a.source.netfilter = admin.netfilter_report(backend="iptables-nft", want=[rule],
                                                     save=save)
    r = await shoal("mesh", "netfilter", "mesh-a")
    assert r.code == 0, r.err
    assert "Backend:  iptables-nft" in r.out
    assert f"missing: {rule}" in r.out
    assert "not the first (before it: SHOAL-SERVICES)" in r.out

    mesh.a.source.netfilter = admin.netfilter_report(
        backend="iptables-nft", want=[rule],
        save=save.replace("-A PREROUTING -j SHOAL-SERVICES\n", "") .replace(
            "COMMIT", f"{rule}\nCOMMIT"))
    r = await shoal("mesh", "netfilter", "mesh-a", "-o", "json")
    assert json.loads(r.out)["backend"] == "iptables-nft"
    assert "drift" not in json.loads(r.out)  # none
    r = await shoal("mesh", "netfilter", "mesh-a")
    assert "Drift:    none" in r.out


# --------------------------------------------------------------------------- tls


async def _tls_fixture(mesh: Mesh) -> tuple[str, str, str]:
    """A client pod on mesh-a, a Service whose one endpoint is on mesh-b."""
    ns = f"tls-{uuid.uuid4().hex[:6]}"
    namespace = core_pb2.Namespace()
    namespace.metadata.name = ns
    await mesh.client.create(namespace)
    pod = core_pb2.Pod()
    pod.metadata.name = "client"
    pod.metadata.namespace = ns
    pod.spec.node_name = "mesh-a"
    pod.spec.containers.add(name="c", image="busybox")
    made = await mesh.client.create(pod)
    made.status.pod_ip = "10.244.1.5"
    made.status.phase = "Running"
    await mesh.client.update_status(made)
    svc = core_pb2.Service()
    svc.metadata.name = "web"
    svc.metadata.namespace = ns
    svc.spec.ports.add(port=80)
    svc = await mesh.client.create(svc)
    eps = core_pb2.Endpoints()
    eps.metadata.name = "web"
    eps.metadata.namespace = ns
    subset = eps.subsets.add()
    subset.addresses.add(ip="10.244.2.7", node_name="mesh-b")
    subset.ports.add(port=8080)
    await mesh.client.create(eps)
    return ns, svc.spec.cluster_ip, "10.244.2.7"


async def test_tls_reports_both_sides_of_a_live_connection(mesh: Mesh, shoal: Any) -> None:
    ns, cluster_ip, pod_ip = await _tls_fixture(mesh)
    client_id = f"spiffe://cluster.local/ns/{ns}/sa/default"
    server_id = f"spiffe://cluster.local/ns/{ns}/sa/web"
    mesh.a.source.conns = [
        ConnectionRow(direction="outbound", source_ip="10.244.1.5",
                      destination=f"{cluster_ip}:80", destination_service=f"{ns}/web",
                      endpoint=f"{pod_ip}:8080", mode="mTLS", source_principal=client_id,
                      peer_principal=server_id, tls_version="TLSv1.3", cipher=CIPHER,
                      bytes_sent=1200, bytes_received=4096, opened_at=1.0),
        # another pod's connection, and this pod's connection elsewhere: not shown
        ConnectionRow(direction="outbound", source_ip="10.244.1.9",
                      destination=f"{cluster_ip}:80", destination_service=f"{ns}/web",
                      mode="mTLS"),
        ConnectionRow(direction="outbound", source_ip="10.244.1.5",
                      destination="10.96.0.99:443", destination_service="other/db",
                      mode="plaintext"),
    ]
    mesh.b.source.conns = [
        ConnectionRow(direction="inbound", source_ip="10.244.1.5", destination=f"{pod_ip}:8080",
                      endpoint=f"{pod_ip}:8080", mode="mTLS", peer_principal=client_id,
                      tls_version="TLSv1.3", cipher=CIPHER),
    ]
    r = await shoal("-n", ns, "mesh", "tls", "client", "web")
    assert r.code == 0, r.err
    assert f"Live connections from pod {ns}/client (10.244.1.5 on mesh-a) to service " \
           f"{ns}/web ({cluster_ip})" in r.out
    rows = [line.split() for line in r.out.splitlines()[2:]]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("source", "mesh-a", "outbound"), ("destination", "mesh-b", "inbound")]
    source_row = r.out.splitlines()[2]
    for text in ("mTLS", "TLSv1.3", CIPHER, server_id, client_id, "1.2KiB/4.0KiB"):
        assert text in source_row
    assert "10.96.0.99" not in r.out and "10.244.1.9" not in r.out

    r = await shoal("mesh", "tls", f"{ns}/client", "web", "-o", "json")  # bad pod name
    assert r.code != 0
    r = await shoal("-n", ns, "mesh", "tls", "client", f"{ns}/web", "-o", "json")
    doc = json.loads(r.out)
    assert [c["side"] for c in doc["connections"]] == ["source", "destination"]
    assert doc["connections"][0]["peerPrincipal"] == server_id


async def test_tls_without_a_live_connection_says_so(mesh: Mesh, shoal: Any) -> None:
    ns, _, _ = await _tls_fixture(mesh)
    mesh.a.source.conns = []
    mesh.b.source.conns = []
    r = await shoal("-n", ns, "mesh", "tls", "client", "web")
    assert r.code == 1
    assert r.out == ""
    assert f"no live connection from pod {ns}/client (10.244.1.5 on mesh-a) to service " \
           f"{ns}/web" in r.err


# ---------------------------------------------------------------- apply --wait-propagated


def _configmap(name: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": name, "namespace": "default"},
                           "data": {"k": "v"}})


async def test_apply_wait_propagated_returns_once_every_agent_reports_the_change(
        mesh: Mesh, shoal: Any, tmp_path: Path) -> None:
    start = await _revision(mesh.client)
    for agent in (mesh.a, mesh.b):
        agent.source.set_generation(start, per_resource={"configmaps": start})
    name = f"cm-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "cm.yaml"
    path.write_text(_configmap(name))

    async def agents_catch_up() -> int:
        """Once the ConfigMap is written and the CLI has seen the agents behind it,
        the agents apply it."""
        while True:
            try:
                cm = await mesh.client.get(core_pb2.ConfigMap, name, namespace="default")
                break
            except errors.NotFound:
                await asyncio.sleep(0.02)
        seen = mesh.a.source.status_calls
        while mesh.a.source.status_calls < seen + 2:
            await asyncio.sleep(0.02)
        rv = int(cm.metadata.resource_version)
        for agent in (mesh.a, mesh.b):
            agent.source.set_generation(rv, per_resource={"configmaps": rv})
        return rv

    helper = asyncio.create_task(agents_catch_up())
    r = await shoal("apply", "-f", str(path), "--wait-propagated", "--timeout", "20s")
    assert r.code == 0, r.err
    await helper
    assert f"configmap/{name} created" in r.out
    assert "propagated to 2 meshagents: mesh-a, mesh-b" in r.out


async def test_apply_wait_propagated_times_out_naming_the_lagging_nodes(
        mesh: Mesh, shoal: Any, tmp_path: Path, unreachable_node: str) -> None:
    start = await _revision(mesh.client)
    mesh.a.source.set_generation(start, per_resource={"configmaps": start})
    mesh.b.source.set_generation(start + 1000)  # no per-resource view: overall counts
    name = f"cm-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "cm.yaml"
    path.write_text(_configmap(name))
    r = await shoal("apply", "-f", str(path), "--wait-propagated", "--timeout", "1s")
    assert r.code == 1
    assert f"configmap/{name} created" in r.out  # the apply itself happened
    assert "timed out after 1s" in r.err
    assert f"mesh-a (configmaps at {start}, wrote" in r.err
    assert "mesh-c (UNREACHABLE" in r.err
    assert "mesh-b (" not in r.err
    assert "confirmed by: mesh-b" in r.err
