"""What every in-process controller gets, and the shape it has.

    ControllerManager (leader) --> SharedInformers (one per kind and filter)
                               --> each Controller.run(ctx), in one TaskGroup
    leadership lost --> every controller cancelled; informers stopped

A controller follows STYLE.md: informer events only enqueue keys into a
``WorkQueue``; workers read the current state from the informers' caches,
``plan`` what to do (pure, table-tested), and act through ``ctx.client``;
errors go back to the queue with per-key back-off. Controllers wait for
``ctx.informers.synced()`` before their first pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message

from shoal.client import AsyncClient
from shoal.events import EventRecorder
from shoal.informer import Informer

T = TypeVar("T", bound=Message)


@dataclass(frozen=True)
class ControllerSettings:
    """Knobs, with Kubernetes' defaults; tests shorten them."""

    node_monitor_grace_period: float = 40.0
    pod_eviction_timeout: float = 300.0
    service_cluster_ip_range: str = "10.96.0.0/16"
    workers: int = 4
    # How often each HorizontalPodAutoscaler is evaluated.
    hpa_sync_period: float = 15.0


class SharedInformers:
    """One Informer per (kind, namespace, label selector, field selector), shared."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._informers: dict[tuple[Any, ...], Informer[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    def get(self, kind: type[T], *, namespace: str = "", label_selector: str = "",
            field_selector: str = "",
            indexers: dict[str, Callable[[T], Any]] | None = None) -> Informer[T]:
        k = (kind, namespace, label_selector, field_selector)
        inf = self._informers.get(k)
        if inf is None:
            inf = Informer(self.client, kind, namespace=namespace,
                           label_selector=label_selector, field_selector=field_selector,
                           indexers=indexers)
            self._informers[k] = inf
            if self._started:
                self._tasks.append(asyncio.create_task(inf.run(), name=f"informer-{kind}"))
        return inf

    def start(self) -> None:
        self._started = True
        for inf in self._informers.values():
            self._tasks.append(asyncio.create_task(inf.run(),
                                                   name=f"informer-{inf.kind.__name__}"))

    async def synced(self) -> None:
        await asyncio.gather(*(inf.synced.wait() for inf in self._informers.values()))

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()
        self._started = False


@dataclass
class ControllerContext:
    client: AsyncClient
    informers: SharedInformers
    events: EventRecorder
    settings: ControllerSettings = field(default_factory=ControllerSettings)
    clock: Callable[[], float] = time.time


class Controller(Protocol):
    name: str

    def setup(self, ctx: ControllerContext) -> None:
        """Ask for informers (before they start) and register handlers."""

    async def run(self, ctx: ControllerContext) -> None:
        """Work until cancelled."""
