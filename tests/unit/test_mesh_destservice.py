"""The destination reporter's destination_service: which Service a request to a
local pod was for, from its Host / :authority and the Services the pod is an
endpoint of (meshagent.l7.destservice; pure)."""

from __future__ import annotations

import pytest

from meshagent.l7.destservice import UNKNOWN, Index, ServiceName, build_index, host_name, resolve
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb

WEB_IP, OTHER_IP, VM_IP = "10.244.1.5", "10.244.2.7", "192.168.50.2"
WEB = ServiceName("web.default.svc.cluster.local", "web", "default")
WEB_CANARY = ServiceName("web-canary.default.svc.cluster.local", "web-canary", "default")
API = ServiceName("api.prod.svc.cluster.local", "api", "prod")
EXT = ServiceName("ext.example.com", "ext.example.com", "egress")


def service(name: str, ns: str = "default", *, selector: dict[str, str] | None = None,
            port: int = 80) -> core_pb2.Service:
    svc = core_pb2.Service()
    svc.metadata.name, svc.metadata.namespace = name, ns
    svc.spec.ports.add(name="http", port=port)
    svc.spec.selector.update(selector or {})
    return svc


def endpoints(name: str, ns: str = "default", *, ready: tuple[str, ...] = (),
              not_ready: tuple[str, ...] = (), port: int = 8080) -> core_pb2.Endpoints:
    ep = core_pb2.Endpoints()
    ep.metadata.name, ep.metadata.namespace = name, ns
    sub = ep.subsets.add()
    for ip in ready:
        sub.addresses.add(ip=ip)
    for ip in not_ready:
        sub.not_ready_addresses.add(ip=ip)
    sub.ports.add(name="http", port=port, protocol="TCP")
    return ep


def service_entry(host: str, ns: str = "egress") -> pb.ServiceEntry:
    se = pb.ServiceEntry()
    se.metadata.name, se.metadata.namespace = "ext", ns
    se.spec.hosts.extend([host, "*.wild.example.com"])
    se.spec.ports.add(number=80, name="http", protocol="HTTP")
    return se


def index(*, canary: bool = False) -> Index:
    """web (default) selects WEB_IP:8080; with ``canary`` web-canary does too;
    api (prod) selects OTHER_IP:8080; ServiceEntry host ext.example.com."""
    services = [service("web"), service("api", "prod")]
    eps = [endpoints("web", ready=(WEB_IP,)), endpoints("api", "prod", ready=(OTHER_IP,))]
    if canary:
        services.append(service("web-canary"))
        eps.append(endpoints("web-canary", not_ready=(WEB_IP,)))
    return build_index(services, eps, domain="cluster.local",
                       service_entries=[service_entry("EXT.example.com.")])


@pytest.mark.parametrize(("host", "source_ns", "want"), [
    # 1. the Host names a Service of the pod, in any of its forms, a port stripped
    ("web", "default", WEB),
    ("web:80", "default", WEB),
    ("web.default", "prod", WEB),
    ("web.default.svc", "prod", WEB),
    ("web.default.svc.cluster.local", "prod", WEB),
    ("WEB.default.svc.cluster.local.:80", "", WEB),
    # a short name is the client's namespace's: "web" from prod is not default's web,
    # but the pod has one Service, so rule 2 names it anyway
    ("web", "prod", WEB),
    # 2. a host naming nothing of this pod: its one Service
    ("10.244.1.5:8080", "default", WEB),
    ("api.prod.svc.cluster.local", "default", WEB),  # not a Service of this pod
    ("", "default", WEB),
    ("ext.example.com", "default", WEB),  # rule 2 comes before a ServiceEntry host
])
def test_a_pod_behind_one_service(host: str, source_ns: str, want: ServiceName) -> None:
    assert resolve(index(), ip=WEB_IP, port=8080, namespace="default", host=host,
                   source_namespace=source_ns) == want


@pytest.mark.parametrize(("host", "source_ns", "want"), [
    ("web", "default", WEB),
    ("web-canary", "default", WEB_CANARY),       # a not-ready address is still its pod
    ("web-canary.default:8080", "prod", WEB_CANARY),
    ("web-canary", "", WEB_CANARY),              # an unknown client: the pod's namespace
    ("web-canary", "prod", UNKNOWN),             # prod's web-canary: two Services, no guess
    ("10.244.1.5", "default", UNKNOWN),
    ("", "default", UNKNOWN),
    # 3. no Service decides: a ServiceEntry host (not a wildcard), in the entry's
    #    namespace; anything else is unknown
    ("ext.example.com", "default", EXT),
    ("ext.example.com:443", "default", EXT),
    ("a.wild.example.com", "default", UNKNOWN),
    ("api.prod.svc.cluster.local", "default", UNKNOWN),  # a Service, but not of this pod
])
def test_a_pod_behind_two_services(host: str, source_ns: str, want: ServiceName) -> None:
    assert resolve(index(canary=True), ip=WEB_IP, port=8080, namespace="default", host=host,
                   source_namespace=source_ns) == want


@pytest.mark.parametrize(("ip", "port", "host", "want"), [
    (WEB_IP, 9999, "web", UNKNOWN),              # not a port any Service targets
    (WEB_IP, 9999, "ext.example.com", EXT),
    ("10.244.9.9", 8080, "web", UNKNOWN),        # no Service has this pod
    (OTHER_IP, 8080, "api", API),
    (OTHER_IP, 8080, "web", API),                # rule 2
])
def test_other_pods_and_ports(ip: str, port: int, host: str, want: ServiceName) -> None:
    ns = "prod" if ip == OTHER_IP else "default"
    assert resolve(index(), ip=ip, port=port, namespace=ns, host=host,
                   source_namespace=ns) == want


def test_a_service_of_another_namespace_is_never_the_pods_only_service() -> None:
    # A selector-less Service in prod with hand-written Endpoints naming default's pod.
    idx = build_index([service("web"), service("alias", "prod")],
                      [endpoints("web", ready=(WEB_IP,)),
                       endpoints("alias", "prod", ready=(WEB_IP,))], domain="cluster.local")
    alias = ServiceName("alias.prod.svc.cluster.local", "alias", "prod")
    assert resolve(idx, ip=WEB_IP, port=8080, namespace="default", host="",
                   source_namespace="") == WEB
    assert resolve(idx, ip=WEB_IP, port=8080, namespace="default", host="alias.prod",
                   source_namespace="default") == alias
    assert resolve(idx, ip=WEB_IP, port=8080, namespace="default", host="alias",
                   source_namespace="prod") == alias


def test_the_cluster_domain_is_the_agents() -> None:
    idx = build_index([service("web")], [endpoints("web", ready=(WEB_IP,))],
                      domain="example.internal")
    web = resolve(idx, ip=WEB_IP, port=8080, namespace="default",
                  host="web.default.svc.example.internal", source_namespace="")
    assert web == ServiceName("web.default.svc.example.internal", "web", "default")


def test_workload_entries_selected_by_a_service_are_its_endpoints() -> None:
    we = pb.WorkloadEntry()
    we.metadata.name, we.metadata.namespace = "vm1", "default"
    we.spec.address = VM_IP
    we.spec.labels.update({"app": "web"})
    idx = build_index([service("web", selector={"app": "web"}, port=8080)], [],
                      domain="cluster.local", workload_entries=[we])
    assert resolve(idx, ip=VM_IP, port=8080, namespace="default", host="web",
                   source_namespace="default") == WEB


@pytest.mark.parametrize(("authority", "want"), [
    ("Web.Default:8080", "web.default"),
    ("web.default.svc.cluster.local.", "web.default.svc.cluster.local"),
    ("[fd00::1]:80", "fd00::1"),
    ("  web  ", "web"),
    ("", ""),
])
def test_host_name(authority: str, want: str) -> None:
    assert host_name(authority) == want
