"""``shoal wait``: block until objects reach a condition, or are gone.

    wait --for=condition=TYPE[=VALUE] (KIND/NAME... | KIND NAME... | KIND -l SEL) [--timeout D]
    wait --for=delete ...

The condition must be one the kind has (``CONDITIONS``); anything else is
refused at once, naming the kind's conditions, before anything is read.
VALUE defaults to True and is compared without regard to case, as kubectl
does. Each object is checked, then checked again on each watch event on it
(and at least every second); ``--timeout`` (default 30 s) bounds the whole
command, and 0 means look once without waiting (kubectl's meaning). Prints
``deployment.apps/web condition met`` (or ``... deleted``) per object; a
timeout is exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from shoal import errors
from shoal.cli.fetching import drain_cancelled_stream
from shoal.cli.printing import kind_label
from shoal.cli.reporting import CLIError, ExitCode, UsageError
from shoal.cli.session import Session
from shoal.cli.targets import parse_targets
from shoal.client import AsyncClient
from shoal.kinds import Kind

# The condition types each kind's status can carry (Kubernetes').
CONDITIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "Pod": ("PodScheduled", "Initialized", "ContainersReady", "Ready",
            "PodReadyToStartContainers", "DisruptionTarget"),
    "Deployment": ("Available", "Progressing", "ReplicaFailure"),
    "ReplicaSet": ("ReplicaFailure",),
    "Node": ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable"),
    "Namespace": ("NamespaceDeletionDiscoveryFailure", "NamespaceDeletionContentFailure",
                  "NamespaceDeletionGroupVersionParsingFailure", "NamespaceContentRemaining",
                  "NamespaceFinalizersRemaining"),
})
POLL_SECONDS = 1.0
DEFAULT_TIMEOUT = 30.0


class WaitTimeout(CLIError):
    exit_code = ExitCode.SERVER_REFUSED


@dataclass(frozen=True)
class WaitFor:
    """What ``--for`` asks: a condition (type, value) or deletion."""

    delete: bool = False
    condition: str = ""
    value: str = "True"


def parse_for(text: str) -> WaitFor:
    if text == "delete":
        return WaitFor(delete=True)
    what, _, rest = text.partition("=")
    if what != "condition" or not rest:
        raise UsageError(f'unrecognized condition: "{text}" (use --for=condition=TYPE'
                         "[=VALUE] or --for=delete)")
    cond, _, value = rest.partition("=")
    if not cond:
        raise UsageError(f'--for={text}: the condition type is missing')
    return WaitFor(condition=cond, value=value or "True")


def check_condition(kind: Kind, wanted: WaitFor) -> str:
    """The kind's spelling of the condition type; UsageError if it has no such one."""
    if wanted.delete:
        return ""
    known = CONDITIONS.get(kind.kind, ())
    if not known:
        raise UsageError(f"{kind.resource} have no conditions to wait for "
                         "(use --for=delete)")
    for c in known:
        if c.lower() == wanted.condition.lower():
            return c
    raise UsageError(f'{kind.resource} have no condition "{wanted.condition}" '
                     f"(their conditions: {', '.join(known)})")


def condition_met(obj: Any, type_: str, value: str) -> bool:
    for c in getattr(obj.status, "conditions", ()):
        if c.type == type_:
            return bool(c.status.lower() == value.lower())
    return False


async def _until(client: AsyncClient, kind: Kind, namespace: str, name: str,
                 done: Callable[[Any | None], bool], *, once: bool = False) -> None:
    """Return once ``done(object or None when gone)`` is true (``once``: look
    one time only, TimeoutError if it is not)."""
    changed = asyncio.Event()

    async def watch() -> None:
        events = client.watch(kind.message, namespace=namespace,
                              field_selector=f"metadata.name={name}")
        async with contextlib.aclosing(events):
            async for _ in events:
                changed.set()

    watcher = asyncio.create_task(watch(), name="wait-watch")
    try:
        while True:
            changed.clear()
            try:
                obj: Any | None = await client.get(kind.message, name, namespace=namespace)
            except errors.NotFound:
                obj = None
            if done(obj):
                return
            if once:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await changed.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.ShoalError):
            await watcher
        await drain_cancelled_stream()


async def run_wait(session: Session, *, args: Sequence[str], for_: str,
                   label_selector: str = "", timeout: float | None = DEFAULT_TIMEOUT) -> int:
    if not for_:
        raise UsageError("--for is required: --for=condition=TYPE[=VALUE] or --for=delete")
    wanted = parse_for(for_)
    targets = parse_targets(args, session.kinds)
    types = {t.kind.kind: check_condition(t.kind, wanted) for t in targets}
    client = session.client()
    namespace = session.namespace
    objects: list[tuple[Kind, str, str]] = []
    for t in targets:
        ns = namespace if t.kind.namespaced else ""
        if t.names:
            objects.extend((t.kind, ns, n) for n in t.names)
            continue
        if not label_selector:
            raise UsageError("resource(s) were provided, but no name was specified "
                             "(give names or -l SELECTOR)")
        listed: Any = await client.list_all(t.kind.message, namespace=ns,
                                            label_selector=label_selector)
        objects.extend((t.kind, ns, o.metadata.name) for o in listed.items)
    if not objects:
        raise CLIError("no matching resources found")
    checks = [(kind, ns, name, _check(kind, name, wanted, types)) for kind, ns, name in objects]
    current = ""
    try:
        async with asyncio.timeout(timeout):
            for kind, ns, name, check in checks:
                current = f"{kind.qualified_resource}/{name}"
                await _until(client, kind, ns, name, check, once=timeout is None)
                label = f"{kind_label(kind)}/{name}"
                session.print(f"{label} {'deleted' if wanted.delete else 'condition met'}")
    except TimeoutError:
        raise WaitTimeout(f"timed out waiting for the condition on {current}") from None
    return ExitCode.OK


def _check(kind: Kind, name: str, wanted: WaitFor, types: Mapping[str, str]
           ) -> Callable[[Any | None], bool]:
    if wanted.delete:
        return lambda obj: obj is None
    type_ = types[kind.kind]

    def met(obj: Any | None) -> bool:
        if obj is None:
            raise errors.NotFound(f'{kind.qualified_resource} "{name}" not found')
        return condition_met(obj, type_, wanted.value)
    return met
