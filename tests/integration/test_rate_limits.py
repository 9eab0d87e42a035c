"""Per-user rate limits against a live apiserver (real TLS, certificates per user)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from apiserver.ratelimit import RateLimits
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.api.resources.v1 import resources_pb2 as pb
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer

GET = "/shoal.resources.v1.Resources/Get"


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[InProcessAPIServer]:
    # One call a second after a burst of three, for users; nodes get their own class.
    limits = RateLimits(qps=1.0, burst=3, node_qps=1.0, node_burst=6)
    async with InProcessAPIServer(tmp_path, rate_limits=limits) as api:
        yield api


async def _raw_get(c: AsyncClient) -> grpc.StatusCode:
    """One Get as raw gRPC: the status code the server answered with."""
    rpc = c.channel.unary_unary(GET, request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=pb.ObjectResponse.FromString)
    try:
        await rpc(pb.GetRequest(resource="configmaps", namespace="default", name="x"),
                  timeout=5)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            trailers = dict(e.trailing_metadata() or ())
            assert trailers["retry-after"] == "1"
            status = meta_pb2.Status.FromString(trailers["shoal-status-bin"])
            assert status.reason == "TooManyRequests"
            assert status.details.retry_after_seconds == 1
            assert "too many requests from user" in (e.details() or "")
            assert "retry after 1s" in (e.details() or "")
        return e.code()
    return grpc.StatusCode.OK


async def test_one_user_is_limited_while_others_are_not(limited: InProcessAPIServer) -> None:
    alice = AsyncClient(limited.user_client_config("alice", ["devs"]))
    bob = AsyncClient(limited.user_client_config("bob"))
    node = AsyncClient(limited.user_client_config("system:node:n1", ["system:nodes"]))
    admin = AsyncClient(limited.client_config)
    try:
        codes = [await _raw_get(alice) for _ in range(5)]
        # The burst is answered (alice may not read: PERMISSION_DENIED), then refused.
        assert codes[:3] == [grpc.StatusCode.PERMISSION_DENIED] * 3
        assert codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        # bob has a bucket of his own; a node a larger one; the admin is exempt.
        assert await _raw_get(bob) == grpc.StatusCode.PERMISSION_DENIED
        assert [await _raw_get(node) for _ in range(6)] == [
            grpc.StatusCode.PERMISSION_DENIED] * 6
        for _ in range(20):
            with pytest.raises(errors.NotFound):
                await admin.get(core_pb2.ConfigMap, "x", namespace="default")
    finally:
        for c in (alice, bob, node, admin):
            await c.close()


async def test_the_sdk_waits_out_the_limit_or_says_why(limited: InProcessAPIServer) -> None:
    # A client whose timeout leaves no room for the retry-after gets the error...
    hasty = AsyncClient(limited.user_client_config("carol"), timeout=0.5)
    patient = AsyncClient(limited.user_client_config("dave"), timeout=10)
    try:
        for _ in range(3):
            with pytest.raises(errors.Forbidden):
                await hasty.get(core_pb2.ConfigMap, "x", namespace="default")
        with pytest.raises(errors.TooManyRequests, match=r'user "carol".*retry after 1s') as e:
            await hasty.get(core_pb2.ConfigMap, "x", namespace="default")
        assert e.value.retry_after == 1
        # ...one with time to spare sends it again after the retry-after, and gets
        # the server's real answer.
        for _ in range(5):
            with pytest.raises(errors.Forbidden):
                await patient.get(core_pb2.ConfigMap, "x", namespace="default")
    finally:
        await hasty.close()
        await patient.close()


async def test_a_watch_refused_by_the_limit_starts_after_the_retry_after(
        limited: InProcessAPIServer) -> None:
    from shoal.api.rbac.v1 import rbac_pb2

    admin = AsyncClient(limited.client_config)
    erin = AsyncClient(limited.user_client_config("erin"), timeout=10)
    try:
        binding = rbac_pb2.ClusterRoleBinding()
        binding.metadata.name = "erin-view"
        binding.role_ref.CopyFrom(rbac_pb2.RoleRef(
            api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="view"))
        binding.subjects.add(kind="User", api_group="rbac.authorization.k8s.io", name="erin")
        await admin.create(binding)
        cm = core_pb2.ConfigMap()
        cm.metadata.name, cm.metadata.namespace = "seen", "default"
        await admin.create(cm)
        async with asyncio.timeout(20):
            while True:  # until RBAC's cache has the binding (the SDK waits out limits)
                try:
                    await erin.get(core_pb2.ConfigMap, "seen", namespace="default")
                    break
                except errors.Forbidden:
                    continue
        while await _raw_get(erin) != grpc.StatusCode.RESOURCE_EXHAUSTED:
            pass  # erin's bucket is empty now
        async with asyncio.timeout(15):
            async for ev in erin.watch(core_pb2.ConfigMap, namespace="default"):
                assert ev.type == "ADDED" and ev.object is not None
                assert ev.object.metadata.name == "seen"
                break
    finally:
        await admin.close()
        await erin.close()
