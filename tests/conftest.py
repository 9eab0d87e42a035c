"""Shared fixtures for all three tiers.

- ``apiserver``: one in-process apiserver (SQLite) for the whole session.
- ``etcd``: one real etcd process for the whole session (skipped when etcd is missing).
- ``etcd_apiserver``: one in-process apiserver on that etcd for the session.
- ``client``: an AsyncClient on ``apiserver``, closed after the test.
- ``namespace``: a fresh namespace per test, so tests never see each other's objects.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shoal.api.core.v1 import core_pb2

if TYPE_CHECKING:
    from shoal.client import AsyncClient
    from shoal.testing.apiserver import InProcessAPIServer

_counter = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """e2e tests need root; without it they are skipped with the reason printed."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="e2e tests need root (real netns, iptables, containerd)")
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def etcd() -> Iterator[object]:
    from shoal.testing.etcd import EtcdServer

    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
async def apiserver(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcessAPIServer]:
    from shoal.testing.apiserver import InProcessAPIServer

    data = tmp_path_factory.mktemp("apiserver")
    async with InProcessAPIServer(data) as api:
        yield api


@pytest.fixture(scope="session")
async def etcd_apiserver(tmp_path_factory: pytest.TempPathFactory,
                         etcd: object) -> AsyncIterator[InProcessAPIServer]:
    from shoal.testing.apiserver import InProcessAPIServer

    data = tmp_path_factory.mktemp("apiserver-etcd")
    async with InProcessAPIServer(data, etcd_endpoint=etcd.endpoint) as api:  # type: ignore[attr-defined]
        yield api


@pytest.fixture
async def client(apiserver: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with apiserver.client() as c:
        yield c


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid() % 1000}-{next(_counter)}"


@pytest.fixture
async def namespace(client: AsyncClient) -> AsyncIterator[str]:
    name = unique_name("t")
    ns = core_pb2.Namespace()
    ns.metadata.name = name
    await client.create(ns)
    client.namespace = name
    yield name


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
