"""Strict decoding of manifests and the special cases Kubernetes YAML needs."""

from __future__ import annotations

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.kinds import builtin_kinds
from shoal.manifests import decode, dump_yaml, encode, load_documents

KINDS = builtin_kinds()

NGINX_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  labels:
    app: nginx
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        ports:
        - containerPort: 80
"""


def _decode(text: str) -> object:
    (doc,) = load_documents(text, source="t.yaml")
    return decode(doc.data, KINDS, where=doc.where)[1]


def _causes(text: str) -> dict[str, str]:
    with pytest.raises(errors.Invalid) as e:
        _decode(text)
    return {c.field: c.message for c in e.value.causes}


def test_upstream_deployment_decodes_unchanged() -> None:
    d = _decode(NGINX_DEPLOYMENT)
    assert isinstance(d, apps_pb2.Deployment)
    assert d.spec.replicas == 3
    assert d.spec.template.spec.containers[0].ports[0].container_port == 80


def test_round_trip_is_stable() -> None:
    d = _decode(NGINX_DEPLOYMENT)
    again = _decode(dump_yaml(encode(d, KINDS)))  # type: ignore[arg-type]
    assert again == d


@pytest.mark.parametrize(("snippet", "field", "message"), [
    ("  replicas: three", "spec.replicas", "expected integer, got string"),
    ("  replicas: 3.5", "spec.replicas", "expected integer, got number"),
    ("  replicas: 99999999999", "spec.replicas", "out of range"),
    ("  paused: 'yes'", "spec.paused", "expected boolean, got string"),
    ("  colour: blue", "spec.colour", 'unknown field "colour"'),
    ("  selector: [a]", "spec.selector", "expected object, got array"),
    ("  minReadySeconds: true", "spec.minReadySeconds", "expected integer, got boolean"),
])
def test_wrong_types_and_unknown_fields_name_the_path(snippet: str, field: str,
                                                      message: str) -> None:
    text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n" + snippet
    causes = _causes(text)
    assert field in causes and message in causes[field]


def test_every_problem_is_reported_not_only_the_first() -> None:
    causes = _causes("""
apiVersion: v1
kind: Pod
metadata: {name: p, labelz: {}}
spec:
  containers:
  - name: a
    image: 3
    ports: [{containerPort: "80"}]
""")
    assert set(causes) == {"metadata.labelz", "spec.containers[0].image",
                           "spec.containers[0].ports[0].containerPort"}


def test_unknown_kind_and_missing_type_meta() -> None:
    with pytest.raises(errors.Invalid, match="no kind 'Widget' is registered"):
        _decode("apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n")
    with pytest.raises(errors.Invalid, match="no apiVersion or kind"):
        _decode("metadata: {name: w}\n")
    with pytest.raises(errors.Invalid, match="known kinds in apps/v1"):
        _decode("apiVersion: apps/v1\nkind: Pod\n")


@pytest.mark.parametrize(("value", "which", "expected"), [
    ("8080", "int_val", 8080),
    ("http", "str_val", "http"),
    ("'8080'", "str_val", "8080"),
])
def test_int_or_string(value: str, which: str, expected: object) -> None:
    svc = _decode(f"""
apiVersion: v1
kind: Service
metadata: {{name: s}}
spec: {{ports: [{{port: 80, targetPort: {value}}}]}}
""")
    tp = svc.spec.ports[0].target_port  # type: ignore[attr-defined]
    assert tp.WhichOneof("value") == which and getattr(tp, which) == expected
    assert encode(svc, KINDS)["spec"]["ports"][0]["targetPort"] == expected  # type: ignore[arg-type]


def test_percent_int_or_string_and_quantities() -> None:
    d = _decode("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  strategy: {rollingUpdate: {maxUnavailable: 0, maxSurge: 25%}}
  template:
    spec:
      containers:
      - name: c
        image: i
        resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {cpu: 2, memory: 1.5Gi}}
""")
    ru = d.spec.strategy.rolling_update  # type: ignore[attr-defined]
    assert ru.max_unavailable.int_val == 0 and ru.max_unavailable.HasField("int_val")
    assert ru.max_surge.str_val == "25%"
    res = d.spec.template.spec.containers[0].resources  # type: ignore[attr-defined]
    assert res.requests["cpu"].value == "50m" and res.limits["cpu"].value == "2"
    assert res.limits["memory"].value == "1.5Gi"
    causes = _causes("""
apiVersion: v1
kind: Pod
metadata: {name: p}
spec: {containers: [{name: c, image: i, resources: {requests: {cpu: lots}}}]}
""")
    assert "quantities must match" in causes["spec.containers[0].resources.requests[cpu]"]


def test_secret_data_is_base64_and_string_data_is_text() -> None:
    s = _decode("""
apiVersion: v1
kind: Secret
metadata: {name: s}
data: {password: aHVudGVyMg==}
stringData: {user: admin}
""")
    assert isinstance(s, core_pb2.Secret)
    assert s.data["password"] == b"hunter2" and s.string_data["user"] == "admin"
    assert encode(s, KINDS)["data"] == {"password": "aHVudGVyMg=="}
    causes = _causes("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {p: '%%%'}\n")
    assert causes["data[p]"] == "illegal base64 data"


def test_timestamps_stay_rfc3339_and_durations_parse() -> None:
    ev = _decode("""
apiVersion: v1
kind: Event
metadata: {name: e, creationTimestamp: 2024-05-06T07:08:09Z}
involvedObject: {kind: Pod, name: p}
lastTimestamp: "2024-05-06T07:08:10.5Z"
""")
    out = encode(ev, KINDS)  # type: ignore[arg-type]
    assert out["metadata"]["creationTimestamp"] == "2024-05-06T07:08:09Z"
    assert out["lastTimestamp"] == "2024-05-06T07:08:10.5Z"
    causes = _causes("apiVersion: v1\nkind: Event\nmetadata: {name: e}\nlastTimestamp: soon\n")
    assert "RFC 3339" in causes["lastTimestamp"]


def test_acronym_json_names_match_kubernetes() -> None:
    p = _decode("""
apiVersion: v1
kind: Pod
metadata: {name: p}
spec: {hostPID: true, hostIPC: true, containers: [{name: c, image: i}]}
status: {podIP: 10.0.0.1, hostIP: 192.168.0.1, podIPs: [{ip: 10.0.0.1}]}
""")
    assert p.spec.host_pid and p.status.pod_ip == "10.0.0.1"  # type: ignore[attr-defined]
    svc = _decode("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
                  "spec: {clusterIP: None, ports: [{port: 1}]}\n")
    assert svc.spec.cluster_ip == "None"  # type: ignore[attr-defined]


def test_yaml_errors_duplicates_and_lists() -> None:
    with pytest.raises(errors.Invalid, match=r"t.yaml: YAML syntax error at line 2"):
        load_documents("a: b\n  c: [\n", source="t.yaml")
    with pytest.raises(errors.Invalid, match="duplicate key 'name'"):
        load_documents("metadata:\n  name: a\n  name: b\n", source="t.yaml")
    docs = load_documents("---\n---\napiVersion: v1\nkind: List\nitems:\n"
                          "- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n"
                          "- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n",
                          source="l.yaml")
    assert [d.data["metadata"]["name"] for d in docs] == ["a", "b"]


def test_error_names_file_document_and_object() -> None:
    docs = load_documents("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\n---\n"
                          "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bad}\ndata: 3\n",
                          source="app.yaml")
    decode(docs[0].data, KINDS, where=docs[0].where)
    with pytest.raises(errors.Invalid) as e:
        decode(docs[1].data, KINDS, where=docs[1].where)
    assert str(e.value).startswith('app.yaml: document 2: ConfigMap "bad" is invalid: data:')
