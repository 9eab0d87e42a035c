"""``shoal top nodes|pods``: recent CPU and memory use, from the metrics API.

    top nodes [NAME] [-l SEL] [--sort-by cpu|memory]
        NAME  CPU(cores)  CPU%  MEMORY(bytes)  MEMORY%     (% of the node's allocatable)
    top pods [NAME] [-n NS | -A] [-l SEL] [--containers] [--sort-by cpu|memory]
        [NAMESPACE]  NAME  CPU(cores)  MEMORY(bytes)       (summed over containers)

CPU is printed in millicores ("250m"), memory in Mi ("64Mi"), as kubectl does.
The usage is a few seconds old: each node agent samples its containers' CRI
stats and the apiserver asks the agents (see ``apiserver.resourcemetrics``).
No usage at all (nodes just started, nothing sampled yet) is an error,
"metrics not available yet", exit 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shoal import quantity
from shoal.api.core.v1 import core_pb2
from shoal.cli.printing import Cells, Table, render_table
from shoal.cli.reporting import ExitCode, UsageError
from shoal.cli.session import Session

_MI = 1024 * 1024


def cpu_milli(usage: Mapping[str, Any]) -> int:
    q = usage.get("cpu")
    return quantity.milli(q.value) if q is not None and q.value else 0


def memory_bytes(usage: Mapping[str, Any]) -> int:
    q = usage.get("memory")
    return quantity.to_int(q.value) if q is not None and q.value else 0


def _cpu(m: int) -> str:
    return f"{m}m"


def _mem(n: int) -> str:
    return f"{n // _MI}Mi"


def _percent(used: int, of: int) -> str:
    return f"{used * 100 // of}%" if of > 0 else "<unknown>"


def node_table(metrics: Iterable[Any], nodes: Mapping[str, core_pb2.Node], *,
               sort_by: str = "") -> Table:
    rows: list[tuple[int, int, Cells]] = []
    for m in metrics:
        cpu, mem = cpu_milli(m.usage), memory_bytes(m.usage)
        node = nodes.get(m.metadata.name)
        alloc = node.status.allocatable if node is not None else {}
        cap_cpu = cpu_milli(alloc)
        cap_mem = memory_bytes(alloc)
        rows.append((cpu, mem, (m.metadata.name, _cpu(cpu), _percent(cpu, cap_cpu),
                                _mem(mem), _percent(mem, cap_mem))))
    rows = _sorted(rows, sort_by)
    return Table(headers=("NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"),
                 rows=tuple(r for _, _, r in rows))


def pod_table(metrics: Iterable[Any], *, namespace_column: bool, containers: bool = False,
              sort_by: str = "") -> Table:
    rows: list[tuple[int, int, Cells]] = []
    for m in metrics:
        ns = (m.metadata.namespace,) if namespace_column else ()
        if containers:
            for c in m.containers:
                cpu, mem = cpu_milli(c.usage), memory_bytes(c.usage)
                rows.append((cpu, mem, (*ns, m.metadata.name, c.name, _cpu(cpu), _mem(mem))))
            continue
        cpu = sum(cpu_milli(c.usage) for c in m.containers)
        mem = sum(memory_bytes(c.usage) for c in m.containers)
        rows.append((cpu, mem, (*ns, m.metadata.name, _cpu(cpu), _mem(mem))))
    rows = _sorted(rows, sort_by)
    headers: Cells = ("NAMESPACE",) if namespace_column else ()
    headers += ("POD", "NAME") if containers else ("NAME",)
    return Table(headers=(*headers, "CPU(cores)", "MEMORY(bytes)"),
                 rows=tuple(r for _, _, r in rows))


def _sorted(rows: list[tuple[int, int, Cells]], sort_by: str) -> list[tuple[int, int, Cells]]:
    if sort_by == "cpu":
        return sorted(rows, key=lambda r: -r[0])
    if sort_by == "memory":
        return sorted(rows, key=lambda r: -r[1])
    return rows


async def run_top(session: Session, *, what: str, args: Sequence[str], selector: str,
                  all_namespaces: bool, containers: bool, sort_by: str,
                  headers: bool) -> int:
    if sort_by not in ("", "cpu", "memory"):
        raise UsageError("--sort-by accepts only cpu or memory")
    if len(args) > 1:
        raise UsageError(f"top {what} takes at most one NAME")
    name = args[0] if args else ""
    client = session.client()
    if what in ("node", "nodes", "no"):
        listed = await client.node_metrics(name=name, label_selector=selector)
        nodes = {n.metadata.name: n for n in (await client.list(core_pb2.Node)).items}
        table = node_table(listed.items, nodes, sort_by=sort_by)
    elif what in ("pod", "pods", "po"):
        if all_namespaces and name:
            raise UsageError("a NAME cannot be given with -A")
        plisted = await client.pod_metrics(
            namespace="" if all_namespaces else session.namespace, name=name,
            label_selector=selector)
        table = pod_table(plisted.items, namespace_column=all_namespaces,
                          containers=containers, sort_by=sort_by)
    else:
        raise UsageError(f'top: unknown resource "{what}" (use nodes or pods)')
    if not table.rows:
        session.warn("error: metrics not available yet")
        return ExitCode.SERVER_REFUSED
    session.print(render_table(table, headers=headers).rstrip("\n"))
    return ExitCode.OK
