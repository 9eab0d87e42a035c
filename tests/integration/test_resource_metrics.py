"""The metrics API end to end in one process: a node agent API (real TLS, the
cluster CA's serving certificate) reporting sampled usage from a fake CRI
runtime, the apiserver asking it, and ``shoal top`` printing kubectl's columns."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from apiserver import pki
from nodeagent.serving import NodeAPI
from nodeagent.usage import NodeSample, UsageSampler
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.cri.v1 import api_pb2 as cri
from shoal.cli.resourceusage import run_top
from shoal.cli.session import Session
from shoal.kinds import builtin_kinds
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.fakecri import FakeClock, FakeRuntime

NS = 1_000_000_000
MI = 1024 * 1024


@dataclass
class Agent:
    runtime: FakeRuntime
    clock: FakeClock
    sampler: UsageSampler
    port: int


async def start_container(rt: FakeRuntime, ns: str, pod: str) -> str:
    sc = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=pod, uid=pod, namespace=ns))
    sid = await rt.run_pod_sandbox(sc)
    cid = await rt.create_container(sid, cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app"), image=cri.ImageSpec(image="busybox"),
        labels={"io.kubernetes.pod.namespace": ns, "io.kubernetes.pod.name": pod,
                "io.kubernetes.container.name": "app"}), sandbox_config=sc)
    await rt.start_container(cid)
    return cid


@pytest.fixture
async def agent(apiserver: InProcessAPIServer, tmp_path: Path) -> AsyncIterator[Agent]:
    pki_dir = apiserver.data_dir / "pki"
    ca = pki.CertificateAuthority.load(pki_dir)
    key = pki.new_key()
    cert = ca.issue(key.public_key(), common_name="system:node:metrics-1", ips=["127.0.0.1"],
                    server=True)
    clock = FakeClock(1_000_000.0)
    rt = FakeRuntime(clock=clock)
    rt.add_image("busybox")
    node_cpu = iter([10 * NS, 25 * NS])  # 1.5 cores over the 10 s between the samples

    def node_sample() -> NodeSample:
        return NodeSample(cpu_ns=next(node_cpu), at_ns=int(clock() * NS), memory=1024 * MI)

    sampler = UsageSampler(runtime=rt, node_name="metrics-1", node_sample=node_sample)
    api = NodeAPI(pod_by_name=lambda ns, name: None, records=dict, runtime=None,  # type: ignore[arg-type]
                  log_root=tmp_path, node_name="metrics-1", usage=lambda: sampler.latest)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((api.handler(),))
    creds = grpc.ssl_server_credentials(
        [(pki.key_pem(key), pki.cert_pem(cert))],
        root_certificates=(pki_dir / "ca.crt").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield Agent(runtime=rt, clock=clock, sampler=sampler, port=port)
    finally:
        await server.stop(0)


async def register(apiserver: InProcessAPIServer, port: int) -> None:
    async with apiserver.client() as c:
        node = core_pb2.Node()
        node.metadata.name = "metrics-1"
        node.metadata.labels["tier"] = "metrics"
        try:
            await c.create(node)
        except errors.AlreadyExists:
            pass
        for _ in range(10):  # the node lifecycle controller writes it too
            node = await c.get(core_pb2.Node, "metrics-1")
            del node.status.addresses[:]
            node.status.addresses.add(type="InternalIP", address="127.0.0.1")
            node.status.daemon_endpoints.kubelet_endpoint.port = port
            node.status.allocatable["cpu"].value = "2"
            node.status.allocatable["memory"].value = "4Gi"
            try:
                await c.update_status(node)
                break
            except errors.Conflict:
                continue
        for ns_name in ("shop", "other"):
            ns = core_pb2.Namespace()
            ns.metadata.name = ns_name
            try:
                await c.create(ns)
            except errors.AlreadyExists:
                pass
        for ns_name, name in (("shop", "web"), ("shop", "db"), ("other", "job")):
            pod = core_pb2.Pod()
            pod.metadata.name, pod.metadata.namespace = name, ns_name
            pod.metadata.labels["app"] = name
            pod.spec.node_name = "metrics-1"
            pod.spec.containers.add(name="app", image="busybox")
            try:
                await c.create(pod)
            except errors.AlreadyExists:
                pass


async def top(apiserver: InProcessAPIServer, *args: str, namespace: str = "shop",
              all_namespaces: bool = False, selector: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    session = Session(kinds=builtin_kinds(), out=out, err=err, stdin=io.StringIO(),
                      config_path=str(apiserver.config_path), namespace_flag=namespace)
    try:
        code = await run_top(session, what=args[0], args=args[1:], selector=selector,
                             all_namespaces=all_namespaces, containers=False, sort_by="",
                             headers=True)
    finally:
        await session.aclose()
    return int(code), out.getvalue(), err.getvalue()


def table(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


async def test_top_shows_sampled_usage_of_nodes_and_pods(apiserver: InProcessAPIServer,
                                                         agent: Agent) -> None:
    await register(apiserver, agent.port)
    code, _, err = await top(apiserver, "nodes")
    assert code == 1 and "metrics not available yet" in err  # nothing sampled yet

    rt, clock = agent.runtime, agent.clock
    ids = {name: await start_container(rt, ns, name)
           for ns, name in (("shop", "web"), ("shop", "db"), ("other", "job"))}
    await agent.sampler.sample_once()
    clock.advance(10)
    for name, (cpu_s, mem_mi) in {"web": (5, 64), "db": (1, 200), "job": (2, 10)}.items():
        c = rt.containers[ids[name]]
        c.cpu_ns, c.working_set = cpu_s * NS, mem_mi * MI  # over 10 s: 500m, 100m, 200m
    await agent.sampler.sample_once()

    code, out, _ = await top(apiserver, "nodes")
    assert code == 0
    assert table(out) == [["NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"],
                          ["metrics-1", "1500m", "75%", "1024Mi", "25%"]]

    code, out, _ = await top(apiserver, "pods")
    assert table(out) == [["NAME", "CPU(cores)", "MEMORY(bytes)"],
                          ["db", "100m", "200Mi"], ["web", "500m", "64Mi"]]

    code, out, _ = await top(apiserver, "pods", all_namespaces=True, selector="app!=db")
    assert table(out) == [["NAMESPACE", "NAME", "CPU(cores)", "MEMORY(bytes)"],
                          ["other", "job", "200m", "10Mi"], ["shop", "web", "500m", "64Mi"]]

    async with apiserver.client() as c:
        [web] = (await c.pod_metrics(namespace="shop", name="web")).items
        assert web.metadata.labels["app"] == "web"
        assert web.window.ToSeconds() == 10
        with pytest.raises(errors.NotFound):
            await c.pod_metrics(namespace="shop", name="nope")


async def test_metrics_need_list_permission(apiserver: InProcessAPIServer) -> None:
    from shoal.client import AsyncClient

    async with AsyncClient(apiserver.user_client_config("nobody")) as user:
        with pytest.raises(errors.Forbidden, match="metrics.k8s.io"):
            await user.pod_metrics(namespace="shop")


async def test_the_view_role_may_read_pod_metrics(apiserver: InProcessAPIServer) -> None:
    from shoal.api.rbac.v1 import rbac_pb2
    from shoal.client import AsyncClient

    async with apiserver.client() as admin:
        ns = core_pb2.Namespace()
        ns.metadata.name = "viewers"
        await admin.create(ns)
        binding = rbac_pb2.RoleBinding()
        binding.metadata.name, binding.metadata.namespace = "view", "viewers"
        binding.role_ref.kind, binding.role_ref.name = "ClusterRole", "view"
        binding.role_ref.api_group = "rbac.authorization.k8s.io"
        binding.subjects.add(kind="User", name="viewer", api_group="rbac.authorization.k8s.io")
        await admin.create(binding)
    async with AsyncClient(apiserver.user_client_config("viewer")) as user:
        listed = await user.pod_metrics(namespace="viewers")
        assert list(listed.items) == []
        with pytest.raises(errors.Forbidden):
            await user.pod_metrics(namespace="shop")
