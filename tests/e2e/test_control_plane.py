"""End to end: a real etcd, `shoal-apiserver` as a process, the `shoal` command.

The apiserver is killed (-9) and restarted under a live watch; the watch must
go on with no event lost or repeated.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient, WatchEvent
from shoal.config import load
from shoal.testing.apiserver import APIServerProcess
from shoal.testing.etcd import EtcdServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def control_plane(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[APIServerProcess]:
    proc = APIServerProcess(tmp_path_factory.mktemp("cp"), etcd_endpoint=etcd.endpoint)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def shoal(cp: APIServerProcess, *args: str, stdin: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOAL_CONFIG": str(cp.config_path)}
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", *args], env=env,
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_cli_applies_upstream_style_manifests(control_plane: APIServerProcess,
                                              repo_root: Path) -> None:
    r = shoal(control_plane, "apply", "-f", str(repo_root / "examples" / "hello.yaml"))
    assert r.returncode == 0, r.stderr
    assert "namespace/hello created" in r.stdout
    assert "deployment.apps/web created" in r.stdout
    again = shoal(control_plane, "apply", "-f", str(repo_root / "examples" / "hello.yaml"))
    assert again.returncode == 0 and "deployment.apps/web unchanged" in again.stdout
    got = shoal(control_plane, "get", "deploy", "web", "-n", "hello", "-o", "json")
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["apiVersion"] == "apps/v1" and doc["spec"]["replicas"] == 3
    table = shoal(control_plane, "get", "ns")
    assert table.stdout.splitlines()[0].split() == ["NAME", "STATUS", "AGE"]
    assert any(line.startswith("hello ") for line in table.stdout.splitlines())


def test_cli_bad_manifest_changes_nothing(control_plane: APIServerProcess) -> None:
    manifest = """
apiVersion: v1
kind: ConfigMap
metadata: {name: first, namespace: default}
data: {a: b}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken, namespace: default}
spec:
  replicas: -1
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec: {containers: [{name: c, image: i, ports: [{containerPort: 70000}]}]}
"""
    r = shoal(control_plane, "apply", "-f", "-", stdin=manifest)
    assert r.returncode == 2
    assert "document 2" in r.stderr and "containerPort" in r.stderr
    missing = shoal(control_plane, "get", "cm", "first", "-n", "default")
    assert missing.returncode == 1 and "NotFound" in missing.stderr


def test_cli_cannot_reach_server_exits_3(control_plane: APIServerProcess,
                                         tmp_path: Path) -> None:
    cfg = load(control_plane.config_path)
    dead = tmp_path / "dead.conf"
    dead.write_text(cfg.to_yaml().replace(cfg.servers[0], "127.0.0.1:1"))
    env = {**os.environ, "SHOAL_CONFIG": str(dead)}
    r = subprocess.run([sys.executable, "-m", "shoal.cli.main", "get", "ns",
                        "--request-timeout", "3"], env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr


async def test_watch_survives_apiserver_kill_9(control_plane: APIServerProcess) -> None:
    seen: list[WatchEvent[Any]] = []
    ns = "e2e-kill"
    async with AsyncClient(load(control_plane.config_path)) as c:
        namespace = core_pb2.Namespace()
        namespace.metadata.name = ns
        await c.create(namespace)
        start = await c.list(core_pb2.ConfigMap, namespace=ns)

        async def collect() -> None:
            async for ev in c.watch(core_pb2.ConfigMap, namespace=ns,
                                    resource_version=start.resource_version):
                seen.append(ev)

        task = asyncio.create_task(collect())

        async def create(i: int) -> None:
            cm = core_pb2.ConfigMap()
            cm.metadata.name = f"cm-{i:02d}"
            cm.metadata.namespace = ns
            await c.create(cm)

        for i in range(5):
            await create(i)
        await asyncio.to_thread(control_plane.kill)
        await asyncio.to_thread(control_plane.start)
        for i in range(5, 10):
            await create(i)
        async with asyncio.timeout(30):
            while len(seen) < 10:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        task.cancel()
    names = [e.object.metadata.name for e in seen if e.object is not None]
    assert names == [f"cm-{i:02d}" for i in range(10)]
    assert all(e.type == "ADDED" for e in seen)
