"""Service-account tokens: signed, audience-bound, short-lived JWTs (Kubernetes'
bound service-account tokens), the TokenRequest RPC, and the bearer-token
authenticator.

    node agent (pod P on node N runs as SA)      apiserver
    CreateToken(ns, SA, aud, ttl, bound=P) -->   caller admin, or node N running P as SA?
                                                 SA and P exist (uids from the watch cache)
                          <-- token, exp         sign ES256 with pki/sa.key
    pod: Authorization: Bearer <token> ------->  signature, iss, aud, nbf/exp;
                                                 SA (and P) still there with the same uid?
                                                 -> system:serviceaccount:<ns>:<SA>

Claims (Kubernetes' shape)::

    {"iss": ..., "sub": "system:serviceaccount:<ns>:<name>", "aud": [...],
     "exp": ..., "nbf": ..., "iat": ..., "jti": ...,
     "kubernetes.io": {"namespace": ns, "serviceaccount": {"name", "uid"},
                       "pod": {"name", "uid"}}}

The caller becomes user ``system:serviceaccount:<ns>:<name>`` with the groups
``system:serviceaccounts``, ``system:serviceaccounts:<ns>`` and
``system:authenticated``. Each refusal says why (expired, wrong audience,
service account deleted or replaced, pod gone, bad signature).

The signing key is ``<data-dir>/pki/sa.key`` (ECDSA P-256), made at start when
missing. Lifetimes: 600 s at least (Kubernetes' minimum), one hour by default,
capped at ``max_lifetime``. The default ServiceAccount of every namespace is
created by :class:`DefaultServiceAccounts`, as Kubernetes' controller does.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from google.protobuf import timestamp_pb2

from apiserver.authz.attributes import Attributes
from apiserver.authz.nodes import node_name
from apiserver.metrics import Metrics
from apiserver.objectstore import ObjectStore
from apiserver.pki import Identity
from apiserver.rpc import Authenticator, Guard, attributes, current_caller, passthrough, unary
from apiserver.watchcache import ADDED, DELETED, CacheEvent, WatchCache
from shoal import errors, naming
from shoal.api.authentication.v1 import tokens_pb2 as pb
from shoal.kinds import Kind, KindTable

log = logging.getLogger(__name__)

SERVICE = "shoal.authentication.v1.ServiceAccountTokens"
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
USER_PREFIX = "system:serviceaccount:"
ALL_GROUP = "system:serviceaccounts"
AUTHENTICATED = "system:authenticated"
ADMIN_GROUP = "system:masters"
MIN_LIFETIME = 600
DEFAULT_LIFETIME = 3600
MAX_LIFETIME = 48 * 3600
# Clock skew allowed on nbf (a token is usable from the moment it is issued).
NBF_LEEWAY = 60
CLAIM = "kubernetes.io"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def user_of(namespace: str, name: str) -> str:
    return f"{USER_PREFIX}{namespace}:{name}"


def identity_of(namespace: str, name: str) -> Identity:
    return Identity(user=user_of(namespace, name),
                    groups=(ALL_GROUP, f"{ALL_GROUP}:{namespace}", AUTHENTICATED))


# -- JWT (ES256) ---------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public: ec.EllipticCurvePublicKey) -> str:
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return _b64(hashlib.sha256(der).digest())


class TokenSigner:
    """Signs and verifies ES256 JWTs with one P-256 key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key
        self.public = key.public_key()
        self.kid = key_id(self.public)

    @classmethod
    def load_or_create(cls, path: Path) -> TokenSigner:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another apiserver made it a moment ago
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
        loaded = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise errors.BadRequest(f"{path} must hold an ECDSA P-256 key")
        return cls(loaded)

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": "ES256", "kid": self.kid, "typ": "JWT"}
        signing_input = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64(json.dumps(claims, separators=(",", ":")).encode()))
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token this key signed; Unauthorized otherwise."""
        parts = token.split(".")
        if len(parts) != 3:
            raise errors.Unauthorized("the bearer token is not a JWT")
        try:
            header = json.loads(_unb64(parts[0]))
            sig = _unb64(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise errors.Unauthorized("the bearer token is not a well-formed JWT") from None
        if not isinstance(header, dict) or header.get("alg") != "ES256":
            raise errors.Unauthorized("the bearer token is not signed with ES256")
        if len(sig) != 64:
            raise errors.Unauthorized("the bearer token's signature is malformed")
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                   int.from_bytes(sig[32:], "big"))
        try:
            self.public.verify(der, f"{parts[0]}.{parts[1]}".encode(),
                               ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise errors.Unauthorized("the bearer token's signature does not verify "
                                      "(not issued by this cluster)") from None
        try:
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, UnicodeDecodeError):
            raise errors.Unauthorized("the bearer token's claims are not JSON") from None
        if not isinstance(claims, dict):
            raise errors.Unauthorized("the bearer token's claims are not an object")
        return claims


# -- claims (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """What a verified token says about its holder."""

    namespace: str
    name: str
    sa_uid: str
    pod_name: str = ""
    pod_uid: str = ""


def make_claims(*, issuer: str, audiences: list[str], bound: Bound, now: dt.datetime,
                lifetime: int) -> dict[str, Any]:
    iat = int(now.timestamp())
    ext: dict[str, Any] = {"namespace": bound.namespace,
                           "serviceaccount": {"name": bound.name, "uid": bound.sa_uid}}
    if bound.pod_name:
        ext["pod"] = {"name": bound.pod_name, "uid": bound.pod_uid}
    return {"iss": issuer, "sub": user_of(bound.namespace, bound.name), "aud": audiences,
            "exp": iat + lifetime, "nbf": iat, "iat": iat, "jti": str(uuid.uuid4()),
            CLAIM: ext}


def check_claims(claims: Mapping[str, Any], *, issuer: str, audiences: tuple[str, ...],
                 now: float) -> Bound:
    """The token's subject if its issuer, audience and validity window are right."""
    if claims.get("iss") != issuer:
        raise errors.Unauthorized(f"the token's issuer {claims.get('iss')!r} is not "
                                  f"{issuer!r}")
    aud = claims.get("aud")
    aud_list = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(a in audiences for a in aud_list):
        raise errors.Unauthorized(f"the token's audience {aud_list} does not include this "
                                  f"server ({', '.join(audiences)})")
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
        raise errors.Unauthorized("the token has no valid exp/nbf")
    if now >= exp:
        expired = dt.datetime.fromtimestamp(exp, dt.UTC).isoformat()
        raise errors.Unauthorized(f"the token expired at {expired}")
    if now + NBF_LEEWAY < nbf:
        raise errors.Unauthorized("the token is not valid yet")
    ext = claims.get(CLAIM)
    sub = claims.get("sub", "")
    if not isinstance(ext, dict) or not isinstance(sub, str):
        raise errors.Unauthorized("the token is not a service-account token")
    sa = ext.get("serviceaccount") or {}
    pod = ext.get("pod") or {}
    ns = ext.get("namespace")
    if (not isinstance(sa, dict) or not isinstance(pod, dict) or not isinstance(ns, str)
            or sub != user_of(ns, str(sa.get("name", "")))):
        raise errors.Unauthorized("the token's subject does not match its service account")
    return Bound(namespace=ns, name=str(sa.get("name", "")), sa_uid=str(sa.get("uid", "")),
                 pod_name=str(pod.get("name", "")), pod_uid=str(pod.get("uid", "")))


# -- live objects ------------------------------------------------------------------


@dataclass(frozen=True)
class PodFacts:
    uid: str
    node_name: str
    service_account: str
    # When a graceful deletion ends (deletionTimestamp + grace period); 0: not deleting.
    # Its tokens work until then, as in Kubernetes, so the pod can shut down cleanly.
    gone_at: float = 0.0


class LiveObjects:
    """Service accounts and pods as the watch cache holds them now."""

    def __init__(self, *, cache: WatchCache, kinds: KindTable) -> None:
        self.cache = cache
        self.sa_kind = kinds.by_resource("", "serviceaccounts")
        self.pod_kind = kinds.by_resource("", "pods")
        self._memo: dict[tuple[str, int], Any] = {}

    def _obj(self, kind: Kind, namespace: str, name: str) -> Any | None:
        co = self.cache.cache_for(kind).objects.get(kind.key(namespace, name))
        if co is None:
            return None
        memo_key = (co.key, co.revision)
        obj = self._memo.get(memo_key)
        if obj is None:
            obj = kind.new()
            obj.ParseFromString(co.raw)
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[memo_key] = obj
        return obj

    def service_account_uid(self, namespace: str, name: str) -> str | None:
        sa = self._obj(self.sa_kind, namespace, name)
        return None if sa is None else str(sa.metadata.uid)

    def pod(self, namespace: str, name: str) -> PodFacts | None:
        p = self._obj(self.pod_kind, namespace, name)
        if p is None:
            return None
        gone_at = 0.0
        if p.metadata.HasField("deletion_timestamp"):
            gone_at = float(p.metadata.deletion_timestamp.seconds
                            + p.metadata.deletion_grace_period_seconds)
        return PodFacts(uid=p.metadata.uid, node_name=p.spec.node_name,
                        service_account=p.spec.service_account_name or "default",
                        gone_at=gone_at)


def check_live(bound: Bound, live: LiveObjects, *, now: float) -> None:
    """Unauthorized unless the token's service account (and pod) still exist as issued."""
    uid = live.service_account_uid(bound.namespace, bound.name)
    if uid is None:
        raise errors.Unauthorized(f'service account "{bound.namespace}/{bound.name}" has '
                                  "been deleted")
    if uid != bound.sa_uid:
        raise errors.Unauthorized(f'service account "{bound.namespace}/{bound.name}" was '
                                  f"replaced (uid {uid}, the token names {bound.sa_uid})")
    if bound.pod_name:
        pod = live.pod(bound.namespace, bound.pod_name)
        if pod is None or pod.uid != bound.pod_uid:
            raise errors.Unauthorized(f'pod "{bound.namespace}/{bound.pod_name}" the token '
                                      "is bound to no longer exists")
        if pod.gone_at and now >= pod.gone_at:
            raise errors.Unauthorized(f'pod "{bound.namespace}/{bound.pod_name}" the token '
                                      "is bound to has been deleted")


class TokenAuthenticator:
    """Bearer token -> Identity (sync: everything it reads is in memory)."""

    def __init__(self, *, signer: TokenSigner, live: LiveObjects, issuer: str,
                 audiences: tuple[str, ...], clock: Callable[[], float] | None = None,
                 cache_size: int = 4096) -> None:
        self.signer = signer
        self.live = live
        self.issuer = issuer
        self.audiences = audiences
        self.clock = clock or (lambda: _now().timestamp())
        self._verified: dict[str, Bound | errors.Unauthorized] = {}
        self._claims: dict[str, Mapping[str, Any]] = {}
        self._cache_size = cache_size

    def authenticate(self, token: str) -> Identity:
        claims = self._claims.get(token)
        if claims is None:
            claims = self.signer.verify(token)  # the expensive part: once per token
            if len(self._claims) >= self._cache_size:
                self._claims.clear()
            self._claims[token] = claims
        now = self.clock()
        bound = check_claims(claims, issuer=self.issuer, audiences=self.audiences, now=now)
        check_live(bound, self.live, now=now)
        return identity_of(bound.namespace, bound.name)


# -- TokenRequest ---------------------------------------------------------------------


def restrict_node(caller: Identity, *, service_account: str, pod: PodFacts | None) -> None:
    """Kubernetes' NodeRestriction for TokenRequest: a node's token must be bound to
    a pod the node runs, as that pod's service account. (Whether the caller may
    ``create serviceaccounts/token`` at all is the authorizer's call: RBAC, or the
    node authorizer.)"""
    node = node_name(caller.user, caller.groups)
    if node is None or ADMIN_GROUP in caller.groups:
        return
    if pod is None:
        raise errors.Forbidden(f"node {node!r} may create tokens only bound to a pod it runs")
    if pod.node_name != node:
        raise errors.Forbidden(f"node {node!r} does not run the bound pod; it may create "
                               "tokens only for its own pods")
    if pod.service_account != service_account:
        raise errors.Forbidden(f"the bound pod runs as {pod.service_account!r}, not "
                               f"{service_account!r}")


class TokenService:
    def __init__(self, *, live: LiveObjects, signer: TokenSigner, issuer: str,
                 audiences: tuple[str, ...], metrics: Metrics, authn: Authenticator,
                 guard: Guard, cache: WatchCache, max_lifetime: int = MAX_LIFETIME,
                 clock: Callable[[], dt.datetime] = _now) -> None:
        self.live = live
        self.signer = signer
        self.issuer = issuer
        self.audiences = audiences
        self.metrics = metrics
        self.authn = authn
        # Authorization (create serviceaccounts/token: RBAC, the node authorizer) and audit.
        self.guard = guard
        self.cache = cache
        self.max_lifetime = max_lifetime
        self.clock = clock

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "CreateToken": grpc.unary_unary_rpc_method_handler(
                self.create_token, request_deserializer=pb.TokenRequest.FromString,
                response_serializer=passthrough),
        })

    def _lifetime(self, asked: int) -> int:
        if asked < 0:
            raise errors.BadRequest(f"expiration_seconds must not be negative, not {asked}")
        if asked and asked < MIN_LIFETIME:
            raise errors.BadRequest(f"expiration_seconds: may not specify a duration less "
                                    f"than {MIN_LIFETIME} seconds, not {asked}")
        return min(asked or DEFAULT_LIFETIME, self.max_lifetime)

    async def _bound(self, request: pb.TokenRequest) -> tuple[Bound, PodFacts | None]:
        ns, name = request.namespace, request.service_account
        for field_name, value in (("namespace", ns), ("service_account", name)):
            problems = naming.check_dns1123_subdomain(value) if value else ["Required value"]
            if problems:
                raise errors.BadRequest(f"{field_name} {value!r}: {problems[0]}")
        ref = request.bound_object_ref
        if ref.kind and ref.kind != "Pod":
            raise errors.BadRequest(f"bound_object_ref.kind must be Pod, not {ref.kind!r}")
        if ref.kind and not ref.name:
            raise errors.BadRequest("bound_object_ref.name is required")
        for attempt in range(2):
            uid = self.live.service_account_uid(ns, name)
            pod = self.live.pod(ns, ref.name) if ref.kind else None
            missing = uid is None or (ref.kind and pod is None)
            if not missing or attempt:
                break
            await self.cache.caught_up()  # created a moment ago: look once more
        if uid is None:
            raise errors.NotFound(f'serviceaccounts "{name}" not found', kind="ServiceAccount",
                                  name=name)
        if ref.kind:
            if pod is None or (ref.uid and pod.uid != ref.uid):
                raise errors.NotFound(f'pods "{ref.name}" not found (with uid {ref.uid!r})',
                                      kind="Pod", name=ref.name)
            if pod.gone_at and self.clock().timestamp() >= pod.gone_at:
                raise errors.BadRequest(f'pod "{ref.name}" has been deleted')
        return Bound(namespace=ns, name=name, sa_uid=uid,
                     pod_name=ref.name if ref.kind else "",
                     pod_uid=pod.uid if pod is not None else ""), pod

    def describe_create(self, request: pb.TokenRequest, ident: Identity) -> Attributes:
        return attributes(ident, "create", resource="serviceaccounts", subresource="token",
                          namespace=request.namespace, name=request.service_account)

    @unary("CreateToken", describe=describe_create)
    async def create_token(self, request: pb.TokenRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.TokenResponse:
        caller = current_caller()
        lifetime = self._lifetime(request.expiration_seconds)
        audiences = list(request.audiences) or list(self.audiences)
        if any(not a for a in audiences):
            raise errors.BadRequest("audiences must not contain an empty string")
        bound, pod = await self._bound(request)
        restrict_node(caller, service_account=bound.name, pod=pod)
        now = self.clock()
        claims = make_claims(issuer=self.issuer, audiences=audiences, bound=bound, now=now,
                             lifetime=lifetime)
        exp = timestamp_pb2.Timestamp(seconds=int(claims["exp"]))
        log.info("issued a token for %s (audiences %s, %d s, pod %s) to %s",
                 user_of(bound.namespace, bound.name), audiences, lifetime,
                 bound.pod_name or "-", caller.user)
        return pb.TokenResponse(token=self.signer.sign(claims), expiration_timestamp=exp,
                                audiences=audiences)


# -- the default ServiceAccount of every namespace --------------------------------------


class DefaultServiceAccounts:
    """Creates ServiceAccount ``default`` in every namespace, and again if deleted.

    Level-triggered: namespace and service-account events only queue a
    namespace name; the worker checks the cache and creates what is missing
    (AlreadyExists is success). Terminating namespaces are skipped."""

    NAME = "default"

    def __init__(self, *, objects: ObjectStore, cache: WatchCache, kinds: KindTable) -> None:
        self.objects = objects
        self.cache = cache
        self.ns_kind = kinds.by_resource("", "namespaces")
        self.sa_kind = kinds.by_resource("", "serviceaccounts")
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        cache.cache_for(self.ns_kind).listeners.append(self._on_namespace)
        cache.cache_for(self.sa_kind).listeners.append(self._on_service_account)

    def _enqueue(self, namespace: str) -> None:
        if namespace not in self._queued:
            self._queued.add(namespace)
            self.queue.put_nowait(namespace)

    def _on_namespace(self, ev: CacheEvent) -> None:
        if ev.type == ADDED:
            self._enqueue(ev.obj.name)

    def _on_service_account(self, ev: CacheEvent) -> None:
        if ev.type == DELETED and ev.obj.name == self.NAME:
            self._enqueue(ev.obj.namespace)

    async def run(self) -> None:
        await self.cache.ready.wait()
        for co in list(self.cache.cache_for(self.ns_kind).objects.values()):
            self._enqueue(co.name)
        while True:
            ns = await self.queue.get()
            self._queued.discard(ns)
            try:
                await self._ensure(ns)
            except errors.TemporaryError as e:
                log.warning("default service account in %s: %s; retrying", ns, e)
                await asyncio.sleep(1)
                self._enqueue(ns)
            except errors.ShoalError as e:
                log.warning("default service account in %s: %s", ns, e)

    async def _ensure(self, namespace: str) -> None:
        nsc = self.cache.cache_for(self.ns_kind).objects.get(self.ns_kind.key("", namespace))
        if nsc is None:
            return
        ns: Any = self.ns_kind.new()
        ns.ParseFromString(nsc.raw)
        if ns.metadata.HasField("deletion_timestamp"):
            return
        if self.cache.cache_for(self.sa_kind).objects.get(
                self.sa_kind.key(namespace, self.NAME)) is not None:
            return
        sa: Any = self.sa_kind.new()
        sa.metadata.name, sa.metadata.namespace = self.NAME, namespace
        try:
            await self.objects.create(self.sa_kind, sa)
        except (errors.AlreadyExists, errors.Forbidden, errors.NotFound):
            pass
