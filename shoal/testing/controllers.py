"""Helpers for tests of controllers in an in-process apiserver.

    async with leading_apiserver(tmp, controllers=("replicaset",)) as api:
        ...   # the controllers lead and run
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer

# Short leader-election timings (lease, renew deadline, retry period; seconds).
FAST_LEASE = (5.0, 4.0, 0.2)


@contextlib.asynccontextmanager
async def leading_apiserver(data: Path, **kw: Any) -> AsyncIterator[InProcessAPIServer]:
    """An in-process apiserver whose controller manager has taken the lead."""
    kw.setdefault("leader_lease", FAST_LEASE)
    async with InProcessAPIServer(data, **kw) as api:
        assert api.server is not None and api.server.controller_manager is not None
        async with asyncio.timeout(10):
            await api.server.controller_manager.leading.wait()
        yield api


@contextlib.asynccontextmanager
async def client_in_new_namespace(api: InProcessAPIServer, prefix: str
                                  ) -> AsyncIterator[AsyncClient]:
    """A client of ``api`` whose default namespace is a freshly created ``<prefix>-<random>``."""
    async with api.client() as client:
        ns = core_pb2.Namespace()
        ns.metadata.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        await client.create(ns)
        client.namespace = ns.metadata.name
        yield client
