"""Helpers for tests of controllers in an in-process apiserver.

    async with leading_apiserver(tmp, controllers=("replicaset",)) as api:
        ...   # the controllers lead and run
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
