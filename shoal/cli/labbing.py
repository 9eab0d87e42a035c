"""``shoal lab up|down|status|stop-node|start-node|partition|heal``.

The commands manage a lab on this machine (see :mod:`shoal.lab.lab`); they
need no client config, so they run before the CLI builds its session. Each
one prints its progress on stdout and returns an exit code: 0 done, 1 the lab
could not do it (the message says what to do instead), 2 bad arguments.

Once ``up`` is done, a supervisor process of the lab's own restarts any of
its daemons that dies; ``stop-node`` is the way to stop a node on purpose
(the supervisor leaves it stopped until ``start-node``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

from shoal import errors
from shoal.cli.reporting import ExitCode
from shoal.lab.topology import CONTROL_PLANE, DEFAULT_DIR, DEFAULT_NODES, MAX_NODES

DIR_ENV = "SHOAL_LAB_DIR"


def _default_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lab`` and its commands to the ``shoal`` parser."""
    lab = sub.add_parser(
        "lab", help="a multi-node cluster on this machine (root)",
        description="Bring up, inspect, break and remove a local multi-node lab: one "
                    "network namespace per node on a bridge, with etcd, the apiserver "
                    "and a registry on the host.")
    cmds = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", type=Path, default=_default_dir(),
                       help=f"the lab's directory (default ${DIR_ENV} or {DEFAULT_DIR})")
        return p

    p = command("up", "bring the lab up, wait until every node is Ready, and keep its "
                      "daemons running (a supervisor restarts any that dies)")
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES,
                   help=f"how many nodes (1..{MAX_NODES}, default {DEFAULT_NODES})")
    p.add_argument("--control-planes", type=int, default=1, metavar="N",
                   help="control-plane members: N etcd members (one cluster) and N "
                        "apiservers, each on its own bridge address (1, 3 or 5; default 1)")
    p.add_argument("--apiserver-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="an extra `shoal-apiserver serve` flag, e.g. "
                        "--apiserver-arg=--pod-eviction-timeout=10 (repeatable)")
    p.add_argument("--mesh", action="store_true",
                   help="also run a capturing meshagent on every node: pods' traffic "
                        "between nodes goes over mTLS, with the mesh's DNS and policy")
    p.add_argument("--mesh-profile", choices=["demo", "default"], default="demo",
                   help="with --mesh: the telemetry of Istio's install profile of that "
                        "name: demo (the default here) logs every request and samples "
                        "every trace; default logs none and samples 1%% of traces")
    p.add_argument("--mesh-hosts", type=int, default=0, metavar="N",
                   help="with --mesh: N mesh-only hosts, each a network namespace with "
                        "only a meshagent and a plain process (busybox httpd), no node "
                        "agent (see `shoal lab meshhost add`)")
    p = command("meshhost", "add a mesh-only host to a lab up with --mesh: a network "
                            "namespace on the bridge with only a meshagent (joined with a "
                            "token) and busybox httpd :8080; a WorkloadEntry labelled "
                            "shoal.dev/mesh-host: <name> puts the process in the mesh")
    p.add_argument("action", choices=["add"])
    p = command("down", "stop and remove everything the lab made")
    p.add_argument("--purge", action="store_true",
                   help="also remove the lab's data and logs")
    command("status", "show the lab's processes (with their restarts) and nodes")
    p = command("stop-node", "stop a node's agent and containerd (its pods keep running; "
                             "the supervisor leaves it stopped)")
    p.add_argument("node", metavar="NAME")
    p = command("start-node", "start a stopped node again (its pods are adopted)")
    p.add_argument("node", metavar="NAME")
    p = command("partition",
                f"drop traffic between two nodes, or a node and {CONTROL_PLANE}")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar=f"B|{CONTROL_PLANE}")
    command("heal", "remove every partition")
    p = command("restore", "restore etcd from a snapshot (shoal etcd snapshot save) on every "
                           "control-plane member, and start the control plane on it")
    p.add_argument("snapshot", type=Path, metavar="FILE")


def run_lab(ns: argparse.Namespace, *, out: TextIO | None = None,
            err: TextIO | None = None) -> int:
    from shoal.lab.lab import Lab

    stdout, stderr = out or sys.stdout, err or sys.stderr

    def say(line: str) -> None:
        stdout.write(line + "\n")
        stdout.flush()

    lab = Lab(ns.dir, say=say)
    try:
        match ns.lab_command:
            case "up":
                return lab.up(nodes=ns.nodes, apiserver_args=tuple(ns.apiserver_arg),
                              mesh=ns.mesh, control_planes=ns.control_planes,
                              mesh_hosts=ns.mesh_hosts, mesh_profile=ns.mesh_profile)
            case "meshhost":
                return lab.add_mesh_host()
            case "down":
                return lab.down(purge=ns.purge)
            case "status":
                return lab.status()
            case "stop-node":
                return lab.stop_node(ns.node)
            case "start-node":
                return lab.start_node(ns.node)
            case "partition":
                return lab.partition(ns.a, ns.b)
            case "heal":
                return lab.heal()
            case "restore":
                return lab.restore(ns.snapshot)
    except errors.BadRequest as e:
        stderr.write(f"shoal lab: {e.message}\n")
        return ExitCode.BAD_INPUT
    except errors.ShoalError as e:
        stderr.write(f"shoal lab {ns.lab_command}: {e.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(ns.lab_command)  # pragma: no cover - argparse requires one
