"""Service-account tokens: issued by TokenRequest, accepted as bearer tokens on
the apiserver's certificate-less port as system:serviceaccount:<ns>:<name>, and
refused once expired, for another audience, or when the ServiceAccount (or the
bound pod) is gone."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from apiserver.serviceaccounts import Bound, make_claims
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.config import ClientConfig, in_cluster
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.waiting import eventually


@pytest.fixture
async def ns(client: AsyncClient) -> AsyncIterator[str]:
    name = f"sa-{uuid.uuid4().hex[:8]}"
    n = core_pb2.Namespace()
    n.metadata.name = name
    await client.create(n)
    yield name


def _token_client(api: InProcessAPIServer, token: str = "", token_file: str = "",
                  ) -> AsyncClient:
    """A client as a pod has it: the CA and a token, no client certificate."""
    assert api.server is not None
    cfg = ClientConfig(servers=(f"127.0.0.1:{api.server.join_port}",),
                       ca_pem=api.client_config.ca_pem, cert_pem=b"", key_pem=b"",
                       token=token, token_file=token_file, namespace="default")
    return AsyncClient(cfg, timeout=10)


async def _service_account(client: AsyncClient, ns: str, name: str) -> core_pb2.ServiceAccount:
    sa = core_pb2.ServiceAccount()
    sa.metadata.name, sa.metadata.namespace = name, ns
    return await client.create(sa)


async def _pod(client: AsyncClient, ns: str, name: str, *, node: str = "node-a",
               sa: str = "robot") -> core_pb2.Pod:
    pod = core_pb2.Pod()
    pod.metadata.name, pod.metadata.namespace = name, ns
    pod.spec.node_name = node
    pod.spec.service_account_name = sa
    c = pod.spec.containers.add()
    c.name, c.image = "main", "busybox"
    return await client.create(pod)


async def _whoami(c: AsyncClient, ns: str) -> str:
    """Who the server takes the caller for: a call that goes through, or a
    Forbidden naming the user (an authorizer may deny the SA the list)."""
    try:
        await c.list(core_pb2.ConfigMap, namespace=ns)
    except errors.Forbidden as e:
        return e.message
    return "allowed"


async def test_a_token_authenticates_as_its_service_account_until_it_is_deleted(
        apiserver: InProcessAPIServer, client: AsyncClient, ns: str) -> None:
    await _service_account(client, ns, "robot")
    issued = await client.create_token("robot", namespace=ns)
    claims_user = f"system:serviceaccount:{ns}:robot"
    assert apiserver.server is not None and apiserver.server.authn.tokens is not None
    ident = apiserver.server.authn.tokens.authenticate(issued.token)
    assert ident.user == claims_user
    assert set(ident.groups) == {"system:serviceaccounts", f"system:serviceaccounts:{ns}",
                                 "system:authenticated"}
    assert issued.expiration_timestamp.seconds > dt.datetime.now(dt.UTC).timestamp() + 3000
    async with _token_client(apiserver, issued.token) as pod_client:
        seen = await _whoami(pod_client, ns)
        assert seen == "allowed" or claims_user in seen
        # The ServiceAccount goes: the token stops working.
        await client.delete(core_pb2.ServiceAccount, "robot", namespace=ns)

        async def refused() -> str:
            try:
                await pod_client.list(core_pb2.ConfigMap, namespace=ns)
            except errors.Unauthorized as e:
                return e.message
            except errors.Forbidden:
                return ""
            return ""

        message = await eventually("the token refused", refused)
        assert "has been deleted" in message
        # A new ServiceAccount of the same name is another identity: still refused.
        await _service_account(client, ns, "robot")
        message = await eventually("the token refused for a new uid", refused)
        assert "replaced" in message


async def test_expired_and_wrong_audience_tokens_are_refused(
        apiserver: InProcessAPIServer, client: AsyncClient, ns: str) -> None:
    sa = await _service_account(client, ns, "robot")
    assert apiserver.server is not None and apiserver.server.tokens is not None
    tokens = apiserver.server.tokens
    # A token issued two hours ago for one hour, signed by this very server.
    old = make_claims(issuer=tokens.issuer, audiences=list(tokens.audiences),
                      bound=Bound(namespace=ns, name="robot", sa_uid=sa.metadata.uid),
                      now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2), lifetime=3600)
    expired = tokens.signer.sign(old)
    other = await client.create_token("robot", namespace=ns, audiences=["vault"])
    assert list(other.audiences) == ["vault"]
    for token, why in ((expired, "expired at"), (other.token, "audience"),
                       (expired[:-4] + "AAAA", "signature"), ("not-a-jwt", "not a JWT")):
        async with _token_client(apiserver, token) as c:
            with pytest.raises(errors.Unauthorized, match=why):
                await c.list(core_pb2.ConfigMap, namespace=ns)
    # A token signed by another key (another cluster) is refused too.
    from apiserver.serviceaccounts import TokenSigner

    foreign = TokenSigner.load_or_create(Path(apiserver.data_dir) / "other-sa.key")
    fresh = make_claims(issuer=tokens.issuer, audiences=list(tokens.audiences),
                        bound=Bound(namespace=ns, name="robot", sa_uid=sa.metadata.uid),
                        now=dt.datetime.now(dt.UTC), lifetime=3600)
    async with _token_client(apiserver, foreign.sign(fresh)) as c:
        with pytest.raises(errors.Unauthorized, match="does not verify"):
            await c.list(core_pb2.ConfigMap, namespace=ns)
    with pytest.raises(errors.BadRequest, match="less than 600"):
        await client.create_token("robot", namespace=ns, expiration_seconds=60)
    with pytest.raises(errors.NotFound):
        await client.create_token("nobody", namespace=ns)


async def test_a_pod_bound_token_dies_with_its_pod_and_nodes_get_tokens_only_for_their_pods(
        apiserver: InProcessAPIServer, client: AsyncClient, ns: str) -> None:
    await _service_account(client, ns, "robot")
    pod = await _pod(client, ns, "web", node="node-a")
    await _pod(client, ns, "db", node="node-b")
    async with AsyncClient(apiserver.node_client_config("node-a")) as node_a:
        issued = await node_a.create_token("robot", namespace=ns, pod="web",
                                           pod_uid=pod.metadata.uid,
                                           expiration_seconds=3607)
        with pytest.raises(errors.Forbidden, match="does not run the bound pod"):
            await node_a.create_token("robot", namespace=ns, pod="db")
        with pytest.raises(errors.Forbidden, match="only bound to a pod"):
            await node_a.create_token("robot", namespace=ns)
        # No pod of node-a runs as "default": the node authorizer refuses.
        with pytest.raises(errors.Forbidden, match="system:node:node-a"):
            await node_a.create_token("default", namespace=ns, pod="web")
    async with _token_client(apiserver, issued.token) as c:
        # A service account may not mint tokens (RBAC grants it nothing).
        with pytest.raises(errors.Forbidden, match=f"system:serviceaccount:{ns}:robot"):
            await c.create_token("robot", namespace=ns)
        await client.delete(core_pb2.Pod, "web", namespace=ns, grace_period=0)

        async def refused() -> str:
            try:
                await c.list(core_pb2.ConfigMap, namespace=ns)
            except errors.Unauthorized as e:
                return e.message
            except errors.Forbidden:
                return ""
            return ""

        message = await eventually("the pod-bound token refused", refused)
        assert "pod" in message and "web" in message


async def test_every_namespace_gets_a_default_service_account(
        client: AsyncClient, ns: str) -> None:
    async def default_sa() -> core_pb2.ServiceAccount | None:
        try:
            return await client.get(core_pb2.ServiceAccount, "default", namespace=ns)
        except errors.NotFound:
            return None

    first = await eventually("ServiceAccount default", default_sa)
    await client.delete(core_pb2.ServiceAccount, "default", namespace=ns)

    async def recreated() -> core_pb2.ServiceAccount | None:
        sa = await default_sa()
        return sa if sa is not None and sa.metadata.uid != first.metadata.uid else None

    await eventually("ServiceAccount default made again", recreated)


async def test_in_cluster_config_reads_the_mounted_token_and_follows_its_rotation(
        apiserver: InProcessAPIServer, client: AsyncClient, ns: str, tmp_path: Path) -> None:
    await _service_account(client, ns, "robot")
    mount = tmp_path / "serviceaccount"
    mount.mkdir()
    (mount / "ca.crt").write_bytes(apiserver.client_config.ca_pem)
    (mount / "namespace").write_text(ns)
    (mount / "token").write_text("stale-token")
    assert apiserver.server is not None
    cfg = in_cluster(directory=mount, environ={
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(apiserver.server.join_port)})
    assert cfg.namespace == ns and cfg.servers == (f"127.0.0.1:{apiserver.server.join_port}",)
    async with AsyncClient(cfg, timeout=10) as c:
        with pytest.raises(errors.Unauthorized):
            await c.list(core_pb2.ConfigMap)
        # The node agent rotates the file; the client picks the new token up.
        issued = await client.create_token("robot", namespace=ns)
        (mount / "token").write_text(issued.token)
        seen = await _whoami(c, ns)
        assert seen == "allowed" or f"system:serviceaccount:{ns}:robot" in seen
    with pytest.raises(errors.BadRequest, match="KUBERNETES_SERVICE_HOST"):
        in_cluster(directory=mount, environ={})


async def test_shoal_create_token_prints_a_token_that_works(
        apiserver: InProcessAPIServer, client: AsyncClient, ns: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from shoal.cli.main import main

    await _service_account(client, ns, "robot")
    pod = await _pod(client, ns, "web")

    async def cli(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(apiserver.config_path), *args])
        out = capsys.readouterr()
        return code, out.out.strip(), out.err

    code, token, _ = await cli("create", "token", "robot", "-n", ns, "--duration", "20m",
                               "--bound-object-kind", "Pod", "--bound-object-name", "web")
    assert code == 0 and token.count(".") == 2
    assert apiserver.server is not None and apiserver.server.authn.tokens is not None
    ident = apiserver.server.authn.tokens.authenticate(token)
    assert ident.user == f"system:serviceaccount:{ns}:robot"
    claims = apiserver.server.tokens.signer.verify(token)  # type: ignore[union-attr]
    assert claims["exp"] - claims["iat"] == 1200
    assert claims["kubernetes.io"]["pod"] == {"name": "web", "uid": pod.metadata.uid}
    code, _, err = await cli("create", "token", "robot", "-n", ns, "--duration", "1m")
    assert code != 0 and "600 seconds" in err
