"""``shoal explain KIND[.field.path]``: what a kind and its fields mean.

The descriptions are the comments in the .proto files: ``tools/genproto.py``
reads them from protoc's source info (the generated descriptors drop it) into
``shoal/api/comments.json``; the field names and types come from the
generated descriptors, so names and types cannot drift from the API. Field
paths use the manifest's names (``spec.template.spec.containers``); the
.proto names (``min_ready_seconds``) are accepted too. The shape is kubectl's::

    GROUP:      apps
    KIND:       Deployment
    VERSION:    v1

    FIELD: replicas <integer>

    DESCRIPTION:
        ...

    FIELDS:
      name\t<type>
        description
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from shoal import errors
from shoal.cli.reporting import CLIError
from shoal.kinds import Kind, KindTable

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BYTES: "string",
    FieldDescriptor.TYPE_BOOL: "boolean", FieldDescriptor.TYPE_DOUBLE: "number",
    FieldDescriptor.TYPE_FLOAT: "number", FieldDescriptor.TYPE_ENUM: "string",
}
_WELL_KNOWN = {
    "google.protobuf.Timestamp": "string", "google.protobuf.Duration": "string",
    "google.protobuf.Struct": "Object", "google.protobuf.Value": "Object",
    "google.protobuf.Any": "Object",
}
_TOP = {
    "apiVersion": ("string", "The versioned schema of this object (group/version): what "
                             "the server uses to read it."),
    "kind": ("string", "The kind of object this is (CamelCase), which says what the "
                       "rest of it means."),
}


@cache
def comments() -> dict[str, dict[str, str]]:
    text = resources.files("shoal.api").joinpath("comments.json").read_text()
    data: dict[str, dict[str, str]] = json.loads(text)
    return data


def is_map(field: FieldDescriptor) -> bool:
    mt = field.message_type
    return mt is not None and bool(mt.GetOptions().map_entry)


def type_name(field: FieldDescriptor) -> str:
    """kubectl's type words: string, integer, boolean, number, Object names,
    []T for lists, map[string]T for maps."""
    mt: Any = field.message_type
    if is_map(field):
        return f"map[string]{type_name(mt.fields_by_name['value'])}"
    if mt is not None:
        base = _WELL_KNOWN.get(mt.full_name, mt.name)
    else:
        base = _SCALARS.get(field.type, "integer")
    return f"[]{base}" if field.is_repeated else base


def element(field: FieldDescriptor) -> Descriptor | None:
    """The message a path can descend into through ``field`` (a list's or a
    map's element), or None for scalars and well-known types."""
    if is_map(field):
        field = field.message_type.fields_by_name["value"]  # type: ignore[union-attr]
    mt: Any = field.message_type
    if mt is None or mt.full_name in _WELL_KNOWN:
        return None
    return mt  # type: ignore[no-any-return]


def find_field(message: Descriptor, name: str) -> FieldDescriptor | None:
    for f in message.fields:
        if name in (f.json_name, f.name):
            return f
    return None


@dataclass(frozen=True)
class Explained:
    kind: Kind
    # The path as given (without the kind) and the field it ends at, if any.
    path: tuple[str, ...]
    field: FieldDescriptor | None
    # The message whose fields are listed (None for a scalar field).
    message: Descriptor | None
    description: str


def lookup(kinds: KindTable, text: str) -> Explained:
    """Resolve ``KIND[.field.path]``; unknown kinds and fields are named."""
    kind_name, *path = text.split(".")
    # deployments.apps.spec: a group-qualified kind name comes first.
    kind: Kind | None = None
    for cut in range(len(path), -1, -1):
        try:
            kind = kinds.by_name(".".join([kind_name, *path[:cut]]))
        except errors.NotFound:
            continue
        path = path[cut:]
        break
    if kind is None:
        raise errors.NotFound(f'the server doesn\'t have a resource type "{kind_name}"')
    message: Any = kind.message.DESCRIPTOR
    field: FieldDescriptor | None = None
    description = comments().get(message.full_name, {}).get("", "") if message else ""
    for i, name in enumerate(path):
        if not name:
            raise errors.BadRequest(f"{text!r}: empty field name")
        if message is None:
            raise errors.NotFound(f'field "{name}" does not exist (' +
                                  ".".join(path[:i]) + " has no fields)")
        if i == 0 and name in _TOP:
            if len(path) > 1:
                raise errors.NotFound(f'field "{path[1]}" does not exist')
            return Explained(kind, tuple(path), None, None, _TOP[name][1])
        found = find_field(message, name)
        if found is None:
            raise errors.NotFound(f'field "{name}" does not exist')
        description = comments().get(message.full_name, {}).get(found.name, "")
        field, message = found, element(found)
        if not description and message is not None:  # the field's type says it
            description = comments().get(message.full_name, {}).get("", "")
    return Explained(kind, tuple(path), field, message, description)


def _wrap(text: str, indent: int) -> list[str]:
    if not text:
        return [" " * indent + "<empty>"]
    lines: list[str] = []
    for para in text.split("\n\n"):
        lines += textwrap.wrap(" ".join(para.split()), width=80 - indent,
                               initial_indent=" " * indent, subsequent_indent=" " * indent)
    return lines


def render(e: Explained) -> str:
    group, _, version = e.kind.api_version.rpartition("/")
    out = [f"GROUP:      {group}"] if group else []
    out += [f"KIND:       {e.kind.kind}", f"VERSION:    {version}", ""]
    if e.path:
        shown = type_name(e.field) if e.field is not None else _TOP[e.path[-1]][0]
        name = e.field.json_name if e.field is not None else e.path[-1]
        out += [f"FIELD: {name} <{shown}>", ""]
    out += ["DESCRIPTION:", *_wrap(e.description, 4)]
    if e.message is not None:
        out += ["", "FIELDS:"]
        docs = comments().get(e.message.full_name, {})
        entries: list[tuple[str, str, str]] = []
        if not e.path:
            entries += [(n, t, d) for n, (t, d) in _TOP.items()]
        entries += [(f.json_name, type_name(f), docs.get(f.name, "")) for f in e.message.fields]
        for name, kind_of, doc in entries:
            out += [f"  {name}\t<{kind_of}>", *_wrap(doc, 4), ""]
        if out[-1] == "":
            out.pop()
    return "\n".join(out) + "\n"


def run_explain(session: Any, *, target: str) -> int:
    try:
        explained = lookup(session.kinds, target)
    except errors.ShoalError as e:  # nothing asked the server: not "Error from server"
        raise CLIError(e.message) from None
    session.out.write(render(explained))
    return 0
