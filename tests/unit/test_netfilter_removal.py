"""One atomic removal of our chains and every jump to them (pure)."""

from __future__ import annotations

from shoal.netfilter import removal

SAVE = """\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SHOAL-MESH-PREROUTING - [0:0]
:SHOAL-SERVICES - [5:300]
:SHOAL-SVC-AAA - [0:0]
-A PREROUTING -j SHOAL-MESH-PREROUTING
-A PREROUTING -m comment --comment "shoal service portals" -j SHOAL-SERVICES
-A OUTPUT -m comment --comment "shoal service portals" -j SHOAL-SERVICES
-A SHOAL-SERVICES -d 10.96.0.10/32 -p tcp -j SHOAL-SVC-AAA
-A SHOAL-SVC-AAA -j DNAT --to-destination 10.244.1.2:80
COMMIT
"""


def _ours(chain: str) -> bool:
    return chain == "SHOAL-SERVICES" or chain.startswith("SHOAL-SVC-")


def test_jumps_go_first_then_our_chains_are_flushed_and_deleted() -> None:
    assert removal(SAVE, "nat", _ours) == "\n".join([
        "*nat",
        ":SHOAL-SERVICES - [0:0]",
        ":SHOAL-SVC-AAA - [0:0]",
        '-D PREROUTING -m comment --comment "shoal service portals" -j SHOAL-SERVICES',
        '-D OUTPUT -m comment --comment "shoal service portals" -j SHOAL-SERVICES',
        "-X SHOAL-SERVICES",
        "-X SHOAL-SVC-AAA",
        "COMMIT",
        ""])  # the mesh's chain and its jump are someone else's: untouched


def test_nothing_of_ours_is_nothing_to_do() -> None:
    assert removal(SAVE, "nat", lambda chain: chain == "SHOAL-NETPOL") is None
