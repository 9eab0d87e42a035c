"""The operator's commands against an in-process apiserver: ``get -w`` resuming
across an apiserver restart, ``diff``, ``explain``, and who may open exec and
port-forward streams.

``get -w`` runs as a task on the test's loop (the apiserver's loop) with its
output in a StringIO, so the test sees what it printed while it runs.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.node.v1 import node_pb2
from shoal.api.rbac.v1 import rbac_pb2
from shoal.cli.getting import GetOptions, run_get
from shoal.cli.session import Session
from shoal.kinds import builtin_kinds
from shoal.testing.apiserver import InProcessAPIServer


def configmap(name: str, namespace: str, **data: str) -> core_pb2.ConfigMap:
    cm = core_pb2.ConfigMap()
    cm.metadata.name, cm.metadata.namespace = name, namespace
    cm.data.update(data)
    return cm


async def wait_until(pred: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.02)


def event_lines(out: str) -> list[tuple[str, str]]:
    return [(parts[0], parts[1]) for line in out.splitlines()
            if (parts := line.split()) and parts[0] != "EVENT"]


async def test_get_watch_resumes_after_an_apiserver_restart_without_repeats_or_gaps(
        tmp_path: Path) -> None:
    api = InProcessAPIServer(tmp_path)
    await api.start()
    out, err = io.StringIO(), io.StringIO()
    session = Session(kinds=builtin_kinds(), out=out, err=err, stdin=io.StringIO(),
                      config_path=str(api.config_path), namespace_flag="watched")
    try:
        async with api.client() as c:
            ns = core_pb2.Namespace()
            ns.metadata.name = "watched"
            await c.create(ns)
            await c.create(configmap("before", "watched"))
            watch = asyncio.create_task(run_get(session, GetOptions(
                args=("configmaps",), watch=True, output_watch_events=True)))
            await wait_until(lambda: ("ADDED", "before") in event_lines(out.getvalue()))
            await c.create(configmap("a", "watched"))
            await wait_until(lambda: ("ADDED", "a") in event_lines(out.getvalue()))

            await api.restart()  # the watch stream drops; the CLI resumes by itself
            await c.create(configmap("b", "watched"))
            a = await c.get(core_pb2.ConfigMap, "a", namespace="watched")
            a.data["k"] = "v"
            await c.update(a)
            await c.delete(core_pb2.ConfigMap, "before", namespace="watched")
            await wait_until(lambda: ("DELETED", "before") in event_lines(out.getvalue()))
            await asyncio.sleep(0.5)  # a repeated event would arrive by now
            watch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watch
        assert event_lines(out.getvalue()) == [
            ("ADDED", "before"), ("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"),
            ("DELETED", "before")], out.getvalue()
        assert out.getvalue().splitlines()[0].split()[:2] == ["EVENT", "NAME"]
    finally:
        await session.aclose()
        await api.stop()


async def test_exec_and_port_forward_streams_are_authorized_per_pod(
        apiserver: InProcessAPIServer) -> None:
    """Without create pods/exec (pods/portforward) the stream is refused before
    anything reaches a node, naming the subresource; with it, the request gets
    as far as finding the pod."""
    async with apiserver.client() as admin:
        ns = core_pb2.Namespace()
        ns.metadata.name = "streams"
        try:
            await admin.create(ns)
        except errors.AlreadyExists:
            pass
        role = rbac_pb2.Role()
        role.metadata.name, role.metadata.namespace = "pf-only", "streams"
        rule = role.rules.add()
        rule.api_groups.append("")
        rule.resources.append("pods/portforward")
        rule.verbs.append("create")
        await admin.create(role)
        binding = rbac_pb2.RoleBinding()
        binding.metadata.name, binding.metadata.namespace = "pf-only", "streams"
        binding.role_ref.kind, binding.role_ref.name = "Role", "pf-only"
        binding.role_ref.api_group = "rbac.authorization.k8s.io"
        binding.subjects.add(kind="User", name="forwarder",
                             api_group="rbac.authorization.k8s.io")
        await admin.create(binding)

    from shoal.client import AsyncClient

    async with AsyncClient(apiserver.user_client_config("forwarder")) as user:
        stream = user.exec_stream(node_pb2.ExecStart(namespace="streams", pod="web",
                                                     command=["sh"], stdin=True, tty=True))
        await stream.open()
        with pytest.raises(errors.Forbidden, match="pods/exec"):
            await stream.read()
        stream.cancel()

        pf = user.port_forward(node_pb2.PortForwardStart(namespace="streams", pod="web",
                                                         port=80))
        await pf.open()
        with pytest.raises(errors.NotFound, match="web"):
            await pf.read()  # allowed: it got as far as looking for the pod
        pf.cancel()


@pytest.fixture
def shoal(apiserver: InProcessAPIServer, capsys: pytest.CaptureFixture[str]) -> Any:
    """``await shoal("diff", ...)`` -> (exit code, stdout, stderr)."""
    from shoal.cli.main import main

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(apiserver.config_path), *args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return code, captured.out, captured.err

    return run


def cm_yaml(name: str, ns: str, value: str) -> str:
    return (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
            f"  namespace: {ns}\ndata:\n  k: {value}\n")


async def test_diff_shows_what_apply_would_change_with_kubectl_exit_codes(
        shoal: Any, tmp_path: Path) -> None:
    ns = "diffs"
    (tmp_path / "ns.yaml").write_text(f"apiVersion: v1\nkind: Namespace\nmetadata:\n"
                                      f"  name: {ns}\n")
    assert (await shoal("apply", "-f", str(tmp_path / "ns.yaml")))[0] == 0
    f = tmp_path / "cm.yaml"
    f.write_text(cm_yaml("settings", ns, "one"))

    code, out, _ = await shoal("diff", "-f", str(f))  # not there yet: all added
    assert code == 1
    assert out.startswith(f"diff -u -N LIVE/v1.ConfigMap.{ns}.settings "
                          f"MERGED/v1.ConfigMap.{ns}.settings\n")
    assert "+kind: ConfigMap\n" in out and "+  k: one\n" in out

    assert (await shoal("apply", "-f", str(f)))[0] == 0
    assert await shoal("diff", "-f", str(f)) == (0, "", "")  # applied: nothing to change

    f.write_text(cm_yaml("settings", ns, "two"))
    code, out, _ = await shoal("diff", "-f", str(f))
    assert code == 1
    assert "-  k: one\n" in out and "+  k: two\n" in out
    live = (await shoal("get", "cm", "settings", "-n", ns, "-o", "yaml"))[1]
    assert "k: one" in live  # diff wrote nothing

    f.write_text(cm_yaml("settings", ns, "two") + "  bad: [\n")
    code, _, err = await shoal("diff", "-f", str(f))
    assert code == 2 and err


async def bash_complete(line_words: list[str], config: Path) -> list[str]:
    """Source ``shoal completion bash`` in a real bash, set COMP_WORDS to the
    line (its last word being typed) and call the completion function."""
    import os
    import shlex
    import sys

    from shoal.cli.completing import BASH

    words = " ".join(shlex.quote(w) for w in ["shoal", *line_words])
    program = (f"shoal() {{ {shlex.quote(sys.executable)} -m shoal.cli.main \"$@\"; }}\n"
               f"{BASH}\nCOMP_WORDS=({words}); COMP_CWORD={len(line_words)}\n"
               "_shoal_complete; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", program, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "SHOAL_CONFIG": str(config)})
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return [w for w in out.decode().splitlines() if w]


async def test_bash_completion_completes_commands_kinds_and_names_from_the_server(
        apiserver: InProcessAPIServer) -> None:
    async with apiserver.client() as c:
        ns = core_pb2.Namespace()
        ns.metadata.name = "completing"
        try:
            await c.create(ns)
        except errors.AlreadyExists:
            pass
        for name in ("alpha", "beta"):
            try:
                await c.create(configmap(name, "completing"))
            except errors.AlreadyExists:
                pass
    config = apiserver.config_path
    assert await bash_complete(["ge"], config) == ["get"]
    assert "deployments" in await bash_complete(["get", "dep"], config)
    assert await bash_complete(["get", "-n", "completing", "configmaps", "a"],
                               config) == ["alpha"]
    assert await bash_complete(["describe", "-n", "completing", "cm/"], config) == [
        "cm/alpha", "cm/beta"]


async def test_ephemeral_containers_go_through_their_own_authorized_subresource(
        apiserver: InProcessAPIServer) -> None:
    """AddEphemeralContainer needs update pods/ephemeralcontainers (update pods
    is not enough), may only add, refuses duplicate names and unknown targets,
    and a plain update cannot touch ephemeral containers."""
    from shoal.client import AsyncClient

    async with apiserver.client() as admin:
        ns = core_pb2.Namespace()
        ns.metadata.name = "debugging"
        try:
            await admin.create(ns)
        except errors.AlreadyExists:
            pass
        p = core_pb2.Pod()
        p.metadata.name, p.metadata.namespace = "web", "debugging"
        p.spec.containers.add(name="app", image="busybox")
        await admin.create(p)
        role = rbac_pb2.Role()
        role.metadata.name, role.metadata.namespace = "pod-editor", "debugging"
        rule = role.rules.add()
        rule.api_groups.append("")
        rule.resources.append("pods")
        rule.verbs.extend(["get", "update"])
        await admin.create(role)
        binding = rbac_pb2.RoleBinding()
        binding.metadata.name, binding.metadata.namespace = "pod-editor", "debugging"
        binding.role_ref.kind, binding.role_ref.name = "Role", "pod-editor"
        binding.role_ref.api_group = "rbac.authorization.k8s.io"
        binding.subjects.add(kind="User", name="editor",
                             api_group="rbac.authorization.k8s.io")
        await admin.create(binding)

        dbg = core_pb2.EphemeralContainer(name="debugger-1", image="busybox",
                                          target_container_name="app", stdin=True, tty=True)
        async with AsyncClient(apiserver.user_client_config("editor")) as editor:
            with pytest.raises(errors.Forbidden, match="pods/ephemeralcontainers"):
                await editor.add_ephemeral_container("web", dbg, namespace="debugging")
            # A plain update of the pod cannot add one either.
            mine = await editor.get(core_pb2.Pod, "web", namespace="debugging")
            mine.spec.ephemeral_containers.append(dbg)
            with pytest.raises(errors.Invalid):
                await editor.update(mine)

        got = await admin.add_ephemeral_container("web", dbg, namespace="debugging")
        assert [e.name for e in got.spec.ephemeral_containers] == ["debugger-1"]
        assert got.spec.ephemeral_containers[0].target_container_name == "app"
        with pytest.raises(errors.Invalid, match="Duplicate"):
            await admin.add_ephemeral_container("web", dbg, namespace="debugging")
        stray = core_pb2.EphemeralContainer(name="debugger-2", image="busybox",
                                            target_container_name="nope")
        with pytest.raises(errors.Invalid, match="targetContainerName"):
            await admin.add_ephemeral_container("web", stray, namespace="debugging")
        with pytest.raises(errors.Invalid, match="image"):
            await admin.add_ephemeral_container(
                "web", core_pb2.EphemeralContainer(name="debugger-3"), namespace="debugging")
        with pytest.raises(errors.NotFound):
            await admin.add_ephemeral_container("gone", dbg, namespace="debugging")
