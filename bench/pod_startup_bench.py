#!/usr/bin/env python3
"""Pod startup latency: create -> Running, image already present (issue 3).

    sudo python bench/pod_startup_bench.py [--pods 30] [--rate 5] [--json OUT]

Starts a real etcd, ``shoal-apiserver`` (process), and ``shoal-nodeagent`` (process,
with its own containerd) on a test bridge ``shoalb0`` (10.88.79.0/24, no NAT),
imports a locally built busybox image, then creates ``--pods`` pods at ``--rate``
per second (open loop) and times each from its create acknowledgement to the
watch event that shows it Running. Reports p50/p90/p99/max and the node
agent's RSS. Cleans up every process, pod, mount and the bridge it made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nodeagent.containerd import ContainerdConfig, ContainerdProcess, mounts_under
from shoal import images, tokens
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.config import load
from shoal.testing.apiserver import APIServerProcess, free_port
from shoal.testing.etcd import EtcdServer

BRIDGE, CIDR, GATEWAY = "shoalb0", "10.88.79.0/24", "10.88.79.1/24"
NODE = "bench-node"
IMAGE = "docker.io/library/busybox:1.36"


def sh(*cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, check=check, capture_output=True, timeout=30)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early ({proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def measure(client: AsyncClient, *, pods: int, rate: float) -> list[float]:
    start = await client.list(core_pb2.Pod, namespace="bench")
    acked: dict[str, float] = {}
    running: dict[str, float] = {}
    done = asyncio.Event()

    async def watch() -> None:
        async for ev in client.watch(core_pb2.Pod, namespace="bench",
                                     resource_version=start.resource_version):
            p = ev.object
            if p is not None and p.status.phase == "Running" and p.metadata.name not in running:
                running[p.metadata.name] = time.monotonic()
                if len(running) == pods:
                    done.set()
                    return

    watcher = asyncio.create_task(watch())
    t0 = time.monotonic()
    for i in range(pods):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        p = core_pb2.Pod()
        p.metadata.name = f"p-{i:03d}"
        p.metadata.namespace = "bench"
        p.spec.node_name = NODE
        p.spec.termination_grace_period_seconds = 1
        c = p.spec.containers.add(name="main", image=IMAGE)
        c.command.extend(["sleep", "3600"])
        await client.create(p)
        acked[p.metadata.name] = time.monotonic()
    async with asyncio.timeout(300):
        await done.wait()
    watcher.cancel()
    return [running[n] - acked[n] for n in acked]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=30)
    parser.add_argument("--rate", type=float, default=5.0, help="pods created per second")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (containerd, netns, mounts)")
    base = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    sh("ip", "link", "del", BRIDGE, check=False)
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", GATEWAY, "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    etcd = EtcdServer()
    etcd.start()
    api = APIServerProcess(base / "api", etcd_endpoint=etcd.endpoint)
    agent_dir = base / "agent"
    agent_dir.mkdir(parents=True)
    agent: subprocess.Popen[bytes] | None = None
    try:
        (base / "api").mkdir(exist_ok=True)
        api.start()
        async with AsyncClient(load(api.config_path)) as client:
            token = tokens.generate()
            await client.create(tokens.to_secret(token, ttl=None))
            subprocess.run([sys.executable, "-m", "nodeagent.main", "join", "--server",
                            f"127.0.0.1:{api.join_port}", "--token", str(token),
                            "--ca-cert-hash", tokens.ca_cert_hash(client.config.ca_pem),
                            "--node-name", NODE, "--node-ip", "127.0.0.1", "--data-dir",
                            str(agent_dir), "--api-server", f"127.0.0.1:{api.port}"],
                           check=True, capture_output=True, timeout=60)
            metrics = free_port()
            log = open(agent_dir / "agent.log", "ab")  # noqa: SIM115
            agent = subprocess.Popen(
                [sys.executable, "-m", "nodeagent.main", "run", "--node-name", NODE,
                 "--node-ip", "127.0.0.1", "--data-dir", str(agent_dir), "--pod-cidr", CIDR,
                 "--cni-bridge", BRIDGE, "--no-cni-gateway", "--no-routes",
                 "--listen", f"127.0.0.1:{free_port()}",
                 "--metrics-listen", f"127.0.0.1:{metrics}", "--log-format", "text"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_http(f"http://127.0.0.1:{metrics}/readyz", agent)
            ref = images.build_busybox_image(base / "busybox.tar", name="library/busybox:1.36",
                                             cmd=["sh"])
            images.import_image(ref, address=str(agent_dir / "containerd" / "containerd.sock"))
            nsobj = core_pb2.Namespace()
            nsobj.metadata.name = "bench"
            await client.create(nsobj)
            idle_rss = rss_mb(agent.pid)
            latencies = await measure(client, pods=ns.pods, rate=ns.rate)
            busy_rss = rss_mb(agent.pid)
            await client.delete(core_pb2.Namespace, "bench")
            async with asyncio.timeout(120):
                while (await client.list(core_pb2.Pod, namespace="bench")).items:
                    await asyncio.sleep(0.5)
        ms = [x * 1000 for x in latencies]
        report = {
            "pods": ns.pods, "rate_per_s": ns.rate,
            "p50_ms": round(pct(ms, 50), 1), "p90_ms": round(pct(ms, 90), 1),
            "p99_ms": round(pct(ms, 99), 1), "max_ms": round(max(ms), 1),
            "mean_ms": round(statistics.mean(ms), 1),
            "agent_rss_mb_idle": round(idle_rss, 1),
            "agent_rss_mb_with_pods": round(busy_rss, 1),
        }
        print(f"pod startup (create -> Running, image present), {ns.pods} pods at "
              f"{ns.rate:g}/s, 2 cores:")
        print(f"  p50 {report['p50_ms']} ms  p90 {report['p90_ms']} ms  "
              f"p99 {report['p99_ms']} ms  max {report['max_ms']} ms")
        print(f"  node agent RSS: idle {report['agent_rss_mb_idle']} MB, with "
              f"{ns.pods} pods {report['agent_rss_mb_with_pods']} MB")
        verdict = "PASS" if report["p99_ms"] < 2000 else "FAIL"
        print(f"  {verdict}  p99 < 2 s")
        if ns.json:
            ns.json.write_text(json.dumps(report, indent=2))
        return 0 if verdict == "PASS" else 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        for point in mounts_under(agent_dir / "pods"):
            sh("umount", "-l", str(point), check=False)
        if (agent_dir / "containerd").exists():
            cd = ContainerdProcess(ContainerdConfig.under(agent_dir / "containerd"))
            await cd.start()
            await cd.cleanup()
        api.stop()
        etcd.stop()
        sh("ip", "link", "del", BRIDGE, check=False)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
