"""The one node bootstrap (shoal.bootstrap): the same command lines and files for
the lab and for systemd; the spec file; sd_notify."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from shoal import bootstrap, errors, sdnotify
from shoal.bootstrap import BY_AGENT, BY_SERVICE, ControlPlane, NodeSpec, Spec
from shoal.monitoring import Readiness

PY = "/opt/shoal/venv/bin/python"
CP = ControlPlane(address="192.168.56.10", data_dir=Path("/var/lib/shoal"))
VM_NODE = NodeSpec(name="worker-1", ip="192.168.56.11", data_dir=Path("/var/lib/shoal/node"),
                   api_server="192.168.56.10:6443", registry="192.168.56.10:5000", mesh=True)
MESH_HOST = NodeSpec(**{**VM_NODE.__dict__, "name": "meshhost-1", "ip": "192.168.56.101",
                        "mesh_host": True})


def argv(spec: Spec, component: str) -> tuple[str, ...]:
    return bootstrap.command(spec, component, python=PY).argv


@pytest.mark.parametrize(("containerd", "has", "lacks"), [
    (BY_SERVICE, "--cri-socket=unix:///var/lib/shoal/node/containerd/containerd.sock",
     "--registry-mirror"),
    (BY_AGENT, "--registry-mirror=docker.io=http://192.168.56.10:5000", "--cri-socket"),
])
def test_who_runs_containerd_is_the_one_difference_in_the_agents_command(
        containerd: str, has: str, lacks: str) -> None:
    node = NodeSpec(**{**VM_NODE.__dict__, "containerd": containerd})
    got = argv(Spec(node=node), bootstrap.NODEAGENT)
    joined = " ".join(got).replace("--cri-socket unix", "--cri-socket=unix")
    assert has in joined and lacks not in joined
    assert got[:5] == (PY, "-P", "-m", "nodeagent.main", "run")
    assert got[got.index("--node-ip"):][:2] == ("--node-ip", "192.168.56.11")
    assert "192.168.56.11:10250" in got and "192.168.56.11:10255" in got


def test_the_control_plane_commands() -> None:
    spec = Spec(control_plane=CP)
    etcd = bootstrap.command(spec, bootstrap.ETCD, python=PY)
    assert etcd.argv[:5] == ("etcd", "--name", "shoal", "--data-dir", "/var/lib/shoal/etcd")
    assert etcd.ready_url == "http://127.0.0.1:2379/health" and etcd.notifies
    reg = bootstrap.command(spec, bootstrap.REGISTRY, python=PY)
    assert reg.argv == ("docker-registry", "serve", "/var/lib/shoal/registry/config.yml")
    assert not reg.notifies and reg.ready_url == "http://192.168.56.10:5000/v2/"
    api = argv(spec, bootstrap.APISERVER)
    assert api[:5] == (PY, "-P", "-m", "apiserver.main", "serve")
    for flag, value in (("--listen", "192.168.56.10:6443"), ("--join-listen",
                        "192.168.56.10:6444"), ("--etcd-servers", "127.0.0.1:2379")):
        assert api[api.index(flag) + 1] == value


def test_the_mesh_agent_uses_the_nodes_config_and_captures() -> None:
    got = argv(Spec(node=VM_NODE), bootstrap.MESHAGENT)
    assert got[got.index("--config") + 1] == "/var/lib/shoal/node/node.conf"
    assert "--capture" in got and got[got.index("--dns-ip") + 1] == "192.168.56.11"


def test_the_mesh_agent_samples_traces_as_the_node_says() -> None:
    got = argv(Spec(node=VM_NODE), bootstrap.MESHAGENT)
    assert got[got.index("--trace-sampling") + 1] == "1"  # Istio's default
    assert "--access-log" not in got
    demo = NodeSpec(**{**VM_NODE.__dict__, "trace_sampling": 100.0, "access_log": True})
    got = argv(Spec(node=demo), bootstrap.MESHAGENT)
    assert got[got.index("--trace-sampling") + 1] == "100" and "--access-log" in got


def test_a_mesh_only_hosts_agent_runs_with_mesh_host_and_its_own_name() -> None:
    got = argv(Spec(node=MESH_HOST), bootstrap.MESHAGENT)
    assert got[got.index("--node-name") + 1] == "meshhost-1"
    assert "--mesh-host" in got and "--capture" in got and "--dns-ip" not in got
    assert got[got.index("--metrics-listen") + 1] == "192.168.56.101:15020"
    joined = bootstrap.join_command(MESH_HOST, token="abcdef.0123456789abcdef",
                                    ca_cert_hash="sha256:00", python=PY)
    assert joined[joined.index("--node-name") + 1] == "meshhost-1"


@pytest.mark.parametrize(("nodes", "routes"), [
    ([("10.244.2.0/24", "192.168.56.12"), ("10.244.1.0/24", "192.168.56.11")],
     [("10.244.1.0/24", "192.168.56.11"), ("10.244.2.0/24", "192.168.56.12"),
      ("10.96.0.0/16", "192.168.56.11")]),
    ([("", "192.168.56.11"), ("10.244.2.0/24", "")], []),  # no pod CIDR / no address yet
    ([], []),
])
def test_a_mesh_only_host_routes_pods_through_their_nodes(
        nodes: list[tuple[str, str]], routes: list[tuple[str, str]]) -> None:
    assert bootstrap.mesh_host_routes(nodes) == routes


def test_join_goes_to_the_port_beside_the_api() -> None:
    got = bootstrap.join_command(VM_NODE, token="abcdef.0123456789abcdef",
                                 ca_cert_hash="sha256:00", python=PY)
    assert got[got.index("--server") + 1] == "192.168.56.10:6444"
    assert got[got.index("--api-server") + 1] == "192.168.56.10:6443"


@pytest.mark.parametrize(("spec", "components"), [
    (Spec(control_plane=CP), ("etcd", "registry", "apiserver")),
    (Spec(node=VM_NODE), ("containerd", "nodeagent", "meshagent")),
    (Spec(node=NodeSpec(**{**VM_NODE.__dict__, "containerd": BY_AGENT, "mesh": False})),
     ("nodeagent",)),
    (Spec(node=MESH_HOST), ("meshagent",)),
])
def test_what_a_machine_runs(spec: Spec, components: tuple[str, ...]) -> None:
    assert spec.components() == components


@pytest.mark.parametrize(("spec", "component", "problem"), [
    (Spec(node=VM_NODE), "etcd", "no controlPlane section"),
    (Spec(control_plane=CP), "nodeagent", "no node section"),
    (Spec(node=NodeSpec(**{**VM_NODE.__dict__, "containerd": BY_AGENT})), "containerd",
     "run by its node agent"),
    (Spec(control_plane=CP), "kubelet", "no component 'kubelet'"),
    (Spec(node=MESH_HOST), "nodeagent", "does not run on a mesh-only host"),
    (Spec(node=MESH_HOST), "containerd", "does not run on a mesh-only host"),
])
def test_a_component_the_machine_does_not_run_is_refused(spec: Spec, component: str,
                                                         problem: str) -> None:
    with pytest.raises(errors.BadRequest, match=problem):
        bootstrap.command(spec, component, python=PY)


def test_a_mesh_only_hosts_spec_file_round_trips() -> None:
    assert bootstrap.parse(bootstrap.dump(Spec(node=MESH_HOST))) == Spec(node=MESH_HOST)


def test_the_spec_file_round_trips() -> None:
    spec = Spec(control_plane=ControlPlane(**{**CP.__dict__, "apiserver_args": ("--x=1",)}),
                node=VM_NODE)
    text = bootstrap.dump(spec)
    assert "apiServer: 192.168.56.10:6443" in text and "apiserverArgs:\n  - --x=1" in text
    assert bootstrap.parse(text) == spec


@pytest.mark.parametrize(("text", "problem"), [
    ("node: {name: a}", r"node\.ip: required"),
    ("controlPlane: {address: 1.2.3.4, dataDir: /d, etcdPort: 1}", r"etcdPort: unknown key"),
    ("controlPlane: {address: 1.2.3.4, dataDir: relative}", r"dataDir: must be an absolute"),
    ("controlPlane: {address: 1.2.3.4, dataDir: /d, etcdClientPort: '2379'}",
     r"etcdClientPort: must be int, not str"),
    ("node: {name: a, ip: 1.2.3.4, dataDir: /d, apiServer: 'h:1', registry: 'h:2', "
     "containerd: docker}", r"containerd: must be agent or service"),
    ("node: {name: a, ip: 1.2.3.4, dataDir: /d, apiServer: 'h:1', registry: 'h:2', "
     "meshHost: true}", r"meshHost: a mesh-only host .* needs mesh: true"),
    ("nodes: {}", r"unknown key 'nodes'"),
    ("{}", r"neither controlPlane nor node"),
    ("[1]", r"must be a mapping"),
])
def test_a_bad_spec_names_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(errors.BadRequest, match=problem):
        bootstrap.parse(text)


def test_rendering_containerd_writes_what_the_agent_would(tmp_path: Path) -> None:
    node = NodeSpec(**{**VM_NODE.__dict__, "data_dir": tmp_path / "node"})
    written = bootstrap.render(Spec(node=node), bootstrap.CONTAINERD)
    want = bootstrap.agent_config(node).containerd_config()
    assert node.containerd_config.read_text() == want.render()
    assert want.address == node.containerd_socket
    hosts = tmp_path / "node/containerd/certs.d/docker.io/hosts.toml"
    assert hosts in written and "http://192.168.56.10:5000" in hosts.read_text()
    assert bootstrap.render(Spec(node=node), bootstrap.CONTAINERD) == written  # idempotent


def test_rendering_the_registry_and_the_apiserver(tmp_path: Path) -> None:
    spec = Spec(control_plane=ControlPlane(address="127.0.0.1", data_dir=tmp_path / "cp"))
    assert spec.control_plane is not None
    bootstrap.render(spec, bootstrap.REGISTRY)
    assert "127.0.0.1:5000" in spec.control_plane.registry_config.read_text()
    first = bootstrap.render(spec, bootstrap.APISERVER)
    assert spec.control_plane.admin_config.stat().st_mode & 0o777 == 0o600
    assert any(p.name == "ca.key" for p in first)
    again = bootstrap.render(spec, bootstrap.APISERVER)
    assert again == [spec.control_plane.admin_config]  # the PKI is made once


def test_the_lab_runs_the_bootstrap_commands(tmp_path: Path) -> None:
    """The lab's node agent command is the spec file's: what `python -m
    shoal.bootstrap show nodeagent --spec <node>/bootstrap.yaml` prints."""
    from shoal.lab.lab import Lab
    from shoal.lab.topology import plan

    topo = plan(nodes=2, lab_dir=tmp_path)
    lab = Lab(tmp_path, say=print, python=PY)
    n = topo.nodes[1]
    bootstrap.save(lab._node_spec(n, topo), n.bootstrap_spec)
    assert tuple(lab._agent_argv(n, topo)) == argv(bootstrap.load(n.bootstrap_spec),
                                                   bootstrap.NODEAGENT)


# -- sd_notify ------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    return s


def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")
    assert sdnotify.socket_address({"NOTIFY_SOCKET": "@x"}) == "\0x"
    assert sdnotify.socket_address({"NOTIFY_SOCKET": "vsock:2:3"}) is None


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=up")
    assert notify_socket.recv(100) == b"READY=1\nSTATUS=up"


def test_a_gone_supervisor_does_not_fail_the_daemon(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


async def test_ready_once_every_signal_is_set_then_stopping(
        notify_socket: socket.socket) -> None:
    readiness = Readiness("storage", "cache")
    gate = asyncio.Event()

    async def daemon() -> None:
        readiness.set("storage")
        await asyncio.sleep(0)
        readiness.set("cache")
        await gate.wait()

    task = asyncio.create_task(sdnotify.serving(daemon(), readiness, status="serving"))
    got = await asyncio.to_thread(notify_socket.recv, 100)
    assert got == b"READY=1\nSTATUS=serving"
    gate.set()
    await task
    assert await asyncio.to_thread(notify_socket.recv, 100) == b"STOPPING=1"


# -- python -m shoal.bootstrap --------------------------------------------------------


def run_cli(tmp_path: Path, text: str, *args: str) -> int:
    from shoal.bootstrap.__main__ import main

    spec = tmp_path / "bootstrap.yaml"
    spec.write_text(text)
    return main(["--spec", str(spec), *args])


def test_show_prints_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    assert run_cli(tmp_path, bootstrap.dump(Spec(control_plane=CP)), "show", "registry") == 0
    assert capsys.readouterr().out == \
        "docker-registry serve /var/lib/shoal/registry/config.yml\n"


@pytest.mark.parametrize(("text", "args", "problem"), [
    ("node: {name: a}", ("show", "nodeagent"), "node.ip: required"),
    (bootstrap.dump(Spec(control_plane=CP)), ("show", "nodeagent"), "no node section"),
    (bootstrap.dump(Spec(node=VM_NODE)), ("wait", "containerd"), "no health endpoint"),
    (bootstrap.dump(Spec(node=VM_NODE)), ("seed",), "seed runs on the control plane"),
])
def test_bad_input_is_refused_with_exit_2_and_a_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
        args: tuple[str, ...], problem: str) -> None:
    assert run_cli(tmp_path, text, *args) == 2
    assert problem in capsys.readouterr().err


def test_join_needs_a_published_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    token_file = tmp_path / "join.env"
    token_file.write_text("# nothing yet\nSHOAL_API_SERVER=192.168.56.10:6443\n")
    node = NodeSpec(**{**VM_NODE.__dict__, "data_dir": tmp_path / "node"})
    assert run_cli(tmp_path, bootstrap.dump(Spec(node=node)), "join", "--token-file",
                   str(token_file)) == 2
    assert "has no SHOAL_JOIN_TOKEN" in capsys.readouterr().err
    assert not (tmp_path / "node").exists()  # nothing changed


def test_a_missing_spec_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    from shoal.bootstrap.__main__ import main

    assert main(["--spec", str(tmp_path / "nope.yaml"), "show", "etcd"]) == 2
    assert f"cannot read the bootstrap spec {tmp_path / 'nope.yaml'}" in \
        capsys.readouterr().err
