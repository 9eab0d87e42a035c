"""Label and field selector parsing and matching."""

from __future__ import annotations

import pytest

from shoal import errors
from shoal.api.meta.v1 import meta_pb2
from shoal.selectors import NOTHING, from_map, from_proto, parse_fields, parse_labels

LABELS = {"app": "web", "tier": "front", "replicas": "3"}


@pytest.mark.parametrize(("selector", "matches"), [
    ("", True),
    ("app=web", True),
    ("app==web", True),
    ("app=db", False),
    ("app!=db", True),
    ("missing!=x", True),
    ("tier in (front, back)", True),
    ("tier in (back)", False),
    ("tier notin (back)", True),
    ("missing notin (x)", True),
    ("tier", True),
    ("missing", False),
    ("!missing", True),
    ("!tier", False),
    ("app=web,tier=front", True),
    ("app=web,tier=back", False),
    ("replicas>2", True),
    ("replicas<3", False),
    ("example.com/key=v", False),
])
def test_label_selector_semantics(selector: str, matches: bool) -> None:
    assert parse_labels(selector).matches(LABELS) is matches


@pytest.mark.parametrize("bad", ["app=", "in (a)", "app in (", "app in ()", "a,", "app=web x",
                                 "Bad Key=v", "app=-bad-", "app>x"])
def test_bad_label_selectors_are_rejected(bad: str) -> None:
    with pytest.raises(errors.BadRequest, match="invalid label selector"):
        parse_labels(bad)


def test_proto_and_map_selectors() -> None:
    sel = meta_pb2.LabelSelector(match_labels={"app": "web"}, match_expressions=[
        meta_pb2.LabelSelectorRequirement(key="tier", operator="In", values=["front"])])
    assert from_proto(sel).matches(LABELS)
    assert not from_proto(sel).matches({"app": "web"})
    assert from_proto(meta_pb2.LabelSelector()).matches({})  # empty matches everything
    assert not NOTHING.matches({})
    assert not from_map({}).matches(LABELS)  # a Service without selector selects nothing
    assert from_map({"app": "web"}).matches(LABELS)
    with pytest.raises(errors.BadRequest):
        from_proto(meta_pb2.LabelSelector(match_expressions=[
            meta_pb2.LabelSelectorRequirement(key="a", operator="Near")]))


def test_field_selectors() -> None:
    sel = parse_fields("spec.nodeName=n1,metadata.name!=x",
                       supported=frozenset({"spec.nodeName", "metadata.name"}))
    assert sel.matches({"spec.nodeName": "n1", "metadata.name": "y"})
    assert not sel.matches({"spec.nodeName": "n1", "metadata.name": "x"})
    assert parse_fields("spec.nodeName=").matches({"spec.nodeName": ""})
    with pytest.raises(errors.BadRequest, match='field label "spec.foo" is not supported'):
        parse_fields("spec.foo=1", supported=frozenset({"spec.nodeName"}), kind="Pod")
    with pytest.raises(errors.BadRequest, match="expected key=value"):
        parse_fields("justakey")
