"""``shoal certs`` and ``shoal certs renew`` against a live apiserver."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from nodeagent.certrotation import EXPIRY_ANNOTATION
from shoal.api.core.v1 import core_pb2
from shoal.cli.main import main
from shoal.config import load
from shoal.testing.apiserver import InProcessAPIServer


async def _shoal(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


async def test_certs_lists_expiries_and_warns_within_30_days(
        apiserver: InProcessAPIServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A user whose certificate has 12 days left, and a node that reported 400 days.
    cfg = apiserver.user_client_config("soon", ["system:masters"],
                                       lifetime=dt.timedelta(days=12))
    path = tmp_path / "soon.conf"
    cfg.save(path)
    async with apiserver.client() as admin:
        node = core_pb2.Node()
        node.metadata.name = "certs-n1"
        node.metadata.annotations[EXPIRY_ANNOTATION] = (
            dt.datetime.now(dt.UTC) + dt.timedelta(days=300)).isoformat()
        await admin.create(node)

    code, out, err = await _shoal(capsys, "--config", str(path), "certs")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["CERTIFICATE", "SUBJECT", "EXPIRES", "STATUS"]
    you = next(line for line in lines if line.startswith("client (you)"))
    assert "CN=soon,O=system:masters" in you and "expires in 11 days" in you
    assert any(line.startswith("cluster CA") and "ok (" in line for line in lines)
    server = apiserver.client_config.servers[0]
    assert any(line.startswith(f"apiserver {server}") and "ok (" in line for line in lines)
    n1 = next(line for line in lines if line.startswith("node certs-n1"))
    assert "CN=system:node:certs-n1" in n1 and "ok (299 days)" in n1
    assert ("WARNING: client (you) (CN=soon,O=system:masters) expires in 11 days" in err)
    assert "certs-n1" not in err

    # `shoal status` shows the caller's certificate and warns the same way.
    code, out, err = await _shoal(capsys, "--config", str(path), "status")
    assert "WARNING: client (you)" in out

    # Renewal: same identity, the same lifetime from now, written into the config.
    code, out, err = await _shoal(capsys, "--config", str(path), "certs", "renew")
    assert code == 0, err
    assert "renewed the client certificate of CN=soon,O=system:masters" in out
    cert = x509.load_pem_x509_certificate(load(path).cert_pem)
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=11, hours=23) < left <= dt.timedelta(days=12)
    code, out, err = await _shoal(capsys, "--config", str(path), "certs")
    assert code == 0 and "WARNING: client (you)" in err  # 12 days is still within 30
    # The renewed config works.
    code, out, err = await _shoal(capsys, "--config", str(path), "get", "nodes")
    assert code == 0 and "certs-n1" in out
