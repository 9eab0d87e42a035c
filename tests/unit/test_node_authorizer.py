"""The node graph and the node authorizer (pure, table-driven)."""

from __future__ import annotations

import pytest

from apiserver.authz.attributes import Attributes
from apiserver.authz.nodegraph import NodeGraph, pod_refs
from apiserver.authz.nodes import NodeAuthorizer, node_name
from shoal.api.core.v1 import core_pb2


def _pod(name: str, node: str, *, ns: str = "shop", sa: str = "",
         phase: str = "Running") -> core_pb2.Pod:
    pod = core_pb2.Pod()
    pod.metadata.name, pod.metadata.namespace = name, ns
    pod.spec.node_name = node
    pod.spec.service_account_name = sa
    pod.status.phase = phase
    return pod


def _full_pod() -> core_pb2.Pod:
    pod = _pod("web", "n1", sa="web")
    pod.spec.image_pull_secrets.add(name="pull")
    pod.spec.volumes.add(name="a").secret.secret_name = "vol-secret"
    pod.spec.volumes.add(name="b").config_map.name = "vol-cm"
    pod.spec.volumes.add(name="c").persistent_volume_claim.claim_name = "data"
    proj = pod.spec.volumes.add(name="d").projected
    proj.sources.add().secret.name = "proj-secret"
    proj.sources.add().config_map.name = "proj-cm"
    init = pod.spec.init_containers.add(name="init")
    init.env_from.add().config_map_ref.name = "init-cm"
    c = pod.spec.containers.add(name="app")
    c.env.add(name="A").value_from.secret_key_ref.name = "env-secret"
    c.env.add(name="B").value_from.config_map_key_ref.name = "env-cm"
    c.env_from.add().secret_ref.name = "envfrom-secret"
    c.env.add(name="C", value="literal")
    return pod


def test_pod_refs_find_every_reference() -> None:
    refs = pod_refs(_full_pod())
    assert refs.node == "n1" and refs.service_account == "web"
    assert refs.refs == {
        ("secrets", "shop", n) for n in ("pull", "vol-secret", "proj-secret", "env-secret",
                                         "envfrom-secret")
    } | {
        ("configmaps", "shop", n) for n in ("vol-cm", "proj-cm", "init-cm", "env-cm")
    } | {("persistentvolumeclaims", "shop", "data"), ("serviceaccounts", "shop", "web")}


def test_the_default_service_account() -> None:
    assert pod_refs(_pod("p", "n1")).service_account == "default"


def test_graph_counts_references_and_follows_moves_and_deletes() -> None:
    g = NodeGraph()
    a, b = _pod("a", "n1"), _pod("b", "n1")
    for p in (a, b):
        p.spec.volumes.add(name="s").secret.secret_name = "shared"
    g.set_pod("shop", "a", pod_refs(a))
    g.set_pod("shop", "b", pod_refs(b))
    assert g.node_uses("n1", "secrets", "shop", "shared")
    g.set_pod("shop", "a", None)
    assert g.node_uses("n1", "secrets", "shop", "shared")  # b still uses it
    g.set_pod("shop", "b", pod_refs(_pod("b", "n1")))  # b no longer mounts it
    assert not g.node_uses("n1", "secrets", "shop", "shared")
    assert g.node_of("shop", "b") == "n1"
    g.set_pod("shop", "b", pod_refs(_pod("b", "")))  # unbound pods are not in the graph
    assert g.node_of("shop", "b") is None and not g.pods_on("n1")


def _graph() -> NodeGraph:
    g = NodeGraph()
    g.replace([pod_refs(_full_pod()), pod_refs(_pod("other", "n2", sa="api")),
               pod_refs(_pod("done", "n1", sa="batch", phase="Succeeded"))])
    return g


def _node(verb: str, resource: str, *, name: str = "", ns: str = "shop", group: str = "",
          sub: str = "", node: str = "n1") -> Attributes:
    return Attributes(user=f"system:node:{node}", groups=("system:nodes",), verb=verb,
                      group=group, resource=resource, subresource=sub, namespace=ns,
                      name=name)


@pytest.mark.parametrize("attrs,allowed", [
    # Secrets/ConfigMaps/PVCs: get only, only what its pods use
    (_node("get", "secrets", name="vol-secret"), True),
    (_node("get", "secrets", name="env-secret"), True),
    (_node("get", "configmaps", name="init-cm"), True),
    (_node("get", "persistentvolumeclaims", name="data"), True),
    (_node("get", "secrets", name="vol-secret", node="n2"), False),  # another node's pod
    (_node("get", "secrets", name="vol-secret", ns="other"), False),
    (_node("get", "secrets", name="unrelated"), False),
    (_node("list", "secrets"), False),
    (_node("watch", "configmaps"), False),
    (_node("update", "secrets", name="vol-secret"), False),
    # open reads
    (_node("list", "pods", ns=""), True),
    (_node("watch", "services", ns=""), True),
    (_node("get", "endpoints", name="x"), True),
    (_node("list", "namespaces", ns=""), True),
    (_node("watch", "nodes", ns=""), True),
    (_node("delete", "services", name="x"), False),
    # its own Node and status, not another's
    (_node("create", "nodes", name="n1", ns=""), True),
    (_node("update", "nodes", name="n1", ns=""), True),
    (_node("update", "nodes", sub="status", name="n1", ns=""), True),
    (_node("update", "nodes", sub="status", name="n2", ns=""), False),
    (_node("update", "nodes", name="n2", ns=""), False),
    (_node("delete", "nodes", name="n1", ns=""), False),
    # its own Lease in kube-node-lease
    (_node("update", "leases", group="coordination.k8s.io", name="n1",
           ns="kube-node-lease"), True),
    (_node("create", "leases", group="coordination.k8s.io", name="n1",
           ns="kube-node-lease"), True),
    (_node("update", "leases", group="coordination.k8s.io", name="n2",
           ns="kube-node-lease"), False),
    (_node("update", "leases", group="coordination.k8s.io", name="n1", ns="kube-system"),
     False),
    # pods bound to it: status and (the finalizer) the pod
    (_node("update", "pods", sub="status", name="web"), True),
    (_node("update", "pods", name="web"), True),
    (_node("update", "pods", sub="status", name="other"), False),
    (_node("create", "pods", name="mirror"), False),
    (_node("delete", "pods", name="web"), False),
    # events
    (_node("create", "events", name="e"), True),
    (_node("delete", "events", name="e"), False),
    # the mesh CA and service-account tokens: only service accounts of its pods
    (_node("create", "serviceaccounts", sub="workloadcertificate", name="web"), True),
    (_node("create", "serviceaccounts", sub="workloadcertificate", name="api"), False),
    (_node("create", "serviceaccounts", sub="workloadcertificate", name="batch"), False),
    (_node("create", "serviceaccounts", sub="token", name="web"), True),
    (_node("create", "serviceaccounts", sub="token", name="api"), False),
])
def test_node_authorizer(attrs: Attributes, allowed: bool) -> None:
    graph = _graph()
    assert NodeAuthorizer(lambda: graph).authorize(attrs).allowed is allowed


def test_refusals_say_why() -> None:
    graph = _graph()
    d = NodeAuthorizer(lambda: graph).authorize(_node("get", "secrets", name="x"))
    assert d.reason == "no relationship found between node 'n1' and this object"


@pytest.mark.parametrize("user,groups,node", [
    ("system:node:n1", ("system:nodes",), "n1"),
    ("system:node:n1", (), None),  # not in system:nodes
    ("system:node:", ("system:nodes",), None),
    ("alice", ("system:nodes",), None),
])
def test_node_identity(user: str, groups: tuple[str, ...], node: str | None) -> None:
    assert node_name(user, groups) == node


def test_other_users_get_no_opinion() -> None:
    graph = _graph()
    attrs = Attributes(user="alice", groups=(), verb="get", resource="secrets",
                       namespace="shop", name="vol-secret")
    assert NodeAuthorizer(lambda: graph).authorize(attrs).verdict.value == "no-opinion"
