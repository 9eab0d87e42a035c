"""``shoal auth can-i VERB RESOURCE [NAME]``: may I (or someone else) do that?

Asks the apiserver's access review (the same authorizers every request goes
through) and prints ``yes`` or ``no``, as ``kubectl auth can-i`` does, with its
exit codes: 0 yes, 1 no (2 bad input, 3 unreachable). ``--as USER`` and
``--as-group G`` ask about someone else, which needs the right to impersonate
them.

RESOURCE is what ``shoal get`` takes (``pods``, ``deploy``,
``deployments.apps``), optionally with a subresource (``pods/log``,
``nodes/status``), or ``*``. A kind Shoal does not serve is still asked
about, with a warning, as kubectl does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import grpc

from shoal import errors
from shoal.api.authorization.v1 import authorization_pb2 as pb
from shoal.cli.reporting import CLIError, ExitCode
from shoal.cli.session import Session
from shoal.client import classify
from shoal.kinds import KindTable

METHOD = "/shoal.authorization.v1.Authorization/AccessReview"


@dataclass(frozen=True)
class Question:
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    known: bool


def question(kinds: KindTable, *, verb: str, resource: str, name: str, namespace: str,
             all_namespaces: bool) -> Question:
    """What to ask, from the words typed (pure)."""
    if not verb or not resource:
        raise CLIError("usage: shoal auth can-i VERB RESOURCE [NAME]")
    base, _, sub = resource.partition("/")
    if "/" in sub:
        raise CLIError(f'invalid resource "{resource}": use RESOURCE or RESOURCE/SUBRESOURCE')
    if base == "*":
        return Question(verb=verb, group="*", resource="*", subresource=sub,
                        namespace="" if all_namespaces else namespace, name=name, known=True)
    try:
        kind = kinds.by_name(base)
    except errors.NotFound:
        plural, _, group = base.partition(".")
        return Question(verb=verb, group=group, resource=plural, subresource=sub,
                        namespace="" if all_namespaces else namespace, name=name,
                        known=False)
    ns = namespace if kind.namespaced and not all_namespaces else ""
    return Question(verb=verb, group=kind.group, resource=kind.resource, subresource=sub,
                    namespace=ns, name=name, known=True)


async def run_can_i(session: Session, *, verb: str, resource: str, name: str,
                    all_namespaces: bool, as_user: str, as_groups: list[str],
                    quiet: bool) -> int:
    if as_groups and not as_user:
        raise CLIError("--as-group needs --as USER too")
    q = question(session.kinds, verb=verb, resource=resource, name=name,
                 namespace=session.namespace, all_namespaces=all_namespaces)
    if not q.known and not quiet:
        session.warn(f'Warning: the server doesn\'t have a resource type "{resource}"')
    client = session.client()
    rpc = client.channel.unary_unary(
        METHOD, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.AccessReviewResponse.FromString)
    req = pb.AccessReviewRequest(user=as_user, groups=as_groups, verb=q.verb, group=q.group,
                                 resource=q.resource, subresource=q.subresource,
                                 namespace=q.namespace, name=q.name)
    try:
        resp = cast(pb.AccessReviewResponse, await rpc(req, timeout=client.timeout))
    except grpc.aio.AioRpcError as e:
        raise classify(e) from e
    if not quiet:
        session.print("yes" if resp.allowed else "no")
    return ExitCode.OK if resp.allowed else ExitCode.SERVER_REFUSED
