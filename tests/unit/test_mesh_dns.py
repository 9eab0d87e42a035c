"""The mesh DNS responder's answers (pure: dnspython messages, no sockets)."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from meshagent.dns import answer, build_names, candidates, search_path
from shoal.api.core.v1 import core_pb2


def service(name: str, ns: str, ip: str) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, ns
    s.spec.cluster_ip = ip
    s.spec.ports.add(name="http", port=80, protocol="TCP")
    return s


def endpoints(name: str, ns: str, ready: list[tuple[str, str]],
              not_ready: list[str] | None = None) -> core_pb2.Endpoints:
    e = core_pb2.Endpoints()
    e.metadata.name, e.metadata.namespace = name, ns
    sub = e.subsets.add()
    for ip, host in ready:
        sub.addresses.add(ip=ip, hostname=host)
    for ip in not_ready or []:
        sub.not_ready_addresses.add(ip=ip)
    return e


NAMES = build_names(
    [service("web", "shop", "10.96.0.10"), service("db", "shop", "None"),
     service("pending", "shop", "")],
    {"shop/db": endpoints("db", "shop", [("10.244.1.5", "db-0"), ("10.244.2.6", "db-1")],
                          not_ready=["10.244.1.7"]),
     "shop/web": endpoints("web", "shop", [("10.244.1.9", "")])})


def test_names() -> None:
    assert NAMES == {
        "web.shop.svc.cluster.local": ("10.96.0.10",),
        "db.shop.svc.cluster.local": ("10.244.1.5", "10.244.2.6"),
        "db-0.db.shop.svc.cluster.local": ("10.244.1.5",),
        "db-1.db.shop.svc.cluster.local": ("10.244.2.6",),
    }


def _ask(name: str, ns: str | None = "shop", rdtype: str = "A") -> dns.message.Message | None:
    return answer(dns.message.make_query(name, rdtype), NAMES, search=search_path(ns))


def _ips(resp: dns.message.Message | None) -> list[str]:
    assert resp is not None and resp.rcode() == dns.rcode.NOERROR
    return sorted(r.address for rr in resp.answer if rr.rdtype == dns.rdatatype.A for r in rr)


@pytest.mark.parametrize(("name", "ns", "ips"), [
    ("web.shop.svc.cluster.local.", None, ["10.96.0.10"]),
    ("WEB.shop.svc.cluster.local", None, ["10.96.0.10"]),
    ("web", "shop", ["10.96.0.10"]),  # short name, from the pod's namespace
    ("web.shop", "other", ["10.96.0.10"]),
    ("web.shop.svc", "other", ["10.96.0.10"]),
    ("db.shop.svc.cluster.local", None, ["10.244.1.5", "10.244.2.6"]),  # headless
    ("db-1.db.shop.svc.cluster.local", None, ["10.244.2.6"]),  # StatefulSet pod
    ("db-0.db", "shop", ["10.244.1.5"]),
])
def test_a_answers(name: str, ns: str | None, ips: list[str]) -> None:
    assert _ips(_ask(name, ns)) == ips


@pytest.mark.parametrize(("name", "ns"), [
    ("nope.shop.svc.cluster.local", None),
    ("pending.shop.svc.cluster.local", None),  # no ClusterIP yet
    ("web", "other"),  # short names only resolve in the pod's own namespace
    ("web", None),  # an unknown source gets no search path
])
def test_unknown_in_cluster_names_are_nxdomain(name: str, ns: str | None) -> None:
    resp = _ask(name, ns)
    assert resp is not None and resp.rcode() == dns.rcode.NXDOMAIN


def test_other_record_types_of_a_known_name_are_empty() -> None:
    resp = _ask("web.shop.svc.cluster.local", rdtype="AAAA")
    assert resp is not None and resp.rcode() == dns.rcode.NOERROR and not resp.answer


def test_outside_names_are_left_for_upstream() -> None:
    assert _ask("example.com") is None


def test_search_path_order() -> None:
    assert candidates("web", search_path("shop")) == [
        "web.shop.svc.cluster.local", "web.svc.cluster.local", "web.cluster.local", "web"]
    assert candidates("a.b.c.d.e.f", ["x"])[0] == "a.b.c.d.e.f"
