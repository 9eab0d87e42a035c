"""Workload certificates from the apiserver's mesh CA, and mTLS with them.

A node gets a certificate only for the service accounts of pods bound to it;
the certificate verifies against the trust bundle, carries the SPIFFE ID and
lives 24 h; two workloads handshake TLS 1.3 and see each other's IDs; a forged
or expired certificate is refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from apiserver import pki
from apiserver.workloadcerts import issue_workload
from meshagent import identity, keygen
from meshagent.identity import GrpcSigner, IdentityManager, WorkloadCert
from shoal import errors, spiffe
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.config import ClientConfig
from shoal.testing.apiserver import InProcessAPIServer


def _client_config(api: InProcessAPIServer, cn: str, orgs: list[str]) -> ClientConfig:
    ca = pki.CertificateAuthority.load(api.data_dir / "pki")
    key = pki.new_key()
    cert = ca.issue(key.public_key(), common_name=cn, organizations=orgs, client=True)
    return ClientConfig(servers=api.client_config.servers, ca_pem=pki.cert_pem(ca.cert),
                        cert_pem=pki.cert_pem(cert), key_pem=pki.key_pem(key), user=cn)


@pytest.fixture
async def node_a(apiserver: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(_client_config(apiserver, "system:node:node-a",
                                          ["system:nodes"])) as c:
        yield c


async def _pod(client: AsyncClient, namespace: str, name: str, *, node: str,
               service_account: str = "", phase: str = "") -> None:
    pod = core_pb2.Pod()
    pod.metadata.name = name
    pod.metadata.namespace = namespace
    pod.spec.node_name = node
    pod.spec.service_account_name = service_account
    c = pod.spec.containers.add()
    c.name = "app"
    c.image = "busybox"
    created = await client.create(pod)
    if phase:
        created.status.phase = phase
        await client.update_status(created)


def _issued_by(leaf: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _csr(uris: list[str], *, key: ec.EllipticCurvePrivateKey | None = None,
         dns: tuple[str, ...] = ()) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def test_a_node_gets_certificates_for_its_own_workloads_only(
        client: AsyncClient, namespace: str, node_a: AsyncClient) -> None:
    await _pod(client, namespace, "web", node="node-a", service_account="web")
    await _pod(client, namespace, "plain", node="node-a")  # runs as "default"
    await _pod(client, namespace, "other", node="node-b", service_account="other")
    await _pod(client, namespace, "done", node="node-a", service_account="batch",
               phase="Succeeded")
    manager = IdentityManager(signer=GrpcSigner(node_a.channel))

    cert = await manager.get(namespace, "web")
    assert str(cert.spiffe_id) == f"spiffe://cluster.local/ns/{namespace}/sa/web"
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    assert keygen.spiffe_ids_of(leaf) == [str(cert.spiffe_id)]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == \
        dt.timedelta(hours=24, minutes=1)  # 24 h from now, backdated a minute for skew
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    # It chains to a root in the trust bundle.
    roots = x509.load_pem_x509_certificates(manager.roots_pem)
    assert any(_issued_by(leaf, r) for r in roots)
    assert (await manager.get(namespace, "default")).spiffe_id.service_account == "default"

    for sa, why in (("other", "runs no pod"), ("ghost", "runs no pod"),
                    ("batch", "runs no pod")):
        with pytest.raises(errors.Unavailable, match=why):
            await IdentityManager(signer=GrpcSigner(node_a.channel)).get(namespace, sa)
    with pytest.raises(errors.Forbidden, match="node 'node-a' runs no pod"):
        await GrpcSigner(node_a.channel).sign(
            csr_pem=_csr([f"spiffe://cluster.local/ns/{namespace}/sa/other"]),
            namespace=namespace, service_account="other")


@pytest.mark.parametrize("case,match", [
    ("wrong-san", "exactly one URI SAN"),
    ("two-sans", "exactly one URI SAN"),
    ("no-san", "has no SAN"),
    ("extra-dns", "may name only the SPIFFE URI"),
    ("bad-signature", "signature does not verify"),
    ("not-pem", "not a PEM certificate request"),
    ("p384", "ECDSA P-256"),
    ("bad-namespace", "invalid namespace"),
])
async def test_bad_csrs_are_refused_naming_the_problem(
        client: AsyncClient, namespace: str, node_a: AsyncClient, case: str,
        match: str) -> None:
    await _pod(client, namespace, "web", node="node-a", service_account="web")
    want = f"spiffe://cluster.local/ns/{namespace}/sa/web"
    ns = namespace
    if case == "wrong-san":
        csr = _csr([f"spiffe://cluster.local/ns/{namespace}/sa/admin"])
    elif case == "two-sans":
        csr = _csr([want, f"spiffe://cluster.local/ns/{namespace}/sa/admin"])
    elif case == "no-san":
        csr = _csr([])
    elif case == "extra-dns":
        csr = _csr([want], dns=("web.example",))
    elif case == "bad-signature":
        good = x509.load_pem_x509_csr(_csr([want]))
        der = bytearray(good.public_bytes(serialization.Encoding.DER))
        der[-3] ^= 0xFF  # inside the signature
        import base64
        body = base64.encodebytes(bytes(der))
        csr = b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + \
            b"-----END CERTIFICATE REQUEST-----\n"
    elif case == "not-pem":
        csr = b"hello"
    elif case == "p384":
        csr = _csr([want], key=ec.generate_private_key(ec.SECP384R1()))
    else:
        csr, ns = _csr([want]), "Not_A_Namespace"
    with pytest.raises(errors.BadRequest, match=match):
        await GrpcSigner(node_a.channel).sign(csr_pem=csr, namespace=ns,
                                              service_account="web")


async def test_callers_that_are_not_nodes_are_refused(
        apiserver: InProcessAPIServer, client: AsyncClient, namespace: str) -> None:
    await _pod(client, namespace, "web", node="node-a", service_account="web")
    csr = _csr([f"spiffe://cluster.local/ns/{namespace}/sa/web"])
    for cn, orgs in (("jane", ["developers"]), ("system:node:node-a", []),
                     ("system:serviceaccount:x:y", ["system:serviceaccounts"])):
        async with AsyncClient(_client_config(apiserver, cn, orgs)) as c:
            with pytest.raises(errors.Forbidden, match=f'User "{cn}" cannot create resource '
                               '"serviceaccounts/workloadcertificate"'):
                await GrpcSigner(c.channel).sign(csr_pem=csr, namespace=namespace,
                                                 service_account="web")
    # The admin (system:masters) may, for tools and tests.
    signed = await GrpcSigner(client.channel).sign(csr_pem=csr, namespace=namespace,
                                                   service_account="web")
    assert signed.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")


# -- mTLS between two workloads over loopback ---------------------------------------


async def _serve(cert: WorkloadCert, roots: bytes, seen: list[str]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        peer = identity.peer_spiffe_id(obj)
        seen.append(str(peer))
        writer.write(f"{obj.version()} {peer}\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0,
                                      ssl=identity.tls_context(cert, roots, server=True))


async def _talk(port: int, cert: WorkloadCert, roots: bytes) -> tuple[str, str]:
    """(what the server said, the server's SPIFFE ID as the client verified it)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=identity.tls_context(cert, roots, server=False))
    try:
        server_id = str(identity.peer_spiffe_id(writer.get_extra_info("ssl_object")))
        line = await asyncio.wait_for(reader.readline(), 10)
        return line.decode().strip(), server_id
    finally:
        writer.close()


def _handmade(ca: pki.CertificateAuthority, ident: str, *, now: dt.datetime) -> WorkloadCert:
    key = ec.generate_private_key(ec.SECP256R1())
    sid = spiffe.parse(ident)
    cert = issue_workload(ca, key.public_key(), sid, now=now,
                          lifetime=dt.timedelta(hours=24))
    return WorkloadCert(
        spiffe_id=sid, chain_pem=pki.cert_pem(cert), key_pem=pki.key_pem(key),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(), serial=cert.serial_number)


async def test_mutual_tls_between_workloads_and_forged_or_expired_certs_refused(
        apiserver: InProcessAPIServer, client: AsyncClient, namespace: str,
        node_a: AsyncClient, tmp_path: Path) -> None:
    await _pod(client, namespace, "web", node="node-a", service_account="web")
    await _pod(client, namespace, "shop", node="node-a", service_account="shop")
    manager = IdentityManager(signer=GrpcSigner(node_a.channel))
    web = await manager.get(namespace, "web")
    shop = await manager.get(namespace, "shop")
    roots = manager.roots_pem
    seen: list[str] = []
    server = await _serve(web, roots, seen)
    port = server.sockets[0].getsockname()[1]
    try:
        said, server_id = await _talk(port, shop, roots)
        assert said == f"TLSv1.3 {shop.spiffe_id}"  # the server saw the client's ID
        assert server_id == str(web.spiffe_id)  # and the client the server's

        forged_ca = pki.CertificateAuthority.create("shoal-ca")  # same name, other key
        now = dt.datetime.now(dt.UTC)
        forged = _handmade(forged_ca, str(shop.spiffe_id), now=now)
        real_ca = pki.CertificateAuthority.load(apiserver.data_dir / "pki")
        expired = _handmade(real_ca, str(shop.spiffe_id), now=now - dt.timedelta(days=2))
        for bad in (forged, expired):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError,
                                AssertionError)):
                said, _ = await _talk(port, bad, roots)
                assert said, "the server closed without answering"
        assert seen == [str(shop.spiffe_id)]  # neither reached the server's handler

        # And a client refuses a server with a forged certificate.
        fake_server = await _serve(_handmade(forged_ca, str(web.spiffe_id), now=now),
                                   roots, seen)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await _talk(fake_server.sockets[0].getsockname()[1], shop, roots)
        finally:
            fake_server.close()
    finally:
        server.close()


async def test_trust_bundle_holds_extra_roots_for_rotation(
        apiserver: InProcessAPIServer, node_a: AsyncClient) -> None:
    signer = GrpcSigner(node_a.channel)
    before = x509.load_pem_x509_certificates(await signer.trust_bundle())
    assert len(before) == 1
    new_root = pki.CertificateAuthority.create("shoal-mesh-ca-2")
    extra = apiserver.data_dir / "pki" / "mesh-trust-bundle.pem"
    extra.write_bytes(pki.cert_pem(new_root.cert))
    try:
        after = x509.load_pem_x509_certificates(await signer.trust_bundle())
        assert [c.subject for c in after] == [before[0].subject, new_root.cert.subject]
    finally:
        extra.unlink()


async def test_root_rotation_without_an_outage(
        apiserver: InProcessAPIServer, client: AsyncClient, namespace: str,
        node_a: AsyncClient) -> None:
    """The documented procedure: publish the new root, switch signing, retire the old."""
    await _pod(client, namespace, "web", node="node-a", service_account="web")
    await _pod(client, namespace, "shop", node="node-a", service_account="shop")
    pki_dir = apiserver.data_dir / "pki"
    old_root = (pki_dir / "ca.crt").read_bytes()
    new = pki.CertificateAuthority.create("shoal-mesh-ca-2")
    extra = pki_dir / "mesh-trust-bundle.pem"
    # Agents refetch the bundle on every refresh_due (bundle_interval=0).
    web_agent = IdentityManager(signer=GrpcSigner(node_a.channel), bundle_interval=0)
    shop_agent = IdentityManager(signer=GrpcSigner(node_a.channel), bundle_interval=0)
    web = await web_agent.get(namespace, "web")  # from the old root
    try:
        # 1-2. Publish the new root; agents pick it up.
        extra.write_bytes(pki.cert_pem(new.cert))
        await web_agent.refresh_due()
        assert len(x509.load_pem_x509_certificates(web_agent.roots_pem)) == 2
        # 3. Switch signing, keeping the old root published.
        (pki_dir / "mesh-ca.key").write_bytes(pki.key_pem(new.key))
        (pki_dir / "mesh-ca.crt").write_bytes(pki.cert_pem(new.cert))
        extra.write_bytes(old_root + pki.cert_pem(new.cert))
        shop = await shop_agent.get(namespace, "shop")  # from the new root
        leaf = x509.load_pem_x509_certificate(shop.chain_pem)
        assert leaf.issuer == new.cert.subject
        await web_agent.refresh_due()
        both = web_agent.roots_pem
        assert len(x509.load_pem_x509_certificates(both)) == 2
        # Old and new certificates talk to each other, both ways.
        seen: list[str] = []
        server = await _serve(web, both, seen)
        try:
            said, _ = await _talk(server.sockets[0].getsockname()[1], shop, both)
            assert said == f"TLSv1.3 {shop.spiffe_id}"
        finally:
            server.close()
        server = await _serve(shop, both, seen)
        try:
            said, _ = await _talk(server.sockets[0].getsockname()[1], web, both)
            assert said == f"TLSv1.3 {web.spiffe_id}"
        finally:
            server.close()
        # 4. Retire the old root (after a certificate lifetime): the bundle holds the
        # new root only, and a certificate from the old root is no longer accepted.
        extra.unlink()
        await shop_agent.refresh_due()
        assert x509.load_pem_x509_certificates(shop_agent.roots_pem) == [new.cert]
        server = await _serve(shop, shop_agent.roots_pem, seen)
        try:
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError,
                                AssertionError)):
                said, _ = await _talk(server.sockets[0].getsockname()[1], web,
                                      shop_agent.roots_pem)
                assert said, "the server closed without answering"
        finally:
            server.close()
    finally:
        for name in ("mesh-ca.key", "mesh-ca.crt", "mesh-trust-bundle.pem"):
            (pki_dir / name).unlink(missing_ok=True)
