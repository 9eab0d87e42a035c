"""FakeRuntime behaves as its docstring says, on a fake clock; and the fake and
the real RuntimeClient raise the same Shoal errors for the same situations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from nodeagent.cri import (
    IMAGE_SERVICE,
    RUNTIME_SERVICE,
    ExecResult,
    Runtime,
    RuntimeClient,
    classify,
    runtime_ready,
)
from shoal import errors
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.testing.fakecri import Behaviour, FakeClock, FakeRuntime

T0 = 1_000_000.0
NS = 1_000_000_000


def sandbox_config(name: str = "web-0", uid: str = "uid-1", attempt: int = 0,
                   **labels: str) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default",
                                        attempt=attempt),
        log_directory=f"/var/log/pods/default_{name}_{uid}",
        labels={"io.kubernetes.pod.uid": uid, **labels})


def container_config(name: str = "app", image: str = "busybox", attempt: int = 0
                     ) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=attempt),
        image=cri.ImageSpec(image=image), command=["sleep", "3600"],
        labels={"io.kubernetes.container.name": name}, log_path=f"{name}/{attempt}.log")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def rt(clock: FakeClock) -> FakeRuntime:
    fake = FakeRuntime(clock=clock)
    fake.add_image("busybox")
    return fake


async def start(rt: FakeRuntime, name: str = "app", image: str = "busybox",
                *, sandbox: str | None = None) -> str:
    sc = sandbox_config()
    sid = sandbox or await rt.run_pod_sandbox(sc)
    cid = await rt.create_container(sid, container_config(name, image), sandbox_config=sc)
    await rt.start_container(cid)
    return cid


# -- sandboxes ------------------------------------------------------------------

async def test_sandbox_gets_an_ip_and_is_listed_by_label(rt: FakeRuntime) -> None:
    a = await rt.run_pod_sandbox(sandbox_config("a", "u-a"))
    b = await rt.run_pod_sandbox(sandbox_config("b", "u-b", tier="web"))
    st = await rt.pod_sandbox_status(a)
    assert st.state == cri.SANDBOX_READY and st.network.ip.startswith("10.88.0.")
    assert st.created_at == int(T0 * NS)
    assert (await rt.pod_sandbox_status(b)).network.ip != st.network.ip
    assert [s.id for s in await rt.list_pod_sandbox(labels={"tier": "web"})] == [b]
    assert [s.id for s in await rt.list_pod_sandbox(sandbox_id=a)] == [a]
    assert len(await rt.list_pod_sandbox(state=cri.SANDBOX_READY)) == 2


async def test_duplicate_sandbox_metadata_is_refused_like_containerd(rt: FakeRuntime) -> None:
    await rt.run_pod_sandbox(sandbox_config())
    with pytest.raises(errors.InternalError, match="failed to reserve sandbox name"):
        await rt.run_pod_sandbox(sandbox_config())
    await rt.run_pod_sandbox(sandbox_config(attempt=1))   # a new attempt is fine


async def test_stopping_a_sandbox_kills_its_containers(rt: FakeRuntime, clock: FakeClock
                                                       ) -> None:
    cid = await start(rt)
    sid = rt.containers[cid].sandbox_id
    clock.advance(2)
    await rt.stop_pod_sandbox(sid)
    st = await rt.container_status(cid)
    assert st.state == cri.CONTAINER_EXITED and st.exit_code == 137 and st.reason == "Error"
    assert st.finished_at == int((T0 + 2) * NS)
    assert (await rt.pod_sandbox_status(sid)).state == cri.SANDBOX_NOTREADY
    await rt.stop_pod_sandbox(sid)                       # idempotent
    await rt.remove_pod_sandbox(sid)
    assert rt.containers == {} and rt.sandboxes == {}
    await rt.remove_pod_sandbox(sid)                     # idempotent
    await rt.stop_pod_sandbox("nosuch")
    with pytest.raises(errors.NotFound):
        await rt.pod_sandbox_status(sid)


# -- containers -----------------------------------------------------------------

async def test_container_runs_for_then_exits_with_code(rt: FakeRuntime, clock: FakeClock
                                                       ) -> None:
    rt.behave(Behaviour(exit_code=3, run_for=5), name="app")
    cid = await start(rt)
    st = await rt.container_status(cid)
    assert st.state == cri.CONTAINER_RUNNING and st.started_at == int(T0 * NS)
    clock.advance(4.9)
    assert (await rt.container_status(cid)).state == cri.CONTAINER_RUNNING
    clock.advance(60)          # exits at exactly started + run_for, not "now"
    st = await rt.container_status(cid)
    assert st.state == cri.CONTAINER_EXITED and st.exit_code == 3 and st.reason == "Error"
    assert st.finished_at == int((T0 + 5) * NS)
    assert st.log_path == "/var/log/pods/default_web-0_uid-1/app/0.log"


async def test_run_for_zero_exits_at_start_and_exit_zero_is_completed(rt: FakeRuntime
                                                                      ) -> None:
    rt.behave(Behaviour(exit_code=0, run_for=0), name="job")
    cid = await start(rt, "job")
    st = await rt.container_status(cid)
    assert (st.state, st.exit_code, st.reason) == (cri.CONTAINER_EXITED, 0, "Completed")


async def test_default_runs_until_stopped(rt: FakeRuntime, clock: FakeClock) -> None:
    cid = await start(rt)
    clock.advance(10 * 365 * 86400)
    assert (await rt.container_status(cid)).state == cri.CONTAINER_RUNNING
    await rt.stop_container(cid, 30)
    st = await rt.container_status(cid)
    assert st.state == cri.CONTAINER_EXITED and st.exit_code == 143
    await rt.stop_container(cid, 30)            # idempotent
    await rt.stop_container("nosuch", 30)
    await rt.remove_container(cid)
    await rt.remove_container(cid)
    with pytest.raises(errors.NotFound):
        await rt.container_status(cid)


async def test_start_error_is_raised_verbatim_and_recorded(rt: FakeRuntime) -> None:
    msg = 'exec: "nosuch": executable file not found in $PATH'
    rt.behave(Behaviour(start_error=msg), image="busybox")
    sc = sandbox_config()
    sid = await rt.run_pod_sandbox(sc)
    cid = await rt.create_container(sid, container_config(), sandbox_config=sc)
    with pytest.raises(errors.InternalError) as e:
        await rt.start_container(cid)
    assert e.value.message == msg
    st = await rt.container_status(cid)
    assert (st.state, st.exit_code, st.reason, st.message) == (cri.CONTAINER_EXITED, 128,
                                                               "StartError", msg)
    with pytest.raises(errors.InternalError, match="CONTAINER_EXITED"):
        await rt.start_container(cid)


async def test_name_script_wins_over_image_and_sequences_repeat_the_last(
        rt: FakeRuntime, clock: FakeClock) -> None:
    rt.behave(Behaviour(exit_code=9, run_for=0), image="busybox")
    rt.behave(Behaviour(exit_code=1, run_for=1), Behaviour(), name="flaky")
    sc = sandbox_config()
    sid = await rt.run_pod_sandbox(sc)
    codes = []
    for attempt in range(3):
        cid = await rt.create_container(sid, container_config("flaky", attempt=attempt),
                                        sandbox_config=sc)
        await rt.start_container(cid)
        clock.advance(2)
        st = await rt.container_status(cid)
        codes.append((st.state, st.exit_code))
    assert codes == [(cri.CONTAINER_EXITED, 1), (cri.CONTAINER_RUNNING, 0),
                     (cri.CONTAINER_RUNNING, 0)]
    other = await start(rt, "other", sandbox=sid)
    assert (await rt.container_status(other)).exit_code == 9


async def test_duplicate_container_name_and_missing_image(rt: FakeRuntime) -> None:
    sc = sandbox_config()
    sid = await rt.run_pod_sandbox(sc)
    await rt.create_container(sid, container_config(), sandbox_config=sc)
    with pytest.raises(errors.InternalError, match="failed to reserve container name"):
        await rt.create_container(sid, container_config(), sandbox_config=sc)
    with pytest.raises(errors.NotFound, match="nginx"):
        await rt.create_container(sid, container_config("web", "nginx:1.25"),
                                  sandbox_config=sc)
    with pytest.raises(errors.NotFound):
        await rt.create_container("nosuch", container_config("x"), sandbox_config=sc)


async def test_crash_and_oom(rt: FakeRuntime, clock: FakeClock) -> None:
    a = await start(rt)
    b = await start(rt, "b", sandbox=rt.containers[a].sandbox_id)
    clock.advance(3)
    rt.crash(a, 2)
    rt.crash(b, reason="OOMKilled")
    sa, sb = await rt.container_status(a), await rt.container_status(b)
    assert (sa.exit_code, sa.reason, sa.finished_at) == (2, "Error", int((T0 + 3) * NS))
    assert (sb.exit_code, sb.reason) == (137, "OOMKilled")
    with pytest.raises(errors.InternalError):
        rt.crash(a)


async def test_exec_results(rt: FakeRuntime) -> None:
    rt.behave(Behaviour(exec_result=ExecResult(1, b"", b"not ready")), name="app")
    rt.behave(Behaviour(exec_result=lambda cmd: ExecResult(0, " ".join(cmd).encode())),
              name="echo")
    a = await start(rt)
    b = await start(rt, "echo", sandbox=rt.containers[a].sandbox_id)
    r = await rt.exec_sync(a, ["cat", "/tmp/ready"], timeout=1)
    assert (r.exit_code, r.output) == (1, "not ready")
    assert (await rt.exec_sync(b, ["echo", "hi"], timeout=1)).stdout == b"echo hi"
    await rt.stop_container(a, 0)
    with pytest.raises(errors.InternalError, match="CONTAINER_EXITED"):
        await rt.exec_sync(a, ["true"], timeout=1)


async def test_list_containers_filters(rt: FakeRuntime) -> None:
    a = await start(rt)
    sid = rt.containers[a].sandbox_id
    sc = sandbox_config("other", "uid-2")
    sid2 = await rt.run_pod_sandbox(sc)
    b = await rt.create_container(sid2, container_config("b"), sandbox_config=sc)
    assert {c.id for c in await rt.list_containers()} == {a, b}
    assert [c.id for c in await rt.list_containers(sandbox_id=sid)] == [a]
    assert [c.id for c in await rt.list_containers(state=cri.CONTAINER_CREATED)] == [b]
    assert [c.id for c in await rt.list_containers(
        labels={"io.kubernetes.container.name": "b"})] == [b]
    listed = (await rt.list_containers(container_id=a))[0]
    assert listed.image_ref.startswith("sha256:") and listed.created_at == int(T0 * NS)
    stats = await rt.list_container_stats()
    assert [s.attributes.id for s in stats] == [a]
    assert (await rt.container_stats(b)).attributes.metadata.name == "b"


# -- images ---------------------------------------------------------------------

async def test_images_pull_status_remove(rt: FakeRuntime) -> None:
    rt.behave(Behaviour(pull_error="manifest unknown"), image="nope:1")
    assert await rt.image_status("nginx") is None
    ref = await rt.pull_image("nginx")
    img = await rt.image_status("docker.io/library/nginx:latest")
    assert img is not None and img.id == ref
    assert (await rt.image_status(ref)) == img
    with pytest.raises(errors.InternalError) as e:
        await rt.pull_image("nope:1")
    assert e.value.message == "manifest unknown"
    assert await rt.image_status("nope:1") is None
    tags = {t for i in await rt.list_images() for t in i.repo_tags}
    assert {"docker.io/library/nginx:latest", "docker.io/library/busybox:latest",
            "docker.io/shoal/pause:1"} <= tags
    assert [i.pinned for i in await rt.list_images() if "pause" in i.repo_tags[0]] == [True]
    await rt.remove_image("nginx")
    await rt.remove_image("nginx")
    assert await rt.image_status("nginx") is None
    (fs,) = await rt.image_fs_info()
    assert fs.used_bytes.value > 0


# -- calls, faults, readiness -----------------------------------------------------

async def test_every_call_is_recorded_with_its_arguments(rt: FakeRuntime) -> None:
    cid = await start(rt)
    await rt.stop_container(cid, 5)
    assert rt.methods() == ["run_pod_sandbox", "create_container", "start_container",
                            "stop_container"]
    assert rt.calls_to("stop_container") == [{"container_id": cid, "grace_seconds": 5}]
    assert rt.calls_to("create_container")[0]["config"].metadata.name == "app"


async def test_fail_next_and_unavailable(rt: FakeRuntime) -> None:
    rt.fail_next("list_pod_sandbox", errors.Unavailable("restarting"), times=2)
    for _ in range(2):
        with pytest.raises(errors.Unavailable):
            await rt.list_pod_sandbox()
    assert await rt.list_pod_sandbox() == []
    rt.available = False
    with pytest.raises(errors.Unavailable):
        await rt.version()
    rt.available = True
    assert (await rt.version()).runtime_api_version == "v1"


async def test_status_and_wait_ready(rt: FakeRuntime) -> None:
    assert runtime_ready(await rt.status()) == (True, True, "")
    rt.network_ready = False
    ready, net, msg = runtime_ready(await rt.status())
    assert ready and not net and "NetworkReady=false" in msg and "cni config" in msg
    await rt.wait_ready(1)                 # network readiness is not awaited
    rt.runtime_ready = False
    with pytest.raises(errors.Unavailable):
        await rt.wait_ready(1)


def test_the_fake_is_a_runtime() -> None:
    runtime: Runtime = FakeRuntime()
    assert runtime is not None


# -- the real client's error boundary (no runtime needed) --------------------------

@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.INVALID_ARGUMENT, errors.BadRequest),
    (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.Unavailable),
    (grpc.StatusCode.UNKNOWN, errors.InternalError),
    (grpc.StatusCode.INTERNAL, errors.InternalError),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.InternalError),
])
def test_classify(code: grpc.StatusCode, cls: type[errors.ShoalError]) -> None:
    e = classify(code, "boom: it broke")
    assert type(e) is cls
    assert "boom: it broke" in e.message
    if cls is errors.InternalError:
        assert e.message == "boom: it broke"      # verbatim
    if cls is errors.Unavailable:
        assert e.retry_after > 0                  # type: ignore[attr-defined]


async def test_client_on_a_missing_socket_is_unavailable(tmp_path: Path) -> None:
    async with RuntimeClient(str(tmp_path / "nosuch.sock"), timeout=2) as client:
        with pytest.raises(errors.Unavailable):
            await client.version()
        with pytest.raises(errors.Unavailable, match="not ready after"):
            await client.wait_ready(0.3)


class _Scripted:
    """A tiny CRI server answering each method with a scripted status."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[grpc.StatusCode, str] | Any] = {}
        self.requests: list[tuple[str, bytes]] = []

    def handler(self) -> grpc.GenericRpcHandler:
        scripted = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                method: str = details.method  # type: ignore[attr-defined]

                async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                    scripted.requests.append((method, request))
                    answer = scripted.answers.get(method)
                    if isinstance(answer, tuple):
                        await context.abort(answer[0], answer[1])
                    return answer.SerializeToString() if answer is not None else b""

                return grpc.unary_unary_rpc_method_handler(unary)

        return Handler()


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[_Scripted, RuntimeClient]]:
    s = _Scripted()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((s.handler(),))
    sock = tmp_path / "cri.sock"
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    client = RuntimeClient(str(sock), timeout=5)
    try:
        yield s, client
    finally:
        await client.close()
        await server.stop(None)


async def test_client_maps_runtime_errors_and_keeps_messages(
        scripted: tuple[_Scripted, RuntimeClient]) -> None:
    s, client = scripted
    msg = ('failed to create containerd task: failed to create shim task: OCI runtime '
           'create failed: runc create failed: unable to start container process: exec: '
           '"nosuch": executable file not found in $PATH: unknown')
    s.answers[f"/{RUNTIME_SERVICE}/StartContainer"] = (grpc.StatusCode.UNKNOWN, msg)
    s.answers[f"/{RUNTIME_SERVICE}/ContainerStatus"] = (grpc.StatusCode.NOT_FOUND,
                                                        "container not found")
    s.answers[f"/{IMAGE_SERVICE}/PullImage"] = (grpc.StatusCode.INVALID_ARGUMENT, "bad ref")
    with pytest.raises(errors.InternalError) as e:
        await client.start_container("c1")
    assert e.value.message == msg
    with pytest.raises(errors.NotFound):
        await client.container_status("c1")
    with pytest.raises(errors.BadRequest):
        await client.pull_image("::")
    # Stop and remove swallow NotFound: they are idempotent.
    for m in ("StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox"):
        s.answers[f"/{RUNTIME_SERVICE}/{m}"] = (grpc.StatusCode.NOT_FOUND, "gone")
    await client.stop_container("c1", 0.2)
    await client.remove_container("c1")
    await client.stop_pod_sandbox("s1")
    await client.remove_pod_sandbox("s1")
    stop = next(r for m, r in s.requests if m.endswith("/StopContainer"))
    assert cri.StopContainerRequest.FromString(stop).timeout == 1   # rounded up, not to 0


async def test_client_wait_ready_and_decoding(scripted: tuple[_Scripted, RuntimeClient]
                                              ) -> None:
    s, client = scripted
    s.answers[f"/{RUNTIME_SERVICE}/Version"] = cri.VersionResponse(
        runtime_name="containerd", runtime_api_version="v1")
    s.answers[f"/{RUNTIME_SERVICE}/Status"] = cri.StatusResponse(status=cri.RuntimeStatus(
        conditions=[cri.RuntimeCondition(type="RuntimeReady", status=False,
                                         reason="Starting")]))
    with pytest.raises(errors.Unavailable, match="RuntimeReady=false"):
        await client.wait_ready(0.3)
    s.answers[f"/{RUNTIME_SERVICE}/Status"] = cri.StatusResponse(status=cri.RuntimeStatus(
        conditions=[cri.RuntimeCondition(type="RuntimeReady", status=True)]))
    assert (await client.wait_ready(2)).runtime_name == "containerd"
    s.answers[f"/{IMAGE_SERVICE}/ImageStatus"] = cri.ImageStatusResponse()
    assert await client.image_status("busybox") is None
    s.answers[f"/{RUNTIME_SERVICE}/ExecSync"] = cri.ExecSyncResponse(stdout=b"hi\n",
                                                                    exit_code=0)
    result = await asyncio.wait_for(client.exec_sync("c1", ["echo", "hi"], timeout=0), 5)
    assert result == ExecResult(0, b"hi\n", b"")
