"""Progress of long operations, on stderr and only on a terminal.

    line = ProgressLine(session.err)        # off when stderr is not a terminal
    line.update("evicted 2 of 5 pods")      # rewrites the line in place
    line.clear()                            # before printing a normal line, and at the end

The line never goes to stdout, so ``-o json`` output and pipes see nothing of
it, and it is not written at all when stderr is a file or a pipe (CI logs).
"""

from __future__ import annotations

from typing import TextIO

_CLEAR = "\r\033[K"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLine:
    def __init__(self, stream: TextIO, *, enabled: bool | None = None) -> None:
        self.stream = stream
        self.enabled = is_terminal(stream) if enabled is None else enabled
        self.shown = ""

    def update(self, text: str) -> None:
        if not self.enabled or text == self.shown:
            return
        self.stream.write(_CLEAR + text)
        self.stream.flush()
        self.shown = text

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self.shown = ""


def bar(done: int, total: int, *, width: int = 20) -> str:
    """``[#######.............] 7/20``"""
    if total <= 0:
        return f"[{'.' * width}] 0/0"
    filled = min(width, done * width // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
