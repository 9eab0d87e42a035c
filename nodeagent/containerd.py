"""The nodeagent's own containerd: a config from a typed struct, one supervised process.

As k3s does, the agent can run its own containerd instead of attaching to one
(``--cri-socket``). ``ContainerdConfig`` holds every setting Shoal cares about
and ``render()`` turns it into containerd's ``config.toml`` (version 2).
``ContainerdProcess`` starts containerd with that config, optionally inside a
node's network namespace, and knows it only by the PID it started (recorded
in a pidfile under the state dir).

Lifecycle::

               start()                          stop()
      new -------------------> running ------------------------> stopped
       |  spawn, or adopt the     |   SIGTERM; SIGKILL after the grace.
       |  containerd our pidfile  |   Pods keep running: their shims outlive
       |  names; return once CRI  |   containerd, and a new start() (or an
       |  answers (wait_ready)    |   adopting one) finds them again.
       v                          |
     ContainerdError              | cleanup():
     (exited early, not ready,    |   1. through CRI, stop and remove every sandbox
      socket owned by another)    |      (so shims, shm/overlay mounts, cni-* netns
                                  |      and veths go away properly)
                                  |   2. stop()
                                  |   3. kill any shim still serving our socket,
                                  |      unmount what is left under root/state,
                                  v      remove netns files CRI left behind
                               stopped, nothing left behind

Contract:

- ``start()`` is idempotent. After the agent was killed (-9), containerd is
  still running; the next ``start()`` adopts it through the pidfile (the PID
  must still run ``containerd --config <our file>``), so pods are not disturbed.
- Processes are signalled only by a PID this module started or recorded and
  re-checked, never by name.
- Plain ``containerd`` is started inside a network namespace with ``nsenter
  --net=/var/run/netns/NAME``. ``ip netns exec`` must not be used: it remounts
  /sys in a new mount namespace and runc then finds no cgroup mount.
- ``restrict_oom_score_adj`` defaults to true: on these machines lowering
  oom_score_adj is forbidden, and without it every sandbox fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodeagent.cri import RuntimeClient
from shoal import errors

log = logging.getLogger(__name__)

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
RUNC_V2 = "io.containerd.runc.v2"
NETNS_DIR = Path("/var/run/netns")
PIDFILE_NAME = "shoal-containerd.pid"
_SUN_PATH_MAX = 107  # bytes in a unix socket path, without the NUL
_MNT_DETACH = 2
# Snapshotters that cannot work here, or that Shoal never uses.
_UNUSED_SNAPSHOTTERS = ("aufs", "btrfs", "devmapper", "zfs")


class ContainerdError(errors.InternalError):
    """containerd could not be started, or did not become ready."""


@dataclass(frozen=True)
class ContainerdConfig:
    """Everything Shoal sets in containerd's config. Paths are absolute."""

    root: Path                                  # persistent data (images, snapshots)
    state: Path                                 # runtime state (sockets, mounts, pidfile)
    address: Path                               # the gRPC (CRI) socket
    cni_bin_dir: Path = Path("/usr/lib/cni")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    sandbox_image: str = "docker.io/shoal/pause:1"
    # Directory of per-registry hosts.toml files (mirrors); None: no mirrors.
    registry_config_path: Path | None = None
    snapshotter: str = "overlayfs"
    restrict_oom_score_adj: bool = True
    systemd_cgroup: bool = False
    # The OCI runtime binary for runc.v2 ("" = runc; "crun" also works here).
    runtime_binary: str = ""
    # Where exec/attach streaming listens; port 0 picks a free port.
    stream_server_address: str = "127.0.0.1"
    stream_server_port: int = 0
    max_container_log_line_size: int = 16384
    # Put pods' network namespace files under the state dir, not /var/run/netns.
    netns_mounts_under_state_dir: bool = False
    log_level: str = "info"
    # Plugin IDs to disable, besides the snapshotters Shoal never uses.
    disabled_plugins: tuple[str, ...] = ()
    # The metadata GC's share of time (containerd's default is 0.02). Its scheduler
    # wakes every (GC time / threshold) even when nothing changed: with a 0.5 ms
    # GC that is every 25 ms at 0.02, about 240 wakeups a second for an idle
    # containerd, against about 30 at 0.002 (a check every 250 ms; deleted
    # images and snapshots are collected up to that much later).
    gc_pause_threshold: float = 0.002

    def __post_init__(self) -> None:
        for name in ("root", "state", "address", "cni_bin_dir", "cni_conf_dir"):
            if not getattr(self, name).is_absolute():
                raise errors.BadRequest(f"containerd {name} must be an absolute path")
        # containerd also listens on address + ".ttrpc".
        if len(os.fsencode(self.address)) + len(".ttrpc") > _SUN_PATH_MAX:
            raise errors.BadRequest(
                f"containerd socket path {self.address} is too long for a unix socket "
                f"(at most {_SUN_PATH_MAX - len('.ttrpc')} bytes)")

    @classmethod
    def under(cls, base: Path, **overrides: Any) -> ContainerdConfig:
        """root, state and socket in one directory, e.g. a node's data dir."""
        return cls(root=base / "root", state=base / "state",
                   address=base / "containerd.sock", **overrides)

    def replace(self, **changes: Any) -> ContainerdConfig:
        return replace(self, **changes)

    def tree(self) -> dict[str, Any]:
        """The config as nested dicts (what ``render`` writes)."""
        snapshotters = [s for s in _UNUSED_SNAPSHOTTERS if s != self.snapshotter]
        disabled = [f"io.containerd.snapshotter.v1.{s}" for s in snapshotters]
        disabled += [p for p in self.disabled_plugins if p not in disabled]
        cri: dict[str, Any] = {
            "sandbox_image": self.sandbox_image,
            "restrict_oom_score_adj": self.restrict_oom_score_adj,
            "disable_tcp_service": True,
            "stream_server_address": self.stream_server_address,
            "stream_server_port": str(self.stream_server_port),
            "max_container_log_line_size": self.max_container_log_line_size,
            "netns_mounts_under_state_dir": self.netns_mounts_under_state_dir,
            "cni": {
                "bin_dir": str(self.cni_bin_dir),
                "conf_dir": str(self.cni_conf_dir),
                "max_conf_num": 1,
            },
            "containerd": {
                "snapshotter": self.snapshotter,
                "default_runtime_name": "runc",
                "runtimes": {"runc": {
                    "runtime_type": RUNC_V2,
                    "options": {"SystemdCgroup": self.systemd_cgroup,
                                "BinaryName": self.runtime_binary},
                }},
            },
        }
        if self.registry_config_path is not None:
            cri["registry"] = {"config_path": str(self.registry_config_path)}
        return {
            "version": 2,
            "root": str(self.root),
            "state": str(self.state),
            "oom_score": 0,
            "disabled_plugins": disabled,
            "grpc": {"address": str(self.address), "uid": 0, "gid": 0},
            "debug": {"level": self.log_level},
            "plugins": {
                CRI_PLUGIN: cri,
                # Keep containerd's "opt" dir out of /opt: one node, one tree.
                "io.containerd.internal.v1.opt": {"path": str(self.root / "opt")},
                "io.containerd.gc.v1.scheduler": {"pause_threshold": self.gc_pause_threshold},
            },
        }

    def render(self) -> str:
        """containerd's config.toml (version 2)."""
        return render_toml(self.tree())


# -- a tiny TOML writer (tables, strings, booleans, integers, string lists) ----

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def render_toml(tree: Mapping[str, Any]) -> str:
    """Nested mappings as TOML: each mapping becomes a ``[dotted.table]``."""
    lines: list[str] = []

    def walk(table: Mapping[str, Any], path: tuple[str, ...]) -> None:
        if path:
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in table.items():
            if not isinstance(v, Mapping):
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, Mapping):
                walk(v, (*path, k))

    walk(tree, ())
    return "\n".join(lines) + "\n"


def write_registry_hosts(config_path: Path, *, registry: str, endpoint: str,
                         skip_verify: bool = False, upstream: bool = True) -> Path:
    """Make ``registry`` (e.g. ``docker.io``) pull from ``endpoint`` (e.g.
    ``http://127.0.0.1:5000``): writes ``config_path/registry/hosts.toml`` for
    containerd's ``registry.config_path``. An ``http://`` endpoint is spoken
    to in plain HTTP (containerd 1.6 needs nothing more). ``upstream=False``
    also makes the endpoint the registry's ``server``, so containerd never
    falls back to the real registry (for docker.io, registry-1.docker.io).
    Returns the file written."""
    host: dict[str, Any] = {"capabilities": ["pull", "resolve"]}
    if skip_verify:
        host["skip_verify"] = True
    tree: dict[str, Any] = {}
    if not upstream:
        tree = {"server": endpoint, **host}
    tree["host"] = {endpoint: host}
    target = config_path / registry / "hosts.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_toml(tree))
    return target


@dataclass(frozen=True)
class RegistryMirror:
    """Pulls from ``registry`` (``docker.io``, ``10.77.0.1:5000``) go to ``endpoint``."""

    registry: str
    endpoint: str

    def __str__(self) -> str:
        return f"{self.registry}={self.endpoint}"


_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")


def parse_registry_mirror(text: str) -> RegistryMirror:
    """``REGISTRY=URL``, e.g. ``docker.io=http://10.77.0.1:5000``; BadRequest
    saying what is wrong otherwise."""
    registry, sep, endpoint = text.partition("=")
    example = "e.g. docker.io=http://10.77.0.1:5000"
    if not sep or not registry or not endpoint:
        raise errors.BadRequest(f"registry mirror {text!r} must be REGISTRY=URL, {example}")
    if not _REGISTRY_NAME.match(registry):
        raise errors.BadRequest(f"registry mirror {text!r}: {registry!r} is not a registry "
                                f"host such as docker.io or 10.77.0.1:5000")
    scheme, _, rest = endpoint.partition("://")
    if scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/"):
        raise errors.BadRequest(f"registry mirror {text!r}: {endpoint!r} must be an "
                                f"http:// or https:// URL of a registry host, {example}")
    return RegistryMirror(registry=registry, endpoint=f"{scheme}://{rest.rstrip('/')}")


def write_registry_mirrors(config_path: Path, mirrors: Iterable[RegistryMirror]
                           ) -> list[Path]:
    """Make ``config_path`` hold exactly ``mirrors``: one hosts.toml per registry
    (no fallback to the real registry), and no directory for a registry that is
    no longer mirrored. containerd reads these at each pull, so a change needs
    no restart. Returns the files written."""
    config_path.mkdir(parents=True, exist_ok=True)
    wanted = {m.registry: m for m in mirrors}
    for entry in config_path.iterdir():
        if entry.is_dir() and entry.name not in wanted:
            shutil.rmtree(entry)
    return [write_registry_hosts(config_path, registry=m.registry, endpoint=m.endpoint,
                                 upstream=False) for m in wanted.values()]


# -- processes and mounts -------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits to be reaped.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` exits (via a pidfd, no polling); False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        if not _alive(pid):
            return True
        await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return not _alive(pid)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(*dirs: Path) -> list[Path]:
    """Mount points at or below any of ``dirs`` (this mount namespace), deepest first."""
    roots = [d.resolve() for d in dirs]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(_unescape(line.split()[4]))
        if any(point == r or r in point.parents for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (len(p.parts), str(p)), reverse=True)


def _umount(path: Path) -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        return f"umount {path}: {os.strerror(err)}"
    return None


def _netns_path(info: Mapping[str, Any]) -> Path | None:
    """The network namespace file in containerd's verbose sandbox info."""
    spec = info.get("runtimeSpec") or {}
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return Path(ns["path"])
    return None


@dataclass
class CleanupReport:
    """What ``cleanup()`` did; ``errors`` lists what it could not do."""

    sandboxes_removed: list[str] = field(default_factory=list)
    shims_killed: list[int] = field(default_factory=list)
    netns_removed: list[Path] = field(default_factory=list)
    unmounted: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class ContainerdProcess:
    """One containerd for one node. See the module docstring for the lifecycle."""

    def __init__(self, config: ContainerdConfig, *, netns: str | None = None,
                 binary: str = "containerd", config_file: Path | None = None,
                 log_file: Path | None = None, start_timeout: float = 30.0,
                 stop_grace: float = 10.0) -> None:
        self.config = config
        self.netns = netns
        self.binary = binary
        self.config_file = config_file or config.root / "config.toml"
        self.log_file = log_file or config.state / "containerd.log"
        self.pidfile = config.state / PIDFILE_NAME
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.adopted = False
        self._proc: asyncio.subprocess.Process | None = None
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def address(self) -> str:
        return str(self.config.address)

    @property
    def running(self) -> bool:
        return self._pid is not None and _alive(self._pid)

    def client(self, **kw: Any) -> RuntimeClient:
        """A CRI client on this containerd's socket (the caller closes it)."""
        return RuntimeClient(self.address, **kw)

    def command(self) -> list[str]:
        argv = [self.binary, "--config", str(self.config_file)]
        if self.netns:
            return ["nsenter", f"--net={NETNS_DIR / self.netns}", *argv]
        return argv

    def _ours(self, pid: int) -> bool:
        """Does ``pid`` run containerd with our config file?"""
        argv = _cmdline(pid)
        return (bool(argv) and Path(argv[0]).name == Path(self.binary).name
                and "--config" in argv and str(self.config_file) in argv)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Run containerd (or adopt ours) and return once CRI answers."""
        if self.running:
            return
        self.config.root.mkdir(parents=True, exist_ok=True)
        self.config.state.mkdir(parents=True, exist_ok=True)
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config.render())
        if self.netns and not (NETNS_DIR / self.netns).exists():
            raise ContainerdError(f"network namespace {self.netns} does not exist")
        recorded = self._read_pidfile()
        if recorded is not None and _alive(recorded) and self._ours(recorded):
            log.info("adopting containerd pid %d on %s", recorded, self.address)
            self._pid, self.adopted = recorded, True
            await self._wait_ready()
            return
        self._claim_socket()
        logf = self.log_file.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                stderr=logf, start_new_session=True)
        finally:
            logf.close()
        self._pid, self.adopted = self._proc.pid, False
        self.pidfile.write_text(f"{self._pid}\n")
        log.info("started containerd pid %d on %s", self._pid, self.address)
        await self._wait_ready()

    def _read_pidfile(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _claim_socket(self) -> None:
        """Refuse a socket another live process serves; remove a stale one."""
        path = self.config.address
        if not path.exists():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)
                return
        raise ContainerdError(f"{path} is served by a process this agent did not start")

    async def _wait_ready(self) -> None:
        async with self.client() as rt:
            ready = asyncio.ensure_future(rt.wait_ready(self.start_timeout))
            waiters: set[asyncio.Future[Any]] = {ready}
            exited: asyncio.Future[Any] | None = None
            if self._proc is not None:
                exited = asyncio.ensure_future(self._proc.wait())
                waiters.add(exited)
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    if not w.done():
                        w.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await w
            if ready.done() and not ready.cancelled() and ready.exception() is None:
                return
            if exited is not None and exited.done() and not exited.cancelled():
                self._forget()
                raise ContainerdError(f"containerd exited with status {exited.result()} "
                                      f"before it was ready:\n{self.log_tail()}")
            err = ready.exception()
            await self.stop()
            raise ContainerdError(f"containerd did not become ready: {err}\n"
                                  f"{self.log_tail()}")

    # -- stop -------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace`` (default ``stop_grace``). Idempotent.
        Leaves pods running (see the module docstring)."""
        grace = self.stop_grace if grace is None else grace
        pid, proc = self._pid, self._proc
        if pid is None:
            return
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), grace)
                except TimeoutError:
                    log.warning("containerd pid %d ignored SIGTERM for %gs; killing", pid,
                                grace)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        elif _alive(pid) and self._ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not await wait_exit(pid, grace) and self._ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await wait_exit(pid, grace)
        self._forget()
        log.info("containerd pid %d stopped", pid)

    def _forget(self) -> None:
        self._pid, self._proc = None, None
        with contextlib.suppress(OSError):
            if self._read_pidfile() is not None:
                self.pidfile.unlink()

    # -- cleanup ----------------------------------------------------------------

    def shim_pids(self) -> list[int]:
        """Shims serving this containerd (their ``-address`` is our socket).

        Shims daemonize, so they are not containerd's children; the socket
        address on their command line is what ties them to this containerd.
        """
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            argv = _cmdline(int(entry.name))
            if not argv or not Path(argv[0]).name.startswith("containerd-shim"):
                continue
            for flag, value in itertools.pairwise(argv):
                if flag in ("-address", "--address") and value == self.address:
                    found.append(int(entry.name))
                    break
        return sorted(found)

    async def remove_all_sandboxes(self, report: CleanupReport | None = None
                                   ) -> CleanupReport:
        """Stop and remove every sandbox (and so every container) through CRI."""
        report = report or CleanupReport()
        netns: list[Path] = []
        async with self.client(timeout=30.0) as rt:
            try:
                sandboxes = await rt.list_pod_sandbox()
            except errors.ShoalError as e:
                report.errors.append(f"list sandboxes: {e}")
                sandboxes = []
            for sb in sandboxes:
                try:
                    path = _netns_path(await rt.sandbox_info(sb.id))
                    if path is not None:
                        netns.append(path)
                except errors.ShoalError:
                    pass
                try:
                    await rt.stop_pod_sandbox(sb.id)
                    await rt.remove_pod_sandbox(sb.id)
                    report.sandboxes_removed.append(sb.id)
                except errors.ShoalError as e:
                    report.errors.append(f"sandbox {sb.id}: {e}")
        for path in netns:
            if path.exists():
                self._remove_netns(path, report)
        return report

    def _remove_netns(self, path: Path, report: CleanupReport) -> None:
        problem = _umount(path) if path in mounts_under(path) else None
        try:
            path.unlink()
            report.netns_removed.append(path)
        except OSError as e:
            report.errors.append(problem or f"remove {path}: {e}")

    async def cleanup(self, *, shim_grace: float = 5.0) -> CleanupReport:
        """Tear everything down: sandboxes through CRI, containerd, then any
        leftover shim, mount and netns. Safe to call when not running."""
        report = CleanupReport()
        if self.running:
            await self.remove_all_sandboxes(report)
        await self.stop()
        # Shims of removed sandboxes exit by themselves, shortly.
        for pid in self.shim_pids():
            if await wait_exit(pid, shim_grace):
                continue
            argv = _cmdline(pid)
            if self.address in argv:
                log.warning("shim pid %d outlived its sandbox; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await wait_exit(pid, shim_grace)
                report.shims_killed.append(pid)
        for point in mounts_under(self.config.root, self.config.state):
            problem = _umount(point)
            if problem:
                report.errors.append(problem)
            else:
                report.unmounted.append(point)
        if report.errors:
            log.warning("containerd cleanup incomplete: %s", "; ".join(report.errors))
        return report

    async def __aenter__(self) -> ContainerdProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def leftover_netns(before: Iterable[str], directory: Path = NETNS_DIR) -> list[str]:
    """``cni-*`` netns files in ``directory`` that were not in ``before``."""
    try:
        now = {p.name for p in directory.iterdir() if p.name.startswith("cni-")}
    except FileNotFoundError:
        return []
    return sorted(now - set(before))
