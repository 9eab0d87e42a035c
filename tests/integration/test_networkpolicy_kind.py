"""NetworkPolicy through the CLI and the SDK, on a live apiserver.

Kubernetes' YAML applies unchanged, reads back with the API's defaults
(policyTypes, protocol), lists with kubectl's columns; bad input is refused
with the field named and nothing stored, by the CLI and by the server.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shoal import errors
from shoal.api.networking.v1 import networking_pb2
from shoal.kinds import builtin_kinds
from shoal.manifests import decode
from shoal.testing.cli import Result, run_shoal
from shoal.testing.cli import make_namespace as _make_namespace


@pytest.fixture
def shoal(apiserver: Any, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> Any:
    async def run(*args: str, stdin: str | None = None) -> Result:
        return await run_shoal(apiserver.config_path, capsys, monkeypatch, *args, stdin=stdin)

    return run


async def make_namespace(shoal: Any) -> str:
    return await _make_namespace(shoal, "np")


KUBE_YAML = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-ingress
  namespace: {ns}
spec:
  podSelector: {{}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: api-allow
  namespace: {ns}
spec:
  podSelector:
    matchLabels:
      app: api
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: front
      podSelector:
        matchLabels:
          role: web
    ports:
    - port: http
    - protocol: UDP
      port: 32000
      endPort: 32768
  egress:
  - to:
    - ipBlock:
        cidr: 0.0.0.0/0
        except:
        - 169.254.169.254/32
"""


async def test_kube_yaml_applies_unchanged_and_reads_back_defaulted(
        shoal: Any, apiserver: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("apply", "-f", "-", stdin=KUBE_YAML.format(ns=ns))
    assert r.code == 0, r.err
    assert r.out.splitlines() == [
        "networkpolicy.networking.k8s.io/default-deny-ingress created",
        "networkpolicy.networking.k8s.io/api-allow created"]
    again = await shoal("apply", "-f", "-", stdin=KUBE_YAML.format(ns=ns))
    assert again.code == 0 and again.out.count("unchanged") == 2, again.out

    doc = yaml.safe_load((await shoal("get", "netpol", "api-allow", "-n", ns, "-o",
                                      "yaml")).out)
    assert doc["apiVersion"] == "networking.k8s.io/v1"
    assert doc["spec"]["policyTypes"] == ["Ingress", "Egress"]  # defaulted
    assert doc["spec"]["ingress"][0]["ports"] == [
        {"port": "http", "protocol": "TCP"},
        {"protocol": "UDP", "port": 32000, "endPort": 32768}]
    peer = doc["spec"]["ingress"][0]["from"][0]
    assert set(peer) == {"namespaceSelector", "podSelector"}
    assert doc["spec"]["egress"][0]["to"][0]["ipBlock"]["except"] == ["169.254.169.254/32"]

    table = await shoal("get", "networkpolicies", "-n", ns)
    assert [line.split()[:2] for line in table.out.splitlines()] == [
        ["NAME", "POD-SELECTOR"], ["api-allow", "app=api"], ["default-deny-ingress", "<none>"]]

    async with apiserver.client() as c:  # what the node agents read
        items = (await c.list(networking_pb2.NetworkPolicy, namespace=ns)).items
    deny = next(p for p in items if p.metadata.name == "default-deny-ingress")
    assert list(deny.spec.policy_types) == ["Ingress"] and deny.spec.HasField("pod_selector")

    deleted = await shoal("delete", "-f", "-", stdin=KUBE_YAML.format(ns=ns))
    assert deleted.code == 0, deleted.err
    gone = await shoal("get", "netpol", "-n", ns, "-o", "name")
    assert gone.code == 0 and gone.out == "", gone


def doc(ns: str, spec: dict[str, Any], *, name: str = "bad") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


@pytest.mark.parametrize(("spec", "field", "message"), [
    pytest.param({"policyTypes": ["Inbound"]}, "spec.policyTypes[0]",
                 'Unsupported value: "Inbound"', id="policy-type"),
    pytest.param({"ingress": [{"ports": [{"protocol": "ICMP"}]}]},
                 "spec.ingress[0].ports[0].protocol", 'Unsupported value: "ICMP"',
                 id="protocol"),
    pytest.param({"ingress": [{"ports": [{"port": 80, "endPort": 70}]}]},
                 "spec.ingress[0].ports[0].endPort", "must be greater than or equal to `port`",
                 id="end-port"),
    pytest.param({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                  "except": ["11.0.0.0/16"]}}]}]},
                 "spec.egress[0].to[0].ipBlock.except[0]", "strict subset", id="except"),
    pytest.param({"egress": [{"to": [{}]}]}, "spec.egress[0].to[0]", "must specify a peer",
                 id="empty-peer"),
    pytest.param({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"},
                                         "podSelector": {}}]}]},
                 "spec.ingress[0].from[0]", "may not specify both ipBlock and another peer",
                 id="ipblock-and-selector"),
    pytest.param({"ingress": [{"form": []}]}, "spec.ingress[0].form",
                 'unknown field "form"', id="unknown-field"),
])
async def test_bad_input_is_refused_naming_the_field(shoal: Any, apiserver: Any,
                                                     spec: dict[str, Any], field: str,
                                                     message: str) -> None:
    ns = await make_namespace(shoal)
    bad = doc(ns, spec)
    good = doc(ns, {"podSelector": {}}, name="good-first")
    r = await shoal("apply", "-f", "-", stdin=yaml.safe_dump_all([good, bad]))
    assert r.code == 2, r.out
    assert field in r.err and message in r.err, r.err
    listed = await shoal("get", "netpol", "-n", ns, "-o", "name")
    assert listed.code == 0 and listed.out == "", listed  # nothing stored
    try:
        _, msg = decode(bad, builtin_kinds())
    except errors.Invalid:
        return  # the codec refuses it before any request can be made
    async with apiserver.client() as c:  # the server refuses it too
        with pytest.raises(errors.Invalid) as raised:
            await c.create(msg)
        assert field in str(raised.value) or any(
            cause.field == field for cause in raised.value.causes)
        assert (await c.list(networking_pb2.NetworkPolicy, namespace=ns)).items == []
