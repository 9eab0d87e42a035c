"""A scriptable stand-in for a meshagent behind its admin API (``meshagent.admin``).

    source = FakeAdminSource(generation=12)
    source.set_generation(40, per_resource={"services": 40})  # the agent caught up
    source.conns.append(ConnectionRow(direction="outbound", ...))
    server = AdminServer(source=source, node_name="node-a", pki_dir=..., listen=...)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshagent.admin import ConnectionRow, Generations, NetfilterReport
from meshagent.identity import CertRow
from shoal import errors


@dataclass
class FakeAdminSource:
    generation: int = 0
    per_resource: dict[str, int] = field(default_factory=dict)
    applied_at: float = 0.0
    certs: list[CertRow] = field(default_factory=list)
    pod_ips: list[str] = field(default_factory=list)
    netfilter: NetfilterReport = field(default_factory=lambda: NetfilterReport(backend=""))
    # When set, netfilter_report raises it (iptables-save failing).
    netfilter_error: errors.ShoalError | None = None
    conns: list[ConnectionRow] = field(default_factory=list)
    status_calls: int = 0

    def set_generation(self, generation: int, *,
                       per_resource: Mapping[str, int] | None = None) -> None:
        self.generation = generation
        self.per_resource = dict(per_resource or {})
        self.applied_at = time.time()

    def generations(self) -> Generations:
        self.status_calls += 1
        return Generations(overall=self.generation, per_resource=dict(self.per_resource),
                           applied_at=self.applied_at)

    def certificate_rows(self) -> Sequence[CertRow]:
        return list(self.certs)

    def captured_ips(self) -> Sequence[str]:
        return list(self.pod_ips)

    async def netfilter_report(self) -> NetfilterReport:
        if self.netfilter_error is not None:
            raise self.netfilter_error
        return self.netfilter

    def connections(self) -> Sequence[ConnectionRow]:
        return list(self.conns)
