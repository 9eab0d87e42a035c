"""``shoal get``: tables, manifests and names of objects, optionally watched.

    get KIND[,KIND...] [NAME...] | KIND/NAME...   [-n NS | -A] [-l SEL] [--field-selector S]
        [-o wide|yaml|json|name] [--no-headers] [--show-labels] [-w]

With ``-w`` the current objects are printed, then one row (or document, or
name) per change, read with a watch from the list's resourceVersion. It runs
until Ctrl-C, or for ``--request-timeout`` when that is given (as kubectl), and
both end it with exit code 0.
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

    def _rows(self, rows: list[Cells]) -> None:
        if self.widths is None:
            if self.headers:
                rows = [table_headers(self.kind, self.table), *rows]
            self.widths = column_widths(rows)
        else:
            for i, w in enumerate(column_widths(rows)):
                if i >= len(self.widths):
                    self.widths.append(w)
                elif w > self.widths[i]:
                    self.widths[i] = w
        for cells in rows:
            self.session.print(format_row(cells, self.widths))

    def show(self, objects: Sequence[Any]) -> None:
        if not objects:
            return
        if self.output in ("", "wide"):
            now = self.session.clock()
            self._rows([table_row(self.kind, o, now=now, options=self.table) for o in objects])
        else:
            for o in objects:
                if self.output == "name":
                    self.session.print(resource_name(self.kind, o.metadata.name))
                else:
                    if self.output == "yaml":
                        self.session.print("---")
                    self.session.out.write(
                        format_manifest(encode(o, self.session.kinds), self.output))
        self.session.out.flush()


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
    try:
        events = client.watch(kind.message, resource_version=listing.resource_version, **scope)
        async with asyncio.timeout(session.request_timeout), contextlib.aclosing(events):
            async for ev in events:
                if ev.object is not None:
                    printer.show([ev.object])
    except TimeoutError:
        pass
    await drain_cancelled_stream()
    return ExitCode.OK
