"""The service proxy's iptables ruleset, generated from Services and Endpoints (pure)."""

from __future__ import annotations

import pytest

from nodeagent.serviceproxy import (
    Jump,
    ServicePort,
    ServiceProxy,
    build_ruleset,
    existing_chains,
    matches_plan,
    our_lines,
    sep_chain,
    service_ports,
    svc_chain,
)
from shoal.api.core.v1 import core_pb2


def service(name: str, ip: str, *ports: tuple[str, int, str], type_: str = "ClusterIP"
            ) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, "default"
    s.spec.cluster_ip, s.spec.type = ip, type_
    for pname, port, proto in ports or (("http", 80, "TCP"),):
        s.spec.ports.add(name=pname, port=port, protocol=proto)
    return s


def endpoints(name: str, ready: list[str], not_ready: list[str] = (),  # type: ignore[assignment]
              ports: tuple[tuple[str, int, str], ...] = (("http", 8080, "TCP"),)
              ) -> core_pb2.Endpoints:
    e = core_pb2.Endpoints()
    e.metadata.name, e.metadata.namespace = name, "default"
    sub = e.subsets.add()
    for ip in ready:
        sub.addresses.add(ip=ip)
    for ip in not_ready:
        sub.not_ready_addresses.add(ip=ip)
    for pname, port, proto in ports:
        sub.ports.add(name=pname, port=port, protocol=proto)
    return e


@pytest.mark.parametrize(("name", "services", "eps", "want"), [
    ("ready endpoints only, sorted",
     [service("web", "10.96.0.10")],
     [endpoints("web", ["10.244.2.2", "10.244.1.2"], ["10.244.3.2"])],
     [("default/web:http", "10.96.0.10", 80, "tcp",
       (("10.244.1.2", 8080), ("10.244.2.2", 8080)))]),
    ("no endpoints object", [service("web", "10.96.0.10")], [],
     [("default/web:http", "10.96.0.10", 80, "tcp", ())]),
    ("headless, ExternalName and unallocated services are skipped",
     [service("h", "None"), service("x", "", type_="ExternalName"), service("u", "")], [], []),
    ("ports are matched by name and protocol",
     [service("dns", "10.96.0.53", ("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"))],
     [endpoints("dns", ["10.244.1.5"], ports=(("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")))],
     [("default/dns:dns", "10.96.0.53", 53, "udp", (("10.244.1.5", 5353),)),
      ("default/dns:dns-tcp", "10.96.0.53", 53, "tcp", (("10.244.1.5", 5354),))]),
])
def test_service_ports(name: str, services: list[core_pb2.Service],
                       eps: list[core_pb2.Endpoints], want: list[tuple[object, ...]]) -> None:
    got = service_ports(services, {f"default/{e.metadata.name}": e for e in eps})
    assert [(p.name, p.cluster_ip, p.port, p.protocol, p.endpoints) for p in got] == want, name


WEB = ServicePort(name="default/web:http", cluster_ip="10.96.0.10", port=80, protocol="tcp",
                  endpoints=(("10.244.1.2", 8080), ("10.244.2.2", 8080), ("10.244.3.2", 8080)))


def test_each_endpoint_gets_an_even_share_a_dnat_and_a_hairpin_mark() -> None:
    text = build_ruleset([WEB])
    svc = svc_chain(WEB)
    seps = [sep_chain(WEB, ip, port) for ip, port in WEB.endpoints]
    lines = text.splitlines()
    assert (f'-A SHOAL-SERVICES -m comment --comment "default/web:http cluster IP" '
            f"-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j {svc}") in lines
    spread = [line for line in lines if line.startswith(f"-A {svc} ")]
    assert ["--probability 0.3333333333" in spread[0], "--probability 0.5000000000" in spread[1],
            "statistic" in spread[2]] == [True, True, False]
    assert [line.rsplit(" ", 1)[1] for line in spread] == seps
    assert f"-A {seps[0]} -s 10.244.1.2/32 -j SHOAL-MARK-MASQ" in lines
    assert f"-A {seps[0]} -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080" in lines
    assert "-A SHOAL-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN" in lines
    assert any("MASQUERADE" in line for line in lines)


def test_chains_are_declared_so_one_restore_flushes_and_refills_them() -> None:
    lines = build_ruleset([WEB]).splitlines()
    nat, filt = lines[:lines.index("COMMIT") + 1], lines[lines.index("COMMIT") + 1:]
    assert nat[0] == "*nat" and filt[0] == "*filter" and filt[-1] == "COMMIT"
    declared = [line for line in nat if line.startswith(":")]
    assert ":SHOAL-SERVICES - [0:0]" in declared and f":{svc_chain(WEB)} - [0:0]" in declared
    assert len(declared) == 3 + 1 + 3  # fixed chains, one SVC, three SEPs
    assert not any(line.startswith(("-A PREROUTING", "-A OUTPUT", "-F")) for line in lines)


def test_a_cluster_ip_without_endpoints_is_rejected_in_the_filter_table() -> None:
    empty = ServicePort(name="default/none:", cluster_ip="10.96.0.11", port=81, protocol="tcp",
                        endpoints=())
    lines = build_ruleset([empty]).splitlines()
    filt = lines[lines.index("*filter"):]
    assert any("-d 10.96.0.11/32 -p tcp -m tcp --dport 81 -j REJECT" in line for line in filt)
    assert not any("10.96.0.11" in line for line in lines[:lines.index("*filter")])


def test_stale_chains_of_ours_are_deleted_and_others_left_alone() -> None:
    old = ServicePort(name="default/old:http", cluster_ip="10.96.0.12", port=80,
                      protocol="tcp", endpoints=(("10.244.1.9", 80),))
    stale = {svc_chain(old), sep_chain(old, "10.244.1.9", 80)}
    text = build_ruleset([WEB], existing_chains=[*stale, "SHOAL-LAB-FWD", "OTHER",
                                                  svc_chain(WEB)])
    for chain in stale:
        assert f":{chain} - [0:0]" in text and f"-X {chain}" in text
    assert "SHOAL-LAB-FWD" not in text and "OTHER" not in text
    assert f"-X {svc_chain(WEB)}" not in text


def test_chain_names_are_stable_and_short() -> None:
    assert svc_chain(WEB) == svc_chain(WEB)
    assert len(sep_chain(WEB, "10.244.1.2", 8080)) <= 28
    assert sep_chain(WEB, "10.244.1.2", 8080) != sep_chain(WEB, "10.244.1.2", 8081)


SAVED = """# Generated by iptables-nft-save v1.8.9
*nat
:PREROUTING ACCEPT [3:180]
:OUTPUT ACCEPT [0:0]
:SHOAL-SERVICES - [0:0]
:SHOAL-SVC-ABC - [0:0]
:MESH-REDIRECT - [0:0]
-A PREROUTING -m comment --comment "shoal service portals" -j SHOAL-SERVICES
-A PREROUTING -p tcp -j MESH-REDIRECT
-A SHOAL-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j SHOAL-SVC-ABC
-A MESH-REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""


def test_our_lines_pick_our_chains_rules_and_jumps() -> None:
    assert our_lines(SAVED) == [
        "*nat", ":SHOAL-SERVICES", ":SHOAL-SVC-ABC",
        '-A PREROUTING -m comment --comment "shoal service portals" -j SHOAL-SERVICES',
        "-A SHOAL-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j SHOAL-SVC-ABC",
    ]
    flushed = SAVED.replace(
        "-A SHOAL-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j SHOAL-SVC-ABC\n", "")
    assert our_lines(flushed) != our_lines(SAVED)  # a flush is drift
    assert existing_chains(SAVED) == {"PREROUTING", "OUTPUT", "SHOAL-SERVICES", "SHOAL-SVC-ABC",
                                      "MESH-REDIRECT"}


# --------------------------------------------------------------------------- the sync loop


class FakeIptables:
    """Tables as iptables-save would print them; restore/ensure_jump applied to them."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, list[str]]] = {
            "nat": {"PREROUTING": [], "OUTPUT": [], "POSTROUTING": []},
            "filter": {"FORWARD": [], "OUTPUT": []}}
        self.restores = 0

    async def save(self, table: str) -> str:
        chains = self.tables[table]
        lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
        lines += [rule for rules in chains.values() for rule in rules]
        return "\n".join([*lines, "COMMIT"]) + "\n"

    async def restore(self, text: str) -> None:
        self.restores += 1
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                self.tables[table][line[1:].split()[0]] = []
            elif line.startswith("-A "):
                self.tables[table][line.split()[1]].append(line)
            elif line.startswith("-X "):
                del self.tables[table][line.split()[1]]

    async def ensure_jump(self, jump: Jump) -> bool:
        rule = f"-A {jump.chain} " + " ".join(
            f'"{w}"' if " " in w else w for w in jump.rule)
        rules = self.tables[jump.table][jump.chain]
        if rule in rules:
            return False
        rules.insert(0, rule)
        return True


class FakeInformer:
    def __init__(self, items: list[object]) -> None:
        self.items = items

    def add_handlers(self, **_: object) -> None:
        pass

    def list(self) -> list[object]:
        return self.items


async def test_sync_writes_everything_and_a_flush_is_seen_as_drift() -> None:
    ipt = FakeIptables()
    proxy = ServiceProxy(client=None, iptables=ipt,  # type: ignore[arg-type]
                         services=FakeInformer([service("web", "10.96.0.10")]),  # type: ignore[arg-type]
                         endpoints=FakeInformer([endpoints("web", ["10.244.1.2"])]))  # type: ignore[arg-type]
    assert await proxy.drifted()  # never synced
    await proxy.sync()
    assert not await proxy.drifted()
    nat = ipt.tables["nat"]
    assert any("10.96.0.10/32" in r for r in nat["SHOAL-SERVICES"])
    assert any("-j SHOAL-SERVICES" in r for r in nat["PREROUTING"])
    nat["SHOAL-SERVICES"].clear()  # someone flushes our chain
    assert await proxy.drifted()
    await proxy.sync()  # the loop calls sync(full=True); a plain sync checks first
    assert not await proxy.drifted() and any("10.96.0.10/32" in r for r in nat["SHOAL-SERVICES"])
    nat["PREROUTING"].clear()  # or removes the jump
    assert await proxy.drifted()
    await proxy.sync(full=True)
    assert any("-j SHOAL-SERVICES" in r for r in nat["PREROUTING"])


async def test_later_syncs_write_only_the_chains_that_changed() -> None:
    ipt = FakeIptables()
    texts: list[str] = []
    real_restore = ipt.restore

    async def restore(text: str) -> None:
        texts.append(text)
        await real_restore(text)

    ipt.restore = restore  # type: ignore[method-assign]
    eps = FakeInformer([endpoints("web", ["10.244.1.2"]), endpoints("db", ["10.244.1.3"])])
    proxy = ServiceProxy(client=None, iptables=ipt,  # type: ignore[arg-type]
                         services=FakeInformer([service("web", "10.96.0.10"),  # type: ignore[arg-type]
                                                service("db", "10.96.0.11")]),
                         endpoints=eps)  # type: ignore[arg-type]
    await proxy.sync()
    assert "SHOAL-MARK-MASQ" in texts[-1]  # the first sync writes everything
    await proxy.sync()
    assert len(texts) == 1  # nothing changed: nothing written
    eps.items = [endpoints("web", ["10.244.1.2", "10.244.2.2"]), endpoints("db", ["10.244.1.3"])]
    await proxy.sync()
    declared = [line for line in texts[-1].splitlines() if line.startswith(":")]
    web = service_ports([service("web", "10.96.0.10")], {"default/web": eps.items[0]})[0]
    new_sep = sep_chain(web, "10.244.2.2", 8080)
    assert declared == [f":{svc_chain(web)} - [0:0]", f":{new_sep} - [0:0]"]
    assert "*filter" not in texts[-1]
    assert not await proxy.drifted()
    ipt.tables["nat"]["SHOAL-SERVICES"].clear()  # drift, then a change: all is rewritten
    eps.items = [endpoints("web", ["10.244.1.2"]), endpoints("db", ["10.244.1.3"])]
    await proxy.sync()
    assert "SHOAL-MARK-MASQ" in texts[-1] and len(ipt.tables["nat"]["SHOAL-SERVICES"]) == 2
    assert proxy.repairs == 1


async def test_a_removed_service_leaves_no_chain_behind() -> None:
    ipt = FakeIptables()
    services = FakeInformer([service("web", "10.96.0.10")])
    proxy = ServiceProxy(client=None, iptables=ipt,  # type: ignore[arg-type]
                         services=services,  # type: ignore[arg-type]
                         endpoints=FakeInformer([endpoints("web", ["10.244.1.2"])]))  # type: ignore[arg-type]
    await proxy.sync()
    assert any(c.startswith("SHOAL-SEP-") for c in ipt.tables["nat"])
    services.items = []
    await proxy.sync()
    assert not any(c.startswith(("SHOAL-SEP-", "SHOAL-SVC-")) for c in ipt.tables["nat"])
    assert ipt.tables["nat"]["SHOAL-SERVICES"] == []


def test_client_ip_affinity_sends_a_known_client_back_to_its_endpoint() -> None:
    s = service("sticky", "10.96.0.20")
    s.spec.session_affinity = "ClientIP"
    s.spec.session_affinity_config.client_ip.timeout_seconds = 600
    (sp,) = service_ports([s], {"default/sticky": endpoints("sticky", ["10.244.1.2",
                                                                      "10.244.2.2"])})
    assert sp.affinity_seconds == 600
    lines = build_ruleset([sp]).splitlines()
    svc = svc_chain(sp)
    rules = [line for line in lines if line.startswith(f"-A {svc} ")]
    # Two "seen recently" checks first, then the random spread.
    assert ["--rcheck --seconds 600 --reap" in r for r in rules] == [True, True, False, False]
    for ip, port in sp.endpoints:
        sep = sep_chain(sp, ip, port)
        assert any(r.startswith(f"-A {sep} -m recent --name {sep} ") and "--set" in r
                   and f"--to-destination {ip}:{port}" in r for r in lines)
    default = service("sticky2", "10.96.0.21")
    default.spec.session_affinity = "ClientIP"
    assert service_ports([default], {})[0].affinity_seconds == 10800
    assert "recent" not in build_ruleset([WEB])


@pytest.mark.parametrize(("listing", "position"), [
    ("-P PREROUTING ACCEPT\n", 1),
    ("-P PREROUTING ACCEPT\n-A PREROUTING -j SHOAL-MESH-PREROUTING\n", 2),
    ("-P PREROUTING ACCEPT\n-A PREROUTING -j OTHER\n-A PREROUTING -j SHOAL-MESH-PREROUTING\n"
     "-A PREROUTING -j LAST\n", 3),
])
def test_our_jump_goes_just_below_the_mesh_capture_jump(listing: str, position: int) -> None:
    from nodeagent.serviceproxy import jump_position
    assert jump_position(listing) == position


async def test_a_flush_while_a_sync_writes_is_not_taken_for_our_state() -> None:
    """The read-back after a sync is the reference for drift checks: a flush that
    lands between the write and that read-back must still be seen as drift."""
    ipt = FakeIptables()
    proxy = ServiceProxy(client=None, iptables=ipt,  # type: ignore[arg-type]
                         services=FakeInformer([service("web", "10.96.0.10")]),  # type: ignore[arg-type]
                         endpoints=FakeInformer([endpoints("web", ["10.244.1.2"])]))  # type: ignore[arg-type]
    real_ensure = ipt.ensure_jump

    async def ensure_then_flushed(jump: Jump) -> bool:
        done = await real_ensure(jump)
        ipt.tables["nat"]["SHOAL-SERVICES"].clear()  # someone, mid-sync
        return done

    ipt.ensure_jump = ensure_then_flushed  # type: ignore[method-assign]
    await proxy.sync()
    ipt.ensure_jump = real_ensure  # type: ignore[method-assign]
    assert await proxy.drifted()
    await proxy.sync(full=True)
    assert not await proxy.drifted()
    assert any("10.96.0.10/32" in r for r in ipt.tables["nat"]["SHOAL-SERVICES"])


async def test_matches_plan_counts_each_chain_and_needs_every_jump() -> None:
    ipt = FakeIptables()
    proxy = ServiceProxy(client=None, iptables=ipt,  # type: ignore[arg-type]
                         services=FakeInformer([service("web", "10.96.0.10")]),  # type: ignore[arg-type]
                         endpoints=FakeInformer([endpoints("web", ["10.244.1.2"])]))  # type: ignore[arg-type]
    await proxy.sync()
    assert proxy.applied is not None and proxy._written is not None
    rules, seen = proxy._written, proxy.applied
    assert matches_plan(rules, seen)
    rule = next(x for x in seen if x.startswith("-A SHOAL-SERVICES ") and "10.96.0.10" in x)
    assert not matches_plan(rules, [x for x in seen if x != rule])  # a rule missing
    jump = next(x for x in seen if x.startswith("-A PREROUTING "))
    assert not matches_plan(rules, [x for x in seen if x != jump])  # a jump missing
