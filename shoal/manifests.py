"""Manifests: YAML/JSON documents <-> typed protobuf objects, strictly.

Decoding walks the protobuf descriptor of the kind named by ``apiVersion`` and
``kind`` and accepts exactly the fields it has, under their JSON names
(``containerPort``, ``podIP``). Anything else is an error that names the field
path: an unknown field, a wrong type, an integer out of range, a bad quantity.
Every error in a document is reported, not only the first.

Where Kubernetes YAML is not plain proto3 JSON, the codec decodes on purpose:

- ``shoal.meta.v1.IntOrString``: ``8080`` or ``http``; ``25%``.
- ``shoal.meta.v1.Quantity``: ``50m``, ``64Mi``, or a bare YAML number ``2``.
- ``google.protobuf.Timestamp``: RFC 3339 text.
- ``google.protobuf.Duration``: ``2s``, ``1.5s``, ``100ms``, ``1m30s``.
- ``bytes`` fields (Secret ``data``): base64 text.
- 64-bit integers are plain numbers, not strings.

Encoding is the reverse, and omits what is unset, as ``kubectl get -o yaml`` does.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shoal import errors, quantity
from shoal.errors import FieldError
from shoal.kinds import Kind, KindTable

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_INT_OR_STRING = "shoal.meta.v1.IntOrString"
_QUANTITY = "shoal.meta.v1.Quantity"
_DURATION_RE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<unit>ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _synthetic(oneof: Any, fd: Any) -> bool:
    """True for the hidden oneof protoc makes for a proto3 ``optional`` field."""
    return len(oneof.fields) == 1 and str(oneof.name) == "_" + fd.name


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Decoder:
    """One pass over one document; collects every FieldError it finds."""

    def __init__(self) -> None:
        self.problems: list[FieldError] = []

    def fail(self, path: str, message: str, reason: str = "FieldValueInvalid") -> None:
        self.problems.append(FieldError(field=path, message=message, reason=reason))

    def message(self, data: object, msg: Message, path: str) -> None:
        desc: Any = msg.DESCRIPTOR
        special = desc.full_name
        if special in (_TIMESTAMP, _DURATION, _INT_OR_STRING, _QUANTITY):
            self._special(data, msg, path)
            return
        if not isinstance(data, Mapping):
            self.fail(path, f"expected object, got {_type_name(data)}")
            return
        by_json = {f.json_name: f for f in desc.fields}
        oneofs_seen: dict[str, str] = {}
        for raw_key, value in data.items():
            if not isinstance(raw_key, str):
                self.fail(path, f"field names must be strings, got {_type_name(raw_key)}")
                continue
            fd = by_json.get(raw_key)
            fpath = _join(path, raw_key)
            if fd is None:
                self.fail(fpath, f'unknown field "{raw_key}"', "FieldValueNotSupported")
                continue
            if value is None:
                continue  # null means unset, as in Kubernetes
            oneof = fd.containing_oneof
            if oneof is not None and not _synthetic(oneof, fd):
                other = oneofs_seen.get(oneof.name)
                if other is not None:
                    self.fail(fpath, f"may not be set together with {other!r}")
                    continue
                oneofs_seen[oneof.name] = raw_key
            self.field(value, msg, fd, fpath)

    def field(self, value: object, msg: Message, fd: Any, path: str) -> None:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            self._map(value, msg, fd, path)
        elif fd.is_repeated:
            if not isinstance(value, list):
                self.fail(path, f"expected array, got {_type_name(value)}")
                return
            container = getattr(msg, fd.name)
            for i, item in enumerate(value):
                ipath = f"{path}[{i}]"
                if item is None:
                    self.fail(ipath, "null is not allowed in an array")
                elif fd.message_type is not None:
                    self.message(item, container.add(), ipath)
                else:
                    ok, scalar = self.scalar(item, fd, ipath)
                    if ok:
                        container.append(scalar)
        elif fd.message_type is not None:
            sub = getattr(msg, fd.name)
            self.message(value, sub, path)
            sub.SetInParent()
        else:
            ok, scalar = self.scalar(value, fd, path)
            if ok:
                setattr(msg, fd.name, scalar)

    def _map(self, value: object, msg: Message, fd: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            self.fail(path, f"expected object, got {_type_name(value)}")
            return
        key_fd = fd.message_type.fields_by_name["key"]
        val_fd = fd.message_type.fields_by_name["value"]
        container = getattr(msg, fd.name)
        for k, v in value.items():
            kpath = f"{path}[{k}]"
            if key_fd.type == FieldDescriptor.TYPE_STRING and not isinstance(k, str):
                self.fail(kpath, f"map keys must be strings, got {_type_name(k)}")
                continue
            if key_fd.type in _INT_RANGES and isinstance(k, str) and re.fullmatch(r"-?\d+", k):
                k = int(k)  # JSON spells integer map keys as strings ("8080")
            ok, key = self.scalar(k, key_fd, kpath)
            if not ok:
                continue
            if v is None:
                if val_fd.type == FieldDescriptor.TYPE_STRING:
                    container[key] = ""
                continue
            if val_fd.message_type is not None:
                self.message(v, container[key], kpath)
            else:
                ok, scalar = self.scalar(v, val_fd, kpath)
                if ok:
                    container[key] = scalar

    def scalar(self, value: object, fd: Any, path: str) -> tuple[bool, Any]:
        t = fd.type
        if t == FieldDescriptor.TYPE_STRING:
            if isinstance(value, str):
                try:  # a "\ud800" escape in YAML or JSON makes a lone surrogate
                    value.encode()
                except UnicodeEncodeError as e:
                    self.fail(path, f"invalid Unicode: {value[e.start:e.end]!r} at "
                                    f"position {e.start}")
                    return False, None
                return True, value
            self.fail(path, f"expected string, got {_type_name(value)}")
        elif t == FieldDescriptor.TYPE_BOOL:
            if isinstance(value, bool):
                return True, value
            self.fail(path, f"expected boolean, got {_type_name(value)}")
        elif t in _INT_RANGES:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(path, f"expected integer, got {_type_name(value)}")
            else:
                lo, hi = _INT_RANGES[t]
                if lo <= value <= hi:
                    return True, value
                self.fail(path, f"integer {value} out of range [{lo}, {hi}]")
        elif t in _FLOATS:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
            self.fail(path, f"expected number, got {_type_name(value)}")
        elif t == FieldDescriptor.TYPE_BYTES:
            if not isinstance(value, str):
                self.fail(path, f"expected base64 string, got {_type_name(value)}")
            else:
                try:
                    return True, base64.b64decode(value.encode(), validate=True)
                except (binascii.Error, ValueError):
                    self.fail(path, "illegal base64 data")
        elif t == FieldDescriptor.TYPE_ENUM:
            if isinstance(value, str) and value in fd.enum_type.values_by_name:
                return True, fd.enum_type.values_by_name[value].number
            allowed = ", ".join(fd.enum_type.values_by_name)
            self.fail(path, f"unsupported value {value!r}: supported values: {allowed}",
                      "FieldValueNotSupported")
        else:  # pragma: no cover - no other scalar types in proto3
            self.fail(path, f"unsupported field type {t}")
        return False, None

    def _special(self, data: object, msg: Message, path: str) -> None:
        name = msg.DESCRIPTOR.full_name
        if name == _INT_OR_STRING:
            if isinstance(data, bool) or not isinstance(data, (int, str)):
                self.fail(path, f"expected integer or string, got {_type_name(data)}")
            elif isinstance(data, int):
                if not -(2**31) <= data < 2**31:
                    self.fail(path, f"integer {data} out of range")
                else:
                    msg.int_val = data  # type: ignore[attr-defined]
            else:
                msg.str_val = data  # type: ignore[attr-defined]
        elif name == _QUANTITY:
            if isinstance(data, bool) or not isinstance(data, (int, float, str)):
                self.fail(path, f"expected quantity string, got {_type_name(data)}")
                return
            text = data if isinstance(data, str) else format(data, "g")
            try:
                quantity.parse(text)
            except quantity.QuantityError as e:
                self.fail(path, str(e))
                return
            msg.value = text  # type: ignore[attr-defined]
        elif name == _TIMESTAMP:
            ts = _parse_time(data)
            if ts is None:
                self.fail(path, f"expected RFC 3339 time, got {data!r}")
            else:
                msg.CopyFrom(ts)
        elif name == _DURATION:
            d = _parse_duration(data)
            if d is None:
                self.fail(path, f"expected duration such as \"2s\" or \"100ms\", got {data!r}")
            else:
                msg.CopyFrom(d)


def _parse_time(data: object) -> timestamp_pb2.Timestamp | None:
    if isinstance(data, dt.datetime):
        when = data if data.tzinfo else data.replace(tzinfo=dt.UTC)
    elif isinstance(data, str):
        try:
            when = dt.datetime.fromisoformat(data.replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            return None
    else:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts


def _parse_duration(data: object) -> duration_pb2.Duration | None:
    if not isinstance(data, str) or not data:
        return None
    text = data.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    total = 0.0
    pos = 0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group("num")) * _DURATION_UNITS[m.group("unit")]
        pos = m.end()
    if pos != len(text) or pos == 0:
        return None
    d = duration_pb2.Duration()
    nanos = round(sign * total * 1e9)
    d.seconds, d.nanos = int(nanos / 1e9), int(nanos - int(nanos / 1e9) * 1e9)
    return d


def format_time(ts: timestamp_pb2.Timestamp) -> str:
    """RFC 3339 in UTC, with fractional seconds only when there are any."""
    when = dt.datetime.fromtimestamp(ts.seconds, tz=dt.UTC)
    base = when.strftime("%Y-%m-%dT%H:%M:%S")
    if ts.nanos:
        frac = f"{ts.nanos:09d}".rstrip("0")
        return f"{base}.{frac}Z"
    return base + "Z"


def format_duration(d: duration_pb2.Duration) -> str:
    total = d.seconds + d.nanos / 1e9
    text = f"{total:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def _encode_message(msg: Message) -> Any:
    name = msg.DESCRIPTOR.full_name
    if name == _INT_OR_STRING:
        which = msg.WhichOneof("value")
        return msg.int_val if which == "int_val" else msg.str_val  # type: ignore[attr-defined]
    if name == _QUANTITY:
        return msg.value  # type: ignore[attr-defined]
    if name == _TIMESTAMP:
        return format_time(msg)  # type: ignore[arg-type]
    if name == _DURATION:
        return format_duration(msg)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    fd: Any
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if value:
                val_fd = fd.message_type.fields_by_name["value"]
                out[fd.json_name] = {
                    k: _encode_value(v, val_fd) for k, v in sorted(value.items())
                }
        elif fd.is_repeated:
            if value:
                out[fd.json_name] = [_encode_value(v, fd) for v in value]
        elif fd.message_type is not None:
            if msg.HasField(fd.name):
                out[fd.json_name] = _encode_message(value)
        elif fd.has_presence:
            if msg.HasField(fd.name):
                out[fd.json_name] = _encode_value(value, fd)
        elif value:
            out[fd.json_name] = _encode_value(value, fd)
    return out


def _encode_value(value: Any, fd: Any) -> Any:
    if fd.message_type is not None:
        return _encode_message(value)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    return value


# --------------------------------------------------------------------------- API


@dataclass(frozen=True)
class Document:
    """One YAML/JSON document, and where it came from."""

    data: Any
    source: str
    index: int
    # Position inside a ``kind: List`` document (1-based), when it came from one.
    item: int = 0

    @property
    def where(self) -> str:
        if self.item:
            return f"{self.source}: document {self.index}, item {self.item}"
        return f"{self.source}: document {self.index}"


def decode_message(data: object, message_type: type[Message], *, path: str = "") -> Message:
    """Decode a mapping into a message of the given type. Raises Invalid."""
    msg = message_type()
    dec = _Decoder()
    dec.message(data, msg, path)
    if dec.problems:
        raise errors.Invalid(
            f"invalid {message_type.DESCRIPTOR.name}", causes=dec.problems
        )
    return msg


def decode(data: object, kinds: KindTable, *, where: str = "") -> tuple[Kind, Message]:
    """Decode one manifest into its kind and typed message. Raises Invalid.

    ``where`` prefixes the error message (e.g. "app.yaml: document 2").
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(data, Mapping):
        raise errors.Invalid(f"{prefix}a manifest must be an object, got {_type_name(data)}")
    api_version, kind_name = data.get("apiVersion"), data.get("kind")
    missing = [
        FieldError(field=f, message="Required value", reason="FieldValueRequired")
        for f, v in (("apiVersion", api_version), ("kind", kind_name))
        if not isinstance(v, str) or not v
    ]
    if missing:
        raise errors.Invalid(f"{prefix}object has no apiVersion or kind", causes=missing)
    try:
        kind = kinds.by_gvk(str(api_version), str(kind_name))
    except errors.BadRequest as e:
        raise errors.Invalid(
            f"{prefix}{e.message}",
            causes=[FieldError(field="kind", message=e.message,
                               reason="FieldValueNotSupported")],
        ) from None
    body = {k: v for k, v in data.items() if k not in ("apiVersion", "kind")}
    msg = kind.new()
    dec = _Decoder()
    dec.message(body, msg, "")
    if dec.problems:
        name = ""
        meta = data.get("metadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("name"), str):
            name = f' "{meta["name"]}"'
        raise errors.Invalid(
            f"{prefix}{kind.kind}{name} is invalid", kind=kind.kind, causes=dec.problems
        )
    return kind, msg


def encode(msg: Message, kinds: KindTable) -> dict[str, Any]:
    """The manifest form of a typed object, with apiVersion and kind first."""
    kind = kinds.by_message(msg)
    out: dict[str, Any] = {"apiVersion": kind.api_version, "kind": kind.kind}
    out.update(_encode_message(msg))
    return out


def encode_message(msg: Message) -> Any:
    """The JSON form of any message (no apiVersion/kind)."""
    return _encode_message(msg)


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and leaves timestamps as text."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            duplicate = False
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        try:
            seen.add(key)
        except TypeError:
            pass
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_documents(text: str, *, source: str) -> list[Document]:
    """Parse multi-document YAML (or JSON). ``kind: List`` documents are expanded.

    Raises Invalid naming the source and the line of a syntax error.
    """
    try:
        raw = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise errors.Invalid(f"{source}: YAML syntax error{where}: {problem}") from None
    docs: list[Document] = []
    for i, data in enumerate(raw, start=1):
        if data is None:
            continue
        if isinstance(data, Mapping) and data.get("kind") == "List" and "items" in data:
            items = data.get("items") or []
            if not isinstance(items, list):
                raise errors.Invalid(f"{source}: document {i}: List items must be an array")
            docs.extend(Document(item, source, i, item=j)
                        for j, item in enumerate(items, start=1))
            continue
        docs.append(Document(data, source, i))
    return docs


def iter_decode(docs: list[Document], kinds: KindTable) -> Iterator[tuple[Kind, Message]]:
    for doc in docs:
        yield decode(doc.data, kinds, where=doc.where)


def dump_yaml(data: Any) -> str:
    """YAML as kubectl prints it: block style, keys in the given order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=4, ensure_ascii=False)
