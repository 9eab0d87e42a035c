"""A container's environment and command line, resolved as Kubernetes does.

- ``envFrom`` (ConfigMap or Secret, with an optional prefix) first, then ``env``
  in order; a later name wins.
- ``valueFrom``: ``configMapKeyRef``, ``secretKeyRef``, ``fieldRef`` (metadata.name,
  metadata.namespace, metadata.uid, metadata.labels['k'], metadata.annotations['k'],
  spec.nodeName, spec.serviceAccountName, status.podIP, status.podIPs,
  status.hostIP), ``resourceFieldRef`` (limits/requests of cpu and memory).
- ``$(VAR)`` in values, ``command`` and ``args`` expands to variables defined
  earlier; ``$$(VAR)`` is a literal ``$(VAR)``; unknown references stay as
  written.

A missing ConfigMap, Secret or key raises :class:`ConfigError`, which the pod
worker reports as ``CreateContainerConfigError`` (unless the reference is
``optional``). Lookups are passed in: this module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shoal import quantity

# (namespace, name) -> the object, or None when it does not exist
Lookup = Callable[[str, str], Awaitable[Any | None]]


class ConfigError(Exception):
    """Why a container's configuration cannot be built (shown in pod status)."""


@dataclass(frozen=True)
class PodFacts:
    """What fieldRef may read that is not in the pod spec itself."""

    pod_ip: str
    host_ip: str


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _REF.sub(sub, text)


def field_value(pod: Any, path: str, facts: PodFacts) -> str:
    m = _FIELD.match(path)
    if m:
        source = pod.metadata.labels if m.group(1) == "labels" else pod.metadata.annotations
        return str(source.get(m.group(2), ""))
    simple = {
        "metadata.name": pod.metadata.name,
        "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": facts.pod_ip,
        "status.podIPs": facts.pod_ip,
        "status.hostIP": facts.host_ip,
        "status.hostIPs": facts.host_ip,
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")
    return str(simple[path])


def resource_value(container: Any, ref: Any) -> str:
    kind, _, res = ref.resource.partition(".")
    table = container.resources.limits if kind == "limits" else container.resources.requests
    if res not in ("cpu", "memory", "ephemeral-storage") or kind not in ("limits", "requests"):
        raise ConfigError(f"unsupported resourceFieldRef resource {ref.resource!r}")
    raw = table[res].value if res in table else ("0" if kind == "requests" else "")
    if not raw:
        return "0"
    divisor = quantity.parse(ref.divisor.value) if ref.HasField("divisor") and \
        ref.divisor.value else (quantity.parse("1"))
    value = quantity.parse(raw) / divisor
    return str(-((-value.numerator) // value.denominator))  # round up, as Kubernetes


async def _key(lookup: Lookup, kind: str, namespace: str, ref: Any, *, binary: bool) -> str | None:
    obj = await lookup(namespace, ref.name)
    optional = ref.HasField("optional") and ref.optional
    if obj is None:
        if optional:
            return None
        raise ConfigError(f'{kind} "{ref.name}" not found')
    data = dict(obj.data)
    if ref.key not in data:
        if optional:
            return None
        raise ConfigError(f"couldn't find key {ref.key} in {kind} {namespace}/{ref.name}")
    value = data[ref.key]
    return value.decode() if binary else str(value)


async def resolve_env(pod: Any, container: Any, *, configmaps: Lookup, secrets: Lookup,
                      facts: PodFacts) -> list[tuple[str, str]]:
    """The container's environment, in order. Raises ConfigError."""
    ns = pod.metadata.namespace
    env: dict[str, str] = {}
    for src in container.env_from:
        if src.HasField("config_map_ref"):
            ref, lookup, kind, binary = src.config_map_ref, configmaps, "configmap", False
        elif src.HasField("secret_ref"):
            ref, lookup, kind, binary = src.secret_ref, secrets, "secret", True
        else:
            continue
        obj = await lookup(ns, ref.name)
        if obj is None:
            if ref.HasField("optional") and ref.optional:
                continue
            raise ConfigError(f'{kind} "{ref.name}" not found')
        for k, v in sorted(obj.data.items()):
            env[src.prefix + k] = v.decode() if binary else str(v)
    for var in container.env:
        if var.HasField("value_from"):
            vf = var.value_from
            if vf.HasField("config_map_key_ref"):
                value = await _key(configmaps, "configmap", ns, vf.config_map_key_ref,
                                   binary=False)
            elif vf.HasField("secret_key_ref"):
                value = await _key(secrets, "secret", ns, vf.secret_key_ref, binary=True)
            elif vf.HasField("field_ref"):
                value = field_value(pod, vf.field_ref.field_path, facts)
            elif vf.HasField("resource_field_ref"):
                value = resource_value(container, vf.resource_field_ref)
            else:
                raise ConfigError(f"env {var.name}: valueFrom has no source")
            if value is None:
                continue
            env[var.name] = value
        else:
            env[var.name] = expand(var.value, env)
    return list(env.items())


def command_line(container: Any, env: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """``command`` and ``args`` with ``$(VAR)`` expanded."""
    table = dict(env)
    return ([expand(c, table) for c in container.command],
            [expand(a, table) for a in container.args])
