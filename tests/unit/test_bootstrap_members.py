"""A control plane of several members in the bootstrap spec, and the lab's plan of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from shoal import bootstrap, errors
from shoal.bootstrap import APISERVER, ETCD, REGISTRY, ControlPlane, NodeSpec, Spec
from shoal.lab.topology import control_plane_members, plan

CLUSTER = ("m1=http://10.0.0.1:2380", "m2=http://10.0.0.2:2380", "m3=http://10.0.0.3:2380")


def member(i: int, data_dir: Path = Path("/var/lib/shoal"), **kw: object) -> ControlPlane:
    return ControlPlane(
        address=f"10.0.0.{i}", data_dir=data_dir, etcd_name=f"m{i}",
        etcd_address=f"10.0.0.{i}", etcd_initial_cluster=CLUSTER,
        etcd_servers=tuple(f"10.0.0.{j}:2379" for j in (i, *[k for k in (1, 2, 3) if k != i])),
        api_servers=("10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"), **kw)  # type: ignore[arg-type]


def argv(cp: ControlPlane, component: str) -> list[str]:
    return list(bootstrap.command(Spec(control_plane=cp), component, python="py").argv)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_etcd_joins_the_whole_cluster_on_its_own_address() -> None:
    args = argv(member(2), ETCD)
    assert flag(args, "--name") == "m2"
    assert flag(args, "--initial-cluster") == ",".join(CLUSTER)
    assert flag(args, "--listen-peer-urls") == "http://10.0.0.2:2380"
    assert flag(args, "--advertise-client-urls") == "http://10.0.0.2:2379"


def test_the_apiserver_knows_every_etcd_member_its_own_first() -> None:
    assert flag(argv(member(2), APISERVER), "--etcd-servers") == \
        "10.0.0.2:2379,10.0.0.1:2379,10.0.0.3:2379"


def test_a_single_member_is_as_before() -> None:
    cp = ControlPlane(address="10.0.0.1", data_dir=Path("/d"), etcd_name="one")
    assert flag(argv(cp, ETCD), "--initial-cluster") == "one=http://127.0.0.1:2380"
    assert flag(argv(cp, APISERVER), "--etcd-servers") == "127.0.0.1:2379"


def test_only_the_member_that_runs_it_has_the_registry() -> None:
    assert REGISTRY in Spec(control_plane=member(1)).components()
    assert REGISTRY not in Spec(control_plane=member(2, runs_registry=False)).components()


def test_a_node_joins_with_every_apiserver() -> None:
    node = NodeSpec(name="n", ip="10.0.0.11", data_dir=Path("/n"), api_server="10.0.0.1:6443",
                    registry="10.0.0.1:5000", more_api_servers=("10.0.0.2:6443",))
    args = list(bootstrap.join_command(node, token="t", ca_cert_hash="h", python="py"))
    assert [args[i + 1] for i, a in enumerate(args) if a == "--api-server"] == [
        "10.0.0.1:6443", "10.0.0.2:6443"]


def test_the_members_fields_survive_the_spec_file() -> None:
    spec = Spec(control_plane=member(3, pki_from="/srv/first/apiserver", runs_registry=False))
    assert bootstrap.parse(bootstrap.dump(spec)) == spec


def test_members_share_one_ca_and_a_certificate_valid_for_every_address(
        tmp_path: Path) -> None:
    first = member(1, tmp_path / "one")
    second = member(2, tmp_path / "two", pki_from=str(first.apiserver_dir))
    with pytest.raises(errors.BadRequest, match="pkiFrom: no CA"):
        bootstrap.render(Spec(control_plane=second), APISERVER)
    bootstrap.render(Spec(control_plane=first), APISERVER)
    bootstrap.render(Spec(control_plane=second), APISERVER)
    one, two = (cp.apiserver_dir / "pki" for cp in (first, second))
    assert (one / "ca.crt").read_bytes() == (two / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate((two / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert {"10.0.0.1", "10.0.0.2", "10.0.0.3"} <= ips
    assert "10.0.0.2:6443" in second.admin_config.read_text()
    assert "10.0.0.3:6443" in second.admin_config.read_text()


def test_the_lab_plans_members_on_their_own_bridge_addresses() -> None:
    topo = plan(nodes=1, lab_dir=Path("/lab"))
    members = control_plane_members(topo, 3)
    assert [m.address for m in members] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert [m.apiserver_process for m in members] == [
        "apiserver", "apiserver/cp-2", "apiserver/cp-3"]
    assert members[0].metrics == "127.0.0.1:9090" and members[2].metrics == "10.77.0.3:9090"
    assert members[1].data_dir == Path("/lab/control-planes/cp-2")


@pytest.mark.parametrize("count", [0, 2, 4, 7])
def test_the_lab_refuses_other_control_plane_sizes(count: int) -> None:
    with pytest.raises(errors.BadRequest, match="1, 3, 5 members"):
        control_plane_members(plan(nodes=1, lab_dir=Path("/lab")), count)
