"""One invocation's context: global flags, output streams, clock, and the client.

The client config is read, and the client is built, only when a command first
needs them, so ``shoal version --client`` or a manifest that fails to decode
never touches the config. A missing or broken config is a :class:`ConfigError`
(exit code 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from shoal import config as configmod
from shoal import errors
from shoal.cli.reporting import ConfigError
from shoal.client import AsyncClient
from shoal.config import ClientConfig
from shoal.kinds import KindTable

# Used when --request-timeout is not given (the SDK's default).
DEFAULT_REQUEST_TIMEOUT = 30.0


@dataclass
class Session:
    kinds: KindTable
    out: TextIO
    err: TextIO
    stdin: TextIO
    config_path: str | None = None
    # -n/--namespace as given; None when the flag was not used.
    namespace_flag: str | None = None
    # --request-timeout in seconds; None when the flag was not used.
    request_timeout: float | None = None
    clock: Callable[[], float] = time.time
    _config: ClientConfig | None = field(default=None, init=False, repr=False)
    _client: AsyncClient | None = field(default=None, init=False, repr=False)

    def config(self) -> ClientConfig:
        if self._config is None:
            try:
                self._config = configmod.load(self.config_path)
            except errors.ShoalError as e:
                raise ConfigError(e.message) from e
        return self._config

    @property
    def namespace(self) -> str:
        """-n if given, else the config's namespace."""
        if self.namespace_flag:
            return self.namespace_flag
        return self.config().namespace or "default"

    def client(self) -> AsyncClient:
        if self._client is None:
            timeout = self.request_timeout or DEFAULT_REQUEST_TIMEOUT
            self._client = AsyncClient(self.config(), kinds=self.kinds, timeout=timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def warn(self, text: str) -> None:
        self.err.write(text + "\n")
