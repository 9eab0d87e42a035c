"""A bounded soak (issue 10, part 4): continuous churn on the chaos lab, with
every component's memory, file descriptors and asyncio tasks sampled, then
leak and orphan checks.

Runs last in the chaos session (after the partition test; it uses its own
namespace ``soak`` and pods of its own). For ``SHOAL_SOAK_SECONDS`` (default
120 s; e.g. 600 or 3600 for a longer run) it loops, each round:

- scales two Deployments of the mesh test app (``version`` v1 and v2 behind the
  Service ``soak-web``) between 1 and 3 and 1 and 2 replicas, and creates /
  deletes a third Deployment every other round;
- creates a pod and a Service for it, and deletes those of two rounds before;
- flips the VirtualService's v1/v2 weights (100/0, 50/50, 0/100) over a
  DestinationRule's subsets, and creates or deletes a DENY AuthorizationPolicy
  on ``/deny*``;
- sends HTTP requests (the L7 path) and TCP connections (a Service port named
  ``tcp``: the L4 path) from a client pod's netns to ``soak-web``.

A thread samples, every few seconds, each process the lab's state lists
(apiservers, etcd members, node agents, meshagents, the ingress gateway,
containerd, the registry, Zipkin, the supervisor) by PID: RSS and open FDs
from ``/proc/PID``, and ``shoal_asyncio_tasks`` from its ``/metrics`` where it
serves one (apiservers, node agents, meshagents, gateway).

Checks afterwards (stated bounds, chosen for a short run):

- **memory**: the samples after a warm-up (the first ``WARMUP_FRACTION`` of the
  churn, at least 20 s) are split in quarters; the median RSS of the last
  quarter is at most the first quarter's median plus ``max(RSS_ABS_MIB,
  RSS_REL * first)``. A median of a quarter rides over GC and allocator steps
  that a two-point end-vs-start comparison would mistake for growth. The
  Theil-Sen slope (MiB/min) over the second half of the samples is printed,
  not asserted: in two minutes it mostly measures caches filling (the
  apiserver's watch cache keeps 20,000 revisions);
- **FDs and tasks**: once churn stops and the soak's objects are deleted, each
  component's count comes back to at most its post-warm-up level (the first
  quarter's median) plus ``max(FD_ABS, 10%)`` / ``max(TASKS_ABS, 10%)``,
  within ``SETTLE`` s; the apiservers' counts are summed (a client failing over
  moves its streams from one member to another);
- **no restart**: no component's PID changed during the soak;
- **traffic**: once churn has stopped, a round of requests (10 HTTP, 2 to a
  denied path, 5 TCP) all work; during churn the requests answered and failed
  are counted and printed, not bounded (a request can catch a pod on its way
  out);
- **no orphan**, within ``SETTLE`` s: every CRI sandbox and container on each
  node (its containerd socket) belongs to a pod in the API; no iptables rule,
  in any node's netns or on the host, names an IP that a soak pod or Service
  had and that no pod or Service has now; every network namespace other than
  the nodes' holds the IP of an existing pod.

The figures (per component: samples, RSS first/last quarter/peak, slope, FDs
and tasks post-warm-up/peak/after) go to the chaos figures summary and
``$SHOAL_E2E_FIGURES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.cri import RuntimeClient
from shoal import errors, kinds, manifests
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.meta.v1 import meta_pb2
from shoal.lab import ingress
from shoal.lab.topology import control_plane_members, plan
from shoal.testing import meshapps, podnet
from shoal.testing.waiting import wait_for

from .conftest import NODES, ChaosLab, record

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

NS = "soak"
SOAK_SECONDS = float(os.environ.get("SHOAL_SOAK_SECONDS", "120"))
SAMPLE_EVERY = max(3.0, SOAK_SECONDS / 300)  # at most ~300 samples per component
WARMUP_FRACTION = 0.2
RSS_ABS_MIB, RSS_REL = 32.0, 0.25
FD_ABS, TASKS_ABS, REL = 8, 10, 0.10
SETTLE = 90.0  # the meshagents close idle upstream connections 60-75 s after use
MIB = 1024 * 1024
KINDS = kinds.builtin_kinds()
MESHAGENT_METRICS_PORT = 15020
TCP_PORT = 9000
HTTP_PER_ROUND, TCP_PER_ROUND = 10, 5


# -- sampling --------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    pid: int
    rss: int  # bytes
    fds: int
    tasks: int | None


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tasks(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            body = r.read().decode()
    except OSError:
        return None
    m = re.search(r"^shoal_asyncio_tasks (\d+)", body, re.M)
    return int(m.group(1)) if m else None


class Sampler:
    """Samples every process of the lab's state every ``every`` s in a thread."""

    def __init__(self, lab: ChaosLab, metrics: dict[str, str], every: float) -> None:
        self.lab, self.metrics, self.every = lab, metrics, every
        self.series: dict[str, Series] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, Sample]:
        out = {}
        now = time.monotonic()
        for name, pid in self.lab.pids().items():
            try:
                rss, fds = _rss(pid), _fds(pid)
            except OSError:
                continue  # gone (a restart): the next sample sees the new PID
            url = self.metrics.get(name)
            out[name] = Sample(at=now, pid=pid, rss=rss, fds=fds,
                               tasks=_tasks(url) if url else None)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            for name, s in self.sample().items():
                self.series.setdefault(name, Series(name)).samples.append(s)
            self._stop.wait(max(0.0, self.every - (time.monotonic() - t)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def theil_sen(points: list[tuple[float, float]]) -> float:
    """The median of the pairwise slopes: robust to a few outliers (pure)."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if x2 != x1]
    return statistics.median(slopes) if slopes else 0.0


def quarters(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    q = max(1, len(samples) // 4)
    return samples[:q], samples[-q:]


# -- churn -----------------------------------------------------------------------------


def _apply(lab: ChaosLab, doc: str) -> None:
    """Create the manifest's object, or replace the spec of the one there."""
    _, obj = manifests.decode(yaml.safe_load(doc), KINDS)
    name, ns = obj.metadata.name, obj.metadata.namespace  # type: ignore[attr-defined]
    for _ in range(5):
        try:
            lab.client.create(obj)
            return
        except errors.AlreadyExists:
            pass
        cur = lab.client.get(type(obj), name, namespace=ns)
        cur.spec.CopyFrom(obj.spec)  # type: ignore[attr-defined]
        try:
            lab.client.update(cur)
            return
        except (errors.Conflict, errors.NotFound):
            continue
    raise AssertionError(f"could not apply {name}")


def _delete(lab: ChaosLab, kind: type[Any], name: str) -> None:
    try:
        lab.client.delete(kind, name, namespace=NS)
    except errors.NotFound:
        pass


def _scale(lab: ChaosLab, name: str, replicas: int) -> None:
    for _ in range(5):
        d = lab.client.get(apps_pb2.Deployment, name, namespace=NS)
        d.spec.replicas = replicas
        try:
            lab.client.update(d)
            return
        except errors.Conflict:
            continue
    raise AssertionError(f"could not scale {name}")


VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: soak-web, namespace: soak}
spec:
  hosts: [soak-web]
  http:
  - route:
    - {destination: {host: soak-web, subset: v1}, weight: V1}
    - {destination: {host: soak-web, subset: v2}, weight: V2}
"""
DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: soak-web, namespace: soak}
spec:
  host: soak-web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: soak-deny, namespace: soak}
spec:
  selector: {matchLabels: {app: soak-web}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/deny*"]}}]}]
"""
WEIGHTS = [(100, 0), (50, 50), (0, 100)]

# TCP connections through the L4 path: argv ip port count; prints "ok failed".
TCP_BATCH = """
    import socket, sys
    ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ok = 0
    for i in range(n):
        try:
            with socket.create_connection((ip, port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(b"GET /tcp HTTP/1.0\\r\\n\\r\\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            ok += out.startswith(b"HTTP/1.1 200")
        except OSError:
            pass
    print(ok, n - ok)
"""


@dataclass
class Traffic:
    http_ok: int = 0
    http_sent: int = 0
    http_statuses: dict[str, int] = field(default_factory=dict)
    http_errors: int = 0
    deny_403: int = 0
    deny_sent: int = 0
    tcp_ok: int = 0
    tcp_failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the figures


@dataclass
class Churn:
    lab: ChaosLab
    client_netns: str
    web_ip: str
    tcp_ip: str
    traffic: Traffic = field(default_factory=Traffic)
    seen_ips: set[str] = field(default_factory=set)  # every soak pod / Service IP
    rounds: int = 0

    def round(self, i: int) -> None:
        lab = self.lab
        _scale(lab, "soak-web-v1", 1 + i % 3)
        _scale(lab, "soak-web-v2", 1 + (i + 1) % 2)
        if i % 4 == 0:
            with contextlib.suppress(errors.AlreadyExists):  # still being deleted
                lab.client.create(meshapps.app_deployment("soak-extra", NS, app="soak-extra",
                                                          replicas=2))
        elif i % 4 == 2:
            _delete(lab, apps_pb2.Deployment, "soak-extra")
        lab.client.create(meshapps.app_pod(f"soak-p-{i}", NS, app=f"soak-p-{i}",
                                           node=f"node-{1 + i % NODES}"))
        svc = lab.client.create(meshapps.http_service(f"soak-s-{i}", NS, app=f"soak-p-{i}"))
        self.seen_ips.add(svc.spec.cluster_ip)
        if i >= 2:
            _delete(lab, core_pb2.Pod, f"soak-p-{i - 2}")
            _delete(lab, core_pb2.Service, f"soak-s-{i - 2}")
        v1, v2 = WEIGHTS[i % 3]
        _apply(lab, VS.replace("V1", str(v1)).replace("V2", str(v2)))
        if i % 2 == 0:
            _apply(lab, DENY)
        else:
            _delete(lab, _kind_type("AuthorizationPolicy"), "soak-deny")
        self.send()
        for p in lab.client.list(core_pb2.Pod, namespace=NS).items:
            if p.status.pod_ip:
                self.seen_ips.add(p.status.pod_ip)
        self.rounds += 1

    def send(self) -> None:
        t = self.traffic
        tally = meshapps.send(self.client_netns, self.web_ip, 80, count=HTTP_PER_ROUND,
                              timeout=5)
        t.http_sent += HTTP_PER_ROUND
        t.http_ok += tally.by_status.get(200, 0)
        t.http_errors += len(tally.errors)
        t.errors.extend(e[:120] for e in tally.errors[:max(0, 5 - len(t.errors))])
        for status, n in tally.by_status.items():
            t.http_statuses[str(status)] = t.http_statuses.get(str(status), 0) + n
        deny = meshapps.send(self.client_netns, self.web_ip, 80, count=2, path="/deny",
                             timeout=5)
        t.deny_sent += 2
        t.deny_403 += deny.by_status.get(403, 0)
        r = podnet.in_netns(self.client_netns, TCP_BATCH, self.tcp_ip, str(TCP_PORT),
                            str(TCP_PER_ROUND), timeout=60)
        ok, failed = (int(x) for x in r.stdout.split())
        t.tcp_ok += ok
        t.tcp_failed += failed


def _kind_type(kind: str) -> type[Any]:
    return next(type(k.new()) for k in KINDS if k.kind == kind)


# -- orphans ---------------------------------------------------------------------------


async def _cri_items(socket: Path) -> tuple[list[Any], list[Any]]:
    async with RuntimeClient(str(socket), timeout=10) as rt:
        return await rt.list_pod_sandbox(), await rt.list_containers()


def cri_orphans(lab: ChaosLab) -> list[str]:
    """Sandboxes and containers on the nodes whose pod the API does not have."""
    uids = {p.metadata.uid for p in lab.client.list(core_pb2.Pod, all_namespaces=True).items}
    out = []
    for n in lab.nodes:
        sandboxes, containers = asyncio.run(_cri_items(n.containerd_socket))
        known = {}
        for s in sandboxes:
            known[s.id] = s.metadata.uid
            if s.metadata.uid not in uids:
                out.append(f"{n.name}: sandbox {s.id[:12]} of {s.metadata.namespace}/"
                           f"{s.metadata.name} (uid {s.metadata.uid}, state {s.state})")
        for c in containers:
            if known.get(c.pod_sandbox_id) not in uids:
                out.append(f"{n.name}: container {c.id[:12]} ({c.metadata.name}) of "
                           f"sandbox {c.pod_sandbox_id[:12]}")
    return out


IP = re.compile(r"(?<![\d.])(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(?:/32)?(?![\d.])")


def _iptables(netns: str | None) -> str:
    cmd = ["iptables-save"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def live_ips(lab: ChaosLab) -> set[str]:
    pods = lab.client.list(core_pb2.Pod, all_namespaces=True).items
    svcs = lab.client.list(core_pb2.Service, all_namespaces=True).items
    return ({p.status.pod_ip for p in pods if p.status.pod_ip}
            | {s.spec.cluster_ip for s in svcs if s.spec.cluster_ip})


def stale_rules(lab: ChaosLab, seen: set[str]) -> list[str]:
    """iptables rules naming an IP a soak pod/Service had and nothing has now."""
    live = live_ips(lab)
    gone = seen - live
    out = []
    for netns in [None, *(n.netns for n in lab.nodes)]:
        for line in _iptables(netns).splitlines():
            if line.startswith("-A ") and set(IP.findall(line)) & gone:
                out.append(f"{netns or 'host'}: {line}")
    return out


def stale_netns(lab: ChaosLab, before: set[str]) -> list[str]:
    """Network namespaces made since ``before`` (not a node's) that hold no
    existing pod's IP."""
    live = {p.status.pod_ip for p in lab.client.list(core_pb2.Pod, all_namespaces=True).items
            if p.status.pod_ip}
    nodes = {n.netns for n in lab.nodes}
    out = []
    for entry in sorted(os.listdir("/var/run/netns")):
        if entry in nodes or entry in before:
            continue
        addrs = subprocess.run(["ip", "-n", entry, "-4", "-o", "addr", "show"],
                               capture_output=True, text=True, check=False).stdout
        ips = {a.split("/")[0] for a in re.findall(r"inet (\S+)", addrs)} - {"127.0.0.1"}
        if not ips & live:
            out.append(f"{entry} ({', '.join(sorted(ips)) or 'no address'})")
    return out


# -- the test --------------------------------------------------------------------------


def _metrics_urls(lab: ChaosLab) -> dict[str, str]:
    topo = plan(nodes=NODES, lab_dir=lab.dir)
    urls = {m.apiserver_process: f"http://{m.metrics}/metrics"
            for m in control_plane_members(topo, 3)}
    for n in lab.nodes:
        urls[f"nodeagent/{n.name}"] = f"http://{n.agent_metrics}/metrics"
        urls[f"meshagent/{n.name}"] = f"http://{n.ip}:{MESHAGENT_METRICS_PORT}/metrics"
    gateway = ingress.address(lab.client)
    if gateway:
        urls[ingress.PROCESS] = f"http://{gateway}:{ingress.METRICS_PORT}/metrics"
    return urls


def _ready(lab: ChaosLab, selector: str, want: int) -> bool:
    pods = lab.client.list(core_pb2.Pod, namespace=NS, label_selector=selector).items
    ready = [p for p in pods if p.status.phase == "Running"
             and not p.metadata.HasField("deletion_timestamp")
             and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)]
    return len(ready) >= want


def _endpoints(lab: ChaosLab, name: str) -> int:
    try:
        ep = lab.client.get(core_pb2.Endpoints, name, namespace=NS)
    except errors.NotFound:
        return 0
    return sum(len(s.addresses) for s in ep.subsets)


def _setup(lab: ChaosLab) -> Churn:
    lab.client.create(core_pb2.Namespace(metadata=meta_pb2.ObjectMeta(name=NS)))
    lab.client.create(meshapps.client_pod("soak-client", NS, node="node-1"))
    for version in ("v1", "v2"):
        lab.client.create(meshapps.app_deployment(f"soak-web-{version}", NS, app="soak-web",
                                                  version=version))
    web = lab.client.create(meshapps.http_service("soak-web", NS, app="soak-web"))
    tcp = lab.client.create(meshapps.http_service("soak-tcp", NS, app="soak-web",
                                                  port=TCP_PORT, port_name="tcp"))
    _apply(lab, DR)
    _apply(lab, VS.replace("V1", "50").replace("V2", "50"))
    wait_for("the soak's pods ready", lambda: _ready(lab, "app=soak-web", 2)
             and _ready(lab, "app=soak-client", 1), timeout=120)
    wait_for("soak-web's endpoints", lambda: _endpoints(lab, "soak-web") == 2, timeout=60)
    client = lab.client.get(core_pb2.Pod, "soak-client", namespace=NS)
    churn = Churn(lab=lab, client_netns=podnet.pod_netns(client.status.pod_ip),
                  web_ip=web.spec.cluster_ip, tcp_ip=tcp.spec.cluster_ip)
    wait_for("soak-web answers through the mesh", lambda: meshapps.send(
        churn.client_netns, churn.web_ip, 80, count=2, timeout=5).by_status == {200: 2},
        timeout=60, interval=1)
    return churn


def _figures(series: Series, t_start: float, t_warm: float, t_end: float,
             after: dict[str, Sample]) -> dict[str, Any]:
    steady = [s for s in series.samples if t_warm <= s.at <= t_end]
    first, last = quarters(steady)
    half = steady[len(steady) // 2:]
    tasks = [s.tasks for s in steady if s.tasks is not None]
    a = after.get(series.name)
    out: dict[str, Any] = {
        "samples": len(steady),
        "rss_mib": {
            "warm": round(statistics.median(s.rss for s in first) / MIB, 1),
            "end": round(statistics.median(s.rss for s in last) / MIB, 1),
            "peak": round(max(s.rss for s in series.samples if s.at >= t_start) / MIB, 1),
            "slope_mib_min": round(theil_sen([(s.at / 60, s.rss / MIB) for s in half]), 2),
        },
        "fds": {"warm": statistics.median(s.fds for s in first),
                "peak": max(s.fds for s in steady), "after": a.fds if a else None},
        "pids": sorted({s.pid for s in series.samples if s.at >= t_start}),
    }
    if tasks:
        out["tasks"] = {"warm": statistics.median(s.tasks for s in first if s.tasks is not None)
                        if any(s.tasks is not None for s in first) else None,
                        "peak": max(tasks), "after": a.tasks if a else None}
    return out


def _leaks(figures: dict[str, dict[str, Any]], after: dict[str, Sample]) -> list[str]:
    """FD and task counts still above their post-warm-up level plus the margin.

    The apiservers are counted together: a client that fails over takes its
    connection and its watch streams (FDs and tasks) from one member to another,
    so one member's count grows by what another's drops (seen: 20 tasks from
    apiserver to apiserver/cp-2 in one soak)."""
    out = []
    counts: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
    for name, f in figures.items():
        a = after.get(name)
        if a is None:
            out.append(f"{name}: not sampled after the soak")
            continue
        group = "apiservers (together)" if name.split("/")[0] == "apiserver" else name
        counts.setdefault(group, []).append(
            (f["fds"]["warm"], a.fds, f.get("tasks", {}).get("warm"), a.tasks))
    for group, members in counts.items():
        warm_fds, fds = sum(m[0] for m in members), sum(m[1] for m in members)
        if fds > warm_fds + max(FD_ABS, REL * warm_fds):
            out.append(f"{group}: {fds} FDs after, {warm_fds} after warm-up")
        if all(m[2] is not None and m[3] is not None for m in members):
            warm_tasks = sum(m[2] or 0 for m in members)
            tasks = sum(m[3] or 0 for m in members)
            if tasks > warm_tasks + max(TASKS_ABS, REL * warm_tasks):
                out.append(f"{group}: {tasks} asyncio tasks after, {warm_tasks} after "
                           "warm-up")
    return out


def _settled(check: Callable[[], list[str]], what: str) -> list[str]:
    """``check`` until it finds nothing (within SETTLE s); what it found last."""
    last: list[str] = []
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline:
        last = check()
        if not last:
            return []
        time.sleep(2)
    return [f"{what}: {x}" for x in last]


def _cleanup(lab: ChaosLab, rounds: int) -> None:
    for i in range(max(0, rounds - 3), rounds):
        _delete(lab, core_pb2.Pod, f"soak-p-{i}")
        _delete(lab, core_pb2.Service, f"soak-s-{i}")
    _delete(lab, apps_pb2.Deployment, "soak-extra")
    _delete(lab, _kind_type("AuthorizationPolicy"), "soak-deny")
    for name in ("soak-web-v1", "soak-web-v2"):
        _scale(lab, name, 1)


def _gone(lab: ChaosLab) -> bool:
    pods = lab.client.list(core_pb2.Pod, namespace=NS).items
    return all(p.metadata.labels.get("app") in ("soak-web", "soak-client") for p in pods) \
        and _ready(lab, "app=soak-web", 2) and len(pods) == 3


def test_soak_churn_leaves_no_growth_leak_or_orphan(chaos_lab: ChaosLab) -> None:
    lab = chaos_lab
    netns_before = set(os.listdir("/var/run/netns"))
    churn = _setup(lab)
    warmup = max(20.0, WARMUP_FRACTION * SOAK_SECONDS)
    with Sampler(lab, _metrics_urls(lab), SAMPLE_EVERY) as sampler:
        t_start = time.monotonic()
        pids_before = lab.pids()
        deadline = t_start + SOAK_SECONDS
        i = 0
        while time.monotonic() < deadline:
            churn.round(i)
            i += 1
        t_end = time.monotonic()
        _cleanup(lab, churn.rounds)
        wait_for("the soak's churned pods gone", lambda: _gone(lab), timeout=SETTLE)
    t_warm = t_start + warmup
    names = sorted(sampler.series)
    figures_wo_after = {n: _figures(sampler.series[n], t_start, t_warm, t_end, {})
                        for n in names}
    leaks = _settled(lambda: _leaks(figures_wo_after, sampler.sample()), "leak")
    after = sampler.sample()
    figures = {n: _figures(sampler.series[n], t_start, t_warm, t_end, after) for n in names}
    orphans = (_settled(lambda: cri_orphans(lab), "CRI")
               + _settled(lambda: stale_rules(lab, churn.seen_ips), "iptables")
               + _settled(lambda: stale_netns(lab, netns_before), "netns"))
    t = churn.traffic
    churn.traffic = final = Traffic()  # once churn has stopped, every request works
    churn.send()
    record("soak", seconds=round(t_end - t_start, 1), warmup_s=round(warmup, 1),
           sample_every_s=SAMPLE_EVERY, rounds=churn.rounds, traffic=t.__dict__,
           final_traffic=final.__dict__, ips_seen=len(churn.seen_ips), components=figures,
           leaks=leaks, orphans=orphans)
    grown = []
    for name, f in figures.items():
        rss = f["rss_mib"]
        if rss["end"] > rss["warm"] + max(RSS_ABS_MIB, RSS_REL * rss["warm"]):
            grown.append(f"{name}: RSS {rss['warm']} -> {rss['end']} MiB")
    restarted = [n for n in names if n in pids_before
                 and any(s.pid != pids_before[n] for s in sampler.series[n].samples
                         if s.at >= t_start)]
    assert churn.rounds >= 3, churn.rounds
    assert not restarted, f"restarted during the soak: {restarted}"
    assert not grown, grown
    assert not leaks, leaks
    assert not orphans, orphans
    assert final.http_ok == final.http_sent and final.tcp_failed == 0, final
