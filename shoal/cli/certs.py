"""``shoal certs``: certificate expiry at a glance; ``shoal certs renew``.

``shoal certs`` lists the caller's client certificate, the cluster CA, each
apiserver's serving certificate (read from the TLS handshake) and each node's
client certificate (from the expiry its agent notes on its Node), with a
warning from 30 days before an expiry. ``shoal status`` shows the first two.

``shoal certs renew`` trades the caller's current client certificate for a new
one with the same identity and lifetime (``Certificates/Renew``, a fresh key)
and rewrites the client config file in place. Node agents renew their own
certificates by themselves (``nodeagent.certrotation``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from shoal import certrenewal, errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.reporting import ExitCode
from shoal.cli.session import Session
from shoal.config import ClientConfig

EXPIRY_ANNOTATION = "certificates.shoal.io/client-expires"


@dataclass(frozen=True)
class Row:
    what: str
    subject: str
    expires: dt.datetime | None
    note: str = ""  # a warning, or why the expiry is unknown


def _row(what: str, info: certrenewal.CertInfo, now: dt.datetime) -> Row:
    return Row(what, info.subject, info.not_after, info.warning(now))


def local_rows(cfg: ClientConfig, *, now: dt.datetime) -> list[Row]:
    """The caller's client certificate and the CA, from the client config alone."""
    rows = []
    if cfg.cert_pem:
        rows.append(_row("client (you)", certrenewal.CertInfo.of(cfg.cert_pem), now))
    else:
        rows.append(Row("client (you)", "(bearer token)", None, "no certificate"))
    if cfg.ca_pem:
        rows.append(_row("cluster CA", certrenewal.CertInfo.of(cfg.ca_pem), now))
    return rows


def render(rows: list[Row], *, now: dt.datetime) -> list[str]:
    """A table, then one WARNING line per certificate within 30 days of expiry."""
    table = [("CERTIFICATE", "SUBJECT", "EXPIRES", "STATUS")]
    for r in rows:
        expires = r.expires.strftime("%Y-%m-%d %H:%M UTC") if r.expires else "-"
        status = r.note or (f"ok ({(r.expires - now).days} days)" if r.expires else "")
        table.append((r.what, r.subject, expires, status))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "   "
             + row[3] for row in table]
    lines += [f"WARNING: {r.what} ({r.subject}) {r.note}; renew it (shoal certs renew for "
              "your own; see docs/security.md)" for r in rows
              if r.expires is not None and r.note]
    return lines


def status_lines(cfg: ClientConfig, *, now: dt.datetime | None = None) -> list[str]:
    """What ``shoal status`` adds: the caller's certificate and the CA."""
    now = now or dt.datetime.now(dt.UTC)
    return render(local_rows(cfg, now=now), now=now)


def _serving_row(server: str, now: dt.datetime,
                 fetch: Callable[[str], list[object]]) -> Row:
    try:
        chain = fetch(server)
    except errors.ShoalError as e:
        return Row(f"apiserver {server}", "-", None, f"unreachable: {e.message}")
    if not chain:
        return Row(f"apiserver {server}", "-", None, "presented no certificate")
    leaf: object = chain[0]
    pem = leaf.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]
    return _row(f"apiserver {server}", certrenewal.CertInfo.of(pem), now)


async def run_certs(session: Session, *, now: dt.datetime | None = None) -> int:
    from nodeagent.joining import fetch_chain

    now = now or dt.datetime.now(dt.UTC)
    cfg = session.config()
    rows = local_rows(cfg, now=now)
    for server in cfg.servers:
        rows.append(await asyncio.to_thread(_serving_row, server, now,
                                            lambda s: list(fetch_chain(s, timeout=5.0))))
    try:
        nodes = await session.client().list(core_pb2.Node)
    except errors.Forbidden:
        nodes = None
    for node in nodes.items if nodes is not None else ():
        text = node.metadata.annotations.get(EXPIRY_ANNOTATION, "")
        try:
            expires = dt.datetime.fromisoformat(text) if text else None
        except ValueError:
            expires = None
        subject = f"CN=system:node:{node.metadata.name},O=system:nodes"
        if expires is None:
            rows.append(Row(f"node {node.metadata.name}", subject, None,
                            "unknown (its agent has not reported it)"))
            continue
        info = certrenewal.CertInfo(subject=subject, not_before=expires, not_after=expires)
        rows.append(_row(f"node {node.metadata.name}", info, now))
    for line in render(rows, now=now):
        (session.warn if line.startswith("WARNING") else session.print)(line)
    return ExitCode.OK


async def run_certs_renew(session: Session) -> int:
    cfg = session.config()
    if not cfg.source or cfg.source.startswith("in-cluster"):
        raise errors.BadRequest("shoal certs renew needs a client config file to rewrite "
                                "(--config PATH)")
    renewed = await certrenewal.renew(session.client())
    path = cfg.source
    replace(renewed.config, source=path).save(Path(path))
    info = certrenewal.CertInfo.of(renewed.config.cert_pem)
    session.print(f"renewed the client certificate of {info.subject}: valid until "
                  f"{info.not_after.strftime('%Y-%m-%d %H:%M UTC')}; wrote {path}")
    return ExitCode.OK
