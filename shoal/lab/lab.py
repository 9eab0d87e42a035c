"""``shoal lab``: a multi-node Shoal cluster on one machine, made and unmade.

Lifecycle of a lab directory (its ``state.json``, see :mod:`shoal.lab.state`)::

    (none|down) --up--> starting --every Node Ready--> up --down [--purge]--> down
                           |        + supervisor ready   |
                           | failure, Ctrl-C, crash     | stop-node / start-node,
                           v                            | partition / heal: the lab
                         failed --down--> down          | stays up (recorded in state);
                                                        | a daemon that dies is
                                                        | restarted by the supervisor

``up`` (see ``Lab.up``), in order, each stage waiting on a readiness signal:
  1. preflight: root, commands, kernel features, ports (all problems at once);
  2. network: bridge shoal0, per node a netns and a veth, the FORWARD accept
     chain when br_netfilter would filter bridged traffic;
  3. etcd (``/health``) and the registry (``/v2/``), started together, while
     the demo images are built;
  4. the apiserver (``/readyz``), after its PKI; admin.conf is copied out;
  5. a bootstrap token; every node joins (inside its netns) in parallel;
  6. every node agent starts in its netns with its own containerd
     (``/readyz``), whose pulls of docker.io and of the lab registry's own name
     go to the lab registry (``--registry-mirror``), where the demo images are;
  7. every Node is Ready in the API;
  8. the lab's supervisor (:mod:`shoal.lab.supervisor`) starts, in its own
     session, and says it is ready on a pipe; then the lab is ``up``.

Contract:

- Everything is recorded in the state file *before* it is made, so ``down``
  undoes a crashed or half-finished ``up``.
- ``up`` on a lab that is up says so and changes nothing; on a lab whose last
  ``up`` failed it refuses and points at ``down``.
- Once the lab is up, its supervisor restarts etcd, the apiserver, the
  registry or a node agent that dies (same command line, environment, netns
  and log; per-daemon back-off), and records each restart. Every command
  that changes the state then does so inside the state lock, on a fresh load.
- ``down`` is idempotent and never kills by name: first the supervisor (so
  nothing is restarted behind its back), then agents (SIGTERM), then each
  node's containerd through CRI (sandboxes removed, shims gone, mounts
  unmounted), then anything still mounted under the lab dir, then registry,
  apiserver and etcd by recorded PID and start time, then interfaces,
  namespaces, the bridge and the iptables chains. ``--purge`` also removes
  what the lab wrote in its directory.
- ``stop-node`` marks the node stopped (so the supervisor leaves it alone),
  then stops its agent and containerd, leaving its pods' containers running
  (their shims outlive containerd); the node's Lease then expires.
  ``start-node`` starts the agent again and clears the mark (the supervisor
  keeps it running from then on); the agent starts or adopts containerd;
  pods are adopted, not restarted.
- ``restore FILE`` stops the supervisor and every apiserver and etcd member,
  restores each member's data dir from the one snapshot (``etcd.old`` kept),
  and starts etcd, the apiservers and the supervisor again.
- ``partition A B`` drops traffic between two nodes, or a node and
  ``control-plane``, with rules in the nodes' own netns (chain
  SHOAL-LAB-PARTITION); ``heal`` removes them all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from nodeagent import serviceproxy
from nodeagent.containerd import (
    PIDFILE_NAME,
    ContainerdConfig,
    ContainerdProcess,
    mounts_under,
)
from shoal import bootstrap, errors, tokens
from shoal import config as configmod
from shoal.api.coordination.v1 import coordination_pb2
from shoal.api.core.v1 import core_pb2
from shoal.client import Client
from shoal.lab import ingress, meshhost, netsetup, preflight, restarting
from shoal.lab import supervisor as supervisormod
from shoal.lab.state import (
    DOWN,
    FAILED,
    STARTING,
    UP,
    ChainRecord,
    LabState,
    ProcessRecord,
    StateFile,
)
from shoal.lab.supervising import (
    StartError,
    Supervisor,
    alive,
    http_ok,
    log_tail,
    rss_bytes,
    start_time,
)
from shoal.lab.topology import (
    BRIDGE,
    DEMO_IMAGE,
    FORWARD_CHAIN,
    PARTITION_CHAIN,
    SANDBOX_IMAGE,
    ControlPlaneMember,
    Node,
    Topology,
    control_plane_members,
    endpoint,
    partition_rules,
    plan,
)

Say = Callable[[str], None]

ETCD, APISERVER, REGISTRY = bootstrap.ETCD, bootstrap.APISERVER, bootstrap.REGISTRY
SUPERVISOR = supervisormod.NAME
# With --mesh: the lab's Zipkin v2 collector (shoal.lab.zipkin) on the bridge address.
ZIPKIN, ZIPKIN_PORT = "zipkin", 9411
CONTROL_PLANE_PROCESSES = (REGISTRY, APISERVER, ETCD)  # stop order
PARTITION_JUMPS = ("INPUT", "OUTPUT", "FORWARD")
LEASE_NAMESPACE = "kube-node-lease"
# Node agents renew their Lease this often (kube's 10 s assumes a 40 s grace period;
# e2e labs shorten the grace period to a few seconds).
LEASE_RENEW_INTERVAL = 2.0
# The mesh's telemetry after Istio's install profiles: (access log, percent of
# traces sampled). "demo", the lab's default, logs every request and samples
# every trace (the e2e tests read both); "default" is Istio's default profile.
MESH_PROFILES: dict[str, tuple[bool, float]] = {"demo": (True, 100.0), "default": (False, 1.0)}
TOKEN_TTL = dt.timedelta(hours=1)
START_TIMEOUT = 60.0
READY_TIMEOUT = 120.0


class LabError(errors.ShoalError):
    """The lab cannot do what was asked; the message says what to do instead."""

    reason = "LabFailed"


def agent_key(node: Node) -> str:
    return f"nodeagent/{node.name}"


def containerd_key(node: Node) -> str:
    return f"containerd/{node.name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_ready(node: core_pb2.Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n else "-"


def _container_record(node: Node) -> ProcessRecord | None:
    """The node's containerd, from the agent's pidfile, if it is running and is
    ours (its command line names our config file)."""
    pidfile = node.containerd_dir / "state" / PIDFILE_NAME
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    config = str(node.containerd_dir / "root" / "config.toml").encode()
    started = start_time(pid)
    if started is None or config not in argv:
        return None
    return ProcessRecord(name=containerd_key(node), pid=pid, start_time=started,
                         argv=tuple(a.decode(errors="replace") for a in argv if a),
                         log=str(node.containerd_dir / "state" / "containerd.log"))


class Lab:
    """One lab directory. Commands return an exit code and report through ``say``."""

    def __init__(self, lab_dir: Path, *, say: Say, python: str = sys.executable,
                 host: preflight.Host | None = None) -> None:
        self.lab_dir = lab_dir.absolute()
        self.say = say
        self.python = python
        self.host = host or preflight.SystemHost()
        self.file = StateFile(self.lab_dir / "state.json")
        self.sup = Supervisor()
        # Extra `shoal-apiserver serve` flags for this up (e.g. shorter timeouts).
        self.apiserver_args: tuple[str, ...] = ()
        self.mesh = False
        self.mesh_profile = "demo"  # a key of MESH_PROFILES
        self.mesh_hosts = 0  # `up --mesh-hosts N`
        self.control_planes = 1
        self._control_plane: bootstrap.Spec | None = None
        # Every member of the control plane with its spec (member 1's is _control_plane).
        self._members: list[tuple[ControlPlaneMember, bootstrap.Spec]] = []
        self._t0 = time.monotonic()

    # -- helpers -----------------------------------------------------------------

    def _topology(self, state: LabState) -> Topology:
        if not state.nodes:
            return Topology(lab_dir=self.lab_dir, nodes=())
        return plan(nodes=len(state.nodes), lab_dir=self.lab_dir)

    def _loaded(self) -> tuple[LabState, Topology]:
        state = self.file.load()
        if state is None:
            raise LabError(f"no lab in {self.lab_dir} (start one: shoal lab up --dir "
                           f"{self.lab_dir})")
        return state, self._topology(state)

    def _up_only(self) -> tuple[LabState, Topology]:
        state, topo = self._loaded()
        if state.phase != UP:
            raise LabError(f"the lab in {self.lab_dir} is {state.phase}, not up")
        return state, topo

    def _progress(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self._t0:5.1f}s] {text}")

    def _mark(self, state: LabState, stage: str) -> None:
        state.timings[stage] = round(time.monotonic() - self._t0, 3)
        self.file.save(state)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PATH", "")
        for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
            if extra not in path.split(os.pathsep):
                path = f"{path}{os.pathsep}{extra}" if path else extra
        env["PATH"] = path
        env.pop("NOTIFY_SOCKET", None)  # the lab's daemons tell the lab, not systemd
        return env

    def _spawn(self, state: LabState, name: str, argv: list[str], *, log: Path,
               netns: str | None = None, supervised: bool = False,
               pass_fds: tuple[int, ...] = ()) -> ProcessRecord:
        # cwd "/" and python -P: the lab dir holds a data dir named "apiserver",
        # which must never shadow the package of that name.
        record = self.sup.spawn(name, argv, log=log, netns=netns, cwd=Path("/"),
                                env=self._env(), supervised=supervised, pass_fds=pass_fds)
        state.processes[name] = record
        self.file.save(state)
        return record

    def _client(self, *, timeout: float = 10.0) -> Client:
        return Client(configmod.load(self.lab_dir / "admin.conf"), timeout=timeout)

    # -- up ----------------------------------------------------------------------

    def up(self, *, nodes: int, apiserver_args: tuple[str, ...] = (), mesh: bool = False,
           control_planes: int = 1, mesh_hosts: int = 0, mesh_profile: str = "demo") -> int:
        if mesh_profile not in MESH_PROFILES:
            raise errors.BadRequest(f"--mesh-profile {mesh_profile!r}: want one of "
                                    f"{', '.join(MESH_PROFILES)}")
        if mesh_hosts and not mesh:
            raise errors.BadRequest("--mesh-hosts needs --mesh (a mesh-only host joins "
                                    "the mesh)")
        if not 0 <= mesh_hosts <= meshhost.MAX_HOSTS:
            raise errors.BadRequest(f"--mesh-hosts {mesh_hosts}: must be 0.."
                                    f"{meshhost.MAX_HOSTS}")
        self.mesh_hosts = mesh_hosts
        topo = plan(nodes=nodes, lab_dir=self.lab_dir)
        control_plane_members(topo, control_planes)  # a wrong count is refused first
        self.apiserver_args = apiserver_args
        self.mesh = mesh
        self.mesh_profile = mesh_profile
        self.control_planes = control_planes
        existing = self.file.load()
        if existing is not None and existing.phase == UP:
            return self._already_up(existing)
        if existing is not None and existing.phase in (STARTING, FAILED):
            raise LabError(
                f"a previous `shoal lab up` in {self.lab_dir} did not finish "
                f"({existing.phase}{': ' + existing.error if existing.error else ''}); "
                f"clean it up first: shoal lab down --dir {self.lab_dir}")
        problems = preflight.check(self.host, nodes=nodes)
        for p in problems:
            self.say(("warning: " if not p.fatal else "missing: ") + str(p))
        if any(p.fatal for p in problems):
            raise LabError("preflight failed; fix the problems above and run "
                           "`shoal lab up` again")
        self._refuse_foreign(topo)
        self._clear_old_data(topo, existing)
        state = LabState(lab_dir=str(self.lab_dir), nodes=[n.name for n in topo.nodes],
                         control_planes=control_planes)
        self.lab_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the CA key
        self.file.save(state)
        self._t0 = time.monotonic()
        try:
            self._up(state, topo)
        except BaseException as e:
            state.phase = FAILED
            state.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.file.save(state)
            if isinstance(e, KeyboardInterrupt):
                self.say(f"interrupted; clean up with: shoal lab down --dir {self.lab_dir}")
                raise
            if not isinstance(e, Exception):
                raise
            what = str(e) if isinstance(e, errors.ShoalError | OSError) else \
                f"{type(e).__name__}: {e}"
            raise LabError(f"{what}\nWhat was made is recorded in {self.file.path}; clean "
                           f"it up with: shoal lab down --dir {self.lab_dir}") from e
        return 0

    def _already_up(self, state: LabState) -> int:
        # containerd is the agents' to keep running (they restart it); not checked here.
        sup = state.processes.get(SUPERVISOR)
        supervised = sup is not None and alive(sup)
        dead = [r.name for r in state.processes.values()
                if not r.name.startswith("containerd/") and not alive(r)
                and r.name.split("/", 1)[-1] not in state.stopped_nodes]
        if dead and not supervised:
            raise LabError(f"the lab in {self.lab_dir} is recorded as up, but "
                           f"{', '.join(dead)} not running; clean up with `shoal lab down "
                           f"--dir {self.lab_dir}`, then `shoal lab up` again")
        self.say(f"The lab in {self.lab_dir} is already up ({len(state.nodes)} nodes); "
                 "nothing changed.")
        if dead:
            self.say(f"  {', '.join(dead)} not running: the supervisor is restarting "
                     f"{'them' if len(dead) > 1 else 'it'} (shoal lab status)")
        self.say(f"  export SHOAL_CONFIG={self.lab_dir / 'admin.conf'}")
        return 0

    def _refuse_foreign(self, topo: Topology) -> None:
        owner = netsetup.bridge_owner(topo.bridge)
        if owner is not None and owner != str(self.lab_dir):
            where = f"the lab in {owner}" if owner else "something other than a lab"
            fix = f"shoal lab down --dir {owner}" if owner else f"ip link del {topo.bridge}"
            raise LabError(f"bridge {topo.bridge} already exists, made by {where}; one lab "
                           f"per machine. Remove it first: {fix}")
        if owner is None:
            strays = [n.netns for n in topo.nodes if netsetup.netns_exists(n.netns)]
            if strays:
                raise LabError(f"network namespaces {', '.join(strays)} exist but no lab "
                               f"bridge does; remove them first: ip netns del {strays[0]}")

    def _clear_old_data(self, topo: Topology, existing: LabState | None) -> None:
        """A new lab starts clean: data a finished lab left here is removed."""
        if existing is None and not any(p.exists() for p in topo.owned_entries):
            return
        left = mounts_under(self.lab_dir) if self.lab_dir.exists() else []
        if left:
            raise LabError(f"{left[0]} is still mounted; run `shoal lab down --dir "
                           f"{self.lab_dir}` first")
        for entry in topo.owned_entries:
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()

    def _up(self, state: LabState, topo: Topology) -> None:
        self._progress(f"bringing up a {len(topo.nodes)}-node lab in {self.lab_dir}")
        self._network(state, topo)
        self._mark(state, "network")
        self._progress(f"network: bridge {topo.bridge} {topo.bridge_address}, "
                       f"{len(topo.nodes)} node namespaces")

        etcd = self._start_etcd(state, topo)
        registry = self._start_registry(state, topo)
        built = bootstrap.build_images(topo.images_dir)
        for member, spec in self._members:
            assert spec.control_plane is not None
            url = f"{spec.control_plane.etcd_client_url}/health"
            self.sup.wait_until(f"{member.etcd_process} /health", partial(http_ok, url),
                                timeout=START_TIMEOUT, watch=etcd)
        self._mark(state, "etcd")
        self._progress(f"etcd ready on {state.etcd_endpoint}" if len(etcd) == 1 else
                       f"etcd cluster of {len(etcd)} members ready")

        api = self._start_apiserver(state, topo)
        self.sup.wait_until("registry /v2/", lambda: http_ok(f"http://{topo.registry}/v2/"),
                            timeout=START_TIMEOUT, watch=[registry])
        for ref in built:
            bootstrap.push_image(ref.archive, name=ref.name, registry=topo.registry)
        self._mark(state, "registry")
        self._progress(f"registry ready on {topo.registry}; pushed {DEMO_IMAGE} and "
                       f"{SANDBOX_IMAGE} to it")
        for (member, spec), record in zip(self._members, api, strict=True):
            self.sup.wait_until(f"{member.apiserver_process} /readyz", partial(
                http_ok, bootstrap.command(spec, APISERVER, python=self.python).ready_url),
                timeout=START_TIMEOUT, watch=[record])
        self._mark(state, "apiserver")
        self._progress(f"apiserver ready on {topo.api_server}" if len(api) == 1 else
                       f"{len(api)} apiservers ready on "
                       f"{', '.join(m.api_server for m, _ in self._members)}")

        self._join(state, topo)
        self._mark(state, "joined")
        self._progress(f"{len(topo.nodes)} nodes joined (certificates issued)")

        agents = {n.name: self._spawn(
            state, agent_key(n), self._agent_argv(n, topo), netns=n.netns,
            log=topo.logs_dir / f"{n.name}.log", supervised=True) for n in topo.nodes}
        for n in topo.nodes:
            self._wait_agent(n, agents[n.name])
            cd = _container_record(n)
            if cd is not None:
                state.processes[cd.name] = cd
                self.file.save(state)
        self._mark(state, "agents")
        self._progress(f"node agents and containerds running; docker.io pulls come from "
                       f"the lab registry {topo.registry}")

        with self._client() as client:
            self.sup.wait_until("every Node Ready", lambda: self._all_ready(client, topo),
                                timeout=READY_TIMEOUT, watch=list(agents.values()),
                                interval=0.2)
        self._mark(state, "ready")
        took = state.timings["ready"]
        self._progress(f"all {len(topo.nodes)} nodes Ready")
        if self.mesh:
            self._start_zipkin(state, topo)
            self._start_meshagents(state, topo)
            for i in range(1, self.mesh_hosts + 1):
                h = meshhost.add(self, state, topo, i, timeout=START_TIMEOUT)
                self._progress(f"mesh-only host {h.name} on {h.ip}: a meshagent and "
                               f"busybox httpd :{meshhost.APP_PORT}, no node agent")
            self._start_ingress(state, topo)
        sup = self._start_supervisor(state, topo)
        with self.file.locked():
            state.phase = UP
            self.file.save(state)
        self._progress(f"supervisor running (pid {sup.pid}); it restarts any daemon that "
                       f"dies, see {sup.log}")
        self.say("")
        self.say(f"The lab is up: {len(topo.nodes)} nodes Ready in {took:.1f} s. Try:")
        self.say("")
        self.say(f"  export SHOAL_CONFIG={topo.admin_config}")
        self.say("  shoal get nodes")
        self.say("  shoal lab status")
        self.say(f"  shoal lab stop-node {topo.nodes[-1].name}      # its Lease expires; "
                 f"start-node brings it back")
        if len(topo.nodes) > 1:
            self.say(f"  shoal lab partition {topo.nodes[0].name} {topo.nodes[1].name}    "
                     "# drop traffic between them; `shoal lab heal` undoes it")
        self.say(f"  shoal lab down                  # remove everything (--dir "
                 f"{self.lab_dir})")
        self.say(f"Pods may name {DEMO_IMAGE} (nodes pull docker.io/* from the lab "
                 f"registry {topo.registry}).")

    def _wait_agent(self, n: Node, agent: ProcessRecord) -> None:
        url = f"http://{n.agent_metrics}/readyz"
        self.sup.wait_until(f"{n.name} agent /readyz", lambda: http_ok(url),
                            timeout=START_TIMEOUT, watch=[agent])

    def _all_ready(self, client: Client, topo: Topology) -> bool:
        try:
            listed = client.list(core_pb2.Node)
        except errors.ShoalError:
            return False
        ready = {n.metadata.name for n in listed.items if _node_ready(n)}
        return all(n.name in ready for n in topo.nodes)

    def _network(self, state: LabState, topo: Topology) -> None:
        state.bridge = topo.bridge
        if netsetup.br_netfilter_active():
            state.add_chain(ChainRecord(chain=FORWARD_CHAIN, jumps_from=("FORWARD",)))
        for n in topo.nodes:
            state.add_unique(state.netns, n.netns)
            state.add_unique(state.interfaces, n.host_veth)
        self.file.save(state)
        netsetup.ensure_bridge(topo.bridge, address=topo.bridge_address,
                               owner=str(self.lab_dir))
        for chain in state.chains:
            netsetup.ensure_chain(chain.chain, rules=netsetup.forward_rules(topo.bridge),
                                  jumps_from=chain.jumps_from)
        for member in control_plane_members(topo, self.control_planes)[1:]:
            prefix = topo.bridge_address.rsplit("/", 1)[1]
            netsetup.ensure_address(topo.bridge, f"{member.address}/{prefix}")
        for n in topo.nodes:
            netsetup.ensure_netns(n.netns)
            netsetup.ensure_node_link(n, bridge=topo.bridge)

    # Every component starts with the command and the files of shoal.bootstrap, the
    # same as under systemd (deploy/); only the supervision is the lab's own.

    def _start(self, state: LabState, spec: bootstrap.Spec, component: str, *, name: str,
               log: Path, netns: str | None = None) -> ProcessRecord:
        bootstrap.render(spec, component)
        argv = list(bootstrap.command(spec, component, python=self.python).argv)
        return self._spawn(state, name, argv, log=log, netns=netns, supervised=True)

    def _cp(self) -> bootstrap.Spec:
        if self._control_plane is None:
            raise LabError("the control plane's ports are chosen when etcd starts")
        return self._control_plane

    def _node_spec(self, n: Node, topo: Topology) -> bootstrap.Spec:
        """A lab node: its own containerd is run by its node agent."""
        return bootstrap.Spec(node=bootstrap.NodeSpec(
            name=n.name, ip=n.ip, data_dir=n.data_dir, api_server=topo.api_server,
            more_api_servers=tuple(m.api_server for m in control_plane_members(
                topo, self.control_planes)[1:]),
            registry=topo.registry, containerd=bootstrap.BY_AGENT, mesh=self.mesh,
            # Often enough for the shortened --node-monitor-grace-period labs use.
            lease_renew_interval=LEASE_RENEW_INTERVAL, sandbox_image=SANDBOX_IMAGE,
            zipkin_endpoint=zipkin_url(topo) if self.mesh else "",
            access_log=self.mesh and MESH_PROFILES[self.mesh_profile][0],
            trace_sampling=MESH_PROFILES[self.mesh_profile][1]))

    def _member_specs(self, topo: Topology) -> list[tuple[ControlPlaneMember, bootstrap.Spec]]:
        """One bootstrap spec per control-plane member (one member: the single
        control plane of old, unchanged)."""
        members = control_plane_members(topo, self.control_planes)
        ports = {m.index: (_free_port(), _free_port()) for m in members}
        several = len(members) > 1
        cluster = tuple(f"{m.etcd_name}=http://127.0.0.1:{ports[m.index][1]}" for m in members)
        clients = [f"127.0.0.1:{ports[m.index][0]}" for m in members]
        apis = tuple(m.api_server for m in members)
        specs = []
        for i, m in enumerate(members):
            specs.append((m, bootstrap.Spec(control_plane=bootstrap.ControlPlane(
                address=m.address, data_dir=m.data_dir, etcd_client_port=ports[m.index][0],
                etcd_peer_port=ports[m.index][1], etcd_name=m.etcd_name,
                apiserver_args=self.apiserver_args, apiserver_metrics=m.metrics,
                etcd_initial_cluster=cluster if several else (),
                etcd_servers=(clients[i], *clients[:i], *clients[i + 1:]) if several else (),
                api_servers=apis if several else (),
                pki_from=str(topo.apiserver_dir) if m.index > 1 else "",
                runs_registry=m.index == 1))))
        return specs

    def _start_etcd(self, state: LabState, topo: Topology) -> list[ProcessRecord]:
        self._members = self._member_specs(topo)
        self._control_plane = self._members[0][1]
        for member, spec in self._members:
            bootstrap.save(spec, member.bootstrap_spec)
        assert self._control_plane.control_plane is not None
        state.etcd_endpoint = self._control_plane.control_plane.etcd_endpoint
        return [self._start(state, spec, ETCD, name=member.etcd_process,
                            log=topo.logs_dir / f"{member.etcd_process.replace('/', '-')}.log")
                for member, spec in self._members]

    def _start_registry(self, state: LabState, topo: Topology) -> ProcessRecord:
        state.registry = topo.registry
        return self._start(state, self._cp(), REGISTRY, name=REGISTRY,
                           log=topo.logs_dir / "registry.log")

    def _start_apiserver(self, state: LabState, topo: Topology) -> list[ProcessRecord]:
        # In order: the first member makes the PKI the others copy (pki_from).
        return [self._start(state, spec, APISERVER, name=member.apiserver_process,
                            log=topo.logs_dir / f"{member.apiserver_process.replace('/', '-')}.log")
                for member, spec in self._members]

    def _start_supervisor(self, state: LabState, topo: Topology) -> ProcessRecord:
        """Start the supervisor and wait for its ``ready`` on a pipe. It is
        spawned and recorded inside the state lock, so its first look at the
        state finds itself recorded; until the phase is up it only watches."""
        ready_r, ready_w = os.pipe()
        try:
            argv = [self.python, "-P", "-m", "shoal.lab.supervisor", "--dir",
                    str(self.lab_dir), "--ready-fd", str(ready_w)]
            with self.file.locked():
                record = self._spawn(state, SUPERVISOR, argv, pass_fds=(ready_w,),
                                     log=topo.logs_dir / "supervisor.log")
            os.close(ready_w)
            ready_w = -1
            said = b""
            deadline = time.monotonic() + START_TIMEOUT
            while b"\n" not in said:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                    raise StartError(f"supervisor: not ready after {START_TIMEOUT:g}s")
                chunk = os.read(ready_r, 64)
                if not chunk:
                    code = self.sup.exited(record)
                    raise StartError(f"supervisor exited ({code}) before it was ready; "
                                     f"{record.log}:\n{log_tail(record)}")
                said += chunk
            return record
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)

    def _join(self, state: LabState, topo: Topology) -> None:
        token = tokens.generate()
        cfg = configmod.load(topo.admin_config)
        with Client(cfg, timeout=10.0) as client:
            client.create(tokens.to_secret(token, ttl=TOKEN_TTL, description="shoal lab"))
        ca_hash = tokens.ca_cert_hash(cfg.ca_pem)
        joins = []
        for n in topo.nodes:
            spec = self._node_spec(n, topo)
            assert spec.node is not None
            bootstrap.save(spec, n.bootstrap_spec)
            argv = list(bootstrap.join_command(spec.node, token=str(token),
                                               ca_cert_hash=ca_hash, python=self.python))
            joins.append(self._spawn(state, f"join/{n.name}", argv, netns=n.netns,
                                     log=topo.logs_dir / f"{n.name}-join.log"))
        for record in joins:
            if not self.sup.wait_exit(record, START_TIMEOUT):
                self.sup.stop(record)
                raise LabError(f"{record.name} did not finish in {START_TIMEOUT:g}s; "
                               f"see {record.log}")
            code = self.sup.exited(record)
            if code != 0:
                raise LabError(f"{record.name} failed ({code}); see {record.log}")
            del state.processes[record.name]  # done: nothing left to stop
            self.file.save(state)

    def _start_zipkin(self, state: LabState, topo: Topology) -> None:
        """With --mesh: the Zipkin collector the meshagents send spans to, on the
        bridge address (the host and the nodes reach it; nothing outside)."""
        argv = [self.python, "-P", "-m", "shoal.lab.zipkin", "--listen",
                f"{topo.gateway}:{ZIPKIN_PORT}"]
        record = self._spawn(state, ZIPKIN, argv, log=topo.logs_dir / "zipkin.log",
                             supervised=True)
        self.sup.wait_until("zipkin /health", partial(http_ok, f"{zipkin_url(topo)}/health"),
                            timeout=START_TIMEOUT, watch=[record])
        self._progress(f"zipkin collector on {zipkin_url(topo)} (spans: GET "
                       f"{zipkin_url(topo)}/api/v2/traces)")

    def _start_meshagents(self, state: LabState, topo: Topology) -> None:
        """Opt-in (``up --mesh``): a capturing meshagent in every node's netns,
        supervised; it removes its rules when stopped (``down``)."""
        records = {}
        for n in topo.nodes:
            records[n.name] = self._start(state, self._node_spec(n, topo), bootstrap.MESHAGENT,
                                          name=f"meshagent/{n.name}", netns=n.netns,
                                          log=topo.logs_dir / f"{n.name}-meshagent.log")
        for n in topo.nodes:
            url = bootstrap.command(self._node_spec(n, topo), bootstrap.MESHAGENT,
                                    python=self.python).ready_url
            self.sup.wait_until(f"meshagent/{n.name} /readyz", partial(http_ok, url),
                                timeout=START_TIMEOUT, watch=[records[n.name]])
        self._progress(f"meshagents capturing pods' traffic on {len(topo.nodes)} nodes")

    def _start_ingress(self, state: LabState, topo: Topology) -> None:
        """With --mesh: the ingress gateway on the first node (shoal.lab.ingress)."""
        n = topo.nodes[0]
        with self._client(timeout=30.0) as client:
            ip = ingress.ensure(client, n.name, timeout=START_TIMEOUT)
        ingress.route_to(ip, n.ip)
        node = self._node_spec(n, topo).node
        assert node is not None
        zipkin = zipkin_url(topo) if ZIPKIN in state.processes else ""
        record = self._spawn(state, ingress.PROCESS, ingress.argv(
            python=self.python, node=n.name, node_config=node.node_config, zipkin=zipkin,
            sampling=node.trace_sampling),
            log=topo.logs_dir / "ingressgateway.log", netns=ingress.pod_netns(ip),
            supervised=True)
        self.sup.wait_until(f"{ingress.PROCESS} /readyz",
                            partial(http_ok, f"http://{ip}:{ingress.METRICS_PORT}/readyz"),
                            timeout=START_TIMEOUT, watch=[record])
        self._progress(f"ingress gateway {ingress.NAMESPACE}/{ingress.NAME} on {n.name}: "
                       f"the listeners of Gateways selecting istio=ingressgateway on {ip}, "
                       f"routed from the host")

    def add_mesh_host(self) -> int:
        """``lab meshhost add``: one more mesh-only host (meshagent.meshhost)."""
        state, topo = self._up_only()
        if not any(name.startswith("meshagent/node-") for name in state.processes):
            raise LabError("the lab runs no meshagents; bring it up with --mesh")
        with self.file.locked():
            state = self.file.load() or state
            have = {h.index for h in meshhost.hosts_in(state, self.lab_dir)}
            index = next(i for i in range(1, meshhost.MAX_HOSTS + 2) if i not in have)
            h = meshhost.add(self, state, topo, index, timeout=START_TIMEOUT)
        self.say(f"mesh-only host {h.name} on {h.ip}: a meshagent and busybox httpd "
                 f":{meshhost.APP_PORT} (as nobody). Put it in the mesh with a WorkloadEntry "
                 f"labelled shoal.dev/mesh-host: {h.name}, address {h.ip}.")
        return 0

    def _agent_argv(self, n: Node, topo: Topology) -> list[str]:
        return list(bootstrap.command(self._node_spec(n, topo), bootstrap.NODEAGENT,
                                      python=self.python).argv)

    # -- down --------------------------------------------------------------------

    def down(self, *, purge: bool = False) -> int:
        state = self.file.load()
        if state is None:
            topo = Topology(lab_dir=self.lab_dir, nodes=())
            if netsetup.bridge_owner(BRIDGE) == str(self.lab_dir):
                netsetup.remove_link(BRIDGE)
            self.say(f"No lab in {self.lab_dir}: nothing to stop.")
            if purge:
                self._purge(topo)
            return 0
        sup = state.processes.get(SUPERVISOR)
        if sup is not None:  # first: nothing may be restarted while the lab comes down
            if alive(sup):
                self._progress(f"stopping {SUPERVISOR} (pid {sup.pid})")
            self.sup.stop(sup, grace=10.0)
        with self.file.locked():
            return self._down(purge=purge)

    def _down(self, *, purge: bool) -> int:
        # Loaded again, in the lock: the supervisor may have restarted a daemon
        # (and recorded it) before it stopped.
        state = self.file.load()
        if state is None:
            self.say(f"No lab in {self.lab_dir}: nothing to stop.")
            return 0
        topo = self._topology(state)
        problems: list[str] = []
        agents = [r for r in state.processes.values() if r.name.startswith("nodeagent/")]
        for record in agents:
            if alive(record):
                self._progress(f"stopping {record.name} (pid {record.pid})")
            self.sup.stop(record, grace=20.0)
        meshagents = [r for r in state.processes.values() if r.name.startswith("meshagent/")]
        for record in meshagents:  # they remove their capture rules as they stop
            if alive(record):
                self._progress(f"stopping {record.name} (pid {record.pid})")
            self.sup.stop(record, grace=5.0)
        if meshagents:  # and what a crashed one left: `shoal-meshagent cleanup`
            problems += self._mesh_cleanup(state)
        for chain in [c for c in state.chains if c.netns is not None]:
            netsetup.remove_chain(chain.chain, jumps_from=chain.jumps_from, netns=chain.netns)
        state.chains = [c for c in state.chains if c.netns is None]
        for ns in state.netns:  # the agents' ClusterIP rules (they leave them on stop)
            if Path(f"/var/run/netns/{ns}").exists():
                problems += serviceproxy.cleanup(netns=ns)
        state.partitions = []
        self.file.save(state)
        if state.phase != DOWN:  # a finished `down` left no containerd state behind
            problems += asyncio.run(self._clean_containerds(topo))
        for point in mounts_under(self.lab_dir) if self.lab_dir.exists() else []:
            done = _umount(point)
            if done:
                problems.append(done)
        for name in CONTROL_PLANE_PROCESSES:
            daemon = state.processes.get(name)
            if daemon is not None:
                if alive(daemon):
                    self._progress(f"stopping {name} (pid {daemon.pid})")
                self.sup.stop(daemon)
        for other in state.processes.values():  # anything else recorded, by its PID
            if alive(other):
                self._progress(f"stopping {other.name} (pid {other.pid})")
                self.sup.stop(other, grace=5.0)
        for iface in state.interfaces:
            netsetup.remove_link(iface)
        for ns in state.netns:
            netsetup.remove_netns(ns)
        if state.bridge and netsetup.bridge_owner(state.bridge) in (str(self.lab_dir), ""):
            netsetup.remove_link(state.bridge)
        for chain in state.chains:
            netsetup.remove_chain(chain.chain, jumps_from=chain.jumps_from, netns=chain.netns)
        problems += self._leftovers(state)
        state.stopped_nodes = []
        if problems:
            state.error = f"down left {len(problems)} thing(s) behind: {problems[0]}"
        else:
            state.phase, state.error = DOWN, ""
        self.file.save(state)
        if purge:
            self._purge(topo)
        if problems:
            for p in problems:
                self.say(f"left behind: {p}")
            return 1
        self._progress(f"the lab in {self.lab_dir} is down; nothing of it is left running"
                       + (" and its files are removed" if purge else
                          " (logs and data kept; --purge removes them)"))
        return 0

    def _mesh_cleanup(self, state: LabState) -> list[str]:
        problems = []
        for ns in state.netns:
            if not Path(f"/var/run/netns/{ns}").exists():
                continue
            done = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", self.python, "-P",
                                   "-m", "meshagent.main", "cleanup"], capture_output=True,
                                  text=True, check=False, env=self._env(), timeout=60)
            if done.returncode != 0:
                problems.append(f"mesh capture rules in {ns}: {done.stderr.strip()}")
        return problems

    async def _clean_containerds(self, topo: Topology) -> list[str]:
        async def one(n: Node) -> list[str]:
            if not (n.containerd_dir / "root").exists():
                return []
            netns = n.netns if netsetup.netns_exists(n.netns) else None
            cd = ContainerdProcess(self._containerd_config(n, topo), netns=netns,
                                   log_file=topo.logs_dir / f"{n.name}-containerd-down.log")
            try:
                await cd.start()
            except errors.ShoalError as e:
                # Not startable (e.g. corrupt state): still remove shims and mounts.
                report = await cd.cleanup()
                return [f"{n.name}: containerd would not start for clean-up: {e}",
                        *report.errors]
            report = await cd.cleanup()
            removed = len(report.sandboxes_removed)
            self._progress(f"{n.name}: containerd stopped, {removed} sandbox"
                           f"{'es' if removed != 1 else ''} removed")
            return [f"{n.name}: {e}" for e in report.errors]

        results = await asyncio.gather(*(one(n) for n in topo.nodes))
        return [p for r in results for p in r]

    def _containerd_config(self, n: Node, topo: Topology) -> ContainerdConfig:
        # What the agent gives its containerd, so a clean-up run is the same containerd.
        spec = self._node_spec(n, topo).node
        assert spec is not None
        return bootstrap.agent_config(spec).containerd_config()

    def _leftovers(self, state: LabState) -> list[str]:
        left = [f"process {r.name} (pid {r.pid})" for r in state.processes.values()
                if alive(r)]
        left += [f"network namespace {ns}" for ns in state.netns if netsetup.netns_exists(ns)]
        left += [f"interface {i}" for i in [*state.interfaces, state.bridge]
                 if i and netsetup.link_exists(i)]
        left += [f"iptables chain {c.chain}" for c in state.chains
                 if c.netns is None and netsetup.chain_exists(c.chain)]
        if self.lab_dir.exists():
            left += [f"mount {p}" for p in mounts_under(self.lab_dir)]
        return left

    def _purge(self, topo: Topology) -> None:
        for entry in topo.owned_entries:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.exists():
                entry.unlink()
        try:
            self.lab_dir.rmdir()
        except OSError:
            pass  # not empty: it holds files the lab did not write

    # -- status ------------------------------------------------------------------

    def status(self) -> int:
        state, topo = self._loaded()
        healthy = state.phase == UP
        self.say(f"lab:      {self.lab_dir} ({state.phase}, {len(topo.nodes)} nodes)")
        if state.error:
            self.say(f"error:    {state.error}")
        bridge_up = netsetup.link_exists(topo.bridge)
        self.say(f"network:  bridge {topo.bridge} {topo.bridge_address} "
                 f"{'present' if bridge_up else 'MISSING'}")
        healthy = healthy and bridge_up
        sup = state.processes.get(SUPERVISOR)
        supervising = sup is not None and alive(sup)
        healthy = healthy and supervising
        rows: list[tuple[str, ...]] = [("PROCESS", "PID", "STATE", "RESTARTS", "LAST EXIT",
                                        "RSS")]
        # The meshagents are there only in a lab brought up with --mesh.
        meshagents = [f"meshagent/{n.name}" for n in topo.nodes
                      if f"meshagent/{n.name}" in state.processes]
        meshagents += [ingress.PROCESS] if ingress.PROCESS in state.processes else []
        for h in meshhost.hosts_in(state, self.lab_dir):
            meshagents += [meshhost.AGENT + h.name, meshhost.APP + h.name]
        meshagents += [ZIPKIN] if ZIPKIN in state.processes else []
        members = control_plane_members(topo, state.control_planes)
        for name in (SUPERVISOR, *(m.etcd_process for m in members),
                     *(m.apiserver_process for m in members), REGISTRY,
                     *map(agent_key, topo.nodes), *meshagents):
            r = state.processes.get(name)
            if r is None:
                healthy = False
                rows.append((name, "-", "not started", "-", "-", "-"))
                continue
            running = alive(r)
            if running:
                what = "running"
            elif r.supervised and not restarting.wanted(state, r):
                what = "stopped (stop-node)"
            elif r.supervised and supervising:
                what = "restarting"
            else:
                what = "NOT RUNNING"
            healthy = healthy and (running or what == "stopped (stop-node)")
            rows.append((name, str(r.pid), what, str(r.restarts) if r.supervised else "-",
                         r.last_exit or "-", _mb(rss_bytes(r.pid)) if running else "-"))
        self.say("")
        self.say(_table(rows))
        api_nodes, leases = self._api_view()
        rows = [("NODE", "IP", "POD-CIDR", "AGENT", "CONTAINERD", "READY", "LEASE")]
        now = time.time()
        for n in topo.nodes:
            agent = state.processes.get(agent_key(n))
            cd = _container_record(n)
            agent_ok = agent is not None and alive(agent)
            node = api_nodes.get(n.name)
            lease = leases.get(n.name)
            if lease is not None:
                age = now - lease.spec.renew_time.ToMicroseconds() / 1e6
                fresh = age <= lease.spec.lease_duration_seconds
                lease_text = f"{age:.0f}s ago" + ("" if fresh else " (expired)")
            else:
                lease_text = "-"
            ready = "unknown"
            if node is not None:
                ready = "True" if _node_ready(node) else "False"
            stopped = n.name in state.stopped_nodes
            healthy = healthy and (agent_ok or stopped)
            rows.append((n.name, n.ip, node.spec.pod_cidr if node is not None else "-",
                         f"{agent.pid} running" if agent_ok and agent else
                         ("stopped (stop-node)" if stopped else "NOT RUNNING"),
                         f"{cd.pid} running" if cd else "stopped", ready, lease_text))
        self.say("")
        self.say(_table(rows))
        self.say("")
        self._etcd_status(topo, state)
        if state.partitions:
            self.say("")
            for a, b in state.partitions:
                self.say(f"partition: {a} <-x-> {b}   (shoal lab heal)")
        self.say("")
        if ZIPKIN in state.processes:
            self.say(f"zipkin:   {zipkin_url(topo)}/api/v2/traces (the meshagents' spans)")
        if ingress.PROCESS in state.processes:
            self.say(f"ingress:  {self._ingress_address()} (pod {ingress.NAMESPACE}/"
                     f"{ingress.NAME}; the host routes to it via {topo.nodes[0].ip}): the "
                     f"ports of the Gateway servers selecting istio=ingressgateway")
        self.say(f"export SHOAL_CONFIG={topo.admin_config}")
        return 0 if healthy else 1

    def _etcd_status(self, topo: Topology, state: LabState) -> None:
        """etcd's members: leader, size, and disk latency with etcd's slow-disk warning."""
        from apiserver.storage import etcdadmin

        try:
            cp = bootstrap.load(topo.bootstrap_spec).control_plane
        except errors.ShoalError:
            cp = None
        endpoints = cp.all_etcd_servers if cp is not None else (state.etcd_endpoint,)
        rows, warnings = etcdadmin.report_rows(asyncio.run(etcdadmin.cluster_report(endpoints)))
        self.say(_table(rows))
        for warning in warnings:
            self.say(f"warning: {warning}")

    def _ingress_address(self) -> str:
        try:
            with self._client(timeout=3.0) as client:
                return ingress.address(client) or "(no address)"
        except (errors.ShoalError, OSError):
            return "(apiserver not answering)"

    def _api_view(self) -> tuple[dict[str, core_pb2.Node], dict[str, coordination_pb2.Lease]]:
        try:
            with self._client(timeout=3.0) as client:
                nodes = {n.metadata.name: n for n in client.list(core_pb2.Node).items}
                leases = {le.metadata.name: le for le in client.list(
                    coordination_pb2.Lease, namespace=LEASE_NAMESPACE).items}
                return nodes, leases
        except (errors.ShoalError, OSError):
            return {}, {}

    # -- etcd snapshot restore ---------------------------------------------------

    def restore(self, snapshot: Path) -> int:
        """etcd's disaster recovery on the lab: every member restored from one
        snapshot (a new cluster), the control plane started again on it.

        The supervisor is stopped first (nothing is restarted behind our back),
        then every apiserver and etcd member; each member's data dir is restored
        into ``etcd.restored`` and swapped in (the old one kept as ``etcd.old``);
        etcd starts, then the apiservers, then the supervisor. Node agents keep
        running and find the API again through their failover."""
        from apiserver.storage import etcdadmin

        if not snapshot.is_file():
            raise errors.BadRequest(f"no snapshot file {snapshot}")
        state, topo = self._up_only()
        members = control_plane_members(topo, state.control_planes)
        specs = [(m, bootstrap.load(m.bootstrap_spec)) for m in members]
        sup = state.processes.get(SUPERVISOR)
        if sup is not None:
            self.sup.stop(sup, grace=10.0)
        with self.file.locked():
            state, _ = self._loaded()
            for m in members:
                for name in (m.apiserver_process, m.etcd_process):
                    record = state.processes.get(name)
                    if record is not None:
                        self._progress(f"stopping {name} (pid {record.pid})")
                        self.sup.stop(record)
            for m, spec in specs:
                cp = spec.control_plane
                assert cp is not None
                restored = cp.etcd_dir.with_name(cp.etcd_dir.name + ".restored")
                old = cp.etcd_dir.with_name(cp.etcd_dir.name + ".old")
                shutil.rmtree(restored, ignore_errors=True)
                etcdadmin.snapshot_restore(
                    snapshot, data_dir=restored, name=cp.etcd_name, peer_url=cp.etcd_peer_url,
                    initial_cluster=",".join(cp.etcd_initial_cluster))
                shutil.rmtree(old, ignore_errors=True)
                cp.etcd_dir.rename(old)
                restored.rename(cp.etcd_dir)
                self._progress(f"{m.etcd_process}: restored from {snapshot} (previous data "
                               f"in {old})")
            etcds = [self._start(state, spec, ETCD, name=m.etcd_process,
                                 log=topo.logs_dir / f"{m.etcd_process.replace('/', '-')}.log")
                     for m, spec in specs]
            for (m, spec), record in zip(specs, etcds, strict=True):
                assert spec.control_plane is not None
                self.sup.wait_until(f"{m.etcd_process} /health", partial(
                    http_ok, f"{spec.control_plane.etcd_client_url}/health"),
                    timeout=START_TIMEOUT, watch=[record])
            apis = [self._start(state, spec, APISERVER, name=m.apiserver_process,
                                log=topo.logs_dir / f"{m.apiserver_process.replace('/', '-')}.log")
                    for m, spec in specs]
            for (m, spec), record in zip(specs, apis, strict=True):
                self.sup.wait_until(f"{m.apiserver_process} /readyz", partial(
                    http_ok, bootstrap.command(spec, APISERVER, python=self.python).ready_url),
                    timeout=START_TIMEOUT, watch=[record])
        record = self._start_supervisor(state, topo)
        self.say(f"etcd restored from {snapshot} on {len(members)} member"
                 f"{'s' if len(members) > 1 else ''}; apiservers serving; supervisor running "
                 f"(pid {record.pid})")
        return 0

    # -- faults ------------------------------------------------------------------

    def stop_node(self, name: str) -> int:
        with self.file.locked():  # marked stopped first: the supervisor leaves it alone
            state, topo = self._up_only()
            n = topo.node(name)
            agent = state.processes.get(agent_key(n))
            marked = n.name in state.stopped_nodes
            state.add_unique(state.stopped_nodes, n.name)
            self.file.save(state)
        cd = _container_record(n)
        if (agent is None or not alive(agent)) and cd is None and marked:
            self.say(f"{n.name}: already stopped (start it: shoal lab start-node {n.name})")
            return 0
        if agent is not None:
            self.sup.stop(agent, grace=20.0)
        if cd is not None:
            self.sup.stop(cd, grace=10.0)
        self.say(f"{n.name}: node agent and containerd stopped; its pods' containers keep "
                 "running. Its Lease expires in 40 s. Bring it back: shoal lab start-node "
                 f"{n.name}")
        return 0

    def start_node(self, name: str) -> int:
        since = time.time()
        with self.file.locked():  # from now on the supervisor keeps the agent running
            state, topo = self._up_only()
            n = topo.node(name)
            agent = state.processes.get(agent_key(n))
            state.stopped_nodes = [s for s in state.stopped_nodes if s != n.name]
            if agent is not None and alive(agent):
                self.file.save(state)
                self.say(f"{n.name}: already running (agent pid {agent.pid})")
                return 0
            record = self._spawn(state, agent_key(n), self._agent_argv(n, topo),
                                 netns=n.netns, log=topo.logs_dir / f"{n.name}.log",
                                 supervised=True)
        self._wait_agent(n, record)
        cd = _container_record(n)
        if cd is not None:
            with self.file.locked():
                fresh, _ = self._loaded()
                fresh.processes[cd.name] = cd
                self.file.save(fresh)
        with self._client() as client:
            self.sup.wait_until(f"{n.name} Lease renewed", lambda: self._renewed(
                client, n.name, since), timeout=READY_TIMEOUT, watch=[record], interval=0.2)
        self.say(f"{n.name}: node agent running (pid {record.pid}), containerd "
                 f"{'pid ' + str(cd.pid) if cd else 'starting'}; Lease renewed")
        return 0

    @staticmethod
    def _renewed(client: Client, name: str, since: float) -> bool:
        try:
            lease = client.get(coordination_pb2.Lease, name, namespace=LEASE_NAMESPACE)
            node = client.get(core_pb2.Node, name)
        except errors.ShoalError:
            return False
        renewed = lease.spec.renew_time.ToMicroseconds() / 1e6 >= since - 1.0
        return renewed and _node_ready(node)

    def partition(self, a: str, b: str) -> int:
        with self.file.locked():
            return self._partition(a, b)

    def _partition(self, a: str, b: str) -> int:
        state, topo = self._up_only()
        cps = state.control_planes
        ea, eb = endpoint(topo, a, control_planes=cps), endpoint(topo, b, control_planes=cps)
        cidrs: dict[str, tuple[str, ...]] = {}
        for here, there in ((ea, eb), (eb, ea)):
            if here.netns is not None and there.netns is not None:
                routes = netsetup.pod_routes(here.netns)
                cidrs[there.name] = tuple(c for c, via in routes.items() if via == there.ip)
        rules = partition_rules(ea, eb, pod_cidrs=cidrs)
        for ns in dict.fromkeys(r.netns for r in rules):
            record = ChainRecord(chain=PARTITION_CHAIN, jumps_from=PARTITION_JUMPS, netns=ns)
            state.add_chain(record)
            self.file.save(state)
            netsetup.ensure_chain(PARTITION_CHAIN, rules=netsetup.drop_rules(rules, ns),
                                  jumps_from=PARTITION_JUMPS, netns=ns)
        pair = sorted([ea.name, eb.name])
        if pair not in state.partitions:
            state.partitions.append(pair)
        self.file.save(state)
        peers = ", ".join(sorted({r.peer for r in rules}))
        self.say(f"partitioned {ea.name} from {eb.name}: traffic to and from {peers} is "
                 "dropped. Undo: shoal lab heal")
        return 0

    def heal(self) -> int:
        with self.file.locked():
            return self._heal()

    def _heal(self) -> int:
        state, _ = self._loaded()
        healed = 0
        for chain in [c for c in state.chains if c.chain == PARTITION_CHAIN]:
            if netsetup.remove_chain(chain.chain, jumps_from=chain.jumps_from,
                                     netns=chain.netns):
                healed += 1
        state.chains = [c for c in state.chains if c.chain != PARTITION_CHAIN]
        count = len(state.partitions)
        state.partitions = []
        self.file.save(state)
        self.say(f"healed {count} partition{'s' if count != 1 else ''}" if count else
                 "no partitions to heal")
        return 0


def zipkin_url(topo: Topology) -> str:
    """The lab's Zipkin collector (a lab brought up with --mesh runs it)."""
    return f"http://{topo.gateway}:{ZIPKIN_PORT}"


def _umount(point: Path) -> str | None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(point), 2) != 0:  # MNT_DETACH
        return f"umount {point}: {os.strerror(ctypes.get_errno())}"
    return None


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
