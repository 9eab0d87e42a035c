"""``shoal-apiserver``: initialise a cluster's PKI, or serve the API.

    shoal-apiserver init  --data-dir D [--server-address HOST:PORT ...] [--san NAME ...]
    shoal-apiserver serve --data-dir D [--storage etcd --etcd-servers H:P,...]
                          [--listen 0.0.0.0:6443] [--metrics-listen 127.0.0.1:9090]
                          [--encryption-provider-config FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from pathlib import Path

from apiserver import pki
from apiserver.controllers.base import ControllerSettings
from apiserver.ratelimit import DEFAULT_EXEMPT_GROUPS, RateLimits
from apiserver.server import MAX_RECEIVE_BYTES, ServerConfig, serve
from apiserver.serviceaccounts import DEFAULT_ISSUER
from shoal import errors, logs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal-apiserver", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the cluster CA, certificates and admin config")
    init.add_argument("--data-dir", required=True, type=Path)
    init.add_argument("--server-address", action="append", default=[],
                      help="HOST:PORT clients use to reach this apiserver (repeatable)")
    init.add_argument("--san", action="append", default=[],
                      help="extra DNS name or IP for the serving certificate (repeatable)")
    srv = sub.add_parser("serve", help="serve the resource API")
    srv.add_argument("--data-dir", required=True, type=Path)
    srv.add_argument("--listen", default="127.0.0.1:6443")
    srv.add_argument("--storage", choices=["sqlite", "etcd"], default="sqlite")
    srv.add_argument("--etcd-servers", default="",
                     help="comma-separated etcd client endpoints, e.g. 127.0.0.1:2379")
    srv.add_argument("--sqlite-path", default="")
    srv.add_argument("--metrics-listen", default="127.0.0.1:9090")
    srv.add_argument("--join-listen", default="127.0.0.1:6444",
                     help="TLS port for `shoal-nodeagent join` (no client certificate); "
                          "'' turns it off")
    srv.add_argument("--cluster-cidr", default="10.244.0.0/16",
                     help="pod addresses of the whole cluster; each node gets a block "
                          "('' turns node IPAM off)")
    srv.add_argument("--node-cidr-mask-size", type=int, default=24)
    srv.add_argument("--controllers", default="all",
                     help="comma-separated in-process controllers to run ('all', or '' "
                          "for none)")
    srv.add_argument("--node-monitor-grace-period", type=float, default=40.0,
                     help="seconds without a Lease renewal before a node is NotReady")
    srv.add_argument("--pod-eviction-timeout", type=float, default=300.0,
                     help="seconds a NotReady node's pods are tolerated before eviction")
    srv.add_argument("--service-cluster-ip-range", default="10.96.0.0/16")
    srv.add_argument("--horizontal-pod-autoscaler-sync-period", type=float, default=15.0,
                     help="seconds between evaluations of each HorizontalPodAutoscaler")
    srv.add_argument("--advertise", action="append", default=[],
                     help="HOST:PORT nodes should use for this apiserver (repeatable)")
    srv.add_argument("--bookmark-interval", type=float, default=60.0,
                     help="seconds between BOOKMARK events on every watch (Kubernetes' "
                          "apiserver sends one about every minute); each round wakes "
                          "every watcher at once")
    srv.add_argument("--mesh-trust-domain", default="cluster.local",
                     help="SPIFFE trust domain of workload certificates")
    srv.add_argument("--workload-cert-ttl", type=float, default=24 * 3600.0,
                     help="lifetime of workload certificates, seconds (default 24 h)")
    srv.add_argument("--mesh-admin-port", type=int, default=15000,
                     help="the port every node's meshagent serves its admin API on "
                          "(shoal mesh status asks it through the apiserver)")
    srv.add_argument("--encryption-provider-config", default="",
                     help="Kubernetes' EncryptionConfiguration file: encrypt these "
                          "resources (e.g. secrets) at rest with AES-GCM")
    srv.add_argument("--service-account-issuer", default=DEFAULT_ISSUER,
                     help="the `iss` of service-account tokens this server signs")
    srv.add_argument("--audit-log-path", default="",
                     help="write one JSON audit event per request to this file "
                          "('-' for stdout; default: no audit log)")
    srv.add_argument("--audit-policy-file", default="",
                     help="audit.k8s.io/v1 Policy: which requests are logged at which "
                          "level (default: everything at Metadata)")
    srv.add_argument("--etcd-compaction-interval", type=float, default=300.0,
                     help="seconds of storage history kept: the leading apiserver compacts "
                          "older revisions (0: never)")
    srv.add_argument("--etcd-defrag-interval", type=float, default=0.0,
                     help="seconds between defragmentations of each etcd member, one at a "
                          "time, by the leading apiserver (0: never)")
    srv.add_argument("--etcd-defrag-window", default="",
                     help="off-peak UTC window for defragmentation, HH:MM-HH:MM")
    srv.add_argument("--max-request-bytes", type=int, default=MAX_RECEIVE_BYTES,
                     help="largest request message accepted, bytes (default 3 MiB; "
                          "an object may take at most 1.5 MiB in storage)")
    srv.add_argument("--allowed-registries", default="",
                     help="comma-separated image registries (or repository prefixes) pods "
                          "may use, e.g. docker.io,10.77.0.1:5000 (default: any)")
    srv.add_argument("--rate-limit-qps", type=float, default=RateLimits.qps,
                     help="requests a second each user may make on average (0: no "
                          "per-user rate limits)")
    srv.add_argument("--rate-limit-burst", type=int, default=RateLimits.burst,
                     help="requests a user may make at once before the rate applies")
    srv.add_argument("--rate-limit-node-qps", type=float, default=RateLimits.node_qps,
                     help="the same for each node (group system:nodes)")
    srv.add_argument("--rate-limit-node-burst", type=int, default=RateLimits.node_burst)
    srv.add_argument("--rate-limit-exempt-groups", default=",".join(DEFAULT_EXEMPT_GROUPS),
                     help="comma-separated groups never rate limited")
    srv.add_argument("--leader-elect-lease-duration", type=float, default=15.0,
                     help="seconds the controller Lease is held without renewal before "
                          "another apiserver may take it")
    srv.add_argument("--leader-elect-renew-deadline", type=float, default=10.0)
    srv.add_argument("--leader-elect-retry-period", type=float, default=2.0)
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--log-format", choices=["json", "text"], default="json")
    return p


def _endpoints(text: str) -> tuple[str, ...]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        out.append(item.split("://", 1)[-1])
    return tuple(out)


def _tune_gc() -> None:
    """The watch cache holds many long-lived objects; a full collection scanning them
    on every burst of short-lived messages costs watch latency. Collect young
    objects less often (the cache itself is frozen once loaded, see WatchCache)."""
    gc.set_threshold(50_000, 20, 20)


async def _serve(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.command == "init":
        addresses = ns.server_address or ["127.0.0.1:6443"]
        result = pki.init(ns.data_dir, server_addresses=addresses, extra_sans=ns.san)
        made = ", ".join(result.created) or "nothing (already initialised)"
        print(f"created: {made}")
        print(f"admin client config: {result.admin_config}")
        print(f"CA cert hash: {pki.CertificateAuthority.load(result.pki_dir).cert_hash()}")
        return 0
    logs.setup(level=ns.log_level, fmt=ns.log_format)
    if not (ns.data_dir / "pki" / "server.crt").exists():
        print(f"shoal-apiserver: no certificates in {ns.data_dir}/pki; run "
              f"`shoal-apiserver init --data-dir {ns.data_dir}` first", file=sys.stderr)
        return 2
    config = ServerConfig(
        data_dir=ns.data_dir, listen=ns.listen, storage=ns.storage,
        etcd_servers=_endpoints(ns.etcd_servers), sqlite_path=ns.sqlite_path,
        metrics_listen=ns.metrics_listen, bookmark_interval=ns.bookmark_interval,
        join_listen=ns.join_listen, advertise=tuple(ns.advertise),
        cluster_cidr=ns.cluster_cidr, node_cidr_mask=ns.node_cidr_mask_size,
        mesh_trust_domain=ns.mesh_trust_domain, workload_cert_lifetime=ns.workload_cert_ttl,
        mesh_admin_port=ns.mesh_admin_port,
        audit_log_path=ns.audit_log_path, audit_policy_file=ns.audit_policy_file,
        encryption_provider_config=ns.encryption_provider_config,
        service_account_issuer=ns.service_account_issuer,
        etcd_compaction_interval=ns.etcd_compaction_interval,
        etcd_defrag_interval=ns.etcd_defrag_interval, etcd_defrag_window=ns.etcd_defrag_window,
        max_request_bytes=ns.max_request_bytes,
        allowed_registries=tuple(r.strip() for r in ns.allowed_registries.split(",")
                                 if r.strip()),
        rate_limits=RateLimits(
            qps=ns.rate_limit_qps, burst=ns.rate_limit_burst, node_qps=ns.rate_limit_node_qps,
            node_burst=ns.rate_limit_node_burst,
            exempt_groups=tuple(g.strip() for g in ns.rate_limit_exempt_groups.split(",")
                                if g.strip())),
        leader_lease=(ns.leader_elect_lease_duration, ns.leader_elect_renew_deadline,
                      ns.leader_elect_retry_period),
        controllers=tuple(c.strip() for c in ns.controllers.split(",") if c.strip()),
        controller_settings=ControllerSettings(
            node_monitor_grace_period=ns.node_monitor_grace_period,
            pod_eviction_timeout=ns.pod_eviction_timeout,
            service_cluster_ip_range=ns.service_cluster_ip_range,
            hpa_sync_period=ns.horizontal_pod_autoscaler_sync_period))
    _tune_gc()
    try:
        asyncio.run(_serve(config))
    except errors.ShoalError as e:
        print(f"shoal-apiserver: {e}", file=sys.stderr)
        return 1
    except ExceptionGroup as group:
        # A part of the running server failed (e.g. the watch cache could not load
        # a Secret no configured encryption key decrypts): say what, not a traceback.
        matched, _ = group.split(errors.ShoalError)
        if matched is None:
            raise
        for failure in _leaves(matched):
            print(f"shoal-apiserver: {failure}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[errors.ShoalError]) -> list[errors.ShoalError]:
    out: list[errors.ShoalError] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


if __name__ == "__main__":
    sys.exit(main())
