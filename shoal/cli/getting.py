"""``shoal get``: tables, manifests and names of objects, optionally watched.

    get KIND[,KIND...] [NAME...] | KIND/NAME...   [-n NS | -A] [-l SEL] [--field-selector S]
        [-o wide|yaml|json|name] [--no-headers] [--show-labels] [-w]

With ``-w`` the current objects are printed, then one row (or document, or
name) per change, read with a watch from the list's resourceVersion. It runs
until Ctrl-C, or for ``--request-timeout`` when that is given (as kubectl), and
both end it with exit code 0. ``--output-watch-events`` adds the event type
(an EVENT column, or ``{type, object}`` documents with -o yaml/json).

Resume: a dropped stream or a restarted apiserver is picked up by the SDK's
watch, which reconnects from the last resourceVersion it yielded (the watch
cache replays what came after it), so nothing is printed twice or missed. If
that version has left the server's history (``Expired``), the objects are
listed again and only the differences from what was last printed come out
(ADDED/MODIFIED for new or changed versions, DELETED for objects gone), then
the watch goes on from the new list.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from shoal import errors, selectors
from shoal.cli.fetching import drain_cancelled_stream, fetch_targets
from shoal.cli.printing import (
    Cells,
    TableOptions,
    column_widths,
    format_row,
    render_table,
    resource_name,
    table_for,
    table_headers,
    table_row,
)
from shoal.cli.reporting import ExitCode, UsageError
from shoal.cli.session import Session
from shoal.cli.targets import Target, parse_targets
from shoal.kinds import Kind, KindTable
from shoal.manifests import dump_json, dump_yaml, encode

Output = Literal["", "wide", "yaml", "json", "name"]
OUTPUTS: tuple[str, ...] = ("wide", "yaml", "json", "name")


@dataclass(frozen=True)
class GetOptions:
    args: tuple[str, ...]
    all_namespaces: bool = False
    label_selector: str = ""
    field_selector: str = ""
    output: Output = ""
    watch: bool = False
    no_headers: bool = False
    show_labels: bool = False
    output_watch_events: bool = False


def check_selectors(targets: Sequence[Target], *, label_selector: str,
                    field_selector: str) -> None:
    """Reject malformed selectors before asking the server (UsageError, exit 2)."""
    try:
        selectors.parse_labels(label_selector)
        for t in targets:
            selectors.parse_fields(field_selector, supported=frozenset(t.kind.fields),
                                   kind=t.kind.kind)
    except errors.BadRequest as e:
        raise UsageError(e.message) from None
    if label_selector and any(t.names for t in targets):
        raise UsageError("name cannot be provided when a selector is specified")


def no_resources_message(targets: Sequence[Target], *, namespace: str,
                         all_namespaces: bool) -> str:
    if all_namespaces or not any(t.kind.namespaced for t in targets):
        return "No resources found"
    return f"No resources found in {namespace} namespace."


def list_document(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``kind: List`` wrapper kubectl prints for several objects."""
    return {"apiVersion": "v1", "items": list(items), "kind": "List",
            "metadata": {"resourceVersion": ""}}


def format_manifest(doc: dict[str, Any], output: Output) -> str:
    return dump_json(doc) + "\n" if output == "json" else dump_yaml(doc)


def render_objects(found: Sequence[tuple[Kind, Sequence[Any]]], *, kinds: KindTable,
                   output: Output, now: float, single: bool, all_namespaces: bool,
                   no_headers: bool = False, show_labels: bool = False) -> str:
    """Everything ``get`` prints on stdout for what it found (pure)."""
    objects = [(k, o) for k, objs in found for o in objs]
    if output in ("yaml", "json"):
        if single and len(objects) == 1:
            return format_manifest(encode(objects[0][1], kinds), output)
        return format_manifest(list_document([encode(o, kinds) for _, o in objects]), output)
    if output == "name":
        return "".join(resource_name(k, o.metadata.name) + "\n" for k, o in objects)
    options = TableOptions(wide=output == "wide", namespace_column=all_namespaces,
                           qualify_names=len(found) > 1, show_labels=show_labels)
    tables = [render_table(table_for(k, objs, now=now, options=options),
                           headers=not no_headers)
              for k, objs in found if objs]
    return "\n".join(tables)


async def run_get(session: Session, options: GetOptions) -> int:
    targets = parse_targets(options.args, session.kinds)
    check_selectors(targets, label_selector=options.label_selector,
                    field_selector=options.field_selector)
    if options.watch:
        return await _watch(session, targets, options=options)
    namespace = "" if options.all_namespaces else session.namespace
    found, code = await fetch_targets(
        session, targets, namespace=namespace, all_namespaces=options.all_namespaces,
        label_selector=options.label_selector, field_selector=options.field_selector)
    requested = sum(len(t.names) for t in targets)
    total = sum(len(objs) for _, objs in found)
    if total == 0 and (requested or options.output not in ("yaml", "json")):
        if not requested:
            session.warn(no_resources_message(targets, namespace=namespace,
                                              all_namespaces=options.all_namespaces))
        return code
    session.out.write(render_objects(
        found, kinds=session.kinds, output=options.output, now=session.clock(),
        single=requested == 1 and len(targets) == 1, all_namespaces=options.all_namespaces,
        no_headers=options.no_headers, show_labels=options.show_labels))
    return code


class WatchPrinter:
    """Prints the first objects and then each change, keeping columns aligned."""

    def __init__(self, session: Session, kind: Kind, *, options: GetOptions) -> None:
        self.session = session
        self.kind = kind
        self.output = options.output
        self.headers = not options.no_headers
        self.table = TableOptions(wide=options.output == "wide",
                                  namespace_column=options.all_namespaces,
                                  show_labels=options.show_labels)
        self.widths: list[int] | None = None
        self.events = options.output_watch_events

    def _rows(self, rows: list[Cells]) -> None:
        if self.widths is None:
            if self.headers:
                head = table_headers(self.kind, self.table)
                rows = [("EVENT", *head) if self.events else head, *rows]
            self.widths = column_widths(rows)
        else:
            for i, w in enumerate(column_widths(rows)):
                if i >= len(self.widths):
                    self.widths.append(w)
                elif w > self.widths[i]:
                    self.widths[i] = w
        for cells in rows:
            self.session.print(format_row(cells, self.widths))

    def show(self, objects: Sequence[Any], *, event: str = "ADDED") -> None:
        if not objects:
            return
        if self.output in ("", "wide"):
            now = self.session.clock()
            rows = [table_row(self.kind, o, now=now, options=self.table) for o in objects]
            self._rows([(event, *r) for r in rows] if self.events else rows)
        else:
            for o in objects:
                if self.output == "name":
                    name = resource_name(self.kind, o.metadata.name)
                    self.session.print(f"{event} {name}" if self.events else name)
                else:
                    if self.output == "yaml":
                        self.session.print("---")
                    doc = encode(o, self.session.kinds)
                    if self.events:
                        doc = {"type": event, "object": doc}
                    self.session.out.write(format_manifest(doc, self.output))
        self.session.out.flush()


def object_key(obj: Any) -> str:
    return f"{obj.metadata.namespace}/{obj.metadata.name}"


def relist_changes(last: dict[str, Any], items: Sequence[Any]) -> list[tuple[str, Any]]:
    """What a relist after ``Expired`` shows, against what was last printed
    (``last`` by namespace/name): ADDED for new objects (or the same name with
    a new UID, after a DELETED), MODIFIED for a new version, DELETED for objects
    gone; unchanged ones are not repeated."""
    out: list[tuple[str, Any]] = []
    current = {object_key(o): o for o in items}
    for key, old in last.items():
        now = current.get(key)
        if now is None or now.metadata.uid != old.metadata.uid:
            out.append(("DELETED", old))
    for key, obj in current.items():
        old = last.get(key)
        if old is None or old.metadata.uid != obj.metadata.uid:
            out.append(("ADDED", obj))
        elif old.metadata.resource_version != obj.metadata.resource_version:
            out.append(("MODIFIED", obj))
    return out


async def _watch(session: Session, targets: Sequence[Target], *, options: GetOptions) -> int:
    if len(targets) != 1:
        raise UsageError("--watch works on one resource type at a time")
    target = targets[0]
    if len(target.names) > 1:
        raise UsageError("--watch works on one object or on a collection, not on several "
                         "names")
    kind = target.kind
    client = session.client()
    namespace = "" if options.all_namespaces else session.namespace
    field_selector = options.field_selector
    if target.names:
        await client.get(kind.message, target.names[0], namespace=namespace)
        name_sel = f"metadata.name={target.names[0]}"
        field_selector = f"{field_selector},{name_sel}" if field_selector else name_sel
    scope: dict[str, Any] = {
        "namespace": namespace, "all_namespaces": options.all_namespaces,
        "label_selector": options.label_selector, "field_selector": field_selector}
    listing = await client.list_all(kind.message, **scope)
    printer = WatchPrinter(session, kind, options=options)
    printer.show(listing.items)
    if not listing.items and not target.names:
        session.warn(no_resources_message(targets, namespace=namespace,
                                          all_namespaces=options.all_namespaces))
    last = {object_key(o): o for o in listing.items}
    rv = listing.resource_version
    try:
        async with asyncio.timeout(session.request_timeout):
            while True:
                events = client.watch(kind.message, resource_version=rv, **scope)
                try:
                    async with contextlib.aclosing(events):
                        async for ev in events:
                            rv = ev.resource_version or rv
                            if ev.object is None:
                                continue
                            if ev.type == "DELETED":
                                last.pop(object_key(ev.object), None)
                            else:
                                last[object_key(ev.object)] = ev.object
                            printer.show([ev.object], event=ev.type)
                except errors.Expired:
                    listing = await client.list_all(kind.message, **scope)
                    for event, obj in relist_changes(last, listing.items):
                        printer.show([obj], event=event)
                    last = {object_key(o): o for o in listing.items}
                    rv = listing.resource_version
    except TimeoutError:
        pass
    await drain_cancelled_stream()
    return ExitCode.OK
