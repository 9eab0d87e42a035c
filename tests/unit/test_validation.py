"""Defaults and validation rules, table-driven.

Each rule is tested both ways: a valid base object passes, and each broken
variant of it yields exactly the expected field paths. Variants are written as
patches to the manifest: ``{"spec.containers[0].image": DELETE}``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from shoal.api.meta.v1 import meta_pb2
from shoal.errors import FieldError
from shoal.kinds import Kind, builtin_kinds
from shoal.manifests import decode, encode
from shoal.validation import apply_defaults, scaled_value, validate, validate_update

KINDS = builtin_kinds()
DELETE = object()
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")

REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"
DUPLICATE = "FieldValueDuplicate"
NOT_SUPPORTED = "FieldValueNotSupported"
NOT_FOUND = "FieldValueNotFound"
TOO_LONG = "FieldValueTooLong"
FORBIDDEN = "FieldValueForbidden"

# --------------------------------------------------------------------------- base objects

POD = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  volumes:
  - {name: data, emptyDir: {}}
  - {name: config, configMap: {name: web-config}}
  - {name: cache, emptyDir: {medium: Memory}}
  initContainers:
  - {name: setup, image: "busybox:1.36", command: [sh, -c, "true"]}
  containers:
  - name: web
    image: nginx:1.25
    ports:
    - {name: http, containerPort: 80}
    - {name: metrics, containerPort: 9090}
    env:
    - {name: MODE, value: prod}
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    resources:
      requests: {cpu: 100m, memory: 64Mi}
      limits: {cpu: 500m, memory: 128Mi}
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: config, mountPath: /etc/web}
    livenessProbe:
      httpGet: {path: /healthz, port: http}
    readinessProbe:
      tcpSocket: {port: 80}
"""

# The nginx Deployment from the Kubernetes documentation.
DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  namespace: default
  labels: {app: nginx}
spec:
  replicas: 3
  selector:
    matchLabels: {app: nginx}
  template:
    metadata:
      labels: {app: nginx}
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        ports:
        - containerPort: 80
"""

REPLICASET = """
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web-5d4f, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "nginx:1.25"}]
"""

STATEFULSET = """
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: default}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: db
        image: postgres:16
        volumeMounts: [{name: pgdata, mountPath: /var/lib/postgresql/data}]
  volumeClaimTemplates:
  - metadata: {name: pgdata}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
"""

DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: kube-system}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: "shoal/agent:0.1"}]
"""

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090}
"""

CONFIGMAP = """
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config, namespace: default}
data: {mode: prod}
binaryData: {blob: AAEC}
"""

SECRET = """
apiVersion: v1
kind: Secret
metadata: {name: web-tls, namespace: default}
data: {password: cGFzcw==}
stringData: {user: admin}
"""

NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
"""

NODE = """
apiVersion: v1
kind: Node
metadata: {name: node-1.example.com}
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24, "fd00:10:244:1::/64"]
  taints:
  - {key: dedicated, value: gpu, effect: NoSchedule}
"""

LEASE = """
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: kube-scheduler, namespace: kube-system}
spec: {holderIdentity: node-1, leaseDurationSeconds: 15}
"""

EVENT = """
apiVersion: v1
kind: Event
metadata: {name: web.17a3b, namespace: default}
involvedObject: {kind: Pod, name: web, namespace: default}
reason: Scheduled
type: Normal
"""

ENDPOINTS = """
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: default}
subsets:
- addresses: [{ip: 10.244.1.5, nodeName: node-1}]
  notReadyAddresses: [{ip: "fd00::5"}]
  ports:
  - {name: http, port: 8080}
  - {name: metrics, port: 9090}
"""

SERVICE_ACCOUNT = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: builder, namespace: default}
"""

ALL_BASES = [POD, DEPLOYMENT, REPLICASET, STATEFULSET, DAEMONSET, SERVICE, CONFIGMAP, SECRET,
             NAMESPACE, NODE, LEASE, EVENT, ENDPOINTS, SERVICE_ACCOUNT]

# --------------------------------------------------------------------------- helpers


def _tokens(path: str) -> list[str | int]:
    return [int(index) if index else key for key, index in _TOKEN.findall(path)]


def _set(doc: Any, path: str, value: object) -> None:
    """Set (or, with DELETE, remove) the value at a dotted path, creating maps on the way."""
    tokens = _tokens(path)
    node = doc
    for token, following in itertools.pairwise(tokens):
        if isinstance(token, int):
            node = node[token]
        else:
            node = node.setdefault(token, [] if isinstance(following, int) else {})
    last = tokens[-1]
    if value is DELETE:
        del node[last]
    elif isinstance(last, int) and last == len(node):
        node.append(value)
    else:
        node[last] = value


def _get(doc: Any, path: str) -> Any:
    for token in _tokens(path):
        doc = doc[token]
    return doc


def build(base: str, patch: Mapping[str, object] | None = None, *,
          defaults: bool = True) -> tuple[Kind, Any]:
    doc = yaml.safe_load(base)
    for path, value in (patch or {}).items():
        _set(doc, path, value)
    kind, obj = decode(doc, KINDS)
    if defaults:
        apply_defaults(kind, obj)
    return kind, obj


def fields(errs: list[FieldError]) -> set[str]:
    return {e.field for e in errs}


def case(name: str, base: str, patch: Mapping[str, object], *expected: str,
         reason: str = INVALID) -> Any:
    return pytest.param(base, patch, set(expected), reason, id=name)


def ok(name: str, base: str, patch: Mapping[str, object]) -> Any:
    return pytest.param(base, patch, id=name)


# --------------------------------------------------------------------------- valid objects


@pytest.mark.parametrize("base", ALL_BASES, ids=lambda b: yaml.safe_load(b)["kind"])
def test_base_objects_validate_clean(base: str) -> None:
    kind, obj = build(base)
    assert validate(kind, obj) == []


def test_kubernetes_docs_nginx_deployment_validates_after_defaults() -> None:
    kind, obj = build(DEPLOYMENT)
    assert validate(kind, obj) == []
    assert obj.spec.replicas == 3
    container = obj.spec.template.spec.containers[0]
    assert (container.image, container.ports[0].container_port) == ("nginx:1.14.2", 80)


def test_service_with_named_target_port_validates() -> None:
    kind, obj = build(SERVICE)
    assert obj.spec.ports[0].target_port.str_val == "http"
    assert validate(kind, obj) == []


@pytest.mark.parametrize(("base", "patch"), [
    ok("generateName instead of name", POD,
       {"metadata.name": DELETE, "metadata.generateName": "web-"}),
    ok("readiness successThreshold may exceed 1", POD,
       {"spec.containers[0].readinessProbe.successThreshold": 3}),
    ok("extended resource with a domain", POD,
       {"spec.containers[0].resources.limits": {"cpu": "1", "example.com/gpu": 1}}),
    ok("hugepages resource", POD, {"spec.containers[0].resources.limits.hugepages-2Mi": "4Mi"}),
    ok("sidecar init container may have probes", POD,
       {"spec.initContainers[0].restartPolicy": "Always",
        "spec.initContainers[0].readinessProbe": {"exec": {"command": ["true"]}}}),
    ok("label fieldRef", POD,
       {"spec.containers[0].env[1].valueFrom.fieldRef.fieldPath": "metadata.labels['app']"}),
    ok("toleration of every taint", POD, {"spec.tolerations": [{"operator": "Exists"}]}),
    ok("NoExecute toleration with seconds", POD,
       {"spec.tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                              "effect": "NoExecute", "tolerationSeconds": 300}]}),
    ok("node affinity", POD, {"spec.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]},
                                  {"key": "cores", "operator": "Gt", "values": ["4"]}]}]}}}}),
    ok("pod anti-affinity", POD, {"spec.affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}},
             "topologyKey": "kubernetes.io/hostname"}]}}}),
    ok("hostname and subdomain", POD, {"spec.hostname": "web-0", "spec.subdomain": "web"}),
    ok("headless service without ports", SERVICE, {"spec.clusterIP": "None", "spec.ports": []}),
    ok("ExternalName service", SERVICE,
       {"spec.type": "ExternalName", "spec.externalName": "db.example.com", "spec.ports": []}),
    ok("IPv6 cluster IP", SERVICE, {"spec.clusterIP": "fd00::10"}),
    ok("single unnamed service port", SERVICE, {"spec.ports": [{"port": 80}]}),
    ok("maxSurge above 100% for a Deployment", DEPLOYMENT,
       {"spec.strategy": {"rollingUpdate": {"maxSurge": "150%"}}}),
    ok("Recreate strategy", DEPLOYMENT, {"spec.strategy": {"type": "Recreate"}}),
    ok("matchExpressions selector", DEPLOYMENT,
       {"spec.selector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                "values": ["nginx", "web"]}]}}),
    ok("OnDelete StatefulSet", STATEFULSET,
       {"spec.updateStrategy": {"type": "OnDelete"}, "spec.podManagementPolicy": "Parallel"}),
    ok("dotted ConfigMap name", CONFIGMAP, {"metadata.name": "web.config"}),
])
def test_valid_variants(base: str, patch: Mapping[str, object]) -> None:
    kind, obj = build(base, patch)
    assert validate(kind, obj) == []


# --------------------------------------------------------------------------- broken objects

C0 = "spec.containers[0]"
T0 = "spec.template.spec.containers[0]"

METADATA_CASES = [
    case("name missing", POD, {"metadata.name": DELETE}, "metadata.name", reason=REQUIRED),
    case("name not a subdomain", POD, {"metadata.name": "Web"}, "metadata.name"),
    case("generateName bad", POD, {"metadata.name": DELETE, "metadata.generateName": "Web-"},
         "metadata.generateName"),
    case("namespace missing", POD, {"metadata.namespace": DELETE}, "metadata.namespace",
         reason=REQUIRED),
    case("namespace not a label", POD, {"metadata.namespace": "team.a"}, "metadata.namespace"),
    case("namespace on a cluster-scoped kind", NAMESPACE, {"metadata.namespace": "default"},
         "metadata.namespace", reason=FORBIDDEN),
    case("label key bad", POD, {"metadata.labels": {"bad key": "x"}}, "metadata.labels"),
    case("label value bad", POD, {"metadata.labels": {"app": "web!"}}, "metadata.labels"),
    case("annotation key bad", POD, {"metadata.annotations": {"a/b/c": "x"}},
         "metadata.annotations"),
    case("annotations too large", POD, {"metadata.annotations": {"big": "x" * 262144}},
         "metadata.annotations", reason=TOO_LONG),
    case("finalizer bad", POD, {"metadata.finalizers": ["a/b/c"]}, "metadata.finalizers[0]"),
    case("finalizer duplicate", POD,
         {"metadata.finalizers": ["shoal.io/cleanup", "shoal.io/cleanup"]},
         "metadata.finalizers[1]", reason=DUPLICATE),
    case("owner reference without uid", POD,
         {"metadata.ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                        "name": "web"}]},
         "metadata.ownerReferences[0].uid", reason=REQUIRED),
    case("two controller owners", POD, {"metadata.ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "a", "uid": "1",
         "controller": True},
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "b", "uid": "2",
         "controller": True}]}, "metadata.ownerReferences"),
    case("Namespace name must be a label", NAMESPACE, {"metadata.name": "team.a"},
         "metadata.name"),
    case("Service name must be a DNS-1035 label", SERVICE, {"metadata.name": "1web"},
         "metadata.name"),
]

CONTAINER_CASES = [
    case("no containers", POD, {"spec.containers": []}, "spec.containers", reason=REQUIRED),
    case("container name bad", POD, {f"{C0}.name": "Web_1"}, f"{C0}.name"),
    case("container name missing", POD, {f"{C0}.name": DELETE}, f"{C0}.name", reason=REQUIRED),
    case("container name repeats an init container", POD, {"spec.initContainers[0].name": "web"},
         f"{C0}.name", reason=DUPLICATE),
    case("container name repeated", POD, {"spec.containers[1]": {"name": "web", "image": "x:1"}},
         "spec.containers[1].name", reason=DUPLICATE),
    case("image missing", POD, {f"{C0}.image": DELETE}, f"{C0}.image", reason=REQUIRED),
    case("init image missing", POD, {"spec.initContainers[0].image": DELETE},
         "spec.initContainers[0].image", reason=REQUIRED),
    case("containerPort too high", POD, {f"{C0}.ports[1].containerPort": 70000},
         f"{C0}.ports[1].containerPort"),
    case("containerPort missing", POD, {f"{C0}.ports[1].containerPort": DELETE},
         f"{C0}.ports[1].containerPort", reason=REQUIRED),
    case("hostPort too high", POD, {f"{C0}.ports[0].hostPort": 70000}, f"{C0}.ports[0].hostPort"),
    case("hostPort negative", POD, {f"{C0}.ports[0].hostPort": -1}, f"{C0}.ports[0].hostPort"),
    case("hostPort claimed twice", POD, {
        f"{C0}.ports[0].hostPort": 8080, f"{C0}.ports[1].hostPort": 8080},
        f"{C0}.ports[1].hostPort", reason=DUPLICATE),
    case("protocol unknown", POD, {f"{C0}.ports[0].protocol": "HTTP"}, f"{C0}.ports[0].protocol",
         reason=NOT_SUPPORTED),
    case("port name bad", POD, {f"{C0}.ports[0].name": "HTTP"}, f"{C0}.ports[0].name"),
    case("port name repeated", POD, {f"{C0}.ports[1].name": "http"}, f"{C0}.ports[1].name",
         reason=DUPLICATE),
    case("env name bad", POD, {f"{C0}.env[0].name": "1MODE"}, f"{C0}.env[0].name"),
    case("env value and valueFrom", POD, {f"{C0}.env[1].value": "x"}, f"{C0}.env[1].valueFrom"),
    case("env valueFrom empty", POD, {f"{C0}.env[1].valueFrom": {}}, f"{C0}.env[1].valueFrom"),
    case("env valueFrom two sources", POD,
         {f"{C0}.env[1].valueFrom.secretKeyRef": {"name": "s", "key": "k"}},
         f"{C0}.env[1].valueFrom"),
    case("configMapKeyRef without key", POD,
         {f"{C0}.env[1].valueFrom": {"configMapKeyRef": {"name": "c"}}},
         f"{C0}.env[1].valueFrom.configMapKeyRef.key", reason=REQUIRED),
    case("secretKeyRef without name", POD,
         {f"{C0}.env[1].valueFrom": {"secretKeyRef": {"key": "k"}}},
         f"{C0}.env[1].valueFrom.secretKeyRef.name", reason=REQUIRED),
    case("fieldRef path unsupported", POD,
         {f"{C0}.env[1].valueFrom.fieldRef.fieldPath": "spec.bogus"},
         f"{C0}.env[1].valueFrom.fieldRef.fieldPath", reason=NOT_SUPPORTED),
    case("envFrom without a source", POD, {f"{C0}.envFrom": [{"prefix": "APP_"}]},
         f"{C0}.envFrom[0]"),
    case("request above limit", POD, {f"{C0}.resources.requests.cpu": "1"},
         f"{C0}.resources.requests[cpu]"),
    case("negative limit", POD, {f"{C0}.resources.limits.memory": "-1Mi"},
         f"{C0}.resources.limits[memory]"),
    case("unknown resource name", DEPLOYMENT, {f"{T0}.resources.limits.gpu": 1},
         f"{T0}.resources.limits[gpu]"),
    case("unknown resource name is copied to requests in a Pod", POD,
         {f"{C0}.resources.limits.gpu": 1},
         f"{C0}.resources.limits[gpu]", f"{C0}.resources.requests[gpu]"),
    case("mount of an undeclared volume", POD, {f"{C0}.volumeMounts[0].name": "nope"},
         f"{C0}.volumeMounts[0].name", reason=NOT_FOUND),
    case("mountPath missing", POD, {f"{C0}.volumeMounts[0].mountPath": DELETE},
         f"{C0}.volumeMounts[0].mountPath", reason=REQUIRED),
    case("mountPath repeated", POD, {f"{C0}.volumeMounts[1].mountPath": "/data"},
         f"{C0}.volumeMounts[1].mountPath"),
    case("subPath escapes", POD, {f"{C0}.volumeMounts[0].subPath": "../etc"},
         f"{C0}.volumeMounts[0].subPath"),
    case("terminationMessagePolicy unknown", POD, {f"{C0}.terminationMessagePolicy": "Log"},
         f"{C0}.terminationMessagePolicy", reason=NOT_SUPPORTED),
    case("imagePullPolicy unknown", POD, {f"{C0}.imagePullPolicy": "Sometimes"},
         f"{C0}.imagePullPolicy", reason=NOT_SUPPORTED),
    case("restartPolicy on a regular container", POD, {f"{C0}.restartPolicy": "Always"},
         f"{C0}.restartPolicy", reason=FORBIDDEN),
    case("init container restartPolicy other than Always", POD,
         {"spec.initContainers[0].restartPolicy": "Never"},
         "spec.initContainers[0].restartPolicy", reason=NOT_SUPPORTED),
]

PROBE_CASES = [
    case("probe without handler", POD, {f"{C0}.livenessProbe": {"initialDelaySeconds": 5}},
         f"{C0}.livenessProbe", reason=REQUIRED),
    case("probe with two handlers", POD, {f"{C0}.livenessProbe.exec": {"command": ["true"]}},
         f"{C0}.livenessProbe.httpGet", reason=FORBIDDEN),
    case("exec probe without command", POD, {f"{C0}.livenessProbe": {"exec": {}}},
         f"{C0}.livenessProbe.exec.command", reason=REQUIRED),
    case("httpGet port too high", POD, {f"{C0}.livenessProbe.httpGet.port": 70000},
         f"{C0}.livenessProbe.httpGet.port"),
    case("httpGet named port bad", POD, {f"{C0}.livenessProbe.httpGet.port": "HTTP_1"},
         f"{C0}.livenessProbe.httpGet.port"),
    case("httpGet scheme unknown", POD, {f"{C0}.livenessProbe.httpGet.scheme": "FTP"},
         f"{C0}.livenessProbe.httpGet.scheme", reason=NOT_SUPPORTED),
    case("tcpSocket port zero", POD, {f"{C0}.readinessProbe.tcpSocket.port": -1},
         f"{C0}.readinessProbe.tcpSocket.port"),
    case("grpc port out of range", POD, {f"{C0}.readinessProbe": {"grpc": {"port": 70000}}},
         f"{C0}.readinessProbe.grpc.port"),
    case("periodSeconds negative", POD, {f"{C0}.livenessProbe.periodSeconds": -1},
         f"{C0}.livenessProbe.periodSeconds"),
    case("failureThreshold negative", POD, {f"{C0}.readinessProbe.failureThreshold": -2},
         f"{C0}.readinessProbe.failureThreshold"),
    case("initialDelaySeconds negative", POD, {f"{C0}.livenessProbe.initialDelaySeconds": -1},
         f"{C0}.livenessProbe.initialDelaySeconds"),
    case("liveness successThreshold above 1", POD, {f"{C0}.livenessProbe.successThreshold": 2},
         f"{C0}.livenessProbe.successThreshold"),
    case("startup successThreshold above 1", POD,
         {f"{C0}.startupProbe": {"tcpSocket": {"port": 80}, "successThreshold": 2}},
         f"{C0}.startupProbe.successThreshold"),
    case("readiness probe with terminationGracePeriodSeconds", POD,
         {f"{C0}.readinessProbe.terminationGracePeriodSeconds": 5},
         f"{C0}.readinessProbe.terminationGracePeriodSeconds"),
    case("probe on a plain init container", POD,
         {"spec.initContainers[0].livenessProbe": {"exec": {"command": ["true"]}}},
         "spec.initContainers[0].livenessProbe", reason=FORBIDDEN),
    case("lifecycle handler with two actions", POD, {f"{C0}.lifecycle.preStop": {
        "exec": {"command": ["true"]}, "sleep": {"seconds": 5}}},
        f"{C0}.lifecycle.preStop.sleep", reason=FORBIDDEN),
]

VOLUME_CASES = [
    case("volume name bad", POD, {"spec.volumes[2].name": "Cache"}, "spec.volumes[2].name"),
    case("volume name repeated", POD, {"spec.volumes[2].name": "data"}, "spec.volumes[2].name",
         reason=DUPLICATE),
    case("volume with two sources", POD, {"spec.volumes[2].hostPath": {"path": "/tmp"}},
         "spec.volumes[2].hostPath", reason=FORBIDDEN),
    case("configMap volume without name", POD, {"spec.volumes[1].configMap.name": DELETE},
         "spec.volumes[1].configMap.name", reason=REQUIRED),
    case("secret volume without secretName", POD, {"spec.volumes[2]": {"name": "cache",
                                                                        "secret": {}}},
         "spec.volumes[2].secret.secretName", reason=REQUIRED),
    case("hostPath without path", POD, {"spec.volumes[2]": {"name": "cache", "hostPath": {}}},
         "spec.volumes[2].hostPath.path", reason=REQUIRED),
    case("hostPath type unknown", POD, {"spec.volumes[2]": {
        "name": "cache", "hostPath": {"path": "/x", "type": "Pipe"}}},
        "spec.volumes[2].hostPath.type", reason=NOT_SUPPORTED),
    case("emptyDir medium unknown", POD, {"spec.volumes[2].emptyDir.medium": "Disk"},
         "spec.volumes[2].emptyDir.medium", reason=NOT_SUPPORTED),
    case("defaultMode above 0777", POD, {"spec.volumes[1].configMap.defaultMode": 512},
         "spec.volumes[1].configMap.defaultMode"),
    case("configMap item path absolute", POD,
         {"spec.volumes[1].configMap.items": [{"key": "a", "path": "/etc/a"}]},
         "spec.volumes[1].configMap.items[0].path"),
    case("projected secret without name", POD, {"spec.volumes[2]": {
        "name": "cache", "projected": {"sources": [{"secret": {}}]}}},
        "spec.volumes[2].projected.sources[0].secret.name", reason=REQUIRED),
    case("projected token lives under 10 minutes", POD, {"spec.volumes[2]": {
        "name": "cache", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 60}}]}}},
        "spec.volumes[2].projected.sources[0].serviceAccountToken.expirationSeconds"),
    case("downwardAPI field unsupported", POD, {"spec.volumes[2]": {
        "name": "cache", "downwardAPI": {"items": [
            {"path": "node", "fieldRef": {"fieldPath": "spec.nodeName"}}]}}},
        "spec.volumes[2].downwardAPI.items[0].fieldRef.fieldPath", reason=NOT_SUPPORTED),
    case("claim without claimName", POD,
         {"spec.volumes[2]": {"name": "cache", "persistentVolumeClaim": {}}},
         "spec.volumes[2].persistentVolumeClaim.claimName", reason=REQUIRED),
]

POD_SPEC_CASES = [
    case("restartPolicy unknown", POD, {"spec.restartPolicy": "Sometimes"}, "spec.restartPolicy",
         reason=NOT_SUPPORTED),
    case("dnsPolicy unknown", POD, {"spec.dnsPolicy": "Bogus"}, "spec.dnsPolicy",
         reason=NOT_SUPPORTED),
    case("dnsPolicy None without nameservers", POD, {"spec.dnsPolicy": "None"},
         "spec.dnsConfig.nameservers", reason=REQUIRED),
    case("terminationGracePeriodSeconds negative", POD,
         {"spec.terminationGracePeriodSeconds": -1}, "spec.terminationGracePeriodSeconds"),
    case("activeDeadlineSeconds zero", POD, {"spec.activeDeadlineSeconds": 0},
         "spec.activeDeadlineSeconds"),
    case("nodeSelector key bad", POD, {"spec.nodeSelector": {"bad key": "x"}},
         "spec.nodeSelector"),
    case("nodeSelector value bad", POD, {"spec.nodeSelector": {"disk": "ssd!"}},
         "spec.nodeSelector"),
    case("toleration operator unknown", POD, {"spec.tolerations": [
        {"key": "k", "operator": "Maybe"}]}, "spec.tolerations[0].operator",
        reason=NOT_SUPPORTED),
    case("toleration Exists with a value", POD, {"spec.tolerations": [
        {"key": "k", "operator": "Exists", "value": "v"}]}, "spec.tolerations[0].value"),
    case("toleration Equal without key", POD, {"spec.tolerations": [{"value": "v"}]},
         "spec.tolerations[0].operator"),
    case("toleration effect unknown", POD, {"spec.tolerations": [
        {"key": "k", "operator": "Exists", "effect": "Sometimes"}]},
        "spec.tolerations[0].effect", reason=NOT_SUPPORTED),
    case("tolerationSeconds without NoExecute", POD, {"spec.tolerations": [
        {"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]},
        "spec.tolerations[0].effect"),
    case("required node affinity without terms", POD, {"spec.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {}}}},
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms", reason=REQUIRED),
    case("node affinity operator unknown", POD, {"spec.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "Near"}]}]}}}},
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].operator", reason=NOT_SUPPORTED),
    case("node affinity In without values", POD, {"spec.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "In"}]}]}}}},
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].values", reason=REQUIRED),
    case("node affinity Exists with values", POD, {"spec.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "disk", "operator": "Exists", "values": ["x"]}]}]}}}},
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].values", reason=FORBIDDEN),
    case("node affinity Gt with a word", POD, {"spec.affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["many"]}]}]}}}},
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].values[0]"),
    case("preferred node affinity weight zero", POD, {"spec.affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": {}}]}}},
        "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight"),
    case("pod anti-affinity without topologyKey", POD, {"spec.affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "web"}}}]}}},
        "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0]"
        ".topologyKey", reason=REQUIRED),
    case("pod affinity without topologyKey", POD, {"spec.affinity": {"podAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "podAffinityTerm": {}}]}}},
        "spec.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
        ".podAffinityTerm.topologyKey", reason=REQUIRED),
    case("serviceAccountName bad", POD, {"spec.serviceAccountName": "Bad_SA"},
         "spec.serviceAccountName"),
    case("hostname not a label", POD, {"spec.hostname": "web.0"}, "spec.hostname"),
    case("subdomain not a label", POD, {"spec.subdomain": "Web"}, "spec.subdomain"),
    case("topology spread without key", POD, {"spec.topologySpreadConstraints": [
        {"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]},
        "spec.topologySpreadConstraints[0].topologyKey", reason=REQUIRED),
]

WORKLOAD_CASES = [
    case("selector missing", DEPLOYMENT, {"spec.selector": DELETE}, "spec.selector",
         reason=REQUIRED),
    case("selector empty", DEPLOYMENT, {"spec.selector": {}}, "spec.selector"),
    case("selector does not match template", DEPLOYMENT,
         {"spec.selector.matchLabels.app": "web"}, "spec.template.metadata.labels"),
    case("selector In without values", DEPLOYMENT, {"spec.selector": {"matchExpressions": [
        {"key": "app", "operator": "In"}]}}, "spec.selector.matchExpressions[0].values",
        reason=REQUIRED),
    case("selector Exists with values", DEPLOYMENT, {"spec.selector": {"matchExpressions": [
        {"key": "app", "operator": "Exists", "values": ["nginx"]}]}},
        "spec.selector.matchExpressions[0].values", reason=FORBIDDEN),
    case("selector operator unknown", DEPLOYMENT, {"spec.selector": {"matchExpressions": [
        {"key": "app", "operator": "Near"}]}}, "spec.selector.matchExpressions[0].operator",
        reason=NOT_SUPPORTED),
    case("replicas negative", DEPLOYMENT, {"spec.replicas": -1}, "spec.replicas"),
    case("template restartPolicy Never", DEPLOYMENT, {"spec.template.spec.restartPolicy": "Never"},
         "spec.template.spec.restartPolicy", reason=NOT_SUPPORTED),
    case("template containerPort too high", DEPLOYMENT, {f"{T0}.ports[0].containerPort": 70000},
         f"{T0}.ports[0].containerPort"),
    case("template label bad", DEPLOYMENT, {"spec.template.metadata.labels.bad key": "x"},
         "spec.template.metadata.labels"),
    case("template with activeDeadlineSeconds", DEPLOYMENT,
         {"spec.template.spec.activeDeadlineSeconds": 30},
         "spec.template.spec.activeDeadlineSeconds", reason=FORBIDDEN),
    case("strategy type unknown", DEPLOYMENT, {"spec.strategy.type": "BlueGreen"},
         "spec.strategy.type", reason=NOT_SUPPORTED),
    case("Recreate with rollingUpdate", DEPLOYMENT, {"spec.strategy": {
        "type": "Recreate", "rollingUpdate": {"maxSurge": 1}}}, "spec.strategy.rollingUpdate",
        reason=FORBIDDEN),
    case("maxUnavailable above 100%", DEPLOYMENT,
         {"spec.strategy.rollingUpdate.maxUnavailable": "120%"},
         "spec.strategy.rollingUpdate.maxUnavailable"),
    case("maxUnavailable not a percentage", DEPLOYMENT,
         {"spec.strategy.rollingUpdate.maxUnavailable": "half"},
         "spec.strategy.rollingUpdate.maxUnavailable"),
    case("maxSurge negative", DEPLOYMENT, {"spec.strategy.rollingUpdate.maxSurge": -1},
         "spec.strategy.rollingUpdate.maxSurge"),
    case("maxSurge and maxUnavailable both zero", DEPLOYMENT,
         {"spec.strategy.rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}},
         "spec.strategy.rollingUpdate.maxUnavailable"),
    case("revisionHistoryLimit negative", DEPLOYMENT, {"spec.revisionHistoryLimit": -1},
         "spec.revisionHistoryLimit"),
    case("progressDeadlineSeconds not above minReadySeconds", DEPLOYMENT,
         {"spec.progressDeadlineSeconds": 10, "spec.minReadySeconds": 10},
         "spec.progressDeadlineSeconds"),
    case("ReplicaSet selector mismatch", REPLICASET, {"spec.template.metadata.labels.app": "db"},
         "spec.template.metadata.labels"),
    case("ReplicaSet replicas negative", REPLICASET, {"spec.replicas": -2}, "spec.replicas"),
    case("StatefulSet podManagementPolicy unknown", STATEFULSET,
         {"spec.podManagementPolicy": "Random"}, "spec.podManagementPolicy",
         reason=NOT_SUPPORTED),
    case("StatefulSet updateStrategy unknown", STATEFULSET,
         {"spec.updateStrategy.type": "Canary"}, "spec.updateStrategy.type",
         reason=NOT_SUPPORTED),
    case("StatefulSet OnDelete with rollingUpdate", STATEFULSET, {"spec.updateStrategy": {
        "type": "OnDelete", "rollingUpdate": {"partition": 1}}},
        "spec.updateStrategy.rollingUpdate"),
    case("StatefulSet partition negative", STATEFULSET,
         {"spec.updateStrategy.rollingUpdate.partition": -1},
         "spec.updateStrategy.rollingUpdate.partition"),
    case("StatefulSet mount of an unknown claim", STATEFULSET,
         {f"{T0}.volumeMounts[0].name": "other"}, f"{T0}.volumeMounts[0].name",
         reason=NOT_FOUND),
    case("StatefulSet retention policy unknown", STATEFULSET,
         {"spec.persistentVolumeClaimRetentionPolicy.whenDeleted": "Keep"},
         "spec.persistentVolumeClaimRetentionPolicy.whenDeleted", reason=NOT_SUPPORTED),
    case("StatefulSet selector mismatch", STATEFULSET, {"spec.selector.matchLabels.tier": "x"},
         "spec.template.metadata.labels"),
    case("DaemonSet updateStrategy unknown", DAEMONSET, {"spec.updateStrategy.type": "Canary"},
         "spec.updateStrategy.type", reason=NOT_SUPPORTED),
    case("DaemonSet maxSurge above 100%", DAEMONSET,
         {"spec.updateStrategy.rollingUpdate.maxSurge": "150%"},
         "spec.updateStrategy.rollingUpdate.maxSurge"),
    case("DaemonSet maxUnavailable and maxSurge zero", DAEMONSET,
         {"spec.updateStrategy.rollingUpdate.maxUnavailable": 0},
         "spec.updateStrategy.rollingUpdate.maxUnavailable"),
    case("DaemonSet template restartPolicy OnFailure", DAEMONSET,
         {"spec.template.spec.restartPolicy": "OnFailure"}, "spec.template.spec.restartPolicy",
         reason=NOT_SUPPORTED),
]

SERVICE_CASES = [
    case("no ports", SERVICE, {"spec.ports": []}, "spec.ports", reason=REQUIRED),
    case("port too high", SERVICE, {"spec.ports[0].port": 70000}, "spec.ports[0].port"),
    case("port zero", SERVICE, {"spec.ports[0].port": 0}, "spec.ports[0].port"),
    case("protocol unknown", SERVICE, {"spec.ports[0].protocol": "HTTP"},
         "spec.ports[0].protocol", reason=NOT_SUPPORTED),
    case("second port unnamed", SERVICE, {"spec.ports[1].name": DELETE}, "spec.ports[1].name",
         reason=REQUIRED),
    case("port name repeated", SERVICE, {"spec.ports[1].name": "http"}, "spec.ports[1].name",
         reason=DUPLICATE),
    case("port name bad", SERVICE, {"spec.ports[1].name": "Metrics"}, "spec.ports[1].name"),
    case("port and protocol repeated", SERVICE, {"spec.ports[1].port": 80}, "spec.ports[1]",
         reason=DUPLICATE),
    case("targetPort too high", SERVICE, {"spec.ports[1].targetPort": 70000},
         "spec.ports[1].targetPort"),
    case("targetPort name bad", SERVICE, {"spec.ports[0].targetPort": "Web_Port"},
         "spec.ports[0].targetPort"),
    case("nodePort on a ClusterIP service", SERVICE, {"spec.ports[0].nodePort": 30080},
         "spec.ports[0].nodePort", reason=FORBIDDEN),
    case("nodePort too high", SERVICE, {"spec.type": "NodePort", "spec.ports[0].nodePort": 70000},
         "spec.ports[0].nodePort"),
    case("type unknown", SERVICE, {"spec.type": "Magic"}, "spec.type", reason=NOT_SUPPORTED),
    case("selector key bad", SERVICE, {"spec.selector": {"bad key": "web"}}, "spec.selector"),
    case("sessionAffinity unknown", SERVICE, {"spec.sessionAffinity": "Sticky"},
         "spec.sessionAffinity", reason=NOT_SUPPORTED),
    case("clusterIP not an address", SERVICE, {"spec.clusterIP": "10.0.0.300"},
         "spec.clusterIP"),
    case("headless LoadBalancer", SERVICE, {"spec.type": "LoadBalancer",
                                            "spec.clusterIP": "None"}, "spec.clusterIP"),
    case("ExternalName without externalName", SERVICE, {"spec.type": "ExternalName"},
         "spec.externalName", reason=REQUIRED),
    case("ExternalName with clusterIP", SERVICE, {
        "spec.type": "ExternalName", "spec.externalName": "db.example.com",
        "spec.clusterIP": "10.96.0.10"}, "spec.clusterIP", reason=FORBIDDEN),
    case("externalIP not an address", SERVICE, {"spec.externalIPs": ["nope"]},
         "spec.externalIPs[0]"),
]

OTHER_CASES = [
    case("ConfigMap key bad", CONFIGMAP, {"data": {"bad key": "x"}}, "data[bad key]"),
    case("ConfigMap key in data and binaryData", CONFIGMAP, {"data.blob": "x"}, "data[blob]"),
    case("ConfigMap too large", CONFIGMAP, {"data.big": "x" * (1024 * 1024 + 1)}, "data",
         reason=TOO_LONG),
    case("Secret key bad", SECRET, {"data": {"a/b": "eA=="}}, "data[a/b]"),
    case("Secret stringData key bad", SECRET, {"stringData": {"..": "x"}}, "stringData[..]"),
    case("Secret too large", SECRET, {"stringData.big": "x" * (1024 * 1024 + 1)}, "data",
         reason=TOO_LONG),
    case("Node taint effect unknown", NODE, {"spec.taints[0].effect": "Evict"},
         "spec.taints[0].effect", reason=NOT_SUPPORTED),
    case("Node taint effect missing", NODE, {"spec.taints[0].effect": DELETE},
         "spec.taints[0].effect", reason=REQUIRED),
    case("Node taint key bad", NODE, {"spec.taints[0].key": "bad key"}, "spec.taints[0].key"),
    case("Node taint repeated", NODE, {"spec.taints[1]": {"key": "dedicated",
                                                          "effect": "NoSchedule"}},
         "spec.taints[1]", reason=DUPLICATE),
    case("Node podCIDR without prefix length", NODE, {"spec.podCIDR": "10.244.1.0"},
         "spec.podCIDR"),
    case("Node podCIDRs entry bad", NODE, {"spec.podCIDRs[1]": "10.244.1.0/33"},
         "spec.podCIDRs[1]"),
    case("Lease duration zero", LEASE, {"spec.leaseDurationSeconds": 0},
         "spec.leaseDurationSeconds"),
    case("Lease transitions negative", LEASE, {"spec.leaseTransitions": -1},
         "spec.leaseTransitions"),
    case("Event reason too long", EVENT, {"reason": "R" * 129}, "reason", reason=TOO_LONG),
    case("Event type unknown", EVENT, {"type": "Error"}, "type", reason=NOT_SUPPORTED),
    case("Endpoints address not an IP", ENDPOINTS, {"subsets[0].addresses[0].ip": "web-0"},
         "subsets[0].addresses[0].ip"),
    case("Endpoints not-ready address missing IP", ENDPOINTS,
         {"subsets[0].notReadyAddresses[0].ip": DELETE}, "subsets[0].notReadyAddresses[0].ip",
         reason=REQUIRED),
    case("Endpoints port zero", ENDPOINTS, {"subsets[0].ports[0].port": 0},
         "subsets[0].ports[0].port"),
    case("Endpoints port name repeated", ENDPOINTS, {"subsets[0].ports[1].name": "http"},
         "subsets[0].ports[1].name", reason=DUPLICATE),
    case("ServiceAccount name bad", SERVICE_ACCOUNT, {"metadata.name": "Builder"},
         "metadata.name"),
]


@pytest.mark.parametrize(
    ("base", "patch", "expected", "reason"),
    METADATA_CASES + CONTAINER_CASES + PROBE_CASES + VOLUME_CASES + POD_SPEC_CASES
    + WORKLOAD_CASES + SERVICE_CASES + OTHER_CASES,
)
def test_broken_variants(base: str, patch: Mapping[str, object], expected: set[str],
                         reason: str) -> None:
    kind, obj = build(base, patch)
    errs = validate(kind, obj)
    assert fields(errs) == expected, errs
    assert {e.reason for e in errs} == {reason}, errs


@pytest.mark.parametrize(("base", "patch"), [
    pytest.param(base, patch, id=param.id)
    for param in CONTAINER_CASES + WORKLOAD_CASES + SERVICE_CASES
    for base, patch, *_ in [param.values]
])
def test_validation_leaves_the_object_untouched(base: str, patch: Mapping[str, object]) -> None:
    kind, obj = build(base, patch)
    before = obj.SerializeToString(deterministic=True)
    validate(kind, obj)
    validate_update(kind, obj, obj)
    assert obj.SerializeToString(deterministic=True) == before


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize(("base", "patch", "field", "message"), [
    pytest.param(POD, {f"{C0}.name": DELETE}, f"{C0}.name", "Required value", id="required"),
    pytest.param(POD, {f"{C0}.ports[0].containerPort": 70000}, f"{C0}.ports[0].containerPort",
                 "Invalid value: 70000: must be between 1 and 65535, inclusive", id="range"),
    pytest.param(POD, {"spec.initContainers[0].name": "web"}, f"{C0}.name",
                 'Duplicate value: "web"', id="duplicate"),
    pytest.param(POD, {"spec.restartPolicy": "Sometimes"}, "spec.restartPolicy",
                 'Unsupported value: "Sometimes": supported values: "Always", "OnFailure", '
                 '"Never"', id="unsupported"),
    pytest.param(DEPLOYMENT, {"spec.selector.matchLabels.app": "web"},
                 "spec.template.metadata.labels",
                 'Invalid value: {"app":"nginx"}: `selector` does not match template `labels`',
                 id="selector mismatch"),
    pytest.param(POD, {f"{C0}.resources.requests.cpu": "1"}, f"{C0}.resources.requests[cpu]",
                 'Invalid value: "1": must be less than or equal to cpu limit of 500m',
                 id="request above limit"),
    pytest.param(POD, {f"{C0}.volumeMounts[0].name": "nope"}, f"{C0}.volumeMounts[0].name",
                 'Not found: "nope"', id="not found"),
])
def test_messages_follow_kubernetes(base: str, patch: Mapping[str, object], field: str,
                                    message: str) -> None:
    kind, obj = build(base, patch)
    assert [(e.field, e.message) for e in validate(kind, obj)] == [(field, message)]


# --------------------------------------------------------------------------- before defaults


@pytest.mark.parametrize(("base", "patch", "expected"), [
    pytest.param(POD, {}, {"spec.restartPolicy", "spec.dnsPolicy",
                           f"{C0}.ports[0].protocol", f"{C0}.ports[1].protocol",
                           f"{C0}.terminationMessagePolicy", f"{C0}.imagePullPolicy",
                           "spec.initContainers[0].terminationMessagePolicy",
                           "spec.initContainers[0].imagePullPolicy",
                           f"{C0}.livenessProbe.httpGet.scheme",
                           f"{C0}.env[1].valueFrom.fieldRef.apiVersion"},
                 id="pod fields defaulting fills"),
    pytest.param(POD, {"spec.volumes[2]": {"name": "cache"}, "spec.restartPolicy": "Always",
                       "spec.dnsPolicy": "ClusterFirst", f"{C0}.livenessProbe": DELETE,
                       f"{C0}.env": DELETE, f"{C0}.ports": DELETE,
                       f"{C0}.terminationMessagePolicy": "File",
                       f"{C0}.imagePullPolicy": "Always",
                       "spec.initContainers[0].terminationMessagePolicy": "File",
                       "spec.initContainers[0].imagePullPolicy": "Always"},
                 {"spec.volumes[2]"}, id="volume without a source"),
])
def test_validate_without_defaults_reports_what_defaults_fill(
        base: str, patch: Mapping[str, object], expected: set[str]) -> None:
    kind, obj = build(base, patch, defaults=False)
    errs = validate(kind, obj)
    assert fields(errs) == expected, errs
    assert {e.reason for e in errs} == {REQUIRED}


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(("base", "patch", "path", "expected"), [
    (POD, {}, "spec.restartPolicy", "Always"),
    (POD, {}, "spec.dnsPolicy", "ClusterFirst"),
    (POD, {}, "spec.terminationGracePeriodSeconds", 30),
    (POD, {}, "spec.schedulerName", "default-scheduler"),
    (POD, {}, "spec.serviceAccountName", "default"),
    (POD, {"spec.serviceAccount": "builder"}, "spec.serviceAccountName", "builder"),
    (POD, {"spec.serviceAccountName": "ci", "spec.serviceAccount": "builder"},
     "spec.serviceAccountName", "ci"),
    (POD, {}, "spec.enableServiceLinks", True),
    (POD, {"spec.enableServiceLinks": False}, "spec.enableServiceLinks", False),
    (POD, {}, "spec.securityContext", {}),
    (POD, {}, f"{C0}.terminationMessagePath", "/dev/termination-log"),
    (POD, {}, f"{C0}.terminationMessagePolicy", "File"),
    (POD, {}, "spec.initContainers[0].terminationMessagePolicy", "File"),
    (POD, {}, f"{C0}.ports[0].protocol", "TCP"),
    (POD, {f"{C0}.ports[0].protocol": "UDP"}, f"{C0}.ports[0].protocol", "UDP"),
    (POD, {}, f"{C0}.livenessProbe.timeoutSeconds", 1),
    (POD, {}, f"{C0}.livenessProbe.periodSeconds", 10),
    (POD, {}, f"{C0}.livenessProbe.successThreshold", 1),
    (POD, {}, f"{C0}.livenessProbe.failureThreshold", 3),
    (POD, {f"{C0}.livenessProbe.periodSeconds": 5}, f"{C0}.livenessProbe.periodSeconds", 5),
    (POD, {}, f"{C0}.livenessProbe.httpGet.scheme", "HTTP"),
    (POD, {}, f"{C0}.livenessProbe.httpGet.path", "/healthz"),
    (POD, {f"{C0}.lifecycle.preStop.httpGet": {"port": 80}},
     f"{C0}.lifecycle.preStop.httpGet.scheme", "HTTP"),
    (POD, {}, f"{C0}.env[1].valueFrom.fieldRef.apiVersion", "v1"),
    (POD, {}, "spec.volumes[0].emptyDir", {}),
    (POD, {}, "spec.volumes[1].configMap.defaultMode", 420),
    (POD, {"spec.volumes[2]": {"name": "cache", "secret": {"secretName": "s"}}},
     "spec.volumes[2].secret.defaultMode", 420),
    (POD, {"spec.volumes[2]": {"name": "cache", "hostPath": {"path": "/x"}}},
     "spec.volumes[2].hostPath.type", ""),
    (POD, {"spec.volumes[2]": {"name": "cache"}}, "spec.volumes[2].emptyDir", {}),
    (POD, {"spec.hostNetwork": True}, f"{C0}.ports[0].hostPort", 80),
    (POD, {f"{C0}.resources.requests": DELETE}, f"{C0}.resources.requests",
     {"cpu": "500m", "memory": "128Mi"}),
    (POD, {}, "status.phase", "Pending"),
    (POD, {"status.phase": "Running"}, "status.phase", "Running"),
    (POD, {}, "status.qosClass", "Burstable"),
    (DEPLOYMENT, {}, f"{T0}.imagePullPolicy", "IfNotPresent"),
    (DEPLOYMENT, {}, "spec.template.spec.restartPolicy", "Always"),
    (DEPLOYMENT, {}, "spec.template.spec.serviceAccountName", "default"),
    (DEPLOYMENT, {}, f"{T0}.ports[0].protocol", "TCP"),
    (DEPLOYMENT, {}, "spec.replicas", 3),
    (DEPLOYMENT, {"spec.replicas": DELETE}, "spec.replicas", 1),
    (DEPLOYMENT, {"spec.replicas": 0}, "spec.replicas", 0),
    (DEPLOYMENT, {}, "spec.strategy", {"type": "RollingUpdate", "rollingUpdate": {
        "maxUnavailable": "25%", "maxSurge": "25%"}}),
    (DEPLOYMENT, {"spec.strategy.rollingUpdate.maxSurge": 2}, "spec.strategy.rollingUpdate",
     {"maxUnavailable": "25%", "maxSurge": 2}),
    (DEPLOYMENT, {"spec.strategy.type": "Recreate"}, "spec.strategy", {"type": "Recreate"}),
    (DEPLOYMENT, {}, "spec.revisionHistoryLimit", 10),
    (DEPLOYMENT, {}, "spec.progressDeadlineSeconds", 600),
    (REPLICASET, {}, "spec.replicas", 1),
    (STATEFULSET, {}, "spec.replicas", 1),
    (STATEFULSET, {}, "spec.podManagementPolicy", "OrderedReady"),
    (STATEFULSET, {}, "spec.updateStrategy", {"type": "RollingUpdate",
                                              "rollingUpdate": {"partition": 0}}),
    (STATEFULSET, {}, "spec.revisionHistoryLimit", 10),
    (STATEFULSET, {}, "spec.persistentVolumeClaimRetentionPolicy",
     {"whenDeleted": "Retain", "whenScaled": "Retain"}),
    (DAEMONSET, {}, "spec.updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {
        "maxUnavailable": 1, "maxSurge": 0}}),
    (DAEMONSET, {}, "spec.revisionHistoryLimit", 10),
    (SERVICE, {}, "spec.type", "ClusterIP"),
    (SERVICE, {}, "spec.sessionAffinity", "None"),
    (SERVICE, {}, "spec.ports[1].protocol", "TCP"),
    (SERVICE, {}, "spec.ports[1].targetPort", 9090),
    (SERVICE, {}, "spec.ports[0].targetPort", "http"),
    (SERVICE, {}, "spec.internalTrafficPolicy", "Cluster"),
    (SERVICE, {}, "spec.ipFamilyPolicy", "SingleStack"),
    (SERVICE, {"spec.type": "NodePort"}, "spec.externalTrafficPolicy", "Cluster"),
    (SECRET, {}, "type", "Opaque"),
    (SECRET, {"type": "kubernetes.io/tls"}, "type", "kubernetes.io/tls"),
    (NAMESPACE, {}, "status.phase", "Active"),
    (ENDPOINTS, {}, "subsets[0].ports[0].protocol", "TCP"),
])
def test_defaults(base: str, patch: Mapping[str, object], path: str, expected: object) -> None:
    _, obj = build(base, patch)
    assert _get(encode(obj, KINDS), path) == expected


@pytest.mark.parametrize(("patch", "field"), [
    ({"spec.type": "ExternalName", "spec.externalName": "db.example.com"}, "ip_family_policy"),
    ({"spec.type": "ExternalName", "spec.externalName": "db.example.com"},
     "internal_traffic_policy"),
    ({"spec.clusterIP": "None"}, "ip_family_policy"),
])
def test_service_defaults_skipped_for_external_and_headless(patch: Mapping[str, object],
                                                            field: str) -> None:
    _, obj = build(SERVICE, patch)
    assert not obj.spec.HasField(field)


@pytest.mark.parametrize("base", ALL_BASES, ids=lambda b: yaml.safe_load(b)["kind"])
def test_defaults_are_idempotent(base: str) -> None:
    kind, obj = build(base)
    once = obj.SerializeToString(deterministic=True)
    apply_defaults(kind, obj)
    assert obj.SerializeToString(deterministic=True) == once


@pytest.mark.parametrize(("image", "policy"), [
    ("nginx", "Always"),
    ("nginx:latest", "Always"),
    ("nginx:1.25", "IfNotPresent"),
    ("registry.local:5000/team/nginx", "Always"),
    ("registry.local:5000/team/nginx:1.25", "IfNotPresent"),
    ("nginx@sha256:" + "a" * 64, "IfNotPresent"),
    ("nginx:latest@sha256:" + "a" * 64, "IfNotPresent"),
])
def test_image_pull_policy_default(image: str, policy: str) -> None:
    _, obj = build(POD, {f"{C0}.image": image})
    assert obj.spec.containers[0].image_pull_policy == policy


def _resources(requests: dict[str, str] | None, limits: dict[str, str] | None) -> Any:
    out: dict[str, Any] = {}
    if requests is not None:
        out["requests"] = requests
    if limits is not None:
        out["limits"] = limits
    return out


@pytest.mark.parametrize(("resources", "init_resources", "qos"), [
    pytest.param(_resources(None, None), None, "BestEffort", id="nothing"),
    pytest.param(_resources({"cpu": "0"}, None), None, "BestEffort", id="zero request"),
    pytest.param(_resources({"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"}),
                 None, "Guaranteed", id="requests equal limits"),
    pytest.param(_resources(None, {"cpu": "1", "memory": "1Gi"}), None, "Guaranteed",
                 id="limits only"),
    pytest.param(_resources({"cpu": "500m"}, {"cpu": "1", "memory": "1Gi"}), None,
                 "Burstable", id="request below limit"),
    pytest.param(_resources(None, {"cpu": "1"}), None, "Burstable", id="cpu limit only"),
    pytest.param(_resources({"memory": "1Gi"}, None), None, "Burstable", id="request only"),
    pytest.param(_resources(None, {"cpu": "1", "memory": "1Gi"}),
                 _resources({"cpu": "100m"}, None), "Burstable", id="init container unlimited"),
    pytest.param(_resources(None, {"cpu": "1", "memory": "1Gi"}),
                 _resources(None, {"cpu": "2", "memory": "2Gi"}), "Guaranteed",
                 id="init container guaranteed"),
    pytest.param(_resources({"example.com/gpu": "1"}, {"example.com/gpu": "1"}), None,
                 "BestEffort", id="only extended resources"),
])
def test_qos_class(resources: Any, init_resources: Any, qos: str) -> None:
    patch: dict[str, object] = {f"{C0}.resources": resources}
    if init_resources is None:
        patch["spec.initContainers"] = DELETE
    else:
        patch["spec.initContainers[0].resources"] = init_resources
    _, obj = build(POD, patch)
    assert obj.status.qos_class == qos


def test_pod_templates_get_no_status_or_request_defaults() -> None:
    _, obj = build(DEPLOYMENT, {f"{T0}.resources": {"limits": {"cpu": "1"}}})
    assert dict(obj.spec.template.spec.containers[0].resources.requests) == {}


# --------------------------------------------------------------------------- updates


@pytest.mark.parametrize(("base", "old_patch", "new_patch", "expected"), [
    pytest.param(POD, {}, {f"{C0}.image": "nginx:1.26"}, set(), id="pod image change"),
    pytest.param(POD, {}, {"spec.initContainers[0].image": "busybox:1.37"}, set(),
                 id="pod init image change"),
    pytest.param(POD, {}, {"spec.nodeName": "node-1"}, set(), id="pod binding"),
    pytest.param(POD, {"spec.nodeName": "node-1"}, {"spec.nodeName": "node-2"}, {"spec"},
                 id="pod moved to another node"),
    pytest.param(POD, {"spec.nodeName": "node-1"}, {}, {"spec"},
                 id="pod unbound"),
    pytest.param(POD, {}, {f"{C0}.command": ["sleep", "1"]}, {"spec"}, id="pod command change"),
    pytest.param(POD, {}, {"spec.containers[1]": {"name": "extra", "image": "x:1"}}, {"spec"},
                 id="pod container added"),
    pytest.param(POD, {}, {"spec.activeDeadlineSeconds": 30}, set(),
                 id="pod activeDeadlineSeconds set"),
    pytest.param(POD, {"spec.activeDeadlineSeconds": 30}, {"spec.activeDeadlineSeconds": 20},
                 set(), id="pod activeDeadlineSeconds decreased"),
    pytest.param(POD, {"spec.activeDeadlineSeconds": 30}, {"spec.activeDeadlineSeconds": 40},
                 {"spec.activeDeadlineSeconds"}, id="pod activeDeadlineSeconds increased"),
    pytest.param(POD, {"spec.activeDeadlineSeconds": 30}, {}, {"spec.activeDeadlineSeconds"},
                 id="pod activeDeadlineSeconds removed"),
    pytest.param(POD, {"spec.tolerations": [{"key": "a", "operator": "Exists"}]},
                 {"spec.tolerations": [{"key": "a", "operator": "Exists"},
                                       {"key": "b", "operator": "Exists"}]},
                 set(), id="pod toleration added"),
    pytest.param(POD, {"spec.tolerations": [{"key": "a", "operator": "Exists"}]}, {},
                 {"spec.tolerations"}, id="pod toleration removed"),
    pytest.param(POD, {}, {"metadata.labels.tier": "front"}, set(), id="pod labels change"),
    pytest.param(POD, {}, {"metadata.name": "web-2"}, {"metadata.name"}, id="rename"),
    pytest.param(POD, {"metadata.uid": "u1"}, {"metadata.uid": "u2"}, {"metadata.uid"},
                 id="uid change"),
    pytest.param(POD, {"status.phase": "Pending"}, {"status.phase": "Running"}, set(),
                 id="pod status change"),
    pytest.param(DEPLOYMENT, {}, {"spec.replicas": 5, f"{T0}.image": "nginx:1.16"}, set(),
                 id="deployment scale and roll"),
    pytest.param(DEPLOYMENT, {}, {"spec.selector.matchLabels.tier": "web",
                                  "spec.template.metadata.labels.tier": "web"},
                 {"spec.selector"}, id="deployment selector change"),
    pytest.param(REPLICASET, {}, {"spec.selector.matchLabels": {"app": "web", "v": "2"},
                                  "spec.template.metadata.labels.v": "2"},
                 {"spec.selector"}, id="replicaset selector change"),
    pytest.param(DAEMONSET, {}, {"spec.selector.matchExpressions": [
        {"key": "app", "operator": "Exists"}]}, {"spec.selector"}, id="daemonset selector change"),
    pytest.param(STATEFULSET, {}, {"spec.replicas": 3, f"{T0}.image": "postgres:17"}, set(),
                 id="statefulset scale and roll"),
    pytest.param(STATEFULSET, {}, {"spec.serviceName": "db-headless"}, {"spec"},
                 id="statefulset serviceName change"),
    pytest.param(STATEFULSET, {}, {"spec.selector.matchLabels.tier": "db",
                                   "spec.template.metadata.labels.tier": "db"},
                 {"spec.selector"}, id="statefulset selector change"),
    pytest.param(SERVICE, {}, {"spec.clusterIP": "10.96.0.10"}, set(), id="service IP assigned"),
    pytest.param(SERVICE, {"spec.clusterIP": "10.96.0.10"}, {"spec.clusterIP": "10.96.0.11"},
                 {"spec.clusterIP"}, id="service IP changed"),
    pytest.param(SERVICE, {"spec.clusterIP": "10.96.0.10"},
                 {"spec.clusterIP": "10.96.0.10", "spec.ports[0].port": 8080}, set(),
                 id="service port change"),
    pytest.param(CONFIGMAP, {}, {"data.mode": "dev"}, set(), id="mutable configmap change"),
    pytest.param(CONFIGMAP, {"immutable": True}, {"immutable": True, "data.mode": "dev"},
                 {"data"}, id="immutable configmap data change"),
    pytest.param(CONFIGMAP, {"immutable": True}, {"immutable": True, "binaryData": {}},
                 {"binaryData"}, id="immutable configmap binaryData change"),
    pytest.param(CONFIGMAP, {"immutable": True}, {}, {"immutable"},
                 id="immutable configmap made mutable"),
    pytest.param(CONFIGMAP, {"immutable": True}, {"immutable": True,
                                                  "metadata.labels.a": "b"}, set(),
                 id="immutable configmap labels change"),
    pytest.param(SECRET, {"immutable": True}, {"immutable": True, "data.password": "eA=="},
                 {"data"}, id="immutable secret data change"),
    pytest.param(SECRET, {}, {"type": "kubernetes.io/tls"}, {"type"}, id="secret type change"),
])
def test_validate_update(base: str, old_patch: Mapping[str, object],
                         new_patch: Mapping[str, object], expected: set[str]) -> None:
    kind, old = build(base, old_patch)
    _, new = build(base, new_patch)
    errs = validate_update(kind, new, old)
    assert fields(errs) == expected, errs


def test_pod_update_forbidden_message() -> None:
    kind, old = build(POD)
    _, new = build(POD, {f"{C0}.command": ["sleep", "1"]})
    [err] = validate_update(kind, new, old)
    assert err.reason == FORBIDDEN
    assert err.message == (
        "Forbidden: pod updates may not change fields other than "
        "spec.containers[*].image, spec.initContainers[*].image, spec.activeDeadlineSeconds, "
        "spec.tolerations (only additions to existing tolerations) or spec.nodeName (only "
        "binding)"
    )


def test_selector_update_message() -> None:
    kind, old = build(DEPLOYMENT)
    _, new = build(DEPLOYMENT, {"spec.selector.matchLabels.tier": "web",
                                "spec.template.metadata.labels.tier": "web"})
    [err] = validate_update(kind, new, old)
    assert err.message.endswith("field is immutable")


def test_validate_update_includes_validate() -> None:
    kind, old = build(POD)
    _, new = build(POD, {f"{C0}.image": "nginx:1.26 "})
    assert fields(validate_update(kind, new, old)) == {f"{C0}.image"}


# --------------------------------------------------------------------------- scaled_value


@pytest.mark.parametrize(("value", "total", "round_up", "expected"), [
    (meta_pb2.IntOrString(int_val=3), 10, True, 3),
    (meta_pb2.IntOrString(int_val=3), 10, False, 3),
    (meta_pb2.IntOrString(str_val="25%"), 10, True, 3),
    (meta_pb2.IntOrString(str_val="25%"), 10, False, 2),
    (meta_pb2.IntOrString(str_val="25%"), 4, False, 1),
    (meta_pb2.IntOrString(str_val="0%"), 10, True, 0),
    (meta_pb2.IntOrString(str_val="100%"), 7, False, 7),
    (meta_pb2.IntOrString(str_val="150%"), 2, True, 3),
    (meta_pb2.IntOrString(str_val="33%"), 1, True, 1),
    (meta_pb2.IntOrString(str_val="33%"), 1, False, 0),
    (meta_pb2.IntOrString(), 10, True, 0),
])
def test_scaled_value(value: meta_pb2.IntOrString, total: int, round_up: bool,
                      expected: int) -> None:
    assert scaled_value(value, total, round_up=round_up) == expected


@pytest.mark.parametrize("text", ["25", "abc%", "%", "2.5%", "25 %", ""])
def test_scaled_value_rejects_bad_percentages(text: str) -> None:
    with pytest.raises(ValueError, match="IntOrString"):
        scaled_value(meta_pb2.IntOrString(str_val=text), 10, round_up=True)
