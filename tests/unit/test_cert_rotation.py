"""Certificate rotation timing (fake clock) and expiry warnings."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from apiserver import pki
from nodeagent.certrotation import CertificateRotator, plan_rotation
from shoal import certrenewal, errors
from shoal.config import ClientConfig

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _cert(*, days: float) -> bytes:
    """A certificate valid from (about) now for ``days``."""
    ca = pki.CertificateAuthority.create()
    key = pki.new_key()
    cert = ca.issue(key.public_key(), common_name="system:node:n1",
                    organizations=["system:nodes"], client=True,
                    lifetime=dt.timedelta(days=days))
    return pki.cert_pem(cert)


@pytest.mark.parametrize(("elapsed", "renew"), [
    (0.0, False),
    (0.5, False),
    (0.79, False),
    (0.8, True),
    (0.95, True),
    (1.5, True),  # expired already: renew at once (the server refuses if it is too late)
])
def test_a_node_renews_once_the_fraction_of_its_lifetime_has_passed(
        elapsed: float, renew: bool) -> None:
    pem = _cert(days=100)
    info = certrenewal.CertInfo.of(pem)
    now = info.not_before + (info.not_after - info.not_before) * elapsed
    plan = plan_rotation(pem, now=now, fraction=0.8)
    assert plan.renew is renew
    if not renew:
        due = info.not_before + (info.not_after - info.not_before) * 0.8
        assert plan.wait == pytest.approx((due - now).total_seconds())


def test_the_fraction_is_jittered_between_70_and_90_percent() -> None:
    rng = random.Random(7)
    fractions = [certrenewal.jittered_fraction(rng) for _ in range(200)]
    assert min(fractions) >= 0.7 and max(fractions) <= 0.9
    assert max(fractions) - min(fractions) > 0.1


@pytest.mark.parametrize(("left", "warning"), [
    (dt.timedelta(days=90), ""),
    (dt.timedelta(days=31), ""),
    (dt.timedelta(days=30), "expires in 30 days"),
    (dt.timedelta(days=12, hours=3), "expires in 12 days"),
    (dt.timedelta(hours=5), "expires in 5 hours"),
    (dt.timedelta(minutes=20), "expires in 20 minutes"),
    (-dt.timedelta(days=3), "EXPIRED 3 days ago"),
])
def test_expiry_warnings_start_30_days_before(left: dt.timedelta, warning: str) -> None:
    info = certrenewal.CertInfo(subject="CN=x", not_before=T0 - dt.timedelta(days=300),
                                not_after=T0 + left)
    assert info.warning(T0) == warning


def test_a_renewal_csr_keeps_the_subject() -> None:
    from cryptography import x509

    pem = _cert(days=10)
    csr = x509.load_pem_x509_csr(certrenewal.csr_like(pem, certrenewal.new_key()))
    assert csr.subject == x509.load_pem_x509_certificate(pem).subject



class _Stop(Exception):
    pass


async def test_the_loop_waits_until_due_then_keeps_the_cert_and_backs_off_on_failure(
        tmp_path: Path) -> None:
    """run(): sleeps until due (fake clock); a failed renewal changes nothing and is
    retried after a growing back-off; then the renewal succeeds."""
    pem = _cert(days=10 / 24)  # ten hours
    info = certrenewal.CertInfo.of(pem)
    now = [info.not_before]
    slept: list[float] = []
    attempts: list[dt.datetime] = []
    outcomes = ["fail", "fail", "ok"]
    client: Any = SimpleNamespace(config=ClientConfig(servers=("x:1",), ca_pem=b"",
                                                      cert_pem=pem, key_pem=b""))

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += dt.timedelta(seconds=seconds)

    class Rotator(CertificateRotator):
        async def publish_expiry(self) -> None:
            self._published = "noted"

        async def rotate_once(self) -> certrenewal.Renewed:
            attempts.append(now[0])
            if not outcomes:
                raise _Stop
            if outcomes.pop(0) == "fail":
                raise errors.Unavailable("apiserver down", retry_after=1.0)
            self.rotations += 1
            return certrenewal.Renewed(config=self.client.config)

    rotator = Rotator(client=client, data_dir=tmp_path, node_name="n1",
                      clock=lambda: now[0], sleep=sleep, rng=random.Random(1))
    with pytest.raises(_Stop):
        await rotator.run()
    lifetime = info.not_after - info.not_before
    first = attempts[0] - info.not_before
    assert lifetime * 0.7 <= first <= lifetime * 0.9
    assert all(s <= 3600.0 for s in slept[:-2])  # wakes at least hourly while waiting
    assert 8.0 <= (attempts[1] - attempts[0]).total_seconds() <= 12.0
    assert 16.0 <= (attempts[2] - attempts[1]).total_seconds() <= 24.0
    assert rotator.rotations == 1
    assert client.config.cert_pem == pem  # the failures changed nothing
