"""``shoal cordon``, ``uncordon`` and ``drain`` against a live in-process apiserver.

The test plays the node agent: its pods carry the agent's finalizer, and a
small loop finishes each deletion (removes the finalizer) the way the agent
does after stopping the containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.main import main
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace

AGENT_FINALIZER = "shoal.dev/nodeagent"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def shoal(apiserver: InProcessAPIServer, capsys: pytest.CaptureFixture[str]) -> Any:
    async def run(*args: str) -> Result:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(apiserver.config_path), *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Result(code, captured.out, captured.err)
    return run


@pytest.fixture
async def c(apiserver: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(apiserver, "drain") as client:
        yield client


async def make_node(c: AsyncClient) -> str:
    n = core_pb2.Node()
    n.metadata.name = f"node-{uuid.uuid4().hex[:8]}"
    await c.create(n)
    return n.metadata.name


async def make_pod(c: AsyncClient, name: str, node: str, *, owner: str = "ReplicaSet",
                   grace: int | None = None) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.metadata.finalizers.append(AGENT_FINALIZER)
    if owner:
        p.metadata.owner_references.add(api_version="apps/v1", kind=owner, name="owner",
                                         uid=str(uuid.uuid4()), controller=True)
    p.spec.node_name = node
    p.spec.containers.add(name="c", image="busybox")
    if grace is not None:
        p.spec.termination_grace_period_seconds = grace
    return await c.create(p)


@contextlib.asynccontextmanager
async def agent(c: AsyncClient, node: str, graces: dict[str, int]) -> AsyncIterator[None]:
    """Finish deletions on ``node``; record each pod's deletion grace period."""
    async def loop() -> None:
        while True:
            got = await c.list(core_pb2.Pod, field_selector=f"spec.nodeName={node}")
            for p in got.items:
                if p.metadata.HasField("deletion_timestamp") and \
                        AGENT_FINALIZER in p.metadata.finalizers:
                    graces[p.metadata.name] = p.metadata.deletion_grace_period_seconds
                    p.metadata.finalizers.remove(AGENT_FINALIZER)
                    with contextlib.suppress(errors.Conflict, errors.NotFound):
                        await c.update(p)
            await asyncio.sleep(0.05)
    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_cordon_and_uncordon(shoal: Any, c: AsyncClient) -> None:
    node = await make_node(c)
    r = await shoal("cordon", node)
    assert (r.code, r.out) == (0, f"node/{node} cordoned\n")
    assert (await c.get(core_pb2.Node, node)).spec.unschedulable
    r = await shoal("cordon", node)
    assert r.out == f"node/{node} already cordoned\n"
    r = await shoal("uncordon", node)
    assert (r.code, r.out) == (0, f"node/{node} uncordoned\n")
    assert not (await c.get(core_pb2.Node, node)).spec.unschedulable
    r = await shoal("uncordon", node)
    assert r.out == f"node/{node} already uncordoned\n"
    r = await shoal("cordon", "no-such-node")
    assert r.code == 1 and "NotFound" in r.err


async def test_drain_refuses_unmanaged_and_daemon_pods_and_changes_nothing(
        shoal: Any, c: AsyncClient) -> None:
    node = await make_node(c)
    await make_pod(c, "bare", node, owner="")
    await make_pod(c, "daemon", node, owner="DaemonSet")
    await make_pod(c, "web", node)
    r = await shoal("drain", node)
    assert r.code == 2
    ns = c.namespace
    assert f'unable to drain node "{node}": cannot delete Pods that declare no controller ' \
           f"(use --force to override): {ns}/bare" in r.err
    assert "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): " \
           f"{ns}/daemon" in r.err
    assert not (await c.get(core_pb2.Node, node)).spec.unschedulable
    web = await c.get(core_pb2.Pod, "web")
    assert not web.metadata.HasField("deletion_timestamp")


async def test_drain_evicts_with_each_pods_grace_and_waits(shoal: Any, c: AsyncClient) -> None:
    node = await make_node(c)
    await make_pod(c, "web-1", node, grace=7)
    await make_pod(c, "web-2", node)
    await make_pod(c, "bare", node, owner="")
    await make_pod(c, "daemon", node, owner="DaemonSet")
    graces: dict[str, int] = {}
    async with agent(c, node, graces):
        r = await shoal("drain", node, "--ignore-daemonsets", "--force")
    assert r.code == 0, r.err
    ns = c.namespace
    lines = r.out.splitlines()
    assert lines[0] == f"node/{node} cordoned"
    assert lines[-1] == f"node/{node} drained"
    for name in ("bare", "web-1", "web-2"):
        assert f"evicting pod {ns}/{name}" in lines
        assert f"pod/{name} evicted" in lines
        assert lines.index(f"evicting pod {ns}/{name}") < lines.index(f"pod/{name} evicted")
    assert f"Warning: ignoring DaemonSet-managed Pods: {ns}/daemon" in r.err
    assert graces == {"web-1": 7, "web-2": 30, "bare": 30}
    left = await c.list(core_pb2.Pod, field_selector=f"spec.nodeName={node}")
    assert [p.metadata.name for p in left.items] == ["daemon"]
    assert (await c.get(core_pb2.Node, node)).spec.unschedulable
    r = await shoal("uncordon", node)
    assert r.code == 0 and not (await c.get(core_pb2.Node, node)).spec.unschedulable


async def test_drain_grace_period_flag_and_timeout(shoal: Any, c: AsyncClient) -> None:
    node = await make_node(c)
    await make_pod(c, "stuck", node, grace=60)
    # No agent finishes the deletion: the drain gives up after --timeout.
    r = await shoal("drain", node, "--grace-period", "3", "--timeout", "1s")
    assert r.code == 1
    assert f"still terminating: {c.namespace}/stuck" in r.err
    stuck = await c.get(core_pb2.Pod, "stuck")
    assert stuck.metadata.deletion_grace_period_seconds == 3
