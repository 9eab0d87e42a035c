"""etcd operations on members, through etcd's own Maintenance API (``aetcd`` stubs).

    snapshot_save(endpoint, path)    Maintenance.Snapshot, streamed to path.part,
                                     fsynced, then renamed: a file at ``path`` is
                                     always a whole snapshot
    snapshot_restore(...)            etcdutl (etcd >= 3.5) or etcdctl (3.4)
                                     ``snapshot restore`` into a NEW data dir
    defragment(endpoint)             Maintenance.Defragment of that one member
    member_status(endpoint)          Maintenance.Status (leader, db size, revision)
    disk_latency(metrics_text)       p99 of etcd's WAL fsync and backend commit
                                     histograms, from its /metrics

Restore follows etcd's disaster-recovery procedure: every member is stopped,
each member's data dir is restored from the same snapshot with its own name and
peer URL and the same ``--initial-cluster`` (a new cluster ID, so old members
cannot rejoin by mistake), then the members start on the restored dirs. etcd
refuses to restore into an existing directory, and so does this.

Errors are Shoal's: ``Unavailable`` when a member does not answer,
``BadRequest`` for what the caller got wrong, ``InternalError`` otherwise.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc
from aetcd import rpc
from aetcd.rpc import rpc_pb2

from shoal import errors

# etcd's hardware guidance: a p99 WAL fsync above 10 ms means the disk is too
# slow for etcd (leader elections and request timeouts follow); backend commits
# above 25 ms likewise.
SLOW_FSYNC = 0.010
SLOW_COMMIT = 0.025
FSYNC_METRIC = "etcd_disk_wal_fsync_duration_seconds"
COMMIT_METRIC = "etcd_disk_backend_commit_duration_seconds"


@dataclass(frozen=True)
class MemberStatus:
    endpoint: str
    member_id: int
    leader_id: int
    version: str
    db_size: int
    db_size_in_use: int
    revision: int
    raft_term: int

    @property
    def is_leader(self) -> bool:
        return self.member_id == self.leader_id


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise errors.BadRequest(f"etcd endpoint {endpoint!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


class _Member:
    def __init__(self, endpoint: str, *, timeout: float) -> None:
        host, port = _split(endpoint)
        self.endpoint = endpoint
        self.client = aetcd.Client(host=host, port=port, timeout=timeout)
        self.timeout = timeout

    async def __aenter__(self) -> rpc.MaintenanceStub:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.connect()
                await self.client.channel.channel_ready()
        except (TimeoutError, grpc.aio.AioRpcError, aetcd.ClientError) as e:
            await self.client.close()
            raise errors.Unavailable(f"etcd member {self.endpoint} does not answer: "
                                     f"{type(e).__name__} {e}", retry_after=1.0) from e
        return rpc.MaintenanceStub(self.client.channel)

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()


def _failed(endpoint: str, what: str, e: grpc.aio.AioRpcError) -> errors.ShoalError:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.Unavailable(f"etcd member {endpoint}: {what}: {e.details()}",
                                  retry_after=1.0)
    return errors.InternalError(f"etcd member {endpoint}: {what}: {e.code().name} "
                                f"{e.details()}")


async def member_status(endpoint: str, *, timeout: float = 5.0) -> MemberStatus:
    async with _Member(endpoint, timeout=timeout) as stub:
        try:
            s = await stub.Status(rpc_pb2.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _failed(endpoint, "status", e) from e
    return MemberStatus(endpoint=endpoint, member_id=int(s.header.member_id),
                        leader_id=int(s.leader), version=s.version, db_size=int(s.dbSize),
                        db_size_in_use=int(s.dbSizeInUse), revision=int(s.header.revision),
                        raft_term=int(s.raftTerm))


async def defragment(endpoint: str, *, timeout: float = 300.0) -> None:
    """Defragment one member (it serves nothing while it does; minutes on big dbs)."""
    async with _Member(endpoint, timeout=10.0) as stub:
        try:
            await stub.Defragment(rpc_pb2.DefragmentRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _failed(endpoint, "defragment", e) from e


async def defragment_each(endpoints: Sequence[str]) -> list[str]:
    """Defragment the members one after the other (never two at once)."""
    done = []
    for endpoint in endpoints:
        await defragment(endpoint)
        done.append(endpoint)
    return done


async def snapshot_save(endpoints: Sequence[str], path: Path, *,
                        timeout: float = 600.0) -> tuple[str, int]:
    """Stream a snapshot of the first member that answers to ``path``; returns
    (that member, bytes written). Nothing is left at ``path`` on failure."""
    part = path.with_name(path.name + ".part")
    failures = []
    for endpoint in endpoints:
        try:
            async with _Member(endpoint, timeout=10.0) as stub:
                written = 0
                with part.open("wb") as f:
                    call = stub.Snapshot(rpc_pb2.SnapshotRequest(), timeout=timeout)
                    async for chunk in call:
                        f.write(chunk.blob)
                        written += len(chunk.blob)
                    f.flush()
                    os.fsync(f.fileno())
            part.replace(path)
            return endpoint, written
        except errors.Unavailable as e:
            failures.append(str(e))
        except grpc.aio.AioRpcError as e:
            failures.append(str(_failed(endpoint, "snapshot", e)))
        finally:
            part.unlink(missing_ok=True)
    raise errors.Unavailable("no etcd member gave a snapshot: " + "; ".join(failures),
                             retry_after=1.0)


def restore_command(snapshot: Path, *, data_dir: Path, name: str, peer_url: str,
                    initial_cluster: str, tool: str) -> list[str]:
    """The ``snapshot restore`` command line (pure; etcdutl and etcdctl take the
    same flags)."""
    return [tool, "snapshot", "restore", str(snapshot), "--data-dir", str(data_dir),
            "--name", name, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-token",
            "shoal-restored"]


def snapshot_restore(snapshot: Path, *, data_dir: Path, name: str, peer_url: str,
                     initial_cluster: str = "") -> str:
    """Restore ``snapshot`` into the new directory ``data_dir`` for member
    ``name``; returns what the tool printed."""
    if not snapshot.is_file():
        raise errors.BadRequest(f"no snapshot file {snapshot}")
    if data_dir.exists():
        raise errors.BadRequest(f"{data_dir} exists; restore goes into a new directory "
                                "(etcd never restores over a data dir)")
    tool = shutil.which("etcdutl") or shutil.which("etcdctl")
    if tool is None:
        raise errors.BadRequest("neither etcdutl nor etcdctl is installed (Debian package "
                                "etcd-client)")
    argv = restore_command(snapshot, data_dir=data_dir, name=name, peer_url=peer_url,
                           initial_cluster=initial_cluster or f"{name}={peer_url}",
                           tool=tool)
    env = dict(os.environ, ETCDCTL_API="3")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False,
                          timeout=600)
    if done.returncode != 0:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise errors.BadRequest(f"{os.path.basename(tool)} snapshot restore failed: "
                                f"{(done.stderr or done.stdout).strip()}")
    return (done.stdout + done.stderr).strip()


# -- disk latency from etcd's /metrics ------------------------------------------------


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``(le, count)`` buckets
    (sorted, the last ``+Inf``); None when the histogram is empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _buckets(text: str, metric: str) -> list[tuple[float, float]]:
    out = []
    prefix = f"{metric}_bucket{{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, value = line[len(prefix):].partition("} ")
        le = next((p.split("=", 1)[1].strip('"') for p in labels.split(",")
                   if p.startswith("le=")), None)
        if le is None:
            continue
        out.append((math.inf if le == "+Inf" else float(le), float(value)))
    return sorted(out)


@dataclass(frozen=True)
class DiskLatency:
    fsync_p99: float | None    # seconds
    commit_p99: float | None

    @property
    def slow(self) -> list[str]:
        """What is too slow, per etcd's guidance (empty: the disk is fine)."""
        out = []
        if self.fsync_p99 is not None and self.fsync_p99 > SLOW_FSYNC:
            out.append(f"WAL fsync p99 {self.fsync_p99 * 1000:.1f} ms > "
                       f"{SLOW_FSYNC * 1000:.0f} ms")
        if self.commit_p99 is not None and self.commit_p99 > SLOW_COMMIT:
            out.append(f"backend commit p99 {self.commit_p99 * 1000:.1f} ms > "
                       f"{SLOW_COMMIT * 1000:.0f} ms")
        return out


def disk_latency(metrics_text: str) -> DiskLatency:
    """p99 WAL fsync and backend commit durations from etcd's /metrics (since
    the member started)."""
    return DiskLatency(fsync_p99=histogram_quantile(0.99, _buckets(metrics_text, FSYNC_METRIC)),
                       commit_p99=histogram_quantile(0.99, _buckets(metrics_text,
                                                                    COMMIT_METRIC)))


@dataclass(frozen=True)
class MemberReport:
    """What ``shoal etcd status`` shows of one member."""

    endpoint: str
    status: MemberStatus | None
    latency: DiskLatency | None
    error: str = ""


def _metrics_text(endpoint: str, timeout: float) -> str:
    import urllib.request

    host, port = _split(endpoint)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}:{port}/metrics", timeout=timeout) as answer:
        return str(answer.read().decode())


async def cluster_report(endpoints: Sequence[str], *, timeout: float = 3.0
                         ) -> list[MemberReport]:
    """Status and disk latency of every member (one that does not answer says why)."""
    async def one(endpoint: str) -> MemberReport:
        try:
            status = await member_status(endpoint, timeout=timeout)
        except errors.ShoalError as e:
            return MemberReport(endpoint=endpoint, status=None, latency=None, error=str(e))
        try:
            text = await asyncio.to_thread(_metrics_text, endpoint, timeout)
            latency: DiskLatency | None = disk_latency(text)
        except OSError:
            latency = None
        return MemberReport(endpoint=endpoint, status=status, latency=latency)

    return list(await asyncio.gather(*(one(e) for e in endpoints)))


def report_rows(reports: Sequence[MemberReport]) -> tuple[list[tuple[str, ...]], list[str]]:
    """The member table (header first) and the warnings (slow disks, members
    down, no leader) for a report."""
    rows: list[tuple[str, ...]] = [("ETCD MEMBER", "LEADER", "VERSION", "DB SIZE", "REVISION",
                                    "FSYNC P99", "COMMIT P99")]
    warnings = []

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f} ms"

    for r in reports:
        if r.status is None:
            rows.append((r.endpoint, "-", "-", "-", "-", "-", "-"))
            warnings.append(f"etcd member {r.endpoint} does not answer: {r.error}")
            continue
        s = r.status
        rows.append((r.endpoint, "yes" if s.is_leader else "no", s.version,
                     f"{s.db_size / 2**20:.1f} MB", str(s.revision),
                     ms(r.latency.fsync_p99 if r.latency else None),
                     ms(r.latency.commit_p99 if r.latency else None)))
        for slow in (r.latency.slow if r.latency else []):
            warnings.append(f"etcd member {r.endpoint}: slow disk: {slow} (etcd's guidance; "
                            "expect leader changes and timeouts)")
    answered = [r.status for r in reports if r.status is not None]
    if answered and not any(s.leader_id for s in answered):
        warnings.append("etcd has no leader")
    elif len(answered) <= len(reports) // 2:
        warnings.append(f"only {len(answered)} of {len(reports)} etcd members answer: no "
                        "quorum, writes fail")
    return rows, warnings
