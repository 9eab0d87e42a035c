"""The mesh's DNS responder (15053, UDP and TCP): Service names -> IPs.

    build_names(services, endpoints, domain) -> {fqdn: (ip, ...)}          pure
        <svc>.<ns>.svc.<domain>             ClusterIP, or a headless Service's
                                            ready endpoint IPs
        <hostname>.<svc>.<ns>.svc.<domain>  a ready endpoint with a hostname (pods
                                            with spec.hostname + spec.subdomain,
                                            as StatefulSets make)
    answer(query, names, search=..., domain=...) -> response | None       pure
        A: the name as asked, then with the querying pod's search path
        (<ns>.svc.<domain>, svc.<domain>, <domain>) for names with few dots;
        an in-cluster name (under <domain>) not found -> NXDOMAIN; other
        record types of a known name -> empty NOERROR; anything else -> None
        (forward upstream if one is configured, else REFUSED).

Wire format is dnspython's. The querying pod's namespace comes from its
source IP (``namespace_of``); unknown sources get no search path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from shoal.api.core.v1 import core_pb2
from shoal.informer import key_of

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "cluster.local"
TTL = 5
NDOTS = 5

Names = Mapping[str, tuple[str, ...]]


def build_names(services: Iterable[core_pb2.Service],
                endpoints: Mapping[str, core_pb2.Endpoints], *,
                domain: str = DEFAULT_DOMAIN) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for svc in services:
        if svc.spec.type == "ExternalName":
            continue
        base = f"{svc.metadata.name}.{svc.metadata.namespace}.svc.{domain}".lower()
        ip = svc.spec.cluster_ip
        ep = endpoints.get(key_of(svc))
        ready = [a for s in (ep.subsets if ep is not None else ()) for a in s.addresses if a.ip]
        if ip and ip != "None":
            out[base] = (ip,)
        elif ip == "None":
            out[base] = tuple(sorted({a.ip for a in ready}))
        else:
            continue
        if ip == "None":
            for a in ready:
                if a.hostname:
                    out[f"{a.hostname}.{base}".lower()] = (a.ip,)
    return out


def search_path(namespace: str | None, domain: str = DEFAULT_DOMAIN) -> list[str]:
    if not namespace:
        return []
    return [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]


def candidates(qname: str, search: Sequence[str]) -> list[str]:
    """Names to try, as a resolver with ``ndots:5`` would (pure)."""
    name = qname.rstrip(".").lower()
    expanded = [f"{name}.{s}" for s in search]
    if name.count(".") >= NDOTS:
        return [name, *expanded]
    return [*expanded, name]


def answer(query: dns.message.Message, names: Names, *, search: Sequence[str],
           domain: str = DEFAULT_DOMAIN) -> dns.message.Message | None:
    """The response to ``query`` from ``names``, or None to forward it (pure)."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    q = query.question[0]
    qname = q.name.to_text(omit_final_dot=True).lower()
    for cand in candidates(qname, search):
        if cand in names:
            if q.rdtype == dns.rdatatype.A and q.rdclass == dns.rdataclass.IN:
                owner = dns.name.from_text(cand)
                if cand != qname:  # the search path expanded it: say so with a CNAME
                    response.answer.append(dns.rrset.from_text(
                        q.name, TTL, "IN", "CNAME", owner.to_text()))
                if names[cand]:
                    response.answer.append(dns.rrset.from_text_list(
                        owner, TTL, "IN", "A", list(names[cand])))
            return response
    # Under the cluster domain, or a single label: not a name the internet knows.
    if qname == domain or qname.endswith("." + domain) or "." not in qname:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    return None


class DNSServer:
    """UDP and TCP on one port; bound in ``start()``."""

    def __init__(self, *, host: str, port: int, names: Callable[[], Names],
                 namespace_of: Callable[[str], str | None],
                 domain: str = DEFAULT_DOMAIN, upstream: str = "",
                 timeout: float = 2.0,
                 ready: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.host = host
        self.port = port
        self.names = names
        self.namespace_of = namespace_of
        self.domain = domain
        self.upstream = upstream
        self.timeout = timeout
        self.ready = ready  # False: the names are not known yet (answer SERVFAIL)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def resolve(self, wire: bytes, source_ip: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:  # a response, not a query: never answer it
            return None
        if self.ready is not None and not await self.ready():
            # Not NXDOMAIN: that would be cached as "no such name".
            unsynced = dns.message.make_response(query)
            unsynced.set_rcode(dns.rcode.SERVFAIL)
            return unsynced.to_wire()
        resp = answer(query, self.names(), domain=self.domain,
                      search=search_path(self.namespace_of(source_ip), self.domain))
        if resp is None:
            if self.upstream:
                # Only agents that forward pay for dnspython's query modules (1.2 MB).
                from dns import asyncquery

                try:
                    resp = await asyncquery.udp(query, self.upstream, timeout=self.timeout)
                except (dns.exception.DNSException, OSError) as e:
                    log.info("dns: upstream %s: %s", self.upstream, e)
                    resp = None
            if resp is None:
                resp = dns.message.make_response(query)
                resp.set_rcode(dns.rcode.REFUSED if not self.upstream
                               else dns.rcode.SERVFAIL)
        return resp.to_wire()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class _UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                async def reply() -> None:
                    out = await server.resolve(data, addr[0])
                    if out is not None and server._udp is not None:
                        server._udp.sendto(out, addr)
                task = loop.create_task(reply())
                task.add_done_callback(lambda t: t.exception())

        self._tcp = await asyncio.start_server(self._tcp_client, self.host, self.port,
                                               reuse_address=True)
        self.port = self._tcp.sockets[0].getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(
            _UDP, local_addr=(self.host, self.port), family=socket.AF_INET)
        self._udp = transport

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), timeout=10)
                (length,) = struct.unpack("!H", head)
                data = await reader.readexactly(length)
                out = await self.resolve(data, peer[0])
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError,
                asyncio.CancelledError):  # cancelled: shutting down (see proxy.py)
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

