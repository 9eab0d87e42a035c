"""Joining a node: bootstrap tokens, CSR checks, pinned CA, idempotent rejoin."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent import joining
from shoal import errors, tokens
from shoal.api.certificates.v1 import certificates_pb2 as pb
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient, classify
from shoal.config import load
from shoal.testing.apiserver import InProcessAPIServer


def _join_address(api: InProcessAPIServer) -> str:
    assert api.server is not None
    return f"127.0.0.1:{api.server.join_port}"


async def _token(client: AsyncClient, *, ttl: dt.timedelta | None = dt.timedelta(hours=1),
                 signing: bool = True) -> tokens.Token:
    token = tokens.generate()
    secret = tokens.to_secret(token, ttl=ttl)
    if not signing:
        del secret.data["usage-bootstrap-signing"]
    await client.create(secret)
    return token


def _hash(api: InProcessAPIServer) -> str:
    return tokens.ca_cert_hash(api.client_config.ca_pem)


async def test_join_gives_a_working_node_identity_and_rejoin_is_idempotent(
        apiserver: InProcessAPIServer, client: AsyncClient, tmp_path: Path) -> None:
    token = await _token(client)
    result = await joining.join(server=_join_address(apiserver), token=str(token),
                                ca_cert_hash=_hash(apiserver), node_name="node-a",
                                data_dir=tmp_path, api_servers=(f"127.0.0.1:{apiserver.port}",))
    assert result.joined
    cfg = load(result.config_path)
    cert = x509.load_pem_x509_certificate(cfg.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "system:node:node-a"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == \
        "system:nodes"
    key_before = (tmp_path / "pki" / "node.key").read_bytes()
    async with AsyncClient(cfg) as node_client:
        assert (await node_client.version()).version
    again = await joining.join(server=_join_address(apiserver), token="zzzzzz.zzzzzzzzzzzzzzzz",
                               ca_cert_hash=_hash(apiserver), node_name="node-a",
                               data_dir=tmp_path)
    assert not again.joined  # kept the valid identity; the bogus token was never sent
    # A forced rejoin (expiring soon) keeps the same key.
    later = await joining.join(server=_join_address(apiserver), token=str(token),
                               ca_cert_hash=_hash(apiserver), node_name="node-a",
                               data_dir=tmp_path,
                               now=dt.datetime.now(dt.UTC) + dt.timedelta(days=340))
    assert later.joined
    assert (tmp_path / "pki" / "node.key").read_bytes() == key_before


@pytest.mark.parametrize("case", ["expired", "revoked", "no-signing-usage", "unknown"])
async def test_bad_tokens_are_refused_and_sign_nothing(
        apiserver: InProcessAPIServer, client: AsyncClient, tmp_path: Path, case: str) -> None:
    if case == "expired":
        token = tokens.generate()
        await client.create(tokens.to_secret(
            token, ttl=dt.timedelta(hours=1),
            now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)))
        match = "expired"
    elif case == "revoked":
        token = await _token(client)
        await client.delete(core_pb2.Secret, token.secret_name, namespace=tokens.NAMESPACE)
        match = "not found"
    elif case == "no-signing-usage":
        token = await _token(client, signing=False)
        match = "may not be used for signing"
    else:
        token = tokens.generate()
        match = "not found"
    with pytest.raises(errors.Unauthorized, match=match):
        await joining.join(server=_join_address(apiserver), token=str(token),
                           ca_cert_hash=_hash(apiserver), node_name="node-x",
                           data_dir=tmp_path)
    assert not (tmp_path / "node.conf").exists()


async def test_wrong_ca_pin_is_refused_before_anything_is_sent(
        apiserver: InProcessAPIServer, client: AsyncClient, tmp_path: Path) -> None:
    token = await _token(client)
    with pytest.raises(errors.Forbidden, match="did not present a CA matching"):
        await joining.join(server=_join_address(apiserver), token=str(token),
                           ca_cert_hash="sha256:" + "0" * 64, node_name="node-x",
                           data_dir=tmp_path)


async def test_csr_for_another_identity_is_refused(apiserver: InProcessAPIServer,
                                                   client: AsyncClient) -> None:
    token = await _token(client)
    key = ec.generate_private_key(ec.SECP256R1())
    creds = grpc.ssl_channel_credentials(root_certificates=apiserver.client_config.ca_pem)
    async with grpc.aio.secure_channel(_join_address(apiserver), creds) as ch:
        rpc = ch.unary_unary("/shoal.certificates.v1.Certificates/Join",
                             request_serializer=lambda m: m.SerializeToString(),
                             response_deserializer=pb.JoinResponse.FromString)

        async def attempt(csr: bytes, node: str) -> errors.ShoalError:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rpc(pb.JoinRequest(token=str(token), csr_pem=csr, node_name=node))
            return classify(e.value)

        # A CSR for node-a sent as node-b: refused.
        err = await attempt(joining.csr_for(key, "node-a"), "node-b")
        assert isinstance(err, errors.Forbidden) and "CN=system:node:node-b" in err.message
        err = await attempt(b"not a csr", "node-a")
        assert isinstance(err, errors.BadRequest)
        err = await attempt(joining.csr_for(key, "Bad_Name"), "Bad_Name")
        assert isinstance(err, errors.BadRequest) and "invalid node name" in err.message


async def test_join_port_serves_nothing_else_without_a_certificate(
        apiserver: InProcessAPIServer) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=apiserver.client_config.ca_pem)
    from shoal.api.resources.v1 import resources_pb2

    async with grpc.aio.secure_channel(_join_address(apiserver), creds) as ch:
        rpc = ch.unary_unary("/shoal.resources.v1.Resources/List",
                             request_serializer=lambda m: m.SerializeToString(),
                             response_deserializer=resources_pb2.ListResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc(resources_pb2.ListRequest(resource="secrets", namespace="kube-system"))
        assert isinstance(classify(e.value), errors.Unauthorized)


async def test_tokens_made_and_revoked_with_the_cli_work_then_stop_working(
        apiserver: InProcessAPIServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`shoal token create` gives a token a node can join with; after `shoal token
    delete` the same token is refused; one created already expired is refused."""
    import asyncio

    from shoal.cli.main import main

    async def cli(*args: str) -> str:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(apiserver.config_path), *args])
        out = capsys.readouterr().out
        assert code == 0, out
        return out.strip()

    async def join(token: str, node: str) -> joining.JoinResult:
        return await joining.join(server=_join_address(apiserver), token=token,
                                  ca_cert_hash=_hash(apiserver), node_name=node,
                                  data_dir=tmp_path / node)

    token = await cli("token", "create", "--ttl", "1h")
    assert (await join(token, "node-cli-a")).joined
    await cli("token", "delete", token.split(".")[0])
    with pytest.raises(errors.Unauthorized, match="not found"):
        await join(token, "node-cli-b")
    assert not (tmp_path / "node-cli-b" / "node.conf").exists()
    # A token past its expiration is refused.
    expired = tokens.generate()
    async with apiserver.client() as c:
        await c.create(tokens.to_secret(expired, ttl=dt.timedelta(minutes=5),
                                        now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)))
    with pytest.raises(errors.Unauthorized, match="expired"):
        await join(str(expired), "node-cli-c")
