"""Certificates in the real lab: every node agent reports its client
certificate's expiry (``shoal certs``), nothing is close to expiry, and
admission leaves the lab's own images alone (its list is empty)."""

from __future__ import annotations

from typing import Any

from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for

Cluster = Any  # tests/e2e/conftest.py's Cluster (conftest modules are not importable)


def test_shoal_certs_shows_every_node_and_no_warnings(cluster: Cluster) -> None:
    nodes = [n.metadata.name for n in cluster.client.list(core_pb2.Node).items]
    assert nodes

    def reported() -> Any:
        r = cluster.shoal("certs")
        assert r.returncode == 0, r.stderr
        rows = {line.split()[1]: line for line in r.stdout.splitlines()
                if line.startswith("node ")}
        return r if all(n in rows and "ok (" in rows[n] for n in nodes) else None

    r = wait_for("every node's certificate expiry in shoal certs", reported, timeout=60.0,
                 interval=2.0)
    assert "WARNING" not in r.stderr
    assert any(line.startswith("cluster CA") for line in r.stdout.splitlines())
    assert any(line.startswith("apiserver ") and "ok (" in line
               for line in r.stdout.splitlines()), r.stdout
