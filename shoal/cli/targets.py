"""What a command's positional arguments name, as kubectl reads them.

    get pods                      every pod
    get po web-0 web-1            two pods
    get deploy,svc                every deployment and every service
    get deploy,svc web            deployment web and service web
    get pod/web-0 svc/web         one of each
    get all                       pods, services, daemonsets, deployments, replicasets,
                                  statefulsets

Kind names resolve through :meth:`KindTable.by_name` ('po', 'pods',
'deployments.apps'...). An unknown kind is a :class:`UsageError` (exit 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shoal import errors
from shoal.cli.reporting import UsageError
from shoal.kinds import Kind, KindTable

# kubectl's "all" category, in its order.
ALL_CATEGORY = ("pods", "services", "daemonsets", "deployments", "replicasets", "statefulsets")


@dataclass(frozen=True)
class Target:
    """One kind, and the names asked for (empty: list them)."""

    kind: Kind
    names: tuple[str, ...] = ()


def resolve_kind(name: str, kinds: KindTable) -> Kind:
    try:
        return kinds.by_name(name)
    except errors.NotFound as e:
        raise UsageError(e.message) from None


def _kinds(text: str, kinds: KindTable) -> list[Kind]:
    out: list[Kind] = []
    for part in text.split(","):
        if not part:
            raise UsageError(f'invalid resource type list "{text}"')
        resolved = ([resolve_kind(n, kinds) for n in ALL_CATEGORY] if part.lower() == "all"
                    else [resolve_kind(part, kinds)])
        out.extend(k for k in resolved if k not in out)
    return out


def parse_targets(args: Sequence[str], kinds: KindTable) -> list[Target]:
    """The targets named by positional arguments (see the module docstring)."""
    if not args:
        raise UsageError("you must specify the type of resource "
                         "(e.g. 'shoal get pods'; 'shoal api-resources' lists them)")
    if any("/" in a for a in args):
        if not all("/" in a for a in args):
            raise UsageError("there is no need to specify a resource type as a separate "
                             "argument when passing arguments in resource/name form "
                             "(e.g. 'shoal get resource/<resource_name>' instead of "
                             "'shoal get resource resource/<resource_name>')")
        grouped: dict[str, tuple[Kind, list[str]]] = {}
        for a in args:
            kind_name, _, name = a.partition("/")
            if not kind_name or not name or "/" in name:
                raise UsageError(f'arguments in resource/name form must have a single '
                                 f'resource and name: "{a}"')
            kind = resolve_kind(kind_name, kinds)
            _, names = grouped.setdefault(kind.qualified_resource, (kind, []))
            if name not in names:
                names.append(name)
        return [Target(k, tuple(n)) for k, n in grouped.values()]
    unique = tuple(dict.fromkeys(args[1:]))
    return [Target(k, unique) for k in _kinds(args[0], kinds)]
