"""Calling the agents on a node: addresses and mTLS channels.

The apiserver presents its kubelet-client certificate; the agent's serving
certificate (issued at join, naming the node's IPs) is checked against the
cluster CA. One channel per address, kept until ``close()``; a channel whose
connection failed tries again within a few seconds (a short reconnect back-off),
so an agent that comes back is reached soon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from shoal import errors
from shoal.client import classify

# gRPC's default reconnect back-off grows to two minutes; agents restart faster.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 3_000),
)


def internal_ip(node: Any) -> str:
    """The Node's InternalIP address, or ""."""
    return next((a.address for a in node.status.addresses if a.type == "InternalIP"), "")


class NodeDialer:
    def __init__(self, pki_dir: Path) -> None:
        self._creds = grpc.ssl_channel_credentials(
            root_certificates=(pki_dir / "ca.crt").read_bytes(),
            private_key=(pki_dir / "apiserver-kubelet-client.key").read_bytes(),
            certificate_chain=(pki_dir / "apiserver-kubelet-client.crt").read_bytes())
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.secure_channel(address, self._creds, options=CHANNEL_OPTIONS)
            self._channels[address] = ch
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()


def relayed(e: grpc.aio.AioRpcError, what: str) -> errors.ShoalError:
    """The Shoal error for a failed call to ``what`` (e.g. "the node agent at
    10.0.0.2:10250"): its own error if it sent one, else 'cannot reach ...'."""
    err = classify(e)
    if isinstance(err, errors.Unavailable):
        return errors.Unavailable(f"cannot reach {what}: {e.details() or e.code().name}",
                                  retry_after=2.0)
    return err
