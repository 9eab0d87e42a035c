"""The Endpoints controller: per Service with a selector, who serves it right now.

    informers: Services, Pods, Endpoints
      Service add/update/delete        -> its key
      Pod add/update/delete            -> keys of the Services selecting it (old and new labels)
      Endpoints update/delete          -> its key (someone changed or removed ours)
    worker(namespace/name):
      plan(service, pods, existing) -> create | update | delete | nothing  (pure)
    every 30 s: every Service again

What a Service's Endpoints hold (Kubernetes' Endpoints controller):

- one address per pod matching the selector, in the Service's namespace, with a
  pod IP, not Succeeded or Failed, and not terminating (a terminating pod is
  left out, as Kubernetes does, unless ``publishNotReadyAddresses``);
- ``addresses`` for pods whose Ready condition is True (or every pod with
  ``publishNotReadyAddresses``), ``notReadyAddresses`` for the rest;
- each address: ip, nodeName, targetRef (the pod), ``hostname`` when the pod's
  ``spec.hostname`` is set and its ``spec.subdomain`` is the Service's name,
  and (a Shoal extension for mesh subsets) the pod's labels;
- ports from each Service port's ``targetPort``: a number as is, a name looked
  up among the pod's container ports of the same protocol (a pod without it is
  left out of that port); pods with the same ports share one subset, as
  Kubernetes' ``RepackSubsets`` does, sorted so that a plan is stable;
- a headless Service without ports gets its addresses with no ports.

Services without a selector are left alone (their Endpoints are managed by
hand). When a Service goes, its Endpoints are deleted.

Contract: ``plan`` is pure; ``sync`` re-reads the informers and is idempotent;
writes carry the resourceVersion read (a conflict retries through the queue).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import every, run_workers
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.informer import NAMESPACE_INDEX, Informer, key_of
from shoal.queueing import WorkQueue

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
HEADLESS_LABEL = "service.kubernetes.io/headless"


# --------------------------------------------------------------------------- plan (pure)


@dataclass(frozen=True)
class Plan:
    """What to do with one Service's Endpoints: "", "create", "update" or "delete"."""

    action: str
    endpoints: core_pb2.Endpoints | None = None


def selects(selector: dict[str, str] | Any, labels: dict[str, str] | Any) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _is_ready(pod: core_pb2.Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)


def _should_include(pod: core_pb2.Pod, *, include_terminating: bool) -> bool:
    if not pod.status.pod_ip:
        return False
    if pod.status.phase in ("Succeeded", "Failed"):
        return False
    return include_terminating or not pod.metadata.HasField("deletion_timestamp")


def _container_port(pod: core_pb2.Pod, name: str, protocol: str) -> int:
    for c in pod.spec.containers:
        for p in c.ports:
            if p.name == name and (p.protocol or "TCP") == protocol:
                return int(p.container_port)
    return 0


def pod_ports(service: core_pb2.Service, pod: core_pb2.Pod
              ) -> tuple[core_pb2.EndpointPort, ...]:
    """The Service's ports as this pod serves them (unresolvable names left out)."""
    out: list[core_pb2.EndpointPort] = []
    for sp in service.spec.ports:
        target = sp.target_port
        which = target.WhichOneof("value")
        protocol = sp.protocol or "TCP"
        if which == "str_val" and target.str_val:
            number = _container_port(pod, target.str_val, protocol)
        elif which == "int_val" and target.int_val:
            number = int(target.int_val)
        else:
            number = int(sp.port)
        if not number:
            continue
        port = core_pb2.EndpointPort(name=sp.name, port=number, protocol=protocol)
        if sp.HasField("app_protocol"):
            port.app_protocol = sp.app_protocol
        out.append(port)
    return tuple(out)


def _address(service: core_pb2.Service, pod: core_pb2.Pod) -> core_pb2.EndpointAddress:
    addr = core_pb2.EndpointAddress(ip=pod.status.pod_ip, node_name=pod.spec.node_name)
    if pod.spec.hostname and pod.spec.subdomain == service.metadata.name:
        addr.hostname = pod.spec.hostname
    ref = addr.target_ref
    ref.kind, ref.namespace = "Pod", pod.metadata.namespace
    ref.name, ref.uid = pod.metadata.name, pod.metadata.uid
    addr.labels.update(pod.metadata.labels)
    return addr


def _port_key(ports: Sequence[core_pb2.EndpointPort]) -> tuple[tuple[str, int, str, str], ...]:
    return tuple(sorted((p.name, p.port, p.protocol, p.app_protocol) for p in ports))


def desired_subsets(service: core_pb2.Service, pods: Iterable[core_pb2.Pod]
                    ) -> list[core_pb2.EndpointSubset]:
    """The subsets a Service's Endpoints should hold, repacked and sorted."""
    publish = service.spec.publish_not_ready_addresses
    headless_no_ports = service.spec.cluster_ip == "None" and not service.spec.ports
    groups: dict[tuple[Any, ...], tuple[list[core_pb2.EndpointPort], list[Any], list[Any]]] = {}
    for pod in pods:
        if pod.metadata.namespace != service.metadata.namespace:
            continue
        if not selects(service.spec.selector, pod.metadata.labels):
            continue
        if not _should_include(pod, include_terminating=publish):
            continue
        ports = list(pod_ports(service, pod))
        if not ports and not headless_no_ports:
            continue
        key = _port_key(ports)
        group = groups.setdefault(key, (sorted(ports, key=lambda p: (p.name, p.port)), [], []))
        (group[1] if publish or _is_ready(pod) else group[2]).append(_address(service, pod))
    out: list[core_pb2.EndpointSubset] = []
    for key in sorted(groups):
        ports, ready, not_ready = groups[key]
        subset = core_pb2.EndpointSubset()
        subset.addresses.extend(sorted(ready, key=_address_order))
        subset.not_ready_addresses.extend(sorted(not_ready, key=_address_order))
        subset.ports.extend(ports)
        out.append(subset)
    return out


def _address_order(a: core_pb2.EndpointAddress) -> tuple[str, str]:
    return (a.ip, a.target_ref.uid)


def desired_labels(service: core_pb2.Service) -> dict[str, str]:
    labels = dict(service.metadata.labels)
    if service.spec.cluster_ip == "None":
        labels[HEADLESS_LABEL] = ""
    else:
        labels.pop(HEADLESS_LABEL, None)
    return labels


def plan(service: core_pb2.Service | None, pods: Iterable[core_pb2.Pod],
         existing: core_pb2.Endpoints | None) -> Plan:
    """Create, update, delete or leave one Service's Endpoints (pure)."""
    if service is None:
        return Plan("delete", existing) if existing is not None else Plan("")
    if not service.spec.selector:
        return Plan("")  # managed by hand
    subsets = desired_subsets(service, pods)
    labels = desired_labels(service)
    if existing is None:
        ep = core_pb2.Endpoints()
        ep.metadata.name, ep.metadata.namespace = (service.metadata.name,
                                                   service.metadata.namespace)
        ep.metadata.labels.update(labels)
        ep.subsets.extend(subsets)
        return Plan("create", ep)
    if list(existing.subsets) == subsets and dict(existing.metadata.labels) == labels:
        return Plan("")
    ep = core_pb2.Endpoints()
    ep.CopyFrom(existing)
    ep.metadata.labels.clear()
    ep.metadata.labels.update(labels)
    del ep.subsets[:]
    ep.subsets.extend(subsets)
    return Plan("update", ep)


# --------------------------------------------------------------------------- controller


class EndpointsController:
    name = "endpoints"

    def __init__(self, *, resync_period: float = RESYNC_SECONDS) -> None:
        self.queue = WorkQueue(base_delay=0.05, max_delay=30.0)
        self.resync_period = resync_period
        self._services: Informer[core_pb2.Service] | None = None
        self._pods: Informer[core_pb2.Pod] | None = None
        self._endpoints: Informer[core_pb2.Endpoints] | None = None
        self._client: AsyncClient | None = None
        self._ctx: ControllerContext | None = None

    def setup(self, ctx: ControllerContext) -> None:
        self._ctx = ctx
        self._client = ctx.client
        self._services = ctx.informers.get(core_pb2.Service)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._endpoints = ctx.informers.get(core_pb2.Endpoints)
        self._services.add_handlers(on_add=self._enqueue_obj,
                                    on_update=lambda _old, new: self._enqueue_obj(new),
                                    on_delete=self._enqueue_obj)
        self._pods.add_handlers(on_add=self._on_pod,
                                on_update=self._on_pod_update,
                                on_delete=self._on_pod)
        self._endpoints.add_handlers(on_update=lambda _old, new: self._enqueue_obj(new),
                                     on_delete=self._enqueue_obj)

    def _enqueue_obj(self, obj: Any) -> None:
        self.queue.add(key_of(obj))

    def _services_for(self, pod: core_pb2.Pod) -> list[str]:
        assert self._services is not None
        return [key_of(s) for s in self._services.by_index(NAMESPACE_INDEX,
                                                             pod.metadata.namespace)
                if selects(s.spec.selector, pod.metadata.labels)]

    def _on_pod(self, pod: core_pb2.Pod) -> None:
        for key in self._services_for(pod):
            self.queue.add(key)

    def _on_pod_update(self, old: core_pb2.Pod, new: core_pb2.Pod) -> None:
        for key in {*self._services_for(old), *self._services_for(new)}:
            self.queue.add(key)

    def _resync(self) -> None:
        assert self._services is not None
        for key in list(self._services.keys()):
            self.queue.add(key)

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        self._resync()
        # Endpoints whose Service went while no controller ran.
        assert self._endpoints is not None
        for key in list(self._endpoints.keys()):
            self.queue.add(key)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(run_workers(self.queue, self.sync, count=ctx.settings.workers,
                                           what="endpoints"))
                tg.create_task(every(self.resync_period, self._resync))
        finally:
            self.queue.close()

    async def sync(self, key: str) -> float | None:
        assert self._services is not None and self._pods is not None
        assert self._endpoints is not None and self._client is not None
        namespace, _, name = key.partition("/")
        service = self._services.get(namespace, name)
        existing = self._endpoints.get(namespace, name)
        if service is None and existing is not None:
            # The cache may lag behind a just-created Service: ask before deleting.
            try:
                service = await self._client.get(core_pb2.Service, name, namespace=namespace)
            except errors.NotFound:
                service = None
        pods = self._pods.by_index(NAMESPACE_INDEX, namespace)
        p = plan(service, pods, existing)
        try:
            if p.action == "create" and p.endpoints is not None:
                await self._client.create(p.endpoints)
            elif p.action == "update" and p.endpoints is not None:
                await self._client.update(p.endpoints)
            elif p.action == "delete" and p.endpoints is not None:
                await self._client.delete(core_pb2.Endpoints, name, namespace=namespace,
                                          uid=p.endpoints.metadata.uid)
        except errors.NotFound:
            if p.action != "delete":
                raise
        except errors.AlreadyExists:
            raise errors.Conflict(f"endpoints {key} appeared meanwhile") from None
        except (errors.Invalid, errors.Forbidden) as e:
            if service is not None and self._ctx is not None:
                self._ctx.events.event(service, "Warning", "FailedToUpdateEndpoint",
                                       f"Failed to update endpoint {key}: {e}")
            raise
        return None
