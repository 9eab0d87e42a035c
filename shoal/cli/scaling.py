"""``shoal scale``: set ``spec.replicas`` of Deployments, ReplicaSets and StatefulSets.

    scale (KIND/NAME... | KIND NAME... | -f FILE) --replicas=N [--current-replicas=M]

Every object is read, checked (``--current-replicas`` is a precondition) and
written back with the read's resourceVersion; a conflicting write in between
is retried with a fresh read. Prints kubectl's ``deployment.apps/web scaled``.
A kind without replicas is refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal import errors
from shoal.cli.applying import decode_documents, resolve_namespace
from shoal.cli.loading import read_manifests
from shoal.cli.printing import kind_label
from shoal.cli.reporting import ExitCode, InputError, UsageError, server_error_line
from shoal.cli.session import Session
from shoal.cli.targets import parse_targets
from shoal.kinds import Kind

SCALABLE = ("Deployment", "ReplicaSet", "StatefulSet")
_ATTEMPTS = 5


def check_scalable(kind: Kind) -> None:
    if kind.kind not in SCALABLE:
        raise UsageError(f'cannot scale {kind.resource}: only deployments, replicasets and '
                         "statefulsets have replicas")


def _named(session: Session, args: Sequence[str], files: Sequence[str], recursive: bool
           ) -> list[tuple[Kind, str, str]]:
    if files and args:
        raise UsageError("give either -f or resources (KIND/NAME, KIND NAME...), not both")
    if files:
        docs = read_manifests(files, recursive=recursive, stdin=session.stdin)
        decoded, problems = decode_documents(docs, session.kinds)
        if problems:
            raise InputError(problems)
        out = []
        for d in decoded:
            check_scalable(d.kind)
            ns = resolve_namespace(d.kind, d.obj.metadata.namespace,
                                   explicit=session.namespace_flag, default=session.namespace)
            out.append((d.kind, ns, d.obj.metadata.name))
        return out
    targets = parse_targets(args, session.kinds)
    out = []
    for t in targets:
        check_scalable(t.kind)
        if not t.names:
            raise UsageError("resource(s) were provided, but no name was specified")
        out.extend((t.kind, session.namespace, n) for n in t.names)
    return out


async def run_scale(session: Session, *, args: Sequence[str], files: Sequence[str],
                    recursive: bool, replicas: int, current_replicas: int) -> int:
    if replicas < 0:
        raise UsageError("the --replicas=COUNT flag is required, and COUNT must be greater "
                         "than or equal to 0")
    objects = _named(session, args, files, recursive)
    code = ExitCode.OK
    for kind, namespace, name in objects:
        try:
            await _scale_one(session, kind, namespace, name, replicas=replicas,
                             current=current_replicas)
        except errors.Unavailable:
            raise
        except errors.ShoalError as e:
            session.warn(server_error_line(e))
            code = ExitCode.SERVER_REFUSED
            continue
        session.print(f"{kind_label(kind)}/{name} scaled")
    return code


async def _scale_one(session: Session, kind: Kind, namespace: str, name: str, *,
                     replicas: int, current: int) -> None:
    client = session.client()
    for _ in range(_ATTEMPTS):
        obj: Any = await client.get(kind.message, name, namespace=namespace)
        have = obj.spec.replicas if obj.spec.HasField("replicas") else 1
        if current >= 0 and have != current:
            raise errors.Conflict(f"Expected replicas to be {current}, was {have}")
        if have == replicas and obj.spec.HasField("replicas"):
            return
        obj.spec.replicas = replicas
        try:
            await client.update(obj)
            return
        except errors.Conflict:
            continue
    raise errors.Conflict(f'{kind.resource} "{name}" kept changing; try again')
