"""The scheduler: each pending pod gets a node, bound by one atomic write of spec.nodeName.

    Node informer --set_node/remove_node--> ClusterState (placement.py)
    Pod informer  --bound pods: add/remove--> ClusterState
                  --pending pods (ours)-----> SchedulingQueue

    decision loop (one task; decisions are serialized):
        pop a pod -> placement.schedule() -> node?
          yes: assume it on the node (the next decisions see it)
               -> bind task (up to ``bind_concurrency`` in flight):
                  Update with spec.nodeName, resourceVersion and uid (a CAS)
                    ok        -> finish_binding; Event Normal "Scheduled"
                    Conflict  -> re-read: bound already / gone -> forget; else CAS again
                    error     -> forget; back-off queue
          no:  PodScheduled=False reason Unschedulable (UpdateStatus, only when it
               changes), Event Warning "FailedScheduling"; unschedulable set

A pending pod's life in the queue (kube-scheduler's three queues)::

        informer add / spec or label change
                  |
                  v           back-off expired
    +-------> active -----------------------------+ <----------- backoff
    |             | pop, decide                    |                 ^
    |             +--> assumed --bind ok--> gone from the queue      | bind error
    |             |         +-----------------------------------------+
    |             +--> no fit --> unschedulable
    |                                   | node added/changed, bound pod deleted,
    +-----------------------------------+ (or affinity pods: a pod bound), or
                                          every flush_period the ones older than it
    (those still backing off go to backoff instead of active)

Contract: the queue holds a key at most once; a failed attempt doubles the
pod's back-off (1 s up to 10 s, as kube); the loop never attempts a pod whose
binding is in flight (it is assumed). A binding names the pod's uid and
resourceVersion, and the apiserver refuses to change a nodeName that is set
(``Conflict``), so a pod is never bound twice. An assumed pod whose binding
succeeded but which the informer never shows bound is dropped after
``assume_ttl``, and the pod tried again if it is still pending.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from google.protobuf import timestamp_pb2

from apiserver.controllers.base import ControllerContext
from apiserver.controllers.keyworkers import every
from apiserver.controllers.placement import (
    ClusterState,
    PodInfo,
    is_terminal,
    node_spec,
    pod_info,
    schedule,
)
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.events import EventRecorder
from shoal.informer import Informer, key_of

log = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "default-scheduler"
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 10.0
UNSCHEDULABLE_FLUSH = 60.0     # a pod stays unschedulable at most this long untried
FLUSH_INTERVAL = 30.0
ASSUME_TTL = 30.0
# Bindings in flight. Each waits a round trip through a possibly busy apiserver,
# so throughput is about this many per bind latency (Little's law); kube runs
# every binding in its own goroutine.
BIND_CONCURRENCY = 512
_BIND_ATTEMPTS = 3


class SchedulingQueue:
    """Pending pods by key: active (FIFO), backoff (by ready time), unschedulable.

    Pure: every call takes ``now``; the caller sleeps until ``next_wakeup()``.
    """

    def __init__(self, *, initial_backoff: float = INITIAL_BACKOFF,
                 max_backoff: float = MAX_BACKOFF) -> None:
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._active: deque[str] = deque()
        self._in_active: set[str] = set()
        self._backoff: dict[str, float] = {}           # key -> ready time
        self._heap: list[tuple[float, str]] = []        # may hold stale entries
        self._unschedulable: dict[str, tuple[float, bool]] = {}  # key -> (since, affinity)
        self._attempts: dict[str, tuple[int, float]] = {}        # key -> (failures, last)

    def __contains__(self, key: str) -> bool:
        return key in self._in_active or key in self._backoff or key in self._unschedulable

    def __len__(self) -> int:
        return len(self._in_active) + len(self._backoff) + len(self._unschedulable)

    @property
    def unschedulable(self) -> frozenset[str]:
        return frozenset(self._unschedulable)

    def backoff_until(self, key: str) -> float:
        failures, last = self._attempts.get(key, (0, 0.0))
        if failures == 0:
            return 0.0
        return last + min(self.initial_backoff * (1 << min(failures - 1, 30)), self.max_backoff)

    def add(self, key: str, now: float) -> None:
        """A pending pod appeared or changed in a way that may make it fit."""
        if key in self._in_active or key in self._backoff:
            return
        self._unschedulable.pop(key, None)
        self._requeue(key, now)

    def _requeue(self, key: str, now: float) -> None:
        ready = self.backoff_until(key)
        if ready > now:
            self._backoff[key] = ready
            heapq.heappush(self._heap, (ready, key))
        else:
            self._in_active.add(key)
            self._active.append(key)

    def failed(self, key: str, now: float, *, unschedulable: bool,
               affinity: bool = False) -> None:
        """An attempt failed: no node fits (unschedulable) or an error (back-off)."""
        failures, _ = self._attempts.get(key, (0, 0.0))
        self._attempts[key] = (failures + 1, now)
        if key in self._in_active or key in self._backoff:
            return
        if unschedulable:
            self._unschedulable[key] = (now, affinity)
        else:
            self._requeue(key, now)

    def succeeded(self, key: str) -> None:
        self._attempts.pop(key, None)

    def remove(self, key: str) -> None:
        """The pod is bound, gone, or not ours: forget it entirely."""
        if key in self._in_active:
            self._in_active.discard(key)
            self._active.remove(key)
        self._backoff.pop(key, None)
        self._unschedulable.pop(key, None)
        self._attempts.pop(key, None)

    def move_all(self, now: float, *, affinity_only: bool = False) -> int:
        """The cluster changed: unschedulable pods (those with pod affinity only) retry."""
        moved = [k for k, (_, aff) in self._unschedulable.items() if aff or not affinity_only]
        for key in moved:
            del self._unschedulable[key]
            self._requeue(key, now)
        return len(moved)

    def flush(self, now: float, *, max_age: float) -> int:
        """Unschedulable pods that waited longer than ``max_age`` retry anyway."""
        old = [k for k, (since, _) in self._unschedulable.items() if now - since >= max_age]
        for key in old:
            del self._unschedulable[key]
            self._requeue(key, now)
        return len(old)

    def pop(self, now: float) -> str | None:
        """The next pod to attempt (back-off that expired joins the active queue first)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            ready, key = heapq.heappop(heap)
            if self._backoff.get(key) == ready:
                del self._backoff[key]
                self._in_active.add(key)
                self._active.append(key)
        if not self._active:
            return None
        key = self._active.popleft()
        self._in_active.discard(key)
        return key

    def next_wakeup(self) -> float | None:
        heap = self._heap
        while heap and self._backoff.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


def _responsible(pod: core_pb2.Pod, scheduler_name: str) -> bool:
    name = pod.spec.scheduler_name
    return (name or DEFAULT_SCHEDULER) == scheduler_name


def _pending(pod: core_pb2.Pod, scheduler_name: str) -> bool:
    return (not pod.spec.node_name and not pod.metadata.HasField("deletion_timestamp")
            and not is_terminal(pod) and _responsible(pod, scheduler_name))


def unschedulable_status(pod: core_pb2.Pod, message: str, *, now: float) -> core_pb2.Pod | None:
    """A copy of ``pod`` with PodScheduled=False/Unschedulable, or None if already so."""
    for cond in pod.status.conditions:
        if cond.type == "PodScheduled":
            if (cond.status, cond.reason, cond.message) == ("False", "Unschedulable", message):
                return None
            break
    out = core_pb2.Pod()
    out.CopyFrom(pod)
    found = next((c for c in out.status.conditions if c.type == "PodScheduled"), None)
    cond = found if found is not None else out.status.conditions.add(type="PodScheduled")
    if cond.status != "False" or not cond.HasField("last_transition_time"):
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(int(now * 1e9))
        cond.last_transition_time.CopyFrom(ts)
    cond.status, cond.reason, cond.message = "False", "Unschedulable", message
    if not out.status.phase:
        out.status.phase = "Pending"
    return out


class Scheduler:
    name = "scheduler"

    def __init__(self, *, scheduler_name: str = DEFAULT_SCHEDULER, percentage: int = 0,
                 bind_concurrency: int = BIND_CONCURRENCY,
                 unschedulable_flush: float = UNSCHEDULABLE_FLUSH,
                 flush_interval: float = FLUSH_INTERVAL, assume_ttl: float = ASSUME_TTL,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.scheduler_name = scheduler_name
        self.percentage = percentage
        self.unschedulable_flush = unschedulable_flush
        self.flush_interval = flush_interval
        self.assume_ttl = assume_ttl
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.state = ClusterState()
        self.queue = SchedulingQueue()
        self._bind_slots = asyncio.Semaphore(max(1, bind_concurrency))
        self._wake = asyncio.Event()
        self._start = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pods: Informer[core_pb2.Pod] | None = None
        self._ctx: ControllerContext | None = None
        self.attempts = 0
        self.bound = 0

    # -- wiring -----------------------------------------------------------------

    def setup(self, ctx: ControllerContext) -> None:
        self._ctx = ctx
        nodes = ctx.informers.get(core_pb2.Node)
        nodes.add_handlers(on_add=self._on_node, on_update=lambda _o, n: self._on_node(n),
                           on_delete=self._on_node_delete)
        self._pods = ctx.informers.get(core_pb2.Pod)
        self._pods.add_handlers(on_add=lambda p: self._on_pod(None, p), on_update=self._on_pod,
                                on_delete=self._on_pod_delete)

    @property
    def ctx(self) -> ControllerContext:
        assert self._ctx is not None, "setup() first"
        return self._ctx

    @property
    def pods(self) -> Informer[core_pb2.Pod]:
        assert self._pods is not None, "setup() first"
        return self._pods

    @property
    def events(self) -> EventRecorder:
        return self.ctx.events

    def _kick(self) -> None:
        self._wake.set()

    # -- informer handlers (enqueue and account only) -----------------------------

    def _on_node(self, node: core_pb2.Node) -> None:
        if self.state.set_node(node_spec(node)) and self.queue.move_all(self.clock()):
            self._kick()

    def _on_node_delete(self, node: core_pb2.Node) -> None:
        self.state.remove_node(node.metadata.name)

    def _on_pod(self, old: core_pb2.Pod | None, pod: core_pb2.Pod) -> None:
        key = key_of(pod)
        node = pod.spec.node_name
        state = self.state
        if node:
            self.queue.remove(key)
            if is_terminal(pod):
                self._pod_left(key)
                return
            placed = state.pod(key)
            if (placed is not None and placed.uid == pod.metadata.uid
                    and state.node_of(key) == node
                    and (old is None or old.metadata.labels == pod.metadata.labels)):
                if state.is_assumed(key):
                    state.add_pod(placed, node)        # confirmed; nothing to re-parse
                return
            info = pod_info(pod)
            state.add_pod(info, node)
            if placed is None and self.queue.move_all(self.clock(), affinity_only=True):
                self._kick()
            return
        if not _pending(pod, self.scheduler_name):
            self.queue.remove(key)
            if not state.is_assumed(key):
                self._pod_left(key)
            return
        if state.is_assumed(key):
            return                          # its binding is in flight
        placed = state.pod(key)
        if placed is not None and placed.uid != pod.metadata.uid:
            self._pod_left(key)             # an old pod of the same name
        if (old is not None and key in self.queue
                and old.metadata.generation == pod.metadata.generation
                and old.metadata.labels == pod.metadata.labels):
            return                          # only its status changed (our own condition)
        self.queue.add(key, self.clock())
        self._kick()

    def _on_pod_delete(self, pod: core_pb2.Pod) -> None:
        key = key_of(pod)
        self.queue.remove(key)
        self._pod_left(key)

    def _pod_left(self, key: str) -> None:
        if self.state.node_of(key) is None:
            return
        self.state.remove_pod(key)
        if self.queue.move_all(self.clock()):
            self._kick()

    def _flush(self) -> None:
        now = self.clock()
        moved = self.queue.flush(now, max_age=self.unschedulable_flush)
        for key in self.state.expire(now):
            pod = self.pods.get_by_key(key)
            if pod is not None and _pending(pod, self.scheduler_name):
                self.queue.add(key, now)
                moved += 1
        if moved:
            self._kick()

    # -- the loop -------------------------------------------------------------------

    async def run(self, ctx: ControllerContext) -> None:
        await ctx.informers.synced()
        log.info("scheduler: %d nodes, %d pods placed, %d pending",
                 len(self.state.ordered()), len(self.state), len(self.queue))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(every(self.flush_interval, self._flush), name="scheduler-flush")
                tg.create_task(self._loop(), name="scheduler-loop")
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def _loop(self) -> None:
        while True:
            await self._bind_slots.acquire()
            now = self.clock()
            key = self.queue.pop(now)
            if key is None:
                self._bind_slots.release()
                wake = self.queue.next_wakeup()
                self._wake.clear()
                try:
                    async with asyncio.timeout(None if wake is None else max(0.0, wake - now)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            binding = False
            try:
                binding = self.attempt(key, now)
            except Exception:
                log.exception("scheduling %s failed", key)
                self.queue.failed(key, now, unschedulable=False)
            finally:
                if not binding:
                    self._bind_slots.release()
            await asyncio.sleep(0)          # let informer events and bindings in

    def attempt(self, key: str, now: float) -> bool:
        """One scheduling cycle for ``key``; True when a binding was started."""
        pod = self.pods.get_by_key(key)
        if pod is None or not _pending(pod, self.scheduler_name):
            self.queue.remove(key)
            return False
        if self.state.is_assumed(key):
            return False
        self.attempts += 1
        info = pod_info(pod)
        decision = schedule(info, self.state, start=self._start, percentage=self.percentage,
                            rng=self.rng)
        n = len(self.state.ordered())
        self._start = (self._start + decision.processed) % n if n else 0
        if decision.node is None:
            self.queue.failed(key, now, unschedulable=True, affinity=bool(info.affinity))
            self._spawn(self._report_unschedulable(pod, decision.message))
            return False
        self.state.assume(info, decision.node)
        self._spawn(self._bind(pod, info, decision.node))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- actions ----------------------------------------------------------------------

    async def _bind(self, pod: core_pb2.Pod, info: PodInfo, node: str) -> None:
        key = info.key
        try:
            done = await self._write_binding(pod, node)
        except errors.ShoalError as e:
            self.state.forget(key)
            self.queue.failed(key, self.clock(), unschedulable=False)
            self._kick()
            log.info("binding %s to %s failed: %s", key, node, e)
            self.events.event(pod, "Warning", "FailedScheduling", f"Binding rejected: {e}")
            return
        finally:
            self._bind_slots.release()
        if not done:
            self.state.forget(key)
            self.queue.remove(key)
            return
        self.state.finish_binding(key, deadline=self.clock() + self.assume_ttl)
        self.queue.succeeded(key)
        self.bound += 1
        self.events.event(pod, "Normal", "Scheduled",
                          f"Successfully assigned {key} to {node}")

    async def _write_binding(self, pod: core_pb2.Pod, node: str) -> bool:
        """Set spec.nodeName (CAS on resourceVersion and uid). False: bound elsewhere or gone."""
        client = self.ctx.client
        meta = pod.metadata
        want = core_pb2.Pod()
        want.CopyFrom(pod)
        want.ClearField("status")
        want.spec.node_name = node
        for _ in range(_BIND_ATTEMPTS):
            try:
                await client.update(want)
                return True
            except errors.NotFound:
                return False
            except errors.Conflict:
                try:
                    fresh = await client.get(core_pb2.Pod, meta.name, namespace=meta.namespace)
                except errors.NotFound:
                    return False
                if fresh.metadata.uid != meta.uid or fresh.spec.node_name:
                    return fresh.metadata.uid == meta.uid and fresh.spec.node_name == node
                if not _pending(fresh, self.scheduler_name):
                    return False
                fresh.ClearField("status")
                fresh.spec.node_name = node
                want = fresh
        raise errors.Conflict(f"pod {meta.namespace}/{meta.name} kept changing while binding")

    async def _report_unschedulable(self, pod: core_pb2.Pod, message: str) -> None:
        self.events.event(pod, "Warning", "FailedScheduling", message)
        out = unschedulable_status(pod, message, now=self.wall())
        if out is None:
            return
        out.metadata.resource_version = ""      # the server merges onto the latest
        try:
            await self.ctx.client.update_status(out)
        except errors.NotFound:
            pass
        except errors.ShoalError as e:
            log.info("pod %s: PodScheduled condition not written: %s", key_of(pod), e)
