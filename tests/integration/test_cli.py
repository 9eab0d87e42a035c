"""The ``shoal`` command against a live in-process apiserver.

Each test calls ``shoal.cli.main.main(argv)`` in a worker thread (the apiserver
runs on the test's event loop, which must keep running), reads stdout/stderr
with ``capsys``, and works in namespaces of its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.cli.main import main
from shoal.config import load


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def shoal(apiserver: Any, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> Any:
    """``await shoal("get", "pods")`` -> Result, with the apiserver's config."""

    async def run(*args: str, stdin: str | None = None, config: str | None = None) -> Result:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        argv = ["--config", config or str(apiserver.config_path), *args]
        code = await asyncio.to_thread(main, argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return Result(code, captured.out, captured.err)

    return run


def unique(prefix: str = "cli") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def manifest(*docs: dict[str, Any]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def ns_doc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def cm_doc(name: str, ns: str, *, labels: dict[str, str] | None = None,
           **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "data": data}


def deploy_doc(name: str, ns: str, *, replicas: int = 2) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "web",
                                                           "image": "nginx:1.27"}]}}}}


def write(tmp_path: Path, name: str, *docs: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(manifest(*docs))
    return str(path)


async def make_namespace(shoal: Any) -> str:
    name = unique()
    r = await shoal("apply", "-f", "-", stdin=manifest(ns_doc(name)))
    assert r.code == 0, r.err
    return name


# --------------------------------------------------------------------------- apply


async def test_apply_creates_then_unchanged_then_configured(shoal: Any, tmp_path: Path) -> None:
    ns = unique()
    path = write(tmp_path, "app.yaml", ns_doc(ns), cm_doc("cfg", ns, a="1"),
                 deploy_doc("web", ns))
    first = await shoal("apply", "-f", path)
    assert first.code == 0, first.err
    assert first.out.splitlines() == [f"namespace/{ns} created", "configmap/cfg created",
                                      "deployment.apps/web created"]
    again = await shoal("apply", "-f", path)
    assert again.code == 0, again.err
    assert again.out.splitlines() == [f"namespace/{ns} unchanged", "configmap/cfg unchanged",
                                      "deployment.apps/web unchanged"]
    write(tmp_path, "app.yaml", ns_doc(ns), cm_doc("cfg", ns, a="1"),
          deploy_doc("web", ns, replicas=5))
    changed = await shoal("apply", "-f", path)
    assert changed.code == 0, changed.err
    assert changed.out.splitlines() == [f"namespace/{ns} unchanged", "configmap/cfg unchanged",
                                        "deployment.apps/web configured"]
    got = await shoal("get", "deploy", "web", "-n", ns, "-o", "json")
    assert json.loads(got.out)["spec"]["replicas"] == 5


async def test_apply_keeps_what_others_wrote_and_drops_what_it_no_longer_sets(
        shoal: Any, apiserver: Any, tmp_path: Path) -> None:
    """kubectl's three-way merge: a Service's allocated address, a controller's
    annotation and a label added by hand survive a re-apply; a label the previous
    apply set and this manifest drops is removed."""
    ns = unique()
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": ns},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    cm = cm_doc("cfg", ns, labels={"tier": "x", "app": "web"}, a="1")
    path = write(tmp_path, "app.yaml", ns_doc(ns), cm, svc, deploy_doc("web", ns))
    assert (await shoal("apply", "-f", path)).code == 0
    async with apiserver.client() as c:
        d = await c.get(apps_pb2.Deployment, "web", namespace=ns)
        d.metadata.annotations["deployment.kubernetes.io/revision"] = "1"
        await c.update(d)
        got = await c.get(core_pb2.ConfigMap, "cfg", namespace=ns)
        got.metadata.labels["by-hand"] = "yes"
        await c.update(got)
        ip = (await c.get(core_pb2.Service, "web", namespace=ns)).spec.cluster_ip
    again = await shoal("apply", "-f", path)
    assert again.out.splitlines() == [f"namespace/{ns} unchanged", "configmap/cfg unchanged",
                                      "service/web unchanged", "deployment.apps/web unchanged"]
    write(tmp_path, "app.yaml", ns_doc(ns), cm_doc("cfg", ns, labels={"app": "web"}, a="1"))
    assert (await shoal("apply", "-f", path)).code == 0
    async with apiserver.client() as c:
        got = await c.get(core_pb2.ConfigMap, "cfg", namespace=ns)
        assert dict(got.metadata.labels) == {"app": "web", "by-hand": "yes"}
        d = await c.get(apps_pb2.Deployment, "web", namespace=ns)
        assert d.metadata.annotations["deployment.kubernetes.io/revision"] == "1"
        assert (await c.get(core_pb2.Service, "web", namespace=ns)).spec.cluster_ip == ip


async def test_apply_with_a_bad_second_document_writes_nothing(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    bad = deploy_doc("broken", ns, replicas=-1)
    r = await shoal("apply", "-f", "-", stdin=manifest(cm_doc("first", ns, a="b"), bad))
    assert r.code == 2
    assert r.out == ""
    assert ('error: STDIN: document 2 (Deployment "broken"): spec.replicas: Invalid value: '
            "-1: must be greater than or equal to 0") in r.err.splitlines()
    missing = await shoal("get", "cm", "first", "-n", ns)
    assert missing.code == 1
    assert missing.err.strip() == 'Error from server (NotFound): configmaps "first" not found'


async def test_apply_into_a_missing_namespace_writes_nothing(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    gone = unique("gone")
    r = await shoal("apply", "-f", "-", stdin=manifest(cm_doc("a", ns), cm_doc("b", gone)))
    assert r.code == 2
    assert f'namespaces "{gone}" not found' in r.err
    assert (await shoal("get", "cm", "a", "-n", ns)).code == 1


async def test_apply_refused_by_the_servers_dry_run_writes_nothing(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    assert (await shoal("apply", "-f", "-", stdin=manifest(deploy_doc("web", ns)))).code == 0
    moved = deploy_doc("web", ns)
    moved["spec"]["selector"] = {"matchLabels": {"app": "web", "v": "2"}}
    moved["spec"]["template"]["metadata"]["labels"]["v"] = "2"
    r = await shoal("apply", "-f", "-", stdin=manifest(cm_doc("new", ns), moved))
    assert r.code == 2
    assert r.err.startswith('error: STDIN: document 2 (Deployment "web"): spec.selector')
    assert (await shoal("get", "cm", "new", "-n", ns)).code == 1


async def test_apply_namespace_flag_must_match_the_manifest(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("apply", "-n", "elsewhere", "-f", "-", stdin=manifest(cm_doc("a", ns)))
    assert r.code == 2
    assert "does not match the namespace" in r.err
    ok = await shoal("apply", "-n", ns, "-f", "-",
                     stdin=manifest({"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": "plain"}}))
    assert ok.code == 0 and ok.out == "configmap/plain created\n"


async def test_apply_directory_and_dry_run(shoal: Any, tmp_path: Path) -> None:
    ns = await make_namespace(shoal)
    write(tmp_path, "b.yaml", cm_doc("b", ns))
    write(tmp_path, "a.yml", cm_doc("a", ns))
    (tmp_path / "notes.txt").write_text("not a manifest")
    dry = await shoal("apply", "-f", str(tmp_path), "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.out.splitlines() == ["configmap/a created (server dry run)",
                                    "configmap/b created (server dry run)"]
    assert (await shoal("get", "cm", "-n", ns)).err.startswith("No resources found")
    real = await shoal("apply", "-f", str(tmp_path))
    assert real.out.splitlines() == ["configmap/a created", "configmap/b created"]


# --------------------------------------------------------------------------- get


async def test_get_tables_yaml_names_and_selectors(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("apply", "-f", "-", stdin=manifest(
        cm_doc("one", ns, labels={"tier": "web"}, a="1"),
        cm_doc("two", ns, labels={"tier": "db"}, a="1", b="2"),
        deploy_doc("web", ns, replicas=3)))
    assert r.code == 0, r.err

    table = await shoal("get", "cm", "-n", ns)
    lines = table.out.splitlines()
    assert lines[0].split() == ["NAME", "DATA", "AGE"]
    assert [line.split()[:2] for line in lines[1:]] == [["one", "1"], ["two", "2"]]

    deploys = await shoal("get", "deploy", "-n", ns)
    assert deploys.out.splitlines()[0].split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE",
                                                   "AGE"]
    assert deploys.out.splitlines()[1].split()[:2] == ["web", "0/3"]

    selected = await shoal("get", "cm", "-n", ns, "-l", "tier=db", "-o", "name")
    assert selected.out == "configmap/two\n"

    one = await shoal("get", "cm", "one", "-n", ns, "-o", "yaml")
    doc = yaml.safe_load(one.out)
    assert (doc["kind"], doc["metadata"]["name"], doc["data"]) == ("ConfigMap", "one",
                                                                   {"a": "1"})
    many = yaml.safe_load((await shoal("get", "cm/one", "cm/two", "-n", ns,
                                       "-o", "yaml")).out)
    assert many["kind"] == "List"
    assert [i["metadata"]["name"] for i in many["items"]] == ["one", "two"]

    both = await shoal("get", "deploy,cm", "-n", ns, "--no-headers")
    assert {line.split()[0] for line in both.out.splitlines() if line} == {
        "deployment.apps/web", "configmap/one", "configmap/two"}

    everywhere = await shoal("get", "cm", "-A", "--field-selector", "metadata.name=two")
    assert everywhere.out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert any(line.split()[:2] == [ns, "two"] for line in everywhere.out.splitlines())


async def test_get_nothing_found_says_so_on_stderr(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("get", "pods", "-n", ns)
    assert (r.code, r.out) == (0, "")
    assert r.err == f"No resources found in {ns} namespace.\n"


async def test_get_watch_prints_changes_until_the_request_timeout(
        shoal: Any, apiserver: Any, tmp_path: Path) -> None:
    ns = await make_namespace(shoal)
    await shoal("apply", "-f", "-", stdin=manifest(cm_doc("before", ns)))
    watcher = asyncio.create_task(shoal("get", "cm", "-n", ns, "-w",
                                        "--request-timeout", "3"))
    await asyncio.sleep(1.0)
    path = write(tmp_path, "after.yaml", cm_doc("after", ns))
    assert await asyncio.to_thread(
        main, ["--config", str(apiserver.config_path), "apply", "-f", path]) == 0
    r = await watcher
    assert r.code == 0, r.err
    rows = [line.split()[0] for line in r.out.splitlines()]
    assert rows[:2] == ["NAME", "before"]
    assert "after" in rows[2:]


# --------------------------------------------------------------------------- describe


async def test_describe_shows_details_and_events(shoal: Any) -> None:
    ns = await make_namespace(shoal)
    r = await shoal("apply", "-f", "-", stdin=manifest(deploy_doc("web", ns), {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": "web.1", "namespace": ns},
        "involvedObject": {"kind": "Deployment", "name": "web", "namespace": ns},
        "reason": "ScalingReplicaSet", "message": "Scaled up replica set web-1 to 2",
        "type": "Normal", "source": {"component": "deployment-controller"},
        "firstTimestamp": "2024-01-01T00:00:00Z", "lastTimestamp": "2024-01-01T00:00:00Z",
        "count": 1}))
    assert r.code == 0, r.err
    page = await shoal("describe", "deploy", "web", "-n", ns)
    assert page.code == 0, page.err
    lines = page.out.splitlines()
    assert lines[0].split() == ["Name:", "web"]
    assert lines[1].split() == ["Namespace:", ns]
    assert any(line.split()[:2] == ["Replicas:", "2"] for line in lines)
    assert "Pod Template:" in lines
    assert "Events:" in lines
    assert "Scaled up replica set web-1 to 2" in page.out

    await shoal("apply", "-f", "-", stdin=manifest(cm_doc("quiet", ns, k="v")))
    quiet = await shoal("describe", "cm", "quiet", "-n", ns)
    assert "Data:" in quiet.out and quiet.out.rstrip().endswith("Events:  <none>")

    missing = await shoal("describe", "cm", "nope", "-n", ns)
    assert missing.code == 1 and "NotFound" in missing.err


# --------------------------------------------------------------------------- delete


async def test_delete_by_name_by_manifest_and_not_found(shoal: Any, tmp_path: Path) -> None:
    ns = await make_namespace(shoal)
    path = write(tmp_path, "cms.yaml", cm_doc("a", ns), cm_doc("b", ns))
    assert (await shoal("apply", "-f", path)).code == 0
    r = await shoal("delete", "cm", "a", "-n", ns)
    assert (r.code, r.out) == (0, 'configmap "a" deleted\n')
    again = await shoal("delete", "configmap/a", "-n", ns)
    assert again.code == 1
    assert again.err.strip() == 'Error from server (NotFound): configmaps "a" not found'
    by_file = await shoal("delete", "-f", path, "--ignore-not-found")
    assert (by_file.code, by_file.out) == (0, 'configmap "b" deleted\n')
    dry = await shoal("delete", f"ns/{ns}", "--dry-run")
    assert dry.out == f'namespace "{ns}" deleted (server dry run)\n'
    assert (await shoal("get", "ns", ns)).code == 0


# --------------------------------------------------------------------------- exit codes


async def test_exit_codes(shoal: Any, apiserver: Any, tmp_path: Path) -> None:
    ns = await make_namespace(shoal)
    # 1: the server refused.
    assert (await shoal("get", "pod", "nope", "-n", ns)).code == 1
    protected = await shoal("delete", "ns", "default")
    assert protected.code == 1 and protected.err.startswith("Error from server (Forbidden)")
    # 2: usage or bad input.
    unknown = await shoal("get", "widgets")
    assert unknown.code == 2
    assert unknown.err.strip() == 'error: the server doesn\'t have a resource type "widgets"'
    bad = await shoal("apply", "-f", "-", stdin="apiVersion: v1\nkind: ConfigMap\n"
                                                "metadata: {name: x}\ndata: [1]\n")
    assert bad.code == 2 and "data: expected object, got array" in bad.err
    # 3: no config, or no apiserver there.
    nothing = await shoal("get", "ns", config=str(tmp_path / "missing.conf"))
    assert nothing.code == 3 and "no client config" in nothing.err
    cfg = load(apiserver.config_path)
    dead = tmp_path / "dead.conf"
    dead.write_text(cfg.to_yaml().replace(cfg.servers[0], "127.0.0.1:1"))
    unreachable = await shoal("get", "ns", "--request-timeout", "3", config=str(dead))
    assert unreachable.code == 3
    assert unreachable.err.startswith("Unable to connect to the server")


async def test_version_api_resources_and_config_view(shoal: Any) -> None:
    v = await shoal("version")
    assert v.code == 0
    assert [line.split(":")[0] for line in v.out.splitlines()] == [
        "Client Version", "Server Version", "Server Storage"]
    res = await shoal("api-resources")
    rows = [line.split() for line in res.out.splitlines()]
    assert rows[0] == ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
    assert ["pods", "po", "v1", "true", "Pod"] in rows
    view = await shoal("config", "view")
    doc = yaml.safe_load(view.out)
    assert doc["clientKeyData"] == "REDACTED"
    assert doc["certificateAuthorityData"] == "DATA+OMITTED"
    raw = yaml.safe_load((await shoal("config", "view", "--raw")).out)
    assert raw["clientKeyData"] not in ("REDACTED", "")


# --------------------------------------------------------------------------- tokens


async def test_token_create_list_join_command_and_delete(shoal: Any, apiserver: Any) -> None:
    created = await shoal("token", "create", "--ttl", "2h", "--description", "for node-a")
    assert created.code == 0
    token = created.out.strip()
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)
    listed = await shoal("token", "list")
    line = next(ln for ln in listed.out.splitlines() if ln.startswith(token[:6]))
    assert "signing" in line and "for node-a" in line and ("1h" in line or "2h" in line)
    cmd = await shoal("token", "create", "--print-join-command")
    assert cmd.out.startswith("shoal-nodeagent join --server 127.0.0.1:")
    assert "--ca-cert-hash sha256:" in cmd.out
    gone = await shoal("token", "delete", token[:6])
    assert gone.code == 0 and f'bootstrap token "{token[:6]}" deleted' in gone.out
    listed = await shoal("token", "list")
    assert token[:6] not in listed.out
