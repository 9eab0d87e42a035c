"""``shoal etcd snapshot save|restore``, ``shoal etcd status|defrag`` and ``shoal status``.

These talk to etcd itself (its Maintenance API, see
:mod:`apiserver.storage.etcdadmin`), so they run on a control-plane machine
(or the lab's host), not through the apiserver. The members are found from,
in order: ``--endpoints HOST:PORT,...``; ``--spec FILE`` (a bootstrap spec:
its ``etcdServers``, or its own etcd); /etc/shoal/bootstrap.yaml; the lab's
bootstrap.yaml ($SHOAL_LAB_DIR or /var/lib/shoal/lab).

Restore (etcd's disaster recovery; every member from the same snapshot)::

    shoal etcd snapshot save /backup/etcd.db            # any time, from one member
    # on every control-plane member:
    stop the apiserver and etcd
    shoal etcd snapshot restore /backup/etcd.db --spec /etc/shoal/bootstrap.yaml
        -> restores into <etcd data dir>.restored with this member's name, peer
           URL and the spec's initial cluster (a new cluster ID)
    mv <etcd dir> <etcd dir>.old && mv <etcd dir>.restored <etcd dir>
    start etcd on every member, then the apiservers

Exit codes: 0 done (status: healthy), 1 failed or unhealthy, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from shoal import bootstrap, errors
from shoal.cli.reporting import ExitCode
from shoal.lab.topology import DEFAULT_DIR

LAB_DIR_ENV = "SHOAL_LAB_DIR"


def _spec_candidates() -> list[Path]:
    lab = Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_DIR)
    return [bootstrap.DEFAULT_SPEC, lab / "bootstrap.yaml"]


def _control_plane(spec: Path | None) -> bootstrap.ControlPlane | None:
    paths = [spec] if spec is not None else [p for p in _spec_candidates() if p.exists()]
    for path in paths:
        cp = bootstrap.load(path).control_plane
        if cp is None:
            raise errors.BadRequest(f"{path}: not a control-plane spec (no controlPlane)")
        return cp
    return None


def endpoints_of(ns: argparse.Namespace) -> tuple[str, ...]:
    if ns.endpoints:
        found = tuple(e.strip().split("://", 1)[-1] for e in ns.endpoints.split(",")
                      if e.strip())
        if not found:
            raise errors.BadRequest("--endpoints: name at least one HOST:PORT")
        return found
    cp = _control_plane(ns.spec)
    if cp is None:
        raise errors.BadRequest("which etcd? give --endpoints HOST:PORT,... or --spec FILE "
                                f"(none of {', '.join(map(str, _spec_candidates()))} exists)")
    return cp.all_etcd_servers


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--endpoints", default="",
                       help="etcd client endpoints, HOST:PORT,... (default: from the spec)")
        p.add_argument("--spec", type=Path, default=None,
                       help="a control-plane bootstrap spec to find etcd in (default "
                            f"{bootstrap.DEFAULT_SPEC}, else the lab's)")

    etcd = sub.add_parser("etcd", help="etcd operations: snapshots, status, defragmentation",
                          description="Operate on the control plane's etcd directly "
                                      "(run on a control-plane machine).")
    cmds = etcd.add_subparsers(dest="etcd_command", metavar="COMMAND", required=True)
    snap = cmds.add_parser("snapshot", help="save or restore a snapshot")
    snaps = snap.add_subparsers(dest="snapshot_command", metavar="save|restore",
                                required=True)
    p = snaps.add_parser("save", help="stream a snapshot of one member to FILE")
    p.add_argument("file", type=Path, metavar="FILE")
    where(p)
    p = snaps.add_parser("restore", help="restore FILE into a NEW etcd data dir for this "
                                         "member (etcd stopped); see `shoal etcd --help`")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the new data dir (default: the spec's etcd dir + .restored)")
    p.add_argument("--name", default="", help="this member's name (default: the spec's)")
    p.add_argument("--initial-advertise-peer-urls", default="", dest="peer_url",
                   help="this member's peer URL (default: the spec's)")
    p.add_argument("--initial-cluster", default="",
                   help="NAME=PEER-URL,... of every member (default: the spec's)")
    p.add_argument("--spec", type=Path, default=None,
                   help="this member's bootstrap spec (default: found as for save)")
    p = cmds.add_parser("status", help="members, leader, size, disk latency (fsync/commit)")
    where(p)
    p = cmds.add_parser("defrag", help="defragment every member, one at a time")
    where(p)
    p = sub.add_parser("status", help="the control plane at a glance: apiservers and etcd "
                                      "(with a warning on slow disks)")
    where(p)


def run(ns: argparse.Namespace, *, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    stdout, stderr = out or sys.stdout, err or sys.stderr

    def say(line: str) -> None:
        stdout.write(line + "\n")

    try:
        if ns.command == "status":
            return _status(ns, say)
        if ns.etcd_command == "status":
            return _etcd_status(endpoints_of(ns), say)
        if ns.etcd_command == "defrag":
            from apiserver.storage import etcdadmin

            done = asyncio.run(etcdadmin.defragment_each(endpoints_of(ns)))
            say(f"defragmented {', '.join(done)}")
            return ExitCode.OK
        if ns.snapshot_command == "save":
            return _save(ns, say)
        return _restore(ns, say)
    except errors.BadRequest as e:
        stderr.write(f"shoal: {e.message}\n")
        return ExitCode.BAD_INPUT
    except errors.ShoalError as e:
        stderr.write(f"shoal: {e.message}\n")
        return 1


def _save(ns: argparse.Namespace, say: Callable[[str], None]) -> int:
    from apiserver.storage import etcdadmin

    path: Path = ns.file
    if path.is_dir():
        raise errors.BadRequest(f"{path} is a directory; name the snapshot file")
    member, size = asyncio.run(etcdadmin.snapshot_save(endpoints_of(ns), path))
    say(f"saved a snapshot of etcd member {member} to {path} ({size} bytes)")
    return ExitCode.OK


def _restore(ns: argparse.Namespace, say: Callable[[str], None]) -> int:
    from apiserver.storage import etcdadmin

    cp = _control_plane(ns.spec) if not (ns.name and ns.peer_url and ns.data_dir) else None
    if cp is None and not (ns.name and ns.peer_url and ns.data_dir):
        raise errors.BadRequest("restore needs this member's spec (--spec) or all of "
                                "--name, --initial-advertise-peer-urls and --data-dir")
    name = ns.name or (cp.etcd_name if cp else "")
    peer = ns.peer_url or (cp.etcd_peer_url if cp else "")
    cluster = ns.initial_cluster or (",".join(cp.etcd_initial_cluster) if cp else "")
    data_dir = ns.data_dir or (cp.etcd_dir.with_name(cp.etcd_dir.name + ".restored")
                               if cp else None)
    assert data_dir is not None
    etcdadmin.snapshot_restore(ns.file, data_dir=data_dir, name=name, peer_url=peer,
                               initial_cluster=cluster)
    say(f"restored {ns.file} into {data_dir} (member {name}, peer {peer})")
    if cp is not None:
        say(f"next, with etcd stopped on every member: mv {cp.etcd_dir} {cp.etcd_dir}.old && "
            f"mv {data_dir} {cp.etcd_dir}; then start etcd on every member, then the "
            "apiservers")
    return ExitCode.OK


def _etcd_status(endpoints: tuple[str, ...], say: Callable[[str], None]) -> int:
    from apiserver.storage import etcdadmin

    rows, warnings = etcdadmin.report_rows(asyncio.run(etcdadmin.cluster_report(endpoints)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        say("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for w in warnings:
        say(f"warning: {w}")
    return ExitCode.OK if not warnings else 1


def _status(ns: argparse.Namespace, say: Callable[[str], None]) -> int:
    """The apiservers of the client config (each asked alone) and etcd."""
    from dataclasses import replace

    from shoal import config as configmod
    from shoal.client import Client

    healthy = True
    try:
        cfg = configmod.load(getattr(ns, "config", None))
    except errors.ShoalError as e:
        say(f"apiservers: no client config ({e.message})")
        cfg = None
    if cfg is not None:
        for server in cfg.servers:
            try:
                with Client(replace(cfg, servers=(server,)), timeout=3.0) as one:
                    version = one.version()
                say(f"apiserver {server}: serving (version {version.version}, storage "
                    f"{version.storage})")
            except errors.ShoalError as e:
                healthy = False
                say(f"apiserver {server}: NOT SERVING ({e.message})")
        from shoal.cli.certs import status_lines

        say("")
        for line in status_lines(cfg):
            say(line)
    try:
        endpoints = endpoints_of(ns)
    except errors.BadRequest as e:
        say(f"etcd: {e.message}")
        return ExitCode.OK if healthy else 1
    say("")
    code = _etcd_status(endpoints, say)
    return ExitCode.OK if healthy and code == ExitCode.OK else 1

