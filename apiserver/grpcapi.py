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

from apiserver.metrics import Metrics
from apiserver.objectstore import ObjectStore
from apiserver.rpc import Authenticator, abort_with, grpc_code, passthrough, unary
from apiserver.watchcache import WatchCache
from shoal import errors, selectors
from shoal.api.resources.v1 import resources_pb2 as pb
from shoal.kinds import Kind, KindTable

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
        cache_wait: float = 10.0,
    ) -> None:
        self.authn = authn
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

    def _response(self, kind: Kind, obj: Any) -> pb.ObjectResponse:
        return pb.ObjectResponse(object=any_pb2.Any(type_url=kind.type_url,
                                                    value=obj.SerializeToString()))

    # -- unary methods ----------------------------------------------------------

    @unary("Create")
    async def create(self, request: pb.CreateRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind, obj = self.objects.decode_any(request.object)
        created = await self.objects.create(kind, obj, dry_run=request.dry_run)
        return self._response(kind, created)

    @unary("Get")
    async def get(self, request: pb.GetRequest,
                  context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind = self._kind(request.group, request.resource)
        if not request.name:
            raise errors.BadRequest("the request names no object")
        obj = await self.objects.get(kind, namespace=self._namespace(kind, request.namespace),
                                     name=request.name)
        return self._response(kind, obj)

    @unary("List")
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

    @unary("Update")
    async def update(self, request: pb.UpdateRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind, obj = self.objects.decode_any(request.object)
        updated = await self.objects.update(kind, obj, dry_run=request.dry_run)
        return self._response(kind, updated)

    @unary("UpdateStatus")
    async def update_status(self, request: pb.UpdateRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.ObjectResponse:
        kind, obj = self.objects.decode_any(request.object)
        updated = await self.objects.update(kind, obj, status_only=True,
                                            dry_run=request.dry_run)
        return self._response(kind, updated)

    @unary("Delete")
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
        resource = request.resource or "-"
        try:
            self.authn.require(context)
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
            self.metrics.requests.labels("Watch", resource, grpc_code(e).name).inc()
            await abort_with(context, e)
            return
        self.metrics.requests.labels("Watch", resource, "OK").inc()
        sent = self.metrics.watch_events.labels(kind.qualified_resource)
        try:
            while True:
                try:
                    batch = await watcher.next_batch()
                except errors.ShoalError as e:
                    await abort_with(context, e)
                    return
                for data in batch:
                    yield data
                sent.inc(len(batch))
        finally:
            self.cache.unwatch(watcher)


def _parse_rv(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise errors.BadRequest(f"invalid resourceVersion {text!r}: must be a number") from None
    if value < 0:
        raise errors.BadRequest(f"invalid resourceVersion {text!r}")
    return value
