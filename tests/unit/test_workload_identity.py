"""Workload identity logic: SPIFFE IDs, node authorization, rotation and back-off.

The CA is a real in-memory one (pure crypto, no server); time is a fake clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from apiserver.authz.access import Chain, MastersAuthorizer
from apiserver.authz.attributes import Attributes
from apiserver.authz.nodegraph import NodeGraph, PodRefs
from apiserver.authz.nodes import NodeAuthorizer
from apiserver.pki import CertificateAuthority, Identity, cert_pem
from apiserver.workloadcerts import check_csr, issue_workload
from meshagent import identity, keygen
from meshagent.identity import IdentityManager, LocalKeys, Signed
from shoal import errors, spiffe
from shoal.backoff import Backoff

HOUR = 3600.0
T0 = 1_800_000_000.0


# -- SPIFFE IDs ----------------------------------------------------------------------


def test_spiffe_id_round_trip() -> None:
    sid = spiffe.parse("spiffe://cluster.local/ns/shop/sa/web-frontend")
    assert sid == spiffe.SpiffeId("cluster.local", "shop", "web-frontend")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/web-frontend"


@pytest.mark.parametrize("uri,match", [
    ("https://cluster.local/ns/a/sa/b", "must start with spiffe://"),
    ("spiffe://cluster.local:443/ns/a/sa/b", "port or user info"),
    ("spiffe://me@cluster.local/ns/a/sa/b", "port or user info"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "lowercase letters"),
    ("spiffe:///ns/a/sa/b", "trust domain is empty"),
    ("spiffe://cluster.local", "/ns/<namespace>/sa/<service account>"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "/ns/<namespace>/sa/<service account>"),
    ("spiffe://cluster.local/sa/b/ns/a", "/ns/<namespace>/sa/<service account>"),
    ("spiffe://cluster.local/ns/A_B/sa/b", "invalid namespace 'A_B'"),
    ("spiffe://cluster.local/ns/a/sa/", "invalid service account ''"),
])
def test_bad_spiffe_ids_say_what_is_wrong(uri: str, match: str) -> None:
    with pytest.raises(spiffe.InvalidSpiffeId, match=match):
        spiffe.parse(uri)


# -- node authorization (pure): the mesh CA asks the node authorizer -----------------

NODE_A = Identity(user="system:node:a", groups=("system:nodes",))
WANT = spiffe.SpiffeId("cluster.local", "shop", "web")


def _pod(namespace: str, node: str, sa: str, phase: str) -> PodRefs:
    return PodRefs(namespace=namespace, name=f"p-{node}-{sa}-{phase}", node=node,
                   service_account=sa or "default", phase=phase, refs=frozenset())


def _may_sign(caller: Identity, want: spiffe.SpiffeId, pods: list[PodRefs]) -> bool:
    graph = NodeGraph()
    graph.replace(pods)
    chain = Chain([MastersAuthorizer(), NodeAuthorizer(lambda: graph)])
    attrs = Attributes(user=caller.user, groups=caller.groups, verb="create",
                       resource="serviceaccounts", subresource="workloadcertificate",
                       namespace=want.namespace, name=want.service_account)
    return chain.authorize(attrs).allowed


@pytest.mark.parametrize("caller,pods,allowed", [
    (NODE_A, [_pod("shop", "a", "web", "Running")], True),
    (NODE_A, [_pod("shop", "a", "web", "Pending")], True),
    (NODE_A, [_pod("shop", "b", "web", "Running")], False),  # other node
    (NODE_A, [_pod("other", "a", "web", "Running")], False),  # other namespace
    (NODE_A, [_pod("shop", "a", "api", "Running")], False),  # other SA
    (NODE_A, [_pod("shop", "a", "web", "Succeeded")], False),  # finished
    (NODE_A, [_pod("shop", "a", "web", "Failed")], False),
    (NODE_A, [], False),
    (Identity(user="system:node:a", groups=()), [_pod("shop", "a", "web", "")], False),
    (Identity(user="bob", groups=("dev",)), [_pod("shop", "a", "web", "")], False),
    (Identity(user="admin", groups=("system:masters",)), [], True),
])
def test_node_authorization(caller: Identity, pods: list[PodRefs], allowed: bool) -> None:
    assert _may_sign(caller, WANT, pods) is allowed


def test_default_service_account_when_the_pod_names_none() -> None:
    assert _may_sign(NODE_A, spiffe.SpiffeId("cluster.local", "shop", "default"),
                     [_pod("shop", "a", "", "Running")])


def test_the_csr_the_agent_makes_is_what_the_ca_accepts() -> None:
    key_pem, csr = keygen.make_csr(WANT)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert check_csr(csr, WANT).public_key() == key.public_key()
    with pytest.raises(errors.BadRequest, match="exactly one URI SAN"):
        check_csr(csr, spiffe.SpiffeId("cluster.local", "shop", "api"))


# -- the manager with a fake clock and a scripted CA -----------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class ScriptedCA:
    """Signs with a real CA at the fake clock's time; ``fail`` scripts errors."""

    def __init__(self, clock: FakeClock, lifetime: float = 24 * HOUR) -> None:
        self.ca = CertificateAuthority.create()
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.fail: list[errors.ShoalError] = []
        self.wrong_identity = False

    async def sign(self, *, csr_pem: bytes, namespace: str,
                   service_account: str) -> Signed:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        csr = x509.load_pem_x509_csr(csr_pem)
        sid = spiffe.SpiffeId("cluster.local", namespace,
                              "other" if self.wrong_identity else service_account)
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        cert = issue_workload(self.ca, csr.public_key(), sid,  # type: ignore[arg-type]
                              now=now + dt.timedelta(minutes=1),  # no backdating here
                              lifetime=dt.timedelta(seconds=self.lifetime - 60))
        return Signed(chain_pem=cert_pem(cert), roots_pem=cert_pem(self.ca.cert))

    async def trust_bundle(self) -> bytes:
        return cert_pem(self.ca.cert)


def _manager(**kw: Any) -> tuple[IdentityManager, ScriptedCA, FakeClock]:
    clock = FakeClock()
    ca = ScriptedCA(clock)
    mgr = IdentityManager(signer=ca, clock=clock, keys=LocalKeys(),
                          backoff=lambda: Backoff(base=1.0, cap=8.0, jitter=0.0), **kw)
    return mgr, ca, clock


async def test_rotation_at_half_life() -> None:
    mgr, ca, clock = _manager(bundle_interval=1e9)
    first = await mgr.get("shop", "web")
    assert (first.not_before, first.not_after) == (T0, T0 + 24 * HOUR)
    assert first.renew_at == T0 + 12 * HOUR
    assert mgr.roots_pem == cert_pem(ca.ca.cert)
    assert await mgr.get("shop", "web") is first and ca.calls == 1  # cached

    assert await mgr.refresh_due() == T0 + 12 * HOUR  # bundle fetched, cert not due
    clock.now = T0 + 12 * HOUR - 1
    await mgr.refresh_due()
    assert ca.calls == 1
    clock.now = T0 + 12 * HOUR
    assert await mgr.refresh_due() == T0 + 24 * HOUR
    second = await mgr.get("shop", "web")
    assert ca.calls == 2 and second.serial != first.serial
    assert second.key_pem != first.key_pem  # a fresh key per certificate


async def test_failed_renewal_keeps_the_valid_cert_and_backs_off() -> None:
    mgr, ca, clock = _manager(bundle_interval=1e9)
    first = await mgr.get("shop", "web")
    clock.now = first.renew_at
    ca.fail = [errors.Unavailable("apiserver down")] * 5
    delays = []
    for _ in range(5):
        nxt = await mgr.refresh_due()
        delays.append(nxt - clock.now)
        assert await mgr.get("shop", "web") is first  # still served
        clock.now = nxt
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # exponential, capped
    rows = identity.certificate_rows(mgr)
    assert rows[0].state == "VALID (signing failing: apiserver down)"
    assert await mgr.refresh_due() == clock.now + 12 * HOUR  # recovered: next half-life
    renewed = await mgr.get("shop", "web")
    assert renewed.serial != first.serial
    # Success reset the back-off: the next failure waits the base delay again.
    clock.now = renewed.renew_at
    ca.fail = [errors.Unavailable("down again")]
    assert await mgr.refresh_due() == clock.now + 1.0


async def test_no_certificate_yet_raises_and_waits_out_the_backoff() -> None:
    mgr, ca, clock = _manager()
    ca.fail = [errors.Forbidden("node 'a' runs no pod ...")]
    with pytest.raises(errors.Unavailable, match="runs no pod"):
        await mgr.get("shop", "web")
    with pytest.raises(errors.Unavailable):
        await mgr.get("shop", "web")
    assert ca.calls == 1  # the second get did not hammer the CA
    assert identity.certificate_rows(mgr)[0].state.startswith("PENDING (signing failing")
    clock.now += 1.0
    assert (await mgr.get("shop", "web")).spiffe_id == WANT


async def test_expired_certificate_is_not_served() -> None:
    mgr, ca, clock = _manager()
    first = await mgr.get("shop", "web")
    clock.now = first.not_after + 1
    ca.fail = [errors.Unavailable("down")]
    with pytest.raises(errors.Unavailable, match="down"):
        await mgr.get("shop", "web")
    assert identity.certificate_rows(mgr)[0].state == "EXPIRED (signing failing: down)"


async def test_concurrent_gets_share_one_signing() -> None:
    mgr, ca, _ = _manager()
    a, b = await asyncio.gather(mgr.get("shop", "web"), mgr.get("shop", "web"))
    assert a is b and ca.calls == 1


async def test_a_certificate_for_another_identity_is_not_accepted() -> None:
    mgr, ca, _ = _manager()
    ca.wrong_identity = True
    with pytest.raises(errors.Unavailable, match="names"):
        await mgr.get("shop", "web")


async def test_forget_and_rows() -> None:
    mgr, _, _ = _manager()
    web = await mgr.get("shop", "web")
    await mgr.get("shop", "api")
    rows = identity.certificate_rows(mgr)
    assert [r.spiffe_id for r in rows] == ["spiffe://cluster.local/ns/shop/sa/api",
                                           "spiffe://cluster.local/ns/shop/sa/web"]
    assert rows[1].serial == f"{web.serial:x}"
    assert rows[1].not_after == "2027-01-16T08:00:00+00:00"
    assert rows[1].state == "VALID"
    mgr.forget("shop", "api")
    assert [r.spiffe_id for r in identity.certificate_rows(mgr)] == [
        "spiffe://cluster.local/ns/shop/sa/web"]


# -- peer identity -----------------------------------------------------------------


class FakeSSL:
    def __init__(self, cert: dict[str, Any] | None) -> None:
        self.cert = cert

    def getpeercert(self) -> dict[str, Any] | None:
        return self.cert


@pytest.mark.parametrize("peer,result", [
    ({"subjectAltName": (("URI", "spiffe://cluster.local/ns/shop/sa/web"),)},
     "spiffe://cluster.local/ns/shop/sa/web"),
    ({"subjectAltName": (("DNS", "web"), ("URI", "spiffe://cluster.local/ns/shop/sa/web"))},
     "spiffe://cluster.local/ns/shop/sa/web"),
    (None, "presented no certificate"),
    ({"subjectAltName": (("DNS", "web"),)}, r"one SPIFFE ID, not \[\]"),
    ({"subjectAltName": (("URI", "spiffe://cluster.local/ns/a/sa/b"),
                         ("URI", "spiffe://cluster.local/ns/a/sa/c"))}, "one SPIFFE ID"),
    ({"subjectAltName": (("URI", "spiffe://cluster.local/ns/a"),)}, "must have the path"),
])
def test_peer_spiffe_id(peer: dict[str, Any] | None, result: str) -> None:
    if result.startswith("spiffe://"):
        assert str(identity.peer_spiffe_id(FakeSSL(peer))) == result
    else:
        with pytest.raises(identity.PeerIdentityError, match=result):
            identity.peer_spiffe_id(FakeSSL(peer))


# -- the key helper process -----------------------------------------------------------


async def test_the_helper_process_makes_keys_and_refuses_a_foreign_certificate() -> None:
    """What the agent runs: ``python -m meshagent.keygen``, one step per process."""
    keys = identity.HelperKeys()
    key_pem, csr = await keys.new(WANT)
    ca = CertificateAuthority.create()
    leaf = issue_workload(ca, check_csr(csr, WANT).public_key(), WANT,  # type: ignore[arg-type]
                          now=dt.datetime.now(dt.UTC), lifetime=dt.timedelta(hours=24))
    cert = await keys.accept(Signed(chain_pem=cert_pem(leaf), roots_pem=b""), key_pem, WANT)
    assert cert.serial == leaf.serial_number and cert.spiffe_id == WANT
    assert (cert.not_before, cert.not_after) == (leaf.not_valid_before_utc.timestamp(),
                                                 leaf.not_valid_after_utc.timestamp())
    other_key, _ = await keys.new(WANT)
    with pytest.raises(errors.InternalError, match="not for our key"):
        await keys.accept(Signed(chain_pem=cert_pem(leaf), roots_pem=b""), other_key, WANT)


def test_the_meshagent_does_not_load_cryptography() -> None:
    """9 MB of the agent's memory: key work happens in the helper process."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, meshagent.main, meshagent.daemon; "
         "print(sorted(m for m in sys.modules if m.startswith('cryptography')))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
