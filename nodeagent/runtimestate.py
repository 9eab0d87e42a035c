"""What the container runtime holds for a pod, as the planner sees it.

The relist (``nodeagent.pleg``) turns CRI sandboxes and containers, grouped by
the pod-UID label, into these plain values. Planning and status code reads
only these, never CRI messages, so it is pure and table-testable.

Labels and annotations Shoal puts on CRI objects (Kubernetes' keys, so
``crictl`` users recognise them):
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

LABEL_POD_UID = "io.kubernetes.pod.uid"
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"
# Annotations on containers.
ANN_RESTART_COUNT = "io.kubernetes.container.restartCount"
ANN_SPEC_HASH = "shoal.dev/container-hash"
ANN_INIT = "shoal.dev/init-container"
ANN_TERMINATION_GRACE = "io.kubernetes.pod.terminationGracePeriod"


class ContainerState(Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ContainerRecord:
    """One container instance in the runtime (one attempt of a spec container)."""

    id: str
    name: str
    attempt: int
    state: ContainerState
    spec_hash: str = ""
    init: bool = False
    image: str = ""
    image_ref: str = ""
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    restart_count: int = 0


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    attempt: int
    ready: bool
    ip: str = ""
    created_at: float = 0.0


@dataclass(frozen=True)
class PodRecord:
    """Everything the runtime has for one pod UID."""

    uid: str
    name: str = ""
    namespace: str = ""
    sandboxes: tuple[SandboxRecord, ...] = ()
    containers: tuple[ContainerRecord, ...] = ()

    @property
    def sandbox(self) -> SandboxRecord | None:
        """The newest sandbox (highest attempt, then newest)."""
        if not self.sandboxes:
            return None
        return max(self.sandboxes, key=lambda s: (s.attempt, s.created_at))

    def latest(self, name: str, *, init: bool | None = None) -> ContainerRecord | None:
        """The newest instance of the named container."""
        found = [c for c in self.containers
                 if c.name == name and (init is None or c.init == init)]
        if not found:
            return None
        return max(found, key=lambda c: (c.attempt, c.created_at))

    def running(self) -> list[ContainerRecord]:
        return [c for c in self.containers if c.state is ContainerState.RUNNING]


@dataclass
class ProbeView:
    """What the prober last concluded for a pod's containers (by name)."""

    live: dict[str, bool] = field(default_factory=dict)      # False: restart it
    ready: dict[str, bool] = field(default_factory=dict)
    started: dict[str, bool] = field(default_factory=dict)   # startup probe passed
