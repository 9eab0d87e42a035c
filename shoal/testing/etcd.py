"""A real ``etcd`` process for tests: free loopback ports, a temp data dir, clean stop.

Contract:

- ``start()`` picks free loopback ports for the client and peer URLs, starts
  ``etcd`` as a single-member cluster in a fresh temporary directory and returns
  once ``GET /health`` answers ``{"health":"true"}``, polling until
  ``start_timeout`` (never a fixed sleep). If etcd exits first, or the deadline
  passes, it raises ``EtcdStartError`` with the tail of etcd's log; a port taken
  between picking and binding is retried with new ports, a few times.
- ``stop()`` terminates exactly the process it started (by its PID: never
  ``pkill``), waits for it (then kills it if it lingers), and removes the temp
  directory. It is idempotent, and also runs at interpreter exit if forgotten.
- ``data_dir`` serves an existing data directory (a restored snapshot) instead
  of a fresh one; it is left in place on ``stop()``.
- ``unsafe_no_fsync=True`` adds ``--unsafe-no-fsync`` (faster, loses data on a
  crash); off by default.
- ``progress_notify_interval`` (seconds) sets etcd's periodic watch progress
  notices (``--experimental-watch-progress-notify-interval``; etcd's default is
  10 minutes). On etcd before 3.4.25 only these notices are trustworthy, so a
  quiet watch advances only through them (see ``apiserver.storage.etcd``).

Lifecycle::

    new --start()--> running --stop()--> stopped
                        |                   ^
                        +---(GC/exit)-------+

    with EtcdServer() as etcd:   # start() ... stop()
        store = EtcdStore([etcd.endpoint])
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

_DEBIAN_PACKAGE = "etcd-server"
_PORT_ATTEMPTS = 3


class EtcdNotInstalled(RuntimeError):
    """No ``etcd`` binary on PATH."""


class EtcdStartError(RuntimeError):
    """etcd exited or did not become healthy in time."""


def etcd_binary(binary: str = "etcd") -> str | None:
    """The path of the etcd binary, or None if it is not installed."""
    return shutil.which(binary)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes], workdir: str, grace: float) -> None:
    """Stop exactly ``proc`` and remove ``workdir``. Safe to call twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


class EtcdServer:
    """One single-member etcd cluster on loopback."""

    def __init__(
        self,
        *,
        binary: str = "etcd",
        unsafe_no_fsync: bool = False,
        progress_notify_interval: float | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
    ) -> None:
        self._binary = binary
        # An existing data dir to serve (e.g. a restored snapshot); kept on stop.
        self._data_dir = data_dir
        self._unsafe_no_fsync = unsafe_no_fsync
        self._progress_notify_interval = progress_notify_interval
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._finalizer: weakref.finalize[..., EtcdServer] | None = None
        self.client_port = 0
        self.peer_port = 0

    @property
    def endpoint(self) -> str:
        """The client endpoint, ``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("etcd is not running")
        return self._proc.pid

    @property
    def data_dir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("etcd is not running")
        return self._data_dir or Path(self._workdir) / "data"

    def start(self) -> None:
        if self._proc is not None:
            return
        binary = etcd_binary(self._binary)
        if binary is None:
            raise EtcdNotInstalled(
                f"{self._binary!r} is not on PATH; install the Debian package "
                f"{_DEBIAN_PACKAGE} (apt-get install {_DEBIAN_PACKAGE})"
            )
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._start_once(binary)
                return
            except EtcdStartError as e:
                if attempt == _PORT_ATTEMPTS or "address already in use" not in str(e):
                    raise

    def _start_once(self, binary: str) -> None:
        self.client_port, self.peer_port = _free_port(), _free_port()
        workdir = tempfile.mkdtemp(prefix="shoal-etcd-")
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        name = "shoal-test"
        args = [
            binary,
            "--name", name,
            "--data-dir", str(self._data_dir or Path(workdir) / "data"),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if self._unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if self._progress_notify_interval is not None:
            interval_ms = max(1, round(self._progress_notify_interval * 1000))
            args += ["--experimental-watch-progress-notify-interval", f"{interval_ms}ms"]
        args.extend(self._extra_args)
        log_path = Path(workdir) / "etcd.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._proc, self._workdir = proc, workdir
        self._finalizer = weakref.finalize(self, _terminate, proc, workdir, self._stop_timeout)
        try:
            self._wait_healthy(log_path)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, log_path: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise EtcdStartError(f"etcd exited with {code}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0) as answer:
                    health = json.loads(answer.read())
                if health.get("health") == "true":
                    return
                last_error = f"health {health!r}"
            except (OSError, ValueError) as e:
                last_error = str(e)
            time.sleep(0.05)
        raise EtcdStartError(
            f"etcd not healthy after {self._start_timeout}s ({last_error}):\n{_tail(log_path)}"
        )

    def stop(self) -> None:
        """Stop the process this object started and remove its data. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once
        self._proc = None
        self._workdir = None
        self._finalizer = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _tail(path: Path, *, lines: int = 20) -> str:
    try:
        return os.linesep.join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster (for failover tests).

    ``kill(i)`` SIGKILLs member ``i`` (the one this object started, by PID);
    ``stop()`` ends every member and removes the data. Members start together
    and are waited on until each says ``/health`` true.
    """

    def __init__(self, size: int = 3, *, binary: str = "etcd", start_timeout: float = 30.0
                 ) -> None:
        self.size = size
        self._binary = binary
        self._start_timeout = start_timeout
        self._procs: list[subprocess.Popen[bytes]] = []
        self._workdir: str | None = None
        self.client_ports: list[int] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def pid(self, i: int) -> int:
        return self._procs[i].pid

    def start(self) -> None:
        binary = etcd_binary(self._binary)
        if binary is None:
            raise EtcdNotInstalled(f"{self._binary!r} is not on PATH; install the Debian "
                                   f"package {_DEBIAN_PACKAGE}")
        self._workdir = tempfile.mkdtemp(prefix="shoal-etcd-cluster-")
        self.client_ports = [_free_port() for _ in range(self.size)]
        peers = [_free_port() for _ in range(self.size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peers))
        for i in range(self.size):
            client = f"http://127.0.0.1:{self.client_ports[i]}"
            peer = f"http://127.0.0.1:{peers[i]}"
            log = (Path(self._workdir) / f"m{i}.log").open("wb")
            self._procs.append(subprocess.Popen(
                [binary, "--name", f"m{i}", "--data-dir", str(Path(self._workdir) / f"m{i}"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--unsafe-no-fsync", "--experimental-watch-progress-notify-interval",
                 "500ms", "--logger", "zap", "--log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + self._start_timeout
        for i, endpoint in enumerate(self.endpoints):
            while True:
                if self._procs[i].poll() is not None:
                    self.stop()
                    raise EtcdStartError(f"etcd member m{i} exited")
                try:
                    with urllib.request.urlopen(f"http://{endpoint}/health", timeout=1) as r:
                        if json.loads(r.read()).get("health") == "true":
                            break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise EtcdStartError(f"etcd member m{i} not healthy in time")
                time.sleep(0.05)

    def kill(self, i: int) -> None:
        proc = self._procs[i]
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=2)  # a member that lost quorum may linger: the data goes
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
