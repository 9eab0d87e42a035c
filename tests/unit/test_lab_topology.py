"""The lab's topology and partition rules: pure, no machine touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import errors
from shoal.lab import topology
from shoal.lab.topology import CONTROL_PLANE, DropRule, endpoint, partition_rules, plan

LAB = Path("/var/lib/shoal/lab")


def test_three_nodes_get_names_namespaces_veths_and_addresses() -> None:
    topo = plan(nodes=3, lab_dir=LAB)
    assert [(n.name, n.netns, n.host_veth, n.ip) for n in topo.nodes] == [
        ("node-1", "shoal-node-1", "shln-1", "10.77.0.11"),
        ("node-2", "shoal-node-2", "shln-2", "10.77.0.12"),
        ("node-3", "shoal-node-3", "shln-3", "10.77.0.13"),
    ]
    n2 = topo.node("node-2")
    assert n2.address == "10.77.0.12/24"
    assert n2.agent_listen == "10.77.0.12:10250"
    assert n2.agent_metrics == "10.77.0.12:10255"
    assert n2.data_dir == LAB / "nodes" / "node-2"
    assert n2.containerd_socket == LAB / "nodes" / "node-2" / "containerd" / "containerd.sock"
    assert n2.netns_path == Path("/var/run/netns/shoal-node-2")


def test_control_plane_addresses_are_on_the_bridge() -> None:
    topo = plan(nodes=1, lab_dir=LAB)
    assert topo.bridge == "shoal0"
    assert topo.bridge_address == "10.77.0.1/24"
    assert topo.api_server == "10.77.0.1:6443"
    assert topo.join_server == "10.77.0.1:6444"
    assert topo.registry == "10.77.0.1:5000"
    assert topo.state_file == LAB / "state.json"
    assert topo.admin_config == LAB / "admin.conf"


def test_everything_the_lab_writes_is_under_its_directory() -> None:
    topo = plan(nodes=2, lab_dir=LAB)
    assert all(LAB in p.parents for p in topo.owned_entries)
    assert all(LAB in n.data_dir.parents for n in topo.nodes)


def test_interface_names_fit_the_kernel_limit_at_the_largest_lab() -> None:
    topo = plan(nodes=topology.MAX_NODES, lab_dir=LAB)
    assert all(len(n.host_veth) <= 15 for n in topo.nodes)
    assert len({n.ip for n in topo.nodes}) == topology.MAX_NODES
    assert all(n.ip != topo.gateway for n in topo.nodes)


@pytest.mark.parametrize("nodes", [0, -1, topology.MAX_NODES + 1])
def test_node_count_out_of_range_is_refused(nodes: int) -> None:
    with pytest.raises(errors.BadRequest, match="1 to"):
        plan(nodes=nodes, lab_dir=LAB)


def test_relative_lab_dir_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match="absolute"):
        plan(nodes=1, lab_dir=Path("lab"))


def test_unknown_node_names_the_ones_there_are() -> None:
    with pytest.raises(errors.BadRequest, match="node-1, node-2"):
        plan(nodes=2, lab_dir=LAB).node("node-9")


TOPO = plan(nodes=3, lab_dir=LAB)


def test_a_node_cut_from_a_three_member_control_plane_drops_every_member() -> None:
    """Before, only member 1's address was dropped: the node's agent failed over to
    the other apiservers and was never cut off (found by the chaos suite's work)."""
    rules = partition_rules(endpoint(TOPO, "node-2"),
                            endpoint(TOPO, CONTROL_PLANE, control_planes=3), pod_cidrs={})
    assert set(rules) == {DropRule("shoal-node-2", f"10.77.0.{i}") for i in (1, 2, 3)}


@pytest.mark.parametrize(("a", "b", "cidrs", "expected"), [
    pytest.param("node-1", "node-2", {}, {
        DropRule("shoal-node-1", "10.77.0.12"), DropRule("shoal-node-2", "10.77.0.11"),
    }, id="two nodes, no pod routes yet"),
    pytest.param("node-1", "node-2", {"node-2": ("10.244.2.0/24",),
                                      "node-1": ("10.244.1.0/24",)}, {
        DropRule("shoal-node-1", "10.77.0.12"), DropRule("shoal-node-1", "10.244.2.0/24"),
        DropRule("shoal-node-2", "10.77.0.11"), DropRule("shoal-node-2", "10.244.1.0/24"),
    }, id="two nodes and their pods"),
    pytest.param("node-3", CONTROL_PLANE, {}, {
        DropRule("shoal-node-3", "10.77.0.1"),
    }, id="a node from the control plane: rules in the node only"),
    pytest.param(CONTROL_PLANE, "node-2", {}, {
        DropRule("shoal-node-2", "10.77.0.1"),
    }, id="either order"),
])
def test_partition_rules(a: str, b: str, cidrs: dict[str, tuple[str, ...]],
                         expected: set[DropRule]) -> None:
    rules = partition_rules(endpoint(TOPO, a), endpoint(TOPO, b), pod_cidrs=cidrs)
    assert set(rules) == expected
    assert len(rules) == len(expected)  # no duplicates


@pytest.mark.parametrize(("a", "b", "message"), [
    ("node-1", "node-1", "itself"),
    (CONTROL_PLANE, CONTROL_PLANE, "itself"),
])
def test_bad_partitions_are_refused(a: str, b: str, message: str) -> None:
    with pytest.raises(errors.BadRequest, match=message):
        partition_rules(endpoint(TOPO, a), endpoint(TOPO, b), pod_cidrs={})


def test_partition_of_an_unknown_node_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match="no lab node"):
        endpoint(TOPO, "node-7")


def test_forward_rules_accept_only_what_the_bridge_forwards_between_its_ports() -> None:
    from shoal.lab.netsetup import forward_rules

    assert forward_rules("shoal0") == [["-i", "shoal0", "-o", "shoal0", "-j", "ACCEPT"]]


def test_drop_rules_are_per_namespace_and_both_directions() -> None:
    from shoal.lab.netsetup import drop_rules

    rules = partition_rules(endpoint(TOPO, "node-1"), endpoint(TOPO, "node-2"),
                            pod_cidrs={"node-2": ("10.244.2.0/24",)})
    assert drop_rules(rules, "shoal-node-1") == [
        ["-s", "10.77.0.12", "-j", "DROP"], ["-d", "10.77.0.12", "-j", "DROP"],
        ["-s", "10.244.2.0/24", "-j", "DROP"], ["-d", "10.244.2.0/24", "-j", "DROP"],
    ]
    assert drop_rules(rules, "shoal-node-3") == []


def test_nodes_pull_docker_io_and_the_lab_registry_from_the_lab_registry() -> None:
    from pathlib import Path

    from shoal.bootstrap import in_registry
    from shoal.lab.lab import Lab

    n = TOPO.nodes[0]
    spec = Lab(Path("/lab"), say=print)._node_spec(n, TOPO).node
    assert spec is not None
    assert spec.mirrors == ("docker.io=http://10.77.0.1:5000",
                            "10.77.0.1:5000=http://10.77.0.1:5000")
    assert in_registry(TOPO.registry, "docker.io/library/busybox:1.36") == \
        "10.77.0.1:5000/library/busybox:1.36"
    assert in_registry(TOPO.registry, "docker.io/shoal/pause:1") == \
        "10.77.0.1:5000/shoal/pause:1"
