"""Reading manifests from ``-f`` arguments: files, directories and stdin.

``-f DIR`` takes every ``*.yaml``, ``*.yml`` and ``*.json`` file in it, sorted
by name; with ``-R`` it descends into subdirectories too. ``-f -`` reads stdin
(once). Every unreadable path and every YAML syntax error is collected, and all
of them are raised together as one :class:`InputError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from shoal import errors
from shoal.cli.reporting import InputError
from shoal.manifests import Document, load_documents

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
STDIN_NAME = "STDIN"


def manifest_paths(directory: Path, *, recursive: bool) -> list[Path]:
    """The manifest files in a directory, sorted; subdirectories only when recursive."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in directory.glob(pattern)
                  if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES)


def read_manifests(sources: Sequence[str], *, recursive: bool, stdin: TextIO) -> list[Document]:
    """Every document in the given ``-f`` sources, in order. Raises InputError."""
    problems: list[str] = []
    docs: list[Document] = []
    stdin_read = False
    for source in sources:
        if source == "-":
            if stdin_read:
                problems.append("stdin (-) can be given to -f only once")
                continue
            stdin_read = True
            texts = [(STDIN_NAME, stdin.read())]
        else:
            path = Path(source)
            if path.is_dir():
                files = manifest_paths(path, recursive=recursive)
                if not files:
                    problems.append(f'no manifest files (*.yaml, *.yml, *.json) in "{source}"')
            elif path.exists():
                files = [path]
            else:
                problems.append(f'the path "{source}" does not exist')
                continue
            texts = []
            for f in files:
                try:
                    texts.append((str(f), f.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError) as e:
                    problems.append(f'cannot read "{f}": {getattr(e, "strerror", None) or e}')
        for name, text in texts:
            try:
                docs.extend(load_documents(text, source=name))
            except errors.Invalid as e:
                problems.append(str(e))
    if problems:
        raise InputError(problems)
    return docs
