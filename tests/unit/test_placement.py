"""The scheduler's filters, scores and sampling (apiserver.controllers.placement), pure."""

from __future__ import annotations

import random
from typing import Any

import pytest

from apiserver.controllers import placement as pl
from shoal.api.core.v1 import core_pb2

GI = 1024**3


def mk_node(name: str, *, cpu: str = "4", memory: str = "8Gi", pods: str = "110",
            ready: str | None = "True", taints: tuple[tuple[str, str, str], ...] = (),
            unschedulable: bool = False, labels: dict[str, str] | None = None,
            extra: dict[str, str] | None = None) -> core_pb2.Node:
    n = core_pb2.Node()
    n.metadata.name = name
    n.metadata.labels.update({pl.HOSTNAME_LABEL: name, **(labels or {})})
    n.spec.unschedulable = unschedulable
    for key, value, effect in taints:
        n.spec.taints.add(key=key, value=value, effect=effect)
    for k, v in (("cpu", cpu), ("memory", memory), ("pods", pods), *(extra or {}).items()):
        n.status.allocatable[k].value = v
    if ready is not None:
        n.status.conditions.add(type="Ready", status=ready)
    return n


def mk_pod(name: str = "p", *, ns: str = "default", cpu: str = "", memory: str = "",
           extra: dict[str, str] | None = None, labels: dict[str, str] | None = None,
           owner: str = "", selector: dict[str, str] | None = None,
           tolerations: tuple[tuple[str, str, str, str], ...] = (),
           host_port: int = 0, **affinity: Any) -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, ns
    p.metadata.uid = f"uid-{name}"
    p.metadata.labels.update(labels or {})
    c = p.spec.containers.add(name="c", image="busybox")
    for k, v in (("cpu", cpu), ("memory", memory), *(extra or {}).items()):
        if v:
            c.resources.requests[k].value = v
    if host_port:
        c.ports.add(container_port=80, host_port=host_port)
    if owner:
        p.metadata.owner_references.add(kind="ReplicaSet", name="rs", uid=owner,
                                         controller=True)
    p.spec.node_selector.update(selector or {})
    for key, op, value, effect in tolerations:
        p.spec.tolerations.add(key=key, operator=op, value=value, effect=effect)
    aff = p.spec.affinity
    for term in affinity.get("required", ()):
        t = aff.node_affinity.required_during_scheduling_ignored_during_execution.\
            node_selector_terms.add()
        for key, op, values in term:
            t.match_expressions.add(key=key, operator=op, values=values)
    for weight, (key, op, values) in affinity.get("preferred", ()):
        pref = aff.node_affinity.preferred_during_scheduling_ignored_during_execution.add(
            weight=weight)
        pref.preference.match_expressions.add(key=key, operator=op, values=values)
    for app in affinity.get("anti", ()):
        t = aff.pod_anti_affinity.required_during_scheduling_ignored_during_execution.add(
            topology_key=pl.HOSTNAME_LABEL)
        t.label_selector.match_labels["app"] = app
    for app in affinity.get("with_", ()):
        t = aff.pod_affinity.required_during_scheduling_ignored_during_execution.add(
            topology_key=pl.HOSTNAME_LABEL)
        t.label_selector.match_labels["app"] = app
    return p


def cluster(*nodes: core_pb2.Node, bound: tuple[tuple[core_pb2.Pod, str], ...] = ()
            ) -> pl.ClusterState:
    state = pl.ClusterState()
    for n in nodes:
        state.set_node(pl.node_spec(n))
    for p, where in bound:
        state.add_pod(pl.pod_info(p), where)
    return state


def reasons(pod: core_pb2.Pod, state: pl.ClusterState, node: str) -> tuple[str, ...]:
    info = pl.pod_info(pod)
    return pl.unfit_reasons(info, state.nodes[node], pl.topology_rules(info, state))


# --------------------------------------------------------------------------- filters

untolerated = pl.untolerated

FILTER_CASES = [
    # resources: allocatable minus bound
    pytest.param(mk_node("n", cpu="2"), (), mk_pod(cpu="2"), (), id="cpu exactly fits"),
    pytest.param(mk_node("n", cpu="2"), (), mk_pod(cpu="2001m"), ("Insufficient cpu",),
                 id="cpu over allocatable"),
    pytest.param(mk_node("n", cpu="2"), ((mk_pod("a", cpu="1500m"), "n"),), mk_pod(cpu="600m"),
                 ("Insufficient cpu",), id="cpu minus bound pods"),
    pytest.param(mk_node("n", memory="1Gi"), ((mk_pod("a", memory="512Mi"), "n"),),
                 mk_pod(memory="600Mi"), ("Insufficient memory",), id="memory minus bound"),
    pytest.param(mk_node("n", cpu="1", memory="1Gi"), (), mk_pod(cpu="2", memory="2Gi"),
                 ("Insufficient cpu", "Insufficient memory"), id="several resources short"),
    pytest.param(mk_node("n", pods="1"), ((mk_pod("a"), "n"),), mk_pod(), ("Too many pods",),
                 id="pod count"),
    pytest.param(mk_node("n", cpu="1"), ((mk_pod("a", cpu="2"), "n"),), mk_pod(), (),
                 id="overcommitted node still takes a pod requesting no cpu"),
    pytest.param(mk_node("n", extra={"example.com/gpu": "1"}), (),
                 mk_pod(extra={"example.com/gpu": "2"}), ("Insufficient example.com/gpu",),
                 id="extended resource"),
    pytest.param(mk_node("n"), (), mk_pod(extra={"example.com/gpu": "1"}),
                 ("Insufficient example.com/gpu",), id="extended resource absent on node"),
    # nodeSelector and required node affinity
    pytest.param(mk_node("n", labels={"disk": "ssd"}), (), mk_pod(selector={"disk": "ssd"}), (),
                 id="nodeSelector matches"),
    pytest.param(mk_node("n"), (), mk_pod(selector={"disk": "ssd"}),
                 (pl.REASON_NODE_AFFINITY,), id="nodeSelector label missing"),
    pytest.param(mk_node("n", labels={"zone": "a"}), (),
                 mk_pod(required=[[("zone", "In", ["a", "b"])]]), (), id="affinity In"),
    pytest.param(mk_node("n", labels={"zone": "c"}), (),
                 mk_pod(required=[[("zone", "In", ["a", "b"])]]), (pl.REASON_NODE_AFFINITY,),
                 id="affinity In fails"),
    pytest.param(mk_node("n", labels={"zone": "c"}), (),
                 mk_pod(required=[[("zone", "In", ["a"])], [("zone", "NotIn", ["a"])]]), (),
                 id="affinity terms are ORed"),
    pytest.param(mk_node("n", labels={"zone": "a"}), (),
                 mk_pod(required=[[("zone", "In", ["a"]), ("gpu", "Exists", [])]]),
                 (pl.REASON_NODE_AFFINITY,), id="affinity expressions are ANDed"),
    pytest.param(mk_node("n", labels={"cores": "16"}), (),
                 mk_pod(required=[[("cores", "Gt", ["8"])]]), (), id="affinity Gt"),
    pytest.param(mk_node("n"), (), mk_pod(required=[[("gpu", "DoesNotExist", [])]]), (),
                 id="affinity DoesNotExist"),
    # taints and tolerations
    pytest.param(mk_node("n", taints=(("k", "v", "NoSchedule"),)), (), mk_pod(),
                 (untolerated(pl.Taint("k", "v", "NoSchedule")),), id="NoSchedule taint"),
    pytest.param(mk_node("n", taints=(("k", "v", "NoExecute"),)), (), mk_pod(),
                 (untolerated(pl.Taint("k", "v", "NoExecute")),), id="NoExecute taint"),
    pytest.param(mk_node("n", taints=(("k", "v", "PreferNoSchedule"),)), (), mk_pod(), (),
                 id="PreferNoSchedule does not filter"),
    pytest.param(mk_node("n", taints=(("k", "v", "NoSchedule"),)), (),
                 mk_pod(tolerations=(("k", "Equal", "v", "NoSchedule"),)), (),
                 id="tolerated by Equal"),
    pytest.param(mk_node("n", taints=(("k", "v", "NoSchedule"),)), (),
                 mk_pod(tolerations=(("k", "Equal", "w", "NoSchedule"),)),
                 (untolerated(pl.Taint("k", "v", "NoSchedule")),), id="Equal wrong value"),
    pytest.param(mk_node("n", taints=(("k", "v", "NoExecute"),)), (),
                 mk_pod(tolerations=(("k", "Exists", "", ""),)), (),
                 id="Exists with any effect"),
    pytest.param(mk_node("n", taints=(("k", "v", "NoExecute"),)), (),
                 mk_pod(tolerations=(("k", "Exists", "", "NoSchedule"),)),
                 (untolerated(pl.Taint("k", "v", "NoExecute")),), id="effect must match"),
    pytest.param(mk_node("n", taints=(("a", "", "NoSchedule"), ("b", "", "NoSchedule"))), (),
                 mk_pod(tolerations=(("", "Exists", "", ""),)), (), id="tolerate everything"),
    pytest.param(mk_node("n", ready="False"), (), mk_pod(),
                 (untolerated(pl.Taint(pl.TAINT_NOT_READY)),), id="implicit not-ready"),
    pytest.param(mk_node("n", ready=None), (), mk_pod(),
                 (untolerated(pl.Taint(pl.TAINT_NOT_READY)),), id="no Ready condition"),
    pytest.param(mk_node("n", ready="Unknown"), (), mk_pod(),
                 (untolerated(pl.Taint(pl.TAINT_UNREACHABLE)),), id="implicit unreachable"),
    pytest.param(mk_node("n", ready="Unknown", taints=((pl.TAINT_UNREACHABLE, "", "NoExecute"),)),
                 (), mk_pod(tolerations=((pl.TAINT_UNREACHABLE, "Exists", "", "NoExecute"),)),
                 (untolerated(pl.Taint(pl.TAINT_UNREACHABLE)),),
                 id="tolerating unreachable NoExecute is not enough to land there"),
    pytest.param(mk_node("n", ready="False"), (),
                 mk_pod(tolerations=((pl.TAINT_NOT_READY, "Exists", "", "NoSchedule"),)), (),
                 id="not-ready tolerated"),
    # cordon
    pytest.param(mk_node("n", unschedulable=True), (), mk_pod(), (pl.REASON_UNSCHEDULABLE,),
                 id="cordoned"),
    pytest.param(mk_node("n", unschedulable=True), (),
                 mk_pod(tolerations=((pl.TAINT_UNSCHEDULABLE, "Exists", "", "NoSchedule"),)), (),
                 id="cordoned but tolerated"),
    pytest.param(mk_node("n", unschedulable=True, taints=(("k", "", "NoSchedule"),)), (),
                 mk_pod(), (pl.REASON_UNSCHEDULABLE,), id="cordon is checked first"),
    # host ports
    pytest.param(mk_node("n"), ((mk_pod("a", host_port=8080), "n"),), mk_pod(host_port=8080),
                 (pl.REASON_PORTS,), id="host port taken"),
    pytest.param(mk_node("n"), ((mk_pod("a", host_port=8080), "n"),), mk_pod(host_port=8081), (),
                 id="other host port free"),
    # pod (anti-)affinity by hostname
    pytest.param(mk_node("n"), ((mk_pod("a", labels={"app": "db"}), "n"),), mk_pod(anti=["db"]),
                 (pl.REASON_ANTI_AFFINITY,), id="anti-affinity to a pod on the node"),
    pytest.param(mk_node("n"), ((mk_pod("a", labels={"app": "web"}), "n"),),
                 mk_pod(anti=["db"]), (), id="anti-affinity, no match"),
    pytest.param(mk_node("n"), ((mk_pod("a", ns="other", labels={"app": "db"}), "n"),),
                 mk_pod(anti=["db"]), (), id="anti-affinity only in own namespace"),
    pytest.param(mk_node("n"), ((mk_pod("a", anti=["web"]), "n"),),
                 mk_pod(labels={"app": "web"}), (pl.REASON_EXISTING_ANTI_AFFINITY,),
                 id="existing pod's anti-affinity"),
    pytest.param(mk_node("n"), ((mk_pod("a", labels={"app": "cache"}), "n"),),
                 mk_pod(with_=["cache"]), (), id="affinity satisfied"),
    pytest.param(mk_node("n"), (), mk_pod(labels={"app": "x"}, with_=["cache"]),
                 (pl.REASON_AFFINITY,), id="affinity with nothing to join"),
    pytest.param(mk_node("n"), (), mk_pod(labels={"app": "cache"}, with_=["cache"]), (),
                 id="first pod of a self-affine group"),
]


@pytest.mark.parametrize(("node", "bound", "pod", "expected"), FILTER_CASES)
def test_filters(node: core_pb2.Node, bound: tuple[tuple[core_pb2.Pod, str], ...],
                 pod: core_pb2.Pod, expected: tuple[str, ...]) -> None:
    assert reasons(pod, cluster(node, bound=bound), "n") == expected


def test_assumed_pods_count_like_bound_ones() -> None:
    state = cluster(mk_node("n", cpu="1"))
    state.assume(pl.pod_info(mk_pod("a", cpu="800m")), "n")
    assert reasons(mk_pod(cpu="300m"), state, "n") == ("Insufficient cpu",)
    state.forget("default/a")
    assert reasons(mk_pod(cpu="300m"), state, "n") == ()


def test_assumed_pod_confirmed_then_expired_only_if_unseen() -> None:
    state = cluster(mk_node("n"))
    a, b = pl.pod_info(mk_pod("a")), pl.pod_info(mk_pod("b"))
    state.assume(a, "n")
    state.assume(b, "n")
    state.finish_binding(a.key, deadline=10.0)
    state.finish_binding(b.key, deadline=10.0)
    state.add_pod(a, "n")                                  # the informer saw it bound
    assert state.expire(9.0) == []
    assert state.expire(10.0) == [b.key]
    assert set(state.nodes["n"].pods) == {a.key}
    assert not state.is_assumed(a.key)


def test_requests_of_init_containers_and_overhead() -> None:
    p = mk_pod(cpu="100m", memory="64Mi")
    p.spec.init_containers.add(name="init", image="i").resources.requests["cpu"].value = "1"
    side = p.spec.init_containers.add(name="side", image="s", restart_policy="Always")
    side.resources.requests["cpu"].value = "200m"
    p.spec.overhead["cpu"].value = "50m"
    info = pl.pod_info(p)
    # init "init" runs alone (1000m) before the sidecar starts; then 100m + 200m run.
    assert (info.cpu, info.memory) == (1050, 64 * 1024 * 1024)
    plain = pl.pod_info(mk_pod())
    assert (plain.cpu, plain.nz_cpu, plain.nz_memory) == (0, 100, 200 * 1024 * 1024)


# --------------------------------------------------------------------------- message


@pytest.mark.parametrize(("nodes", "bound", "pod", "message"), [
    pytest.param([], (), mk_pod(), "no nodes available to schedule pods", id="no nodes"),
    pytest.param([mk_node("a", cpu="1"), mk_node("b", cpu="1"),
                  mk_node("c", taints=(("dedicated", "gpu", "NoSchedule"),)),
                  mk_node("d", unschedulable=True),
                  mk_node("e", cpu="1", labels={"disk": "hdd"})],
                 (), mk_pod(cpu="2", selector={"disk": "hdd"}),
                 "0/5 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint "
                 "{dedicated: gpu}, 1 node(s) were unschedulable, 2 node(s) didn't match Pod's "
                 "node affinity/selector.", id="one reason per node, sorted"),
    pytest.param([mk_node("a", cpu="1", memory="1Gi"), mk_node("b", cpu="8", memory="1Gi")],
                 (), mk_pod(cpu="2", memory="2Gi"),
                 "0/2 nodes are available: 1 Insufficient cpu, 2 Insufficient memory.",
                 id="resources count each shortfall"),
    pytest.param([mk_node("a"), mk_node("b")], ((mk_pod("x", labels={"app": "db"}), "a"),
                                                (mk_pod("y", labels={"app": "db"}), "b")),
                 mk_pod(anti=["db"]),
                 "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.",
                 id="anti-affinity everywhere"),
])
def test_unschedulable_message(nodes: list[core_pb2.Node],
                               bound: tuple[tuple[core_pb2.Pod, str], ...],
                               pod: core_pb2.Pod, message: str) -> None:
    d = pl.schedule(pl.pod_info(pod), cluster(*nodes, bound=bound))
    assert d.node is None
    assert d.message == message


# --------------------------------------------------------------------------- scores


def test_least_allocated_prefers_the_emptier_node() -> None:
    state = cluster(mk_node("busy"), mk_node("idle"),
                    bound=((mk_pod("a", cpu="3", memory="6Gi"), "busy"),))
    assert pl.schedule(pl.pod_info(mk_pod(cpu="100m")), state).node == "idle"
    scores = {s.node: s.least_allocated for s in pl.score_nodes(
        pl.pod_info(mk_pod(cpu="1", memory="2Gi")), state.ordered())}
    # busy: cpu (4-4)/4 -> 0, memory (8-8)/8 -> 0; idle: cpu 75, memory 75.
    assert scores == {"busy": 0, "idle": 75}


def test_owner_spread_beats_a_small_allocation_difference() -> None:
    rs = "rs-1"
    state = cluster(mk_node("a"), mk_node("b"),
                    bound=((mk_pod("x", owner=rs, cpu="10m"), "a"),
                           (mk_pod("y", cpu="500m"), "b")))
    info = pl.pod_info(mk_pod(owner=rs))
    spread = {s.node: s.spread for s in pl.score_nodes(info, state.ordered())}
    assert spread == {"a": 0, "b": 100}
    assert pl.schedule(info, state).node == "b"
    # Without an owner, the emptier node wins.
    assert pl.schedule(pl.pod_info(mk_pod()), state).node == "a"


def test_preferred_node_affinity_weights() -> None:
    state = cluster(mk_node("a", labels={"zone": "x"}), mk_node("b", labels={"zone": "y"}),
                    mk_node("c"))
    info = pl.pod_info(mk_pod(preferred=[(10, ("zone", "In", ["y"])),
                                         (5, ("zone", "Exists", []))]))
    got = {s.node: s.node_affinity for s in pl.score_nodes(info, state.ordered())}
    assert got == {"a": 33, "b": 100, "c": 0}
    assert pl.schedule(info, state).node == "b"


def test_prefer_no_schedule_taint_scores_lower() -> None:
    state = cluster(mk_node("a", taints=(("k", "", "PreferNoSchedule"),)), mk_node("b"))
    assert pl.schedule(pl.pod_info(mk_pod()), state).node == "b"


def test_total_scores_match_the_per_plugin_figures() -> None:
    state = cluster(mk_node("a", taints=(("k", "", "PreferNoSchedule"),)),
                    mk_node("b", labels={"zone": "y"}), mk_node("c", cpu="2"),
                    bound=((mk_pod("x", owner="o", cpu="1"), "b"),))
    info = pl.pod_info(mk_pod(owner="o", preferred=[(3, ("zone", "In", ["y"]))]))
    nodes = state.ordered()
    assert pl.total_scores(info, nodes) == [s.total for s in pl.score_nodes(info, nodes)]


def test_ties_broken_by_rng() -> None:
    state = cluster(*(mk_node(f"n{i}") for i in range(4)))
    info = pl.pod_info(mk_pod())
    picks = {pl.schedule(info, state, rng=random.Random(seed)).node for seed in range(40)}
    assert picks == {"n0", "n1", "n2", "n3"}


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("nodes", "percentage", "want"), [
    (0, 0, 0), (5, 0, 5), (99, 0, 99), (100, 0, 100), (500, 0, 230), (1000, 0, 420),
    (5000, 0, 500), (6000, 0, 300), (10_000, 0, 500), (200, 0, 100), (5000, 10, 500),
    (5000, 1, 100), (5000, 100, 5000),
])
def test_num_feasible_nodes_to_find(nodes: int, percentage: int, want: int) -> None:
    assert pl.num_feasible_nodes_to_find(nodes, percentage) == want


def test_large_cluster_scores_a_bounded_sample_and_rotates() -> None:
    state = cluster(*(mk_node(f"n{i:04d}") for i in range(1000)))
    info = pl.pod_info(mk_pod())
    d = pl.schedule(info, state, start=0)
    assert (d.feasible, d.processed) == (420, 420)
    assert d.node is not None and d.node < "n0420"
    d2 = pl.schedule(info, state, start=900)
    # The search wraps: nodes 900..999, then 0..319.
    assert d2.feasible == 420
    assert d2.node is not None and (d2.node >= "n0900" or d2.node < "n0320")


def test_sampling_counts_failed_nodes_as_processed() -> None:
    nodes = [mk_node(f"n{i:03d}", cpu="1") for i in range(150)] + \
            [mk_node(f"z{i:03d}", cpu="8") for i in range(150)]
    state = cluster(*nodes)
    d = pl.schedule(pl.pod_info(mk_pod(cpu="2")), state, start=0)
    assert d.node is not None and d.node.startswith("z")
    want = pl.num_feasible_nodes_to_find(300)       # 48% of 300
    assert (d.processed, d.feasible) == (150 + want, want) == (294, 144)


# --------------------------------------------------------------------------- state


def test_node_updates_report_only_scheduling_relevant_changes() -> None:
    state = pl.ClusterState()
    n = mk_node("n")
    assert state.set_node(pl.node_spec(n))
    n.status.conditions[0].last_heartbeat_time.seconds = 1234   # a heartbeat
    assert not state.set_node(pl.node_spec(n))
    n.spec.unschedulable = True
    assert state.set_node(pl.node_spec(n))


def test_pods_on_a_removed_node_keep_their_accounting_until_gone() -> None:
    state = cluster(mk_node("n", cpu="1"), bound=((mk_pod("a", cpu="1"), "n"),))
    state.remove_node("n")
    assert state.ordered() == []
    state.set_node(pl.node_spec(mk_node("n", cpu="1")))
    assert reasons(mk_pod(cpu="1"), state, "n") == ("Insufficient cpu",)
    state.remove_pod("default/a")
    assert reasons(mk_pod(cpu="1"), state, "n") == ()


def _general(info: pl.PodInfo, state: pl.ClusterState, start: int) -> tuple[str | None, int]:
    """The general path spelled out: find_feasible, total_scores, the first best."""
    nodes = state.ordered()
    found = pl.find_feasible(info, nodes, start=start,
                             want=pl.num_feasible_nodes_to_find(len(nodes)))
    if not found.nodes:
        return None, found.processed
    totals = pl.total_scores(info, found.nodes)
    return found.nodes[totals.index(max(totals))].name, found.processed


@pytest.mark.parametrize("seed", range(8))
def test_one_pass_path_picks_what_the_general_path_picks(seed: int) -> None:
    rnd = random.Random(seed)
    nodes = [mk_node(f"n{i:03d}", cpu=str(rnd.choice([1, 2, 4])),
                     memory=f"{rnd.choice([1, 2, 8])}Gi",
                     ready=rnd.choice(["True"] * 9 + ["False"]),
                     unschedulable=rnd.random() < 0.05,
                     taints=(("k", "", "NoSchedule"),) if rnd.random() < 0.05 else ())
             for i in range(rnd.choice([3, 40, 250]))]
    state = cluster(*nodes)
    for i in range(60):
        pod = mk_pod(f"p{i}", cpu=rnd.choice(["", "100m", "500m", "1500m"]),
                     memory=rnd.choice(["", "256Mi", "1Gi"]),
                     tolerations=(("k", "Exists", "", ""),) if rnd.random() < 0.2 else ())
        info = pl.pod_info(pod)
        start = rnd.randrange(1000)
        got = pl.schedule(info, state, start=start)
        want_node, processed = _general(info, state, start)
        assert (got.node, got.processed) == (want_node, processed)
        if got.node is not None:
            state.assume(info, got.node)
