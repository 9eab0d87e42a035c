"""Resource usage of this node and its pods, sampled from CRI stats, for the metrics API.

    every ``interval`` s:  CRI ListContainerStats  +  the node's own counters
                           (/proc/stat CPU time, /proc/meminfo)
                              |
                              v
                    Sample (cumulative CPU ns, working set, time)
                              |
        usage_between(previous, current)  [pure] -> NodeStats (rates)
                              |
                              v
              ``latest`` -- NodeAgent/Stats --> apiserver Metrics API

CPU use is a rate: the difference of two cumulative ``usageCoreNanoSeconds``
readings over the time between them, in nanocores (as the kubelet's summary
API does). A container seen only once has no rate yet and is left out, and so
is its pod until every running container of it has one; memory is the working
set CRI reports. The node's CPU is all of the machine's non-idle time, its
memory ``MemTotal - MemAvailable``.

Contract: ``sample_once`` never raises for a failed CRI call; it keeps the
last good answer (``latest`` stays what it was) and logs. ``run`` samples
until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nodeagent.runtimestate import LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE
from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.api.metrics.v1beta1 import metrics_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0
_NS = 1_000_000_000


class StatsSource(Protocol):
    """The narrow part of the CRI client this needs (a fake CRI runtime in tests)."""

    async def list_container_stats(self, *, sandbox_id: str = "",
                                   labels: Mapping[str, str] | None = None
                                   ) -> list[cri.ContainerStats]: ...


@dataclass(frozen=True)
class ContainerSample:
    namespace: str
    pod: str
    container: str
    cpu_ns: int            # cumulative CPU time
    at_ns: int             # when CRI read it
    working_set: int       # bytes


@dataclass(frozen=True)
class NodeSample:
    cpu_ns: int
    at_ns: int
    memory: int


@dataclass(frozen=True)
class Sample:
    node: NodeSample
    containers: Mapping[str, ContainerSample]  # by container id


def container_samples(stats: Sequence[cri.ContainerStats]) -> dict[str, ContainerSample]:
    out: dict[str, ContainerSample] = {}
    for s in stats:
        labels = s.attributes.labels
        ns, pod = labels.get(LABEL_POD_NAMESPACE, ""), labels.get(LABEL_POD_NAME, "")
        if not ns or not pod or not s.cpu.HasField("usage_core_nano_seconds"):
            continue
        out[s.attributes.id] = ContainerSample(
            namespace=ns, pod=pod,
            container=labels.get(LABEL_CONTAINER_NAME, "") or s.attributes.metadata.name,
            cpu_ns=int(s.cpu.usage_core_nano_seconds.value), at_ns=int(s.cpu.timestamp),
            working_set=int(s.memory.working_set_bytes.value))
    return out


def _rate(before_ns: int, after_ns: int, before_at: int, after_at: int) -> int | None:
    """Nanocores between two cumulative readings; None when there is no interval
    or the counter went back (a restarted container under the same id)."""
    if after_at <= before_at or after_ns < before_ns:
        return None
    return (after_ns - before_ns) * _NS // (after_at - before_at)


def _stamp(message: pb.NodeMetrics | pb.PodMetrics, *, at_ns: int, window_ns: int) -> None:
    message.timestamp.FromNanoseconds(at_ns)
    message.window.FromNanoseconds(window_ns)


def _usage(target: Any, *, nanocores: int, working_set: int) -> None:
    target["cpu"].value = f"{nanocores}n"
    target["memory"].value = f"{working_set // 1024}Ki"


def usage_between(previous: Sample, current: Sample, *, node_name: str) -> pb.NodeStats:
    """The node's and each complete pod's usage over the time between two samples."""
    out = pb.NodeStats()
    node = out.node
    node.metadata.name = node_name
    node_rate = _rate(previous.node.cpu_ns, current.node.cpu_ns, previous.node.at_ns,
                      current.node.at_ns)
    _stamp(node, at_ns=current.node.at_ns,
           window_ns=current.node.at_ns - previous.node.at_ns)
    _usage(node.usage, nanocores=node_rate or 0, working_set=current.node.memory)
    pods: dict[tuple[str, str], list[tuple[ContainerSample, int | None, int]]] = {}
    for cid, now in sorted(current.containers.items(), key=lambda kv: kv[1].container):
        before = previous.containers.get(cid)
        rate = None if before is None else _rate(before.cpu_ns, now.cpu_ns, before.at_ns,
                                                 now.at_ns)
        window = 0 if before is None else now.at_ns - before.at_ns
        pods.setdefault((now.namespace, now.pod), []).append((now, rate, window))
    for (ns, name), containers in sorted(pods.items()):
        if any(rate is None for _, rate, _ in containers):
            continue  # a container without a rate yet: the pod's usage would be short
        pod = out.pods.add()
        pod.metadata.namespace, pod.metadata.name = ns, name
        _stamp(pod, at_ns=max(c.at_ns for c, _, _ in containers),
               window_ns=max(w for _, _, w in containers))
        for c, rate, _ in containers:
            cm = pod.containers.add(name=c.container)
            _usage(cm.usage, nanocores=rate or 0, working_set=c.working_set)
    return out


# -- the node's own counters --------------------------------------------------------------


def parse_proc_stat(text: str, *, ticks_per_second: int) -> int:
    """Cumulative non-idle CPU time of the machine, in ns, from /proc/stat."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            # user nice system idle iowait irq softirq steal (guest is inside user)
            values = [int(v) for v in fields[1:9]]
            busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)
            return busy * _NS // ticks_per_second
    raise errors.InternalError("/proc/stat has no cpu line")


def parse_meminfo(text: str) -> int:
    """Bytes in use (MemTotal - MemAvailable) from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    return values.get("MemTotal", 0) - values.get("MemAvailable", 0)


def read_node_sample(proc: Path = Path("/proc")) -> NodeSample:
    ticks = os.sysconf("SC_CLK_TCK")
    return NodeSample(
        cpu_ns=parse_proc_stat((proc / "stat").read_text(), ticks_per_second=ticks),
        at_ns=time.time_ns(),
        memory=parse_meminfo((proc / "meminfo").read_text()))


class UsageSampler:
    """Samples every ``interval`` seconds; ``latest`` is the newest usage (None
    until two samples were taken)."""

    def __init__(self, *, runtime: StatsSource, node_name: str,
                 interval: float = DEFAULT_INTERVAL,
                 node_sample: Callable[[], NodeSample] = read_node_sample) -> None:
        self.runtime = runtime
        self.node_name = node_name
        self.interval = interval
        self.node_sample = node_sample
        self.previous: Sample | None = None
        self.latest: pb.NodeStats | None = None

    async def sample_once(self) -> None:
        try:
            stats = await self.runtime.list_container_stats()
            node = await asyncio.to_thread(self.node_sample)
        except (errors.ShoalError, OSError) as e:
            log.warning("usage sample failed (keeping the last one): %s", e)
            return
        current = Sample(node=node, containers=container_samples(stats))
        if self.previous is not None:
            self.latest = usage_between(self.previous, current, node_name=self.node_name)
        self.previous = current

    async def run(self) -> None:
        while True:
            await self.sample_once()
            await asyncio.sleep(self.interval)
