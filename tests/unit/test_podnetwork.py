"""Node IPAM allocation and the node agent's route planning, pure."""

from __future__ import annotations

import pytest

from apiserver.nodeipam import allocate
from nodeagent.network import cni_config
from nodeagent.podnetwork import plan_routes, reconcile_routes
from shoal import errors
from shoal.api.core.v1 import core_pb2


@pytest.mark.parametrize(("used", "expect"), [
    ([], "10.244.1.0/24"),
    (["10.244.1.0/24"], "10.244.2.0/24"),
    (["10.244.1.0/24", "10.244.3.0/24"], "10.244.2.0/24"),
    (["10.244.1.0/24", "garbage", ""], "10.244.2.0/24"),
    (["10.244.0.0/23"], "10.244.2.0/24"),                  # a bigger block takes two
    (["10.244.1.128/25"], "10.244.2.0/24"),                # a smaller one takes its /24
    (["10.0.0.0/8"], None),                                # covers everything
    (["10.245.1.0/24", "fd00::/64"], "10.244.1.0/24"),     # outside the range: ignored
    ([f"10.244.{i}.0/24" for i in range(1, 200)], "10.244.200.0/24"),
])
def test_allocate_lowest_free_block(used: list[str], expect: str | None) -> None:
    if expect is None:
        with pytest.raises(errors.Unavailable, match="no free /24"):
            allocate("10.244.0.0/16", 24, used)
        return
    assert allocate("10.244.0.0/16", 24, used) == expect


def test_allocate_exhaustion_and_bad_mask() -> None:
    with pytest.raises(errors.Unavailable, match="no free /25"):
        allocate("10.9.0.0/24", 25, ["10.9.0.128/25"])
    with pytest.raises(errors.BadRequest, match="does not fit"):
        allocate("10.9.0.0/24", 16, [])


def node(name: str, ip: str, cidr: str, *, deleting: bool = False) -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = name
    if deleting:
        n.metadata.deletion_timestamp.seconds = 1
    if ip:
        n.status.addresses.add(type="InternalIP", address=ip)
    n.spec.pod_cidr = cidr
    return n


def test_plan_routes_covers_other_ready_nodes() -> None:
    nodes = [node("a", "10.77.0.11", "10.244.1.0/24"), node("b", "10.77.0.12", "10.244.2.0/24"),
             node("c", "", "10.244.3.0/24"), node("d", "10.77.0.14", ""),
             node("e", "10.77.0.15", "10.244.5.0/24", deleting=True)]
    assert plan_routes(nodes, self_name="a") == {"10.244.2.0/24": "10.77.0.12"}


class FakeRoutes:
    def __init__(self, have: dict[str, str]) -> None:
        self.table = dict(have)

    def current(self) -> dict[str, str]:
        return dict(self.table)

    def replace(self, cidr: str, via: str) -> None:
        self.table[cidr] = via

    def delete(self, cidr: str) -> None:
        del self.table[cidr]


def test_reconcile_adds_replaces_and_removes_only_what_differs() -> None:
    routes = FakeRoutes({"10.244.2.0/24": "10.77.0.99", "10.244.9.0/24": "10.77.0.19"})
    done = reconcile_routes(routes, {"10.244.2.0/24": "10.77.0.12",
                                     "10.244.3.0/24": "10.77.0.13"})
    assert routes.table == {"10.244.2.0/24": "10.77.0.12", "10.244.3.0/24": "10.77.0.13"}
    assert done == ["+10.244.2.0/24 via 10.77.0.12", "+10.244.3.0/24 via 10.77.0.13",
                    "-10.244.9.0/24"]
    assert reconcile_routes(routes, dict(routes.table)) == []


def test_cni_config_never_masquerades() -> None:
    cfg = cni_config(pod_cidr="10.244.1.0/24")
    bridge = cfg["plugins"][0]
    assert bridge["ipMasq"] is False and bridge["isGateway"] is True
    assert bridge["ipam"]["ranges"][0][0] == {"subnet": "10.244.1.0/24",
                                             "gateway": "10.244.1.1"}
