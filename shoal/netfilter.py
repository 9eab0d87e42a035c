"""The ``iptables`` binaries, run as subprocesses: what the node agent's service
proxy and the mesh agent's capture share (the xtables lock: ``-w``)."""
from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Sequence

from shoal import errors


async def run(cmd: Sequence[str], *, stdin: bytes | None = None, check: bool = True
              ) -> tuple[int, str]:
    """Run ``cmd``; (exit code, stdout). A failure raises ``Unavailable`` when ``check``."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    code = proc.returncode or 0
    if check and code != 0:
        raise errors.Unavailable(f"{' '.join(cmd[:3])} failed ({code}): "
                                 f"{err.decode(errors='replace').strip()}", retry_after=1.0)
    return code, out.decode(errors="replace")


class IptablesCommands:
    """``*-save``/``*-restore`` of one backend in the namespace we run in."""

    def __init__(self, *, binary: str = "iptables", wait_seconds: int = 5) -> None:
        self.binary = binary
        self.wait = str(wait_seconds)

    async def save(self, table: str) -> str:
        return (await run([f"{self.binary}-save", "-t", table]))[1]

    async def restore(self, text: str) -> None:
        await run([f"{self.binary}-restore", "-w", self.wait, "--noflush"],
                  stdin=text.encode())


def lines_about(save: str, ours: Callable[[str], bool], *,
                tables: bool = False) -> list[str]:
    """The lines of ``iptables-save`` output about the chains ``ours`` accepts
    (pure): their declarations (counters dropped), the rules in them, and the
    jumps to them; with ``tables``, the ``*table`` headers too."""
    out: list[str] = []
    for line in save.splitlines():
        if line.startswith("*"):
            if tables:
                out.append(line)
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if ours(name):
                out.append(":" + name)
        elif line.startswith("-A "):
            words = line.split()
            target = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
            if ours(words[1]) or ours(target):
                out.append(line)
    return out
