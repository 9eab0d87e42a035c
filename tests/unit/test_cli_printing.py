"""The CLI's pure output: ages, pod status, tables, describe pages, errors and exit codes.

Objects are built from manifest dicts with ``shoal.manifests.decode``, so each
case reads like the YAML a user (or the nodeagent) would write.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from shoal import errors, manifests
from shoal.cli import describing, printing
from shoal.cli.main import main, normalize_argv, parse_duration
from shoal.cli.printing import TableOptions, format_age, pod_summary, render_table, table_for
from shoal.cli.reporting import (
    ConfigError,
    ExitCode,
    InputError,
    UsageError,
    error_lines,
    exit_code_for,
)
from shoal.cli.targets import Target, parse_targets
from shoal.kinds import builtin_kinds

KINDS = builtin_kinds()
NOW = 1_700_000_000.0


def ago(seconds: float) -> str:
    """RFC 3339 text for NOW - seconds."""
    when = dt.datetime.fromtimestamp(NOW - seconds, tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def make(doc: dict[str, Any]) -> Any:
    _, msg = manifests.decode(doc, KINDS)
    return msg


def pod(*, status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
        name: str = "web-0", deleting: bool = False) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "creationTimestamp": ago(300)}
    if deleting:
        meta["deletionTimestamp"] = ago(1)
    return make({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                 "spec": spec or {"containers": [{"name": "app", "image": "nginx"}]},
                 "status": status or {}})


def running(name: str = "app", *, ready: bool = True, restarts: int = 0) -> dict[str, Any]:
    return {"name": name, "ready": ready, "restartCount": restarts,
            "state": {"running": {"startedAt": ago(60)}}}


def waiting(reason: str, name: str = "app", *, restarts: int = 0,
            last_finished: float | None = None) -> dict[str, Any]:
    cs: dict[str, Any] = {"name": name, "restartCount": restarts,
                          "state": {"waiting": {"reason": reason}}}
    if last_finished is not None:
        cs["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error",
                                          "finishedAt": ago(last_finished)}}
    return cs


def terminated(name: str = "app", *, reason: str = "", exit_code: int = 0,
               signal: int = 0) -> dict[str, Any]:
    t: dict[str, Any] = {"exitCode": exit_code}
    if reason:
        t["reason"] = reason
    if signal:
        t["signal"] = signal
    return {"name": name, "state": {"terminated": t}}


# --------------------------------------------------------------------------- ages


@pytest.mark.parametrize(("seconds", "expected"), [
    (-5, "<invalid>"),
    (-1, "0s"),
    (0, "0s"),
    (5, "5s"),
    (119, "119s"),
    (120, "2m"),
    (192, "3m12s"),
    (599, "9m59s"),
    (600, "10m"),
    (3 * 3600 - 1, "179m"),
    (3 * 3600, "3h"),
    (4 * 3600 + 30 * 60, "4h30m"),
    (8 * 3600 + 59 * 60, "8h"),
    (47 * 3600, "47h"),
    (48 * 3600, "2d"),
    (3 * 86400 + 4 * 3600, "3d4h"),
    (8 * 86400, "8d"),
    (400 * 86400, "400d"),
    (2 * 365 * 86400, "2y"),
    (2 * 365 * 86400 + 10 * 86400, "2y10d"),
    (9 * 365 * 86400, "9y"),
])
def test_format_age_matches_kubectl(seconds: float, expected: str) -> None:
    assert format_age(seconds) == expected


def test_age_of_unset_timestamp_is_unknown() -> None:
    assert printing.age(make({"apiVersion": "v1", "kind": "Pod"}).metadata.creation_timestamp,
                        NOW) == "<unknown>"


# --------------------------------------------------------------------------- pod status


SIDECAR_SPEC = {"initContainers": [{"name": "proxy", "image": "p", "restartPolicy": "Always"}],
                "containers": [{"name": "app", "image": "nginx"}]}
INIT_SPEC = {"initContainers": [{"name": "setup", "image": "s"}],
             "containers": [{"name": "app", "image": "nginx"}]}
TWO_SPEC = {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}


@pytest.mark.parametrize(("case", "p", "ready", "status", "restarts"), [
    ("pending, nothing reported", pod(status={"phase": "Pending"}), "0/1", "Pending", "0"),
    ("running and ready",
     pod(status={"phase": "Running", "containerStatuses": [running()]}),
     "1/1", "Running", "0"),
    ("running, not ready",
     pod(status={"phase": "Running", "containerStatuses": [running(ready=False)]}),
     "0/1", "Running", "0"),
    ("crash loop shows the waiting reason and when it last restarted",
     pod(status={"phase": "Running", "containerStatuses": [
         waiting("CrashLoopBackOff", restarts=5, last_finished=30)]}),
     "0/1", "CrashLoopBackOff", "5 (30s ago)"),
    ("image pull back-off",
     pod(status={"phase": "Pending", "containerStatuses": [waiting("ImagePullBackOff")]}),
     "0/1", "ImagePullBackOff", "0"),
    ("container creating",
     pod(status={"phase": "Pending", "containerStatuses": [waiting("ContainerCreating")]}),
     "0/1", "ContainerCreating", "0"),
    ("completed",
     pod(status={"phase": "Succeeded", "containerStatuses": [terminated(reason="Completed")]}),
     "0/1", "Completed", "0"),
    ("terminated without a reason: exit code",
     pod(status={"phase": "Failed", "containerStatuses": [terminated(exit_code=2)]}),
     "0/1", "ExitCode:2", "0"),
    ("terminated by a signal",
     pod(status={"phase": "Failed", "containerStatuses": [terminated(exit_code=137, signal=9)]}),
     "0/1", "Signal:9", "0"),
    ("OOMKilled",
     pod(status={"phase": "Running", "containerStatuses": [
         terminated(reason="OOMKilled", exit_code=137)]}),
     "0/1", "OOMKilled", "0"),
    ("status.reason wins over phase",
     pod(status={"phase": "Failed", "reason": "Evicted"}), "0/1", "Evicted", "0"),
    ("deletion requested: Terminating",
     pod(status={"phase": "Running", "containerStatuses": [running()]}, deleting=True),
     "1/1", "Terminating", "0"),
    ("deletion of a finished pod keeps its reason",
     pod(status={"phase": "Succeeded", "containerStatuses": [terminated(reason="Completed")]},
         deleting=True),
     "0/1", "Completed", "0"),
    ("node lost while deleting: Unknown",
     pod(status={"phase": "Running", "reason": "NodeLost"}, deleting=True),
     "0/1", "Unknown", "0"),
    ("init container not started yet",
     pod(spec=INIT_SPEC, status={"phase": "Pending", "initContainerStatuses": [
         {"name": "setup", "state": {"waiting": {"reason": "PodInitializing"}}}]}),
     "0/1", "Init:0/1", "0"),
    ("init container failing to pull",
     pod(spec=INIT_SPEC, status={"phase": "Pending", "initContainerStatuses": [
         waiting("ErrImagePull", name="setup")]}),
     "0/1", "Init:ErrImagePull", "0"),
    ("init container failed with a reason",
     pod(spec=INIT_SPEC, status={"phase": "Pending", "initContainerStatuses": [
         terminated("setup", reason="Error", exit_code=1)]}),
     "0/1", "Init:Error", "0"),
    ("init container failed without a reason",
     pod(spec=INIT_SPEC, status={"phase": "Pending", "initContainerStatuses": [
         terminated("setup", exit_code=3)]}),
     "0/1", "Init:ExitCode:3", "0"),
    ("init done, app running",
     pod(spec=INIT_SPEC, status={"phase": "Running",
                                 "initContainerStatuses": [terminated("setup")],
                                 "containerStatuses": [running()]}),
     "1/1", "Running", "0"),
    ("a sidecar counts toward READY",
     pod(spec=SIDECAR_SPEC, status={"phase": "Running", "initContainerStatuses": [
         {**running("proxy"), "started": True}], "containerStatuses": [running()]}),
     "2/2", "Running", "0"),
    ("scheduling gated",
     pod(status={"phase": "Pending", "conditions": [
         {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}),
     "0/1", "SchedulingGated", "0"),
    ("one container done, one running, pod ready: Running",
     pod(spec=TWO_SPEC, status={"phase": "Running",
                                "conditions": [{"type": "Ready", "status": "True"}],
                                "containerStatuses": [running("a"),
                                                      terminated("b", reason="Completed")]}),
     "1/2", "Running", "0"),
    ("one container done, one running, pod not ready: NotReady",
     pod(spec=TWO_SPEC, status={"phase": "Running",
                                "containerStatuses": [running("a"),
                                                      terminated("b", reason="Completed")]}),
     "1/2", "NotReady", "0"),
    ("restarts are summed over containers",
     pod(spec=TWO_SPEC, status={"phase": "Running", "containerStatuses": [
         running("a", restarts=2), running("b", restarts=3)]}),
     "2/2", "Running", "5"),
])
def test_pod_summary_matches_kubectl(case: str, p: Any, ready: str, status: str,
                                     restarts: str) -> None:
    s = pod_summary(p, NOW)
    assert (s.ready, s.status, s.restarts) == (ready, status, restarts), case


# --------------------------------------------------------------------------- cells


def node(*, ready: str | None = "True", unschedulable: bool = False,
         labels: dict[str, str] | None = None) -> Any:
    status: dict[str, Any] = {
        "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}],
        "nodeInfo": {"kubeletVersion": "v0.1.0", "osImage": "Debian GNU/Linux 12",
                     "kernelVersion": "6.1.0", "containerRuntimeVersion": "containerd://1.7"}}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    return make({"apiVersion": "v1", "kind": "Node",
                 "metadata": {"name": "n1", "labels": labels or {},
                              "creationTimestamp": ago(86400 * 3)},
                 "spec": {"unschedulable": unschedulable}, "status": status})


@pytest.mark.parametrize(("n", "expected"), [
    (node(), "Ready"),
    (node(ready="False"), "NotReady"),
    (node(ready="Unknown"), "NotReady"),
    (node(ready=None), "Unknown"),
    (node(unschedulable=True), "Ready,SchedulingDisabled"),
])
def test_node_status(n: Any, expected: str) -> None:
    assert printing.node_status(n) == expected


@pytest.mark.parametrize(("labels", "expected"), [
    ({}, "<none>"),
    ({"node-role.kubernetes.io/control-plane": ""}, "control-plane"),
    ({"node-role.kubernetes.io/worker": "", "node-role.kubernetes.io/edge": ""},
     "edge,worker"),
    ({"kubernetes.io/role": "master"}, "master"),
])
def test_node_roles(labels: dict[str, str], expected: str) -> None:
    assert printing.node_roles(labels) == expected


def service(spec: dict[str, Any], status: dict[str, Any] | None = None) -> Any:
    return make({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "web", "namespace": "default",
                              "creationTimestamp": ago(60)},
                 "spec": spec, "status": status or {}})


@pytest.mark.parametrize(("svc", "external", "ports"), [
    (service({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}), "<none>", "80/TCP"),
    (service({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080},
                                            {"port": 53, "protocol": "UDP"}]}),
     "<none>", "80:30080/TCP,53/UDP"),
    (service({"externalIPs": ["1.2.3.4"], "ports": []}), "1.2.3.4", "<none>"),
    (service({"type": "LoadBalancer", "ports": [{"port": 443}]}), "<pending>", "443/TCP"),
    (service({"type": "LoadBalancer", "ports": [{"port": 443}]},
             {"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}]}}), "5.6.7.8", "443/TCP"),
    (service({"type": "ExternalName", "externalName": "db.example.com"}),
     "db.example.com", "<none>"),
])
def test_service_cells(svc: Any, external: str, ports: str) -> None:
    assert printing.service_external_ip(svc) == external
    assert printing.service_ports(svc) == ports


def endpoints(subsets: list[dict[str, Any]]) -> Any:
    return make({"apiVersion": "v1", "kind": "Endpoints",
                 "metadata": {"name": "web", "namespace": "default"}, "subsets": subsets})


def addrs(*ips: str) -> list[dict[str, str]]:
    return [{"ip": ip} for ip in ips]


@pytest.mark.parametrize(("ep", "expected"), [
    (endpoints([]), "<none>"),
    (endpoints([{"addresses": addrs("10.1.0.1"), "ports": [{"port": 8080}]}]),
     "10.1.0.1:8080"),
    (endpoints([{"addresses": addrs("10.1.0.1", "10.1.0.2"),
                 "ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "b"}]}]),
     "10.1.0.1:80,10.1.0.2:80,10.1.0.1:81 + 1 more..."),
    (endpoints([{"addresses": addrs("10.1.0.1")}]), "10.1.0.1"),
    (endpoints([{"addresses": addrs("fd00::1"), "ports": [{"port": 80}]}]), "[fd00::1]:80"),
    (endpoints([{"notReadyAddresses": addrs("10.1.0.1"), "ports": [{"port": 80}]}]),
     "<none>"),
])
def test_endpoints_summary(ep: Any, expected: str) -> None:
    assert printing.endpoints_summary(ep) == expected


# --------------------------------------------------------------------------- tables


def kind(name: str) -> Any:
    return KINDS.by_name(name)


@pytest.mark.parametrize(("kind_name", "wide", "headers"), [
    ("pods", False, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]),
    ("pods", True, ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                    "NOMINATED NODE", "READINESS GATES"]),
    ("nodes", False, ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]),
    ("nodes", True, ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP",
                     "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]),
    ("services", False, ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]),
    ("services", True, ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE",
                        "SELECTOR"]),
    ("deployments", False, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]),
    ("deployments", True, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS",
                           "IMAGES", "SELECTOR"]),
    ("replicasets", False, ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]),
    ("statefulsets", False, ["NAME", "READY", "AGE"]),
    ("daemonsets", False, ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE",
                           "NODE SELECTOR", "AGE"]),
    ("namespaces", False, ["NAME", "STATUS", "AGE"]),
    ("configmaps", False, ["NAME", "DATA", "AGE"]),
    ("secrets", False, ["NAME", "TYPE", "DATA", "AGE"]),
    ("serviceaccounts", False, ["NAME", "SECRETS", "AGE"]),
    ("endpoints", False, ["NAME", "ENDPOINTS", "AGE"]),
    ("events", False, ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]),
    ("leases", False, ["NAME", "HOLDER", "AGE"]),
    ("controllerrevisions", False, ["NAME", "CONTROLLER", "REVISION", "AGE"]),
])
def test_table_headers_are_kubectls(kind_name: str, wide: bool, headers: list[str]) -> None:
    table = table_for(kind(kind_name), [], now=NOW, options=TableOptions(wide=wide))
    assert list(table.headers) == headers


def test_all_namespaces_adds_a_namespace_column_for_namespaced_kinds_only() -> None:
    opts = TableOptions(namespace_column=True)
    assert table_for(kind("pods"), [], now=NOW, options=opts).headers[0] == "NAMESPACE"
    assert table_for(kind("nodes"), [], now=NOW, options=opts).headers[0] == "NAME"
    row = table_for(kind("pods"), [pod()], now=NOW, options=opts).rows[0]
    assert row[:2] == ("default", "web-0")


def test_render_table_layout_is_kubectls() -> None:
    p = pod(status={"phase": "Running", "containerStatuses": [running()]})
    text = render_table(table_for(kind("pods"), [p], now=NOW))
    assert text == ("NAME    READY   STATUS    RESTARTS   AGE\n"
                    "web-0   1/1     Running   0          5m\n")
    # Without headers the widths come from the rows alone, as with kubectl --no-headers.
    assert render_table(table_for(kind("pods"), [p], now=NOW), headers=False) == (
        "web-0   1/1   Running   0     5m\n")


def test_pod_wide_row() -> None:
    p = pod(spec={"nodeName": "n1", "containers": [{"name": "app", "image": "nginx"}]},
            status={"phase": "Running", "podIP": "10.1.0.7", "podIPs": [{"ip": "10.1.0.7"}]})
    row = table_for(kind("pods"), [p], now=NOW, options=TableOptions(wide=True)).rows[0]
    assert row[5:] == ("10.1.0.7", "n1", "<none>", "<none>")


def test_node_rows() -> None:
    n = node(labels={"node-role.kubernetes.io/control-plane": ""})
    row = table_for(kind("nodes"), [n], now=NOW, options=TableOptions(wide=True)).rows[0]
    assert row == ("n1", "Ready", "control-plane", "3d", "v0.1.0", "10.0.0.5", "<none>",
                   "Debian GNU/Linux 12", "6.1.0", "containerd://1.7")


def test_workload_rows() -> None:
    meta = {"name": "web", "namespace": "default", "creationTimestamp": ago(10)}
    template: dict[str, Any] = {"metadata": {"labels": {"app": "web"}},
                                "spec": {"containers": [{"name": "web", "image": "nginx:1"}]}}
    d = make({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
              "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                       "template": template},
              "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}})
    assert table_for(kind("deploy"), [d], now=NOW,
                     options=TableOptions(wide=True)).rows[0] == (
        "web", "2/3", "3", "2", "10s", "web", "nginx:1", "app=web")
    rs = make({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta,
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template},
               "status": {"replicas": 1, "readyReplicas": 1}})
    assert table_for(kind("rs"), [rs], now=NOW).rows[0] == ("web", "1", "1", "1", "10s")
    ds = make({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta,
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {**template, "spec": {
                            **template["spec"], "nodeSelector": {"os": "linux"}}}},
               "status": {"desiredNumberScheduled": 2, "currentNumberScheduled": 2,
                          "numberReady": 1, "updatedNumberScheduled": 2,
                          "numberAvailable": 1}})
    assert table_for(kind("ds"), [ds], now=NOW).rows[0] == (
        "web", "2", "2", "1", "2", "1", "os=linux", "10s")
    sts = make({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                         "template": template}, "status": {"readyReplicas": 2}})
    assert table_for(kind("sts"), [sts], now=NOW).rows[0] == ("web", "2/2", "10s")


def test_config_rows() -> None:
    meta = {"name": "x", "namespace": "default", "creationTimestamp": ago(7200)}
    cm = make({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
               "data": {"a": "1", "b": "2"}, "binaryData": {"c": "AA=="}})
    assert table_for(kind("cm"), [cm], now=NOW).rows[0] == ("x", "3", "120m")
    secret = make({"apiVersion": "v1", "kind": "Secret", "metadata": meta,
                   "data": {"a": "AA=="}})
    assert table_for(kind("secrets"), [secret], now=NOW).rows[0] == ("x", "Opaque", "1", "120m")
    sa = make({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
               "secrets": [{"name": "tok"}]})
    assert table_for(kind("sa"), [sa], now=NOW).rows[0] == ("x", "1", "120m")
    lease = make({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                  "spec": {"holderIdentity": "apiserver-1"}})
    assert table_for(kind("leases"), [lease], now=NOW).rows[0] == ("x", "apiserver-1", "120m")
    ns = make({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"},
               "status": {"phase": "Terminating"}})
    assert table_for(kind("ns"), [ns], now=NOW).rows[0] == ("x", "Terminating", "<unknown>")


def event(name: str, *, last: float, count: int = 1, first: float | None = None,
          reason: str = "Pulled") -> Any:
    return make({"apiVersion": "v1", "kind": "Event",
                 "metadata": {"name": name, "namespace": "default"},
                 "involvedObject": {"kind": "Pod", "name": "web-0", "namespace": "default"},
                 "reason": reason, "message": f"{name} happened", "type": "Normal",
                 "count": count, "lastTimestamp": ago(last),
                 "firstTimestamp": ago(first if first is not None else last),
                 "source": {"component": "nodeagent", "host": "n1"}})


def test_events_are_sorted_by_time_and_show_repeats() -> None:
    evs = [event("new", last=5), event("old", last=600, count=3, first=900)]
    table = table_for(kind("events"), evs, now=NOW)
    assert table.rows == (
        ("10m (x3 over 15m)", "Normal", "Pulled", "pod/web-0", "old happened"),
        ("5s", "Normal", "Pulled", "pod/web-0", "new happened"),
    )


def test_several_kinds_qualify_names() -> None:
    opts = TableOptions(qualify_names=True)
    assert table_for(kind("deploy"), [make({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}})],
        now=NOW, options=opts).rows[0][0] == "deployment.apps/web"
    assert table_for(kind("pods"), [pod()], now=NOW, options=opts).rows[0][0] == "pod/web-0"


@pytest.mark.parametrize(("kind_name", "name", "expected"), [
    ("po", "web-0", "pod/web-0"),
    ("deploy", "web", "deployment.apps/web"),
    ("leases", "x", "lease.coordination.k8s.io/x"),
    ("ns", "hello", "namespace/hello"),
])
def test_resource_name(kind_name: str, name: str, expected: str) -> None:
    assert printing.resource_name(kind(kind_name), name) == expected


# --------------------------------------------------------------------------- describe


def test_describe_pod_page() -> None:
    p = pod(spec={"nodeName": "n1", "containers": [
                {"name": "app", "image": "nginx", "ports": [{"containerPort": 80}]}]},
            status={"phase": "Running", "podIP": "10.1.0.7", "hostIP": "10.0.0.5",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [waiting("CrashLoopBackOff", restarts=2,
                                                  last_finished=30)]})
    page = describing.describe(kind("pods"), p, kinds=KINDS, events=[], now=NOW)
    lines = page.splitlines()
    assert lines[0].split() == ["Name:", "web-0"]
    assert lines[1].split() == ["Namespace:", "default"]
    assert "Node:" in page and "n1/10.0.0.5" in page
    assert any(line.split() == ["Status:", "Running"] for line in lines)
    assert any(line.split() == ["State:", "Waiting"] for line in lines)
    assert any(line.split() == ["Reason:", "CrashLoopBackOff"] for line in lines)
    assert any(line.split() == ["Restart", "Count:", "2"] for line in lines)
    assert "Conditions:" in lines and lines[-1] == "Events:  <none>"


def test_describe_lists_events_under_a_table() -> None:
    page = describing.describe(kind("pods"), pod(), kinds=KINDS,
                               events=[event("e", last=5)], now=NOW)
    tail = page.splitlines()[-3:]
    assert tail[0].split() == ["Type", "Reason", "Age", "From", "Message"]
    assert tail[2].split() == ["Normal", "Pulled", "5s", "nodeagent,", "n1", "e", "happened"]


def test_describe_other_kinds_shows_fields_as_yaml() -> None:
    cm = make({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "x", "namespace": "default", "labels": {"a": "1", "b": "2"}},
               "data": {"k": "v"}})
    page = describing.describe(kind("cm"), cm, kinds=KINDS, events=[], now=NOW)
    assert "Data:\n  k: v\n" in page
    labels = [line for line in page.splitlines() if "a=1" in line or "b=2" in line]
    assert labels[0].startswith("Labels:") and labels[1].strip() == "b=2"


def test_describe_secret_never_shows_values() -> None:
    secret = make({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s", "namespace": "default"},
                   "type": "Opaque", "data": {"password": "aHVudGVyMg=="}})
    page = describing.describe(kind("secrets"), secret, kinds=KINDS, events=[], now=NOW)
    assert "hunter2" not in page and "aHVudGVyMg==" not in page
    assert any(line.split() == ["password:", "7", "bytes"] for line in page.splitlines())


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(("args", "expected"), [
    (["pods"], [("Pod", ())]),
    (["po", "a", "b", "a"], [("Pod", ("a", "b"))]),
    (["deploy,svc"], [("Deployment", ()), ("Service", ())]),
    (["deployments.apps,svc", "web"], [("Deployment", ("web",)), ("Service", ("web",))]),
    (["pod/a", "svc/b", "po/c"], [("Pod", ("a", "c")), ("Service", ("b",))]),
    (["all"], [("Pod", ()), ("Service", ()), ("DaemonSet", ()), ("Deployment", ()),
               ("ReplicaSet", ()), ("StatefulSet", ())]),
])
def test_parse_targets(args: list[str], expected: list[tuple[str, tuple[str, ...]]]) -> None:
    targets = parse_targets(args, KINDS)
    assert [(t.kind.kind, t.names) for t in targets] == expected
    assert all(isinstance(t, Target) for t in targets)


@pytest.mark.parametrize("args", [[], ["bogus"], ["pods,"], ["pod/a", "b"], ["pod/"],
                                  ["pod/a/b"]])
def test_parse_targets_rejects(args: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_targets(args, KINDS)


@pytest.mark.parametrize(("text", "seconds"), [
    ("10", 10.0), ("2.5", 2.5), ("10s", 10.0), ("1m", 60.0), ("1m30s", 90.0),
    ("500ms", 0.5), ("1h", 3600.0), ("0", None), ("0s", None),
])
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("argv", "expected"), [
    (["apply", "--dry-run", "-f", "x"], ["apply", "--dry-run=server", "-f", "x"]),
    (["delete", "--wait=false", "po", "x"], ["delete", "--no-wait", "po", "x"]),
    (["delete", "--", "--dry-run"], ["delete", "--", "--dry-run"]),
])
def test_normalize_argv(argv: list[str], expected: list[str]) -> None:
    assert normalize_argv(argv) == expected


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("error", "code"), [
    (UsageError("bad flag"), ExitCode.BAD_INPUT),
    (InputError(["a.yaml: document 1: bad"]), ExitCode.BAD_INPUT),
    (ConfigError("no config"), ExitCode.UNREACHABLE),
    (errors.Unavailable("down"), ExitCode.UNREACHABLE),
    (errors.NotFound('pods "x" not found'), ExitCode.SERVER_REFUSED),
    (errors.Conflict("stale"), ExitCode.SERVER_REFUSED),
    (errors.AlreadyExists("exists"), ExitCode.SERVER_REFUSED),
    (errors.Forbidden("no"), ExitCode.SERVER_REFUSED),
    (errors.Invalid("bad"), ExitCode.SERVER_REFUSED),
    (errors.BadRequest("bad"), ExitCode.SERVER_REFUSED),
    (errors.InternalError("boom"), ExitCode.SERVER_REFUSED),
    (FileNotFoundError(2, "No such file or directory", "x.yaml"), ExitCode.BAD_INPUT),
])
def test_exit_code_for(error: BaseException, code: ExitCode) -> None:
    assert exit_code_for(error) == code


@pytest.mark.parametrize(("error", "lines"), [
    (errors.NotFound('pods "x" not found'),
     ['Error from server (NotFound): pods "x" not found']),
    (errors.Invalid('Deployment "web" is invalid', causes=[
        errors.FieldError("spec.replicas", "Invalid value: -1: must be greater than or "
                                           "equal to 0")]),
     ['Error from server (Invalid): Deployment "web" is invalid: spec.replicas: '
      "Invalid value: -1: must be greater than or equal to 0"]),
    (errors.Unavailable("apiserver unavailable: connection refused"),
     ["Unable to connect to the server: apiserver unavailable: connection refused"]),
    (InputError(["a.yaml: document 1: x", "a.yaml: document 2: y"]),
     ["error: a.yaml: document 1: x", "error: a.yaml: document 2: y"]),
    (UsageError('the server doesn\'t have a resource type "bogus"'),
     ['error: the server doesn\'t have a resource type "bogus"']),
])
def test_error_lines(error: BaseException, lines: list[str]) -> None:
    assert error_lines(error) == lines


@pytest.mark.parametrize(("argv", "code", "stderr_has"), [
    (["get"], 2, "you must specify the type of resource"),
    (["frobnicate"], 2, "invalid choice"),
    (["get", "pods", "-o", "toml"], 2, "invalid choice"),
    (["get", "bogus", "--config", "/nonexistent/config"], 2, "doesn't have a resource type"),
    (["get", "pods", "-l", "a=(", "--config", "/nonexistent/config"], 2,
     "invalid label selector"),
    (["get", "pods", "--config", "/nonexistent/config"], 3, "no client config"),
    (["apply", "-f", "/nonexistent/app.yaml"], 2, 'the path "/nonexistent/app.yaml"'),
    (["delete", "pods", "--config", "/nonexistent/config", "-n", "x"], 2,
     "no name was specified"),
    (["get", "pods", "--request-timeout", "soon"], 2, "invalid duration"),
])
def test_main_exit_codes_without_a_server(argv: list[str], code: int, stderr_has: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert stderr_has in err
    assert "Traceback" not in err


def test_version_client_needs_no_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version", "--client", "--config", "/nonexistent/config"]) == 0
    assert capsys.readouterr().out.startswith("Client Version: ")


def test_rbac_rows() -> None:
    meta = {"name": "read", "namespace": "dev", "creationTimestamp": ago(60)}
    role = make({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": meta, "rules": []})
    (row,) = table_for(kind("roles"), [role], now=NOW).rows
    assert row[0] == "read" and row[1].endswith("Z")
    rb = make({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "view"},
               "subjects": [{"kind": "User", "name": "jane"},
                            {"kind": "ServiceAccount", "name": "bot", "namespace": "dev"}]})
    table = table_for(kind("rolebindings"), [rb], now=NOW, options=TableOptions(wide=True))
    assert table.headers == ("NAME", "ROLE", "AGE", "USERS", "GROUPS", "SERVICEACCOUNTS")
    assert table.rows[0] == ("read", "ClusterRole/view", "60s", "jane", "", "dev/bot")
