"""Fuzzing the CLI's manifest decoding (``shoal.manifests``) with hypothesis (issue 10).

Whatever the document, ``load_documents`` and ``decode`` either succeed or raise
``errors.Invalid``; an object that is invalid field by field names each field.
No other exception ever escapes. Three generators:

- documents shaped by the kinds' own schemas (field names from the protobuf
  descriptors, each value either of the right type or junk), deep enough to
  reach IntOrString, Quantity, Timestamp, Duration, bytes and maps;
- arbitrary JSON-like values, with and without apiVersion/kind;
- YAML text: random, and a valid manifest with random edits.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import errors
from shoal.kinds import builtin_kinds
from shoal.manifests import decode, dump_yaml, load_documents

KINDS = builtin_kinds()
KIND_LIST = sorted(KINDS, key=lambda k: (k.api_version, k.kind))
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JUNK: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "25%", "1.5Gi", "-1", "1e400", "10m",
                                           "2024-13-40T99:99:99Z", "1m30s", "µs",
                                           "not base64!", "AAAA", "0x10", "∞"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4),
                                                         st.integers(), max_size=2),
)
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.CPPTYPE_STRING: st.text(max_size=16),
    FieldDescriptor.CPPTYPE_BOOL: st.booleans(),
    FieldDescriptor.CPPTYPE_INT32: st.integers(min_value=-(2**33), max_value=2**33),
    FieldDescriptor.CPPTYPE_INT64: st.integers(min_value=-(2**65), max_value=2**65),
    FieldDescriptor.CPPTYPE_UINT32: st.integers(min_value=-5, max_value=2**33),
    FieldDescriptor.CPPTYPE_UINT64: st.integers(min_value=-5, max_value=2**65),
    FieldDescriptor.CPPTYPE_DOUBLE: st.floats(allow_nan=True),
    FieldDescriptor.CPPTYPE_FLOAT: st.floats(allow_nan=True),
    FieldDescriptor.CPPTYPE_ENUM: st.one_of(st.text(max_size=8), st.integers()),
}


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    name = fd.message_type.full_name if fd.message_type is not None else ""
    if name == "shoal.meta.v1.IntOrString":
        return st.one_of(st.integers(min_value=-(2**40), max_value=2**40),
                         st.sampled_from(["http", "25%", "", "x%", "101%"]))
    if name == "shoal.meta.v1.Quantity":
        return st.one_of(st.sampled_from(["1", "500m", "64Mi", "1.5Gi", "", "1e3", "Mi",
                                          "-1", "1ZZ", "0.0000001"]),
                         st.floats(allow_nan=True), st.integers())
    if name == "google.protobuf.Timestamp":
        return st.sampled_from(["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.5+02:00",
                                "yesterday", "", "9999-12-31T23:59:60Z"])
    if name == "google.protobuf.Duration":
        return st.sampled_from(["2s", "1.5s", "100ms", "1m30s", "", "-1s", "1x", "9" * 30 + "h"])
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(["aGVsbG8=", "!!", "a", ""]), st.binary(max_size=4))
    return SCALARS.get(fd.cpp_type, JUNK)


_SPECIAL = ("shoal.meta.v1.IntOrString", "shoal.meta.v1.Quantity",
            "google.protobuf.Timestamp", "google.protobuf.Duration")


@st.composite
def shaped(draw: st.DrawFn, desc: Descriptor, depth: int = 0) -> dict[str, Any]:
    """A mapping with some of ``desc``'s fields (JSON names), right-typed or junk."""
    out: dict[str, Any] = {}
    fields = list(desc.fields)
    if not fields:
        return out
    chosen = draw(st.lists(st.sampled_from(fields), max_size=min(4, len(fields)), unique=True))
    for fd in chosen:
        out[fd.json_name] = draw(_value(fd, depth))
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(min_size=1, max_size=8))] = draw(JUNK)  # an unknown field
    return out


def _value(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        val = fd.message_type.fields_by_name["value"]
        return st.one_of(JUNK, st.dictionaries(st.text(max_size=6), _one(val, depth + 1),
                                               max_size=3))
    one = _one(fd, depth)
    if fd.is_repeated:
        return st.one_of(st.lists(one, max_size=3), JUNK)
    return one


def _one(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    mt = fd.message_type
    if mt is None or mt.full_name in _SPECIAL:
        return st.one_of(_scalar(fd), JUNK) if depth > 1 else _scalar(fd) | JUNK
    if depth >= 5:
        return JUNK
    return st.one_of(shaped(mt, depth + 1), JUNK)


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(KIND_LIST))
    body = draw(shaped(kind.message.DESCRIPTOR))
    return {"apiVersion": kind.api_version, "kind": kind.kind, **body}


def _check_decode(data: object) -> None:
    try:
        decode(data, KINDS, where="fuzz.yaml: document 1")
    except errors.Invalid as e:
        assert e.message.startswith("fuzz.yaml: document 1"), e.message
        for cause in e.causes:
            assert cause.field or cause.message, e


@FUZZ
@given(manifests())
def test_schema_shaped_documents_decode_or_name_the_field(doc: dict[str, Any]) -> None:
    _check_decode(doc)
    # Through the text the CLI reads, as YAML and as JSON, the same outcome.
    for text in (dump_yaml(doc), json.dumps(doc, default=str)):
        try:
            docs = load_documents(text, source="fuzz.yaml")
        except errors.Invalid:
            continue
        for d in docs:
            _check_decode(d.data)


JSONISH = st.recursive(
    JUNK, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                  st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20)


@FUZZ
@given(JSONISH, st.sampled_from(KIND_LIST) | st.none())
def test_any_value_decodes_or_is_invalid(value: Any, kind: Any) -> None:
    _check_decode(value)
    if kind is not None:
        _check_decode({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": value,
                       "spec": value})


VALID = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  strategy:
    rollingUpdate: {maxSurge: 25%, maxUnavailable: 1}
  template:
    metadata:
      labels: {app: web}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: web
        image: busybox:1.36
        command: [httpd, -f]
        ports: [{containerPort: 8080, name: http}]
        resources:
          limits: {cpu: 500m, memory: 64Mi}
        readinessProbe:
          httpGet: {path: /, port: http}
---
apiVersion: v1
kind: Secret
metadata: {name: s}
data: {k: aGVsbG8=}
"""


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 3),
                          st.text(alphabet=" :-{}[]#&*!|>'\"%@`\n\t0aZ,.", max_size=3)),
                min_size=1, max_size=4))
def test_edited_yaml_loads_and_decodes_or_is_invalid(edits: list[tuple[int, int, str]]) -> None:
    text = VALID
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut:]
    try:
        docs = load_documents(text, source="fuzz.yaml")
    except errors.Invalid as e:
        assert e.message.startswith("fuzz.yaml"), e.message
        return
    for d in docs:
        _check_decode(d.data)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_loads_or_is_invalid(text: str) -> None:
    try:
        docs = load_documents(text, source="fuzz.yaml")
    except errors.Invalid:
        return
    for d in docs:
        _check_decode(d.data)


def test_the_valid_manifest_decodes() -> None:
    """The control for the edits above: unedited, it decodes."""
    docs = load_documents(VALID, source="fuzz.yaml")
    assert [decode(d.data, KINDS)[0].kind for d in docs] == ["Deployment", "Secret"]


@pytest.mark.parametrize("text", [
    "a: &x [*x]",                 # a recursive alias
    "[" * 200 + "]" * 200,        # deep nesting
    "kind: List\nitems: 3\n",
    "!!python/object:os.system ls",
    "\ufeffapiVersion: v1",
])
def test_hostile_yaml_is_a_clean_error_or_decodes(text: str) -> None:
    try:
        docs = load_documents(text, source="fuzz.yaml")
    except errors.Invalid:
        return
    for d in docs:
        _check_decode(d.data)


@pytest.mark.parametrize("text", [
    '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "\\ud800"}}',
    'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {"k\\udfff": v}\n',
])
def test_a_lone_surrogate_escape_is_invalid_naming_the_field(text: str) -> None:
    """Found by the fuzzer: JSON's and YAML's "\\ud800" escapes make a string
    protobuf cannot hold; decoding raised UnicodeEncodeError."""
    [doc] = load_documents(text, source="fuzz.yaml")
    with pytest.raises(errors.Invalid) as e:
        decode(doc.data, KINDS)
    assert e.value.causes[0].field in ("metadata.name", "data[k\udfff]"), e.value
