"""Label and field selectors, parsed once and matched many times.

Label selector syntax (Kubernetes'), requirements joined by commas (AND):

    app=web  app==web  tier!=db  env in (prod,staging)  env notin (dev)
    release  !legacy   replicas>2  replicas<5

Field selectors are equality only: ``spec.nodeName=n1,metadata.name!=x``.
A missing label never equals a value, and always satisfies ``!=`` and ``notin``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from shoal import errors, naming
from shoal.api.meta.v1 import meta_pb2


class Op(Enum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GT = ">"
    LT = "<"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        if self.op is Op.EQUALS or self.op is Op.IN:
            return present and value in self.values
        if self.op is Op.NOT_EQUALS or self.op is Op.NOT_IN:
            return not present or value not in self.values
        if self.op is Op.EXISTS:
            return present
        if self.op is Op.DOES_NOT_EXIST:
            return not present
        if not present:
            return False
        try:
            have, want = int(value), int(next(iter(self.values)))
        except ValueError:
            return False
        return have > want if self.op is Op.GT else have < want

    def __str__(self) -> str:
        vals = sorted(self.values)
        if self.op is Op.EXISTS:
            return self.key
        if self.op is Op.DOES_NOT_EXIST:
            return f"!{self.key}"
        if self.op in (Op.IN, Op.NOT_IN):
            return f"{self.key} {self.op.value} ({','.join(vals)})"
        return f"{self.key}{self.op.value}{vals[0]}"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """AND of requirements. The empty selector matches everything;
    :data:`NOTHING` matches nothing (a Service without a selector)."""

    requirements: tuple[Requirement, ...] = ()
    match_nothing: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.match_nothing:
            return False
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements and not self.match_nothing

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


NOTHING = LabelSelector(match_nothing=True)
EVERYTHING = LabelSelector()

_TOKEN = re.compile(r"\s*(!=|==|=|!|>|<|\(|\)|,|[^\s!=<>(),]+)")


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        if m.group(1):
            out.append(m.group(1))
        pos = m.end()
        if text[pos:].strip() == "":
            break
    return out


def _check_key(key: str, text: str) -> None:
    problems = naming.check_qualified_name(key)
    if problems:
        raise errors.BadRequest(f"invalid label selector {text!r}: key {key!r}: {problems[0]}")


def _check_value(value: str, text: str) -> None:
    problems = naming.check_label_value(value)
    if problems:
        raise errors.BadRequest(
            f"invalid label selector {text!r}: value {value!r}: {problems[0]}"
        )


def parse_labels(text: str) -> LabelSelector:
    """Parse a label selector string. Raises BadRequest naming the problem."""
    if not text.strip():
        return EVERYTHING
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise errors.BadRequest(f"invalid label selector {text!r}: {what}")

    while i < len(toks):
        tok = toks[i]
        if tok == "!":
            need(i + 1 < len(toks), "expected a key after '!'")
            key = toks[i + 1]
            _check_key(key, text)
            reqs.append(Requirement(key, Op.DOES_NOT_EXIST))
            i += 2
        else:
            key = tok
            need(key not in ("=", "==", "!=", ",", "(", ")", ">", "<"),
                 f"expected a key, found {key!r}")
            _check_key(key, text)
            nxt = toks[i + 1] if i + 1 < len(toks) else ","
            if nxt == ",":
                reqs.append(Requirement(key, Op.EXISTS))
                i += 1
            elif nxt in ("=", "==", "!=", ">", "<"):
                need(i + 2 < len(toks) and toks[i + 2] not in (",", "(", ")"),
                     f"expected a value after {key}{nxt}")
                value = toks[i + 2]
                if nxt in (">", "<"):
                    need(value.lstrip("-").isdigit(), f"{key}{nxt} needs an integer value")
                    op = Op.GT if nxt == ">" else Op.LT
                else:
                    _check_value(value, text)
                    op = Op.NOT_EQUALS if nxt == "!=" else Op.EQUALS
                reqs.append(Requirement(key, op, frozenset([value])))
                i += 3
            elif nxt in ("in", "notin"):
                need(i + 2 < len(toks) and toks[i + 2] == "(", f"expected '(' after {nxt}")
                j = i + 3
                values: list[str] = []
                while j < len(toks) and toks[j] != ")":
                    if toks[j] != ",":
                        _check_value(toks[j], text)
                        values.append(toks[j])
                    j += 1
                need(j < len(toks), "missing ')'")
                need(bool(values), f"{nxt} needs at least one value")
                reqs.append(Requirement(key, Op.IN if nxt == "in" else Op.NOT_IN,
                                        frozenset(values)))
                i = j + 1
            else:
                need(False, f"unexpected {nxt!r} after key {key!r}")
        if i < len(toks):
            need(toks[i] == ",", f"expected ',' but found {toks[i]!r}")
            i += 1
            need(i < len(toks), "trailing ','")
    return LabelSelector(tuple(reqs))


def from_proto(sel: meta_pb2.LabelSelector | None) -> LabelSelector:
    """The selector a ``LabelSelector`` message describes; None matches nothing."""
    if sel is None:
        return NOTHING
    reqs = [Requirement(k, Op.EQUALS, frozenset([v])) for k, v in sorted(sel.match_labels.items())]
    ops = {"In": Op.IN, "NotIn": Op.NOT_IN, "Exists": Op.EXISTS, "DoesNotExist": Op.DOES_NOT_EXIST}
    for expr in sel.match_expressions:
        op = ops.get(expr.operator)
        if op is None:
            raise errors.BadRequest(f"{expr.operator!r} is not a valid label selector operator")
        reqs.append(Requirement(expr.key, op, frozenset(expr.values)))
    return LabelSelector(tuple(reqs))


def from_map(labels: Mapping[str, str]) -> LabelSelector:
    """Equality on every pair (a Service's or ReplicaSet's ``selector`` map)."""
    if not labels:
        return NOTHING
    return LabelSelector(
        tuple(Requirement(k, Op.EQUALS, frozenset([v])) for k, v in sorted(labels.items()))
    )


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    path: str
    value: str
    negate: bool = False

    def matches(self, actual: str) -> bool:
        return (actual == self.value) != self.negate


@dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(r.matches(fields.get(r.path, "")) for r in self.requirements)

    @property
    def paths(self) -> frozenset[str]:
        return frozenset(r.path for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(f"{r.path}{'!=' if r.negate else '='}{r.value}"
                        for r in self.requirements)


def parse_fields(text: str, *, supported: frozenset[str] | None = None,
                 kind: str = "") -> FieldSelector:
    """Parse ``a=b,c!=d``; with ``supported``, reject paths the kind cannot select on."""
    reqs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.match(r"^([A-Za-z0-9_.\[\]/-]+)\s*(==|!=|=)\s*(.*)$", part)
        if m is None:
            raise errors.BadRequest(f"invalid field selector {part!r}: expected key=value")
        path, op, value = m.group(1), m.group(2), m.group(3).strip()
        if supported is not None and path not in supported:
            raise errors.BadRequest(
                f'field label "{path}" is not supported for {kind or "this kind"} '
                f"(supported: {', '.join(sorted(supported))})"
            )
        reqs.append(FieldRequirement(path, value, negate=(op == "!=")))
    return FieldSelector(tuple(reqs))
