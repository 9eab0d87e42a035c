"""``shoal apply``: all-or-nothing create-or-update of manifests.

Plan, then act. Nothing is written unless every check passes::

    read -f sources ──> decode every document strictly ──> problems? exit 2
        │                 (decode_documents)
        v
    namespace + defaults + local validation (prepare) ──> problems? exit 2
        v
    read the server: each object, each namespace (observe)
        v
    plan_apply(desired, observed, namespaces) ──> Create / Update actions + problems
        v                                        (namespace missing on the server and
    server dry run of every action whose          not created earlier in this apply)
    namespace exists ──> problems? exit 2
        v
    write each action in order: "created" / "configured" / "unchanged"

An update is kubectl's three-way merge (:func:`three_way`) of the stored
object, the manifest, and the manifest of the previous apply (kept in the
``kubectl.kubernetes.io/last-applied-configuration`` annotation, which create
and update both write): what the manifest sets wins; what the previous apply
set and this manifest drops is removed; what someone else wrote (a Service's
``clusterIP``, a bound pod's ``nodeName``, a controller's annotation, a label
added by hand) stays. Lists are the manifest's, whole. Status is never sent,
and the stored ``resourceVersion`` is. ``unchanged`` means the server answered
with the resourceVersion it was sent: it wrote nothing.

Who retries: a write that hits ``Conflict`` (the object changed since it was
read) or ``AlreadyExists``/``NotFound`` (it appeared or vanished) re-reads the
object and tries again, up to :data:`WRITE_ATTEMPTS` times. Everything in the
first part of this module is pure; the executor (``run_apply``) is at the end.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence, Set
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

from google.protobuf.message import Message

from shoal import errors, manifests, validation
from shoal.cli.fetching import bounded_gather, get_or_none
from shoal.cli.loading import read_manifests
from shoal.cli.meshing import wait_propagated as wait_for_meshagents
from shoal.cli.printing import resource_name
from shoal.cli.reporting import ExitCode, InputError, server_error_line
from shoal.cli.session import Session
from shoal.client import AsyncClient
from shoal.kinds import Kind, KindTable
from shoal.manifests import Document

WRITE_ATTEMPTS = 5
DryRun = Literal["none", "server", "client"]

# kubectl's annotation: the manifest as last applied, the third side of the merge.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Problem:
    """One reason the apply cannot go ahead, and the document it is about."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass(frozen=True)
class ObjectKey:
    resource: str
    namespace: str
    name: str


@dataclass(frozen=True)
class Decoded:
    """A document decoded into its kind and typed object."""

    kind: Kind
    obj: Any
    where: str


@dataclass(frozen=True)
class Desired:
    """An object as it will be sent: namespace resolved, not defaulted."""

    kind: Kind
    obj: Any
    where: str

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind.qualified_resource, self.obj.metadata.namespace,
                         self.obj.metadata.name)

    @property
    def display(self) -> str:
        """'deployment.apps/web', as apply prints it."""
        return resource_name(self.kind, self.obj.metadata.name)


@dataclass(frozen=True)
class Action:
    verb: Literal["create", "update"]
    desired: Desired
    _: KW_ONLY
    # The stored object an update starts from (None for a create).
    existing: Any | None
    # The object's namespace exists on the server now (or the kind is
    # cluster-scoped), so the server can dry-run this action.
    checkable: bool

    @property
    def obj(self) -> Any:
        """What would be sent right now."""
        if self.existing is None:
            return self.desired.obj
        return merge_for_update(self.existing, self.desired.obj, self.desired.kind)


@dataclass(frozen=True)
class Written:
    verb: str  # "created", "configured" or "unchanged"
    resource_version: str  # what the server stored ("" from a dry run)


@dataclass(frozen=True)
class ApplyPlan:
    actions: tuple[Action, ...]
    problems: tuple[Problem, ...]


# --------------------------------------------------------------------------- decoding


def document_label(doc: Document) -> str:
    """'app.yaml: document 2 (Deployment "web")' as far as the raw data says."""
    data = doc.data
    if not isinstance(data, Mapping):
        return doc.where
    kind = data.get("kind")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if isinstance(kind, str) and kind:
        if isinstance(name, str) and name:
            return f'{doc.where} ({kind} "{name}")'
        return f"{doc.where} ({kind})"
    return doc.where


def _error_problems(where: str, error: errors.ShoalError) -> list[Problem]:
    if error.causes:
        return [Problem(where, str(c)) for c in error.causes]
    return [Problem(where, error.message)]


def decode_documents(docs: Sequence[Document], kinds: KindTable
                     ) -> tuple[list[Decoded], list[Problem]]:
    """Decode every document strictly; report every problem of every document."""
    decoded: list[Decoded] = []
    problems: list[Problem] = []
    for doc in docs:
        where = document_label(doc)
        try:
            kind, obj = manifests.decode(doc.data, kinds)
        except errors.Invalid as e:
            problems.extend(_error_problems(where, e))
            continue
        decoded.append(Decoded(kind, obj, where))
    return decoded, problems


def namespace_mismatch(manifest_namespace: str, explicit: str | None) -> str | None:
    """kubectl's refusal when a manifest's namespace contradicts ``-n``."""
    if manifest_namespace and explicit and manifest_namespace != explicit:
        return (f'the namespace from the provided object "{manifest_namespace}" does not '
                f'match the namespace "{explicit}". You must pass '
                f"'--namespace={manifest_namespace}' to perform this operation.")
    return None


def resolve_namespace(kind: Kind, manifest_namespace: str, *, explicit: str | None,
                      default: str) -> str:
    """The manifest's namespace, else -n, else the config's; '' for cluster-scoped kinds."""
    if not kind.namespaced:
        return ""
    return manifest_namespace or explicit or default


def prepare(decoded: Sequence[Decoded], *, explicit_namespace: str | None,
            default_namespace: str) -> tuple[list[Desired], list[Problem]]:
    """Resolve namespaces and check each object locally (defaults + validation).

    The objects returned are copies with their namespace set and *without*
    defaults, so the server applies its own (and keeps what it allocated).
    """
    desired: list[Desired] = []
    problems: list[Problem] = []
    seen: dict[ObjectKey, int] = {}
    for i, d in enumerate(decoded):
        obj: Any = d.kind.new()
        obj.CopyFrom(d.obj)
        meta = obj.metadata
        if d.kind.namespaced:
            mismatch = namespace_mismatch(meta.namespace, explicit_namespace)
            if mismatch:
                problems.append(Problem(d.where, mismatch))
                continue
        meta.namespace = resolve_namespace(d.kind, meta.namespace, explicit=explicit_namespace,
                                           default=default_namespace)
        if not meta.name and meta.generate_name:
            problems.append(Problem(d.where, "metadata.generateName cannot be used with "
                                             "apply; set metadata.name"))
            continue
        checked: Any = d.kind.new()
        checked.CopyFrom(obj)
        validation.apply_defaults(d.kind, checked)
        problems.extend(Problem(d.where, str(e)) for e in validation.validate(d.kind, checked))
        item = Desired(d.kind, obj, d.where)
        if meta.name:
            first = seen.setdefault(item.key, i)
            if first != i:
                problems.append(Problem(d.where, "the same object is also given by "
                                                 f"{decoded[first].where}"))
        desired.append(item)
    return desired, problems


# --------------------------------------------------------------------------- planning


def last_applied_text(kind: Kind, obj: Message) -> str:
    """The manifest as it will be remembered: canonical JSON, without itself."""
    body: dict[str, Any] = manifests.encode_message(obj)
    annotations = body.get("metadata", {}).get("annotations", {})
    annotations.pop(LAST_APPLIED, None)
    if "metadata" in body and not annotations:
        body["metadata"].pop("annotations", None)
    data = {"apiVersion": kind.api_version, "kind": kind.kind, **body}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def with_last_applied(kind: Kind, obj: Message) -> Any:
    """``obj`` carrying the last-applied annotation (what a create sends)."""
    out: Any = type(obj)()
    out.CopyFrom(obj)
    out.metadata.annotations[LAST_APPLIED] = last_applied_text(kind, obj)
    return out


def three_way(live: Any, last: Any, want: Any) -> Any:
    """kubectl apply's merge of plain JSON values (pure).

    Maps merge key by key: what the manifest sets wins, what the previous apply
    set and this one no longer does is removed, and everything else (written
    by the server, a controller or another client) is kept. Lists and scalars
    are the manifest's, whole."""
    if not (isinstance(live, dict) and isinstance(want, dict)):
        return copy.deepcopy(want)
    last = last if isinstance(last, dict) else {}
    out = {k: v for k, v in live.items() if k in want or k not in last}
    for k, v in want.items():
        out[k] = three_way(live[k], last.get(k), v) if k in live else copy.deepcopy(v)
    return out


def previous_apply(existing: Any) -> dict[str, Any]:
    """The manifest the last ``apply`` wrote ({} if none, or unreadable)."""
    text = existing.metadata.annotations.get(LAST_APPLIED, "")
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def merge_for_update(existing: Message, desired: Message, kind: Kind) -> Any:
    """The stored object with the manifest merged in (see the module docstring)."""
    want = manifests.encode_message(with_last_applied(kind, desired))
    last = previous_apply(existing)
    for side in (want, last):  # status is the server's: never merged in, never removed
        side.pop("status", None)
    live = manifests.encode_message(existing)
    merged: Any = manifests.decode_message(three_way(live, last, want), type(existing))
    merged.metadata.resource_version = existing.metadata.resource_version  # type: ignore[attr-defined]
    return merged


def plan_apply(desired: Sequence[Desired], *, observed: Mapping[ObjectKey, Any],
               namespaces: Set[str]) -> ApplyPlan:
    """Create or update for each object, in order, and what stops the apply.

    ``observed`` holds the stored objects that exist (by key); ``namespaces``
    the namespaces that exist on the server. A namespaced object needs its
    namespace to exist already or to be created earlier in this apply.
    """
    in_apply = {d.obj.metadata.name for d in desired if d.kind.kind == "Namespace"}
    created_before: set[str] = set()
    actions: list[Action] = []
    problems: list[Problem] = []
    for d in desired:
        ns = d.key.namespace
        checkable = True
        if d.kind.namespaced and ns not in namespaces:
            checkable = False
            if ns in created_before:
                pass
            elif ns in in_apply:
                problems.append(Problem(d.where, f'namespace "{ns}" is created later in this '
                                                 "apply; put the Namespace before the objects "
                                                 "in it"))
            else:
                problems.append(Problem(d.where, f'namespaces "{ns}" not found'))
        if d.kind.kind == "Namespace":
            created_before.add(d.obj.metadata.name)
        existing = observed.get(d.key)
        verb: Literal["create", "update"] = "create" if existing is None else "update"
        actions.append(Action(verb, d, existing=existing, checkable=checkable))
    return ApplyPlan(tuple(actions), tuple(problems))


def update_outcome(existing: Any, result: Any, *, sent_version: str, dry_run: bool) -> str:
    """'unchanged' when the server wrote nothing, else 'configured'.

    A real update that changes nothing comes back with the resourceVersion it
    was sent; a dry run comes back equal to the stored object.
    """
    if dry_run:
        return "unchanged" if result == existing else "configured"
    same = result.metadata.resource_version == sent_version
    return "unchanged" if same else "configured"


def local_outcome(action: Action) -> str:
    """Best guess without the server (``--dry-run=client``): defaults applied locally."""
    if action.existing is None:
        return "created"
    merged = action.obj
    validation.apply_defaults(action.desired.kind, merged)
    return "unchanged" if merged == action.existing else "configured"


def dry_run_suffix(dry_run: DryRun) -> str:
    return {"server": " (server dry run)", "client": " (dry run)"}.get(dry_run, "")


# --------------------------------------------------------------------------- executor

async def observe(client: AsyncClient, desired: Sequence[Desired], *, kinds: KindTable
                  ) -> tuple[dict[ObjectKey, Any], set[str]]:
    """The stored objects (by key) and the referenced namespaces that exist."""
    unique = list({d.key: d for d in desired}.values())
    ns_kind = kinds.by_name("namespaces")
    names = sorted({d.key.namespace for d in desired if d.kind.namespaced})
    found = await bounded_gather([
        get_or_none(client, d.kind, namespace=d.key.namespace, name=d.key.name)
        for d in unique])
    ns_found = await bounded_gather([
        get_or_none(client, ns_kind, namespace="", name=n) for n in names])
    observed = {d.key: obj for d, obj in zip(unique, found, strict=True) if obj is not None}
    return observed, {n for n, obj in zip(names, ns_found, strict=True) if obj is not None}


async def write(client: AsyncClient, action: Action, *, dry_run: bool) -> Written:
    """Create or update one object: 'created', 'configured' or 'unchanged', and
    the resourceVersion stored."""
    d = action.desired
    existing = action.existing
    last: errors.ShoalError | None = None
    for _ in range(WRITE_ATTEMPTS):
        if existing is None:
            try:
                made = await client.create(with_last_applied(d.kind, d.obj), dry_run=dry_run)
                return Written("created", made.metadata.resource_version)
            except errors.AlreadyExists as e:
                last = e
        else:
            merged = merge_for_update(existing, d.obj, d.kind)
            try:
                result = await client.update(merged, dry_run=dry_run)
            except (errors.Conflict, errors.NotFound) as e:
                last = e
            else:
                return Written(update_outcome(existing, result,
                                              sent_version=merged.metadata.resource_version,
                                              dry_run=dry_run),
                               result.metadata.resource_version)
        existing = await get_or_none(client, d.kind, namespace=d.key.namespace,
                                     name=d.key.name)
    assert last is not None
    raise last


async def _check(client: AsyncClient, action: Action) -> tuple[str, list[Problem]]:
    """Server dry run of one action: its outcome, or the problems it has."""
    try:
        return (await write(client, action, dry_run=True)).verb, []
    except errors.Unavailable:
        raise
    except errors.ShoalError as e:
        return "", _error_problems(action.desired.where, e)


async def run_apply(session: Session, *, files: Sequence[str], recursive: bool,
                    dry_run: DryRun, wait_propagated: bool = False,
                    timeout: float | None = None) -> int:
    """Apply; with ``wait_propagated`` (not with a dry run), then wait until every
    node's meshagent has applied what was written (``shoal.cli.meshing``)."""
    docs = read_manifests(files, recursive=recursive, stdin=session.stdin)
    if not docs:
        raise InputError(["no objects passed to apply"])
    decoded, problems = decode_documents(docs, session.kinds)
    if problems:
        raise InputError(problems)
    desired, problems = prepare(decoded, explicit_namespace=session.namespace_flag,
                                default_namespace=session.namespace)
    if problems:
        raise InputError(problems)

    client = session.client()
    observed, namespaces = await observe(client, desired, kinds=session.kinds)
    plan = plan_apply(desired, observed=observed, namespaces=namespaces)
    problems = list(plan.problems)
    outcomes: dict[int, str] = {}
    if dry_run != "client":
        checkable = [(i, a) for i, a in enumerate(plan.actions) if a.checkable]
        results = await bounded_gather([_check(client, a) for _, a in checkable])
        for (i, _), (outcome, found) in zip(checkable, results, strict=True):
            outcomes[i] = outcome
            problems.extend(found)
    if problems:
        order: dict[str, int] = {}
        for i, d in enumerate(desired):
            order.setdefault(d.where, i)
        problems.sort(key=lambda p: order.get(p.where, len(desired)))  # document order
        raise InputError(problems)

    suffix = dry_run_suffix(dry_run)
    if dry_run != "none":
        for i, a in enumerate(plan.actions):
            verb = outcomes.get(i) or local_outcome(a)
            session.print(f"{a.desired.display} {verb}{suffix}")
        return ExitCode.OK

    code = ExitCode.OK
    written: dict[str, int] = {}
    for a in plan.actions:
        try:
            done = await write(client, a, dry_run=False)
        except errors.Unavailable:
            raise
        except errors.ShoalError as e:
            session.warn(server_error_line(e))
            code = ExitCode.SERVER_REFUSED
            continue
        session.print(f"{a.desired.display} {done.verb}")
        resource = a.desired.kind.qualified_resource
        if done.resource_version.isdigit():
            written[resource] = max(written.get(resource, 0), int(done.resource_version))
    if wait_propagated:
        await wait_for_meshagents(session, written, timeout=timeout)  # raises if not
    return code
