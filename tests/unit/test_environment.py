"""Environment resolution: sources, precedence, expansion, and config errors."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.environment import (
    ConfigError,
    PodFacts,
    command_line,
    expand,
    resolve_env,
)
from shoal.api.core.v1 import core_pb2

FACTS = PodFacts(pod_ip="10.244.1.7", host_ip="192.168.56.11")


def _cm(**data: str) -> core_pb2.ConfigMap:
    return core_pb2.ConfigMap(data=data)


def _secret(**data: bytes) -> core_pb2.Secret:
    return core_pb2.Secret(data=data)


STORE: dict[str, dict[tuple[str, str], Any]] = {
    "cm": {("ns", "app"): _cm(MODE="prod", PORT="8080")},
    "secret": {("ns", "creds"): _secret(password=b"hunter2", user=b"admin")},
}


async def configmaps(ns: str, name: str) -> Any:
    return STORE["cm"].get((ns, name))


async def secrets(ns: str, name: str) -> Any:
    return STORE["secret"].get((ns, name))


def pod() -> tuple[core_pb2.Pod, core_pb2.Container]:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace, p.metadata.uid = "web-0", "ns", "uid-1"
    p.metadata.labels["app"] = "web"
    p.spec.node_name = "node-1"
    c = p.spec.containers.add(name="app", image="x")
    return p, c


async def resolve(p: core_pb2.Pod, c: core_pb2.Container) -> dict[str, str]:
    return dict(await resolve_env(p, c, configmaps=configmaps, secrets=secrets, facts=FACTS))


async def test_every_source_and_precedence() -> None:
    p, c = pod()
    c.env_from.add(prefix="CFG_").config_map_ref.name = "app"
    c.env.add(name="CFG_MODE", value="override")
    c.env.add(name="GREETING", value="hello $(POD_NAME)")  # not defined yet: kept literal
    c.env.add(name="POD_NAME").value_from.field_ref.field_path = "metadata.name"
    c.env.add(name="URL", value="http://$(POD_IP):$(CFG_PORT)/$$(NOT)")
    c.env.add(name="POD_IP").value_from.field_ref.field_path = "status.podIP"
    c.env.add(name="NODE").value_from.field_ref.field_path = "spec.nodeName"
    c.env.add(name="APP").value_from.field_ref.field_path = "metadata.labels['app']"
    pw = c.env.add(name="PASSWORD").value_from.secret_key_ref
    pw.name, pw.key = "creds", "password"
    mode = c.env.add(name="MODE").value_from.config_map_key_ref
    mode.name, mode.key = "app", "MODE"
    c.resources.limits["memory"].value = "64Mi"
    mem = c.env.add(name="MEM_MI").value_from.resource_field_ref
    mem.resource = "limits.memory"
    mem.divisor.value = "1Mi"
    env = await resolve(p, c)
    assert env["CFG_MODE"] == "override" and env["CFG_PORT"] == "8080"
    assert env["GREETING"] == "hello $(POD_NAME)"
    assert env["POD_NAME"] == "web-0" and env["NODE"] == "node-1" and env["APP"] == "web"
    assert env["URL"] == "http://$(POD_IP):8080/$(NOT)"
    assert env["PASSWORD"] == "hunter2" and env["MODE"] == "prod" and env["MEM_MI"] == "64"


@pytest.mark.parametrize(("kind", "name", "key", "message"), [
    ("cm", "nope", "k", 'configmap "nope" not found'),
    ("cm", "app", "NOPE", "couldn't find key NOPE in configmap ns/app"),
    ("secret", "nope", "k", 'secret "nope" not found'),
    ("secret", "creds", "nope", "couldn't find key nope in secret ns/creds"),
])
async def test_missing_sources_are_config_errors(kind: str, name: str, key: str,
                                                 message: str) -> None:
    p, c = pod()
    vf = c.env.add(name="X").value_from
    ref = vf.config_map_key_ref if kind == "cm" else vf.secret_key_ref
    ref.name, ref.key = name, key
    with pytest.raises(ConfigError, match=message):
        await resolve(p, c)
    ref.optional = True
    assert "X" not in await resolve(p, c)


def test_command_expansion() -> None:
    _, c = pod()
    c.command.extend(["sh", "-c"])
    c.args.append("echo $(GREETING) $$(HOME) $(MISSING)")
    cmd, args = command_line(c, [("GREETING", "hi")])
    assert cmd == ["sh", "-c"] and args == ["echo hi $(HOME) $(MISSING)"]
    assert expand("$$$(A)", {"A": "x"}) == "$x"
