"""``shoal token create|list|delete``: bootstrap tokens for joining nodes.

A token is a Secret in kube-system (see :mod:`shoal.tokens`); ``delete``
revokes it. ``create --print-join-command`` prints the whole
``shoal-nodeagent join`` line, with the CA pin computed from the client config.
"""

from __future__ import annotations

import datetime as dt

from shoal import errors, tokens
from shoal.api.core.v1 import core_pb2
from shoal.cli.printing import Table, render_table
from shoal.cli.reporting import ExitCode
from shoal.cli.session import Session


def join_port_address(server: str) -> str:
    """The join port beside an apiserver address: the next port up (6443 -> 6444)."""
    host, _, port = server.rpartition(":")
    return f"{host}:{int(port) + 1}"


async def run_token_create(session: Session, *, ttl: float | None, description: str,
                           print_join_command: bool) -> int:
    token = tokens.generate()
    secret = tokens.to_secret(token, ttl=dt.timedelta(seconds=ttl) if ttl else None,
                              description=description)
    await session.client().create(secret)
    if print_join_command:
        cfg = session.config()
        session.print(f"shoal-nodeagent join --server {join_port_address(cfg.servers[0])} "
                      f"--token {token} --ca-cert-hash {tokens.ca_cert_hash(cfg.ca_pem)}")
    else:
        session.print(str(token))
    return ExitCode.OK


def token_rows(secrets: list[core_pb2.Secret], *, now: dt.datetime) -> Table:
    rows: list[tuple[str, ...]] = []
    for s in sorted(secrets, key=lambda s: s.metadata.name):
        when = tokens.expiration(s)
        if when is None:
            ttl = "<forever>"
        elif when <= now:
            ttl = "<expired>"
        else:
            left = int((when - now).total_seconds())
            ttl = f"{left // 3600}h" if left >= 3600 else f"{left // 60}m"
        usages = ",".join(sorted(k.removeprefix("usage-bootstrap-") for k, v in s.data.items()
                                 if k.startswith("usage-bootstrap-") and v == b"true"))
        rows.append((s.data.get("token-id", b"").decode() + ".<secret>", ttl,
                     when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else "<never>", usages,
                     s.data.get("description", b"").decode() or "<none>"))
    return Table(headers=("TOKEN", "TTL", "EXPIRES", "USAGES", "DESCRIPTION"),
                 rows=tuple(rows))


async def run_token_list(session: Session) -> int:
    listed = await session.client().list(core_pb2.Secret, namespace=tokens.NAMESPACE,
                                         field_selector=f"type={tokens.SECRET_TYPE}")
    if not listed.items:
        session.warn("No bootstrap tokens.")
        return ExitCode.OK
    session.out.write(render_table(token_rows(listed.items, now=dt.datetime.now(dt.UTC))))
    return ExitCode.OK


async def run_token_delete(session: Session, *, token_ids: list[str]) -> int:
    for text in token_ids:
        token_id = text.split(".", 1)[0]
        if len(token_id) != 6:
            raise errors.BadRequest(f"{text!r} is not a token or token id")
        await session.client().delete(core_pb2.Secret, tokens.SECRET_PREFIX + token_id,
                                      namespace=tokens.NAMESPACE)
        session.print(f"bootstrap token \"{token_id}\" deleted")
    return ExitCode.OK
