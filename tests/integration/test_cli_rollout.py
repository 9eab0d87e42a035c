"""``shoal scale``, ``shoal rollout ...`` and ``shoal wait`` against a live apiserver
running the replicaset, deployment and garbage collector controllers.

No node runs pods here: the test plays the node agent, marking pods Running and
Ready (or stuck in ImagePullBackOff) with UpdateStatus while the command runs
in a worker thread, as in test_cli.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.cli.main import main
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.controllers import client_in_new_namespace, leading_apiserver
from shoal.testing.waiting import eventually


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
async def ctl_api(tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[InProcessAPIServer]:
    data: Path = tmp_path_factory.mktemp("cli-rollout")
    async with leading_apiserver(data, controllers=("replicaset", "deployment",
                                                     "statefulset", "garbagecollector")) as api:
        yield api


@pytest.fixture
async def c(ctl_api: InProcessAPIServer) -> AsyncIterator[AsyncClient]:
    async with client_in_new_namespace(ctl_api, "ro") as client:
        yield client


@pytest.fixture
def shoal(ctl_api: InProcessAPIServer, c: AsyncClient,
          capfd: pytest.CaptureFixture[str]) -> Any:
    """``await shoal("rollout", "status", "deploy/x")`` -> Result, in the test's namespace."""

    async def run(*args: str) -> Result:
        capfd.readouterr()
        argv = ["--config", str(ctl_api.config_path), "-n", c.namespace, *args]
        code = await asyncio.to_thread(main, argv)
        out, err = capfd.readouterr()
        assert "Traceback" not in err
        return Result(code, out, err)

    return run




def deployment(name: str, replicas: int = 2, *, image: str = "busybox:v1",
               deadline: int | None = None) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name = name
    d.spec.replicas = replicas
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    d.spec.template.spec.containers.add(name="c", image=image)
    d.spec.strategy.rolling_update.max_surge.int_val = 1
    d.spec.strategy.rolling_update.max_unavailable.int_val = 0
    if deadline is not None:
        d.spec.progress_deadline_seconds = deadline
    return d


async def live_pods(c: AsyncClient, app: str) -> list[core_pb2.Pod]:
    got = await c.list(core_pb2.Pod, label_selector=f"app={app}")
    return [p for p in got.items if not p.metadata.HasField("deletion_timestamp")]


async def set_status(c: AsyncClient, pod: core_pb2.Pod, *, ready: bool = True,
                     waiting: str = "") -> None:
    for _ in range(5):
        try:
            fresh = await c.get(core_pb2.Pod, pod.metadata.name)
            fresh.status.phase = "Running" if ready else "Pending"
            del fresh.status.conditions[:]
            cond = fresh.status.conditions.add(type="Ready", status="True" if ready else "False")
            cond.last_transition_time.seconds = int(time.time())
            del fresh.status.container_statuses[:]
            cs = fresh.status.container_statuses.add(name="c", image="x")
            if waiting:
                cs.state.waiting.reason = waiting
                cs.state.waiting.message = "Back-off pulling image"
            await c.update_status(fresh)
            return
        except errors.Conflict:
            continue
        except errors.NotFound:
            return


def ready(p: core_pb2.Pod) -> bool:
    return any(x.type == "Ready" and x.status == "True" for x in p.status.conditions)


async def node_agent(c: AsyncClient, app: str, stop: asyncio.Event) -> None:
    """Make pods of ``app`` ready, one per tick, until ``stop``."""
    while not stop.is_set():
        for p in await live_pods(c, app):
            if not ready(p):
                await set_status(c, p)
                break
        await asyncio.sleep(0.1)


async def rolled_out(c: AsyncClient, name: str) -> bool:
    stop = asyncio.Event()
    task = asyncio.create_task(node_agent(c, name, stop))
    try:
        async def done() -> bool:
            d = await c.get(apps_pb2.Deployment, name)
            n = d.spec.replicas
            return (d.status.observed_generation >= d.metadata.generation
                    and d.status.updated_replicas == n == d.status.available_replicas
                    and d.status.replicas == n)
        return bool(await eventually(f"{name} rolled out", done, timeout=30))
    finally:
        stop.set()
        await task


async def set_image(c: AsyncClient, name: str, image: str) -> None:
    d = await c.get(apps_pb2.Deployment, name)
    d.spec.template.spec.containers[0].image = image
    await c.update(d)


# --------------------------------------------------------------------------- scale


async def test_scale(shoal: Any, c: AsyncClient, tmp_path: Path) -> None:
    await c.create(deployment("sc", 1))
    r = await shoal("scale", "deployment/sc", "--replicas=3")
    assert (r.code, r.out.strip()) == (0, "deployment.apps/sc scaled"), r.err
    await eventually("3 pods", lambda: _count(c, "sc", 3))
    wrong = await shoal("scale", "deploy", "sc", "--replicas=1", "--current-replicas=2")
    assert wrong.code == 1 and "Expected replicas to be 2, was 3" in wrong.err
    f = tmp_path / "sc.yaml"
    f.write_text(yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment",
                                 "metadata": {"name": "sc"}, "spec": {
                                     "selector": {"matchLabels": {"app": "sc"}},
                                     "template": {"metadata": {"labels": {"app": "sc"}},
                                                  "spec": {"containers": [
                                                      {"name": "c", "image": "x"}]}}}}))
    r = await shoal("scale", "-f", str(f), "--replicas=0")
    assert r.code == 0, r.err
    await eventually("0 pods", lambda: _count(c, "sc", 0))
    pod = await shoal("scale", "pod/x", "--replicas=1")
    assert pod.code == 2 and "cannot scale pods" in pod.err
    neg = await shoal("scale", "deploy/sc", "--replicas=-1")
    assert neg.code == 2
    missing = await shoal("scale", "rs/nope", "--replicas=1")
    assert missing.code == 1 and "NotFound" in missing.err


async def _count(c: AsyncClient, app: str, n: int) -> bool:
    return len(await live_pods(c, app)) == n


# --------------------------------------------------------------------------- rollout status


async def test_rollout_status_shows_progress_and_ends_on_success(shoal: Any,
                                                                 c: AsyncClient) -> None:
    await c.create(deployment("st", 3))
    stop = asyncio.Event()
    agent = asyncio.create_task(node_agent(c, "st", stop))
    try:
        r = await asyncio.wait_for(shoal("rollout", "status", "deployment/st"), 30)
    finally:
        stop.set()
        await agent
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[-1] == 'deployment "st" successfully rolled out'
    assert any(ln.startswith('Waiting for deployment "st" rollout to finish: ')
               for ln in lines[:-1]), lines
    again = await shoal("rollout", "status", "deploy/st")  # already done: returns at once
    assert again.out.splitlines() == ['deployment "st" successfully rolled out']


async def test_rollout_status_fails_on_an_image_that_cannot_be_pulled(shoal: Any,
                                                                     c: AsyncClient) -> None:
    await c.create(deployment("img", 2))
    await rolled_out(c, "img")
    await set_image(c, "img", "busybox:nope")

    async def stuck() -> None:
        pods = await eventually("a pod of the new RS", lambda: _new_pods(c, "img"))
        await set_status(c, pods[0], ready=False, waiting="ImagePullBackOff")
    r, _ = await asyncio.gather(shoal("rollout", "status", "deploy/img", "--timeout=30s"),
                                stuck())
    assert r.code == 1
    assert "ImagePullBackOff" in r.err and "pod img-" in r.err, r.err


async def _new_pods(c: AsyncClient, app: str) -> list[core_pb2.Pod]:
    return [p for p in await live_pods(c, app) if p.spec.containers[0].image == "busybox:nope"]


async def test_rollout_status_fails_when_the_deadline_passes(shoal: Any,
                                                            c: AsyncClient) -> None:
    await c.create(deployment("late", 1, deadline=1))
    r = await shoal("rollout", "status", "deploy/late", "--timeout=20s")
    assert r.code == 1
    assert 'deployment "late" exceeded its progress deadline' in r.err


async def test_rollout_status_timeout(shoal: Any, c: AsyncClient) -> None:
    await c.create(deployment("slow", 1))
    r = await shoal("rollout", "status", "deploy/slow", "--timeout=1s")
    assert r.code == 1 and "timed out waiting for the condition" in r.err
    bad = await shoal("rollout", "status", "configmap/x")
    assert bad.code == 2 and "not supported for configmaps" in bad.err


# --------------------------------------------------------------------------- history, undo


async def test_history_undo_and_to_revision(shoal: Any, c: AsyncClient) -> None:
    await c.create(deployment("h", 2))
    await rolled_out(c, "h")
    await set_image(c, "h", "busybox:v2")

    async def rev2() -> bool:
        d = await c.get(apps_pb2.Deployment, "h")
        return d.metadata.annotations.get("deployment.kubernetes.io/revision") == "2"
    await eventually("revision 2", rev2)
    await rolled_out(c, "h")
    r = await shoal("rollout", "history", "deployment/h")
    assert r.code == 0, r.err
    assert r.out.splitlines()[:4] == ["deployment.apps/h", "REVISION  CHANGE-CAUSE",
                                      "1         <none>", "2         <none>"]
    shown = await shoal("rollout", "history", "deploy/h", "--revision=1")
    assert shown.code == 0 and "busybox:v1" in shown.out and "busybox:v2" not in shown.out
    undo = await shoal("rollout", "undo", "deployment/h")
    assert (undo.code, undo.out.strip()) == (0, "deployment.apps/h rolled back"), undo.err
    d = await c.get(apps_pb2.Deployment, "h")
    assert d.spec.template.spec.containers[0].image == "busybox:v1"
    assert "pod-template-hash" not in d.spec.template.metadata.labels
    await rolled_out(c, "h")
    r = await shoal("rollout", "history", "deployment/h")
    assert [ln.split()[0] for ln in r.out.splitlines()[2:] if ln] == ["2", "3"]
    to2 = await shoal("rollout", "undo", "deployment/h", "--to-revision=2")
    assert to2.code == 0, to2.err
    d = await c.get(apps_pb2.Deployment, "h")
    assert d.spec.template.spec.containers[0].image == "busybox:v2"
    missing = await shoal("rollout", "undo", "deployment/h", "--to-revision=9")
    assert missing.code == 1 and "unable to find specified revision 9" in missing.err


# --------------------------------------------------------------------------- pause, restart


async def test_pause_resume_restart(shoal: Any, c: AsyncClient) -> None:
    await c.create(deployment("p", 1))
    await rolled_out(c, "p")
    r = await shoal("rollout", "pause", "deployment/p")
    assert (r.code, r.out.strip()) == (0, "deployment.apps/p paused"), r.err
    assert (await c.get(apps_pb2.Deployment, "p")).spec.paused
    again = await shoal("rollout", "pause", "deployment/p")
    assert again.code == 1 and "already paused" in again.err
    no_undo = await shoal("rollout", "undo", "deployment/p")
    assert no_undo.code == 1 and "paused" in no_undo.err
    no_restart = await shoal("rollout", "restart", "deployment/p")
    assert no_restart.code == 1 and "paused" in no_restart.err
    r = await shoal("rollout", "resume", "deployment/p")
    assert (r.code, r.out.strip()) == (0, "deployment.apps/p resumed"), r.err
    r = await shoal("rollout", "restart", "deployment/p")
    assert (r.code, r.out.strip()) == (0, "deployment.apps/p restarted"), r.err
    d = await c.get(apps_pb2.Deployment, "p")
    stamp = d.spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"]
    assert stamp.endswith("Z") and "T" in stamp

    async def new_revision() -> bool:
        got = await c.get(apps_pb2.Deployment, "p")
        return got.metadata.annotations.get("deployment.kubernetes.io/revision") == "2"
    await eventually("a restart is a new revision", new_revision)


# --------------------------------------------------------------------------- wait


async def test_wait_for_conditions_and_deletion(shoal: Any, c: AsyncClient) -> None:
    await c.create(deployment("w", 1))
    stop = asyncio.Event()
    agent = asyncio.create_task(node_agent(c, "w", stop))
    try:
        r = await shoal("wait", "--for=condition=Available", "deployment/w", "--timeout=20s")
    finally:
        stop.set()
        await agent
    assert (r.code, r.out.strip()) == (0, "deployment.apps/w condition met"), r.err
    r = await shoal("wait", "--for=condition=available=TRUE", "deploy", "w")
    assert r.code == 0, r.err
    bad = await shoal("wait", "--for=condition=Ready", "deployment/w")
    assert bad.code == 2
    assert 'no condition "Ready"' in bad.err and "Available, Progressing" in bad.err
    none = await shoal("wait", "--for=condition=Ready", "configmap/x")
    assert none.code == 2 and "no conditions" in none.err
    junk = await shoal("wait", "--for=jsonpath={.x}", "deployment/w")
    assert junk.code == 2
    late = await shoal("wait", "--for=condition=Progressing=False", "deployment/w",
                       "--timeout=1s")
    assert late.code == 1 and "timed out waiting for the condition" in late.err
    [pod] = await live_pods(c, "w")
    r = await shoal("wait", "--for=condition=Ready", f"pod/{pod.metadata.name}")
    assert r.code == 0, r.err
    await c.delete(apps_pb2.Deployment, "w")
    r = await shoal("wait", "--for=delete", f"pod/{pod.metadata.name}", "--timeout=20s")
    assert (r.code, r.out.strip()) == (0, f"pod/{pod.metadata.name} deleted"), r.err


# --------------------------------------------------------------------------- StatefulSet


async def test_statefulset_scale_status_and_restart(shoal: Any, c: AsyncClient) -> None:
    sts = apps_pb2.StatefulSet()
    sts.metadata.name = "db"
    sts.spec.replicas = 1
    sts.spec.service_name = "db"
    sts.spec.selector.match_labels["app"] = "db"
    sts.spec.template.metadata.labels["app"] = "db"
    sts.spec.template.spec.containers.add(name="c", image="busybox:v1")
    await c.create(sts)
    r = await shoal("scale", "statefulset/db", "--replicas=2")
    assert (r.code, r.out.strip()) == (0, "statefulset.apps/db scaled"), r.err
    stop = asyncio.Event()
    agent = asyncio.create_task(node_agent(c, "db", stop))
    try:
        r = await asyncio.wait_for(shoal("rollout", "status", "sts/db", "--timeout=30s"), 40)
        assert r.code == 0, r.out + r.err
        assert r.out.splitlines()[-1].startswith("statefulset rolling update complete 2 pods")
        assert sorted(p.metadata.name for p in await live_pods(c, "db")) == ["db-0", "db-1"]
        r = await shoal("rollout", "restart", "statefulset/db")
        assert (r.code, r.out.strip()) == (0, "statefulset.apps/db restarted"), r.err
        r = await asyncio.wait_for(shoal("rollout", "status", "sts/db", "--timeout=30s"), 40)
        assert r.code == 0, r.out + r.err
        history = await shoal("rollout", "history", "statefulset/db")
        assert history.code == 0, history.err
        assert [ln.split()[0] for ln in history.out.splitlines()[2:] if ln] == ["1", "2"]
        undo = await shoal("rollout", "undo", "statefulset/db")
        assert (undo.code, undo.out.strip()) == (0, "statefulset.apps/db rolled back"), undo.err
        got = await c.get(apps_pb2.StatefulSet, "db")
        assert "kubectl.kubernetes.io/restartedAt" not in got.spec.template.metadata.annotations
        r = await asyncio.wait_for(shoal("rollout", "status", "sts/db", "--timeout=30s"), 40)
        assert r.code == 0, r.out + r.err
    finally:
        stop.set()
        await agent
    no_pause = await shoal("rollout", "pause", "sts/db")
    assert no_pause.code == 2 and "not supported for statefulsets" in no_pause.err


async def test_statefulset_status_names_a_crash_looping_pod(shoal: Any, c: AsyncClient) -> None:
    sts = apps_pb2.StatefulSet()
    sts.metadata.name = "crash"
    sts.spec.replicas = 1
    sts.spec.service_name = "crash"
    sts.spec.selector.match_labels["app"] = "crash"
    sts.spec.template.metadata.labels["app"] = "crash"
    sts.spec.template.spec.containers.add(name="c", image="busybox:v1")
    await c.create(sts)

    async def crash() -> None:
        [pod] = await eventually("crash-0", lambda: live_pods(c, "crash"))
        await set_status(c, pod, ready=False, waiting="CrashLoopBackOff")
    r, _ = await asyncio.gather(shoal("rollout", "status", "sts/crash", "--timeout=30s"),
                                crash())
    assert r.code == 1
    assert "pod crash-0: container c is waiting: CrashLoopBackOff" in r.err, r.err
