"""The built-in roles cover networking.istio.io: view reads, edit writes, nodes read."""

from __future__ import annotations

import pytest

from apiserver.authz import bootstrap
from apiserver.authz.attributes import Attributes
from apiserver.authz.rbac import RBACIndex
from shoal.api.rbac.v1 import rbac_pb2

RBAC = "rbac.authorization.k8s.io"


def _binding(name: str, role: str, *, user: str = "", group: str = ""
             ) -> rbac_pb2.ClusterRoleBinding:
    b = rbac_pb2.ClusterRoleBinding(role_ref=rbac_pb2.RoleRef(api_group=RBAC,
                                                              kind="ClusterRole", name=role))
    b.metadata.name = name
    if user:
        b.subjects.add(kind="User", name=user)
    if group:
        b.subjects.add(kind="Group", name=group)
    return b


INDEX = RBACIndex.build(roles=[], cluster_roles=bootstrap.cluster_roles(), role_bindings=[],
                        cluster_role_bindings=[*bootstrap.cluster_role_bindings(),
                                               _binding("v", "view", user="viewer"),
                                               _binding("e", "edit", user="editor")])


@pytest.mark.parametrize("resource", ["virtualservices", "destinationrules", "gateways",
                                      "serviceentries"])
@pytest.mark.parametrize(("user", "groups", "verb", "allowed"), [
    ("viewer", (), "list", True),
    ("viewer", (), "create", False),
    ("editor", (), "create", True),
    ("editor", (), "delete", True),
    ("system:node:n1", ("system:nodes",), "watch", True),
    ("system:node:n1", ("system:nodes",), "update", False),
    ("nobody", (), "get", False),
])
def test_traffic_kinds_in_the_built_in_roles(resource: str, user: str, groups: tuple[str, ...],
                                             verb: str, allowed: bool) -> None:
    attrs = Attributes(user=user, groups=groups, verb=verb, group="networking.istio.io",
                       resource=resource, subresource="", namespace="shop", name="")
    assert INDEX.authorize(attrs).allowed is allowed
