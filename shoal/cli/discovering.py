"""``shoal version`` and ``shoal api-resources``: what the client and server are.

Both render pure functions of the Version and Discover answers.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any, Literal

import shoal
from shoal.api.resources.v1 import resources_pb2 as pb
from shoal.cli.printing import Table, render_table
from shoal.cli.reporting import ExitCode
from shoal.cli.session import Session
from shoal.manifests import dump_json, dump_yaml

VersionOutput = Literal["", "yaml", "json"]
ResourcesOutput = Literal["", "wide", "name"]


def client_version() -> dict[str, str]:
    return {"version": shoal.__version__, "python": platform.python_version()}


def server_version(resp: pb.VersionResponse) -> dict[str, str]:
    return {"version": resp.version, "storage": resp.storage, "python": resp.python}


def version_text(client: dict[str, str], server: dict[str, str] | None, *,
                 output: VersionOutput) -> str:
    if output in ("yaml", "json"):
        doc: dict[str, Any] = {"clientVersion": client}
        if server is not None:
            doc["serverVersion"] = server
        return dump_json(doc) + "\n" if output == "json" else dump_yaml(doc)
    lines = [f"Client Version: {client['version']}"]
    if server is not None:
        lines += [f"Server Version: {server['version']}",
                  f"Server Storage: {server['storage'] or '<unknown>'}"]
    return "\n".join(lines) + "\n"


async def run_version(session: Session, *, client_only: bool, output: VersionOutput) -> int:
    client = client_version()
    if client_only:
        session.out.write(version_text(client, None, output=output))
        return ExitCode.OK
    if output == "":
        session.out.write(version_text(client, None, output=output))
        session.out.flush()
        server = server_version(await session.client().version())
        session.print(f"Server Version: {server['version']}")
        session.print(f"Server Storage: {server['storage'] or '<unknown>'}")
        return ExitCode.OK
    server = server_version(await session.client().version())
    session.out.write(version_text(client, server, output=output))
    return ExitCode.OK


def _sort_key(r: pb.APIResource) -> tuple[bool, str, str]:
    return (r.group != "", r.group, r.resource)


def api_resources_text(resources: Sequence[pb.APIResource], *, namespaced: bool | None = None,
                       output: ResourcesOutput = "", headers: bool = True) -> str:
    """kubectl's api-resources table (or names), sorted core group first."""
    chosen = sorted((r for r in resources if namespaced is None or r.namespaced == namespaced),
                    key=_sort_key)
    if output == "name":
        return "".join((f"{r.resource}.{r.group}" if r.group else r.resource) + "\n"
                       for r in chosen)
    head: tuple[str, ...] = ("NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND")
    if output == "wide":
        head += ("MESSAGE TYPE",)
    rows = []
    for r in chosen:
        api_version = f"{r.group}/{r.version}" if r.group else r.version
        row: tuple[str, ...] = (r.resource, ",".join(r.short_names), api_version,
                                "true" if r.namespaced else "false", r.kind)
        if output == "wide":
            row += (r.message_type,)
        rows.append(row)
    return render_table(Table(head, tuple(rows)), headers=headers)


async def run_api_resources(session: Session, *, namespaced: bool | None,
                            output: ResourcesOutput, headers: bool) -> int:
    resources = await session.client().discover()
    session.out.write(api_resources_text(resources, namespaced=namespaced, output=output,
                                         headers=headers))
    return ExitCode.OK
