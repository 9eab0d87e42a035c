"""``shoal delete``: by manifest, by name, by selector.

    delete -f FILE|DIR|- [-R]
    delete KIND NAME... | KIND/NAME...
    delete KIND (-l SELECTOR | --all)
        [-n NS] [--grace-period N] [--cascade=background|foreground|orphan]
        [--wait] [--ignore-not-found] [--dry-run[=server]]

Manifests given with ``-f`` are decoded strictly first; a bad one stops the
command before anything is deleted (exit 2). Each object is then deleted in
order, printing kubectl's ``pod "web-0" deleted``. A refusal (NotFound unless
``--ignore-not-found``, Forbidden...) is reported and the rest still go ahead;
the exit code is then 1. By default the command does not wait for objects
with finalizers to go; ``--wait`` waits until each one is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from shoal import errors
from shoal.cli.applying import (
    DryRun,
    Problem,
    decode_documents,
    dry_run_suffix,
    namespace_mismatch,
    resolve_namespace,
)
from shoal.cli.fetching import drain_cancelled_stream, fetch_targets, get_or_none
from shoal.cli.getting import check_selectors, no_resources_message
from shoal.cli.loading import read_manifests
from shoal.cli.printing import kind_label
from shoal.cli.reporting import ExitCode, InputError, UsageError, server_error_line
from shoal.cli.session import Session
from shoal.cli.targets import Target, parse_targets
from shoal.client import AsyncClient
from shoal.kinds import Kind

CASCADE = MappingProxyType({"background": "Background", "foreground": "Foreground",
                            "orphan": "Orphan", "true": "Background", "false": "Orphan"})


@dataclass(frozen=True)
class DeleteOptions:
    args: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    recursive: bool = False
    label_selector: str = ""
    all: bool = False
    grace_period: int = -1
    cascade: str = "background"
    wait: bool = False
    ignore_not_found: bool = False
    dry_run: DryRun = "none"


@dataclass(frozen=True)
class Victim:
    kind: Kind
    namespace: str
    name: str


def propagation_policy(cascade: str) -> str:
    try:
        return CASCADE[cascade.lower()]
    except KeyError:
        raise UsageError(f'invalid --cascade "{cascade}": must be background, foreground or '
                         "orphan") from None


def grace_period(value: int) -> int | None:
    """--grace-period: -1 means the object's own default."""
    if value < -1:
        raise UsageError("--grace-period must be -1 (the default) or a number of seconds")
    return None if value == -1 else value


def deleted_line(kind: Kind, name: str, *, suffix: str = "") -> str:
    """kubectl's text: 'deployment.apps "web" deleted'."""
    return f'{kind_label(kind)} "{name}" deleted{suffix}'


def _from_files(session: Session, options: DeleteOptions) -> list[Victim]:
    docs = read_manifests(options.files, recursive=options.recursive, stdin=session.stdin)
    decoded, problems = decode_documents(docs, session.kinds)
    victims: list[Victim] = []
    for d in decoded:
        meta = d.obj.metadata
        mismatch = (namespace_mismatch(meta.namespace, session.namespace_flag)
                    if d.kind.namespaced else None)
        if mismatch:
            problems.append(Problem(d.where, mismatch))
            continue
        if not meta.name:
            problems.append(Problem(d.where, "metadata.name: Required value"))
            continue
        ns = resolve_namespace(d.kind, meta.namespace, explicit=session.namespace_flag,
                               default=session.namespace if d.kind.namespaced else "")
        victims.append(Victim(d.kind, ns, meta.name))
    if problems:
        raise InputError(problems)
    if not victims:
        raise InputError(["no objects passed to delete"])
    return victims


async def _from_targets(session: Session, targets: Sequence[Target], *,
                        options: DeleteOptions) -> tuple[list[Victim], int]:
    namespace = session.namespace
    victims = [Victim(t.kind, namespace if t.kind.namespaced else "", n)
               for t in targets for n in t.names]
    unnamed = [Target(t.kind) for t in targets if not t.names]
    if not unnamed:
        return victims, ExitCode.OK
    if not (options.label_selector or options.all):
        raise UsageError("resource(s) were provided, but no name was specified "
                         "(give names, -l SELECTOR or --all)")
    found, code = await fetch_targets(session, unnamed, namespace=namespace,
                                      label_selector=options.label_selector)
    listed = [Victim(k, o.metadata.namespace, o.metadata.name) for k, objs in found for o in objs]
    if not listed:
        session.warn(no_resources_message(unnamed, namespace=namespace, all_namespaces=False))
    return victims + listed, code


async def wait_gone(client: AsyncClient, victim: Victim, *, uid: str) -> None:
    """Return once the object (this uid of it) is gone from the server."""
    current = await get_or_none(client, victim.kind, namespace=victim.namespace,
                                name=victim.name)
    if current is None or current.metadata.uid != uid:
        return
    events = client.watch(victim.kind.message, namespace=victim.namespace,
                          field_selector=f"metadata.name={victim.name}",
                          resource_version=current.metadata.resource_version)
    async with contextlib.aclosing(events):
        async for ev in events:
            if ev.type == "DELETED":
                break
    await drain_cancelled_stream()


async def run_delete(session: Session, options: DeleteOptions) -> int:
    propagation = propagation_policy(options.cascade)
    grace = grace_period(options.grace_period)
    if options.files and options.args:
        raise UsageError("give either -f or resources (KIND NAME..., KIND/NAME), not both")
    if options.files:
        victims, code = _from_files(session, options), int(ExitCode.OK)
    else:
        targets = parse_targets(options.args, session.kinds)
        check_selectors(targets, label_selector=options.label_selector, field_selector="")
        if options.all and any(t.names for t in targets):
            raise UsageError("--all cannot be used together with names")
        victims, code = await _from_targets(session, targets, options=options)
    client = session.client()
    dry_run = options.dry_run != "none"
    suffix = dry_run_suffix(options.dry_run)
    for v in victims:
        try:
            gone: Any = await client.delete(v.kind.message, v.name, namespace=v.namespace,
                                       grace_period=grace, propagation_policy=propagation,
                                       dry_run=dry_run)
        except errors.Unavailable:
            raise
        except errors.NotFound as e:
            if not options.ignore_not_found:
                session.warn(server_error_line(e))
                code = ExitCode.SERVER_REFUSED
            continue
        except errors.ShoalError as e:
            session.warn(server_error_line(e))
            code = ExitCode.SERVER_REFUSED
            continue
        session.print(deleted_line(v.kind, v.name, suffix=suffix))
        if options.wait and not dry_run:
            try:
                async with asyncio.timeout(session.request_timeout):
                    await wait_gone(client, v, uid=gone.metadata.uid)
            except TimeoutError:
                session.warn(f"error: timed out waiting for {kind_label(v.kind)}/{v.name} "
                             "to be deleted")
                code = ExitCode.SERVER_REFUSED
    return code
