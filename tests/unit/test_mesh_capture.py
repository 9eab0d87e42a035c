"""Mesh capture rules: generation, drift, backend choice, clean-up (pure)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from meshagent import capture
from meshagent.capture import CHAIN, CaptureConfig
from shoal import errors, netfilter
from shoal.testing.waiting import eventually

CFG = CaptureConfig(pod_cidr="10.244.0.0/16", service_cidr="10.96.0.0/16", dns_ip="10.77.0.2")


def test_one_pod_gets_dns_outbound_tunnel_and_inbound_rules() -> None:
    assert capture.plan_rules(["10.244.1.5"], CFG) == (
        f"-A {CHAIN} -s 10.244.1.5/32 -d 10.77.0.2/32 -p udp -m udp --dport 53 "
        "-j REDIRECT --to-ports 15053",
        f"-A {CHAIN} -s 10.244.1.5/32 -d 10.77.0.2/32 -p tcp -m tcp --dport 53 "
        "-j REDIRECT --to-ports 15053",
        f"-A {CHAIN} -s 10.244.1.5/32 -d 10.96.0.0/16 -p tcp -j REDIRECT --to-ports 15001",
        f"-A {CHAIN} -s 10.244.1.5/32 -d 10.244.0.0/16 -p tcp -j REDIRECT --to-ports 15001",
        f"-A {CHAIN} -d 10.244.1.5/32 -p tcp -m tcp --dport 15008 -j REDIRECT "
        "--to-ports 15008",
        f"-A {CHAIN} -d 10.244.1.5/32 -p tcp -j REDIRECT --to-ports 15006",
    )


def test_outbound_rules_of_all_pods_come_before_any_inbound_rule() -> None:
    rules = capture.plan_rules(["10.244.1.9", "10.244.1.10", "bad", "10.244.1.9"],
                               CaptureConfig())
    inbound = [i for i, r in enumerate(rules) if "--to-ports 1500" in r and " -s " not in r]
    outbound = [i for i, r in enumerate(rules) if "--to-ports 15001" in r]
    assert len(inbound) == 4 and len(outbound) == 4
    assert max(outbound) < min(inbound)
    assert "10.244.1.9/32" in rules[0] and "10.244.1.10/32" in rules[2]  # numeric order


def test_no_dns_rules_without_a_dns_ip() -> None:
    assert not any("15053" in r for r in capture.plan_rules(["10.244.1.5"], CaptureConfig()))


def test_no_pods_means_an_empty_chain() -> None:
    assert capture.plan_rules([], CFG) == ()
    assert capture.render(()) == f"*nat\n:{CHAIN} - [0:0]\nCOMMIT\n"


@pytest.mark.parametrize("kw", [{"pod_cidr": "10.244.0.0/33"}, {"service_cidr": "x"},
                                {"dns_ip": "10.0.0.300"}])
def test_bad_config_is_refused_by_name(kw: dict[str, str]) -> None:
    with pytest.raises(errors.BadRequest, match=next(iter(kw))):
        CaptureConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("labels", "out"), [
    ({}, False),
    ({"shoal.dev/mesh": "disabled"}, True),
    ({"shoal.dev/mesh": "enabled"}, False),
    ({"istio.io/dataplane-mode": "none"}, True),
    ({"istio.io/dataplane-mode": "ambient"}, False),
])
def test_opt_out_labels(labels: dict[str, str], out: bool) -> None:
    assert capture.opted_out(labels) is out


WANT = capture.plan_rules(["10.244.1.5"], CaptureConfig())


def _save(prerouting: list[str], chain: tuple[str, ...] | None) -> str:
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":SHOAL-SERVICES - [0:0]"]
    if chain is not None:
        lines.append(f":{CHAIN} - [3:180]")
    lines += [f"-A PREROUTING {r}" for r in prerouting]
    lines += list(chain or ())
    return "\n".join([*lines, "COMMIT"]) + "\n"


@pytest.mark.parametrize(("prerouting", "chain", "rules", "jump"), [
    ([f"-j {CHAIN}", "-j SHOAL-SERVICES"], WANT, False, False),
    ([f"-j {CHAIN}", "-j SHOAL-SERVICES"], None, True, False),  # chain flushed+deleted
    ([f"-j {CHAIN}", "-j SHOAL-SERVICES"], WANT[:-1], True, False),  # a rule lost
    (["-j SHOAL-SERVICES"], WANT, False, True),  # jump gone
    (["-j SHOAL-SERVICES", f"-j {CHAIN}"], WANT, False, True),  # service proxy went first
    ([f"-j {CHAIN}", f"-j {CHAIN}"], WANT, False, True),  # duplicated
])
def test_drift(prerouting: list[str], chain: tuple[str, ...] | None, rules: bool,
               jump: bool) -> None:
    d = capture.drift(_save(prerouting, chain), WANT)
    assert (d.rules, d.jump) == (rules, jump)


def test_apply_rewrites_the_chain_and_puts_one_jump_first() -> None:
    text = capture.render_apply(_save(["-j SHOAL-SERVICES", f"-j {CHAIN}"], WANT), WANT)
    lines = text.splitlines()
    assert lines[:2] == ["*nat", f":{CHAIN} - [0:0]"]
    assert f"-D PREROUTING -j {CHAIN}" in lines
    assert lines[-2:] == [f"-I PREROUTING 1 -j {CHAIN}", "COMMIT"]
    assert lines.index(f"-D PREROUTING -j {CHAIN}") < lines.index(
        f"-I PREROUTING 1 -j {CHAIN}")


def test_cleanup_removes_jumps_and_chain_and_nothing_else() -> None:
    text = capture.render_cleanup(_save([f"-j {CHAIN}", "-j SHOAL-SERVICES"], WANT))
    assert text == (f"*nat\n-D PREROUTING -j {CHAIN}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n")
    assert capture.render_cleanup(_save(["-j SHOAL-SERVICES"], None)) is None


@pytest.mark.parametrize(("legacy", "nft", "binary"), [
    (None, None, "iptables"),
    (None, 0, "iptables-nft"),
    (3, None, "iptables-legacy"),
    (0, 0, "iptables-nft"),
    (5, 0, "iptables-legacy"),
    (2, 7, "iptables-nft"),
])
def test_backend_with_rules_wins(legacy: int | None, nft: int | None, binary: str) -> None:
    assert capture.choose_backend(legacy_rules=legacy, nft_rules=nft) == binary


class FakeNat:
    """A nat table that applies our restore inputs well enough to read them back."""

    def __init__(self) -> None:
        self.prerouting = ["-A PREROUTING -j SHOAL-SERVICES"]
        self.chain: list[str] | None = None
        self.restores = 0

    async def save(self) -> str:
        lines = ["*nat", ":PREROUTING ACCEPT [0:0]"]
        if self.chain is not None:
            lines.append(f":{CHAIN} - [0:0]")
        return "\n".join([*lines, *self.prerouting, *(self.chain or []), "COMMIT", ""])

    async def restore(self, text: str) -> None:
        self.restores += 1
        for line in text.splitlines():
            if line == f":{CHAIN} - [0:0]":
                self.chain = []
            elif line.startswith(f"-A {CHAIN} ") and self.chain is not None:
                self.chain.append(line)
            elif line.startswith("-D PREROUTING "):
                self.prerouting.remove("-A" + line[2:])
            elif line.startswith("-I PREROUTING 1 "):
                self.prerouting.insert(0, "-A PREROUTING " + line.split(" ", 3)[3])
            elif line == f"-X {CHAIN}":
                self.chain = None


@pytest.mark.asyncio
async def test_capture_rewrites_only_on_drift_and_cleans_up() -> None:
    nat = FakeNat()
    cap = capture.Capture(config=CaptureConfig(), iptables=nat)  # type: ignore[arg-type]
    cap.set_pods(["10.244.1.5"])
    assert await cap.sync() is True
    assert nat.prerouting[0] == f"-A PREROUTING -j {CHAIN}"
    assert await cap.sync() is False  # nothing changed: nothing written
    nat.chain = []  # someone flushed our chain
    assert await cap.sync() is True and tuple(nat.chain) == WANT
    nat.prerouting = ["-A PREROUTING -j SHOAL-SERVICES", f"-A PREROUTING -j {CHAIN}"]
    assert await cap.sync() is True  # the service proxy got above us
    assert nat.prerouting == [f"-A PREROUTING -j {CHAIN}", "-A PREROUTING -j SHOAL-SERVICES"]
    await cap.cleanup()
    assert nat.chain is None and nat.prerouting == ["-A PREROUTING -j SHOAL-SERVICES"]


class FakeChanges(netfilter.Changes):
    """``netfilter.Changes`` without the kernel: the test says when the ruleset changed."""

    def __init__(self) -> None:  # no socket
        self.changed = asyncio.Event()

    def _drain(self) -> bool:
        return False

    def close(self) -> None:
        pass


class CountingNat(FakeNat):
    def __init__(self) -> None:
        super().__init__()
        self.saves = 0

    async def save(self) -> str:
        self.saves += 1
        return await super().save()


@pytest.mark.asyncio
async def test_with_change_notifications_the_rules_are_read_back_on_a_change_not_by_polling(
        ) -> None:
    nat, changes = CountingNat(), FakeChanges()
    cap = capture.Capture(config=CaptureConfig(), iptables=nat,  # type: ignore[arg-type]
                          interval=0.01, changes=changes)
    cap.set_pods(["10.244.1.5"])
    loop = asyncio.create_task(cap.run())
    try:
        async def first_sync() -> bool:
            return nat.restores == 1

        async def rewritten() -> bool:
            return nat.chain is not None and tuple(nat.chain) == WANT

        await eventually("the first sync", first_sync)
        saves = nat.saves
        await asyncio.sleep(0.3)  # 30 polling intervals: nothing changed, nothing read
        assert nat.saves == saves
        nat.chain = []  # someone flushed our chain: the kernel says the ruleset changed
        changes.changed.set()
        await eventually("the flushed chain rewritten", rewritten)
        assert nat.restores == 2 and not changes.changed.is_set()
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
