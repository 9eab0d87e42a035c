"""The Endpoints planner: which pods serve a Service, on which ports (pure, table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from apiserver.controllers.endpoints import HEADLESS_LABEL, desired_subsets, plan
from shoal.api.core.v1 import core_pb2


def svc(*, selector: dict[str, str] | None = None, ports: list[tuple[str, int, Any]] | None = None,
        headless: bool = False, publish: bool = False, name: str = "web") -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, "ns"
    s.metadata.labels["team"] = "a"
    s.spec.selector.update({"app": "web"} if selector is None else selector)
    s.spec.cluster_ip = "None" if headless else "10.96.0.10"
    s.spec.publish_not_ready_addresses = publish
    for pname, port, target in ([("http", 80, 8080)] if ports is None else ports):
        p = s.spec.ports.add(name=pname, port=port, protocol="TCP")
        if isinstance(target, str):
            p.target_port.str_val = target
        elif target:
            p.target_port.int_val = target
    return s


def pod(name: str, ip: str = "", *, ready: bool = True, labels: dict[str, str] | None = None,
        phase: str = "Running", terminating: bool = False, node: str = "node-1",
        hostname: str = "", subdomain: str = "", named: dict[str, int] | None = None,
        namespace: str = "ns") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace, p.metadata.uid = name, namespace, f"uid-{name}"
    p.metadata.labels.update({"app": "web", "version": "v1"} if labels is None else labels)
    if terminating:
        p.metadata.deletion_timestamp.seconds = 5
    p.spec.node_name = node
    p.spec.hostname, p.spec.subdomain = hostname, subdomain
    c = p.spec.containers.add(name="main", image="busybox")
    for pname, number in (named or {}).items():
        c.ports.add(name=pname, container_port=number, protocol="TCP")
    p.status.phase = phase
    p.status.pod_ip = ip
    p.status.conditions.add(type="Ready", status="True" if ready else "False")
    return p


def summary(subsets: list[core_pb2.EndpointSubset]) -> list[tuple[list[str], list[str],
                                                                  list[tuple[str, int]]]]:
    return [([a.ip for a in s.addresses], [a.ip for a in s.not_ready_addresses],
             [(p.name, p.port) for p in s.ports]) for s in subsets]


@pytest.mark.parametrize(("name", "service", "pods", "want"), [
    ("ready and not ready", svc(),
     [pod("b", "10.244.1.3"), pod("a", "10.244.1.2"), pod("c", "10.244.2.2", ready=False)],
     [(["10.244.1.2", "10.244.1.3"], ["10.244.2.2"], [("http", 8080)])]),
    ("pods without an IP, finished or terminating are left out", svc(),
     [pod("a", ""), pod("b", "10.0.0.2", phase="Succeeded"), pod("c", "10.0.0.3", phase="Failed"),
      pod("d", "10.0.0.4", terminating=True), pod("e", "10.0.0.5")],
     [(["10.0.0.5"], [], [("http", 8080)])]),
    ("labels not matching and other namespaces are left out", svc(),
     [pod("a", "10.0.0.2", labels={"app": "db"}), pod("b", "10.0.0.3", namespace="other"),
      pod("c", "10.0.0.4")],
     [(["10.0.0.4"], [], [("http", 8080)])]),
    ("publishNotReadyAddresses: every pod ready, terminating ones too", svc(publish=True),
     [pod("a", "10.0.0.2", ready=False), pod("b", "10.0.0.3", terminating=True)],
     [(["10.0.0.2", "10.0.0.3"], [], [("http", 8080)])]),
    ("target port defaults to the service port", svc(ports=[("", 80, 0)]),
     [pod("a", "10.0.0.2")], [(["10.0.0.2"], [], [("", 80)])]),
    ("named target ports resolve per pod; pods differing are repacked",
     svc(ports=[("http", 80, "web")]),
     [pod("a", "10.0.0.2", named={"web": 8080}), pod("b", "10.0.0.3", named={"web": 9090}),
      pod("c", "10.0.0.4", named={"web": 8080}), pod("d", "10.0.0.5")],
     [(["10.0.0.2", "10.0.0.4"], [], [("http", 8080)]), (["10.0.0.3"], [], [("http", 9090)])]),
    ("several ports in one subset", svc(ports=[("b", 81, 8081), ("a", 80, 8080)]),
     [pod("a", "10.0.0.2")], [(["10.0.0.2"], [], [("a", 8080), ("b", 8081)])]),
    ("headless without ports still lists the pods", svc(headless=True, ports=[]),
     [pod("a", "10.0.0.2"), pod("b", "10.0.0.3", ready=False)],
     [(["10.0.0.2"], ["10.0.0.3"], [])]),
    ("no pods: no subsets", svc(), [], []),
])
def test_desired_subsets(name: str, service: core_pb2.Service, pods: list[core_pb2.Pod],
                         want: list[Any]) -> None:
    assert summary(desired_subsets(service, pods)) == want, name


def test_an_address_carries_node_pod_reference_hostname_and_labels() -> None:
    subsets = desired_subsets(svc(name="web"), [
        pod("web-0", "10.0.0.2", hostname="web-0", subdomain="web", node="node-2"),
        pod("other", "10.0.0.3", hostname="other", subdomain="elsewhere")])
    first, second = subsets[0].addresses
    assert (first.ip, first.hostname, first.node_name) == ("10.0.0.2", "web-0", "node-2")
    assert (first.target_ref.kind, first.target_ref.name, first.target_ref.namespace,
            first.target_ref.uid) == ("Pod", "web-0", "ns", "uid-web-0")
    assert dict(first.labels) == {"app": "web", "version": "v1"}
    assert second.hostname == ""  # subdomain names another service


def existing(service: core_pb2.Service, pods: list[core_pb2.Pod]) -> core_pb2.Endpoints:
    got = plan(service, pods, None).endpoints
    assert got is not None
    got.metadata.resource_version = "7"
    return got


@pytest.mark.parametrize(("name", "service", "pods", "current", "action"), [
    ("new service: create", svc(), [pod("a", "10.0.0.2")], None, "create"),
    ("unchanged: nothing", svc(), [pod("a", "10.0.0.2")],
     existing(svc(), [pod("a", "10.0.0.2")]), ""),
    ("pod became unready: update", svc(), [pod("a", "10.0.0.2", ready=False)],
     existing(svc(), [pod("a", "10.0.0.2")]), "update"),
    ("pod labels changed: update", svc(),
     [pod("a", "10.0.0.2", labels={"app": "web", "version": "v2"})],
     existing(svc(), [pod("a", "10.0.0.2")]), "update"),
    ("service gone: delete", None, [], existing(svc(), []), "delete"),
    ("service gone, no endpoints: nothing", None, [], None, ""),
    ("no selector: left to whoever manages it", svc(selector={}), [pod("a", "10.0.0.2")],
     None, ""),
])
def test_plan(name: str, service: core_pb2.Service | None, pods: list[core_pb2.Pod],
              current: core_pb2.Endpoints | None, action: str) -> None:
    p = plan(service, pods, current)
    assert p.action == action, name
    if action == "update":
        assert p.endpoints is not None and p.endpoints.metadata.resource_version == "7"


def test_endpoints_carry_the_service_labels_and_the_headless_mark() -> None:
    p = plan(svc(headless=True), [], None)
    assert p.endpoints is not None
    assert (p.endpoints.metadata.name, p.endpoints.metadata.namespace) == ("web", "ns")
    assert dict(p.endpoints.metadata.labels) == {"team": "a", HEADLESS_LABEL: ""}
