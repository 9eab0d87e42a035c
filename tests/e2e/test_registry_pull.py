"""End to end: containerd pulls ``docker.io/...`` from a local registry through
mirror config (hosts.toml), and runs it.

The registry is Debian's docker-registry on a free loopback port
(``RegistryServer``). The image is built by ``shoal image build`` and pushed by
``shoal image push`` as ``library/hello:1``. containerd (``ContainerdProcess``,
everything under a temp dir) gets ``write_registry_mirrors`` with
``docker.io -> http://127.0.0.1:PORT``, so CRI ``PullImage("docker.io/library/
hello:1")`` comes from the local registry and never from the internet: the
mirror is also the registry's ``server``, so there is no upstream fallback.

Pods go on a test-only bridge ``shoalt2`` (10.88.80.0/24; ``isGateway`` and
``ipMasq`` off: no iptables rule, no route out). Traffic goes only to 127.0.0.1
and that bridge. The fixture tears down sandboxes, containerd (by PID), the
registry (by PID), mounts and the bridge, and the last test checks that.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeagent.containerd import (
    NETNS_DIR,
    ContainerdConfig,
    ContainerdProcess,
    RegistryMirror,
    leftover_netns,
    mounts_under,
    write_registry_mirrors,
)
from nodeagent.cri import RuntimeClient
from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.images import ImageRef, build_sandbox_image, import_image, inspect_archive
from shoal.testing.registry import RegistryServer

pytestmark = pytest.mark.e2e

BRIDGE = "shoalt2"
SUBNET = "10.88.80.0/24"
GATEWAY = "10.88.80.1"
MOTD = "pulled through the mirror"


@dataclass
class Env:
    base: Path
    registry: RegistryServer
    proc: ContainerdProcess
    rt: RuntimeClient
    pause: ImageRef
    hello_digest: str
    netns_before: list[str]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def link_exists(name: str) -> bool:
    return run("ip", "link", "show", name).returncode == 0


def missing_tools() -> str | None:
    for tool in ("containerd", "ctr", "runc", "ip", "docker-registry"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/lib/cni/bridge").exists() or not Path("/bin/busybox").exists():
        return "needs containernetworking-plugins and busybox-static"
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "shoal.cli.main", *args)


def write_cni(conf_dir: Path, ipam_dir: Path) -> None:
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-shoal-e2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "shoal-e2e-registry",
        "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": False,
                     "ipMasq": False,
                     "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                              "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]]}}],
    }))


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    missing = missing_tools()
    if missing:
        pytest.skip(missing)
    if link_exists(BRIDGE):
        pytest.fail(f"bridge {BRIDGE} already exists: a leak from an earlier run; remove it "
                    f"with `ip link del {BRIDGE}`")
    base = tmp_path_factory.mktemp("registry-pull")
    netns_before = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []
    for argv in (("ip", "link", "add", BRIDGE, "type", "bridge"),
                 ("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE),
                 ("ip", "link", "set", BRIDGE, "up")):
        done = run(*argv)
        assert done.returncode == 0, done.stderr
    registry = RegistryServer()
    proc: ContainerdProcess | None = None
    rt: RuntimeClient | None = None
    try:
        registry.start()
        # The image, built and pushed with the CLI.
        app = base / "app"
        app.mkdir()
        (app / "shoal-image.yaml").write_text(
            'cmd: ["sh", "-c", "cat /etc/motd; exec sleep 3600"]\n'
            f'files:\n  /etc/motd: "{MOTD}\\n"\n')
        built = shoal("image", "build", "-t", "library/hello:1", str(app), "-o",
                      str(base / "hello.tar"))
        assert built.returncode == 0, built.stderr
        pushed = shoal("image", "push", str(base / "hello.tar"),
                       f"{registry.address}/library/hello:1", "--insecure")
        assert pushed.returncode == 0, pushed.stderr
        (hello,) = inspect_archive(base / "hello.tar")
        write_cni(base / "cni", base / "ipam")
        pause = build_sandbox_image(base / "pause.tar", name="shoal/pause:e2e-registry")
        certs = base / "node" / "certs.d"
        write_registry_mirrors(certs, [RegistryMirror("docker.io", registry.url)])
        config = ContainerdConfig.under(base / "node", cni_conf_dir=base / "cni",
                                        sandbox_image=pause.name,
                                        registry_config_path=certs)
        proc = ContainerdProcess(config, start_timeout=30)
        rt = proc.client(timeout=60)
        await proc.start()
        await asyncio.to_thread(import_image, pause, address=proc.address)
        yield Env(base=base, registry=registry, proc=proc, rt=rt, pause=pause,
                  hello_digest=hello.digest, netns_before=netns_before)
    finally:
        if rt is not None:
            await rt.close()
        if proc is not None:
            await proc.cleanup()
        registry.stop()
        run("ip", "link", "del", BRIDGE)


async def test_pull_of_a_docker_io_name_comes_from_the_mirror(env: Env) -> None:
    assert await env.rt.image_status("docker.io/library/hello:1") is None
    started = time.monotonic()
    ref = await env.rt.pull_image("docker.io/library/hello:1")
    assert time.monotonic() - started < 30
    img = await env.rt.image_status("docker.io/library/hello:1")
    assert img is not None and img.id == ref
    assert f"docker.io/library/hello@{env.hello_digest}" in img.repo_digests
    # A short name is normalized to the same docker.io image.
    assert await env.rt.pull_image("hello:1") == ref


async def test_the_pulled_image_runs(env: Env) -> None:
    uid = "e2e-registry-1"
    sc = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="hello", uid=uid, namespace="e2e"),
        hostname="hello", log_directory=str(env.base / "pods" / uid),
        labels={"io.kubernetes.pod.uid": uid},
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER,
                                                  ipc=cri.POD))))
    sid = await env.rt.run_pod_sandbox(sc)
    try:
        cc = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="hello"),
            image=cri.ImageSpec(image="docker.io/library/hello:1"), log_path="hello/0.log",
            labels={"io.kubernetes.container.name": "hello"})
        cid = await env.rt.create_container(sid, cc, sandbox_config=sc)
        await env.rt.start_container(cid)
        out = await env.rt.exec_sync(cid, ["cat", "/etc/motd"], timeout=10)
        assert (out.exit_code, out.stdout.decode()) == (0, MOTD + "\n")
        st = await env.rt.container_status(cid)
        assert st.state == cri.CONTAINER_RUNNING
        log = Path(st.log_path)
        deadline = time.monotonic() + 10
        while MOTD not in (text := await asyncio.to_thread(log.read_text)) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert text.rstrip().endswith(f"stdout F {MOTD}")
    finally:
        await env.rt.stop_pod_sandbox(sid)
        await env.rt.remove_pod_sandbox(sid)


async def test_a_missing_image_fails_without_trying_upstream(env: Env) -> None:
    with pytest.raises(errors.ShoalError) as e:
        await env.rt.pull_image("docker.io/library/absent:1")
    assert "absent" in e.value.message
    log = env.proc.log_tail(400)
    assert "registry-1.docker.io" not in log and "docker.io/library/absent" in log


async def test_teardown_leaves_nothing(env: Env) -> None:
    containerd_pid, registry_pid = env.proc.pid, env.registry.pid
    assert containerd_pid is not None
    report = await env.proc.cleanup()
    assert report.errors == []
    env.registry.stop()
    for pid in (containerd_pid, registry_pid):
        assert not await asyncio.to_thread(alive, pid)
    assert env.proc.shim_pids() == []
    assert mounts_under(env.base) == []
    assert leftover_netns(env.netns_before) == []
    run("ip", "link", "del", BRIDGE)
    assert not link_exists(BRIDGE)
