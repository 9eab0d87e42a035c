"""Container logs from the files the runtime writes (the CRI log format).

Each line of a CRI log file is::

    2026-11-26T19:30:00.123456789Z stdout F hello world
    <RFC 3339 time>                <stream> <P: partial | F: full> <text>

A ``P`` line continues on the next one; ``F`` ends a line. Files live at
``<log dir>/<namespace>_<pod>_<uid>/<container>/<attempt>.log``, so
``--previous`` is the file of the attempt before the newest.

``read_logs`` yields decoded text: the last ``tail`` lines (all when None),
then, when ``follow`` is set, whatever is appended until the caller stops
iterating (or ``until`` says the container is gone and the file is drained).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LogLine:
    time: str
    stream: str
    text: str  # with its trailing newline when the line is complete


def parse_line(raw: bytes) -> LogLine | None:
    parts = raw.rstrip(b"\n").split(b" ", 3)
    if len(parts) < 3:
        return None
    when, stream, tag = (p.decode("utf-8", "replace") for p in parts[:3])
    text = parts[3].decode("utf-8", "replace") if len(parts) == 4 else ""
    return LogLine(when, stream, text if tag == "P" else text + "\n")


def pod_log_dir(root: Path, namespace: str, name: str, uid: str) -> Path:
    return root / f"{namespace}_{name}_{uid}"


def container_logs(pod_dir: Path, container: str) -> list[Path]:
    """The container's log files, oldest attempt first."""
    d = pod_dir / container
    if not d.exists():
        return []

    def attempt(p: Path) -> int:
        try:
            return int(p.stem)
        except ValueError:
            return -1

    return sorted((p for p in d.glob("*.log") if attempt(p) >= 0), key=attempt)


def _complete(lines: list[LogLine]) -> list[str]:
    out, partial = [], ""
    for ln in lines:
        partial += ln.text
        if partial.endswith("\n"):
            out.append(partial)
            partial = ""
    if partial:
        out.append(partial)
    return out


async def read_logs(path: Path, *, tail: int | None = None, follow: bool = False,
                    timestamps: bool = False, done: Callable[[], bool] = lambda: True,
                    poll: float = 0.2) -> AsyncIterator[str]:
    """Decoded log text of one file. See the module docstring."""
    with open(path, "rb") as f:  # noqa: ASYNC230 - a local file, read in small chunks
        parsed = [p for p in (parse_line(raw) for raw in f.readlines()) if p is not None]
        buf = b""
        texts = _complete(parsed)
        stamps = [p.time for p in parsed if p.text.endswith("\n")]
        chosen = texts if tail is None else (texts[-tail:] if tail > 0 else [])
        offset = len(texts) - len(chosen)
        for i, text in enumerate(chosen):
            when = stamps[offset + i] if offset + i < len(stamps) else ""
            yield f"{when} {text}" if timestamps and when else text
        if not follow:
            return
        pending: deque[LogLine] = deque()
        while True:
            chunk = f.read(65536)
            if not chunk:
                if done():
                    return
                await asyncio.sleep(poll)
                continue
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                ln = parse_line(raw)
                if ln is None:
                    continue
                pending.append(ln)
                if ln.text.endswith("\n"):
                    text = "".join(p.text for p in pending)
                    pending.clear()
                    yield f"{ln.time} {text}" if timestamps else text


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
