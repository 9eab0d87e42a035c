"""Requests the apiserver must refuse whole: undecodable, or larger than its limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[InProcessAPIServer]:
    async with InProcessAPIServer(tmp_path, max_request_bytes=64 * 1024) as api:
        yield api


async def _raw(c: AsyncClient, path: str, data: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await c.channel.unary_unary(path)(data, timeout=10)
    return info.value


async def test_an_undecodable_request_is_a_bad_request_on_every_service(
        small: InProcessAPIServer) -> None:
    # gRPC itself would answer UNKNOWN ("Unexpected DecodeError"): found by test_rpc_fuzz.
    async with AsyncClient(small.client_config) as c:
        for path in ("/shoal.resources.v1.Resources/Get", "/grpc.health.v1.Health/Check",
                     "/shoal.authorization.v1.Authorization/AccessReview"):
            e = await _raw(c, path, b"\x00")
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert "cannot decode the request" in (e.details() or "")
            trailers = dict(e.trailing_metadata() or ())
            status = meta_pb2.Status.FromString(trailers["shoal-status-bin"])
            assert status.reason == "BadRequest"
        # A client stream too (nothing imported).
        stream = c.channel.stream_unary("/shoal.resources.v1.PodProxy/ImportImage")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream(iter([b"\xff\xff\xff"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_over_max_request_bytes_is_refused_whole(
        small: InProcessAPIServer) -> None:
    async with AsyncClient(small.client_config) as c:
        cm = core_pb2.ConfigMap()
        cm.metadata.name, cm.metadata.namespace = "big", "default"
        cm.data["blob"] = "x" * (100 * 1024)
        with pytest.raises(errors.RequestEntityTooLarge, match="larger than max"):
            await c.create(cm)
        with pytest.raises(errors.NotFound):
            await c.get(core_pb2.ConfigMap, "big", namespace="default")
        cm.data["blob"] = "x" * 1024  # within the limit
        await c.create(cm)
