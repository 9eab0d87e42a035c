"""The mesh DNS responder over real UDP and TCP sockets on loopback."""

from __future__ import annotations

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from meshagent.dns import DNSServer

pytestmark = pytest.mark.asyncio


async def test_udp_and_tcp_answers_with_the_source_pods_namespace() -> None:
    names = {"web.shop.svc.cluster.local": ("10.96.0.10",)}
    server = DNSServer(host="127.0.0.1", port=0, names=lambda: names,
                       namespace_of=lambda ip: "shop" if ip == "127.0.0.1" else None)
    await server.start()
    try:
        for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
            resp = await ask(dns.message.make_query("web", "A"), "127.0.0.1",
                             port=server.port, timeout=5)
            assert [r.address for rr in resp.answer if rr.rdtype == 1 for r in rr] == [
                "10.96.0.10"]
        nx = await dns.asyncquery.udp(dns.message.make_query("x.shop.svc.cluster.local", "A"),
                                      "127.0.0.1", port=server.port, timeout=5)
        assert nx.rcode() == dns.rcode.NXDOMAIN
        # No upstream configured (tests, lab): outside names are refused, not forwarded.
        out = await dns.asyncquery.udp(dns.message.make_query("example.com", "A"),
                                       "127.0.0.1", port=server.port, timeout=5)
        assert out.rcode() == dns.rcode.REFUSED
    finally:
        await server.close()
