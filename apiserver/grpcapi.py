"""The gRPC face of the apiserver: ``shoal.resources.v1.Resources``.

Each method decodes its request, checks it, calls the object store (writes,
gets, paged lists) or the watch cache (lists, watches), and answers. Shoal
errors become a gRPC status code plus a ``shoal.meta.v1.Status`` in the
``shoal-status-bin`` trailer; nothing else about errors leaks out.

Watch events are serialized once by the cache and written to every matching
stream as the same bytes (the Watch method's serializer passes bytes through).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import any_pb2

from apiserver.admission import PodAdmission
from apiserver.authz.attributes import Attributes
from apiserver.metrics import Metrics
from apiserver.objectstore import ObjectStore
from apiserver.pki import Identity
from apiserver.rpc import Authenticator, Call, Guard, abort_with, attributes, passthrough, unary
from apiserver.watchcache import WatchCache
from shoal import errors, selectors
from shoal.api.resources.v1 import resources_pb2 as pb
from shoal.kinds import RBAC, Kind, KindTable

log = logging.getLogger(__name__)

SERVICE = "shoal.resources.v1.Resources"
VERSION = "0.1.0"


class ResourceAPI:
    """The Resources service. ``handler()`` gives the grpc generic handler."""

    def __init__(
        self,
        *,
        kinds: KindTable,
        objects: ObjectStore,
        cache: WatchCache,
        metrics: Metrics,
        storage_name: str,
        authn: Authenticator,
        guard: Guard,
        admission: PodAdmission | None = None,
        cache_wait: float = 10.0,
    ) -> None:
        self.authn = authn
        # Image registries and hostPath on pods and pod templates (apiserver.admission).
        self.admission = admission
        self.guard = guard
        self.kinds = kinds
        self.objects = objects
        self.cache = cache
        self.metrics = metrics
        self.storage_name = storage_name
        self.cache_wait = cache_wait

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def unary(fn: Any, req: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=passthrough)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Create": unary(self.create, pb.CreateRequest),
            "Get": unary(self.get, pb.GetRequest),
            "List": unary(self.list, pb.ListRequest),
            "Update": unary(self.update, pb.UpdateRequest),
            "UpdateStatus": unary(self.update_status, pb.UpdateRequest),
            "Delete": unary(self.delete, pb.DeleteRequest),
            "Discover": unary(self.discover, pb.DiscoverRequest),
            "Version": unary(self.version, pb.VersionRequest),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch, request_deserializer=pb.WatchRequest.FromString,
                response_serializer=passthrough),
        })

    # -- helpers ----------------------------------------------------------------

    def _kind(self, group: str, resource: str) -> Kind:
        if not resource:
            raise errors.BadRequest("the request names no resource")
        return self.kinds.by_resource(group, resource)

    def _namespace(self, kind: Kind, namespace: str) -> str:
        return namespace if kind.namespaced else ""

    def _selectors(self, kind: Kind, label_selector: str, field_selector: str
                   ) -> tuple[selectors.LabelSelector, selectors.FieldSelector]:
        labels = selectors.parse_labels(label_selector)
        fields = selectors.parse_fields(field_selector, supported=frozenset(kind.fields),
                                        kind=kind.kind)
        return labels, fields

    # -- what each request asks to do (for the authorizer and the audit) -------

    def _about(self, ident: Identity, verb: str, kind: Kind, *, namespace: str, name: str,
               subresource: str = "") -> Attributes:
        return attributes(ident, verb, group=kind.group, resource=kind.resource,
                          subresource=subresource,
                          namespace=namespace if kind.namespaced else "", name=name)

    def describe_write(self, request: pb.CreateRequest | pb.UpdateRequest, ident: Identity,
                       verb: str, subresource: str = "") -> Attributes:
        kind, obj = self.objects.decode_any(request.object)
        return self._about(ident, verb, kind, namespace=obj.metadata.namespace,
                           name=obj.metadata.name, subresource=subresource)

    async def admit_write(self, request: pb.CreateRequest | pb.UpdateRequest,
                          ident: Identity, *, update: bool = False) -> None:
        """RBAC escalation prevention (a Role or binding granting more than the
        caller holds is refused), and pod admission (allowed registries, hostPath)."""
        escalation = self.guard.escalation
        if escalation is None and self.admission is None:
            return
        kind, obj = self.objects.decode_any(request.object)
        a = attributes(ident, "create")
        if kind.group == RBAC and escalation is not None:
            escalation.check(user=a.user, groups=a.groups, resource=kind.resource, obj=obj)
        if self.admission is not None:
            old = None
            if update and self.admission.applies_to(kind):
                # Like Pod Security Admission, an update that leaves the pod spec as
                # it is (a finalizer, a label, a scale) is not checked again.
                try:
                    old = await self.objects.get(kind, namespace=obj.metadata.namespace,
                                                 name=obj.metadata.name)
                except errors.NotFound:
                    old = None
            await self.admission.admit(kind, obj, user=a.user, groups=a.groups, old=old)

    def describe_named(self, request: pb.GetRequest | pb.DeleteRequest, ident: Identity,
                       verb: str) -> Attributes:
        kind = self._kind(request.group, request.resource)
        return self._about(ident, verb, kind, namespace=request.namespace, name=request.name)

    def describe_collection(self, request: pb.ListRequest | pb.WatchRequest, ident: Identity,
                            verb: str) -> Attributes:
        kind = self._kind(request.group, request.resource)
        return self._about(ident, verb, kind, namespace=request.namespace,
                           name=_single_name(request.field_selector))

    def _response(self, kind: Kind, obj: Any) -> pb.ObjectResponse:
        return pb.ObjectResponse(object=any_pb2.Any(type_url=kind.type_url,
                                                    value=obj.SerializeToString()))

    # -- unary methods ----------------------------------------------------------

    @unary("Create", describe=lambda api, r, i: api.describe_write(r, i, "create"),
           admit=lambda api, r, i: api.admit_write(r, i))
    async def create(self, request: pb.CreateRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind, obj = self.objects.decode_any(request.object)
        created = await self.objects.create(kind, obj, dry_run=request.dry_run)
        return self._response(kind, created)

    @unary("Get", describe=lambda api, r, i: api.describe_named(r, i, "get"))
    async def get(self, request: pb.GetRequest,
                  context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind = self._kind(request.group, request.resource)
        if not request.name:
            raise errors.BadRequest("the request names no object")
        obj = await self.objects.get(kind, namespace=self._namespace(kind, request.namespace),
                                     name=request.name)
        return self._response(kind, obj)

    @unary("List", describe=lambda api, r, i: api.describe_collection(r, i, "list"))
    async def list(self, request: pb.ListRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListResponse:
        kind = self._kind(request.group, request.resource)
        labels, fields = self._selectors(kind, request.label_selector, request.field_selector)
        namespace = self._namespace(kind, request.namespace)
        if request.limit < 0:
            raise errors.BadRequest("limit must be >= 0")
        token = getattr(request, "continue")
        from_cache = not request.limit and not token
        if from_cache:
            await self.cache.wait_ready(self.cache_wait)
            if request.resource_version not in ("", "0"):
                wanted = _parse_rv(request.resource_version)
                if not await self.cache.wait_fresh(wanted):
                    raise errors.Unavailable("too large resource version: the cache has not "
                                             f"reached {wanted} yet", retry_after=1.0)
            elif request.resource_version == "":
                # Consistent read: from the cache once it has caught up with storage,
                # else straight from storage.
                from_cache = await self.cache.caught_up()
        if from_cache:
            items, revision = self.cache.list(kind, namespace=namespace, labels=labels,
                                              fields=fields)
            return pb.ListResponse(items=items, resource_version=str(revision))
        page = await self.objects.list_page(
            kind, namespace=namespace, labels=labels, fields=fields,
            limit=int(request.limit) or 0, continue_token=token)
        resp = pb.ListResponse(items=page.items, resource_version=str(page.revision))
        setattr(resp, "continue", page.continue_token)
        if page.remaining is not None:
            resp.remaining_item_count = page.remaining
        return resp

    @unary("Update", describe=lambda api, r, i: api.describe_write(r, i, "update"),
           admit=lambda api, r, i: api.admit_write(r, i, update=True))
    async def update(self, request: pb.UpdateRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind, obj = self.objects.decode_any(request.object)
        updated = await self.objects.update(kind, obj, dry_run=request.dry_run)
        return self._response(kind, updated)

    @unary("UpdateStatus",
           describe=lambda api, r, i: api.describe_write(r, i, "update", "status"))
    async def update_status(self, request: pb.UpdateRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind, obj = self.objects.decode_any(request.object)
        updated = await self.objects.update(kind, obj, status_only=True,
                                            dry_run=request.dry_run)
        return self._response(kind, updated)

    @unary("Delete", describe=lambda api, r, i: api.describe_named(r, i, "delete"))
    async def delete(self, request: pb.DeleteRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind = self._kind(request.group, request.resource)
        if not request.name:
            raise errors.BadRequest("the request names no object")
        grace = request.grace_period_seconds if request.HasField("grace_period_seconds") else None
        obj = await self.objects.delete(
            kind, namespace=self._namespace(kind, request.namespace), name=request.name,
            uid=request.preconditions.uid,
            resource_version=request.preconditions.resource_version,
            grace_period=grace, propagation=request.propagation_policy,
            dry_run=request.dry_run)
        return self._response(kind, obj)

    @unary("Discover")
    async def discover(self, request: pb.DiscoverRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.DiscoverResponse:
        return pb.DiscoverResponse(resources=[
            pb.APIResource(group=k.group, version=k.version, kind=k.kind, resource=k.resource,
                           namespaced=k.namespaced, short_names=list(k.short_names),
                           has_status=k.has_status, message_type=k.type_name)
            for k in self.kinds
        ])

    @unary("Version")
    async def version(self, request: pb.VersionRequest,
                      context: grpc.aio.ServicerContext[Any, Any]) -> pb.VersionResponse:
        return pb.VersionResponse(version=VERSION, storage=self.storage_name,
                                  python=platform.python_version())

    # -- watch ------------------------------------------------------------------

    async def watch(self, request: pb.WatchRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        call = Call(self, "Watch", request)
        try:
            await call.admit(context, request,
                             lambda api, r, i: api.describe_collection(r, i, "watch"))
            kind = self._kind(request.group, request.resource)
            labels, fields = self._selectors(kind, request.label_selector,
                                             request.field_selector)
            rv = None if request.resource_version in ("", "0") else _parse_rv(
                request.resource_version)
            await self.cache.wait_ready(self.cache_wait)
            watcher = self.cache.watch(
                kind, namespace=self._namespace(kind, request.namespace), labels=labels,
                fields=fields, resource_version=rv, bookmarks=request.allow_bookmarks)
        except errors.ShoalError as e:
            call.finish(e)
            await abort_with(context, e)
            return
        # Metrics count a watch once, when it starts; the audit also records its end.
        call.count()
        call.started()
        sent = self.metrics.watch_events.labels(kind.qualified_resource)
        ended: BaseException | None = None
        try:
            while True:
                try:
                    batch = await watcher.next_batch()
                except errors.ShoalError as e:
                    ended = e
                    await abort_with(context, e)
                    return
                for data in batch:
                    yield data
                sent.inc(len(batch))
        except BaseException as e:
            ended = ended or e
            raise
        finally:
            self.cache.unwatch(watcher)
            call.finish(ended)


def _single_name(field_selector: str) -> str:
    """The name a ``metadata.name=X`` field selector pins (kube authorizes such a
    list or watch as one of that object, so resourceNames rules can allow it)."""
    text = field_selector.strip()
    for prefix in ("metadata.name==", "metadata.name="):
        if text.startswith(prefix) and "," not in text:
            return text[len(prefix):]
    return ""


def _parse_rv(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise errors.BadRequest(f"invalid resourceVersion {text!r}: must be a number") from None
    if value < 0:
        raise errors.BadRequest(f"invalid resourceVersion {text!r}")
    return value
