"""The garbage collector's graph and decisions (apiserver.controllers.ownership), no I/O."""

from __future__ import annotations

import pytest

from apiserver.controllers.ownership import (
    Identity,
    Item,
    OwnerGraph,
    OwnerLink,
    OwnerState,
    item_of,
    plan_dependent,
    plan_owner,
)
from apiserver.objectstore import FOREGROUND_FINALIZER, ORPHAN_FINALIZER, gc_finalizers
from shoal.api.core.v1 import core_pb2

S, D, W = OwnerState.SOLID, OwnerState.DANGLING, OwnerState.WAITING


def ident(name: str, kind: str = "Pod") -> Identity:
    return Identity("v1", kind, "ns", name, f"uid-{name}")


def link(name: str, *, block: bool = False) -> OwnerLink:
    return OwnerLink("apps/v1", "ReplicaSet", name, f"uid-{name}", block)


def item(name: str, *owners: OwnerLink, deleting: bool = False,
         finalizers: tuple[str, ...] = ()) -> Item:
    return Item(ident(name), tuple(owners), deleting, finalizers)


@pytest.mark.parametrize(("case", "subject", "states", "has_deps", "deps_waiting", "want"), [
    ("no owners: nothing to do", item("p"), {}, False, False,
     ("", (), ())),
    ("already deleting: left alone", item("p", link("a"), deleting=True), {"uid-a": D},
     False, False, ("", (), ())),
    ("live owner: kept", item("p", link("a")), {"uid-a": S}, False, False, ("", (), ())),
    ("owner gone: background delete", item("p", link("a")), {"uid-a": D}, False, False,
     ("Background", (), ())),
    ("all owners gone", item("p", link("a"), link("b")), {"uid-a": D, "uid-b": D},
     False, False, ("Background", (), ())),
    ("one owner left: drop the dangling ref", item("p", link("a"), link("b")),
     {"uid-a": S, "uid-b": D}, False, False, ("", ("uid-b",), ())),
    ("one owner left, other waiting: drop the waiting ref", item("p", link("a"), link("b")),
     {"uid-a": S, "uid-b": W}, False, False, ("", ("uid-b",), ())),
    ("owner waits, no own dependents: plain delete", item("p", link("a", block=True)),
     {"uid-a": W}, False, False, ("Background", (), ())),
    ("owner waits, has dependents: foreground delete", item("rs", link("d", block=True)),
     {"uid-d": W}, True, False, ("Foreground", (), ())),
    ("foreground cycle: unblock own refs", item("rs", link("d", block=True)),
     {"uid-d": W}, True, True, ("Foreground", (), ("uid-d",))),
    ("orphan finalizer already there: keeps the policy",
     item("p", link("a"), finalizers=(ORPHAN_FINALIZER,)), {"uid-a": D}, False, False,
     ("Orphan", (), ())),
    ("foreground finalizer already there",
     item("p", link("a"), finalizers=(FOREGROUND_FINALIZER,)), {"uid-a": D}, False, False,
     ("Foreground", (), ())),
    ("unknown owner counts as solid", item("p", link("a")), {}, False, False, ("", (), ())),
])
def test_plan_dependent(case: str, subject: Item, states: dict[str, OwnerState],
                        has_deps: bool, deps_waiting: bool,
                        want: tuple[str, tuple[str, ...], tuple[str, ...]]) -> None:
    plan = plan_dependent(subject, states, has_dependents=has_deps,
                          dependents_waiting=deps_waiting)
    assert (plan.delete_policy, plan.drop_owner_refs, plan.unblock) == want, case


@pytest.mark.parametrize(("case", "owner", "deps", "want"), [
    ("not GC-held: nothing", item("a"), [item("p", link("a"))], ((), (), "")),
    ("orphan: release all, then drop the finalizer",
     item("a", deleting=True, finalizers=(ORPHAN_FINALIZER,)),
     [item("p", link("a")), item("q", link("a", block=True))],
     (("p", "q"), (), ORPHAN_FINALIZER)),
    ("orphan with no dependents", item("a", deleting=True, finalizers=(ORPHAN_FINALIZER,)),
     [], ((), (), ORPHAN_FINALIZER)),
    ("foreground, blocking dependent live: recheck, keep finalizer",
     item("a", deleting=True, finalizers=(FOREGROUND_FINALIZER,)),
     [item("p", link("a", block=True))], ((), ("uid-p",), "")),
    ("foreground, blocking dependent terminating: wait",
     item("a", deleting=True, finalizers=(FOREGROUND_FINALIZER,)),
     [item("p", link("a", block=True), deleting=True)], ((), (), "")),
    ("foreground, only non-blocking dependents: finalizer goes, they are rechecked",
     item("a", deleting=True, finalizers=(FOREGROUND_FINALIZER,)),
     [item("p", link("a"))], ((), ("uid-p",), FOREGROUND_FINALIZER)),
    ("foreground, no dependents left",
     item("a", deleting=True, finalizers=(FOREGROUND_FINALIZER, "other")), [],
     ((), (), FOREGROUND_FINALIZER)),
])
def test_plan_owner(case: str, owner: Item, deps: list[Item],
                    want: tuple[tuple[str, ...], tuple[str, ...], str]) -> None:
    plan = plan_owner(owner, deps)
    got = (tuple(d.name for d in plan.orphan), plan.recheck, plan.remove_finalizer)
    assert got == want, case


def test_graph_tracks_dependents_and_says_what_to_look_at() -> None:
    g = OwnerGraph()
    rs = item("a")
    pod = item("p", link("a", block=True))
    assert g.upsert(rs) == set()  # no owners, not held: nothing to do
    assert g.upsert(pod) == {"uid-p"}
    assert [d.uid for d in g.dependents("uid-a")] == ["uid-p"]
    # The owner goes into foreground deletion: it and its dependents are looked at.
    held = item("a", deleting=True, finalizers=(FOREGROUND_FINALIZER,))
    assert g.upsert(held) == {"uid-a", "uid-p"}
    # The dependent changes: the waiting owner is looked at again.
    assert g.upsert(item("p", link("a", block=True), deleting=True)) == {"uid-a"}
    # The dependent goes: the owner again (its finalizer can go now).
    assert g.remove("uid-p") == {"uid-a"}
    assert g.dependents("uid-a") == []
    # The owner goes: its (new) dependents may now be dangling.
    g.upsert(item("q", link("a")))
    assert g.remove("uid-a") == {"uid-q"}
    assert g.remove("uid-a") == set()


def test_graph_owner_refs_changing_moves_the_edge() -> None:
    g = OwnerGraph()
    g.upsert(item("p", link("a")))
    g.upsert(item("p", link("b")))
    assert g.dependents("uid-a") == []
    assert [d.identity.name for d in g.dependents("uid-b")] == ["p"]


def test_suspects_are_held_owners_and_dependents_of_missing_owners() -> None:
    g = OwnerGraph()
    g.upsert(item("a"))
    g.upsert(item("p", link("a")))               # owner present: fine
    g.upsert(item("q", link("gone")))            # owner not in the graph
    g.upsert(item("h", deleting=True, finalizers=(ORPHAN_FINALIZER,)))
    g.upsert(item("t", link("gone"), deleting=True))  # already deleting: not a suspect
    assert sorted(g.suspects()) == ["uid-h", "uid-q"]


def test_item_of_reads_metadata() -> None:
    pod = core_pb2.Pod()
    pod.metadata.name, pod.metadata.namespace, pod.metadata.uid = "p", "ns", "u1"
    ref = pod.metadata.owner_references.add(api_version="apps/v1", kind="ReplicaSet",
                                            name="rs", uid="u0")
    ref.block_owner_deletion = True
    pod.metadata.finalizers.append(FOREGROUND_FINALIZER)
    pod.metadata.deletion_timestamp.seconds = 5
    it = item_of(pod, api_version="v1", kind="Pod")
    assert it.identity == Identity("v1", "Pod", "ns", "p", "u1")
    assert it.owners == (OwnerLink("apps/v1", "ReplicaSet", "rs", "u0", True),)
    assert it.waiting_for_dependents and not it.orphaning


@pytest.mark.parametrize(("finalizers", "policy", "want"), [
    ([], "", []),
    ([], "Background", []),
    ([], "Foreground", [FOREGROUND_FINALIZER]),
    ([], "Orphan", [ORPHAN_FINALIZER]),
    (["x"], "Foreground", ["x", FOREGROUND_FINALIZER]),
    ([FOREGROUND_FINALIZER, "x"], "", [FOREGROUND_FINALIZER, "x"]),  # kept, order too
    ([FOREGROUND_FINALIZER], "Orphan", [ORPHAN_FINALIZER]),             # swapped
    ([ORPHAN_FINALIZER, "x"], "Background", ["x"]),                      # dropped
])
def test_gc_finalizers_follow_the_policy(finalizers: list[str], policy: str,
                                         want: list[str]) -> None:
    assert gc_finalizers(finalizers, policy) == want
