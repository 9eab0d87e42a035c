"""``shoal image build|push|import``: OCI images without Docker or the internet.

    shoal image build -t NAME[:TAG] [-f SPEC.yaml] [DIR] -o OUT.tar
    shoal image build --sandbox [-t shoal/pause:1] -o pause.tar
    shoal image push OUT.tar REGISTRY/NAME[:TAG] [--insecure]
    shoal image import OUT.tar [--node NAME]...

``build`` and ``push`` work locally and need no client config; ``import``
goes through the apiserver to each node agent (every node, or those named).

- build: the image is busybox (Debian's busybox-static) plus DIR's tree and
  the spec's files (the spec wins where both name a path). DIR's
  ``shoal-image.yaml``, when there is one and no ``-f``, is the spec, and is
  not copied into the image. See :mod:`shoal.images` for the spec's fields.
  Deterministic: the same inputs give the same digests.
- push: the OCI distribution API (:mod:`shoal.pushing`); blobs the registry
  has are skipped, so pushing again is cheap and safe.
- import: one stream per node, all at once; a line per node, and exit code 1
  if any node failed (the others still got the image). The archive's image
  name and digest go with it, and each node checks them.

Exit codes as everywhere (docs/cli.md): 2 for a bad spec, archive or argument
(nothing done), 1 when a registry or node refused, 3 when the registry or the
apiserver cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shoal import errors, images, pushing
from shoal.api.core.v1 import core_pb2
from shoal.cli.progress import ProgressLine, bar
from shoal.cli.reporting import CLIError, ExitCode, InputError, UsageError
from shoal.cli.session import Session
from shoal.manifests import load_documents


class RegistryRefused(CLIError):
    """The registry refused the push (or wants credentials)."""

    exit_code = ExitCode.SERVER_REFUSED


class RegistryUnreachable(CLIError):
    exit_code = ExitCode.UNREACHABLE


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    """Add ``image`` and its commands to the ``shoal`` parser."""
    p = sub.add_parser("image", parents=[common], help="build, push and import OCI images",
                       description="Build OCI images from busybox and a spec or directory, "
                                   "push them to a registry, import them into the nodes.")
    cmds = p.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    b = cmds.add_parser("build", parents=[common], help="build an OCI image archive",
                        description="Build an OCI image-layout archive from busybox plus a "
                                    "spec (-f, or DIR/shoal-image.yaml) and/or DIR's tree.")
    b.add_argument("-t", "--tag", default="", metavar="NAME[:TAG]",
                   help="the image's name (default: the spec's name; with --sandbox "
                        f"{images.SANDBOX_IMAGE})")
    b.add_argument("-f", "--file", type=Path, default=None, metavar="SPEC.yaml",
                   help="the image spec (default: DIR/shoal-image.yaml if there is one)")
    b.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.tar",
                   help="where to write the archive")
    b.add_argument("--sandbox", action="store_true",
                   help="the pod sandbox (pause) image: busybox sleeping for ever")
    b.add_argument("directory", nargs="?", type=Path, default=None, metavar="DIR",
                   help="a directory whose tree becomes the image's root")
    u = cmds.add_parser("push", parents=[common], help="push an archive to a registry",
                        description="Push an image archive over the OCI distribution API.")
    u.add_argument("archive", type=Path, metavar="OUT.tar")
    u.add_argument("target", metavar="REGISTRY/NAME[:TAG]")
    u.add_argument("--insecure", action="store_true",
                   help="plain HTTP (a lab registry); default HTTPS")
    u.add_argument("--timeout", type=float, default=pushing.DEFAULT_TIMEOUT,
                   help=f"seconds per request (default {pushing.DEFAULT_TIMEOUT:g})")
    i = cmds.add_parser("import", parents=[common],
                        help="load an archive into the nodes' containerd",
                        description="Load an image archive into every node's containerd (or "
                                    "the named nodes'), through the apiserver.")
    i.add_argument("archive", type=Path, metavar="OUT.tar")
    i.add_argument("--node", dest="nodes", action="append", default=[], metavar="NAME",
                   help="only this node (repeatable; default: every node)")


def run_image_local(ns: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """``build`` and ``push``: no client config, no event loop of their own.
    Output goes to ``out`` (default: stdout)."""
    out = out or sys.stdout
    if ns.image_command == "push":
        return push(archive=ns.archive, target=ns.target, insecure=ns.insecure,
                    timeout=ns.timeout, out=out)
    try:
        return build(tag=ns.tag, spec_file=ns.file, directory=ns.directory,
                     output=ns.output, sandbox=ns.sandbox, out=out)
    except images.SpecError as e:
        raise InputError(e.problems) from e
    except errors.ShoalError as e:
        raise InputError([e.message]) from e


def _read_spec(path: Path) -> images.ImageSpec:
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError([f"cannot read the image spec {path}: {e.strerror or e}"]) from e
    try:
        docs = load_documents(text, source=str(path))
    except errors.ShoalError as e:
        raise InputError([e.message]) from e
    if len(docs) > 1:
        raise InputError([f"{path}: holds {len(docs)} documents; an image spec is one"])
    return images.parse_spec(docs[0].data if docs else {}, base_dir=path.parent,
                             source=str(path))


def build(*, tag: str, spec_file: Path | None, directory: Path | None, output: Path,
          sandbox: bool, out: TextIO) -> int:
    if sandbox:
        if spec_file is not None or directory is not None:
            raise UsageError("--sandbox takes no spec or directory")
        ref = images.build_sandbox_image(output, name=tag or images.SANDBOX_IMAGE)
    else:
        if directory is not None and not directory.is_dir():
            raise InputError([f"{directory}: not a directory"])
        if spec_file is None and directory is not None \
                and (directory / images.SPEC_FILE).is_file():
            spec_file = directory / images.SPEC_FILE
        spec = _read_spec(spec_file) if spec_file is not None else images.ImageSpec()
        tree = (images.tree_files(directory, exclude=[spec_file] if spec_file else [])
                if directory is not None else None)
        if tag:
            try:
                images.normalize_reference(tag)
            except errors.BadRequest as e:
                raise UsageError(f"-t {tag!r}: not an image reference") from e
        ref = images.build_from_spec(output, spec, name=tag, tree=tree)
    size = ref.archive.stat().st_size
    out.write(f"built {ref.name} {ref.digest} -> {ref.archive} ({size} bytes)\n")
    out.flush()
    return ExitCode.OK


def push(*, archive: Path, target: str, insecure: bool, timeout: float, out: TextIO,
         err: TextIO | None = None) -> int:
    # On a terminal, stderr also shows the bytes sent of all the blobs.
    line = ProgressLine(err if err is not None else sys.stderr)

    def say(text: str) -> None:
        line.clear()
        out.write(text + "\n")
        out.flush()

    def moved(done: int, total: int) -> None:
        line.update(f"pushing {bar(done // 1024, total // 1024)} KiB")

    try:
        result = pushing.push_archive(archive, target, insecure=insecure, timeout=timeout,
                                      progress=say, on_bytes=moved)
    except (errors.Unauthorized, errors.Forbidden, pushing.RegistryError) as e:
        raise RegistryRefused(f"push to {target} failed: {e.message}") from e
    except errors.Unavailable as e:
        raise RegistryUnreachable(f"push to {target} failed: {e.message}") from e
    except errors.ShoalError as e:
        raise InputError([f"push of {archive}: {e.message}"]) from e
    finally:
        line.clear()
    say(f"pushed {result.reference_by_digest}")
    return ExitCode.OK


@dataclass(frozen=True)
class _Outcome:
    node: str
    line: str
    ok: bool


async def run_image_import(session: Session, *, archive: Path, nodes: list[str]) -> int:
    """Import ``archive`` on ``nodes`` (every node when empty), concurrently."""
    try:
        found = await asyncio.to_thread(images.inspect_archive, archive)
    except errors.ShoalError as e:
        raise InputError([f"{archive}: {e.message}"]) from e
    named = [i for i in found if i.name]
    if not named:
        raise InputError([f"{archive}: its index.json names no image"])
    image = named[0]
    client = session.client()
    if not nodes:
        nodes = sorted(n.metadata.name for n in (await client.list(core_pb2.Node)).items)
        if not nodes:
            raise errors.NotFound("the cluster has no nodes to import into")

    async def one(node: str) -> _Outcome:
        try:
            r = await client.import_image(node, archive, image=image.name,
                                          digest=image.digest)
        except errors.ShoalError as e:
            return _Outcome(node, f"{node}: import failed: {e.message}", ok=False)
        return _Outcome(node, f"{node}: imported {r.image} {r.digest}", ok=True)

    outcomes = await asyncio.gather(*(one(n) for n in nodes))
    for o in outcomes:
        (session.out if o.ok else session.err).write(o.line + "\n")
    session.out.flush()
    session.err.flush()
    return ExitCode.OK if all(o.ok for o in outcomes) else ExitCode.SERVER_REFUSED
