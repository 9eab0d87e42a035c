"""The ``shoal`` command: argument parsing, dispatch, and exit codes.

``main(argv)`` parses the arguments, runs one command on a fresh event loop
and returns the exit code (see :mod:`shoal.cli.reporting` and docs/cli.md);
it never lets an expected error escape as a traceback. The console script and
``python -m shoal.cli.main`` both call it.

Global flags (``--config``, ``-n/--namespace``, ``--request-timeout``) are
accepted before or after the command name, as kubectl accepts them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from shoal import errors
from shoal.cli.applying import run_apply
from shoal.cli.authorizing import run_can_i
from shoal.cli.bootstrapping import run_token_create, run_token_delete, run_token_list
from shoal.cli.certs import run_certs, run_certs_renew
from shoal.cli.completing import run_complete
from shoal.cli.completing import script as completion_script
from shoal.cli.configuring import run_config_view
from shoal.cli.containers import run_exec, run_logs
from shoal.cli.creating import run_create_token
from shoal.cli.dashboard import run_dashboard
from shoal.cli.debugging import DEFAULT_IMAGE as DEBUG_IMAGE
from shoal.cli.debugging import run_debug
from shoal.cli.deleting import DeleteOptions, run_delete
from shoal.cli.describing import run_describe
from shoal.cli.diffing import run_diff
from shoal.cli.discovering import run_api_resources, run_version
from shoal.cli.etcdops import add_parsers as add_etcd_parsers
from shoal.cli.etcdops import run as run_etcd
from shoal.cli.explaining import run_explain
from shoal.cli.forwarding import run_port_forward
from shoal.cli.getting import OUTPUTS, GetOptions, run_get
from shoal.cli.imaging import add_parser as add_image_parser
from shoal.cli.imaging import run_image_import, run_image_local
from shoal.cli.labbing import add_parser as add_lab_parser
from shoal.cli.labbing import run_lab
from shoal.cli.meshing import add_parser as add_mesh_parser
from shoal.cli.meshing import run_mesh
from shoal.cli.nodes import DrainOptions, run_cordon, run_drain
from shoal.cli.reporting import CLIError, ExitCode, error_lines, exit_code_for
from shoal.cli.resourceusage import run_top
from shoal.cli.rollouts import ROLLOUT_KINDS, run_rollout
from shoal.cli.scaling import run_scale
from shoal.cli.secrets import run_secrets_reencrypt
from shoal.cli.session import Session
from shoal.cli.terminal import run_exec_interactive
from shoal.cli.waiting import DEFAULT_TIMEOUT as WAIT_TIMEOUT
from shoal.cli.waiting import run_wait
from shoal.kinds import builtin_kinds

_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|s|m|h)")
_UNITS = MappingProxyType({"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0})
# Bare flags that kubectl also accepts with a value, and what the bare form means.
_BARE = MappingProxyType({"--dry-run": "--dry-run=server", "--wait=true": "--wait",
                          "--wait=false": "--no-wait"})


def parse_duration(text: str) -> float | None:
    """--request-timeout: '30', '30s', '1m30s', '500ms'; 0 means no timeout (None)."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d*)?", t):
        seconds = float(t)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise argparse.ArgumentTypeError(
                f'invalid duration "{text}": use a number of seconds or a duration such as '
                "30s, 1m or 500ms")
    return seconds or None


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f'invalid boolean "{text}": use true or false')


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Rewrite kubectl's optional-value flags into forms argparse parses."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        out.append(_BARE.get(arg, arg))
    return out


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--config", metavar="PATH", default=default(None),
                        help="client config file (default: $SHOAL_CONFIG, else ~/.shoal/config)")
    parser.add_argument("-n", "--namespace", metavar="NS", default=default(None),
                        help="namespace for this request (default: the config's)")
    parser.add_argument("--request-timeout", metavar="DURATION", type=parse_duration,
                        default=default(None),
                        help="how long to wait for each server call (e.g. 10, 10s, 1m); "
                             "also ends get --watch")


def _dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", choices=("none", "server", "client"), default="none",
                        help="check, print what would happen, write nothing "
                             "(bare --dry-run means server)")


def _files(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("-f", "--filename", dest="files", action="append", metavar="PATH",
                        required=required, default=[],
                        help="manifest file, directory of *.yaml/*.yml/*.json, or - for stdin "
                             "(repeatable)")
    parser.add_argument("-R", "--recursive", action="store_true",
                        help="with -f DIR, include subdirectories")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Operate a Shoal cluster (kubectl-style).",
        epilog="Exit codes: 0 ok, 1 the server refused, 2 usage or bad input (nothing "
               "written), 3 cannot reach the apiserver or no usable client config.")
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("apply", parents=[common], help="create or update objects from manifests",
                       description="Create or update objects from manifests, all or nothing.")
    _files(p, required=True)
    _dry_run(p)
    p.add_argument("--wait-propagated", action="store_true",
                   help="after applying, wait until every node's meshagent has applied "
                        "the change (exit 1 naming the nodes that have not)")
    p.add_argument("--timeout", type=parse_duration, default=None, metavar="DURATION",
                   help="with --wait-propagated, give up after this long (default 60s)")

    p = sub.add_parser("diff", parents=[common], help="show what apply would change",
                       description="Show what apply would change, as a unified diff of "
                                   "YAML (server dry run). Exit codes: 0 no differences, "
                                   "1 differences, 2 or more an error.")
    _files(p, required=True)

    p = sub.add_parser("completion", parents=[common], help="shell completion script",
                       description="Print a completion script: source <(shoal completion "
                                   "bash), or the same with zsh.")
    p.add_argument("shell", choices=("bash", "zsh"))

    p = sub.add_parser("explain", parents=[common], help="describe a kind's fields",
                       description="What a kind or one of its fields means, from the "
                                   "API's own documentation: KIND[.field.path].")
    p.add_argument("target", metavar="KIND[.FIELD...]")

    p = sub.add_parser("get", parents=[common], help="list objects",
                       description="Print objects as a table, YAML, JSON or names.")
    p.add_argument("args", nargs="*", metavar="KIND[,KIND] [NAME...] | KIND/NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", default="", metavar="SELECTOR")
    p.add_argument("--field-selector", default="", metavar="SELECTOR")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="")
    p.add_argument("-w", "--watch", action="store_true",
                   help="after the list, print each change (Ctrl-C stops); resumes "
                        "by itself after a dropped stream or an apiserver restart")
    p.add_argument("--output-watch-events", action="store_true",
                   help="with --watch, show the event type (ADDED, MODIFIED, DELETED)")
    p.add_argument("--no-headers", action="store_true")
    p.add_argument("--show-labels", action="store_true")

    p = sub.add_parser("describe", parents=[common], help="show details of objects",
                       description="Show objects in detail, with their events.")
    p.add_argument("args", nargs="+", metavar="KIND [NAME...] | KIND/NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", default="", metavar="SELECTOR")

    p = sub.add_parser("delete", parents=[common], help="delete objects",
                       description="Delete objects by manifest, name or selector.")
    p.add_argument("args", nargs="*", metavar="KIND [NAME...] | KIND/NAME")
    _files(p, required=False)
    p.add_argument("-l", "--selector", default="", metavar="SELECTOR")
    p.add_argument("--all", action="store_true", help="every object of the kind(s)")
    p.add_argument("--grace-period", type=int, default=-1, metavar="SECONDS",
                   help="seconds to let pods stop (-1: the object's default)")
    p.add_argument("--cascade", default="background",
                   help="background (default), foreground or orphan")
    p.add_argument("--wait", dest="wait", action="store_true", default=False,
                   help="wait until each object is gone")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="do not wait (the default)")
    p.add_argument("--ignore-not-found", action="store_true")
    _dry_run(p)

    p = sub.add_parser("version", parents=[common], help="client and server versions")
    p.add_argument("--client", action="store_true", help="the client's only")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="")

    p = sub.add_parser("config", parents=[common], help="the client config")
    config_sub = p.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    view = config_sub.add_parser("view", parents=[common], help="print the client config")
    view.add_argument("--raw", action="store_true", help="show key material too")

    p = sub.add_parser("logs", parents=[common], help="print a container's logs",
                       description="Print the logs of a container (or of every pod of a "
                                   "workload: deploy/NAME).")
    p.add_argument("target", metavar="POD | KIND/NAME")
    p.add_argument("-c", "--container", default="")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, default=-1, help="last N lines (-1: all)")
    p.add_argument("-p", "--previous", action="store_true",
                   help="the previous instance of the container")
    p.add_argument("--timestamps", action="store_true")

    p = sub.add_parser("exec", parents=[common], help="run a command in a container",
                       description="Run a command in a running container: "
                                   "shoal exec POD [-c C] -- CMD [ARG...]")
    p.add_argument("pod", metavar="POD")
    p.add_argument("-c", "--container", default="")
    p.add_argument("--timeout", type=int, default=60, help="seconds (default 60)")
    p.add_argument("-i", "--stdin", action="store_true",
                   help="pass stdin to the command (streamed)")
    p.add_argument("-t", "--tty", action="store_true",
                   help="allocate a terminal (the local one goes raw; implies -i)")
    p.add_argument("exec_command", nargs="*", metavar="CMD",
                   help="the command and its arguments, after --")

    p = sub.add_parser("debug", parents=[common],
                       help="run an ephemeral debugging container in a pod",
                       description="Add an ephemeral container to a running pod, in its "
                                   "namespaces: shoal debug POD -it [--target C] -- sh")
    p.add_argument("pod", metavar="POD")
    p.add_argument("--image", default=DEBUG_IMAGE,
                   help=f"the container's image (default {DEBUG_IMAGE})")
    p.add_argument("-c", "--container", default="",
                   help="the debug container's name (default debugger-xxxxx)")
    p.add_argument("--target", default="",
                   help="join this container's process namespace (see its processes)")
    p.add_argument("-i", "--stdin", action="store_true", help="attach stdin")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("exec_command", nargs="*", metavar="CMD",
                   help="the command and its arguments, after --")

    p = sub.add_parser("port-forward", parents=[common],
                       help="forward local ports to a pod",
                       description="Forward local TCP ports to a pod (or a ready pod of a "
                                   "workload or Service); new connections follow a "
                                   "replaced pod.")
    p.add_argument("target", metavar="POD | KIND/NAME")
    p.add_argument("ports", nargs="+", metavar="[LOCAL:]REMOTE")
    p.add_argument("--address", action="append", default=[], metavar="ADDR",
                   help="addresses to listen on, comma-separated (default localhost)")

    p = sub.add_parser("dashboard", parents=[common], help="serve a live web dashboard locally",
                       description="Serve a web dashboard of the cluster (live through "
                                   "watches, and the mesh's service graph) on a local port, "
                                   "with your credentials; open the URL it prints (it holds a "
                                   "token made for this run).")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8001, help="port (0: any free port)")
    p.add_argument("--graph-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often the meshagents' metrics are scraped")

    p = sub.add_parser("token", parents=[common], help="bootstrap tokens for joining nodes")
    token_sub = p.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_sub.add_parser("create", parents=[common], help="make a join token")
    create.add_argument("--ttl", type=parse_duration, default=24 * 3600.0,
                        help="how long the token is valid (default 24h; 0 = forever)")
    create.add_argument("--description", default="")
    create.add_argument("--print-join-command", action="store_true",
                        help="print the full `shoal-nodeagent join` command")
    token_sub.add_parser("list", parents=[common], help="list join tokens")
    rm = token_sub.add_parser("delete", parents=[common], help="revoke join tokens")
    rm.add_argument("tokens", nargs="+", metavar="TOKEN-ID")

    p = sub.add_parser("create", parents=[common], help="create a service-account token")
    create_sub = p.add_subparsers(dest="create_command", metavar="COMMAND", required=True)
    ctoken = create_sub.add_parser("token", parents=[common],
                                   help="print a token of a service account (TokenRequest)")
    ctoken.add_argument("service_account", metavar="SERVICEACCOUNT")
    ctoken.add_argument("--audience", action="append", default=[],
                        help="who the token is for (repeatable; default: the apiserver)")
    ctoken.add_argument("--duration", type=parse_duration, default=None,
                        help="lifetime, e.g. 1h (at least 10m; default 1h)")
    ctoken.add_argument("--bound-object-kind", default="", help="Pod")
    ctoken.add_argument("--bound-object-name", default="",
                        help="the token stops working when this pod is deleted")

    p = sub.add_parser("secrets", parents=[common], help="manage Secrets at rest")
    secrets_sub = p.add_subparsers(dest="secrets_command", metavar="COMMAND", required=True)
    secrets_sub.add_parser("reencrypt", parents=[common],
                           help="rewrite every Secret under the current encryption key "
                                "(after a key rotation)")

    p = sub.add_parser("certs", parents=[common],
                       help="certificate expiry (you, the CA, apiservers, nodes); renew yours")
    certs_sub = p.add_subparsers(dest="certs_command", metavar="COMMAND")
    certs_sub.add_parser("renew", parents=[common],
                         help="renew your client certificate and rewrite the client config")

    p = sub.add_parser("auth", parents=[common], help="inspect authorization")
    auth_sub = p.add_subparsers(dest="auth_command", metavar="COMMAND", required=True)
    can_i = auth_sub.add_parser(
        "can-i", parents=[common], help="may I (or --as USER) do VERB on RESOURCE?",
        description="Print yes or no; exit 0 for yes, 1 for no.")
    can_i.add_argument("verb", metavar="VERB")
    can_i.add_argument("resource", metavar="RESOURCE", help="pods, deploy, pods/log, ...")
    can_i.add_argument("name", nargs="?", default="", metavar="NAME")
    can_i.add_argument("-A", "--all-namespaces", action="store_true")
    can_i.add_argument("--as", dest="as_user", default="", metavar="USER",
                       help="ask about this user (needs the right to impersonate them)")
    can_i.add_argument("--as-group", dest="as_groups", action="append", default=[],
                       metavar="GROUP", help="with --as: a group of that user (repeatable)")
    can_i.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing; the exit code answers")

    p = sub.add_parser("api-resources", parents=[common], help="the kinds the server serves")
    p.add_argument("--namespaced", type=parse_bool, default=None, metavar="true|false")
    p.add_argument("-o", "--output", choices=("wide", "name"), default="")
    p.add_argument("--no-headers", action="store_true")

    p = sub.add_parser("scale", parents=[common], help="set the replicas of a workload",
                       description="Set spec.replicas of deployments, replicasets and "
                                   "statefulsets.")
    p.add_argument("args", nargs="*", metavar="KIND/NAME | KIND NAME...")
    _files(p, required=False)
    p.add_argument("--replicas", type=int, required=True, metavar="N")
    p.add_argument("--current-replicas", type=int, default=-1, metavar="N",
                   help="only scale if the current replicas are N (precondition)")

    p = sub.add_parser("top", parents=[common], help="CPU and memory use of nodes or pods",
                       description="Recent CPU (millicores) and memory (Mi) use, from the "
                                   "metrics API: top nodes [NAME] | top pods [NAME].")
    p.add_argument("what", metavar="nodes|pods")
    p.add_argument("args", nargs="*", metavar="NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", default="", metavar="SELECTOR")
    p.add_argument("--containers", action="store_true",
                   help="pods: one line per container")
    p.add_argument("--sort-by", default="", metavar="cpu|memory")
    p.add_argument("--no-headers", action="store_true")

    p = sub.add_parser("rollout", parents=[common], help="manage the rollout of a workload",
                       description="Watch, undo, restart, pause and resume rollouts.")
    rollout_sub = p.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    for action, kinds in ROLLOUT_KINDS.items():
        r = rollout_sub.add_parser(action, parents=[common],
                                   help=f"rollout {action} ({', '.join(kinds).lower()})")
        r.add_argument("args", nargs="+", metavar="KIND/NAME")
        if action == "status":
            r.add_argument("--timeout", type=parse_duration, default=None, metavar="DURATION",
                           help="give up after this long (default: wait until done)")
        if action == "undo":
            r.add_argument("--to-revision", type=int, default=0, metavar="N",
                           help="the revision to go back to (default: the previous one)")
        if action == "history":
            r.add_argument("--revision", type=int, default=0, metavar="N",
                           help="show the pod template of revision N")

    p = sub.add_parser("wait", parents=[common], help="wait for a condition on objects",
                       description="Wait until objects have a condition, or are deleted.")
    p.add_argument("args", nargs="+", metavar="KIND/NAME | KIND NAME...")
    p.add_argument("--for", dest="for_", required=True, metavar="condition=TYPE[=VALUE]|delete")
    p.add_argument("-l", "--selector", default="", metavar="SELECTOR")
    p.add_argument("--timeout", type=parse_duration, default=WAIT_TIMEOUT, metavar="DURATION",
                   help="give up after this long (default 30s; 0: look once)")

    for verb, what in (("cordon", "mark a node unschedulable"),
                       ("uncordon", "mark a node schedulable again")):
        p = sub.add_parser(verb, parents=[common], help=what, description=f"{what}.")
        p.add_argument("node", metavar="NODE")
    p = sub.add_parser("drain", parents=[common], help="cordon a node and evict its pods",
                       description="Cordon NODE, then evict its pods and wait until they "
                                   "are gone.")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--ignore-daemonsets", action="store_true",
                   help="skip DaemonSet-managed pods instead of refusing")
    p.add_argument("--delete-emptydir-data", action="store_true",
                   help="evict pods with emptyDir volumes (their data is lost)")
    p.add_argument("--force", action="store_true",
                   help="also evict pods that no controller manages (they are not recreated)")
    p.add_argument("--grace-period", type=int, default=-1, metavar="SECONDS",
                   help="seconds each pod gets to stop (default: its own "
                        "terminationGracePeriodSeconds)")
    p.add_argument("--timeout", type=parse_duration, default=None, metavar="DURATION",
                   help="give up waiting after this long (default: no limit)")

    add_image_parser(sub, common)
    add_mesh_parser(sub, common)
    add_lab_parser(sub)
    add_etcd_parsers(sub)
    return parser


async def dispatch(session: Session, ns: argparse.Namespace) -> int:
    """Run the parsed command; closes the session's client when done."""
    try:
        match ns.command:
            case "apply":
                return await run_apply(session, files=ns.files, recursive=ns.recursive,
                                       dry_run=ns.dry_run, wait_propagated=ns.wait_propagated,
                                       timeout=ns.timeout)
            case "completion":
                session.out.write(completion_script(ns.shell))
                return ExitCode.OK
            case "explain":
                return run_explain(session, target=ns.target)
            case "diff":
                return await run_diff(session, files=ns.files, recursive=ns.recursive)
            case "get":
                return await run_get(session, GetOptions(
                    args=tuple(ns.args), all_namespaces=ns.all_namespaces,
                    label_selector=ns.selector, field_selector=ns.field_selector,
                    output=ns.output, watch=ns.watch, no_headers=ns.no_headers,
                    show_labels=ns.show_labels, output_watch_events=ns.output_watch_events))
            case "describe":
                return await run_describe(session, args=ns.args, label_selector=ns.selector,
                                          all_namespaces=ns.all_namespaces)
            case "delete":
                return await run_delete(session, DeleteOptions(
                    args=tuple(ns.args), files=tuple(ns.files), recursive=ns.recursive,
                    label_selector=ns.selector, all=ns.all, grace_period=ns.grace_period,
                    cascade=ns.cascade, wait=ns.wait, ignore_not_found=ns.ignore_not_found,
                    dry_run=ns.dry_run))
            case "version":
                return await run_version(session, client_only=ns.client, output=ns.output)
            case "config":
                return run_config_view(session, raw=ns.raw)
            case "logs":
                return await run_logs(session, target=ns.target, container=ns.container,
                                      follow=ns.follow, tail=None if ns.tail < 0 else ns.tail,
                                      previous=ns.previous, timestamps=ns.timestamps)
            case "exec" if ns.stdin or ns.tty:
                return await run_exec_interactive(session, pod=ns.pod, container=ns.container,
                                                  command=ns.exec_command, tty=ns.tty)
            case "debug":
                return await run_debug(session, pod=ns.pod, image=ns.image, name=ns.container,
                                       target=ns.target, command=ns.exec_command,
                                       stdin=ns.stdin, tty=ns.tty)
            case "dashboard":
                return await run_dashboard(session, address=ns.address, port=ns.port,
                                           graph_interval=ns.graph_interval)
            case "port-forward":
                return await run_port_forward(session, target=ns.target, ports=ns.ports,
                                              addresses=ns.address)
            case "exec":
                return await run_exec(session, pod=ns.pod, container=ns.container,
                                      command=ns.exec_command, timeout=ns.timeout)
            case "token":
                if ns.token_command == "create":
                    return await run_token_create(session, ttl=ns.ttl,
                                                  description=ns.description,
                                                  print_join_command=ns.print_join_command)
                if ns.token_command == "list":
                    return await run_token_list(session)
                return await run_token_delete(session, token_ids=ns.tokens)
            case "secrets":
                return await run_secrets_reencrypt(session)
            case "certs":
                if ns.certs_command == "renew":
                    return await run_certs_renew(session)
                return await run_certs(session)
            case "create":
                return await run_create_token(
                    session, service_account=ns.service_account, audiences=ns.audience,
                    duration=ns.duration, bound_kind=ns.bound_object_kind,
                    bound_name=ns.bound_object_name)
            case "auth":
                return await run_can_i(session, verb=ns.verb, resource=ns.resource,
                                       name=ns.name, all_namespaces=ns.all_namespaces,
                                       as_user=ns.as_user, as_groups=ns.as_groups,
                                       quiet=ns.quiet)
            case "api-resources":
                return await run_api_resources(session, namespaced=ns.namespaced,
                                               output=ns.output, headers=not ns.no_headers)
            case "scale":
                return await run_scale(session, args=ns.args, files=ns.files,
                                       recursive=ns.recursive, replicas=ns.replicas,
                                       current_replicas=ns.current_replicas)
            case "top":
                return await run_top(session, what=ns.what, args=ns.args, selector=ns.selector,
                                     all_namespaces=ns.all_namespaces,
                                     containers=ns.containers, sort_by=ns.sort_by,
                                     headers=not ns.no_headers)
            case "rollout":
                return await run_rollout(session, action=ns.rollout_command, args=ns.args,
                                         to_revision=getattr(ns, "to_revision", 0),
                                         revision=getattr(ns, "revision", 0),
                                         timeout=getattr(ns, "timeout", None))
            case "wait":
                return await run_wait(session, args=ns.args, for_=ns.for_,
                                      label_selector=ns.selector, timeout=ns.timeout)
            case "cordon" | "uncordon":
                return await run_cordon(session, node=ns.node, cordon=ns.command == "cordon")
            case "drain":
                return await run_drain(session, node=ns.node, options=DrainOptions(
                    force=ns.force, ignore_daemonsets=ns.ignore_daemonsets,
                    delete_emptydir_data=ns.delete_emptydir_data),
                    grace_period=None if ns.grace_period < 0 else ns.grace_period,
                    timeout=ns.timeout)
            case "image":
                return await run_image_import(session, archive=ns.archive, nodes=ns.nodes)
            case "mesh":
                return await run_mesh(session, ns)
        raise CLIError(f"unknown command {ns.command!r}")  # pragma: no cover - argparse
    finally:
        await session.aclose()


def _silence_stdout() -> None:
    """After a broken pipe (``shoal get pods | head``), drop further output."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _complete(words: list[str]) -> int:
    """The hidden ``shoal __complete WORD...``: candidates, one per line."""
    config = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"), None)

    async def lister(kind: str, namespace: str | None) -> list[str]:
        session = Session(kinds=builtin_kinds(), out=sys.stdout, err=sys.stderr,
                          stdin=sys.stdin, config_path=config, namespace_flag=namespace,
                          request_timeout=5.0)
        try:
            k = session.kinds.by_name(kind)
            found = await session.client().list(
                k.message, namespace=session.namespace if k.namespaced else "")
            items: list[Any] = list(found.items)
            return sorted(o.metadata.name for o in items)
        except CLIError:
            return []
        finally:
            await session.aclose()

    words_out = run_complete(build_parser(), builtin_kinds(), words, lister_for=lambda: lister)
    try:
        print("\n".join(words_out))
    except BrokenPipeError:
        _silence_stdout()
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``shoal`` command; returns its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["__complete"]:
        return _complete(arguments[1:])
    # Everything after the first "--" is a command line for `exec`, not our flags.
    tail: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, tail = arguments[:cut], arguments[cut + 1:]
    try:
        ns = build_parser().parse_args(normalize_argv(arguments))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT
    if tail:
        if ns.command not in ("exec", "debug"):
            print(f"shoal: error: {ns.command} takes no arguments after --", file=sys.stderr)
            return ExitCode.BAD_INPUT
        ns.exec_command = [*ns.exec_command, *tail]
    if ns.command == "lab":
        return run_lab(ns)
    if ns.command in ("etcd", "status"):
        return run_etcd(ns)
    if ns.command == "image" and ns.image_command != "import":
        try:
            return run_image_local(ns)
        except (CLIError, errors.ShoalError, OSError) as e:
            for line in error_lines(e):
                print(line, file=sys.stderr)
            return exit_code_for(e)
    session = Session(kinds=builtin_kinds(), out=sys.stdout, err=sys.stderr, stdin=sys.stdin,
                      config_path=ns.config, namespace_flag=ns.namespace,
                      request_timeout=ns.request_timeout)
    try:
        return asyncio.run(dispatch(session, ns))
    except KeyboardInterrupt:
        # Ctrl-C is how a watch is meant to end.
        return ExitCode.OK if getattr(ns, "watch", False) or \
            ns.command in ("port-forward", "dashboard") \
            else 130
    except BrokenPipeError:
        _silence_stdout()
        return ExitCode.OK
    except (CLIError, errors.ShoalError, OSError) as e:
        for line in error_lines(e):
            session.warn(line)
        return exit_code_for(e)


if __name__ == "__main__":
    sys.exit(main())
