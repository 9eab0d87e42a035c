"""``python -m shoal.bootstrap``: render, start and check one machine's components.

    show   COMPONENT            the exact command line (as the lab and systemd run it)
    render [COMPONENT...]       write the files the components read (idempotent)
    exec   COMPONENT            render, then exec the command (systemd's ExecStart)
    wait   COMPONENT            until its health endpoint answers 200
    seed                        build the demo and pause images, push them to the registry
    token  --publish FILE       (control plane) a join token + CA pin, as a sourceable file
    join   --token-file FILE    (node) join the cluster with a published token
    routes                      (mesh-only host) routes to the pod CIDRs and the service
                                CIDR through the nodes, from the Nodes the API lists
    check                       doctor: what this machine needs and whether it serves

Every command takes ``--spec FILE`` (default /etc/shoal/bootstrap.yaml). Exit
codes: 0 done, 1 failed (the message says why), 2 bad arguments or spec.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from shoal import bootstrap, errors
from shoal.bootstrap import Spec
from shoal.bootstrap.doctor import doctor

TOKEN_TTL = dt.timedelta(hours=24)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _say(text: str) -> None:
    print(f"shoal-bootstrap: {text}", file=sys.stderr, flush=True)


def _ok(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2.0) as answer:
            return int(answer.status) == 200
    except (OSError, ValueError):
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.bootstrap",
                                description=(__doc__ or "").splitlines()[0])
    p.add_argument("--spec", type=Path, default=bootstrap.DEFAULT_SPEC,
                   help=f"this machine's bootstrap spec (default {bootstrap.DEFAULT_SPEC})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="print a component's command line")
    s.add_argument("component", choices=bootstrap.COMPONENTS)
    s = sub.add_parser("render", help="write the components' files")
    s.add_argument("components", nargs="*", metavar="COMPONENT")
    s = sub.add_parser("exec", help="render, then exec the component (systemd's ExecStart)")
    s.add_argument("component", choices=bootstrap.COMPONENTS)
    s = sub.add_parser("wait", help="wait until the component's health endpoint answers")
    s.add_argument("component", choices=bootstrap.COMPONENTS)
    s.add_argument("--timeout", type=float, default=90.0)
    sub.add_parser("seed", help="push the demo and pause images to the cluster registry")
    s = sub.add_parser("token", help="create a join token and publish it to a file")
    s.add_argument("--publish", type=Path, required=True)
    s.add_argument("--ttl-hours", type=float, default=TOKEN_TTL.total_seconds() / 3600)
    s = sub.add_parser("join", help="join this node with a published token")
    s.add_argument("--token-file", type=Path, required=True)
    sub.add_parser("routes", help="(mesh-only host) routes to the pods and Services")
    sub.add_parser("check", help="doctor: check this machine's components")
    return p


def _show(spec: Spec, component: str) -> int:
    print(shlex.join(bootstrap.command(spec, component, python=sys.executable).argv))
    return 0


def _render(spec: Spec, components: Sequence[str]) -> int:
    for component in components or spec.components():
        for path in bootstrap.render(spec, component):
            _say(f"{component}: wrote {path}")
    return 0


def _exec(spec: Spec, component: str) -> int:
    cmd = bootstrap.command(spec, component, python=sys.executable)
    bootstrap.render(spec, component)
    _say(f"{component}: exec {shlex.join(cmd.argv)}")
    program = shutil.which(cmd.argv[0], path=_path())
    if program is None:
        raise errors.BadRequest(f"{cmd.argv[0]} is not installed (PATH={_path()})")
    os.execv(program, list(cmd.argv))


def _path() -> str:
    path = os.environ.get("PATH", "") or "/usr/bin:/bin"
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if extra not in path.split(os.pathsep):
            path += os.pathsep + extra
    return path


def _wait(spec: Spec, component: str, timeout: float) -> int:
    cmd = bootstrap.command(spec, component, python=sys.executable)
    if not cmd.ready_url:
        raise errors.BadRequest(f"{component} has no health endpoint (it tells systemd "
                                "itself when it is ready)")
    deadline = time.monotonic() + timeout
    while not _ok(cmd.ready_url):
        if time.monotonic() > deadline:
            _say(f"{component}: {cmd.ready_url} did not answer 200 in {timeout:g}s")
            return 1
        time.sleep(0.5)
    _say(f"{component}: {cmd.ready_url} answers")
    return 0


def _seed(spec: Spec) -> int:
    cp = spec.control_plane
    if cp is None:
        raise errors.BadRequest("seed runs on the control plane (no controlPlane section)")
    for pushed in bootstrap.seed_registry(cp.registry, images_dir=cp.data_dir / "images"):
        _say(f"pushed {pushed}")
    return 0


def _token(spec: Spec, publish: Path, ttl: dt.timedelta) -> int:
    from shoal import config as configmod
    from shoal import tokens
    from shoal.api.core.v1 import core_pb2
    from shoal.client import Client

    cp = spec.control_plane
    if cp is None:
        raise errors.BadRequest("token runs on the control plane (no controlPlane section)")
    cfg = configmod.load(cp.admin_config)
    ca_hash = tokens.ca_cert_hash(cfg.ca_pem)
    with Client(cfg, timeout=15.0) as client:
        old = _published(publish)
        if old.get("SHOAL_CA_CERT_HASH") == ca_hash and old.get("SHOAL_JOIN_TOKEN"):
            try:
                token = tokens.parse(old["SHOAL_JOIN_TOKEN"])
                secret = client.get(core_pb2.Secret, f"bootstrap-token-{token.id}",
                                    namespace="kube-system")
                when = tokens.expiration(secret)
                if when is None or when - dt.datetime.now(dt.UTC) > dt.timedelta(hours=1):
                    _say(f"join token {token.id} in {publish} is still valid; kept")
                    return 0
            except errors.ShoalError as e:
                _say(f"the token in {publish} is not usable ({e}); making a new one")
        token = tokens.generate()
        client.create(tokens.to_secret(token, ttl=ttl, description="shoal bootstrap"))
    publish.parent.mkdir(parents=True, exist_ok=True)
    tmp = publish.with_name(publish.name + ".tmp")
    tmp.write_text(f"# made by python -m shoal.bootstrap token; valid {ttl}\n"
                   f"SHOAL_JOIN_TOKEN={token}\nSHOAL_CA_CERT_HASH={ca_hash}\n"
                   f"SHOAL_API_SERVER={cp.api_server}\n")
    try:
        tmp.chmod(0o600)
    except OSError as e:  # shared folders (vboxsf) may refuse it; the token still works
        _say(f"could not restrict {tmp} to its owner: {e}")
    tmp.replace(publish)
    _say(f"join token {token.id} published to {publish} (valid {ttl})")
    return 0


def _published(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    found = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            found[key] = value
    return found


def _join(spec: Spec, token_file: Path) -> int:
    node = spec.node
    if node is None:
        raise errors.BadRequest("join runs on a node (no node section)")
    published = _published(token_file)
    missing = [k for k in ("SHOAL_JOIN_TOKEN", "SHOAL_CA_CERT_HASH") if not published.get(k)]
    if missing:
        raise errors.BadRequest(f"{token_file} has no {missing[0]} (publish one on the control "
                                "plane: python -m shoal.bootstrap token --publish FILE)")
    argv = bootstrap.join_command(node, token=published["SHOAL_JOIN_TOKEN"],
                                  ca_cert_hash=published["SHOAL_CA_CERT_HASH"],
                                  python=sys.executable)
    node.data_dir.mkdir(parents=True, exist_ok=True)
    shown = [("<token>" if a == published["SHOAL_JOIN_TOKEN"] else a) for a in argv]
    _say(f"join: exec {shlex.join(shown)}")
    os.execv(argv[0], list(argv))


def _routes(spec: Spec) -> int:
    node = spec.node
    if node is None or not node.mesh_host:
        raise errors.BadRequest("routes is for a mesh-only host (node.meshHost: true); a "
                                "node agent keeps its node's routes itself")
    routes = bootstrap.mesh_host_routes_from_api(node)
    if not routes:
        _say("routes: no Node has a pod CIDR and an address yet; none added")
    for destination, via in routes:
        argv = ["ip", "route", "replace", destination, "via", via]
        _say(f"routes: {shlex.join(argv)}")
        subprocess.run(argv, check=True)
    return 0


def _check(spec: Spec) -> int:
    problems = 0
    for line, good in doctor(spec, python=sys.executable, http_ok=_ok):
        print(f"{'ok  ' if good else 'FAIL'}  {line}")
        problems += not good
    print(f"\n{problems} problem{'s' if problems != 1 else ''}" if problems else
          "\neverything this machine runs looks right")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        spec = bootstrap.load(ns.spec)
        if ns.command == "show":
            return _show(spec, ns.component)
        if ns.command == "render":
            return _render(spec, ns.components)
        if ns.command == "exec":
            return _exec(spec, ns.component)
        if ns.command == "wait":
            return _wait(spec, ns.component, ns.timeout)
        if ns.command == "seed":
            return _seed(spec)
        if ns.command == "token":
            return _token(spec, ns.publish, dt.timedelta(hours=ns.ttl_hours))
        if ns.command == "join":
            return _join(spec, ns.token_file)
        if ns.command == "routes":
            return _routes(spec)
        return _check(spec)
    except errors.BadRequest as e:
        _say(str(e.message))
        return 2
    except (errors.ShoalError, OSError, subprocess.CalledProcessError) as e:
        _say(f"{ns.command} failed: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
