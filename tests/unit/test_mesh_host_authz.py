"""A mesh-only host's node identity may get workload certificates only for the
WorkloadEntries that name it (shoal.dev/mesh-host), and nothing else a pod would
give a node (pure)."""

from __future__ import annotations

import pytest

from apiserver.authz.attributes import Attributes
from apiserver.authz.nodegraph import NodeGraph, workload_entry_account
from apiserver.authz.nodes import NodeAuthorizer
from shoal.api.traffic.v1 import traffic_pb2


def _we(name: str, *, host: str, sa: str, ns: str = "shop") -> traffic_pb2.WorkloadEntry:
    we = traffic_pb2.WorkloadEntry()
    we.metadata.namespace, we.metadata.name = ns, name
    if host:
        we.metadata.labels["shoal.dev/mesh-host"] = host
    we.spec.address, we.spec.service_account = "10.77.0.100", sa
    return we


def _graph() -> NodeGraph:
    g = NodeGraph()
    for we in (_we("vm", host="vm1", sa="legacy"), _we("nohost", host="", sa="batch"),
               _we("other", host="vm2", sa="api")):
        g.set_workload_entry(we.metadata.namespace, we.metadata.name,
                             workload_entry_account(we))
    return g


def _ask(node: str, sub: str, name: str, *, ns: str = "shop") -> Attributes:
    return Attributes(user=f"system:node:{node}", groups=("system:nodes",), verb="create",
                      group="", resource="serviceaccounts", subresource=sub, namespace=ns,
                      name=name)


@pytest.mark.parametrize(("attrs", "allowed"), [
    (_ask("vm1", "workloadcertificate", "legacy"), True),
    (_ask("vm1", "workloadcertificate", "legacy", ns="other"), False),  # another namespace
    (_ask("vm1", "workloadcertificate", "api"), False),  # vm2's entry
    (_ask("vm1", "workloadcertificate", "batch"), False),  # an entry naming no host
    (_ask("vm2", "workloadcertificate", "api"), True),
    (_ask("vm1", "token", "legacy"), False),  # no service account tokens for it
])
def test_mesh_host_signs_only_its_workload_entries(attrs: Attributes, allowed: bool) -> None:
    graph = _graph()
    assert NodeAuthorizer(lambda: graph).authorize(attrs).allowed is allowed


def test_a_removed_entry_takes_the_right_away() -> None:
    graph = _graph()
    graph.set_workload_entry("shop", "vm", None)
    d = NodeAuthorizer(lambda: graph).authorize(_ask("vm1", "workloadcertificate", "legacy"))
    assert not d.allowed and "WorkloadEntry" in d.reason


def test_default_service_account() -> None:
    assert workload_entry_account(_we("x", host="h", sa="")) == ("h", "shop", "default")
    assert workload_entry_account(_we("x", host="", sa="a")) is None
