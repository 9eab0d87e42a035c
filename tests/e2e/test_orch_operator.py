"""The operator's commands on the 3-node lab: port-forward that follows a replaced
pod, and exec -it through CRI's streaming Exec with a real pseudo-terminal.

The backend is a one-replica Deployment of busybox httpd whose page is the pod's
hostname (its name), so the test can tell which pod answered. Needs root; run
with ``flock /tmp/shoal-e2e.lock pytest -q tests/e2e/test_orch_operator.py``.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.testing.waiting import wait_for as _wait_for

pytestmark = pytest.mark.e2e

NS = "operator-e2e"
IMAGE = "docker.io/library/busybox:1.36"
Cluster = Any  # tests/e2e/conftest.py's Cluster


def wait_for(what: str, check: Callable[[], Any], *, timeout: float = 90.0) -> Any:
    return _wait_for(what, check, timeout=timeout)


def web(name: str) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, NS
    d.spec.replicas = 1
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    pod = d.spec.template.spec
    pod.termination_grace_period_seconds = 1
    c = pod.containers.add(name="httpd", image=IMAGE)
    c.command.extend(["sh", "-c", "mkdir -p /www && hostname > /www/index.html "
                      "&& exec httpd -f -p 8080 -h /www"])
    c.ports.add(name="http", container_port=8080)
    probe = c.readiness_probe
    probe.http_get.path = "/"
    probe.http_get.port.int_val = 8080
    probe.period_seconds, probe.failure_threshold = 1, 1
    return d


def ready_pods(cluster: Cluster, app: str) -> list[core_pb2.Pod]:
    return [p for p in cluster.client.list(core_pb2.Pod, namespace=NS,
                                           label_selector=f"app={app}").items
            if not p.metadata.HasField("deletion_timestamp")
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions)]


def shoal_argv(cluster: Cluster, *args: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, SHOAL_CONFIG=str(cluster.config))
    return [sys.executable, "-m", "shoal.cli.main", *args], env


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> Iterator[str]:
    n = core_pb2.Namespace()
    n.metadata.name = NS
    try:
        cluster.client.create(n)
    except errors.AlreadyExists:
        pass
    cluster.client.create(web("pf"))
    wait_for("the web pod is ready", lambda: ready_pods(cluster, "pf"))
    yield "pf"
    cluster.shoal("delete", "namespace", NS, "--ignore-not-found")


def page(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return str(r.read().decode().strip())
    except OSError:
        return None


def test_port_forward_survives_the_target_pod_being_replaced(cluster: Cluster,
                                                             app: str) -> None:
    (first,) = ready_pods(cluster, app)
    argv, env = shoal_argv(cluster, "port-forward", "-n", NS, f"deploy/{app}", ":8080")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        assert m, f"unexpected first line {line!r} (stderr: {proc.stderr and proc.stderr.read()})"
        port = int(m.group(1))
        assert page(port) == first.metadata.name

        cluster.client.delete(core_pb2.Pod, first.metadata.name, namespace=NS)
        (second,) = wait_for("the ReplicaSet's replacement is ready", lambda: [
            p for p in ready_pods(cluster, app) if p.metadata.name != first.metadata.name])
        # The same port-forward process, new connections: the new pod answers.
        wait_for("a new connection reaches the replacement pod",
                 lambda: page(port) == second.metadata.name, timeout=30)
        assert proc.poll() is None, "port-forward exited"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_in_pty(argv: list[str], env: dict[str, str], typed: bytes, *, rows: int, cols: int,
               timeout: float = 60, when: bytes = b"#") -> tuple[int, str]:
    """Run ``argv`` on a new pseudo-terminal of the given size, type ``typed``
    once it started, and collect what it printed until it exits."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, close_fds=True)
    os.close(slave)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the other side closed
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and when in out:  # e.g. the shell's prompt: it is listening
                os.write(master, typed)
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, out.decode("utf-8", "replace")


def test_exec_it_runs_a_shell_on_a_terminal_of_our_size_and_returns_its_exit_code(
        cluster: Cluster, app: str) -> None:
    pod = ready_pods(cluster, app)[0].metadata.name
    argv, env = shoal_argv(cluster, "exec", "-it", "-n", NS, pod, "--", "sh")
    code, out = run_in_pty(argv, env, b"stty size; exit 7\r", rows=33, cols=101)
    assert "33 101" in out, out
    assert code == 7, out


def test_exec_i_streams_stdin_without_a_terminal(cluster: Cluster, app: str) -> None:
    pod = ready_pods(cluster, app)[0].metadata.name
    argv, env = shoal_argv(cluster, "exec", "-i", "-n", NS, pod, "--", "head", "-n", "1")
    done = subprocess.run(argv, env=env, input="hello over stdin\n", capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello over stdin\n"


def test_debug_runs_an_ephemeral_container_that_sees_the_target_processes(
        cluster: Cluster, app: str) -> None:
    pod = ready_pods(cluster, app)[0].metadata.name
    done = cluster.shoal("debug", "-n", NS, pod, "--image", IMAGE, "--target", "httpd",
                         "-c", "ps-once", "--", "ps", "-o", "args")
    assert done.returncode == 0, done.stderr
    assert "httpd -f -p 8080" in done.stdout  # the target's process, in a shared PID ns
    got = cluster.client.get(core_pb2.Pod, pod, namespace=NS)
    (status,) = [s for s in got.status.ephemeral_container_statuses if s.name == "ps-once"]
    assert status.state.terminated.exit_code == 0
    # The pod's own container was left alone.
    assert [c.restart_count for c in got.status.container_statuses] == [0]


def test_debug_it_attaches_a_terminal_and_returns_the_exit_code(cluster: Cluster,
                                                                app: str) -> None:
    pod = ready_pods(cluster, app)[0].metadata.name
    argv, env = shoal_argv(cluster, "debug", "-it", "-n", NS, pod, "--image", IMAGE,
                           "-c", "shell", "--", "sh")
    code, out = run_in_pty(argv, env, b"\recho in-$((6*7))\rexit 4\r", rows=24, cols=80,
                           when=b"try pressing enter")
    assert "in-42" in out, out
    assert code == 4, out
