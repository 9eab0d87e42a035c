"""WorkloadEntry (networking.istio.io): decoding in every version, Istio's validation,
and a ServiceEntry's workloadSelector (pure, table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.kinds import builtin_kinds
from shoal.manifests import decode, encode
from shoal.validation import apply_defaults, validate

KINDS = builtin_kinds()


def problems(kind: str, spec: dict[str, Any], labels: dict[str, str] | None = None
             ) -> list[tuple[str, str]]:
    k, msg = decode({"apiVersion": "networking.istio.io/v1", "kind": kind,
                     "metadata": {"name": "x", "namespace": "shop", "labels": labels or {}},
                     "spec": spec}, KINDS)
    apply_defaults(k, msg)
    return [(e.field, e.message) for e in validate(k, msg)]


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_every_version_decodes_and_encodes_as_v1(version: str) -> None:
    k, msg = decode({"apiVersion": f"networking.istio.io/{version}", "kind": "WorkloadEntry",
                     "metadata": {"name": "vm", "namespace": "shop"},
                     "spec": {"address": "10.77.0.100", "ports": {"http": 8080},
                              "labels": {"app": "legacy"}, "serviceAccount": "legacy",
                              "network": "lab", "locality": "r/z", "weight": 3}}, KINDS)
    assert k.kind == "WorkloadEntry"
    out = encode(msg, KINDS)
    assert out["apiVersion"] == "networking.istio.io/v1"
    assert out["spec"]["serviceAccount"] == "legacy" and out["spec"]["ports"] == {
        "http": 8080}


@pytest.mark.parametrize("name", ["we", "workloadentry", "workloadentries",
                                  "workloadentries.networking.istio.io"])
def test_names(name: str) -> None:
    assert KINDS.by_name(name).kind == "WorkloadEntry"


@pytest.mark.parametrize(("spec", "labels", "field", "words"), [
    ({}, {}, "spec.address", "unless network"),
    ({"address": "not a host!"}, {}, "spec.address", "FQDN"),
    ({"address": "10.0.0.1", "ports": {"http": 0}}, {}, "spec.ports[http]", "between 1"),
    ({"address": "10.0.0.1", "ports": {"Bad_Name": 80}}, {}, "spec.ports[Bad_Name]", ""),
    ({"address": "unix:///sock", "ports": {"http": 80}}, {}, "spec.ports", "unix"),
    ({"address": "10.0.0.1", "serviceAccount": "Bad SA"}, {}, "spec.serviceAccount", ""),
    ({"address": "10.0.0.1", "labels": {"a": "b c"}}, {}, "spec.labels[a]", ""),
    ({"address": "vm.example.com"}, {"shoal.dev/mesh-host": "h1"}, "spec.address",
     "IP address"),
])
def test_workload_entry_problems(spec: dict[str, Any], labels: dict[str, str], field: str,
                                 words: str) -> None:
    found = problems("WorkloadEntry", spec, labels)
    assert any(f == field and words in m for f, m in found), found


@pytest.mark.parametrize("spec", [
    {"address": "10.0.0.1", "ports": {"http": 8080}, "serviceAccount": "legacy"},
    {"address": "vm.example.com"},
    {"network": "other"},
])
def test_valid_workload_entries(spec: dict[str, Any]) -> None:
    assert problems("WorkloadEntry", spec, {"shoal.dev/mesh-host": "h1"}
                    if spec.get("address", "").startswith("10.") else {}) == []


def test_service_entry_workload_selector_excludes_endpoints() -> None:
    base = {"hosts": ["legacy.internal"], "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "workloadSelector": {"labels": {"app": "legacy"}}}
    assert problems("ServiceEntry", base) == []
    found = problems("ServiceEntry", {**base, "endpoints": [{"address": "10.0.0.1"}]})
    assert any(f == "spec.workloadSelector" and "only one of" in m for f, m in found), found
