"""``PodRuntime`` over CRI: pods become sandboxes, containers become CRI containers.

Translation, one way:

- Sandbox: metadata (pod name, UID, namespace, attempt), hostname, log
  directory ``<log root>/<ns>_<name>_<uid>``, host ports, Kubernetes' labels
  (``io.kubernetes.pod.uid`` ...), namespaces (hostNetwork/hostPID/hostIPC).
- Container: image, command/args/env already resolved, mounts, log path
  ``<name>/<attempt>.log``, labels and annotations that let a restarted agent
  recognise it (pod UID, container name, restart count, spec hash, init flag),
  Linux resources from requests/limits (cpu shares, CFS quota, memory limit) and
  the security context (runAsUser/Group, privileged, read-only root fs,
  capabilities).

And back: ``relist`` groups every sandbox and container by pod-UID label into
``PodRecord``s. Facts that never change for an ID (a sandbox's IP, an exited
container's exit code and times) are cached, so a relist costs two list calls
plus one status call per container that changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeagent.cri import Runtime, runtime_ready
from nodeagent.logs import pod_log_dir
from nodeagent.podruntime import ContainerLaunch, ImagePullError, StartError
from nodeagent.runtimestate import (
    ANN_INIT,
    ANN_RESTART_COUNT,
    ANN_SPEC_HASH,
    ANN_TERMINATION_GRACE,
    LABEL_CONTAINER_NAME,
    LABEL_POD_NAME,
    LABEL_POD_NAMESPACE,
    LABEL_POD_UID,
    ContainerRecord,
    ContainerState,
    PodRecord,
    SandboxRecord,
)
from shoal import errors, quantity
from shoal.api.cri.v1 import api_pb2 as cri

log = logging.getLogger(__name__)

_STATES = {
    cri.CONTAINER_CREATED: ContainerState.CREATED,
    cri.CONTAINER_RUNNING: ContainerState.RUNNING,
    cri.CONTAINER_EXITED: ContainerState.EXITED,
}
_PROPAGATION = {
    "": cri.PROPAGATION_PRIVATE, "None": cri.PROPAGATION_PRIVATE,
    "HostToContainer": cri.PROPAGATION_HOST_TO_CONTAINER,
    "Bidirectional": cri.PROPAGATION_BIDIRECTIONAL,
}
CPU_PERIOD = 100_000
MIN_SHARES = 2


def _seconds(ns: int) -> float:
    return ns / 1e9


def namespace_options(pod: Any) -> cri.NamespaceOption:
    spec = pod.spec
    return cri.NamespaceOption(
        network=cri.NODE if spec.host_network else cri.POD,
        pid=cri.NODE if spec.host_pid else (cri.POD if spec.share_process_namespace
                                            else cri.CONTAINER),
        ipc=cri.NODE if spec.host_ipc else cri.POD)


def dns_config(pod: Any, *, server: str, domain: str) -> cri.DNSConfig | None:
    """Kubernetes' dnsPolicy: ClusterFirst points pods at their node's resolver with
    the cluster search path; None takes the pod's own dnsConfig; Default (and
    host-network pods under ClusterFirst) keep the runtime's, i.e. the node's."""
    spec = pod.spec
    policy = spec.dns_policy or "ClusterFirst"
    cfg = cri.DNSConfig()
    if policy == "None":
        cfg.servers.extend(spec.dns_config.nameservers)
        cfg.searches.extend(spec.dns_config.searches)
        cfg.options.extend(f"{o.name}:{o.value}" if o.value else o.name
                           for o in spec.dns_config.options)
        return cfg
    if not server or policy == "Default" or (policy == "ClusterFirst" and spec.host_network):
        return None
    ns = pod.metadata.namespace
    cfg.servers.append(server)
    cfg.searches.extend([f"{ns}.svc.{domain}", f"svc.{domain}", domain])
    cfg.options.append("ndots:5")
    for o in spec.dns_config.options:
        cfg.options.append(f"{o.name}:{o.value}" if o.value else o.name)
    cfg.searches.extend(spec.dns_config.searches)
    return cfg


def sandbox_config(pod: Any, *, attempt: int, log_root: Path, dns_server: str = "",
                   cluster_domain: str = "cluster.local") -> cri.PodSandboxConfig:
    meta = pod.metadata
    cfg = cri.PodSandboxConfig()
    cfg.metadata.name, cfg.metadata.uid = meta.name, meta.uid
    cfg.metadata.namespace, cfg.metadata.attempt = meta.namespace, attempt
    cfg.hostname = pod.spec.hostname or meta.name
    cfg.log_directory = str(pod_log_dir(log_root, meta.namespace, meta.name, meta.uid))
    dns = dns_config(pod, server=dns_server, domain=cluster_domain)
    if dns is not None:
        cfg.dns_config.CopyFrom(dns)
    cfg.labels[LABEL_POD_UID] = meta.uid
    cfg.labels[LABEL_POD_NAME] = meta.name
    cfg.labels[LABEL_POD_NAMESPACE] = meta.namespace
    if pod.spec.HasField("termination_grace_period_seconds"):
        cfg.annotations[ANN_TERMINATION_GRACE] = str(pod.spec.termination_grace_period_seconds)
    for c in pod.spec.containers:
        for p in c.ports:
            if p.host_port:
                cfg.port_mappings.add(
                    protocol={"UDP": cri.UDP, "SCTP": cri.SCTP}.get(p.protocol, cri.TCP),
                    container_port=p.container_port, host_port=p.host_port,
                    host_ip=p.host_ip)
    cfg.linux.security_context.namespace_options.CopyFrom(namespace_options(pod))
    for s in pod.spec.security_context.sysctls:
        cfg.linux.sysctls[s.name] = s.value
    return cfg


def resources(container: Any) -> cri.LinuxContainerResources:
    r = cri.LinuxContainerResources()
    req, lim = container.resources.requests, container.resources.limits
    cpu_req = quantity.milli(req["cpu"].value) if "cpu" in req else \
        (quantity.milli(lim["cpu"].value) if "cpu" in lim else 0)
    r.cpu_shares = max(MIN_SHARES, cpu_req * 1024 // 1000) if cpu_req else MIN_SHARES
    if "cpu" in lim:
        r.cpu_period = CPU_PERIOD
        r.cpu_quota = max(1000, quantity.milli(lim["cpu"].value) * CPU_PERIOD // 1000)
    if "memory" in lim:
        r.memory_limit_in_bytes = quantity.to_int(lim["memory"].value)
    return r


def container_config(pod: Any, launch: ContainerLaunch) -> cri.ContainerConfig:
    spec, meta = launch.spec, pod.metadata
    cfg = cri.ContainerConfig()
    cfg.metadata.name, cfg.metadata.attempt = spec.name, launch.attempt
    cfg.image.image = launch.image_ref or spec.image
    cfg.image.user_specified_image = spec.image
    cfg.command.extend(launch.command)
    cfg.args.extend(launch.args)
    cfg.working_dir = spec.working_dir
    for k, v in launch.env:
        cfg.envs.add(key=k, value=v)
    for m in launch.mounts:
        cfg.mounts.add(container_path=m.container_path, host_path=m.host_path,
                       readonly=m.readonly, propagation=_PROPAGATION.get(
                           m.propagation, cri.PROPAGATION_PRIVATE))
    cfg.labels[LABEL_POD_UID] = meta.uid
    cfg.labels[LABEL_POD_NAME] = meta.name
    cfg.labels[LABEL_POD_NAMESPACE] = meta.namespace
    cfg.labels[LABEL_CONTAINER_NAME] = spec.name
    cfg.annotations[ANN_RESTART_COUNT] = str(launch.restart_count)
    cfg.annotations[ANN_SPEC_HASH] = launch.spec_hash
    if launch.init:
        cfg.annotations[ANN_INIT] = "true"
    cfg.log_path = f"{spec.name}/{launch.attempt}.log"
    cfg.stdin, cfg.stdin_once, cfg.tty = spec.stdin, spec.stdin_once, spec.tty
    cfg.linux.resources.CopyFrom(resources(spec))
    sc = cfg.linux.security_context
    sc.namespace_options.CopyFrom(namespace_options(pod))
    if launch.target_id:  # an ephemeral container sees its target's processes
        sc.namespace_options.pid = cri.TARGET
        sc.namespace_options.target_id = launch.target_id
    psc, csc = pod.spec.security_context, spec.security_context
    user = csc.run_as_user if csc.HasField("run_as_user") else (
        psc.run_as_user if psc.HasField("run_as_user") else None)
    if user is not None:
        sc.run_as_user.value = user
    group = csc.run_as_group if csc.HasField("run_as_group") else (
        psc.run_as_group if psc.HasField("run_as_group") else None)
    if group is not None:
        sc.run_as_group.value = group
    sc.supplemental_groups.extend(psc.supplemental_groups)
    if csc.HasField("privileged"):
        sc.privileged = csc.privileged
    if csc.HasField("read_only_root_filesystem"):
        sc.readonly_rootfs = csc.read_only_root_filesystem
    if csc.HasField("allow_privilege_escalation"):
        sc.no_new_privs = not csc.allow_privilege_escalation
    sc.capabilities.add_capabilities.extend(csc.capabilities.add)
    sc.capabilities.drop_capabilities.extend(csc.capabilities.drop)
    return cfg


class CRIPodRuntime:
    """See the module docstring. Implements ``nodeagent.podruntime.PodRuntime``."""

    def __init__(self, runtime: Runtime, *, log_root: Path, dns_server: str = "",
                 cluster_domain: str = "cluster.local") -> None:
        self.cri = runtime
        self.log_root = log_root
        self.dns_server = dns_server
        self.cluster_domain = cluster_domain
        self._ips: dict[str, str] = {}
        self._final: dict[str, ContainerRecord] = {}
        self._started: dict[str, float] = {}
        self._sandbox_configs: dict[str, cri.PodSandboxConfig] = {}

    async def version(self) -> tuple[str, bool, str]:
        v = await self.cri.version()
        ready, _network, message = runtime_ready(await self.cri.status())
        return f"{v.runtime_name}://{v.runtime_version}", ready, message

    async def relist(self) -> dict[str, PodRecord]:
        sandboxes = await self.cri.list_pod_sandbox()
        containers = await self.cri.list_containers()
        pods: dict[str, dict[str, Any]] = {}
        live_ids = set()
        for sb in sandboxes:
            uid = sb.labels.get(LABEL_POD_UID)
            if not uid:
                continue
            live_ids.add(sb.id)
            ready = sb.state == cri.SANDBOX_READY
            ip = self._ips.get(sb.id)
            if ip is None and ready:
                try:
                    status = await self.cri.pod_sandbox_status(sb.id)
                    ip = status.network.ip
                    self._ips[sb.id] = ip
                except errors.NotFound:
                    continue
            entry = pods.setdefault(uid, {"sandboxes": [], "containers": [],
                                          "name": sb.metadata.name,
                                          "namespace": sb.metadata.namespace})
            entry["sandboxes"].append(SandboxRecord(
                id=sb.id, attempt=sb.metadata.attempt, ready=ready, ip=ip or "",
                created_at=_seconds(sb.created_at)))
        for c in containers:
            uid = c.labels.get(LABEL_POD_UID)
            if not uid:
                continue
            live_ids.add(c.id)
            rec = await self._container(c)
            if rec is None:
                continue
            pods.setdefault(uid, {"sandboxes": [], "containers": [], "name": "",
                                  "namespace": ""})["containers"].append(rec)
        for cache in (self._ips, self._final, self._started):
            for gone in [k for k in cache if k not in live_ids]:
                del cache[gone]
        return {uid: PodRecord(uid=uid, name=e["name"], namespace=e["namespace"],
                               sandboxes=tuple(e["sandboxes"]),
                               containers=tuple(e["containers"]))
                for uid, e in pods.items()}

    async def _container(self, c: cri.Container) -> ContainerRecord | None:
        final = self._final.get(c.id)
        if final is not None:
            return final
        state = _STATES.get(c.state, ContainerState.UNKNOWN)
        base: dict[str, Any] = {
            "id": c.id, "name": c.labels.get(LABEL_CONTAINER_NAME, c.metadata.name),
            "attempt": c.metadata.attempt, "state": state,
            "spec_hash": c.annotations.get(ANN_SPEC_HASH, ""),
            "init": c.annotations.get(ANN_INIT) == "true", "image": c.image.image,
            "image_ref": c.image_ref, "created_at": _seconds(c.created_at),
            "restart_count": int(c.annotations.get(ANN_RESTART_COUNT, "0") or 0),
        }
        if state is ContainerState.RUNNING and c.id in self._started:
            return ContainerRecord(**base, started_at=self._started[c.id])
        if state is ContainerState.CREATED:
            return ContainerRecord(**base)
        try:
            st = await self.cri.container_status(c.id)
        except errors.NotFound:
            return None
        state = _STATES.get(st.state, ContainerState.UNKNOWN)
        base["state"] = state
        rec = ContainerRecord(**base, exit_code=st.exit_code, reason=st.reason,
                              message=st.message, started_at=_seconds(st.started_at),
                              finished_at=_seconds(st.finished_at))
        if state is ContainerState.EXITED:
            self._final[c.id] = rec
        elif state is ContainerState.RUNNING:
            self._started[c.id] = rec.started_at
        return rec

    async def create_sandbox(self, pod: Any, *, attempt: int) -> SandboxRecord:
        cfg = sandbox_config(pod, attempt=attempt, log_root=self.log_root,
                             dns_server=self.dns_server, cluster_domain=self.cluster_domain)
        try:
            sandbox_id = await self.cri.run_pod_sandbox(cfg)
        except (errors.InternalError, errors.BadRequest) as e:
            raise StartError(e.message) from e
        status = await self.cri.pod_sandbox_status(sandbox_id)
        self._ips[sandbox_id] = status.network.ip
        self._sandbox_configs[pod.metadata.uid] = cfg
        return SandboxRecord(id=sandbox_id, attempt=attempt,
                             ready=status.state == cri.SANDBOX_READY, ip=status.network.ip,
                             created_at=_seconds(status.created_at))

    async def stop_sandbox(self, sandbox_id: str) -> None:
        await self.cri.stop_pod_sandbox(sandbox_id)

    async def remove_sandbox(self, sandbox_id: str) -> None:
        await self.cri.remove_pod_sandbox(sandbox_id)
        self._ips.pop(sandbox_id, None)

    async def ensure_image(self, image: str, *, policy: str,
                           on_pull: Callable[[], None] | None = None) -> str:
        present = await self.cri.image_status(image)
        if policy == "Never":
            if present is None:
                raise ImagePullError(f'image "{image}" is not present with pull policy of '
                                     "Never")
            return str(present.id)
        if present is not None and policy != "Always":
            return str(present.id)
        if on_pull is not None:
            on_pull()
        try:
            return await self.cri.pull_image(image)
        except (errors.InternalError, errors.NotFound, errors.BadRequest) as e:
            raise ImagePullError(f'failed to pull image "{image}": {e.message}') from e

    async def start_container(self, pod: Any, sandbox: SandboxRecord,
                              launch: ContainerLaunch) -> str:
        sb_cfg = self._sandbox_configs.get(pod.metadata.uid) or sandbox_config(
            pod, attempt=sandbox.attempt, log_root=self.log_root, dns_server=self.dns_server,
            cluster_domain=self.cluster_domain)
        cfg = container_config(pod, launch)
        try:
            cid = await self.cri.create_container(sandbox.id, cfg, sandbox_config=sb_cfg)
        except (errors.InternalError, errors.BadRequest, errors.NotFound) as e:
            raise StartError(e.message) from e
        try:
            await self.cri.start_container(cid)
        except (errors.InternalError, errors.BadRequest) as e:
            raise StartError(e.message) from e
        return cid

    async def stop_container(self, container_id: str, *, grace: int) -> None:
        await self.cri.stop_container(container_id, grace)

    async def remove_container(self, container_id: str) -> None:
        await self.cri.remove_container(container_id)
        self._final.pop(container_id, None)
        self._started.pop(container_id, None)

    async def exec_sync(self, container_id: str, command: list[str], *,
                        timeout: float) -> tuple[int, bytes, bytes]:
        r = await self.cri.exec_sync(container_id, command, timeout=timeout)
        return r.exit_code, r.stdout, r.stderr
