"""Certificate renewal against a live apiserver: a node renews its client and
serving certificates through Certificates/Renew with its current certificate
and keeps working with the new one; no one renews into another identity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from nodeagent.certrotation import EXPIRY_ANNOTATION, CertificateRotator
from shoal import certrenewal, errors
from shoal import config as configmod
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer


async def test_a_node_renews_and_keeps_working_with_the_new_certificate(
        apiserver: InProcessAPIServer, tmp_path: Path) -> None:
    old_cfg = apiserver.user_client_config("system:node:rot-1", ["system:nodes"],
                                           lifetime=dt.timedelta(days=10))
    old = x509.load_pem_x509_certificate(old_cfg.cert_pem)
    served: list[bytes] = []
    async with AsyncClient(old_cfg) as node:
        node_obj = core_pb2.Node()
        node_obj.metadata.name = "rot-1"
        await node.create(node_obj)
        rotator = CertificateRotator(client=node, data_dir=tmp_path, node_name="rot-1",
                                     node_ips=("10.0.0.5",),
                                     on_serving=lambda cert, key: served.append(cert))
        renewed = await rotator.rotate_once()

        new = x509.load_pem_x509_certificate(renewed.config.cert_pem)
        assert new.subject == old.subject
        assert new.public_key() != old.public_key()  # a fresh key
        assert new.serial_number != old.serial_number
        assert new.not_valid_after_utc >= old.not_valid_after_utc
        # Same lifetime as the certificate it replaces.
        assert (new.not_valid_after_utc - new.not_valid_before_utc) == (
            old.not_valid_after_utc - old.not_valid_before_utc)
        # Written where the agent reads them at its next start.
        saved = configmod.load(tmp_path / "node.conf")
        assert saved.cert_pem == renewed.config.cert_pem
        assert (tmp_path / "pki" / "node.crt").read_bytes() == renewed.config.cert_pem
        assert (tmp_path / "pki" / "node.key").stat().st_mode & 0o777 == 0o600
        serving = x509.load_pem_x509_certificate((tmp_path / "pki" / "serving.crt").read_bytes())
        san = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["rot-1"]
        assert served == [(tmp_path / "pki" / "serving.crt").read_bytes()]

        # The client now connects with the new certificate, and still works as the node.
        assert node.config.cert_pem == renewed.config.cert_pem
        got = await node.get(core_pb2.Node, "rot-1")
        got.metadata.labels["renewed"] = "yes"
        await node.update(got)
        with pytest.raises(errors.Forbidden):
            await node.get(core_pb2.Secret, "anything", namespace="default")
        # The agent notes the new expiry on its Node (for `shoal certs`).
        await rotator.publish_expiry()
        noted = (await node.get(core_pb2.Node, "rot-1")).metadata.annotations
        assert noted[EXPIRY_ANNOTATION] == new.not_valid_after_utc.isoformat()
    # A fresh client from the saved config works too.
    async with AsyncClient(configmod.load(tmp_path / "node.conf")) as again:
        assert (await again.get(core_pb2.Node, "rot-1")).metadata.labels["renewed"] == "yes"


async def test_a_user_renews_only_into_the_identity_it_has(
        apiserver: InProcessAPIServer) -> None:
    async with AsyncClient(apiserver.user_client_config("carol", ["devs"])) as carol:
        renewed = await certrenewal.renew(carol)
        cert = x509.load_pem_x509_certificate(renewed.config.cert_pem)
        assert cert.subject.rfc4514_string() == "CN=carol,O=devs"

        # A CSR for someone else (another name, or an extra group) is refused.
        other = apiserver.user_client_config("mallory", ["system:masters"])
        from shoal.api.certificates.v1 import certificates_pb2 as pb
        rpc = carol.channel.unary_unary(
            certrenewal.RENEW_METHOD, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.JoinResponse.FromString)
        from shoal.client import classify
        with pytest.raises(errors.Forbidden, match="must keep the caller's identity"):
            try:
                await rpc(pb.JoinRequest(csr_pem=certrenewal.csr_like(
                    other.cert_pem, certrenewal.new_key())))
            except Exception as e:  # grpc error -> Shoal's
                raise classify(e) from e  # type: ignore[arg-type]
        # A user cannot get a node serving certificate.
        with pytest.raises(errors.Forbidden, match="only a node"):
            await certrenewal.renew(carol, serving_csr_pem=certrenewal.csr_like(
                renewed.config.cert_pem, certrenewal.new_key()))


async def test_the_node_api_presents_a_renewed_serving_certificate(tmp_path: Path) -> None:
    """The agent's API server swaps in a renewed serving certificate for new
    handshakes, without a restart."""
    import asyncio
    import socket
    import ssl

    import grpc

    from apiserver import pki
    from nodeagent.daemon import AgentConfig, NodeAgentDaemon

    ca = pki.CertificateAuthority.create()
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    (pki_dir / "ca.crt").write_bytes(pki.cert_pem(ca.cert))

    def serving(cn: str) -> tuple[bytes, bytes]:
        key = pki.new_key()
        cert = ca.issue(key.public_key(), common_name=cn, ips=["127.0.0.1"], server=True)
        return pki.cert_pem(cert), pki.key_pem(key)

    first_cert, first_key = serving("system:node:first")
    (pki_dir / "serving.crt").write_bytes(first_cert)
    (pki_dir / "serving.key").write_bytes(first_key)
    client_key = pki.new_key()
    client_cert = ca.issue(client_key.public_key(), common_name="admin",
                           organizations=["system:masters"], client=True)
    (tmp_path / "client.crt").write_bytes(pki.cert_pem(client_cert))
    (tmp_path / "client.key").write_bytes(pki.key_pem(client_key))

    class _API:
        def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
            return grpc.method_handlers_generic_handler("test.Nothing", {})

    daemon = NodeAgentDaemon(AgentConfig(node_name="n", data_dir=tmp_path, node_ip="127.0.0.1",
                                         listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"))
    daemon._serve_api(_API())  # type: ignore[arg-type]
    assert daemon.grpc_server is not None
    await daemon.grpc_server.start()

    def presented() -> str:
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ctx.check_hostname = False
        ctx.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
        with socket.create_connection(("127.0.0.1", daemon.api_port), timeout=5) as raw, \
                ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()

    try:
        assert await asyncio.to_thread(presented) == "CN=system:node:first"
        second_cert, second_key = serving("system:node:second")
        daemon._serving_renewed(second_cert, second_key)
        assert await asyncio.to_thread(presented) == "CN=system:node:second"
        assert await asyncio.to_thread(presented) == "CN=system:node:second"
    finally:
        await daemon.grpc_server.stop(0)
