"""``shoal apply`` planning, without a server: decode, prepare, merge, plan, outcome.

Every function here is pure; the server's part is played by plain dicts of
"stored" objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from shoal import manifests, validation
from shoal.cli import applying
from shoal.cli.applying import (
    LAST_APPLIED,
    Decoded,
    Desired,
    ObjectKey,
    Problem,
    decode_documents,
    document_label,
    merge_for_update,
    namespace_mismatch,
    plan_apply,
    prepare,
    resolve_namespace,
    three_way,
    update_outcome,
)
from shoal.cli.reporting import InputError, error_lines
from shoal.kinds import builtin_kinds
from shoal.manifests import Document

KINDS = builtin_kinds()


def deployment(name: str = "web", *, replicas: int = 3, namespace: str | None = None,
               labels: Mapping[str, str] | None = None, image: str = "nginx:1.27"
               ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(labels or {"app": name})}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "web", "image": image}]}}}}


def configmap(name: str, *, namespace: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def docs(*data: Any, source: str = "app.yaml") -> list[Document]:
    return [Document(d, source, i) for i, d in enumerate(data, start=1)]


def decoded(*data: Any) -> list[Decoded]:
    out, problems = decode_documents(docs(*data), KINDS)
    assert problems == []
    return out


def desired(*data: Any, default_namespace: str = "default") -> list[Desired]:
    out, problems = prepare(decoded(*data), explicit_namespace=None,
                            default_namespace=default_namespace)
    assert problems == []
    return out


def stored(data: dict[str, Any], *, rv: str = "7", uid: str = "u-1",
           status: Mapping[str, Any] | None = None, ns: str = "default") -> Any:
    """An object as the server would hold it: server metadata and status filled in."""
    kind, obj = manifests.decode(data, KINDS)
    meta: Any = obj.metadata  # type: ignore[attr-defined]
    meta.resource_version = rv
    meta.uid = uid
    meta.generation = 2
    meta.creation_timestamp.seconds = 1_700_000_000
    if kind.namespaced:
        meta.namespace = ns
    if status is not None:
        _, with_status = manifests.decode({**data, "status": dict(status)}, KINDS)
        obj.status.CopyFrom(with_status.status)  # type: ignore[attr-defined]
    return obj


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("data", "label"), [
    (deployment("web"), 'app.yaml: document 1 (Deployment "web")'),
    ({"kind": "Deployment", "metadata": {}}, "app.yaml: document 1 (Deployment)"),
    ({"apiVersion": "v1"}, "app.yaml: document 1"),
    ("just text", "app.yaml: document 1"),
])
def test_document_label(data: Any, label: str) -> None:
    assert document_label(docs(data)[0]) == label


def test_decode_reports_every_problem_of_every_document() -> None:
    bad_field = deployment("web")
    bad_field["spec"]["replicaz"] = 2
    bad_type = configmap("cfg")
    bad_type["data"] = {"a": 1}
    _, problems = decode_documents(docs(
        configmap("ok"), bad_field, {"apiVersion": "v1", "kind": "Frob", "metadata": {}},
        bad_type, "text"), KINDS)
    assert [str(p) for p in problems] == [
        'app.yaml: document 2 (Deployment "web"): spec.replicaz: unknown field "replicaz"',
        "app.yaml: document 3 (Frob): kind: no kind 'Frob' is registered for apiVersion 'v1' "
        "(known kinds in v1: ConfigMap, Endpoints, Event, Namespace, Node, Pod, Secret, "
        "Service, ServiceAccount)",
        'app.yaml: document 4 (ConfigMap "cfg"): data[a]: expected string, got integer',
        "app.yaml: document 5: a manifest must be an object, got string",
    ]


# --------------------------------------------------------------------------- namespaces


@pytest.mark.parametrize(("manifest", "explicit", "mismatch"), [
    ("", None, False),
    ("", "b", False),
    ("a", None, False),
    ("a", "a", False),
    ("a", "b", True),
])
def test_namespace_mismatch(manifest: str, explicit: str | None, mismatch: bool) -> None:
    message = namespace_mismatch(manifest, explicit)
    assert (message is not None) == mismatch
    if message:
        assert message == ('the namespace from the provided object "a" does not match the '
                           "namespace \"b\". You must pass '--namespace=a' to perform this "
                           "operation.")


@pytest.mark.parametrize(("kind_name", "manifest", "explicit", "expected"), [
    ("configmaps", "a", None, "a"),
    ("configmaps", "", "b", "b"),
    ("configmaps", "", None, "cfg-ns"),
    ("configmaps", "a", "a", "a"),
    ("namespaces", "a", None, ""),
    ("nodes", "", "b", ""),
])
def test_resolve_namespace(kind_name: str, manifest: str, explicit: str | None,
                           expected: str) -> None:
    assert resolve_namespace(KINDS.by_name(kind_name), manifest, explicit=explicit,
                             default="cfg-ns") == expected


# --------------------------------------------------------------------------- prepare


def test_prepare_sets_namespaces_and_leaves_defaults_to_the_server() -> None:
    out, problems = prepare(decoded(namespace("hello"), configmap("a"), deployment("web"),
                                    configmap("b", namespace="other")),
                            explicit_namespace=None, default_namespace="team")
    assert problems == []
    assert [d.key for d in out] == [
        ObjectKey("namespaces", "", "hello"), ObjectKey("configmaps", "team", "a"),
        ObjectKey("deployments.apps", "team", "web"), ObjectKey("configmaps", "other", "b")]
    # Not defaulted: the server fills in (and keeps) its own defaults.
    assert not out[2].obj.spec.template.spec.restart_policy
    assert [d.display for d in out] == ["namespace/hello", "configmap/a",
                                        "deployment.apps/web", "configmap/b"]


@pytest.mark.parametrize(("data", "explicit", "expected"), [
    (deployment("web", replicas=-1), None,
     ['app.yaml: document 1 (Deployment "web"): spec.replicas: Invalid value: -1: must be '
      "greater than or equal to 0"]),
    (configmap("a", namespace="x"), "y",
     ['app.yaml: document 1 (ConfigMap "a"): the namespace from the provided object "x" does '
      "not match the namespace \"y\". You must pass '--namespace=x' to perform this "
      "operation."]),
    ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "a-"}}, None,
     ["app.yaml: document 1 (ConfigMap): metadata.generateName cannot be used with apply; "
      "set metadata.name"]),
    ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Bad_Name"}}, None,
     None),
])
def test_prepare_reports_local_problems(data: Any, explicit: str | None,
                                        expected: list[str] | None) -> None:
    _, problems = prepare(decoded(data), explicit_namespace=explicit, default_namespace="d")
    if expected is None:  # some validation message naming the field
        assert problems and all("metadata.name" in str(p) for p in problems)
    else:
        assert [str(p) for p in problems] == expected


def test_prepare_reports_the_same_object_twice() -> None:
    _, problems = prepare(decoded(configmap("a"), configmap("a", namespace="d")),
                          explicit_namespace=None, default_namespace="d")
    assert [str(p) for p in problems] == [
        'app.yaml: document 2 (ConfigMap "a"): the same object is also given by '
        'app.yaml: document 1 (ConfigMap "a")']


def test_problems_print_as_kubectl_style_error_lines() -> None:
    problem = Problem('app.yaml: document 2 (Deployment "web")',
                      "spec.replicas: Invalid value: -1: must be greater than or equal to 0")
    assert error_lines(InputError([problem])) == [
        'error: app.yaml: document 2 (Deployment "web"): spec.replicas: Invalid value: -1: '
        "must be greater than or equal to 0"]


def test_prepare_reports_a_file_given_twice() -> None:
    twice = decode_documents(docs(configmap("a")) + docs(configmap("a")), KINDS)[0]
    _, problems = prepare(twice, explicit_namespace=None, default_namespace="d")
    assert [p.message for p in problems] == [
        'the same object is also given by app.yaml: document 1 (ConfigMap "a")']


# --------------------------------------------------------------------------- merge


def test_merge_takes_the_manifest_and_keeps_what_others_wrote() -> None:
    existing = stored(deployment("web", replicas=3, labels={"app": "web", "old": "x"}),
                      status={"readyReplicas": 3})
    existing.metadata.annotations["deployment.kubernetes.io/revision"] = "2"
    existing.spec.paused = True
    want = desired(deployment("web", replicas=5, image="nginx:2"))[0]
    merged = merge_for_update(existing, want.obj, want.kind)
    meta = merged.metadata
    # Server-set metadata and status are kept; rv is the one read.
    assert (meta.uid, meta.resource_version, meta.generation) == ("u-1", "7", 2)
    assert meta.creation_timestamp.seconds == 1_700_000_000
    assert merged.status.ready_replicas == 3
    # Never applied before: nothing is known to be the manifest's to remove.
    assert dict(meta.labels) == {"app": "web", "old": "x"}
    assert meta.annotations["deployment.kubernetes.io/revision"] == "2"
    assert merged.spec.paused
    # What the manifest sets wins, and is remembered.
    assert merged.spec.replicas == 5
    assert merged.spec.template.spec.containers[0].image == "nginx:2"
    assert json.loads(meta.annotations[LAST_APPLIED])["spec"]["replicas"] == 5


def test_merge_removes_what_the_previous_apply_set_and_this_one_drops() -> None:
    first = desired(deployment("web", replicas=3, labels={"app": "web", "tier": "x"}))[0]
    first.obj.spec.min_ready_seconds = 5
    existing = stored(deployment("web", replicas=3))
    existing.CopyFrom(merge_for_update(existing, first.obj, first.kind))
    existing.metadata.labels["added-by-hand"] = "yes"
    want = desired(deployment("web", replicas=3, labels={"app": "web"}))[0]
    merged = merge_for_update(existing, want.obj, want.kind)
    assert dict(merged.metadata.labels) == {"app": "web", "added-by-hand": "yes"}
    assert merged.spec.min_ready_seconds == 0


def test_merge_of_an_object_without_status_merges_its_data() -> None:
    before = desired(configmap("a", x="1", y="2"))[0]
    existing = stored(configmap("a"))
    existing.CopyFrom(merge_for_update(existing, before.obj, before.kind))
    want = desired(configmap("a", x="9"))[0]
    merged = merge_for_update(existing, want.obj, want.kind)
    assert dict(merged.data) == {"x": "9"}
    assert merged.metadata.resource_version == "7"


@pytest.mark.parametrize(("live", "last", "want", "out"), [
    ({"a": 1, "b": 2}, {}, {"a": 3}, {"a": 3, "b": 2}),               # others' b stays
    ({"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1}, {"a": 1}),         # b was ours: gone
    ({"m": {"x": 1, "y": 2}}, {"m": {"x": 1}}, {"m": {}}, {"m": {"y": 2}}),
    ({"l": [1, 2, 3]}, {"l": [1]}, {"l": [4]}, {"l": [4]}),           # lists whole
    ({"a": {"x": 1}}, {}, {"a": 5}, {"a": 5}),                        # type change
    ({}, {"gone": 1}, {"new": {"k": "v"}}, {"new": {"k": "v"}}),
])
def test_three_way(live: Any, last: Any, want: Any, out: Any) -> None:
    assert three_way(live, last, want) == out


@pytest.mark.parametrize(("data", "fill", "check"), [
    # A bound pod keeps its node (the server refuses to unbind it).
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
      "spec": {"containers": [{"name": "c", "image": "i"}]}},
     lambda o: setattr(o.spec, "node_name", "n1"),
     lambda o: o.spec.node_name == "n1"),
    # A namespace keeps the finalizer that makes its deletion clean up.
    (namespace("hello"),
     lambda o: o.spec.finalizers.append("kubernetes"),
     lambda o: list(o.spec.finalizers) == ["kubernetes"]),
    # A service keeps its allocated address.
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
      "spec": {"ports": [{"port": 80}]}},
     lambda o: o.spec.MergeFrom(type(o.spec)(cluster_ip="10.96.0.9",
                                             cluster_ips=["10.96.0.9"])),
     lambda o: o.spec.cluster_ip == "10.96.0.9" and list(o.spec.cluster_ips) == ["10.96.0.9"]),
])
def test_merge_keeps_server_filled_fields_the_manifest_leaves_out(
        data: dict[str, Any], fill: Any, check: Any) -> None:
    existing = stored(data)
    fill(existing)
    want = desired(data)[0]
    assert check(merge_for_update(existing, want.obj, want.kind))


def test_merge_lets_the_manifest_set_a_server_filled_field() -> None:
    data = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"},
            "spec": {"finalizers": ["custom"]}}
    existing = stored(namespace("x"))
    existing.spec.finalizers.append("kubernetes")
    want = desired(data)[0]
    assert list(merge_for_update(existing, want.obj, want.kind).spec.finalizers) == ["custom"]


# --------------------------------------------------------------------------- plan


def key(kind_name: str, name: str, ns: str = "default") -> ObjectKey:
    return ObjectKey(kind_name, ns, name)


def test_plan_creates_what_is_missing_and_updates_what_exists() -> None:
    want = desired(configmap("a", x="1"), configmap("b"))
    plan = plan_apply(want, observed={key("configmaps", "a"): stored(configmap("a"))},
                      namespaces={"default"})
    assert plan.problems == ()
    assert [(a.verb, a.desired.key.name, a.checkable) for a in plan.actions] == [
        ("update", "a", True), ("create", "b", True)]
    assert plan.actions[0].obj.metadata.resource_version == "7"
    assert dict(plan.actions[0].obj.data) == {"x": "1"}
    assert plan.actions[1].obj is want[1].obj


@pytest.mark.parametrize(("data", "existing_ns", "problems", "checkable"), [
    ([configmap("a", namespace="nope")], set(),
     ['app.yaml: document 1 (ConfigMap "a"): namespaces "nope" not found'], [False]),
    ([namespace("new"), configmap("a", namespace="new")], set(), [], [True, False]),
    ([configmap("a", namespace="new"), namespace("new")], set(),
     ['app.yaml: document 1 (ConfigMap "a"): namespace "new" is created later in this apply; '
      "put the Namespace before the objects in it"], [False, True]),
    ([namespace("old"), configmap("a", namespace="old")], {"old"}, [], [True, True]),
    ([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}], set(), [], [True]),
])
def test_plan_needs_each_namespace_to_exist_or_come_first(
        data: list[dict[str, Any]], existing_ns: set[str], problems: list[str],
        checkable: list[bool]) -> None:
    plan = plan_apply(desired(*data), observed={}, namespaces=existing_ns)
    assert [str(p) for p in plan.problems] == problems
    assert [a.checkable for a in plan.actions] == checkable


# --------------------------------------------------------------------------- outcomes


def test_update_outcome() -> None:
    before = stored(configmap("a", x="1"), rv="7")
    same = stored(configmap("a", x="1"), rv="7")
    changed = stored(configmap("a", x="2"), rv="8")
    assert update_outcome(before, same, sent_version="7", dry_run=False) == "unchanged"
    assert update_outcome(before, changed, sent_version="7", dry_run=False) == "configured"
    # A dry run does not bump resourceVersion: compare the objects.
    assert update_outcome(before, same, sent_version="7", dry_run=True) == "unchanged"
    changed_dry = stored(configmap("a", x="2"), rv="7")
    assert update_outcome(before, changed_dry, sent_version="7", dry_run=True) == "configured"


def test_local_outcome_for_client_dry_run() -> None:
    want = desired(deployment("web"))
    existing = stored(deployment("web"), ns="default")
    validation.apply_defaults(want[0].kind, existing)
    plan = plan_apply(want, observed={want[0].key: existing}, namespaces={"default"})
    # Created some other way: the first apply adds the last-applied annotation.
    assert applying.local_outcome(plan.actions[0]) == "configured"
    existing.metadata.annotations[applying.LAST_APPLIED] = applying.last_applied_text(
        want[0].kind, want[0].obj)
    plan = plan_apply(want, observed={want[0].key: existing}, namespaces={"default"})
    assert applying.local_outcome(plan.actions[0]) == "unchanged"
    changed = desired(deployment("web", replicas=1))
    plan = plan_apply(changed, observed={want[0].key: existing}, namespaces={"default"})
    assert applying.local_outcome(plan.actions[0]) == "configured"
    plan = plan_apply(want, observed={}, namespaces={"default"})
    assert applying.local_outcome(plan.actions[0]) == "created"


@pytest.mark.parametrize(("mode", "suffix"), [
    ("none", ""), ("server", " (server dry run)"), ("client", " (dry run)")])
def test_dry_run_suffix(mode: applying.DryRun, suffix: str) -> None:
    assert applying.dry_run_suffix(mode) == suffix
