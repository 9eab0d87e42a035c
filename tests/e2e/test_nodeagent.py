"""End to end: `shoal-nodeagent` (a real process) runs pods on a real containerd.

One node for the module: the apiserver in-process (TLS), a bridge ``shoalt1``
with 10.88.78.1/24 on the host, and the agent started by
``shoal-nodeagent join`` + ``run`` with its own containerd. Images are built
locally from busybox and imported; nothing is pulled. Traffic goes only to pod
IPs on that bridge.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nodeagent.containerd import ContainerdConfig, ContainerdProcess, mounts_under
from shoal import errors, images, tokens
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer, free_port

pytestmark = pytest.mark.e2e

BRIDGE = "shoalt1"
CIDR = "10.88.78.0/24"
GATEWAY = "10.88.78.1/24"
IMAGE = "docker.io/library/busybox:1.36"
NODE = "e2e-node"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class AgentProcess:
    def __init__(self, data_dir: Path, port: int, metrics: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.metrics = metrics
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.data_dir / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.main", "run", "--node-name", NODE,
             "--node-ip", "127.0.0.1", "--data-dir", str(self.data_dir),
             "--pod-cidr", CIDR, "--cni-bridge", BRIDGE, "--no-cni-gateway", "--no-routes",
             "--listen", f"127.0.0.1:{self.port}",
             "--metrics-listen", f"127.0.0.1:{self.metrics}", "--relist-interval", "0.2",
             "--restart-backoff", "1,4", "--log-format", "text"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("agent exited:\n" + self.log()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/readyz",
                                            timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("agent not ready:\n" + self.log()[-3000:])

    def log(self) -> str:
        return (self.data_dir / "agent.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


class Env:
    def __init__(self, api: InProcessAPIServer, agent: AgentProcess, client: AsyncClient
                 ) -> None:
        self.api = api
        self.agent = agent
        self.client = client

    async def shoal(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SHOAL_CONFIG": str(self.api.config_path)}
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "shoal.cli.main", *args], env=env,
            capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
async def node(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    base = tmp_path_factory.mktemp("node")
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", GATEWAY, "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    api = InProcessAPIServer(base / "api")
    await api.start()
    agent = AgentProcess(base / "agent", free_port(), free_port())
    agent.data_dir.mkdir()
    try:
        async with api.client() as client:
            token = tokens.generate()
            await client.create(tokens.to_secret(token, ttl=None))
            assert api.server is not None
            join = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "nodeagent.main", "join",
                "--server", f"127.0.0.1:{api.server.join_port}", "--token", str(token),
                "--ca-cert-hash", tokens.ca_cert_hash(api.client_config.ca_pem),
                "--node-name", NODE, "--node-ip", "127.0.0.1", "--data-dir",
                str(agent.data_dir), "--api-server", f"127.0.0.1:{api.port}"],
                capture_output=True, text=True, timeout=60, check=False)
            assert join.returncode == 0, join.stderr
            agent.start()
            await asyncio.to_thread(agent.wait_ready)
            ref = await asyncio.to_thread(images.build_busybox_image, base / "busybox.tar",
                                          name="library/busybox:1.36", cmd=["sh"])
            sock = agent.data_dir / "containerd" / "containerd.sock"
            await asyncio.to_thread(images.import_image, ref, address=str(sock))
            ns = core_pb2.Namespace()
            ns.metadata.name = "e2e"
            await client.create(ns)
            client.namespace = "e2e"
            yield Env(api, agent, client)
    finally:
        agent.stop()
        for point in mounts_under(agent.data_dir / "pods"):  # only after a failed test
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        cd = ContainerdProcess(ContainerdConfig.under(agent.data_dir / "containerd"))
        await cd.start()  # adopts the agent's containerd through its pidfile
        await cd.cleanup()
        await api.stop()
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


def pod(name: str, *cmd: str, policy: str = "Always", grace: int = 5) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.spec.node_name = NODE
    p.spec.restart_policy = policy
    p.spec.termination_grace_period_seconds = grace
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(cmd or ("sleep", "3600"))
    return p


async def until(env: Env, name: str, pred: Callable[[core_pb2.Pod], bool],
                timeout: float = 45.0) -> core_pb2.Pod:
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    last = await env.client.get(core_pb2.Pod, name)
                    if pred(last):
                        return last  # type: ignore[no-any-return]
                except errors.NotFound:
                    pass
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"pod {name} never got there; last status:\n{last and last.status}"
                             f"\nagent log:\n{env.agent.log()[-2000:]}") from None


def running(p: core_pb2.Pod) -> bool:
    return p.status.phase == "Running"


def ready(p: core_pb2.Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)


async def gone(env: Env, name: str, timeout: float = 30.0) -> float:
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while True:
            try:
                await env.client.get(core_pb2.Pod, name)
            except errors.NotFound:
                return time.monotonic() - start
            await asyncio.sleep(0.1)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def test_node_registers_ready_with_a_lease(node: Env) -> None:
    n = await node.client.get(core_pb2.Node, NODE)
    assert next(c for c in n.status.conditions if c.type == "Ready").status == "True"
    assert n.status.node_info.container_runtime_version.startswith("containerd://")


async def test_httpd_pod_is_reachable_at_its_ip(node: Env) -> None:
    p = pod("web", "sh", "-c", "mkdir -p /www && echo hello-from-shoal > /www/index.html "
            "&& exec httpd -f -p 8080 -h /www")
    probe = p.spec.containers[0].readiness_probe
    probe.http_get.path, probe.http_get.port.int_val, probe.period_seconds = "/", 8080, 1
    await node.client.create(p)
    got = await until(node, "web", lambda p: running(p) and ready(p))
    assert got.status.pod_ip.startswith("10.88.78.")
    body = await asyncio.to_thread(fetch, f"http://{got.status.pod_ip}:8080/")
    assert body.strip() == "hello-from-shoal"


async def test_exit_codes_and_restarts_with_back_off(node: Env) -> None:
    await node.client.create(pod("crash", "sh", "-c", "echo bye; exit 3"))
    got = await until(node, "crash", lambda p: bool(p.status.container_statuses) and
                      p.status.container_statuses[0].restart_count >= 2 and
                      p.status.container_statuses[0].state.waiting.reason ==
                      "CrashLoopBackOff")
    cs = got.status.container_statuses[0]
    assert cs.last_state.terminated.exit_code == 3 and cs.last_state.terminated.reason == "Error"
    once = pod("once", "sh", "-c", "exit 0", policy="Never")
    await node.client.create(once)
    done = await until(node, "once", lambda p: p.status.phase == "Succeeded")
    assert done.status.container_statuses[0].state.terminated.reason == "Completed"


async def test_liveness_failure_restarts_and_exec_works(node: Env) -> None:
    p = pod("live", "sh", "-c", "touch /tmp/healthy; exec sleep 3600")
    probe = p.spec.containers[0].liveness_probe
    probe.exec.command.extend(["cat", "/tmp/healthy"])
    probe.period_seconds, probe.failure_threshold = 1, 2
    await node.client.create(p)
    await until(node, "live", running)
    r = await node.shoal("exec", "live", "-n", "e2e", "--", "sh", "-c", "echo hi; rm /tmp/healthy")
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    failed = await node.shoal("exec", "live", "-n", "e2e", "--",
                              "sh", "-c", "echo oops >&2; exit 4")
    assert failed.returncode == 4 and "oops" in failed.stderr
    got = await until(node, "live", lambda p: p.status.container_statuses[0].restart_count >= 1)
    assert got.status.container_statuses[0].last_state.terminated.exit_code in (137, 143)


async def test_init_containers_env_and_secret_volume(node: Env) -> None:
    cm = core_pb2.ConfigMap()
    cm.metadata.name = "settings"
    cm.data["color"] = "blue"
    await node.client.create(cm)
    secret = core_pb2.Secret()
    secret.metadata.name = "creds"
    secret.data["password"] = b"hunter2"
    await node.client.create(secret)
    p = pod("configured", "sh", "-c",
            "echo color=$COLOR pw=$PW; cat /work/init.txt; exec sleep 3600")
    p.spec.volumes.add(name="work").empty_dir.SetInParent()
    p.spec.volumes.add(name="creds").secret.secret_name = "creds"
    init = p.spec.init_containers.add(name="setup", image=IMAGE)
    init.command.extend(["sh", "-c", "echo initialised > /work/init.txt"])
    init.volume_mounts.add(name="work", mount_path="/work")
    c = p.spec.containers[0]
    c.volume_mounts.add(name="work", mount_path="/work")
    c.volume_mounts.add(name="creds", mount_path="/etc/creds", read_only=True)
    ref = c.env.add(name="COLOR").value_from.config_map_key_ref
    ref.name, ref.key = "settings", "color"
    sref = c.env.add(name="PW").value_from.secret_key_ref
    sref.name, sref.key = "creds", "password"
    await node.client.create(p)
    got = await until(node, "configured", running)
    assert got.status.init_container_statuses[0].state.terminated.reason == "Completed"
    logs = await node.shoal("logs", "configured", "-n", "e2e")
    assert logs.stdout == "color=blue pw=hunter2\ninitialised\n", logs.stderr
    mounts = await node.shoal("exec", "configured", "-n", "e2e", "--", "cat", "/proc/mounts")
    line = next(ln for ln in mounts.stdout.splitlines() if " /etc/creds " in ln)
    assert line.split()[2] == "tmpfs"
    pw = await node.shoal("exec", "configured", "-n", "e2e", "--", "cat", "/etc/creds/password")
    assert pw.stdout == "hunter2"


async def test_missing_config_key_is_a_reason(node: Env) -> None:
    p = pod("no-key")
    ref = p.spec.containers[0].env.add(name="X").value_from.config_map_key_ref
    ref.name, ref.key = "settings-missing", "x"
    await node.client.create(p)
    got = await until(node, "no-key", lambda p: bool(p.status.container_statuses) and
                      p.status.container_statuses[0].state.waiting.reason ==
                      "CreateContainerConfigError")
    assert "not found" in got.status.container_statuses[0].state.waiting.message


async def test_bad_image_and_bad_command(node: Env) -> None:
    await node.client.create(pod("bad-cmd", "/no/such/binary"))
    got = await until(node, "bad-cmd", lambda p: bool(p.status.container_statuses) and
                      p.status.container_statuses[0].state.waiting.reason ==
                      "RunContainerError")
    assert "no such file" in got.status.container_statuses[0].state.waiting.message.lower()
    bad = pod("bad-image")
    bad.spec.containers[0].image = "registry.invalid/nothing:1"
    bad.spec.containers[0].image_pull_policy = "Never"
    await node.client.create(bad)
    got = await until(node, "bad-image", lambda p: bool(p.status.container_statuses) and
                      p.status.container_statuses[0].state.waiting.reason in (
                          "ErrImagePull", "ImagePullBackOff"))
    assert "registry.invalid/nothing:1" in got.status.container_statuses[0].state.waiting.message


async def test_logs_follow_through_the_cli(node: Env) -> None:
    await node.client.create(pod("ticker", "sh", "-c",
                                 "i=0; while [ $i -lt 100 ]; do echo tick $i; i=$((i+1)); "
                                 "sleep 0.2; done; sleep 3600"))
    await until(node, "ticker", running)
    env = {**os.environ, "SHOAL_CONFIG": str(node.api.config_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli.main", "logs", "ticker", "-n", "e2e", "-f",
        "--tail", "1", env=env, stdout=asyncio.subprocess.PIPE)
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            assert proc.stdout is not None
            while len(lines) < 4:
                lines.append((await proc.stdout.readline()).decode())
    finally:
        proc.terminate()
        await proc.wait()
    numbers = [int(ln.split()[1]) for ln in lines]
    assert numbers == list(range(numbers[0], numbers[0] + 4))  # live, in order
    tail = await node.shoal("logs", "ticker", "-n", "e2e", "--tail", "2")
    assert len(tail.stdout.splitlines()) == 2


async def test_graceful_delete_within_the_grace_period(node: Env) -> None:
    stubborn = pod("stubborn", "sh", "-c", "trap '' TERM; while true; do sleep 1; done",
                   grace=3)
    await node.client.create(stubborn)
    await until(node, "stubborn", running)
    await node.client.delete(core_pb2.Pod, "stubborn")
    took = await gone(node, "stubborn")
    assert 2.5 <= took <= 15, took  # SIGTERM ignored: SIGKILL after 3 s
    # PID 1 of a container gets SIGTERM only if it handles it: this one does.
    await node.client.create(pod("polite", "sh", "-c",
                                 "trap 'exit 0' TERM; while true; do sleep 0.2; done",
                                 grace=30))
    await until(node, "polite", running)
    await node.client.delete(core_pb2.Pod, "polite")
    assert await gone(node, "polite") < 10  # dies on SIGTERM, long before its 30 s


async def test_agent_kill_9_keeps_containers(node: Env) -> None:
    await node.client.create(pod("survivor"))
    before = await until(node, "survivor", running)
    cid = before.status.container_statuses[0].container_id
    node.agent.stop(signal.SIGKILL)
    node.agent.start()
    await asyncio.to_thread(node.agent.wait_ready)
    await asyncio.sleep(2)
    after = await until(node, "survivor", running)
    assert after.status.container_statuses[0].container_id == cid
    assert after.status.container_statuses[0].restart_count == 0


async def test_agent_restarts_a_dead_containerd(node: Env) -> None:
    await node.client.create(pod("before-crash"))
    before = await until(node, "before-crash", running)
    pidfile = node.agent.data_dir / "containerd" / "state" / "shoal-containerd.pid"
    old_pid = int(pidfile.read_text())
    os.kill(old_pid, signal.SIGKILL)
    async with asyncio.timeout(30):
        while True:
            try:
                if int(pidfile.read_text()) != old_pid:
                    break
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.2)
    await node.client.create(pod("after-crash"))
    await until(node, "after-crash", running)
    still = await until(node, "before-crash", running)
    assert still.status.container_statuses[0].container_id == \
        before.status.container_statuses[0].container_id
    assert still.status.container_statuses[0].restart_count == 0


async def test_image_import_through_the_apiserver(node: Env, tmp_path: Path) -> None:
    """`shoal image build` + `shoal image import` (CLI -> apiserver -> node agent
    -> containerd), twice; then a pod runs the image without pulling."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "greeting.txt").write_text("imported, not pulled\n")
    (app / "shoal-image.yaml").write_text('cmd: ["sh", "-c", "exec sleep 3600"]\n')
    archive = tmp_path / "imported.tar"
    built = await node.shoal("image", "build", "-t", "shoal-e2e/imported:1", str(app),
                             "-o", str(archive))
    assert built.returncode == 0, built.stderr
    digest = built.stdout.split()[2]
    for _ in range(2):                                  # importing again is a no-op
        imported = await node.shoal("image", "import", str(archive))
        assert imported.returncode == 0, imported.stderr
        assert imported.stdout == f"{NODE}: imported docker.io/shoal-e2e/imported:1 {digest}\n"
    named = await node.shoal("image", "import", str(archive), "--node", NODE,
                             "--node", "no-such-node")
    assert named.returncode == 1
    assert f"{NODE}: imported" in named.stdout
    assert 'no-such-node: import failed: nodes "no-such-node" not found' in named.stderr
    # The node checks what the first chunk says the archive holds.
    with pytest.raises(errors.BadRequest, match=f"is {digest}, not sha256:0000"):
        await node.client.import_image(NODE, archive, digest="sha256:" + "0" * 64)
    with pytest.raises(errors.BadRequest, match="not docker.io/library/other:1"):
        await node.client.import_image(NODE, archive, image="other:1")
    assert not any((node.agent.data_dir / "images").iterdir())   # temp archives removed
    p = pod("imported")
    p.spec.containers[0].image = "shoal-e2e/imported:1"
    p.spec.containers[0].image_pull_policy = "Never"
    p.spec.containers[0].ClearField("command")
    await node.client.create(p)
    await until(node, "imported", running)
    r = await node.shoal("exec", "imported", "-n", "e2e", "--", "cat", "/greeting.txt")
    assert (r.returncode, r.stdout) == (0, "imported, not pulled\n"), r.stderr


async def test_deleting_every_pod_leaves_nothing_on_the_node(node: Env) -> None:
    """Runs last: the namespace goes, and with it every pod, container and volume."""
    await node.client.delete(core_pb2.Namespace, "e2e")
    async with asyncio.timeout(60):
        while (await node.client.list(core_pb2.Pod, namespace="e2e")).items:
            await asyncio.sleep(0.2)
    pods_dir = node.agent.data_dir / "pods"
    assert mounts_under(pods_dir) == []
    assert not pods_dir.exists() or not any(pods_dir.iterdir())
    cd = ContainerdProcess(ContainerdConfig.under(node.agent.data_dir / "containerd"))
    await cd.start()
    async with cd.client() as rt:
        assert await rt.list_containers() == []
        assert await rt.list_pod_sandbox() == []
