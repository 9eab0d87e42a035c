"""``shoal create token SERVICEACCOUNT``: a service-account token (kubectl create token).

Asks the apiserver's TokenRequest for a token of the service account in the
namespace (``-n``), for ``--audience`` (repeatable; default: the apiserver) and
``--duration`` (default one hour, at least 10 minutes), optionally bound to a
pod (``--bound-object-kind Pod --bound-object-name NAME``: the token dies with
it). Prints the token only, so it can be piped or captured. Needs ``create
serviceaccounts/token`` (RBAC ``edit``, or an admin).
"""

from __future__ import annotations

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.reporting import ExitCode
from shoal.cli.session import Session


async def run_create_token(session: Session, *, service_account: str, audiences: list[str],
                           duration: float | None, bound_kind: str, bound_name: str) -> int:
    if bound_kind and bound_kind != "Pod":
        raise errors.BadRequest(f"--bound-object-kind must be Pod, not {bound_kind!r}")
    if bool(bound_kind) != bool(bound_name):
        raise errors.BadRequest("--bound-object-kind and --bound-object-name go together")
    client = session.client()
    namespace = session.namespace
    uid = ""
    if bound_name:
        pod = await client.get(core_pb2.Pod, bound_name, namespace=namespace)
        uid = pod.metadata.uid
    issued = await client.create_token(
        service_account, namespace=namespace, audiences=audiences,
        expiration_seconds=int(duration or 0), pod=bound_name, pod_uid=uid)
    session.print(issued.token)
    return ExitCode.OK
