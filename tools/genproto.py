#!/usr/bin/env python3
"""Regenerate the checked-in protobuf and gRPC code under shoal/api from proto/.

    python tools/genproto.py          # rewrite shoal/api
    python tools/genproto.py --check  # exit 1 and name the files if shoal/api is stale

The generator is grpcio-tools (pinned in pyproject.toml) so the output is reproducible.
Besides the code it writes shoal/api/comments.json: each message's and field's
leading comment from the .proto files (protoc's SourceCodeInfo, which the
generated descriptors do not keep), for ``shoal explain``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_PACKAGE = Path("shoal") / "api"
HEADER = '"""Generated from proto/ by tools/genproto.py. Do not edit by hand."""\n'


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto file into out_root; return the files written."""
    import grpc_tools
    from grpc_tools import protoc  # type: ignore[import-untyped]

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "all.pb"
        if protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", "--include_source_info",
                        f"--descriptor_set_out={descriptors}", *protos]) != 0:
            raise SystemExit("protoc failed (descriptor set)")
        comments = proto_comments(descriptors.read_bytes())
    (out_root / OUT_PACKAGE).mkdir(parents=True, exist_ok=True)
    (out_root / OUT_PACKAGE / "comments.json").write_text(
        json.dumps(comments, indent=1, sort_keys=True) + "\n")
    pkg = out_root / OUT_PACKAGE
    for directory in [pkg, *(d for d in pkg.rglob("*") if d.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text(HEADER)
    (out_root / "shoal" / "api" / "py.typed").write_text("")
    return sorted(p for p in pkg.rglob("*") if p.is_file())


def proto_comments(descriptor_set: bytes) -> dict[str, dict[str, str]]:
    """{full message name: {"": the message's comment, field name: its comment}}
    from a FileDescriptorSet with source info (leading comments, else trailing)."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    out: dict[str, dict[str, str]] = {}
    for f in fds.file:
        where = {tuple(loc.path): (loc.leading_comments or loc.trailing_comments).strip()
                 for loc in f.source_code_info.location}
        _walk(list(f.message_type), f.package, (4,), where, out)
    return out


def _walk(messages: list[Any], prefix: str, path: tuple[int, ...],
          where: dict[tuple[int, ...], str], out: dict[str, dict[str, str]]) -> None:
    for i, m in enumerate(messages):
        name = f"{prefix}.{m.name}"
        here = (*path, i)
        docs = {"": where.get(here, "")}
        for j, field in enumerate(m.field):
            docs[field.name] = where.get((*here, 2, j), "")
        out[name] = {k: " ".join(v.split()) if k else v for k, v in docs.items()
                     if v or not k}
        _walk(list(m.nested_type), name, (*here, 3), where, out)


def stale_files() -> list[str]:
    """Names of generated files that differ from, or are missing in, the tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        fresh_rel = {p.relative_to(tmp) for p in fresh}
        current = {p.relative_to(ROOT) for p in (ROOT / OUT_PACKAGE).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        stale = [str(r) for r in sorted(fresh_rel)
                 if not (ROOT / r).exists() or not filecmp.cmp(Path(tmp) / r, ROOT / r,
                                                              shallow=False)]
        stale += [f"{r} (no longer generated)" for r in sorted(current - fresh_rel)]
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    ns = parser.parse_args()
    if ns.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}")
        if stale:
            print("run: python tools/genproto.py", file=sys.stderr)
        return 1 if stale else 0
    target = ROOT / OUT_PACKAGE
    if target.exists():
        shutil.rmtree(target)
    generate(ROOT)
    print(f"regenerated {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
