"""The mesh data path on the lab, side by side (issue 6): direct pod to pod,
through two meshagents, and through an HAProxy mTLS pair. With ``--protocol
http`` (issue 7): HTTP/1.1 through the agents' L7 path, against HAProxy in
``mode http``.

    python bench/mesh_bench.py [--protocol tcp|http] [--runs 3] [--duration 20]
        [--warmup 3] [--rate 1000] [--connections 16] [--size 1024]
        [--lab-dir /tmp/shoal-bench-lab] [--json FILE] [--profile]

Needs root and Debian's ``haproxy`` (``apt-get install haproxy``). The script
takes ``/tmp/shoal-e2e.lock`` itself for the whole run (do not wrap it in
``flock``), brings up its own ``shoal lab up --nodes 3 --mesh --mesh-profile
default`` (``--mesh-profile``) and takes it down (``--purge``) at the end, also on
an error or Ctrl-C; the haproxy, echo and load processes it starts are stopped by
their PIDs.

Pods (namespace ``mesh-bench``; the containers only ``sleep``; the echo server
and the load generator, ``bench/meshload.py``, run with this Python inside the
pods' network namespaces, so the client's source address is its pod IP):

    plain-client  node-1  shoal.dev/mesh: disabled      plain-server  node-2  (disabled)
    mesh-client   node-1  captured                      mesh-server   node-2  captured

Modes, each sending 1 KB requests that are echoed back:

    direct   plain-client -> plain-server:9000
    mesh     mesh-client -> mesh-server:9000, captured: node-1 meshagent (15001) -> mTLS
             HTTP/2 tunnel -> node-2 meshagent (15008) -> mesh-server
    haproxy  plain-client -> haproxy A (node-1 netns, plain TCP in) -> TLS 1.3 with a
             client certificate -> haproxy B (node-2 netns, verifies it against the
             bench's CA) -> plain TCP -> plain-server:9000

``--protocol http``: the echo servers are HTTP/1.1 (``meshload.py serve --http``,
the body echoed) and the load is keep-alive ``POST``s of ``--size`` bytes
(``meshload.py load --http``), one request in flight per connection. Services
``plain-server`` and ``mesh-server`` expose port 9000 named ``http``, so the
agents take the L7 path for ``mesh-server``:

    direct   plain-client -> ClusterIP plain-server:9000 (kube-proxy) -> plain-server
    mesh     mesh-client -> ClusterIP mesh-server:9000, captured: node-1 meshagent's L7
             engine (route, cluster, pooled upstream connection) -> mTLS tunnel stream
             -> node-2 meshagent's L7 server side (policy, telemetry) -> mesh-server
    haproxy  plain-client -> haproxy A (mode http) -> TLS 1.3 with a client
             certificate -> haproxy B (mode http) -> plain-server:9000

A mesh run must add, on node-1, ``istio_requests_total{reporter="source"}`` and,
on node-2, ``{reporter="destination"}``, one per request sent (warmup included),
all code 200, and no L4 connection record (``istio_tcp_connections_opened_total``)
on either agent; direct and haproxy runs must add nothing to either agent.

Runs are interleaved (direct, mesh, haproxy, direct, ...). Each run: a fresh
load-generator process, ``--warmup`` seconds, then ``--duration`` measured
seconds (see ``bench/meshload.py`` for the open-loop timetable). Around every run
the meshagents' metrics are read: a mesh run must add mutual_tls connections on
both agents, direct and haproxy runs must add no connection at all to either
agent. CPU of the proxies is utime+stime from /proc/PID/stat over the measured
window; RSS is VmRSS at the end. A run whose achieved rate is under 95 % of the
target, or that lost or garbled requests, is left out of the medians and said so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoal import config as configmod  # noqa: E402
from shoal.api.core.v1 import core_pb2  # noqa: E402
from shoal.client import Client  # noqa: E402
from shoal.lab.state import StateFile  # noqa: E402
from shoal.lab.topology import plan  # noqa: E402
from shoal.testing import podnet  # noqa: E402
from shoal.testing.metrics import metric_total, scrape  # noqa: E402
from shoal.testing.waiting import wait_for  # noqa: E402

LOCK = Path("/tmp/shoal-e2e.lock")
NS = "mesh-bench"
IMAGE = "docker.io/library/busybox:1.36"
ECHO_PORT = 9000
HAPROXY_A_PORT = 17001
HAPROXY_B_PORT = 17443
MODES = ("direct", "mesh", "haproxy")
LOAD = ROOT / "bench" / "meshload.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, flush=True)


# -- processes -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for pid {pid}")


def memory_mb(pid: int) -> dict[str, float]:
    """RSS split as smaps_rollup tells it: private pages (USS: the process's own
    heap and the libraries' pages it wrote), shared pages (mapped library code
    and read-only data, also mapped by other processes such as the node agent,
    which runs the same Python and libraries), and PSS (shared pages divided
    among the processes mapping them)."""
    kb: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            kb[key] = int(value.split()[0])
    private = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    shared = kb.get("Shared_Clean", 0) + kb.get("Shared_Dirty", 0)
    return {"rss": kb.get("Rss", 0) / 1024, "private": private / 1024,
            "shared": shared / 1024, "pss": kb.get("Pss", 0) / 1024}


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@dataclass
class Started:
    """Processes this bench started, stopped by PID (never by name)."""

    procs: list[tuple[str, subprocess.Popen[str]]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], *, log: Path,
              stdout: int | None = None) -> subprocess.Popen[str]:
        with log.open("a") as f:
            p = subprocess.Popen(argv, stdout=stdout if stdout is not None else f,
                                 stderr=f, text=True, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[str]) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self) -> None:
        for _, p in list(reversed(self.procs)):
            self.stop(p)


def in_netns(path: str, argv: list[str]) -> list[str]:
    # nsenter execs the program: the PID we get is the program's own.
    return ["nsenter", f"--net={path}", *argv]


def pod_netns(ip: str) -> str:
    """The network namespace file whose interfaces carry ``ip``."""
    return f"/var/run/netns/{podnet.pod_netns(ip)}"


# -- the lab ---------------------------------------------------------------------------


def shoal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def metrics(ip: str) -> str:
    return scrape(f"http://{ip}:15020/metrics")


@dataclass(frozen=True)
class MeshCounts:
    opened: float          # every connection the agent opened a record for
    mtls_source: float     # reporter=source, mutual_tls
    mtls_destination: float
    handshakes_ok: float   # outbound handshakes that succeeded
    requests: float = 0        # L7: istio_requests_total, any reporter
    requests_source_ok: float = 0       # reporter=source, 200, mutual_tls
    requests_destination_ok: float = 0  # reporter=destination, 200, mutual_tls
    # L7: requests the agent itself saw take over 5 / 100 ms (its duration histogram),
    # to tell where a slow request spent its time
    over_5ms: float = 0
    over_100ms: float = 0

    @staticmethod
    def read(ip: str) -> MeshCounts:
        t = metrics(ip)
        return MeshCounts(
            requests=metric_total(t, "istio_requests_total"),
            requests_source_ok=metric_total(
                t, "istio_requests_total", reporter="source", response_code="200",
                connection_security_policy="mutual_tls"),
            requests_destination_ok=metric_total(
                t, "istio_requests_total", reporter="destination", response_code="200",
                connection_security_policy="mutual_tls"),
            opened=metric_total(t, "istio_tcp_connections_opened_total"),
            mtls_source=metric_total(t, "istio_tcp_connections_opened_total", reporter="source",
                               connection_security_policy="mutual_tls"),
            mtls_destination=metric_total(t, "istio_tcp_connections_opened_total",
                                    reporter="destination",
                                    connection_security_policy="mutual_tls"),
            handshakes_ok=metric_total(t, "shoal_mesh_tls_handshakes_total", direction="outbound",
                                 result="ok"),
            over_5ms=metric_total(t, "istio_request_duration_milliseconds_count") - metric_total(
                t, "istio_request_duration_milliseconds_bucket", le="5.0"),
            over_100ms=metric_total(t, "istio_request_duration_milliseconds_count") - metric_total(
                t, "istio_request_duration_milliseconds_bucket", le="100.0"))


def pod(name: str, node: str, *, meshed: bool) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, NS
    p.metadata.labels["app"] = name
    if not meshed:
        p.metadata.labels["shoal.dev/mesh"] = "disabled"
    p.spec.node_name = node
    p.spec.termination_grace_period_seconds = 1
    c = p.spec.containers.add(name="main", image=IMAGE)
    c.command.extend(["sleep", "86400"])
    return p


def http_service(name: str) -> core_pb2.Service:
    """Port 9000 named ``http``: an HTTP port for the mesh (shoal.meshprotocol)."""
    s = core_pb2.Service()
    s.metadata.name, s.metadata.namespace = name, NS
    s.spec.selector["app"] = name
    port = s.spec.ports.add(name="http", port=ECHO_PORT)
    port.target_port.int_val = ECHO_PORT
    return s


def nat_rules(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout


# -- HAProxy pair --------------------------------------------------------------------


def make_pki(d: Path, *, server_ip: str) -> None:
    """A CA, a server certificate for haproxy B and a client one for haproxy A
    (ECDSA P-256, as the mesh's workload certificates)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM,
                               serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("mesh-bench CA"))
          .issuer_name(name("mesh-bench CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cn, usage, sans in (
            ("haproxy-b", ExtendedKeyUsageOID.SERVER_AUTH,
             [x509.DNSName("haproxy-b"), x509.IPAddress(ipaddress.ip_address(server_ip))]),
            ("haproxy-a", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("haproxy-a")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        path = d / f"{cn}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pem_key(key))
        path.chmod(0o600)


HAPROXY_COMMON = """\
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
"""


HAPROXY_HTTP = """
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-keep-alive 1h
    timeout http-request 1h
"""


def haproxy_configs(d: Path, *, a_ip: str, b_ip: str, server: str,
                    http: bool = False) -> tuple[Path, Path]:
    # HTTP: a second defaults section replaces the TCP one for what follows.
    common = HAPROXY_COMMON + (HAPROXY_HTTP if http else "")
    a = d / "haproxy-a.cfg"
    tls = (f"ssl verify required ca-file {d}/ca.pem crt {d}/haproxy-a.pem "
           "sni str(haproxy-b) verifyhost haproxy-b")
    a.write_text(common + f"""
frontend plain_in
    bind {a_ip}:{HAPROXY_A_PORT}
    default_backend tls_out

backend tls_out
    server b {b_ip}:{HAPROXY_B_PORT} {tls}
""")
    b = d / "haproxy-b.cfg"
    b.write_text(common + f"""
frontend tls_in
    bind {b_ip}:{HAPROXY_B_PORT} ssl crt {d}/haproxy-b.pem ca-file {d}/ca.pem verify required
    default_backend plain_out

backend plain_out
    server s {server}
""")
    return a, b


def check_haproxy_b(d: Path, ip: str, *, http: bool = False) -> str:
    """Haproxy B speaks TLS 1.3 and echoes only for a client with a certificate
    from the bench's CA; returns the version and cipher it negotiated."""
    import ssl

    def attempt(with_cert: bool) -> tuple[bytes, str]:
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        ctx.check_hostname = False
        if with_cert:
            ctx.load_cert_chain(str(d / "haproxy-a.pem"))
        with socket.create_connection((ip, HAPROXY_B_PORT), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="haproxy-b") as tls:
            if http:
                tls.sendall(b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 16\r\n"
                            b"Connection: close\r\n\r\n" + b"x" * 16)
            else:
                tls.sendall(b"x" * 16)
            got = b""
            with contextlib.suppress(OSError):
                while http or len(got) < 16:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            if http:
                got = got[-16:] if got.startswith(b"HTTP/1.1 200") else b""
            return got, f"{tls.version()} {(tls.cipher() or ('?',))[0]}"

    got, how = attempt(True)
    if got != b"x" * 16 or not how.startswith("TLSv1.3"):
        raise RuntimeError(f"haproxy B with a client certificate: got {got!r} over {how}")
    with contextlib.suppress(OSError):
        got, _ = attempt(False)
        if got:
            raise RuntimeError("haproxy B echoed for a client without a certificate")
    return how


def wait_listening(ip: str, port: int, proc: subprocess.Popen[str], what: str) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
            return True
        return False

    wait_for(f"{what} listening on {ip}:{port}", up, timeout=20)


# -- one run ---------------------------------------------------------------------------


@dataclass
class Setup:
    nodes: dict[str, Any]               # node name -> topology Node
    netns: dict[str, str]               # pod name -> netns file
    ips: dict[str, str]                 # pod name -> pod IP
    proxies: dict[str, dict[str, int]]  # mode -> {process label: pid}
    logs: Path
    service_ips: dict[str, str] = field(default_factory=dict)  # Service -> ClusterIP


def run_load(started: Started, setup: Setup, mode: str, *, args: argparse.Namespace,
             warmup: float, duration: float) -> dict[str, Any]:
    n1, n2 = setup.nodes["node-1"], setup.nodes["node-2"]
    http = args.protocol == "http"
    # HTTP: direct and mesh go to the Services' ClusterIPs (the L7 path is chosen
    # by the Service port), TCP to the pods.
    dest = setup.service_ips if http else setup.ips
    host_header = ""
    if mode == "direct":
        client, target = "plain-client", f"{dest['plain-server']}:{ECHO_PORT}"
        host_header = f"plain-server.{NS}.svc.cluster.local:{ECHO_PORT}"
    elif mode == "mesh":
        client, target = "mesh-client", f"{dest['mesh-server']}:{ECHO_PORT}"
        host_header = f"mesh-server.{NS}.svc.cluster.local:{ECHO_PORT}"
    else:
        client, target = "plain-client", f"{n1.ip}:{HAPROXY_A_PORT}"
    proxies = setup.proxies.get(mode, {})
    before = {n.name: MeshCounts.read(n.ip) for n in (n1, n2)}
    argv = in_netns(setup.netns[client], [
        sys.executable, str(LOAD), "load", "--target", target, "--rate", str(args.rate),
        "--connections", str(args.connections), "--size", str(args.size),
        "--warmup", str(warmup), "--duration", str(duration),
        *(["--http", "--host-header", host_header] if http else []),
        *(["--trace", str(args.trace_dir / f"{mode}-{time.time():.0f}.txt")]
          if args.trace_dir else [])])
    p = started.spawn(f"load/{mode}", argv, log=setup.logs / "load.log",
                      stdout=subprocess.PIPE)
    assert p.stdout is not None
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    t_start = t_end = 0.0
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + warmup + duration + 60
    while result is None:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
            raise RuntimeError(f"{mode}: the load generator did not finish in time")
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{mode}: the load generator exited ({p.wait()}); "
                               f"see {setup.logs / 'load.log'}")
        line = line.strip()
        if line == "MEASURE_START":
            cpu0 = {k: cpu_seconds(pid) for k, pid in proxies.items()}
            t_start = time.monotonic()
        elif line == "MEASURE_END":
            cpu1 = {k: cpu_seconds(pid) for k, pid in proxies.items()}
            t_end = time.monotonic()
        elif line.startswith("{"):
            result = json.loads(line)
    p.wait(10)
    started.procs = [(n, q) for n, q in started.procs if q is not p]
    after = {n.name: MeshCounts.read(n.ip) for n in (n1, n2)}
    result["mode"] = mode
    result["window_s"] = t_end - t_start
    per_k = result["completed"] / 1000 if result["completed"] else float("nan")
    result["cpu_s"] = {k: cpu1[k] - cpu0[k] for k in proxies}
    result["cpu_s_per_1000"] = {k: (cpu1[k] - cpu0[k]) / per_k for k in proxies}
    result["rss_mb"] = {k: rss_mb(pid) for k, pid in proxies.items()}
    problems = []
    if result["achieved_rps"] < 0.95 * args.rate:
        problems.append(f"achieved {result['achieved_rps']:.0f}/s < 95% of {args.rate:.0f}/s")
    if result["lost"] or result["mismatches"] or result["errors"] \
            or result.get("bad_status"):
        problems.append(f"lost {result['lost']}, garbled {result['mismatches']}, "
                        f"non-200 {result.get('bad_status', 0)}, errors {result['errors']}")
    d1 = {k: getattr(after["node-1"], k) - getattr(before["node-1"], k)
          for k in ("opened", "mtls_source")}
    d2 = {k: getattr(after["node-2"], k) - getattr(before["node-2"], k)
          for k in ("opened", "mtls_destination")}
    result["mesh_metrics"] = {"node-1": d1, "node-2": d2,
                              "handshakes_ok_node1": after["node-1"].handshakes_ok}
    if http:
        sent = result["sent_total"]
        r1 = {k: getattr(after["node-1"], k) - getattr(before["node-1"], k)
              for k in ("requests", "requests_source_ok", "over_5ms", "over_100ms")}
        r2 = {k: getattr(after["node-2"], k) - getattr(before["node-2"], k)
              for k in ("requests", "requests_destination_ok", "over_5ms", "over_100ms")}
        result["mesh_metrics"].update({"requests_node-1": r1, "requests_node-2": r2,
                                       "sent": sent})
        if mode == "mesh":
            # Every request through both agents' L7 path, and none on the L4 one.
            if r1["requests_source_ok"] != sent or r2["requests_destination_ok"] != sent:
                problems.append(
                    f"not through the L7 path: sent {sent}, node-1 source 200 mutual_tls "
                    f"+{r1['requests_source_ok']:.0f}, node-2 destination "
                    f"+{r2['requests_destination_ok']:.0f}")
            if d1["opened"] or d2["opened"]:
                problems.append(f"L4 records although HTTP: node-1 +{d1['opened']:.0f}, "
                                f"node-2 +{d2['opened']:.0f} connections")
        elif d1["opened"] or d2["opened"] or r1["requests"] or r2["requests"]:
            problems.append(f"captured although opted out: node-1 +{d1['opened']:.0f} "
                            f"connections +{r1['requests']:.0f} requests, node-2 "
                            f"+{d2['opened']:.0f} +{r2['requests']:.0f}")
    elif mode == "mesh":
        if (d1["mtls_source"] < args.connections or d2["mtls_destination"] < args.connections
                or after["node-1"].handshakes_ok < 1):
            problems.append(f"not through the tunnel: node-1 mutual_tls opened "
                            f"+{d1['mtls_source']:.0f}, node-2 +{d2['mtls_destination']:.0f}, "
                            f"handshakes ok {after['node-1'].handshakes_ok:.0f}")
    elif d1["opened"] or d2["opened"]:
        problems.append(f"captured although opted out: node-1 +{d1['opened']:.0f}, "
                        f"node-2 +{d2['opened']:.0f} connections")
    result["problems"] = problems
    return result


# -- report ----------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: list[dict[str, Any]], args: argparse.Namespace,
           final_rss: dict[str, float], machine: dict[str, str]) -> dict[str, Any]:
    good = {m: [r for r in results if r["mode"] == m and not r["problems"]] for m in MODES}
    say("")
    say("| run | mode | p50 | p90 | p99 | p99.9 | max | achieved/s | send lag p99 | "
        "problems |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        say(f"| {i // len(MODES) + 1} | {r['mode']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['p999_ms']:.3f} | {r['max_ms']:.2f} | "
            f"{r['achieved_rps']:.1f} | {r['send_lag_p99_ms']:.3f} | "
            f"{'; '.join(r['problems']) or '-'} |")
    summary: dict[str, Any] = {}
    for m in MODES:
        rs = good[m]
        s: dict[str, Any] = {"valid_runs": len(rs), "runs": sum(
            1 for r in results if r["mode"] == m)}
        for q in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "achieved_rps",
                  "send_lag_p50_ms", "send_lag_p99_ms"):
            s[q] = med([r[q] for r in rs])
        labels = sorted({k for r in rs for k in r["cpu_s_per_1000"]})
        s["cpu_s_per_1000"] = {k: med([r["cpu_s_per_1000"][k] for r in rs]) for k in labels}
        s["cpu_s_per_1000_total"] = sum(s["cpu_s_per_1000"].values()) if labels else None
        summary[m] = s
    for m in ("mesh", "haproxy"):
        summary[m]["added_ms"] = {q: summary[m][q] - summary["direct"][q]
                                  for q in ("p50_ms", "p90_ms", "p99_ms")}
        # Also paired by round (same moment on a noisy machine), for comparison.
        pairs = []
        for i in range(0, len(results), len(MODES)):
            rnd = {r["mode"]: r for r in results[i:i + len(MODES)] if not r["problems"]}
            if m in rnd and "direct" in rnd:
                pairs.append({q: rnd[m][q] - rnd["direct"][q]
                              for q in ("p50_ms", "p90_ms", "p99_ms")})
        summary[m]["added_ms_paired_median"] = {
            q: med([p[q] for p in pairs]) for q in ("p50_ms", "p90_ms", "p99_ms")}
    say("")
    say(f"Medians over valid runs ({args.rate:.0f} req/s, {args.size} B, "
        f"{args.connections} connections, {args.duration:.0f} s measured per run):")
    say("")
    say("| mode | valid runs | p50 (ms) | p90 (ms) | p99 (ms) | added p50 / p90 / p99 (ms) | "
        "achieved/s | proxy CPU s per 1,000 req | RSS at end (MB) |")
    say("|---|---|---|---|---|---|---|---|---|")
    for m in MODES:
        s = summary[m]
        added = s.get("added_ms")
        added_text = (f"+{added['p50_ms']:.3f} / +{added['p90_ms']:.3f} / "
                      f"+{added['p99_ms']:.3f}" if added else "-")
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in s["cpu_s_per_1000"].items())
        if s["cpu_s_per_1000_total"] is not None:
            cpu += f" (total {s['cpu_s_per_1000_total']:.3f})"
        rss = ", ".join(f"{k} {v:.1f}" for k, v in final_rss.items()
                        if k in {k2 for r in results if r['mode'] == m
                                 for k2 in r['rss_mb']})
        say(f"| {m} | {s['valid_runs']}/{s['runs']} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | "
            f"{s['p99_ms']:.3f} | {added_text} | {s['achieved_rps']:.1f} | {cpu or '-'} | "
            f"{rss or '-'} |")
    for m in ("mesh", "haproxy"):
        p = summary[m]["added_ms_paired_median"]
        say(f"{m}: added, median of per-round differences: +{p['p50_ms']:.3f} / "
            f"+{p['p90_ms']:.3f} / +{p['p99_ms']:.3f} ms")
    mesh_rss = [v for k, v in final_rss.items() if k.startswith("meshagent")]
    p99_added = summary["mesh"]["added_ms"]["p99_ms"]
    say("")
    if args.protocol == "http":
        say(f"target: mesh (L7) p99 added <= 1.5 ms at {args.rate:.0f} req/s: "
            f"{p99_added:+.3f} ms -> {'met' if p99_added <= 1.5 else 'NOT met'}; "
            f"meshagent RSS {', '.join(f'{v:.1f}' for v in mesh_rss)} MB")
    else:
        say(f"targets: mesh p99 added <= 1 ms: {p99_added:+.3f} ms -> "
            f"{'met' if p99_added <= 1 else 'NOT met'}; meshagent RSS < 60 MB: "
            f"{', '.join(f'{v:.1f}' for v in mesh_rss)} MB -> "
            f"{'met' if mesh_rss and max(mesh_rss) < 60 else 'NOT met'}")
    return {"machine": machine, "args": {k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()},
            "runs": results, "summary": summary, "final_rss_mb": final_rss}


# -- main ------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    hv = subprocess.run(["haproxy", "-v"], capture_output=True, text=True,
                        check=False).stdout.splitlines()
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "haproxy": hv[0] if hv else "?"}


@contextlib.contextmanager
def lab(lab_dir: Path, profile: str) -> Iterator[None]:
    say(f"shoal lab up --nodes 3 --mesh --mesh-profile {profile} --dir {lab_dir}")
    t0 = time.monotonic()
    try:
        up = shoal("lab", "up", "--nodes", "3", "--mesh", "--mesh-profile", profile,
                   "--dir", str(lab_dir))
        if up.returncode != 0:
            raise RuntimeError(f"lab up failed:\n{up.stdout}\n{up.stderr}")
        say(f"lab up in {time.monotonic() - t0:.1f} s")
        yield
    finally:
        say("shoal lab down --purge")
        down = shoal("lab", "down", "--purge", "--dir", str(lab_dir))
        if down.returncode != 0:
            say(f"lab down failed:\n{down.stdout}\n{down.stderr}")


def meshagent_pid(lab_dir: Path, node: str) -> int:
    state = StateFile(lab_dir / "state.json").load()
    if state is None:
        raise RuntimeError(f"no lab state in {lab_dir}")
    rec = state.processes.get(f"meshagent/{node}")
    if rec is None:
        raise RuntimeError(f"the lab recorded no meshagent/{node}")
    argv = cmdline(rec.pid)
    if "meshagent.main" not in argv or node not in argv:
        raise RuntimeError(f"pid {rec.pid} is not meshagent/{node}: {argv}")
    return rec.pid


@contextlib.contextmanager
def lab_lock() -> Iterator[bool]:
    """Hold /tmp/shoal-e2e.lock (one lab on the machine at a time); yields False
    when a lab is still up 60 s after getting it."""
    with LOCK.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for {LOCK} (another lab is running)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        # The lock's previous holder may still be taking its lab down.
        deadline = time.monotonic() + 60
        while subprocess.run(["ip", "link", "show", "shoal0"], capture_output=True,
                             check=False).returncode == 0:
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(1)
        yield True


def bench(args: argparse.Namespace, started: Started) -> dict[str, Any]:
    lab_dir: Path = args.lab_dir
    topo = plan(nodes=3, lab_dir=lab_dir)
    nodes = {n.name: n for n in topo.nodes}
    n1, n2 = nodes["node-1"], nodes["node-2"]
    logs = lab_dir / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    with Client(configmod.load(lab_dir / "admin.conf"), timeout=30) as client:
        ns = core_pb2.Namespace()
        ns.metadata.name = NS
        client.create(ns)
        for name, node, meshed in (("plain-client", "node-1", False),
                                   ("plain-server", "node-2", False),
                                   ("mesh-client", "node-1", True),
                                   ("mesh-server", "node-2", True)):
            client.create(pod(name, node, meshed=meshed))
        service_ips: dict[str, str] = {}
        if args.protocol == "http":
            for name in ("plain-server", "mesh-server"):
                svc = client.create(http_service(name))
                service_ips[name] = str(svc.spec.cluster_ip)

        def running(name: str) -> str | None:
            p = client.get(core_pb2.Pod, name, namespace=NS)
            return str(p.status.pod_ip) if p.status.phase == "Running" and p.status.pod_ip \
                else None

        ips = {name: wait_for(f"{name} running", partial(running, name), timeout=120)
               for name in ("plain-client", "plain-server", "mesh-client", "mesh-server")}

        def endpoint(name: str) -> bool:
            ep = client.get(core_pb2.Endpoints, name, namespace=NS)
            return any(a.ip == ips[name] for sub in ep.subsets for a in sub.addresses)

        for name in service_ips:
            wait_for(f"Service {name} has its pod as endpoint", partial(endpoint, name),
                     timeout=60)
    say(f"pods: {ips}" + (f"; services: {service_ips}" if service_ips else ""))
    wait_for("mesh-client captured on node-1", lambda: f"-s {ips['mesh-client']}/32"
             in nat_rules(n1.netns), timeout=60)
    wait_for("mesh-server captured on node-2", lambda: f"-d {ips['mesh-server']}/32"
             in nat_rules(n2.netns), timeout=60)
    for name, node in (("plain-client", n1), ("plain-server", n2)):
        # The capture chains only: the service proxy's rules name endpoints too.
        capture = [line for line in nat_rules(node.netns).splitlines()
                   if line.startswith("-A SHOAL-MESH-")]
        if any(f"{ips[name]}/32" in line for line in capture):
            raise RuntimeError(f"{name} ({ips[name]}) is opted out but has capture rules")
    netns = {name: pod_netns(ip) for name, ip in ips.items()}
    for name in ("plain-server", "mesh-server"):
        p = started.spawn(f"echo/{name}", in_netns(netns[name], [
            sys.executable, str(LOAD), "serve", "--port", str(ECHO_PORT),
            *(["--http"] if args.protocol == "http" else [])]),
            log=logs / f"echo-{name}.log")
        log = logs / f"echo-{name}.log"
        wait_for(f"echo server in {name}", lambda log=log: "READY" in log.read_text(),
                 timeout=20)
        if p.poll() is not None:
            raise RuntimeError(f"echo server in {name} exited")
    pki = lab_dir / "bench" / "haproxy"
    pki.mkdir(parents=True, exist_ok=True)
    make_pki(pki, server_ip=n2.ip)
    cfg_a, cfg_b = haproxy_configs(pki, a_ip=n1.ip, b_ip=n2.ip,
                                   server=f"{ips['plain-server']}:{ECHO_PORT}",
                                   http=args.protocol == "http")
    for cfg in (cfg_a, cfg_b):
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True,
                               text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c {cfg}:\n{check.stdout}{check.stderr}")
    hb = started.spawn("haproxy-b", in_netns(str(n2.netns_path), [
        "haproxy", "-db", "-f", str(cfg_b)]), log=logs / "haproxy-b.log")
    wait_listening(n2.ip, HAPROXY_B_PORT, hb, "haproxy B")
    say(f"haproxy B: {check_haproxy_b(pki, n2.ip, http=args.protocol == 'http')} with a "
        "client certificate; "
        "refused without one")
    ha = started.spawn("haproxy-a", in_netns(str(n1.netns_path), [
        "haproxy", "-db", "-f", str(cfg_a)]), log=logs / "haproxy-a.log")
    wait_listening(n1.ip, HAPROXY_A_PORT, ha, "haproxy A")
    for pid, what in ((ha.pid, "haproxy-a"), (hb.pid, "haproxy-b")):
        if "haproxy" not in Path(cmdline(pid)[0]).name:
            raise RuntimeError(f"pid {pid} ({what}) is {cmdline(pid)}, not haproxy")
    mesh_pids = {"meshagent-node-1": meshagent_pid(lab_dir, "node-1"),
                 "meshagent-node-2": meshagent_pid(lab_dir, "node-2")}
    setup = Setup(nodes=nodes, netns=netns, ips=ips, logs=logs, service_ips=service_ips,
                  proxies={"mesh": mesh_pids,
                           "haproxy": {"haproxy-a": ha.pid, "haproxy-b": hb.pid}})
    say(f"proxies: {setup.proxies}")
    idle_rss = {k: rss_mb(pid) for m in ("mesh", "haproxy")
                for k, pid in setup.proxies[m].items()}
    say("RSS before any load (MB): " + ", ".join(f"{k} {v:.1f}" for k, v in idle_rss.items()))
    # A short smoke run per mode: every path works, and warms it (TLS contexts,
    # the tunnel's pooled connection, haproxy's session cache).
    for mode in MODES:
        r = run_load(started, setup, mode, args=args, warmup=0.5, duration=2)
        say(f"smoke {mode}: p50 {r['p50_ms']:.3f} ms, achieved {r['achieved_rps']:.0f}/s, "
            f"mesh metrics {r['mesh_metrics']}, problems {r['problems'] or 'none'}")
        if any(p.startswith(("not through", "captured")) for p in r["problems"]):
            raise RuntimeError(f"smoke {mode}: {r['problems']}")
    results = []
    for i in range(args.runs):
        for mode in MODES:
            for label, pid in setup.proxies.get(mode, {}).items():
                if not Path(f"/proc/{pid}").exists():
                    raise RuntimeError(f"{label} (pid {pid}) is gone")
            r = run_load(started, setup, mode, args=args, warmup=args.warmup,
                         duration=args.duration)
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_s_per_1000"].items())
            say(f"run {i + 1} {mode:8s} p50 {r['p50_ms']:.3f}  p90 {r['p90_ms']:.3f}  "
                f"p99 {r['p99_ms']:.3f}  max {r['max_ms']:.2f} ms  achieved "
                f"{r['achieved_rps']:.1f}/s  send lag p99 {r['send_lag_p99_ms']:.3f} ms  "
                f"CPU s/1000 [{cpu}]  {'; '.join(r['problems']) or 'ok'}")
            mm = r["mesh_metrics"]
            if mode == "mesh" and "requests_node-1" in mm:
                src, dst = mm["requests_node-1"], mm["requests_node-2"]
                say(f"      the agents' own durations over 5 / 100 ms: source (node-1) "
                    f"{src['over_5ms']:.0f} / {src['over_100ms']:.0f}, destination (node-2) "
                    f"{dst['over_5ms']:.0f} / {dst['over_100ms']:.0f}")
            results.append(r)
    final_rss = {k: rss_mb(pid) for m in ("mesh", "haproxy")
                 for k, pid in setup.proxies[m].items()}
    memory = {k: memory_mb(pid) for m in ("mesh", "haproxy")
              for k, pid in setup.proxies[m].items()}
    out = report(results, args, final_rss, machine_info())
    say("memory at the end (MB): " + "; ".join(
        f"{k} RSS {v['rss']:.1f} = private {v['private']:.1f} + shared {v['shared']:.1f}, "
        f"PSS {v['pss']:.1f}" for k, v in memory.items()))
    out["idle_rss_mb"] = idle_rss
    out["memory_mb"] = memory
    if args.profile:
        out["profile"] = profile_mesh(started, setup, args)
    return out


def top_frames(raw: str, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares of py-spy's collapsed stacks (``-f raw``)."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        total += c
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    if not total:
        return {"self": [], "inclusive": []}

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, 100 * c / total) for f, c in sorted(d.items(), key=lambda x: -x[1])[:n]]

    return {"self": top(own), "inclusive": top(incl), "samples": [("total", float(total))]}


def profile_mesh(started: Started, setup: Setup, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """One extra mesh run (not in the figures above) with py-spy sampling both
    meshagents over its measured window."""
    say("")
    say(f"profiling: one more mesh run with py-spy on both meshagents "
        f"(not counted above; outputs in {setup.logs})")
    spies = {}
    for label, pid in setup.proxies["mesh"].items():
        out = setup.logs / f"py-spy-{label}.txt"
        spies[label] = (out, started.spawn(f"py-spy/{label}", [
            "py-spy", "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out),
            "-d", str(int(args.warmup + args.duration))], log=setup.logs / "py-spy.log"))
    r = run_load(started, setup, "mesh", args=args, warmup=args.warmup,
                 duration=args.duration)
    say(f"profiled mesh run: p50 {r['p50_ms']:.3f} p99 {r['p99_ms']:.3f} ms, achieved "
        f"{r['achieved_rps']:.1f}/s")
    result: dict[str, Any] = {"run": r}
    for label, (out, p) in spies.items():
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            started.stop(p)
        started.procs = [(n, q) for n, q in started.procs if q is not p]
        if not out.exists():
            say(f"{label}: py-spy wrote nothing (see {setup.logs / 'py-spy.log'})")
            continue
        tops = top_frames(out.read_text())
        result[label] = tops
        say(f"{label}: top self time (share of on-CPU samples)")
        for f, pct in tops["self"]:
            say(f"  {pct:5.1f}%  {f}")
        say(f"{label}: top inclusive")
        for f, pct in tops["inclusive"]:
            say(f"  {pct:5.1f}%  {f}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("tcp", "http"), default="tcp",
                   help="tcp: raw echo (issue 6); http: HTTP/1.1 through the L7 path")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    p.add_argument("--rate", type=float, default=1000.0, help="requests/s, all connections")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--size", type=int, default=1024, help="request (and echo) bytes")
    p.add_argument("--lab-dir", type=Path, default=Path("/tmp/shoal-bench-lab"))
    p.add_argument("--json", type=Path, help="write every run and the summary here")
    p.add_argument("--mesh-profile", choices=("default", "demo"), default="default",
                   help="the lab's mesh telemetry (shoal lab up --mesh-profile): Istio's "
                        "default profile (no access log, 1%% of traces sampled; the "
                        "default here) or demo (every request logged and traced)")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="keep each run's per-request times and latencies here")
    p.add_argument("--profile", action="store_true",
                   help="then one extra mesh run with py-spy on both meshagents")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (the lab, network namespaces)", file=sys.stderr)
        return 2
    if min(args.runs, args.connections, args.size) <= 0 or args.duration <= 0 \
            or args.rate <= 0 or args.warmup < 0:
        print("--runs, --duration, --rate, --connections and --size must be positive",
              file=sys.stderr)
        return 2
    haproxy = subprocess.run(["sh", "-c", "command -v haproxy"], capture_output=True,
                             text=True, check=False).stdout.strip()
    if not haproxy:
        print("haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 2
    with lab_lock() as free:
        if not free:
            print("a lab is already up on this machine (bridge shoal0 exists)",
                  file=sys.stderr)
            return 2
        # Ctrl-C or SIGTERM: clean up through the finally blocks.
        signal.signal(signal.SIGTERM, _interrupt)
        started = Started()
        try:
            with lab(args.lab_dir, args.mesh_profile):
                try:
                    out = bench(args, started)
                finally:
                    started.stop_all()
        except KeyboardInterrupt:
            say("interrupted; cleaned up")
            return 130
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
            say(f"wrote {args.json}")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt



if __name__ == "__main__":
    sys.exit(main())
