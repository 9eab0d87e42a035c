"""``shoal-meshagent``: the per-node mesh agent.

    shoal-meshagent run --node-name N [--config /var/lib/shoal/nodeagent/node.conf]
        [--capture --dns-ip NODE_IP] [--pod-cidr 10.244.0.0/16]
        [--service-cidr 10.96.0.0/16] [--cluster-domain cluster.local]
        [--upstream-dns IP] [--metrics-listen 0.0.0.0:15020] [--zipkin-endpoint URL]
        [--trace-sampling PERCENT] [--access-log] [--event-loop uvloop|asyncio]
        [--outbound-traffic-policy ALLOW_ANY|REGISTRY_ONLY] [--no-egress-capture]
        [--mesh-host]   a mesh-only host: see meshagent.meshhost
    shoal-meshagent cleanup [--iptables BINARY]   remove the capture rules
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

from meshagent import capture
from meshagent.l7 import telemetry
from shoal import argtypes, errors, eventloop, logs
from shoal.signals import until_stopped


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal-meshagent", description="Shoal's mesh agent.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the mesh agent")
    r.add_argument("--node-name", default=socket.gethostname().lower())
    r.add_argument("--config", type=Path, default=Path("/var/lib/shoal/nodeagent/node.conf"),
                   help="client config: the node's, written by `shoal-nodeagent join`")
    r.add_argument("--listen-host", default="0.0.0.0")
    r.add_argument("--outbound-port", type=int, default=capture.OUTBOUND_PORT)
    r.add_argument("--inbound-port", type=int, default=capture.INBOUND_PORT)
    r.add_argument("--dns-port", type=int, default=capture.DNS_PORT)
    r.add_argument("--tunnel-port", type=int, default=capture.TUNNEL_PORT,
                   help="the mTLS tunnel's listener (peers always dial 15008, which the "
                   "capture rules redirect here)")
    r.add_argument("--trust-domain", default="cluster.local",
                   help="the mesh's SPIFFE trust domain (the apiserver's "
                   "--mesh-trust-domain)")
    r.add_argument("--mesh-root-namespace", default="istio-system",
                   help="where mesh-wide PeerAuthentication and AuthorizationPolicy live")
    r.add_argument("--metrics-listen", default="0.0.0.0:15020")
    r.add_argument("--admin-listen", default="0.0.0.0:15000",
                   help="the admin API for `shoal mesh` (TLS with the node's serving "
                   "certificate); empty: none")
    r.add_argument("--pod-cidr", default="10.244.0.0/16")
    r.add_argument("--service-cidr", default="10.96.0.0/16")
    r.add_argument("--cluster-domain", default="cluster.local")
    r.add_argument("--dns-ip", default="",
                   help="the node IP pods use as DNS server (capture its port 53)")
    r.add_argument("--upstream-dns", default="", help="forward other names here (default: "
                   "refuse them)")
    r.add_argument("--capture", action="store_true",
                   help="keep iptables capture rules in this network namespace")
    r.add_argument("--iptables", default="", help="iptables binary (default: detect)")
    r.add_argument("--keep-rules-on-exit", action="store_true")
    r.add_argument("--reconcile-interval", type=_seconds, default=5.0, metavar="SECONDS",
                   help="on iptables-legacy, how often the capture rules are read back "
                   "and drift (a flushed chain, a lost jump) repaired (default 5). On "
                   "nf_tables they are read back when the kernel says the ruleset "
                   "changed, and at least every 60 s; a change of the captured pods is "
                   "written at once")
    r.add_argument("--zipkin-endpoint", default="", metavar="URL",
                   help="send a span per delivered HTTP request to this Zipkin v2 "
                   "collector (http://HOST:PORT[/api/v2/spans]); empty: no tracing")
    r.add_argument("--trace-sampling", type=argtypes.percent, default=1.0,
                   metavar="PERCENT",
                   help="the share of new traces sampled, in percent (default 1, as "
                   "Istio's meshConfig tracing.sampling; a request that carries a "
                   "trace context keeps its decision)")
    r.add_argument("--event-loop", choices=eventloop.LOOPS, default=eventloop.DEFAULT,
                   help="the event loop the agent runs on (default uvloop)")
    r.add_argument("--access-log", action="store_true",
                   help="log one JSON line per HTTP request (logger meshagent.access, "
                   "Envoy's fields); off by default, as Istio's default profile")
    r.add_argument("--outbound-traffic-policy", choices=["ALLOW_ANY", "REGISTRY_ONLY"],
                   default="ALLOW_ANY",
                   help="pods' connections out of the cluster: ALLOW_ANY passes them "
                   "through, REGISTRY_ONLY allows only ServiceEntry destinations (a "
                   "namespace's label shoal.dev/outbound-traffic-policy overrides it)")
    r.add_argument("--mesh-host", action="store_true",
                   help="a mesh-only host (no node agent, no pods): its workloads are the "
                   "WorkloadEntries labelled shoal.dev/mesh-host: NODE_NAME, its capture "
                   "takes this host's own processes (run them as another user than the "
                   "agent); --config is the client config its `join` wrote")
    r.add_argument("--no-egress-capture", action="store_true",
                   help="capture pods' TCP only to the pod and service CIDRs (the "
                   "outbound traffic policy then cannot act)")
    r.add_argument("--log-level", default="info")
    r.add_argument("--log-format", choices=["json", "text"], default="json")
    c = sub.add_parser("cleanup", help="remove the capture rules from this network namespace")
    c.add_argument("--iptables", default="")
    return p


_seconds = argtypes.number_between(0.1, 3600, what="a number of seconds", unit="seconds")


def _run(ns: argparse.Namespace) -> int:
    from meshagent.daemon import MeshConfig, run

    logs.setup(level=ns.log_level, fmt=ns.log_format)
    try:
        config = MeshConfig(
            node_name=ns.node_name, client_config=ns.config, listen_host=ns.listen_host,
            outbound_port=ns.outbound_port, inbound_port=ns.inbound_port,
            dns_port=ns.dns_port, tunnel_port=ns.tunnel_port,
            trust_domain=ns.trust_domain, root_namespace=ns.mesh_root_namespace,
            metrics_listen=ns.metrics_listen, admin_listen=ns.admin_listen,
            pod_cidr=ns.pod_cidr,
            service_cidr=ns.service_cidr, cluster_domain=ns.cluster_domain,
            dns_ip=ns.dns_ip, upstream_dns=ns.upstream_dns, capture=ns.capture,
            iptables=ns.iptables, keep_rules_on_exit=ns.keep_rules_on_exit,
            reconcile_interval=ns.reconcile_interval, zipkin_endpoint=ns.zipkin_endpoint,
            trace_sampling=ns.trace_sampling, access_log=ns.access_log,
            outbound_traffic_policy=ns.outbound_traffic_policy,
            egress_capture=not ns.no_egress_capture, mesh_host=ns.mesh_host)
        if ns.zipkin_endpoint:
            telemetry.parse_endpoint(ns.zipkin_endpoint)  # validates, before anything starts
        capture.CaptureConfig(pod_cidr=ns.pod_cidr, service_cidr=ns.service_cidr,
                              dns_ip=ns.dns_ip)  # validates, before anything starts
    except errors.ShoalError as e:
        print(f"shoal-meshagent: {e}", file=sys.stderr)
        return 2

    try:
        eventloop.run(until_stopped(run(config)), ns.event_loop)
    except (errors.ShoalError, OSError) as e:
        print(f"shoal-meshagent: {e}", file=sys.stderr)
        return 1
    return 0


async def _cleanup(binary: str) -> None:
    ipt = capture.IptablesNat(binary=binary or await capture.detect_backend())
    text = capture.render_cleanup(await ipt.save())
    if text is not None:
        await ipt.restore(text)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "run":
        return _run(ns)
    try:
        asyncio.run(_cleanup(ns.iptables))
    except errors.ShoalError as e:
        print(f"shoal-meshagent: cleanup failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
