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
import datetime as dt
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
            # Several members: "host:port,host:port" (tried in order).
            etcd_servers=tuple(etcd_endpoint.split(",")) if etcd_endpoint else (),
            sqlite_path=sqlite_path or str(data_dir / "state.db"),
            metrics_listen="127.0.0.1:0", join_listen="127.0.0.1:0",
            bookmark_interval=bookmark_interval,
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

    def node_client_config(self, node: str) -> ClientConfig:
        """A client config as ``shoal-nodeagent join`` leaves it: the node's own
        certificate (CN system:node:<node>, group system:nodes) from the cluster CA."""
        return self.user_client_config(f"system:node:{node}", ["system:nodes"])

    def user_client_config(self, user: str, groups: list[str] | tuple[str, ...] = (), *,
                           lifetime: dt.timedelta | None = None) -> ClientConfig:
        """A client config with a certificate from the cluster CA for CN=user,
        O=groups (what an admin hands a user; authorization decides the rest)."""
        ca = pki.CertificateAuthority.load(self.data_dir / "pki")
        key = pki.new_key()
        cert = ca.issue(key.public_key(), common_name=user, organizations=list(groups),
                        client=True, lifetime=lifetime or dt.timedelta(days=pki.CERT_DAYS))
        return ClientConfig(servers=self.client_config.servers, ca_pem=pki.cert_pem(ca.cert),
                            cert_pem=pki.cert_pem(cert), key_pem=pki.key_pem(key), user=user)

    def sync_client(self, **kw: Any) -> Client:
        return Client(self.client_config, **kw)

    async def __aenter__(self) -> InProcessAPIServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


class APIServerProcess:
    """``shoal-apiserver serve`` as a real child process (for e2e tests and benchmarks).

    Tracks the one PID it starts; ``stop()`` sends SIGTERM (``kill()`` SIGKILL) to
    exactly that process. ``start()`` waits on ``/readyz``, never a fixed sleep.
    """

    def __init__(self, data_dir: Path, *, etcd_endpoint: str = "", port: int = 0,
                 metrics_port: int = 0, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.etcd_endpoint = etcd_endpoint
        self.port = port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.join_port = free_port()
        self.extra_args = extra_args
        self.log_path = data_dir / "apiserver.log"
        self.proc: Any = None
        result = pki.init(data_dir, server_addresses=[f"127.0.0.1:{self.port}"])
        self.config_path = result.admin_config

    @property
    def pid(self) -> int:
        return int(self.proc.pid) if self.proc is not None else 0

    def command(self) -> list[str]:
        import sys

        cmd = [sys.executable, "-m", "apiserver.main", "serve", "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{self.port}",
               "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--bookmark-interval", "1",
               "--join-listen", f"127.0.0.1:{self.join_port}"]
        if self.etcd_endpoint:
            cmd += ["--storage", "etcd", "--etcd-servers", self.etcd_endpoint]
        return cmd + list(self.extra_args)

    def start(self, *, timeout: float = 30.0) -> None:
        import subprocess
        import time
        import urllib.request

        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoal-apiserver exited with {self.proc.returncode}; "
                                   f"log: {self.log_path.read_text()[-2000:]}")
            try:
                url = f"http://127.0.0.1:{self.metrics_port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"shoal-apiserver not ready after {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        import signal

        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        self.stop(kill=True)
