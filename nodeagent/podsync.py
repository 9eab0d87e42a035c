"""One pod's sync: plan, carry the plan out, report the truth.

``PodSyncer.sync(uid, pod, record)`` is what a pod worker runs for a key. It
never raises for a pod's own problems: an image that cannot be pulled, a bad
command, a missing ConfigMap key become reasons in the pod's status. Only a
runtime or API outage escapes (as ``Unavailable``), and the queue retries.

Lifecycle of a pod on this node::

    bound here --(first sync: add our finalizer)--> syncing
    syncing: plan -> kill / sandbox / start / remove -> status (written only
             when it changed)
    deletionTimestamp set --> stop containers (SIGTERM, SIGKILL after the
             grace period) -> remove them and the sandbox -> unmount volumes
             -> remove our finalizer (the object then goes)
    gone from the API (deleted while we were down, or never finalized)
             --> same clean-up, from what the runtime still holds

Contract: ``sync`` is idempotent; running it twice does no harm. A worker
handles one UID at a time (the work queue guarantees it).

Events (the kubelet's reasons, through ``shoal.events``; best effort, never
blocking): Pulling, Pulled, Failed (ErrImagePull, ImagePullBackOff, config and
start errors), BackOff (image pulls and crash loops), Created, Started, Killing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nodeagent import environment
from nodeagent.environment import ConfigError, PodFacts
from nodeagent.planning import PodActions, as_container, plan, spec_hash
from nodeagent.podruntime import ContainerLaunch, ImagePullError, PodRuntime, StartError
from nodeagent.podstatus import Reason, pod_status, same_status
from nodeagent.probing import ProbeManager
from nodeagent.restarts import RestartTracker, key
from nodeagent.runtimestate import ContainerState, PodRecord, SandboxRecord
from nodeagent.satokens import ServiceAccountTokens, TokenKey
from nodeagent.volumes import VolumeManager
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.events import EventRecorder

log = logging.getLogger(__name__)

FINALIZER = "shoal.dev/nodeagent"
# How soon to look again after acting (to confirm), or while config is missing.
CONFIRM_AFTER = 0.5
CONFIG_RETRY = 5.0
ORPHAN_GRACE = 2


class PodSyncer:
    def __init__(
        self,
        *,
        runtime: PodRuntime,
        client: AsyncClient,
        volumes: VolumeManager,
        probes: ProbeManager,
        node_name: str,
        host_ip: str,
        relist: Callable[[], Awaitable[dict[str, PodRecord]]] | None = None,
        clock: Callable[[], float] = time.time,
        restarts: RestartTracker | None = None,
        events: EventRecorder | None = None,
    ) -> None:
        self.runtime = runtime
        self.events = events
        self.client = client
        self.volumes = volumes
        self.probes = probes
        self.node_name = node_name
        self.host_ip = host_ip
        self.relist = relist or runtime.relist
        self.clock = clock
        self.restarts = restarts or RestartTracker()
        self.pulls = RestartTracker(initial=self.restarts.initial, cap=self.restarts.cap)
        self.failures: dict[str, dict[str, Reason]] = {}
        # Service-account tokens for the pods here, bound to each pod, rotated.
        config = getattr(client, "config", None)
        self.tokens = ServiceAccountTokens(request=self._request_token,
                                           ca_pem=getattr(config, "ca_pem", b""), clock=clock)

    def _event(self, pod: core_pb2.Pod, type_: str, reason: str, message: str) -> None:
        if self.events is not None:
            self.events.event(pod, type_, reason, message)

    # -- lookups for env and volumes -------------------------------------------

    async def _configmap(self, namespace: str, name: str) -> Any:
        try:
            return await self.client.get(core_pb2.ConfigMap, name, namespace=namespace)
        except errors.NotFound:
            return None

    async def _secret(self, namespace: str, name: str) -> Any:
        try:
            return await self.client.get(core_pb2.Secret, name, namespace=namespace)
        except errors.NotFound:
            return None

    async def _request_token(self, key: TokenKey) -> tuple[str, float]:
        issued = await self.client.create_token(
            key.service_account, namespace=key.namespace,
            audiences=[key.audience] if key.audience else [],
            expiration_seconds=key.expiration_seconds, pod=key.pod_name, pod_uid=key.pod_uid)
        return issued.token, float(issued.expiration_timestamp.seconds)

    # -- the sync ---------------------------------------------------------------

    async def sync(self, uid: str, pod: core_pb2.Pod | None, record: PodRecord | None
                   ) -> float | None:
        """Bring the runtime in line for one pod. Returns when to look again."""
        record = record or PodRecord(uid=uid)
        if pod is None:
            await self._clean_up(uid, record, grace=ORPHAN_GRACE)
            return None
        deleting = pod.metadata.HasField("deletion_timestamp")
        if not deleting and FINALIZER not in pod.metadata.finalizers:
            pod = await self._add_finalizer(pod)
        self.probes.sync_pod(pod, record)
        actions = plan(pod, record, probes=self.probes.view(uid), restarts=self.restarts,
                       now=self.clock())
        if deleting:
            for c in record.containers:
                if c.state is ContainerState.RUNNING:
                    self._event(pod, "Normal", "Killing", f"Stopping container {c.name}")
            await self._clean_up(uid, record, grace=self._grace(pod, deleting=True))
            await self._remove_finalizer(pod)
            return None
        for name, (reason, _) in actions.waiting.items():
            if reason == "CrashLoopBackOff":
                self._event(pod, "Warning", "BackOff", f"Back-off restarting failed container "
                            f"{name} in pod {pod.metadata.name}")
        requeue = await self._execute(pod, record, actions)
        fresh = (await self.relist()).get(uid, PodRecord(uid=uid))
        final = plan(pod, fresh, probes=self.probes.view(uid), restarts=self.restarts,
                     now=self.clock())
        self.probes.sync_pod(pod, fresh)
        await self._report(pod, fresh, final)
        if final.finished and (fresh.sandbox is None or not fresh.sandbox.ready):
            self.probes.forget(uid)
        times = [t for t in (requeue, final.requeue_after, actions.requeue_after)
                 if t is not None]
        if not final.idle:
            times.append(CONFIRM_AFTER)
        return min(times) if times else None

    def _grace(self, pod: core_pb2.Pod, *, deleting: bool) -> int:
        if deleting and pod.metadata.HasField("deletion_grace_period_seconds"):
            return int(pod.metadata.deletion_grace_period_seconds)
        if pod.spec.HasField("termination_grace_period_seconds"):
            return int(pod.spec.termination_grace_period_seconds)
        return 30

    async def _execute(self, pod: core_pb2.Pod, record: PodRecord, actions: PodActions
                       ) -> float | None:
        uid = pod.metadata.uid
        grace = self._grace(pod, deleting=False)
        if actions.kill_pod:
            await self._stop_all(record, grace=grace)
        for cid, why in actions.kill:
            log.info("pod %s/%s: killing %s: %s", pod.metadata.namespace, pod.metadata.name,
                     cid[:12], why)
            name = next((c.name for c in record.containers if c.id == cid), cid[:12])
            self._event(pod, "Normal", "Killing", f"Stopping container {name}: {why}")
            await self.runtime.stop_container(cid, grace=grace)
        for cid in actions.remove:
            await self.runtime.remove_container(cid)
        if actions.finished:
            return None
        sandbox = record.sandbox
        facts = PodFacts(pod_ip=sandbox.ip if sandbox else "", host_ip=self.host_ip)
        try:
            paths = await self.volumes.setup(pod, configmaps=self._configmap,
                                             secrets=self._secret, facts=facts,
                                             tokens=self.tokens)
        except ConfigError as e:
            self._fail_all(pod, ("CreateContainerConfigError", str(e)))
            self._event(pod, "Warning", "Failed", f"Error: {e}")
            return CONFIG_RETRY
        if actions.create_sandbox:
            for old in record.sandboxes:
                await self.runtime.stop_sandbox(old.id)
                await self.runtime.remove_sandbox(old.id)
            try:
                sandbox = await self.runtime.create_sandbox(pod, attempt=actions.sandbox_attempt)
            except StartError as e:
                self._fail_all(pod, ("CreatePodSandboxError", str(e)))
                return CONFIG_RETRY
            record = PodRecord(uid=uid, sandboxes=(sandbox,))
            facts = PodFacts(pod_ip=sandbox.ip, host_ip=self.host_ip)
        assert sandbox is not None
        retry: list[float] = []
        if actions.start_init:
            spec = next(c for c in pod.spec.init_containers if c.name == actions.start_init)
            retry += await self._launch(pod, sandbox, spec, record=record, init=True,
                                        paths=paths, facts=facts)
        for name in actions.start:
            spec = next(c for c in pod.spec.containers if c.name == name)
            retry += await self._launch(pod, sandbox, spec, record=record, init=False,
                                        paths=paths, facts=facts)
        for name in actions.start_ephemeral:
            eph = next(e for e in pod.spec.ephemeral_containers if e.name == name)
            target = record.latest(eph.target_container_name, init=False) \
                if eph.target_container_name else None
            retry += await self._launch(
                pod, sandbox, as_container(eph), record=record, init=False, paths=paths,
                facts=facts, target_id=target.id if target is not None
                and target.state is ContainerState.RUNNING else "")
        return min(retry) if retry else None

    def _fail_all(self, pod: core_pb2.Pod, reason: Reason) -> None:
        table = self.failures.setdefault(pod.metadata.uid, {})
        for c in [*pod.spec.init_containers, *pod.spec.containers]:
            table[c.name] = reason
        log.warning("pod %s/%s: %s: %s", pod.metadata.namespace, pod.metadata.name, *reason)

    async def _launch(self, pod: core_pb2.Pod, sandbox: SandboxRecord, spec: Any, *,
                      record: PodRecord, init: bool, paths: dict[str, Any],
                      facts: PodFacts, target_id: str = "") -> list[float]:
        uid, now = pod.metadata.uid, self.clock()
        table = self.failures.setdefault(uid, {})
        prev = record.latest(spec.name, init=init)
        image_key = key(uid, "image:" + spec.name)
        verdict = self.pulls.check(image_key, finished_at=0.0, now=now)
        if not verdict.go and table.get(spec.name, ("",))[0] in ("ErrImagePull",
                                                                  "ImagePullBackOff"):
            table[spec.name] = ("ImagePullBackOff", f'Back-off pulling image "{spec.image}"')
            self._event(pod, "Normal", "BackOff", f'Back-off pulling image "{spec.image}"')
            self._event(pod, "Warning", "Failed", "Error: ImagePullBackOff")
            return [verdict.wait]
        pulling: list[float] = []

        def on_pull() -> None:
            pulling.append(self.clock())
            self._event(pod, "Normal", "Pulling", f'Pulling image "{spec.image}"')

        try:
            image_ref = await self.runtime.ensure_image(spec.image,
                                                        policy=spec.image_pull_policy,
                                                        on_pull=on_pull)
        except ImagePullError as e:
            self.pulls.restarted(image_key, now=now)
            table[spec.name] = ("ErrImagePull", str(e))
            self._event(pod, "Warning", "Failed", str(e)[:1].upper() + str(e)[1:])
            self._event(pod, "Warning", "Failed", "Error: ErrImagePull")
            # Look again soon: the status then says ImagePullBackOff while it waits.
            return [min(CONFIRM_AFTER, self.pulls.delay(image_key) / 2)]
        self.pulls.forget(image_key)
        if pulling:
            self._event(pod, "Normal", "Pulled", f'Successfully pulled image "{spec.image}" '
                        f"in {self.clock() - pulling[0]:.3f}s")
        else:
            self._event(pod, "Normal", "Pulled",
                        f'Container image "{spec.image}" already present on machine')
        try:
            env = await environment.resolve_env(pod, spec, configmaps=self._configmap,
                                                secrets=self._secret, facts=facts)
            command, args = environment.command_line(spec, env)
            mounts = self.volumes.mounts(spec, paths)
        except ConfigError as e:
            table[spec.name] = ("CreateContainerConfigError", str(e))
            self._event(pod, "Warning", "Failed", f"Error: {e}")
            return [CONFIG_RETRY]
        launch = ContainerLaunch(
            spec=spec, attempt=prev.attempt + 1 if prev else 0, init=init, env=env,
            command=command, args=args, mounts=mounts, spec_hash=spec_hash(spec),
            restart_count=prev.restart_count + 1 if prev else 0, image_ref=image_ref,
            target_id=target_id)
        if prev is not None:
            self.restarts.restarted(key(uid, spec.name), now=now)
        try:
            await self.runtime.start_container(pod, sandbox, launch)
        except StartError as e:
            table[spec.name] = ("RunContainerError", str(e))
            self._event(pod, "Warning", "Failed", f"Error: {e}")
            return [CONFIRM_AFTER]
        table.pop(spec.name, None)
        self._event(pod, "Normal", "Created", f"Created container {spec.name}")
        self._event(pod, "Normal", "Started", f"Started container {spec.name}")
        return []

    async def _stop_all(self, record: PodRecord, *, grace: int) -> None:
        for c in record.containers:
            if c.state is ContainerState.RUNNING:
                await self.runtime.stop_container(c.id, grace=grace)
        for sb in record.sandboxes:
            await self.runtime.stop_sandbox(sb.id)

    async def _clean_up(self, uid: str, record: PodRecord, *, grace: int) -> None:
        """Stop and remove everything of the pod, then its volumes. Idempotent."""
        await self._stop_all(record, grace=grace)
        for c in record.containers:
            await self.runtime.remove_container(c.id)
        for sb in record.sandboxes:
            await self.runtime.remove_sandbox(sb.id)
        self.volumes.teardown(uid)
        self.tokens.forget(uid)
        self.probes.forget(uid)
        self.restarts.forget_pod(uid)
        self.pulls.forget_pod(uid)
        self.failures.pop(uid, None)

    # -- the API side -----------------------------------------------------------

    async def _add_finalizer(self, pod: core_pb2.Pod) -> core_pb2.Pod:
        for _ in range(5):
            pod.metadata.finalizers.append(FINALIZER)
            try:
                return await self.client.update(pod)
            except errors.Conflict:
                pod = await self.client.get(core_pb2.Pod, pod.metadata.name,
                                            namespace=pod.metadata.namespace)
                if FINALIZER in pod.metadata.finalizers:
                    return pod
        raise errors.Conflict(f"pod {pod.metadata.name}: could not add the node finalizer")

    async def _remove_finalizer(self, pod: core_pb2.Pod) -> None:
        for _ in range(5):
            if FINALIZER not in pod.metadata.finalizers:
                return
            pod.metadata.finalizers.remove(FINALIZER)
            try:
                await self.client.update(pod)
                log.info("pod %s/%s: stopped and cleaned up; released",
                         pod.metadata.namespace, pod.metadata.name)
                return
            except errors.NotFound:
                return
            except errors.Conflict:
                pod = await self.client.get(core_pb2.Pod, pod.metadata.name,
                                            namespace=pod.metadata.namespace)

    async def _report(self, pod: core_pb2.Pod, record: PodRecord, actions: PodActions) -> None:
        status = pod_status(
            pod, record, probes=self.probes.view(pod.metadata.uid), waiting=actions.waiting,
            failures=self.failures.get(pod.metadata.uid, {}), finished=actions.finished,
            failed=actions.failed, host_ip=self.host_ip, now=self.clock())
        if same_status(status, pod.status):
            return
        update = core_pb2.Pod()
        update.CopyFrom(pod)
        update.status.CopyFrom(status)
        try:
            await self.client.update_status(update)
        except errors.Conflict:
            fresh = await self.client.get(core_pb2.Pod, pod.metadata.name,
                                          namespace=pod.metadata.namespace)
            fresh.status.CopyFrom(status)
            await self.client.update_status(fresh)
        except errors.NotFound:
            pass
