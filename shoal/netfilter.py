"""The ``iptables`` binaries, run as subprocesses: what the node agent's service
proxy and the mesh agent's capture share (the xtables lock: ``-w``)."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Sequence

from shoal import errors, spawning
from shoal.queueing import wait_any, wait_set

log = logging.getLogger("shoal.netfilter")


async def run(cmd: Sequence[str], *, stdin: bytes | None = None, check: bool = True
              ) -> tuple[int, str]:
    """Run ``cmd``; (exit code, stdout). A failure raises ``Unavailable`` when ``check``."""
    done = await spawning.spawn(cmd, stdin=stdin)
    code = done.returncode
    if check and code != 0:
        raise errors.Unavailable(f"{' '.join(cmd[:3])} failed ({code}): "
                                 f"{done.stderr.decode(errors='replace').strip()}",
                                 retry_after=1.0)
    return code, done.stdout.decode(errors="replace")


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


def removal(save: str, table: str, ours: Callable[[str], bool]) -> str | None:
    """One ``iptables-restore --noflush`` input that deletes every jump from
    other chains to ours, then flushes and deletes our chains (pure); None when
    ``save`` (of ``table``) holds nothing of ours."""
    lines = lines_about(save, ours)
    chains = [line[1:] for line in lines if line.startswith(":")]
    jumps = [line for line in lines if line.startswith("-A ") and not ours(line.split()[1])]
    if not chains and not jumps:
        return None
    return "\n".join([f"*{table}", *(f":{c} - [0:0]" for c in chains),
                      *("-D" + j[2:] for j in jumps), *(f"-X {c}" for c in chains),
                      "COMMIT"]) + "\n"


def remove_ours(table: str, ours: Callable[[str], bool], *, binary: str = "iptables",
                netns: str | None = None, attempts: int = 5) -> str:
    """Remove our chains and every jump to them from ``table`` (``lab down``,
    ``cleanup``), in one atomic restore per attempt. A writer that changes the
    table between our read and our restore (an agent still running) makes the
    restore fail; it is read again and retried. Returns "" or the last problem."""
    prefix = ["nsenter", f"--net=/var/run/netns/{netns}"] if netns else []
    problem = ""
    for attempt in range(attempts):
        saved = subprocess.run([*prefix, f"{binary}-save", "-t", table], capture_output=True,
                               text=True, check=False)
        if saved.returncode != 0:
            return f"{binary}-save -t {table}: {saved.stderr.strip()}"
        text = removal(saved.stdout, table, ours)
        if text is None:
            return ""
        done = subprocess.run([*prefix, f"{binary}-restore", "-w", "5", "--noflush"],
                              input=text, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return ""
        problem = f"removing our chains from {table}: {done.stderr.strip()}"
        time.sleep(0.1 * (attempt + 1))
    return problem


# --------------------------------------------------------------------------- changes

NETLINK_NETFILTER = 12   # linux/netlink.h
NFNLGRP_NFTABLES = 7     # linux/netfilter/nfnetlink.h: every nf_tables ruleset change
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

# With change notifications, our rules are read back on every change of the ruleset
# and, in case one was missed, at least this often (seconds; kube-proxy's
# --iptables-sync-period is 30 s).
WATCHED_CHECK_PERIOD = 60.0


# After a change notification, a drift check waits this long (seconds): a burst
# of changes (another writer's restore, ours) costs one read-back.
CHANGE_SPACING = 0.2


class Polling:
    """No change notifications (iptables-legacy, or the kernel refused): drift
    checks poll, every ``period`` given to ``wait``."""

    async def wait(self, wake: asyncio.Event, period: float) -> None:
        """Until ``wake`` is set or the next drift check is due."""
        await wait_set(wake, period)

    def take(self) -> bool:
        """Whether the ruleset changed since the last ``take`` (call it before a
        read-back); polling never knows."""
        return False

    def close(self) -> None:
        pass


class Changes(Polling):
    """The kernel's notifications that the nf_tables ruleset of this network
    namespace changed: the multicast group ``nft monitor`` listens to. iptables
    on nf_tables (``iptables-nft``, Debian's default) commits through it, so a
    flush or an edit by anyone wakes a drift check at once, and the check need
    not poll: each poll forks ``iptables-save``, whose CPU and page-table copy
    are a latency spike on a loaded node.

    ``changed`` is set when a notification arrives (or the socket overflowed:
    then some were lost, which counts as a change). ``take`` reads what is
    queued and clears it: call it before reading the rules back, so a change
    after that read sets it again."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.changed = asyncio.Event()
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    def open(cls) -> Changes:
        """Subscribe in the running loop; OSError when the kernel refuses
        (no CAP_NET_ADMIN, no nf_tables)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setblocking(False)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            return cls(sock, asyncio.get_running_loop())
        except BaseException:
            sock.close()
            raise

    async def wait(self, wake: asyncio.Event, period: float) -> None:
        """Until ``wake`` is set, the ruleset changed (then CHANGE_SPACING more), or
        the backstop check is due (at least every WATCHED_CHECK_PERIOD)."""
        await wait_any((wake, self.changed), max(period, WATCHED_CHECK_PERIOD))
        if self.changed.is_set() and not wake.is_set():
            await asyncio.sleep(CHANGE_SPACING)

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                if not self.sock.recv(65536):
                    return got
            except BlockingIOError:
                return got
            except OSError as e:
                if e.errno != errno.ENOBUFS:  # not ours to read any more: say changed
                    return True
                # ENOBUFS: the queue overflowed and notifications were lost
            got = True

    def _readable(self) -> None:
        if self._drain():
            self.changed.set()

    def take(self) -> bool:
        got = self._drain() or self.changed.is_set()
        self.changed.clear()
        return got

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def watch_changes(binary: str, *, what: str) -> Polling:
    """``Changes`` when ``binary`` (an iptables) writes through nf_tables and the
    kernel lets us listen; ``Polling`` otherwise (iptables-legacy has no
    notifications). ``what`` names the user in the log line."""
    code, version = await run([binary, "-V"], check=False)
    if code != 0 or "nf_tables" not in version:
        log.info("%s: %s is not on nf_tables; looking for drift by polling", what, binary)
        return Polling()
    try:
        changes = Changes.open()
    except OSError as e:
        log.warning("%s: no nf_tables change notifications (%s); looking for drift by "
                    "polling", what, e)
        return Polling()
    log.info("%s: woken by nf_tables change notifications", what)
    return changes
