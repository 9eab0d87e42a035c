"""The node agent's certificate rotation (kubelet's ``RotateCertificates``).

    wait until due (70-90% of the client cert's lifetime, jittered)
      -> Renew over mTLS with the current cert: a new client cert (new key)
         and a new serving cert (new key, same names and IPs)
      -> write node.key/node.crt/serving.* and node.conf (each atomically)
      -> the agent's client uses the new cert for new connections; the
         node API's server presents the new serving cert on new handshakes
    on failure: keep everything as it is and retry with back-off

Contract: ``rotate_once`` is idempotent in effect (each call yields a fresh
valid identity); only ``run`` decides when. Time is read from ``clock`` and
waited with ``sleep``, both passed in.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.joining import csr_for
from shoal import certrenewal, errors
from shoal.api.core.v1 import core_pb2
from shoal.backoff import Backoff
from shoal.client import AsyncClient
from shoal.files import write_atomic

log = logging.getLogger(__name__)

# On the node's own Node: when its client certificate expires (RFC 3339), for
# `shoal certs`. Kubernetes publishes nothing like it; the value is informational.
EXPIRY_ANNOTATION = "certificates.shoal.io/client-expires"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class RotationPlan:
    """What to do now: renew, or wait this many seconds."""

    renew: bool
    wait: float


def plan_rotation(cert_pem: bytes, *, now: dt.datetime, fraction: float) -> RotationPlan:
    info = certrenewal.CertInfo.of(cert_pem)
    due = certrenewal.renew_due(info, fraction=fraction)
    if now >= due:
        return RotationPlan(renew=True, wait=0.0)
    return RotationPlan(renew=False, wait=(due - now).total_seconds())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    write_atomic(path, data, mode=0o600 if private else 0o644)


class CertificateRotator:
    def __init__(self, *, client: AsyncClient, data_dir: Path, node_name: str,
                 node_ips: tuple[str, ...] = (), config_path: Path | None = None,
                 clock: Callable[[], dt.datetime] = _now,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None,
                 on_serving: Callable[[bytes, bytes], None] | None = None) -> None:
        self.client = client
        self.data_dir = data_dir
        self.config_path = config_path or data_dir / "node.conf"
        self.node_name = node_name
        self.node_ips = node_ips
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        # Called with (cert PEM, key PEM) of a renewed serving certificate.
        self.on_serving = on_serving
        self.backoff = Backoff(base=10.0, cap=300.0)
        self.rotations = 0
        self._published = ""

    async def rotate_once(self) -> certrenewal.Renewed:
        key = certrenewal.new_key()
        serving_key = certrenewal.new_key()
        # Only a node identity gets a serving certificate (an agent run with some
        # other client config renews just that).
        is_node = certrenewal.CertInfo.of(self.client.config.cert_pem).subject.startswith(
            f"CN=system:node:{self.node_name},")
        serving_csr = (csr_for(serving_key, self.node_name, ips=("127.0.0.1", *self.node_ips))
                       if is_node else b"")
        renewed = await certrenewal.renew(self.client, key=key, serving_csr_pem=serving_csr)
        pki = self.data_dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        _write(pki / "node.key", renewed.config.key_pem, private=True)
        _write(pki / "node.crt", renewed.config.cert_pem, private=False)
        renewed.config.save(self.config_path)
        if renewed.serving_certificate_pem:
            serving_key_pem = certrenewal.key_pem(serving_key)
            _write(pki / "serving.key", serving_key_pem, private=True)
            _write(pki / "serving.crt", renewed.serving_certificate_pem, private=False)
            if self.on_serving is not None:
                self.on_serving(renewed.serving_certificate_pem, serving_key_pem)
        self.client.use_credentials(renewed.config)
        self.rotations += 1
        info = certrenewal.CertInfo.of(renewed.config.cert_pem)
        log.info("node %s: client certificate renewed; valid until %s", self.node_name,
                 info.not_after.isoformat())
        return renewed

    async def publish_expiry(self) -> None:
        """Note the client certificate's expiry on our Node (once per certificate;
        a failure is retried at the next wake-up)."""
        expires = certrenewal.CertInfo.of(self.client.config.cert_pem).not_after.isoformat()
        if expires == self._published:
            return
        try:
            node = await self.client.get(core_pb2.Node, self.node_name)
            if node.metadata.annotations.get(EXPIRY_ANNOTATION) != expires:
                node.metadata.annotations[EXPIRY_ANNOTATION] = expires
                await self.client.update(node)
        except errors.ShoalError as e:
            log.info("node %s: cannot note the certificate expiry yet: %s", self.node_name, e)
            return
        self._published = expires

    async def run(self) -> None:
        fraction = certrenewal.jittered_fraction(self.rng)
        while True:
            await self.publish_expiry()
            plan = plan_rotation(self.client.config.cert_pem, now=self.clock(),
                                 fraction=fraction)
            if not plan.renew:
                # Wake at least hourly: a clock jump or a manual renewal is seen.
                await self.sleep(min(plan.wait, 3600.0 if self._published else 30.0))
                continue
            try:
                await self.rotate_once()
            except (errors.ShoalError, OSError) as e:
                delay = self.backoff.next()
                log.warning("node %s: certificate renewal failed (keeping the current one, "
                            "retry in %.0fs): %s", self.node_name, delay, e)
                await self.sleep(delay)
                continue
            self.backoff.reset()
            fraction = certrenewal.jittered_fraction(self.rng)
