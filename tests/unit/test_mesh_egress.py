"""meshagent.egress: ServiceEntry destinations and the outbound traffic policy."""

from __future__ import annotations

import pytest

from meshagent import capture, egress
from shoal.api.traffic.v1 import traffic_pb2 as pb


def _se(name: str, *, hosts: list[str], resolution: str, ports: list[int],
        addresses: tuple[str, ...] = (),
        endpoints: tuple[tuple[str, dict[str, int]], ...] = ()) -> pb.ServiceEntry:
    se = pb.ServiceEntry()
    se.metadata.namespace, se.metadata.name = "ns", name
    se.spec.hosts.extend(hosts)
    se.spec.addresses.extend(addresses)
    se.spec.resolution = resolution
    for n in ports:
        se.spec.ports.add(number=n, name=f"tcp-{n}", protocol="TCP")
    for address, eports in endpoints:
        ep = se.spec.endpoints.add(address=address)
        ep.ports.update(eports)
    return se


ENTRIES = [
    _se("static", hosts=["a.example"], resolution="STATIC", ports=[80],
        endpoints=(("10.77.0.200", {}),)),
    _se("vip", hosts=["b.example"], resolution="STATIC", ports=[443],
        addresses=("240.0.0.1",), endpoints=(("10.77.0.201", {"tcp-443": 8443}),)),
    _se("cidr", hosts=["c.example"], resolution="NONE", ports=[22],
        addresses=("192.168.5.0/24",)),
    _se("dns", hosts=["d.example"], resolution="DNS", ports=[80]),
]
RESOLVED = {"d.example": ("10.77.0.202",)}


@pytest.mark.parametrize(("mode", "dst", "allowed", "target", "service"), [
    # A STATIC endpoint on a declared port: allowed in both modes.
    ("REGISTRY_ONLY", ("10.77.0.200", 80), True, ("10.77.0.200", 80), "a.example"),
    # ... not on another port.
    ("REGISTRY_ONLY", ("10.77.0.200", 81), False, None, "BlackHoleCluster"),
    ("ALLOW_ANY", ("10.77.0.200", 81), True, ("10.77.0.200", 81), "PassthroughCluster"),
    # A VIP goes to its endpoint, on the endpoint's port for that port name.
    ("REGISTRY_ONLY", ("240.0.0.1", 443), True, ("10.77.0.201", 8443), "b.example"),
    # A CIDR address.
    ("REGISTRY_ONLY", ("192.168.5.9", 22), True, ("192.168.5.9", 22), "c.example"),
    # DNS: what the agent resolved.
    ("REGISTRY_ONLY", ("10.77.0.202", 80), True, ("10.77.0.202", 80), "d.example"),
    # Nobody's.
    ("REGISTRY_ONLY", ("10.77.0.250", 80), False, None, "BlackHoleCluster"),
    ("ALLOW_ANY", ("10.77.0.250", 80), True, ("10.77.0.250", 80), "PassthroughCluster"),
])
def test_decide_egress(mode: str, dst: tuple[str, int], allowed: bool,
                       target: tuple[str, int] | None, service: str) -> None:
    registry = egress.build_registry(ENTRIES, RESOLVED)
    e = egress.decide_egress(registry, mode, dst)
    assert (e.allowed, e.target, e.service) == (allowed, target, service)
    if not allowed:
        assert "REGISTRY_ONLY" in e.reason


@pytest.mark.parametrize(("labels", "want"), [
    ({}, "ALLOW_ANY"),
    ({egress.NAMESPACE_LABEL: "REGISTRY_ONLY"}, "REGISTRY_ONLY"),
    ({egress.NAMESPACE_LABEL: "bogus"}, "ALLOW_ANY"),
])
def test_namespace_overrides_the_agent_mode(labels: dict[str, str], want: str) -> None:
    assert egress.policy_for("ALLOW_ANY", labels) == want


def test_dns_names_for_service_entries() -> None:
    names = egress.service_entry_names(ENTRIES)
    assert names == {"a.example": ("10.77.0.200",), "b.example": ("240.0.0.1",)}
    assert egress.dns_hosts(ENTRIES[3]) == ["d.example"]
    assert egress.dns_hosts(ENTRIES[0]) == []


def test_egress_capture_catches_every_tcp_destination_of_a_pod_only() -> None:
    rules = capture.pod_rules("10.244.1.5", capture.CaptureConfig(egress=True))
    outbound = [r for r in rules if "-s 10.244.1.5/32" in r and "--dport 53" not in r]
    assert outbound == ["-A SHOAL-MESH-PREROUTING -s 10.244.1.5/32 -p tcp -j REDIRECT "
                        "--to-ports 15001"]
    # Without it, only the two CIDRs.
    rules = capture.pod_rules("10.244.1.5", capture.CaptureConfig())
    assert sum(" -d 10." in r and "-s 10.244.1.5/32" in r for r in rules) == 2


def test_workload_selector_makes_workload_entries_endpoints() -> None:
    se = _se("sel", hosts=["legacy.internal"], resolution="STATIC", ports=[9000])
    se.spec.workload_selector.labels["app"] = "legacy"
    we = pb.WorkloadEntry()
    we.metadata.namespace, we.metadata.name = "ns", "vm"
    we.spec.address = "10.77.0.101"
    we.spec.labels["app"] = "legacy"
    other = pb.WorkloadEntry()
    other.CopyFrom(we)
    other.metadata.namespace = "elsewhere"
    other.spec.address = "10.77.0.102"
    registry = egress.build_registry([se], {}, [we, other])
    assert egress.decide_egress(registry, "REGISTRY_ONLY", ("10.77.0.101", 9000)).allowed
    assert not egress.decide_egress(registry, "REGISTRY_ONLY", ("10.77.0.102", 9000)).allowed
