"""An apiserver inside the test's event loop: real gRPC, real TLS, port 0.

    async with InProcessAPIServer(tmp_path) as api:          # SQLite in memory
        async with api.client() as c: ...
    async with InProcessAPIServer(tmp_path, etcd_endpoint=etcd.endpoint) as api: ...

``restart()`` stops the server and starts a fresh one on the same port and the
same storage (what a client sees when its apiserver is replaced). The PKI and
the client config (``config_path``) are made once per data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from apiserver import pki
from apiserver.server import APIServer, ServerConfig, build
from apiserver.storage import Store
from shoal.client import AsyncClient, Client
from shoal.config import ClientConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class InProcessAPIServer:
    def __init__(
        self,
        data_dir: Path,
        *,
        etcd_endpoint: str = "",
        sqlite_path: str = "",
        port: int = 0,
        bookmark_interval: float = 0.5,
        history_events: int = 10_000,
        **config: Any,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        storage = "etcd" if etcd_endpoint else "sqlite"
        self.server_config = ServerConfig(
            data_dir=data_dir, listen=f"127.0.0.1:{self.port}", storage=storage,
            etcd_servers=(etcd_endpoint,) if etcd_endpoint else (),
            sqlite_path=sqlite_path or str(data_dir / "state.db"),
            metrics_listen="127.0.0.1:0", bookmark_interval=bookmark_interval,
            history_events=history_events, shutdown_grace=0.5, **config)
        result = pki.init(data_dir, server_addresses=[f"127.0.0.1:{self.port}"])
        self.config_path = result.admin_config
        self.server: APIServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def client_config(self) -> ClientConfig:
        from shoal import config as configmod

        return configmod.load(self.config_path)

    @property
    def metrics_port(self) -> int:
        assert self.server is not None
        return self.server.monitoring.port

    async def start(self, *, store: Store | None = None) -> None:
        self.server = build(self.server_config, store=store)
        await self.server.start()
        self._task = asyncio.create_task(self.server.run(), name="apiserver")
        async with asyncio.timeout(30):
            while not self.server.readiness.ready:
                if self._task.done():
                    self._task.result()
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        await server.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await server.close()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def client(self, **kw: Any) -> AsyncClient:
        return AsyncClient(self.client_config, **kw)

    def sync_client(self, **kw: Any) -> Client:
        return Client(self.client_config, **kw)

    async def __aenter__(self) -> InProcessAPIServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()
