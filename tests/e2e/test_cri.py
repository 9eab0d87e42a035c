"""End to end: Shoal's CRI client against a real containerd that the test starts.

One containerd for the module (``ContainerdProcess``: root, state and socket
in a temp dir; host network namespace), with a CNI bridge + host-local
conflist on a test-only bridge (``shoalt0``, 10.88.77.0/24) and images built
by ``shoal.images`` from the host's busybox and imported with ``ctr``.

The bridge is created by the test with the gateway address and the conflist
uses ``isGateway: false`` and ``ipMasq: false``: the CNI plugin then adds no
iptables rule and does not touch ``ip_forward``, pods get no default route,
and nothing can NAT out through the uplink. Traffic goes only from this host
to the pod IPs on that bridge.

The last test tears everything down with ``cleanup()`` and checks that no
shim, netns, mount, bridge or iptables rule is left; the fixture repeats the
clean-up (it is idempotent) should a test fail on the way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from nodeagent.containerd import (
    NETNS_DIR,
    ContainerdConfig,
    ContainerdProcess,
    leftover_netns,
    mounts_under,
)
from nodeagent.cri import RuntimeClient, runtime_ready
from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.images import ImageRef, build_busybox_image, build_sandbox_image, import_image

pytestmark = pytest.mark.e2e

BRIDGE = "shoalt0"
SUBNET = ipaddress.ip_network("10.88.77.0/24")
GATEWAY = "10.88.77.1"
INDEX = b"<h1>served by shoal e2e</h1>\n"
T = TypeVar("T")


@dataclass
class Lab:
    base: Path
    proc: ContainerdProcess
    rt: RuntimeClient
    busybox: ImageRef
    pause: ImageRef
    netns_before: list[str]
    iptables_before: str
    ip_forward_before: str
    uids: int = 0
    shims_seen: set[int] = field(default_factory=set)

    def sandbox_config(self, name: str) -> cri.PodSandboxConfig:
        self.uids += 1
        uid = f"e2e-{os.getpid()}-{self.uids}"
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="e2e"),
            hostname=name, log_directory=str(self.base / "pods" / uid),
            labels={"io.kubernetes.pod.uid": uid, "shoal.dev/test": "cri"},
            linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(network=cri.POD, pid=cri.CONTAINER,
                                                      ipc=cri.POD))))

    def container_config(self, name: str, command: list[str], **kw: object
                         ) -> cri.ContainerConfig:
        return cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(
                image=self.busybox.name), command=command, log_path=f"{name}/0.log",
            labels={"io.kubernetes.container.name": name}, **kw)  # type: ignore[arg-type]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def link_exists(name: str) -> bool:
    return run("ip", "link", "show", name).returncode == 0


def iptables_rules() -> str:
    return "\n".join(run("iptables", "-t", table, "-S").stdout
                     for table in ("filter", "nat", "mangle"))


def missing_tools() -> str | None:
    for tool in ("containerd", "ctr", "runc", "nsenter", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/lib/cni/bridge").exists() or not Path("/bin/busybox").exists():
        return "needs containernetworking-plugins and busybox-static"
    return None


def netns_names() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.exists() else []


def read_text(path: str) -> str:
    return Path(path).read_text()


def ip_forward() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout: float,
                     what: str) -> T:
    """Poll ``check`` until it returns something, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        got = await check()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


def write_cni_conf(conf_dir: Path, ipam_dir: Path) -> None:
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-shoal-e2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0",
        "name": "shoal-e2e-cri",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": False,
            "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                     "ranges": [[{"subnet": str(SUBNET), "gateway": GATEWAY}]]},
        }],
    }, indent=2))


def delete_bridge() -> None:
    if link_exists(BRIDGE):
        run("ip", "link", "del", BRIDGE)


@pytest.fixture(scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    missing = missing_tools()
    if missing:
        pytest.skip(missing)
    if link_exists(BRIDGE):
        pytest.fail(f"bridge {BRIDGE} already exists: a leak from an earlier run, or another "
                    f"test uses it; remove it with `ip link del {BRIDGE}`")
    base = tmp_path_factory.mktemp("cri")
    netns_before = netns_names()
    iptables_before, forward_before = iptables_rules(), ip_forward()
    # The bridge, with the gateway address the host reaches pods from.
    for argv in (("ip", "link", "add", BRIDGE, "type", "bridge"),
                 ("ip", "addr", "add", f"{GATEWAY}/{SUBNET.prefixlen}", "dev", BRIDGE),
                 ("ip", "link", "set", BRIDGE, "up")):
        done = run(*argv)
        assert done.returncode == 0, done.stderr
    write_cni_conf(base / "cni", base / "ipam")
    pause = build_sandbox_image(base / "pause.tar", name="shoal/pause:e2e")
    busybox = build_busybox_image(base / "busybox.tar", name="shoal/busybox:e2e",
                                  cmd=["sh"], files={"/var/www/index.html": INDEX})
    config = ContainerdConfig.under(base / "node", cni_conf_dir=base / "cni",
                                    sandbox_image=pause.name)
    proc = ContainerdProcess(config, start_timeout=30)
    rt = proc.client(timeout=30)
    try:
        await proc.start()
        for image in (pause, busybox):
            await asyncio.to_thread(import_image, image, address=proc.address)
        yield Lab(base=base, proc=proc, rt=rt, busybox=busybox, pause=pause,
                  netns_before=netns_before, iptables_before=iptables_before,
                  ip_forward_before=forward_before)
    finally:
        await rt.close()
        await proc.cleanup()
        delete_bridge()


async def run_pod(lab: Lab, name: str) -> tuple[str, cri.PodSandboxConfig]:
    sc = lab.sandbox_config(name)
    sid = await lab.rt.run_pod_sandbox(sc)
    lab.shims_seen.update(lab.proc.shim_pids())
    return sid, sc


async def start_container(lab: Lab, sid: str, sc: cri.PodSandboxConfig,
                          cc: cri.ContainerConfig) -> str:
    cid = await lab.rt.create_container(sid, cc, sandbox_config=sc)
    await lab.rt.start_container(cid)
    return cid


async def remove_pod(lab: Lab, sid: str) -> None:
    await lab.rt.stop_pod_sandbox(sid)
    await lab.rt.remove_pod_sandbox(sid)


async def exited(lab: Lab, cid: str, timeout: float = 15) -> cri.ContainerStatus:
    async def check() -> cri.ContainerStatus | None:
        st = await lab.rt.container_status(cid)
        return st if st.state == cri.CONTAINER_EXITED else None

    return await eventually(check, timeout=timeout, what=f"container {cid[:12]} to exit")


def http_get(url: str) -> bytes:
    """One bounded GET, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=2) as resp:
        body: bytes = resp.read(1 << 16)
        return body


# -- the tests ----------------------------------------------------------------------

async def test_runtime_is_ready_and_images_are_present(lab: Lab) -> None:
    v = await lab.rt.version()
    assert v.runtime_name == "containerd" and v.runtime_api_version == "v1"
    assert runtime_ready(await lab.rt.status())[:2] == (True, True)
    img = await lab.rt.image_status(lab.busybox.name)
    assert img is not None and img.id == lab.busybox.config_digest
    assert lab.busybox.name in img.repo_tags
    assert await lab.rt.image_status("docker.io/library/absent:1") is None
    ids = {i.id for i in await lab.rt.list_images()}
    assert {lab.busybox.config_digest, lab.pause.config_digest} <= ids
    (fs,) = await lab.rt.image_fs_info()
    assert fs.fs_id.mountpoint.startswith(str(lab.base))


async def test_httpd_pod_serves_its_file_at_the_pod_ip(lab: Lab) -> None:
    sid, sc = await run_pod(lab, "web")
    try:
        status = await lab.rt.pod_sandbox_status(sid)
        assert status.state == cri.SANDBOX_READY
        ip = ipaddress.ip_address(status.network.ip)
        assert ip in SUBNET and str(ip) != GATEWAY
        cid = await start_container(lab, sid, sc, lab.container_config(
            "httpd", ["httpd", "-f", "-p", "8080", "-h", "/var/www"],
            envs=[cri.KeyValue(key="GREETING", value="hi")]))
        st = await lab.rt.container_status(cid)
        assert st.state == cri.CONTAINER_RUNNING and st.image_ref == lab.busybox.config_digest
        assert st.log_path == str(lab.base / "pods" / sc.metadata.uid / "httpd" / "0.log")

        async def fetch() -> bytes | None:
            try:
                return await asyncio.to_thread(http_get, f"http://{ip}:8080/index.html")
            except OSError:
                return None          # httpd not listening yet

        assert await eventually(fetch, timeout=15, what="httpd to answer") == INDEX

        hi = await lab.rt.exec_sync(cid, ["echo", "hi"], timeout=10)
        assert (hi.exit_code, hi.stdout.strip()) == (0, b"hi")
        env = await lab.rt.exec_sync(cid, ["sh", "-c", "echo $GREETING; exit 4"], timeout=10)
        assert (env.exit_code, env.stdout.strip()) == (4, b"hi")

        listed = await lab.rt.list_containers(sandbox_id=sid)
        assert [c.id for c in listed] == [cid]
        assert [c.id for c in await lab.rt.list_containers(
            labels={"io.kubernetes.container.name": "httpd"},
            state=cri.CONTAINER_RUNNING)] == [cid]
        assert [s.id for s in await lab.rt.list_pod_sandbox(
            labels={"io.kubernetes.pod.uid": sc.metadata.uid})] == [sid]
        stats = await lab.rt.container_stats(cid)
        assert stats.attributes.id == cid and stats.memory.working_set_bytes.value > 0
    finally:
        await remove_pod(lab, sid)


async def test_a_missing_executable_fails_start_with_the_runtimes_message(lab: Lab) -> None:
    sid, sc = await run_pod(lab, "bad")
    try:
        cid = await lab.rt.create_container(sid, lab.container_config("bad", ["nosuch"]),
                                            sandbox_config=sc)
        with pytest.raises(errors.InternalError) as e:
            await lab.rt.start_container(cid)
        assert 'exec: "nosuch": executable file not found in $PATH' in e.value.message
        st = await lab.rt.container_status(cid)
        assert (st.state, st.exit_code, st.reason) == (cri.CONTAINER_EXITED, 128, "StartError")
        assert "nosuch" in st.message
    finally:
        await remove_pod(lab, sid)


async def test_exit_code_is_reported(lab: Lab) -> None:
    sid, sc = await run_pod(lab, "exit3")
    try:
        cid = await start_container(lab, sid, sc, lab.container_config(
            "exit3", ["sh", "-c", "echo bye; exit 3"]))
        st = await exited(lab, cid)
        assert (st.exit_code, st.reason) == (3, "Error")
        # containerd stamps started_at when its start call returns, which can be
        # just after a process this short has already exited: allow 100 ms.
        assert st.started_at > 0 and st.finished_at > 0
        assert st.finished_at >= st.started_at - 100_000_000
        log = read_text(st.log_path)
        assert log.rstrip().endswith("stdout F bye")       # CRI log format
    finally:
        await remove_pod(lab, sid)


async def test_stop_and_remove(lab: Lab) -> None:
    sid, sc = await run_pod(lab, "stopper")
    polite = await start_container(lab, sid, sc, lab.container_config(
        "polite", ["sleep", "3600"]))
    stubborn = await start_container(lab, sid, sc, lab.container_config(
        "stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]))
    # busybox sleep dies of the SIGTERM at once.
    started = time.monotonic()
    await lab.rt.stop_container(polite, 30)
    assert time.monotonic() - started < 5
    st = await lab.rt.container_status(polite)
    assert (st.state, st.exit_code) == (cri.CONTAINER_EXITED, 143)
    # A shell that ignores SIGTERM gets SIGKILL once the 1 s grace is over.
    started = time.monotonic()
    await lab.rt.stop_container(stubborn, 1)
    assert 1 <= time.monotonic() - started < 10
    st = await lab.rt.container_status(stubborn)
    assert (st.state, st.exit_code) == (cri.CONTAINER_EXITED, 137)
    cid = polite
    await lab.rt.stop_container(cid, 1)                  # idempotent
    await lab.rt.remove_container(cid)
    with pytest.raises(errors.NotFound):
        await lab.rt.container_status(cid)
    await lab.rt.remove_container(cid)                   # idempotent
    await lab.rt.stop_pod_sandbox(sid)
    assert (await lab.rt.pod_sandbox_status(sid)).state == cri.SANDBOX_NOTREADY
    await lab.rt.remove_pod_sandbox(sid)
    with pytest.raises(errors.NotFound):
        await lab.rt.pod_sandbox_status(sid)
    await lab.rt.stop_pod_sandbox(sid)                   # idempotent
    await lab.rt.remove_pod_sandbox(sid)


async def test_containerd_restart_keeps_pods_and_the_client_reconnects(lab: Lab) -> None:
    sid, sc = await run_pod(lab, "survivor")
    try:
        cid = await start_container(lab, sid, sc, lab.container_config(
            "survivor", ["sleep", "3600"]))
        old_pid = lab.proc.pid
        await lab.proc.stop()
        with pytest.raises(errors.Unavailable):
            await lab.rt.version()
        await lab.proc.start()
        assert lab.proc.pid != old_pid and not lab.proc.adopted
        # The same client reconnects by itself, and the container kept running.
        await lab.rt.wait_ready(15)
        assert (await lab.rt.container_status(cid)).state == cri.CONTAINER_RUNNING
        assert (await lab.rt.exec_sync(cid, ["true"], timeout=5)).exit_code == 0
        # Another ContainerdProcess for the same node adopts this containerd
        # (after an agent restart) instead of starting a second one.
        other = ContainerdProcess(lab.proc.config)
        await other.start()
        assert other.adopted and other.pid == lab.proc.pid
    finally:
        await remove_pod(lab, sid)


async def test_cleanup_leaves_nothing_behind(lab: Lab) -> None:
    # Leave work for cleanup(): a pod with a running container.
    sid, sc = await run_pod(lab, "leftover")
    await start_container(lab, sid, sc, lab.container_config("leftover", ["sleep", "3600"]))
    containerd_pid = lab.proc.pid
    assert containerd_pid is not None
    shims = set(lab.proc.shim_pids()) | lab.shims_seen
    assert shims, "no shim was ever seen for this containerd"
    children = {int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) in
                {containerd_pid, *shims}}

    report = await lab.proc.cleanup()

    assert sid in report.sandboxes_removed and report.errors == []
    assert report.shims_killed == []           # CRI removal ended them; no force needed
    assert not lab.proc.running and lab.proc.pid is None
    assert not _alive(containerd_pid)
    assert [p for p in shims | children if _alive(p)] == []
    assert lab.proc.shim_pids() == []
    assert leftover_netns(lab.netns_before) == []
    assert mounts_under(lab.base) == []
    delete_bridge()
    assert not link_exists(BRIDGE)
    assert iptables_rules() == lab.iptables_before
    assert ip_forward() == lab.ip_forward_before


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
