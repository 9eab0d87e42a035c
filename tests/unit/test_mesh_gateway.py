"""The ingress gateway's decisions (meshagent.gateway): which Gateways and
servers it serves, host matching with wildcards, which VirtualService a
request takes, and the headers it sends on -- no sockets."""

from __future__ import annotations

import random
import ssl
import subprocess
import sys

import pytest
import yaml
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from meshagent import gateway as gw
from meshagent.l7 import routes, telemetry
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.api.traffic.v1 import traffic_pb2 as pb

LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}


def _gateway(text: str, *, name: str = "gw", namespace: str = "istio-system",
             created: int = 0) -> pb.Gateway:
    g = pb.Gateway()
    json_format.ParseDict({"spec": yaml.safe_load(text)}, g)
    g.metadata.name, g.metadata.namespace = name, namespace
    g.metadata.creation_timestamp.seconds = created
    return g


def _vs(text: str, *, name: str = "vs", namespace: str = "bookinfo") -> pb.VirtualService:
    vs = pb.VirtualService()
    json_format.ParseDict({"spec": yaml.safe_load(text)}, vs)
    vs.metadata.name, vs.metadata.namespace = name, namespace
    return vs


def _svc(name: str, namespace: str = "bookinfo", port: int = 9080) -> core_pb2.Service:
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, namespace
    s.spec.ports.add(name="http", port=port)
    return s


@pytest.mark.parametrize(("pattern", "host", "want"), [
    ("*", "anything.example.com", True),
    ("bookinfo.example.com", "bookinfo.example.com", True),
    ("bookinfo.example.com", "BookInfo.Example.com", True),
    ("bookinfo.example.com", "other.example.com", False),
    ("*.example.com", "bookinfo.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "bookinfo.example.org", False),
    ("*.example.com", "xexample.com", False),
])
def test_host_matching_with_wildcards(pattern: str, host: str, want: bool) -> None:
    assert gw.host_matches(pattern, host) is want


@pytest.mark.parametrize(("authority", "want"), [
    ("bookinfo.example.com", "bookinfo.example.com"),
    ("bookinfo.example.com:8443", "bookinfo.example.com"),
    ("10.0.0.1:80", "10.0.0.1"),
    ("[::1]:443", "[::1]"),
])
def test_the_port_is_not_part_of_the_host(authority: str, want: str) -> None:
    assert gw.bare_host(authority) == want


TWO_SERVERS = """
selector: {istio: ingressgateway}
servers:
- port: {number: 8080, name: http, protocol: HTTP}
  hosts: ["*"]
- port: {number: 8443, name: https, protocol: HTTPS}
  hosts: ["bookinfo/bookinfo.example.com", "*.example.com"]
  tls: {mode: SIMPLE, credentialName: bookinfo-cert}
"""


def test_a_gateway_selecting_our_labels_gives_one_listener_per_server_port() -> None:
    p = gw.plan([_gateway(TWO_SERVERS)], labels=LABELS)
    assert p.gateways == ("istio-system/gw",)
    assert p.rejected == ()
    assert {port: lst.protocol for port, lst in p.listeners.items()} == {
        8080: "HTTP", 8443: "HTTPS"}
    https = p.listeners[8443]
    assert https.credentials == (gw.Tls("bookinfo-cert", "SIMPLE"),)
    assert https.servers[0].hosts == (gw.ServerHost("bookinfo", "bookinfo.example.com"),
                                      gw.ServerHost("*", "*.example.com"))


@pytest.mark.parametrize(("selector", "selected"), [
    ({"istio": "ingressgateway"}, True),
    ({}, True),  # an empty selector picks every gateway workload
    ({"istio": "egressgateway"}, False),
    ({"istio": "ingressgateway", "zone": "b"}, False),
])
def test_the_selector_must_match_the_gateway_pods_labels(
        selector: dict[str, str], selected: bool) -> None:
    g = _gateway("servers: [{port: {number: 80, protocol: HTTP}, hosts: ['*']}]")
    g.spec.selector.update(selector)
    p = gw.plan([g], labels=LABELS)
    assert (80 in p.listeners) is selected
    assert p.gateways == (("istio-system/gw",) if selected else ())


@pytest.mark.parametrize(("server", "why"), [
    ("{port: {number: 443, protocol: HTTPS}, hosts: ['*'], tls: {mode: SIMPLE}}",
     "credentialName"),
    ("{port: {number: 443, protocol: HTTPS}, hosts: ['*'], "
     "tls: {mode: PASSTHROUGH, credentialName: c}}", "TLS mode PASSTHROUGH"),
    ("{port: {number: 443, protocol: HTTPS}, hosts: ['*']}", "TLS mode unset"),
    ("{port: {number: 9000, protocol: MONGO}, hosts: ['*']}", "protocol 'MONGO'"),
    ("{port: {number: 80, protocol: HTTP}, hosts: []}", "no hosts"),
])
def test_a_server_we_cannot_serve_is_left_out_alone_and_reported(server: str,
                                                                 why: str) -> None:
    g = _gateway(f"selector: {{istio: ingressgateway}}\nservers:\n- {server}\n"
                 "- {port: {number: 8080, protocol: HTTP}, hosts: ['*']}")
    p = gw.plan([g], labels=LABELS)
    assert list(p.listeners) == [8080]
    assert len(p.rejected) == 1
    assert p.rejected[0].startswith("Gateway istio-system/gw servers[0]")
    assert why in p.rejected[0]


def test_a_port_held_by_another_protocol_goes_to_the_older_gateway() -> None:
    old = _gateway("servers: [{port: {number: 8080, protocol: HTTP}, hosts: ['a.example.com']}]",
                   name="old", created=1)
    new = _gateway("servers: [{port: {number: 8080, protocol: HTTPS}, hosts: ['*'], "
                   "tls: {mode: SIMPLE, credentialName: c}}, "
                   "{port: {number: 8081, protocol: HTTP}, hosts: ['b.example.com']}]",
                   name="new", created=2)
    p = gw.plan([new, old], labels=LABELS)
    assert p.listeners[8080].protocol == "HTTP"
    assert [s.gateway for s in p.listeners[8080].servers] == ["istio-system/old"]
    assert 8081 in p.listeners
    assert p.rejected == ("Gateway istio-system/new servers[0]: port 8080 already serves "
                          "HTTP (Gateway istio-system/old servers[0])",)


def test_grpc_and_http2_servers_share_a_plaintext_http_listener() -> None:
    """Istio's GRPC and HTTP2 server protocols are HTTP listeners that also take h2c:
    such servers and an HTTP one on the same port make one listener, no conflict."""
    g = _gateway("servers: [{port: {number: 8080, protocol: GRPC}, hosts: ['a.example.com']}, "
                 "{port: {number: 8080, protocol: HTTP}, hosts: ['b.example.com']}, "
                 "{port: {number: 8081, protocol: http2}, hosts: ['*']}]")
    p = gw.plan([g], labels=LABELS)
    assert p.rejected == ()
    assert {port: lst.protocol for port, lst in p.listeners.items()} == {
        8080: "HTTP", 8081: "HTTP"}
    assert len(p.listeners[8080].servers) == 2


SNI = """
selector: {istio: ingressgateway}
servers:
- port: {number: 443, protocol: HTTPS}
  hosts: ["*.example.com"]
  tls: {mode: SIMPLE, credentialName: wildcard}
- port: {number: 443, protocol: HTTPS}
  hosts: ["bookinfo.example.com"]
  tls: {mode: SIMPLE, credentialName: bookinfo}
- port: {number: 443, protocol: HTTPS}
  hosts: ["*"]
  tls: {mode: SIMPLE, credentialName: fallback}
"""


@pytest.mark.parametrize(("host", "credential"), [
    ("bookinfo.example.com", "bookinfo"),  # exact beats a wildcard listed before it
    ("shop.example.com", "wildcard"),  # *.example.com beats *
    ("other.org", "fallback"),
])
def test_the_most_specific_server_host_wins(host: str, credential: str) -> None:
    lst = gw.plan([_gateway(SNI)], labels=LABELS).listeners[443]
    found = lst.server_for(host)
    assert found is not None
    assert found[0].credential == credential


def test_no_server_for_a_host_none_lists() -> None:
    g = _gateway("servers: [{port: {number: 80, protocol: HTTP}, hosts: ['a.example.com']}]")
    assert gw.plan([g], labels=LABELS).listeners[80].server_for("b.example.com") is None


# -- which VirtualService and route a request takes --------------------------------------


def _gateway_with(*, vss: list[pb.VirtualService], gateways: list[pb.Gateway]
                  ) -> gw.Gateway:
    me = gw.Workload(namespace="istio-system", name="istio-ingressgateway",
                     service_account="istio-ingressgateway", ip="10.244.0.9", labels=LABELS)
    g = gw.Gateway(me=me, trust_domain="cluster.local", listen_host="127.0.0.1", pool=None,
                   registry=CollectorRegistry(), rng=random.Random(1))
    g.update(gateways=gateways, virtual_services=vss, destination_rules=[],
             services=[_svc("productpage"), _svc("reviews")], endpoints=[], pods=[],
             secrets={})
    return g


BOUND = """
hosts: ["bookinfo.example.com"]
gateways: ["istio-system/gw"]
http:
- match: [{uri: {prefix: /reviews}}]
  route: [{destination: {host: reviews, port: {number: 9080}}}]
- route: [{destination: {host: productpage, port: {number: 9080}}}]
"""


def _req(host: str, path: str = "/", *, port: int = 80,
         scheme: str = "http") -> routes.Request:
    return routes.Request(method="GET", path=path, authority=host, headers={"host": host},
                          port=port, source_labels=LABELS, source_namespace="istio-system",
                          scheme=scheme)


def _dest(action: routes.Action) -> routes.Destination | None:
    return action.destinations[0] if action.destinations else None


@pytest.mark.parametrize(("host", "path", "want"), [
    ("bookinfo.example.com", "/productpage", "productpage.bookinfo.svc.cluster.local"),
    ("bookinfo.example.com:8080", "/reviews/0", "reviews.bookinfo.svc.cluster.local"),
    ("BOOKINFO.example.com", "/", "productpage.bookinfo.svc.cluster.local"),
    ("other.example.com", "/", None),  # no VirtualService for the host: 404 NR
])
def test_requests_follow_the_virtual_service_bound_to_the_gateway(
        host: str, path: str, want: str | None) -> None:
    g = _gateway_with(vss=[_vs(BOUND)], gateways=[_gateway(
        "selector: {istio: ingressgateway}\nservers: "
        "[{port: {number: 8080, protocol: HTTP}, hosts: ['*.example.com']}]")])
    action = g.decide(_req(host, path, port=8080), r=0.5)
    dest = _dest(action)
    assert (dest.host if dest else None) == want, action.origin


def test_a_mesh_only_virtual_service_does_not_apply_at_the_gateway() -> None:
    mesh_only = _vs("hosts: [bookinfo.example.com]\n"
                    "http: [{route: [{destination: {host: productpage}}]}]")
    g = _gateway_with(vss=[mesh_only], gateways=[_gateway(
        "servers: [{port: {number: 80, protocol: HTTP}, hosts: ['*']}]")])
    action = g.decide(_req("bookinfo.example.com"), r=0.5)
    assert _dest(action) is None and action.redirect is None
    assert "no VirtualService bound to istio-system/gw" in action.origin


def test_a_server_host_namespace_limits_which_virtual_services_bind() -> None:
    g = _gateway_with(vss=[_vs(BOUND, namespace="bookinfo")], gateways=[_gateway(
        "servers: [{port: {number: 80, protocol: HTTP}, hosts: ['other-ns/*']}]")])
    assert _dest(g.decide(_req("bookinfo.example.com"), r=0.5)) is None


def test_weights_split_requests_at_the_gateway() -> None:
    split = _vs("""
hosts: ["bookinfo.example.com"]
gateways: ["istio-system/gw"]
http:
- route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews, subset: v2}, weight: 10}
""")
    g = _gateway_with(vss=[split], gateways=[_gateway(
        "servers: [{port: {number: 80, protocol: HTTP}, hosts: ['*']}]")])
    subsets = [_dest(g.decide(_req("bookinfo.example.com"), r=r / 100)) for r in range(100)]
    assert [d.subset if d else None for d in subsets].count("v2") == 10


@pytest.mark.parametrize(("scheme", "redirected"), [("http", True), ("https", False)])
def test_an_https_redirect_server_sends_plain_http_to_https(scheme: str,
                                                            redirected: bool) -> None:
    g = _gateway_with(vss=[_vs(BOUND)], gateways=[_gateway(
        "servers: [{port: {number: 80, protocol: HTTP}, hosts: ['*'], "
        "tls: {httpsRedirect: true}}]")])
    action = g.decide(_req("bookinfo.example.com", "/productpage?x=1", scheme=scheme), r=0.5)
    if redirected:
        assert action.redirect is not None
        assert action.redirect.location(scheme=scheme, authority="bookinfo.example.com",
                                         path="/productpage?x=1") == \
            "https://bookinfo.example.com/productpage?x=1"
    else:
        assert action.redirect is None and _dest(action) is not None


# -- what goes upstream ---------------------------------------------------------------------


def test_forwarded_headers_carry_the_gateways_span_and_the_client_address() -> None:
    headers = [("Host", "bookinfo.example.com"), ("User-Agent", "curl"),
               ("traceparent", "00-0123456789abcdef0123456789abcdef-00000000000000aa-01"),
               ("b3", "0123456789abcdef0123456789abcdef-00000000000000aa-1"),
               ("X-Forwarded-For", "192.0.2.1")]
    incoming = telemetry.TraceContext.from_headers(dict(headers))
    assert incoming is not None
    span = incoming.child()
    out = gw.forwarded_headers(headers, client_ip="10.77.0.1", ctx=span)
    got = dict((n.lower(), v) for n, v in out)
    assert len(got) == len(out)  # one of each: the incoming context is replaced
    assert got["host"] == "bookinfo.example.com" and got["user-agent"] == "curl"
    assert got["traceparent"] == f"00-{incoming.trace_id}-{span.span_id}-01"
    assert got["x-b3-traceid"] == incoming.trace_id
    assert got["x-b3-parentspanid"] == incoming.span_id
    assert "b3" not in got
    assert got["x-forwarded-for"] == "192.0.2.1, 10.77.0.1"


def test_pods_by_ip_for_the_engine_none_local_and_running_ones_first() -> None:
    def pod(name: str, ip: str, phase: str, labels: dict[str, str]) -> core_pb2.Pod:
        p = core_pb2.Pod()
        p.metadata.name, p.metadata.namespace = name, "bookinfo"
        p.metadata.labels.update(labels)
        p.spec.service_account_name = "bookinfo-reviews"
        p.status.pod_ip, p.status.phase = ip, phase
        return p
    pods = gw.engine_pods([pod("old", "10.244.1.5", "Succeeded", {}),
                           pod("reviews-v2", "10.244.1.5", "Running", {"app": "reviews"}),
                           pod("done", "10.244.1.5", "Failed", {}),
                           pod("outside", "10.244.1.6", "Running",
                               {"shoal.dev/mesh": "disabled"})], trust_domain="cluster.local")
    r = pods["10.244.1.5"]
    assert (r.name, r.workload, r.node_local, r.meshed) == ("reviews-v2", "reviews", False, True)
    assert r.principal == "cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    assert not pods["10.244.1.6"].meshed


def test_a_mutual_server_keeps_its_mode_and_subject_alt_names() -> None:
    g = _gateway("selector: {istio: ingressgateway}\nservers:\n"
                 "- {port: {number: 443, protocol: HTTPS}, hosts: ['*'], tls: {mode: MUTUAL, "
                 "credentialName: c, subjectAltNames: [spiffe://example.org/client]}}")
    p = gw.plan([g], labels=LABELS)
    assert p.rejected == ()
    assert p.listeners[443].credentials == (
        gw.Tls("c", "MUTUAL", ("spiffe://example.org/client",)),)


def test_a_mutual_secret_without_a_ca_is_refused_by_name() -> None:
    from apiserver.pki import CertificateAuthority, cert_pem, key_pem, new_key
    ca = CertificateAuthority.create("t")
    key = new_key()
    s = core_pb2.Secret()
    s.metadata.name, s.metadata.namespace = "bookinfo-cert", "istio-system"
    s.data["tls.crt"] = cert_pem(ca.issue(key.public_key(), common_name="h", server=True))
    s.data["tls.key"] = key_pem(key)
    gw.credential_context(s)  # SIMPLE needs no CA
    with pytest.raises(errors.Invalid, match="bookinfo-cert: TLS mode MUTUAL needs ca.crt"):
        gw.credential_context(s, mode="MUTUAL")
    cacert = core_pb2.Secret()
    cacert.data["ca.crt"] = cert_pem(ca.cert)
    ctx = gw.credential_context(s, mode="MUTUAL", ca_secret=cacert)  # <name>-cacert's
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_a_tls_secret_without_a_key_is_refused_by_name() -> None:
    s = core_pb2.Secret()
    s.metadata.name, s.metadata.namespace = "bookinfo-cert", "istio-system"
    s.data["tls.crt"] = b"-----BEGIN CERTIFICATE-----\n"
    with pytest.raises(errors.Invalid, match="istio-system/bookinfo-cert: needs tls.crt"):
        gw.credential_context(s)


def test_the_gateway_process_does_not_load_cryptography() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, meshagent.gateway; "
         "print(sorted(m for m in sys.modules if m.startswith('cryptography')))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
