"""The meshagent admin API's pure parts: netfilter drift lines, generations,
connection filters, and the Status answer built from a fake agent."""

from __future__ import annotations

import pytest

from meshagent import admin
from meshagent.admin import ConnectionFilter, ConnectionRow, NetfilterReport
from meshagent.capture import CHAIN
from meshagent.identity import CertRow
from shoal import errors
from shoal.api.mesh.v1 import mesh_pb2 as pb
from shoal.testing.meshadmin import FakeAdminSource

R1 = f"-A {CHAIN} -s 10.244.1.5/32 -d 10.96.0.0/16 -p tcp -j REDIRECT --to-ports 15001"
R2 = f"-A {CHAIN} -d 10.244.1.5/32 -p tcp -j REDIRECT --to-ports 15006"
JUMP = f"-A PREROUTING -j {CHAIN}"
SVC_JUMP = "-A PREROUTING -j SHOAL-SERVICES"


def _save(*rules: str, chain: bool = True) -> str:
    head = ["*nat", ":PREROUTING ACCEPT [0:0]", ":SHOAL-SERVICES - [0:0]"]
    if chain:
        head.append(f":{CHAIN} - [0:0]")
    return "\n".join([*head, *rules, "COMMIT", ""])


@pytest.mark.parametrize("save,want,drift", [
    (_save(JUMP, SVC_JUMP, R1, R2), [R1, R2], ()),
    (_save(SVC_JUMP, chain=False), [R1],
     (f"chain {CHAIN} is missing from the nat table", f"PREROUTING has no jump to {CHAIN}",
      f"missing: {R1}")),
    (_save(SVC_JUMP, JUMP, R1), [R1],
     (f"the jump to {CHAIN} is the second rule of PREROUTING, not the first "
      "(before it: SHOAL-SERVICES)",)),
    (_save(JUMP, JUMP, R1), [R1], (f"PREROUTING jumps to {CHAIN} 2 times",)),
    (_save(JUMP, R1, R2), [R1], (f"unexpected: {R2}",)),
    (_save(JUMP, R2, R1), [R1, R2], (f"the rules of {CHAIN} are out of order",)),
    (_save(JUMP), [R1, R2], (f"missing: {R1}", f"missing: {R2}")),
])
def test_drift_lines_name_each_difference(save: str, want: list[str],
                                          drift: tuple[str, ...]) -> None:
    assert admin.drift_lines(want=want, save=save) == drift


def test_the_report_shows_wanted_and_current_lines_of_our_chain_only() -> None:
    report = admin.netfilter_report(backend="iptables-nft", want=[R1],
                                    save=_save(SVC_JUMP, JUMP, R1))
    assert report.wanted == (f":{CHAIN}", JUMP, R1)
    assert report.current == (f":{CHAIN}", JUMP, R1)  # the services jump is not ours
    assert len(report.drift) == 1 and "second rule" in report.drift[0]


@pytest.mark.parametrize("versions,overall", [
    ({"pods": "120", "services": "98", "endpoints": "130"}, 98),
    ({"pods": "120", "services": ""}, 0),  # an informer that has not listed yet
    ({}, 0),
])
def test_generation_is_the_lowest_informer_version(versions: dict[str, str],
                                                   overall: int) -> None:
    gens = admin.generations_from(versions, applied_at=5.0)
    assert gens.overall == overall
    assert gens.per_resource.get("pods", 0) == int(versions.get("pods") or 0)


OUT = ConnectionRow(direction="outbound", source_ip="10.244.1.5", destination="10.96.0.10:80",
                    destination_service="demo/web", endpoint="10.244.2.7:8080", mode="mTLS")
IN = ConnectionRow(direction="inbound", source_ip="10.244.1.5", destination="10.244.2.7:8080",
                   endpoint="10.244.2.7:8080", mode="mTLS")


@pytest.mark.parametrize("filt,row,match", [
    (ConnectionFilter(), OUT, True),
    (ConnectionFilter(source_ip="10.244.1.5"), OUT, True),
    (ConnectionFilter(source_ip="10.244.1.6"), OUT, False),
    (ConnectionFilter(direction="inbound"), OUT, False),
    (ConnectionFilter(destination_service="demo/web"), OUT, True),
    (ConnectionFilter(destination_service="demo/api"), OUT, False),
    (ConnectionFilter(destination_service="demo/api",
                      destination_ips=frozenset({"10.96.0.10"})), OUT, True),
    (ConnectionFilter(destination_ips=frozenset({"10.244.2.7"})), IN, True),
    (ConnectionFilter(destination_ips=frozenset({"10.244.2.7"})), OUT, True),  # endpoint
    (ConnectionFilter(destination_ips=frozenset({"10.244.9.9"})), IN, False),
])
def test_connection_filter(filt: ConnectionFilter, row: ConnectionRow, match: bool) -> None:
    assert filt.matches(row) is match


def test_a_bad_direction_is_refused() -> None:
    with pytest.raises(errors.BadRequest, match="outbound, inbound"):
        ConnectionFilter.of(pb.StatusRequest(direction="sideways"))


async def test_status_has_generations_and_certs_always_the_rest_when_asked() -> None:
    source = FakeAdminSource(generation=7, per_resource={"services": 9}, applied_at=100.5,
                             pod_ips=["10.244.1.5", "10.244.1.6"],
                             certs=[CertRow(spiffe_id="spiffe://cluster.local/ns/a/sa/b",
                                            serial="1f", not_after="2026-01-02T00:00:00+00:00",
                                            renew_at="2026-01-01T12:00:00+00:00",
                                            state="VALID")],
                             netfilter=NetfilterReport(backend="iptables-nft", wanted=("x",)),
                             conns=[OUT, IN])
    plain = await admin.agent_status(node="n1", source=source, request=pb.StatusRequest())
    assert (plain.node, plain.generation, dict(plain.generations)) == ("n1", 7, {"services": 9})
    assert plain.applied_time.ToNanoseconds() == 100_500_000_000
    assert plain.captured_pods == 2
    assert [c.serial for c in plain.certificates] == ["1f"]
    assert not plain.HasField("netfilter") and not plain.connections

    full = await admin.agent_status(node="n1", source=source, request=pb.StatusRequest(
        include_netfilter=True, include_connections=True, direction="outbound"))
    assert full.netfilter.backend == "iptables-nft"
    assert [(c.direction, c.destination_service, c.mode) for c in full.connections] == [
        ("outbound", "demo/web", "mTLS")]


async def test_a_failing_netfilter_read_is_reported_not_raised() -> None:
    source = FakeAdminSource(netfilter_error=errors.Unavailable("iptables-save: lock held"))
    status = await admin.agent_status(node="n1", source=source,
                                      request=pb.StatusRequest(include_netfilter=True))
    assert status.netfilter.backend == ""
    assert "lock held" in status.netfilter.error
