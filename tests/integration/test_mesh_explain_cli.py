"""``shoal mesh explain`` on a live apiserver: the objects are read through the API and the
answer comes from the agent's routing, DestinationRule and policy code."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.cli import Result, make_namespace, run_shoal

SETUP = """\
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}, labels: {{app: client}}}}
spec: {{nodeName: n1, containers: [{{name: c, image: busybox}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-v1, namespace: {ns}, labels: {{app: web, version: v1}}}}
spec: {{nodeName: n1, containers: [{{name: c, image: busybox}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-v2, namespace: {ns}, labels: {{app: web, version: v2}}}}
spec: {{nodeName: n2, containers: [{{name: c, image: busybox}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  ports: [{{name: http-web, port: 80}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web, namespace: {ns}}}
subsets:
- addresses:
  - {{ip: 10.244.1.2, targetRef: {{kind: Pod, namespace: {ns}, name: web-v1}}}}
  - {{ip: 10.244.2.3, targetRef: {{kind: Pod, namespace: {ns}, name: web-v2}}}}
  ports: [{{name: http-web, port: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: {ns}}}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: {ns}}}
spec:
  hosts: [web]
  http:
  - match: [{{uri: {{prefix: /beta}}}}]
    route: [{{destination: {{host: web, subset: v2}}}}]
    timeout: 3s
  - route: [{{destination: {{host: web, subset: v1}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: get-only, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]
"""


@pytest.fixture
def shoal(apiserver: Any, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> Any:
    async def run(*args: str, stdin: str | None = None) -> Result:
        return await run_shoal(apiserver.config_path, capsys, monkeypatch, *args, stdin=stdin)

    return run


async def _running(client: AsyncClient, ns: str, name: str, ip: str) -> None:
    pod = await client.get(core_pb2.Pod, name, namespace=ns)
    pod.status.phase, pod.status.pod_ip = "Running", ip
    await client.update_status(pod)


async def test_explain_a_request_through_the_cli(shoal: Any, client: AsyncClient) -> None:
    ns = await make_namespace(shoal, "explain")
    r = await shoal("apply", "-f", "-", stdin=SETUP.format(ns=ns))
    assert r.code == 0, r.err
    for name, ip in (("client", "10.244.1.9"), ("web-v1", "10.244.1.2"),
                     ("web-v2", "10.244.2.3")):
        await _running(client, ns, name, ip)

    beta = await shoal("mesh", "explain", "client", "web", "-n", ns, "--path", "/beta/x")
    assert beta.code == 0, beta.err
    lines = beta.out.splitlines()
    assert f"Route: VirtualService {ns}/web http[0]" in lines
    assert "  timeout: 3s" in lines
    assert f"  -> 100% web.{ns}.svc.cluster.local:80 subset v2" in lines
    assert "      load balancer: CONSISTENT_HASH by header x-user" in lines
    assert any(line.startswith(f"      endpoint 10.244.2.3:8080 pod {ns}/web-v2 node n2: mTLS "
                               f"PERMISSIVE (mutual_tls), policy ALLOW by {ns}/get-only")
               for line in lines), beta.out
    assert any("known only by the source pod's agent" in line for line in lines)

    post = await shoal("mesh", "explain", "client", f"web.{ns}:80", "-n", ns, "--method", "POST",
                       "--header", "x-user=ann", "-o", "json")
    assert post.code == 0, post.err
    doc = json.loads(post.out)
    assert doc["route"]["origin"] == f"VirtualService {ns}/web http[1]"
    [dest] = doc["destinations"]
    assert dest["subset"] == "v1"
    [ep] = dest["endpoints"]
    assert ep["address"] == "10.244.1.2:8080"
    assert ep["policy"]["allowed"] is False            # only GET is allowed
    assert doc["request"]["headers"] == {"x-user": "ann"}

    bad = await shoal("mesh", "explain", "client", "nothere", "-n", ns)
    assert bad.code == 2 and f'no Service "nothere" in namespace "{ns}"' in bad.err
    bad = await shoal("mesh", "explain", "client", "web", "-n", ns, "--header", "oops")
    assert bad.code == 2 and "expected NAME=VALUE" in bad.err
