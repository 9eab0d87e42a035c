"""Workload identities: keys, certificates and TLS contexts for the mesh tunnel.

One certificate per (namespace, service account) that some pod on this node
runs as. The key is made on this node and never leaves it (not even to disk:
a short-lived ``meshagent.keygen`` process makes it and the CSR, and checks what
the CA signs, so the agent itself never loads ``cryptography``; TLS contexts load
the key from an anonymous memory file). Life of one identity::

    get(ns, sa) --> PENDING --sign ok--> VALID --half-life--> renew --ok--> VALID
                       |                   |                     |
                       | sign fails:       |                     | fails: keep serving the
                       | retry, back-off   |                     | still-valid cert, retry
                       v                   v                     v with back-off (capped)
                    (get raises Unavailable while there is no valid certificate)
    forget(ns, sa) --> dropped (no pod on the node uses it any more)

Decisions read the injected clock; ``refresh_due()`` does the work that is due
and returns when it is next needed, so tests drive rotation with a fake clock
and ``run()`` just sleeps until then (or until a new identity is asked for).

The trust bundle (roots to verify peers against; several during a root
rotation) comes with every signed certificate and from GetTrustBundle, which
``refresh_due()`` asks for every ``bundle_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from shoal import errors, spawning, spiffe
from shoal.api.certificates.v1 import workload_pb2 as pb
from shoal.backoff import Backoff
from shoal.client import classify
from shoal.queueing import wait_set

log = logging.getLogger(__name__)

SERVICE = "shoal.certificates.v1.WorkloadCertificates"
Key = tuple[str, str]  # (namespace, service account)


# -- the CA behind a small protocol -------------------------------------------------


@dataclass(frozen=True)
class Signed:
    chain_pem: bytes  # leaf first
    roots_pem: bytes  # the trust bundle at signing time


class Signer(Protocol):
    async def sign(self, *, csr_pem: bytes, namespace: str,
                   service_account: str) -> Signed: ...

    async def trust_bundle(self) -> bytes: ...


class GrpcSigner:
    """The apiserver's WorkloadCertificates service over a node-authenticated channel."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 10.0) -> None:
        self._sign = channel.unary_unary(
            f"/{SERVICE}/Sign", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.WorkloadSignResponse.FromString)
        self._bundle = channel.unary_unary(
            f"/{SERVICE}/GetTrustBundle", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.TrustBundle.FromString)
        self.timeout = timeout

    async def sign(self, *, csr_pem: bytes, namespace: str, service_account: str) -> Signed:
        try:
            resp: pb.WorkloadSignResponse = await self._sign(pb.WorkloadSignRequest(
                csr_pem=csr_pem, namespace=namespace, service_account=service_account),
                timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e
        return Signed(chain_pem=resp.certificate_chain_pem,
                      roots_pem=resp.trust_bundle.roots_pem)

    async def trust_bundle(self) -> bytes:
        try:
            resp: pb.TrustBundle = await self._bundle(pb.TrustBundleRequest(),
                                                      timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise classify(e) from e
        return resp.roots_pem


# -- certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadCert:
    spiffe_id: spiffe.SpiffeId
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: float  # unix seconds
    not_after: float
    serial: int

    @property
    def renew_at(self) -> float:
        """Half-life: when rotation starts."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def valid(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


class Keys(Protocol):
    """Key, CSR and certificate work (``cryptography``), kept out of the agent."""

    async def new(self, ident: spiffe.SpiffeId) -> tuple[bytes, bytes]:
        """A fresh key (PEM) and a CSR (PEM) for ``ident``."""

    async def accept(self, signed: Signed, key_pem: bytes,
                     ident: spiffe.SpiffeId) -> WorkloadCert:
        """The CA's answer checked against our key and identity (InternalError if
        it is not for them)."""


class HelperKeys:
    """Each step in a short-lived ``python -m meshagent.keygen`` (see that module)."""

    def __init__(self, *, python: str = sys.executable, timeout: float = 30.0) -> None:
        self.python = python
        self.timeout = timeout

    async def _ask(self, request: dict[str, str]) -> dict[str, Any]:
        # Spawned without forking the agent (spawning.spawn says why).
        try:
            done = await spawning.spawn([self.python, "-m", "meshagent.keygen"],
                                         stdin=json.dumps(request).encode(),
                                         timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise errors.InternalError(f"meshagent.keygen {request['op']} took more than "
                                       f"{self.timeout:g}s") from None
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines()[-1:]
                    or ["no output"])
            raise errors.InternalError(
                f"meshagent.keygen {request['op']} failed ({done.returncode}): {last[0]}")
        answer: dict[str, Any] = json.loads(done.stdout)
        return answer

    async def new(self, ident: spiffe.SpiffeId) -> tuple[bytes, bytes]:
        answer = await self._ask({"op": "new", "spiffe_id": str(ident)})
        return answer["key_pem"].encode(), answer["csr_pem"].encode()

    async def accept(self, signed: Signed, key_pem: bytes,
                     ident: spiffe.SpiffeId) -> WorkloadCert:
        answer = await self._ask({"op": "accept", "spiffe_id": str(ident),
                                  "key_pem": key_pem.decode(),
                                  "chain_pem": signed.chain_pem.decode()})
        if "error" in answer:
            raise errors.InternalError(answer["error"])
        return WorkloadCert(spiffe_id=ident, chain_pem=signed.chain_pem, key_pem=key_pem,
                            not_before=answer["not_before"], not_after=answer["not_after"],
                            serial=answer["serial"])


class LocalKeys:
    """The same work in this process (tests, tools): loads ``cryptography``."""

    async def new(self, ident: spiffe.SpiffeId) -> tuple[bytes, bytes]:
        from meshagent import keygen

        return keygen.make_csr(ident)

    async def accept(self, signed: Signed, key_pem: bytes,
                     ident: spiffe.SpiffeId) -> WorkloadCert:
        from meshagent import keygen

        try:
            facts = keygen.accept(signed.chain_pem, key_pem, ident)
        except keygen.RejectedCertificate as e:
            raise errors.InternalError(str(e)) from None
        return WorkloadCert(spiffe_id=ident, chain_pem=signed.chain_pem, key_pem=key_pem,
                            not_before=facts.not_before, not_after=facts.not_after,
                            serial=facts.serial)


# -- the manager -------------------------------------------------------------------


@dataclass
class _Slot:
    ident: spiffe.SpiffeId
    backoff: Backoff
    cert: WorkloadCert | None = None
    next_attempt: float = 0.0  # 0 = now
    failures: int = 0
    last_error: str = ""
    inflight: asyncio.Task[None] | None = None


class IdentityManager:
    """Certificates for this node's workloads; see the module docstring."""

    def __init__(
        self,
        *,
        signer: Signer,
        keys: Keys | None = None,
        trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN,
        clock: Callable[[], float] = time.time,
        backoff: Callable[[], Backoff] = lambda: Backoff(base=1.0, cap=300.0),
        bundle_interval: float = 300.0,
    ) -> None:
        self.signer = signer
        self.keys: Keys = keys or HelperKeys()
        self.trust_domain = trust_domain
        self.clock = clock
        self._new_backoff = backoff
        self.bundle_interval = bundle_interval
        self.roots_pem = b""
        self._next_bundle = 0.0
        self._slots: dict[Key, _Slot] = {}
        self._wake = asyncio.Event()

    # -- API ---------------------------------------------------------------

    async def get(self, namespace: str, service_account: str) -> WorkloadCert:
        """A valid certificate for the workload identity; signs one if needed.
        Raises Unavailable (with the CA's reason) while none can be had."""
        slot = self._slot(namespace, service_account)
        backing_off = slot.failures > 0 and slot.next_attempt > self.clock()
        if (slot.cert is None or not slot.cert.valid(self.clock())) and not backing_off:
            await self._refresh(slot)
        if slot.cert is None or not slot.cert.valid(self.clock()):
            raise errors.Unavailable(f"no certificate for {slot.ident} yet: {slot.last_error}")
        return slot.cert

    def forget(self, namespace: str, service_account: str) -> None:
        slot = self._slots.pop((namespace, service_account), None)
        if slot is not None and slot.inflight is not None:
            slot.inflight.cancel()

    def identities(self) -> list[tuple[spiffe.SpiffeId, WorkloadCert | None, str]]:
        return [(s.ident, s.cert, s.last_error) for _, s in sorted(self._slots.items())]

    # -- the loop -----------------------------------------------------------

    async def refresh_due(self) -> float:
        """Renew every certificate that is due (or retry failed ones whose back-off
        is over) and the trust bundle; return the time of the next due work."""
        now = self.clock()
        due = [s for s in self._slots.values() if s.next_attempt <= now]
        for slot in due:
            await self._refresh(slot)
        if self._next_bundle <= self.clock():
            try:
                self.roots_pem = await self.signer.trust_bundle()
                self._next_bundle = self.clock() + self.bundle_interval
            except (errors.ShoalError, OSError) as e:
                log.warning("trust bundle refresh failed (keeping the old one): %s", e)
                self._next_bundle = self.clock() + min(30.0, self.bundle_interval)
        times = [s.next_attempt for s in self._slots.values()] + [self._next_bundle]
        return min(times)

    async def run(self) -> None:
        while True:
            self._wake.clear()  # before the work: an identity added meanwhile wakes us
            nxt = await self.refresh_due()
            await wait_set(self._wake, nxt - self.clock())

    # -- internals ----------------------------------------------------------

    def _slot(self, namespace: str, service_account: str) -> _Slot:
        slot = self._slots.get((namespace, service_account))
        if slot is None:
            ident = spiffe.SpiffeId.of(trust_domain=self.trust_domain, namespace=namespace,
                                       service_account=service_account)
            slot = _Slot(ident=ident, backoff=self._new_backoff())
            self._slots[(namespace, service_account)] = slot
            self._wake.set()
        return slot

    async def _refresh(self, slot: _Slot) -> None:
        if slot.inflight is None:
            slot.inflight = asyncio.create_task(self._renew(slot))
        task = slot.inflight
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and slot.inflight is task:
                slot.inflight = None

    async def _renew(self, slot: _Slot) -> None:
        ident = slot.ident
        try:
            key_pem, csr = await self.keys.new(ident)
            signed = await self.signer.sign(csr_pem=csr, namespace=ident.namespace,
                                            service_account=ident.service_account)
            cert = await self.keys.accept(signed, key_pem, ident)
        except (errors.ShoalError, OSError) as e:
            slot.failures += 1
            slot.last_error = str(e)
            delay = slot.backoff.next()
            slot.next_attempt = self.clock() + delay
            keeping = (" (keeping the still-valid certificate)"
                       if slot.cert is not None and slot.cert.valid(self.clock()) else "")
            log.warning("signing %s failed, retry in %.1fs%s: %s", ident, delay, keeping, e)
            return
        slot.cert = cert
        slot.failures = 0
        slot.last_error = ""
        slot.backoff.reset()
        slot.next_attempt = cert.renew_at
        if signed.roots_pem:
            self.roots_pem = signed.roots_pem


# -- what `shoal mesh certs` shows ---------------------------------------------------


@dataclass(frozen=True)
class CertRow:
    spiffe_id: str
    serial: str  # hex
    not_after: str  # RFC 3339, "" when none yet
    renew_at: str
    state: str  # VALID, EXPIRED, PENDING; "... (renewal failing: why)"


def certificate_rows(manager: IdentityManager) -> list[CertRow]:
    now = manager.clock()
    rows = []
    for ident, cert, error in manager.identities():
        if cert is None:
            state, serial, after, renew = "PENDING", "", "", ""
        else:
            state = "VALID" if cert.valid(now) else "EXPIRED"
            serial = f"{cert.serial:x}"
            after = _iso(cert.not_after)
            renew = _iso(cert.renew_at)
        if error:
            state += f" (signing failing: {error})"
        rows.append(CertRow(spiffe_id=str(ident), serial=serial, not_after=after,
                            renew_at=renew, state=state))
    return rows


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


# -- TLS ---------------------------------------------------------------------------


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` that lives in memory only (memfd), closed afterwards."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("workload-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as f:  # pragma: no cover - non-Linux
        f.write(data)
        f.flush()
        yield f.name


def tls_context(cert: WorkloadCert, roots_pem: bytes, *, server: bool) -> ssl.SSLContext:
    """TLS 1.3 only, mutual: presents ``cert``, requires a peer chain to ``roots_pem``.
    Host names are not checked; check the peer with ``peer_spiffe_id``."""
    if not roots_pem:
        raise errors.Unavailable("no trust bundle yet")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=roots_pem.decode())
    with _memory_file(cert.chain_pem + cert.key_pem) as path:
        ctx.load_cert_chain(path)
    return ctx


class PeerIdentityError(Exception):
    """The peer did not present exactly one valid SPIFFE ID."""


def peer_cert_sha256(ssl_object: ssl.SSLObject | ssl.SSLSocket | Any) -> str:
    """The SHA-256 (hex) of the certificate the peer presented, "" for none: the
    Hash of x-forwarded-client-cert."""
    der = ssl_object.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else ""


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | Any) -> spiffe.SpiffeId:
    """The verified peer's SPIFFE ID (the handshake has checked its chain)."""
    peer = ssl_object.getpeercert()
    if not peer:
        raise PeerIdentityError("the peer presented no certificate")
    sans: Any = peer.get("subjectAltName", ())
    ids = [str(v) for k, v in sans if k == "URI" and str(v).startswith(spiffe.SCHEME)]
    if len(ids) != 1:
        raise PeerIdentityError(f"the peer certificate must carry one SPIFFE ID, not {ids}")
    try:
        return spiffe.parse(ids[0])
    except spiffe.InvalidSpiffeId as e:
        raise PeerIdentityError(str(e)) from None
