"""A mesh-only host (node identity system:node:<host>, no pods) gets workload
certificates for the WorkloadEntries labelled shoal.dev/mesh-host: <host>, and only
while they name it; it cannot read Secrets a WorkloadEntry would never need."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from apiserver import pki
from meshagent.identity import GrpcSigner, IdentityManager, LocalKeys
from shoal import errors
from shoal.api.traffic.v1 import traffic_pb2
from shoal.client import AsyncClient
from shoal.config import ClientConfig
from shoal.testing.apiserver import InProcessAPIServer


@pytest.fixture
async def mesh_host(apiserver: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    ca = pki.CertificateAuthority.load(apiserver.data_dir / "pki")
    key = pki.new_key()
    cn = "system:node:vm-1"
    cert = ca.issue(key.public_key(), common_name=cn, organizations=["system:nodes"],
                    client=True)
    cfg = ClientConfig(servers=apiserver.client_config.servers, ca_pem=pki.cert_pem(ca.cert),
                       cert_pem=pki.cert_pem(cert), key_pem=pki.key_pem(key), user=cn)
    async with AsyncClient(cfg) as c:
        yield c


async def test_mesh_host_gets_only_its_workload_entries_identities(
        client: AsyncClient, namespace: str, mesh_host: AsyncClient) -> None:
    def manager() -> IdentityManager:
        return IdentityManager(signer=GrpcSigner(mesh_host.channel), keys=LocalKeys())

    with pytest.raises(errors.Unavailable, match="runs no pod"):
        await manager().get(namespace, "legacy")
    we = traffic_pb2.WorkloadEntry()
    we.metadata.namespace, we.metadata.name = namespace, "vm"
    we.metadata.labels["shoal.dev/mesh-host"] = "vm-1"
    we.spec.address, we.spec.service_account = "10.77.0.100", "legacy"
    we.spec.labels["app"] = "legacy"
    created = await client.create(we)

    cert = await manager().get(namespace, "legacy")
    assert str(cert.spiffe_id) == f"spiffe://cluster.local/ns/{namespace}/sa/legacy"
    # Another service account, or the entry naming another host: refused.
    with pytest.raises(errors.Unavailable, match="runs no pod"):
        await manager().get(namespace, "default")
    created.metadata.labels["shoal.dev/mesh-host"] = "vm-2"
    await client.update(created)
    with pytest.raises(errors.Unavailable, match="runs no pod"):
        await manager().get(namespace, "legacy")
