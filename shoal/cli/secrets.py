"""``shoal secrets reencrypt``: rewrite every Secret under the current encryption key.

After an encryption key rotation (see ``apiserver.encryption``), Secrets written
before it stay under the old key until they are written again. This command
writes each one back unchanged -- Kubernetes' ``kubectl get secrets -A -o json |
kubectl replace -f -`` -- and the apiserver stores it under the key that now
encrypts. Only resourceVersion moves; data, uid and generation stay. A Secret
already under the current key is not written (the apiserver sees it is
current), so running it again is cheap and idempotent.

Each update is a compare-and-swap on the resourceVersion just read: a Secret
changed meanwhile is read again and retried (the other write re-encrypted it
anyway); one deleted meanwhile is skipped.
"""

from __future__ import annotations

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.cli.reporting import ExitCode
from shoal.cli.session import Session

_ATTEMPTS = 5


async def run_secrets_reencrypt(session: Session) -> int:
    client = session.client()
    listed = await client.list(core_pb2.Secret, all_namespaces=True)
    rewritten = current = gone = 0
    for secret in listed.items:
        ns, name = secret.metadata.namespace, secret.metadata.name
        for _ in range(_ATTEMPTS):
            try:
                after = await client.update(secret)
            except errors.Conflict:
                try:
                    secret = await client.get(core_pb2.Secret, name, namespace=ns)
                except errors.NotFound:
                    gone += 1
                    break
                continue
            except errors.NotFound:
                gone += 1
                break
            if after.metadata.resource_version != secret.metadata.resource_version:
                rewritten += 1
            else:
                current += 1
            break
        else:
            raise errors.Conflict(f'secret "{ns}/{name}" kept changing; run the command again')
    session.print(f"rewrote {rewritten} of {len(listed.items)} Secrets under the current "
                  f"encryption key ({current} already current"
                  + (f", {gone} deleted meanwhile" if gone else "") + ")")
    return ExitCode.OK
