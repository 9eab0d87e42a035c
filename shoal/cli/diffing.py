"""``shoal diff -f FILE|DIR``: what ``apply`` would change, as a unified diff of YAML.

    manifests --(apply's decode, prepare, observe, plan)--> actions
        each action --server dry run (create/update with dry_run: validation,
        defaulting, admission; nothing stored)--> MERGED
        the stored object (or nothing for a create) -----> LIVE
    LIVE vs MERGED --> unified diff per object, kubectl's shape:
        diff -u -N LIVE/<version>.<Kind>.<ns>.<name> MERGED/...

The update sent is apply's own three-way merge (``applying.merge_for_update``),
so what diff shows is what apply would write. An object whose namespace does
not exist yet cannot be dry-run by the server; it is defaulted locally instead.
Secret values are masked as kubectl does (``***``, or ``*** (before)`` /
``*** (after)`` where they differ).

Exit codes are kubectl's: 0 no differences, 1 differences, 2 or more an error
(bad input or a server refusal 2, unreachable 3).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from shoal import errors, manifests, validation
from shoal.cli.applying import (
    Action,
    decode_documents,
    merge_for_update,
    observe,
    plan_apply,
    prepare,
    with_last_applied,
)
from shoal.cli.fetching import bounded_gather
from shoal.cli.loading import read_manifests
from shoal.cli.reporting import ExitCode, InputError, exit_code_for, server_error_line
from shoal.cli.session import Session
from shoal.client import AsyncClient
from shoal.kinds import KindTable

DIFF_FOUND = 1


def object_path(doc: dict[str, Any]) -> str:
    """kubectl's file name for an object: ``apps.v1.Deployment.ns.name``."""
    version = str(doc.get("apiVersion", "")).replace("/", ".")
    meta = doc.get("metadata") or {}
    parts = [version, str(doc.get("kind", "")), meta.get("namespace", ""), meta.get("name", "")]
    return ".".join(p for p in parts if p)


def mask_secrets(live: dict[str, Any] | None, merged: dict[str, Any] | None) -> None:
    """Hide Secret values in place: ``***`` where equal, before/after where not."""
    docs = [d for d in (live, merged) if d is not None and d.get("kind") == "Secret"]
    if not docs:
        return
    for field in ("data", "stringData"):
        before = dict((live or {}).get(field) or {})
        after = dict((merged or {}).get(field) or {})
        for key in set(before) | set(after):
            same = before.get(key) == after.get(key)
            if live is not None and key in before:
                live[field][key] = "***" if same else "*** (before)"
            if merged is not None and key in after:
                merged[field][key] = "***" if same else "*** (after)"


def object_diff(live: dict[str, Any] | None, merged: dict[str, Any]) -> str:
    """The unified diff of one object (empty when nothing would change)."""
    live = None if live is None else dict(live)
    merged = dict(merged)
    for doc in (live, merged):
        if doc is not None:
            doc.pop("status", None)  # apply never writes status
    mask_secrets(live, merged)
    path = object_path(merged)
    old = manifests.dump_yaml(live).splitlines(keepends=True) if live is not None else []
    new = manifests.dump_yaml(merged).splitlines(keepends=True)
    body = list(difflib.unified_diff(old, new, fromfile=f"LIVE/{path}",
                                     tofile=f"MERGED/{path}"))
    if not body:
        return ""
    return f"diff -u -N LIVE/{path} MERGED/{path}\n" + "".join(
        line if line.endswith("\n") else line + "\n" for line in body)


async def merged_object(client: AsyncClient, action: Action) -> Any:
    """What apply would store: the server's dry run, or local defaulting when
    the server cannot dry-run it (its namespace does not exist yet)."""
    d = action.desired
    if not action.checkable:
        obj = action.obj if action.existing is not None else with_last_applied(d.kind, d.obj)
        validation.apply_defaults(d.kind, obj)
        return obj
    if action.existing is None:
        return await client.create(with_last_applied(d.kind, d.obj), dry_run=True)
    return await client.update(merge_for_update(action.existing, d.obj, d.kind),
                               dry_run=True)


def render(kinds: KindTable, pairs: Sequence[tuple[Any | None, Any]]) -> str:
    out = []
    for live, merged in pairs:
        text = object_diff(manifests.encode(live, kinds) if live is not None else None,
                           manifests.encode(merged, kinds))
        if text:
            out.append(text)
    return "".join(out)


async def run_diff(session: Session, *, files: Sequence[str], recursive: bool) -> int:
    docs = read_manifests(files, recursive=recursive, stdin=session.stdin)
    if not docs:
        raise InputError(["no objects passed to diff"])
    decoded, problems = decode_documents(docs, session.kinds)
    if problems:
        raise InputError(problems)
    desired, problems = prepare(decoded, explicit_namespace=session.namespace_flag,
                                default_namespace=session.namespace)
    if problems:
        raise InputError(problems)
    client = session.client()
    try:
        observed, namespaces = await observe(client, desired, kinds=session.kinds)
        plan = plan_apply(desired, observed=observed, namespaces=namespaces)
        # A namespace made earlier in the same manifests is fine for diff.
        merged = await bounded_gather([merged_object(client, a) for a in plan.actions])
    except errors.ShoalError as e:
        if exit_code_for(e) == ExitCode.SERVER_REFUSED:  # 1 means "differences" here
            raise InputError([server_error_line(e)]) from e
        raise
    text = render(session.kinds, [(a.existing, m) for a, m in
                                  zip(plan.actions, merged, strict=True)])
    session.out.write(text)
    return DIFF_FOUND if text else ExitCode.OK
