"""The resource API end to end in one process: SDK -> gRPC/TLS -> apiserver -> SQLite.

Each test works in its own namespace (the ``namespace`` fixture).
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.resources.v1 import resources_pb2
from shoal.client import AsyncClient, WatchEvent
from shoal.testing.apiserver import InProcessAPIServer


def configmap(name: str, *, labels: dict[str, str] | None = None, **data: str
              ) -> core_pb2.ConfigMap:
    cm = core_pb2.ConfigMap()
    cm.metadata.name = name
    cm.metadata.labels.update(labels or {})
    cm.data.update(data)
    return cm


def pod(name: str, *, node: str = "", labels: dict[str, str] | None = None,
        image: str = "busybox:1.36") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name = name
    p.metadata.labels.update(labels or {})
    p.spec.node_name = node
    c = p.spec.containers.add()
    c.name = "main"
    c.image = image
    return p


def deployment(name: str, *, replicas: int = 1, image: str = "nginx:1.14.2"
               ) -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name = name
    d.spec.replicas = replicas
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    c = d.spec.template.spec.containers.add()
    c.name = "web"
    c.image = image
    return d


async def next_events(stream: AsyncIterator[WatchEvent[Any]], n: int,
                      timeout: float = 10.0) -> list[WatchEvent[Any]]:
    out: list[WatchEvent[Any]] = []
    async with asyncio.timeout(timeout):
        async for ev in stream:
            out.append(ev)
            if len(out) == n:
                break
    return out


# -- create, get, conflicts -------------------------------------------------


async def test_create_sets_server_fields_and_get_returns_them(client: AsyncClient,
                                                              namespace: str) -> None:
    created = await client.create(configmap("a", x="1"))
    meta = created.metadata
    assert meta.namespace == namespace
    assert meta.uid and meta.resource_version and meta.generation == 1
    assert meta.creation_timestamp.seconds > 0
    got = await client.get(core_pb2.ConfigMap, "a")
    assert got == created


async def test_create_twice_is_already_exists(client: AsyncClient, namespace: str) -> None:
    await client.create(configmap("a"))
    with pytest.raises(errors.AlreadyExists, match='configmaps "a" already exists'):
        await client.create(configmap("a"))


async def test_get_missing_is_not_found(client: AsyncClient, namespace: str) -> None:
    with pytest.raises(errors.NotFound, match='configmaps "nope" not found'):
        await client.get(core_pb2.ConfigMap, "nope")


async def test_create_in_missing_namespace_is_refused(client: AsyncClient) -> None:
    cm = configmap("a")
    cm.metadata.namespace = "no-such-ns"
    with pytest.raises(errors.NotFound, match='namespaces "no-such-ns" not found'):
        await client.create(cm)


async def test_stale_resource_version_is_a_conflict(client: AsyncClient,
                                                    namespace: str) -> None:
    first = await client.create(configmap("a", x="1"))
    stale = core_pb2.ConfigMap()
    stale.CopyFrom(first)
    first.data["x"] = "2"
    second = await client.update(first)
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    stale.data["x"] = "3"
    with pytest.raises(errors.Conflict, match="the object has been modified"):
        await client.update(stale)
    assert (await client.get(core_pb2.ConfigMap, "a")).data["x"] == "2"


async def test_update_without_resource_version_is_last_writer_wins(
        client: AsyncClient, namespace: str) -> None:
    await client.create(configmap("a", x="1"))
    blind = configmap("a", x="9")
    updated = await client.update(blind)
    assert updated.data["x"] == "9"


async def test_update_that_changes_nothing_writes_nothing(client: AsyncClient,
                                                          namespace: str) -> None:
    created = await client.create(configmap("a", x="1"))
    again = await client.update(created)
    assert again.metadata.resource_version == created.metadata.resource_version


async def test_generation_moves_with_spec_not_status(client: AsyncClient,
                                                     namespace: str) -> None:
    d = await client.create(deployment("web", replicas=1))
    assert d.metadata.generation == 1
    d.status.replicas = 5
    d = await client.update_status(d)
    assert d.metadata.generation == 1 and d.status.replicas == 5
    d.spec.replicas = 3
    d.status.replicas = 0  # ignored by Update
    d = await client.update(d)
    assert d.metadata.generation == 2
    assert d.status.replicas == 5
    d.metadata.labels["team"] = "x"
    d = await client.update(d)
    assert d.metadata.generation == 2  # metadata-only change


async def test_update_status_changes_only_status(client: AsyncClient, namespace: str) -> None:
    d = await client.create(deployment("web", replicas=1))
    d.spec.replicas = 7
    d.status.ready_replicas = 1
    d = await client.update_status(d)
    assert d.spec.replicas == 1 and d.status.ready_replicas == 1


async def test_create_clears_status_and_applies_defaults(client: AsyncClient,
                                                         namespace: str) -> None:
    p = pod("p")
    p.status.phase = "Running"
    created = await client.create(p)
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"
    assert created.spec.termination_grace_period_seconds == 30
    assert created.spec.containers[0].image_pull_policy == "IfNotPresent"


async def test_secret_string_data_is_write_only(client: AsyncClient, namespace: str) -> None:
    s = core_pb2.Secret()
    s.metadata.name = "creds"
    s.string_data["user"] = "admin"
    s.data["pw"] = b"hunter2"
    created = await client.create(s)
    assert dict(created.data) == {"user": b"admin", "pw": b"hunter2"}
    assert not created.string_data
    assert created.type == "Opaque"


async def test_invalid_object_names_each_field(client: AsyncClient, namespace: str) -> None:
    p = pod("Bad_Name")
    p.spec.containers[0].ports.add().container_port = 70000
    dup = p.spec.containers.add()
    dup.name = "main"
    dup.image = "x"
    with pytest.raises(errors.Invalid) as e:
        await client.create(p)
    fields = {c.field for c in e.value.causes}
    assert "metadata.name" in fields
    assert "spec.containers[0].ports[0].containerPort" in fields
    assert "spec.containers[1].name" in fields
    with pytest.raises(errors.NotFound):
        await client.get(core_pb2.Pod, "Bad_Name")


async def test_dry_run_writes_nothing(client: AsyncClient, namespace: str) -> None:
    out = await client.create(configmap("a"), dry_run=True)
    assert out.metadata.uid
    with pytest.raises(errors.NotFound):
        await client.get(core_pb2.ConfigMap, "a")


async def test_generate_name(client: AsyncClient, namespace: str) -> None:
    cm = core_pb2.ConfigMap()
    cm.metadata.generate_name = "job-"
    a = await client.create(cm)
    b = await client.create(cm)
    assert a.metadata.name.startswith("job-") and len(a.metadata.name) == 9
    assert a.metadata.name != b.metadata.name


async def test_pod_spec_is_immutable_but_binding_works(client: AsyncClient,
                                                       namespace: str) -> None:
    p = await client.create(pod("p"))
    p.spec.node_name = "node-1"
    bound = await client.update(p)
    assert bound.spec.node_name == "node-1"
    bound.spec.restart_policy = "Never"
    with pytest.raises(errors.Invalid, match="pod updates may not change"):
        await client.update(bound)


# -- delete and finalizers --------------------------------------------------


async def test_delete_without_finalizers_removes(client: AsyncClient, namespace: str) -> None:
    await client.create(configmap("a"))
    gone = await client.delete(core_pb2.ConfigMap, "a")
    assert gone.metadata.name == "a"
    with pytest.raises(errors.NotFound):
        await client.get(core_pb2.ConfigMap, "a")
    with pytest.raises(errors.NotFound):
        await client.delete(core_pb2.ConfigMap, "a")


async def test_finalizers_hold_deletion_until_removed(client: AsyncClient,
                                                      namespace: str) -> None:
    cm = configmap("a")
    cm.metadata.finalizers.append("example.com/hold")
    created = await client.create(cm)
    stream = client.watch(core_pb2.ConfigMap, resource_version=created.metadata.resource_version)
    marked = await client.delete(core_pb2.ConfigMap, "a")
    assert marked.metadata.HasField("deletion_timestamp")
    still = await client.get(core_pb2.ConfigMap, "a")
    assert still.metadata.HasField("deletion_timestamp")
    again = await client.delete(core_pb2.ConfigMap, "a")  # idempotent
    assert again.metadata.deletion_timestamp == still.metadata.deletion_timestamp
    del still.metadata.finalizers[:]
    await client.update(still)
    with pytest.raises(errors.NotFound):
        await client.get(core_pb2.ConfigMap, "a")
    events = await next_events(stream, 2)
    assert [e.type for e in events] == ["MODIFIED", "DELETED"]
    await stream.aclose()


async def test_delete_preconditions(client: AsyncClient, namespace: str) -> None:
    created = await client.create(configmap("a"))
    with pytest.raises(errors.Conflict, match="Precondition failed: UID"):
        await client.delete(core_pb2.ConfigMap, "a", uid="not-the-uid")
    with pytest.raises(errors.BadRequest, match="propagationPolicy"):
        await client.delete(core_pb2.ConfigMap, "a", propagation_policy="Sometimes")
    await client.delete(core_pb2.ConfigMap, "a", uid=created.metadata.uid,
                        propagation_policy="Background")


async def test_pod_deletion_records_grace_period(client: AsyncClient, namespace: str) -> None:
    p = pod("p")
    p.metadata.finalizers.append("shoal.dev/node-cleanup")
    p.spec.termination_grace_period_seconds = 12
    await client.create(p)
    marked = await client.delete(core_pb2.Pod, "p")
    assert marked.metadata.deletion_grace_period_seconds == 12
    marked2 = await client.get(core_pb2.Pod, "p")
    del marked2.metadata.finalizers[:]
    await client.update(marked2)


async def test_default_namespaces_exist_and_are_protected(client: AsyncClient) -> None:
    names = {n.metadata.name for n in (await client.list(core_pb2.Namespace)).items}
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= names
    with pytest.raises(errors.Forbidden):
        await client.delete(core_pb2.Namespace, "default")


# -- list, selectors, paging ------------------------------------------------


async def test_label_selectors(client: AsyncClient, namespace: str) -> None:
    await client.create(configmap("a", labels={"app": "web", "tier": "front"}))
    await client.create(configmap("b", labels={"app": "web", "tier": "back"}))
    await client.create(configmap("c", labels={"app": "db"}))

    async def names(sel: str) -> list[str]:
        lst = await client.list(core_pb2.ConfigMap, label_selector=sel)
        return [i.metadata.name for i in lst.items]

    assert await names("app=web") == ["a", "b"]
    assert await names("app==web,tier!=back") == ["a"]
    assert await names("tier in (front,back)") == ["a", "b"]
    assert await names("tier notin (front)") == ["b", "c"]
    assert await names("tier") == ["a", "b"]
    assert await names("!tier") == ["c"]
    assert await names("") == ["a", "b", "c"]
    with pytest.raises(errors.BadRequest, match="invalid label selector"):
        await names("app in (")


async def test_field_selector_node_name(client: AsyncClient, namespace: str) -> None:
    await client.create(pod("p1", node="n1"))
    await client.create(pod("p2", node="n2"))
    await client.create(pod("p3"))
    lst = await client.list(core_pb2.Pod, field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in lst.items] == ["p1"]
    lst = await client.list(core_pb2.Pod, field_selector="spec.nodeName=")
    assert [p.metadata.name for p in lst.items] == ["p3"]
    lst = await client.list(core_pb2.Pod, field_selector="spec.nodeName!=n1,metadata.name!=p3")
    assert [p.metadata.name for p in lst.items] == ["p2"]
    with pytest.raises(errors.BadRequest, match='field label "spec.image" is not supported'):
        await client.list(core_pb2.Pod, field_selector="spec.image=x")


async def test_list_across_namespaces(client: AsyncClient, namespace: str) -> None:
    await client.create(configmap("shared-name"))
    everywhere = await client.list(core_pb2.ConfigMap, all_namespaces=True)
    assert any(i.metadata.namespace == namespace for i in everywhere.items)
    here = await client.list(core_pb2.ConfigMap)
    assert {i.metadata.namespace for i in here.items} == {namespace}


async def test_paging_returns_every_item_once_at_one_revision(client: AsyncClient,
                                                             namespace: str) -> None:
    for i in range(25):
        await client.create(configmap(f"cm-{i:02d}", labels={"even": str(i % 2 == 0).lower()}))
    first = await client.list(core_pb2.ConfigMap, limit=10)
    assert len(first.items) == 10 and first.continue_token
    assert first.remaining_item_count == 15
    await client.create(configmap("cm-99"))  # after the snapshot: must not appear
    seen = [i.metadata.name for i in first.items]
    token = first.continue_token
    while token:
        page = await client.list(core_pb2.ConfigMap, limit=10, continue_token=token)
        assert page.resource_version == first.resource_version
        seen += [i.metadata.name for i in page.items]
        token = page.continue_token
    assert seen == [f"cm-{i:02d}" for i in range(25)]
    evens = await client.list_all(core_pb2.ConfigMap, label_selector="even=true", page_size=4)
    assert [i.metadata.name for i in evens.items] == [f"cm-{i:02d}" for i in range(0, 25, 2)]
    with pytest.raises(errors.BadRequest, match="invalid continue token"):
        await client.list(core_pb2.ConfigMap, limit=5, continue_token="garbage!")


# -- watch ------------------------------------------------------------------


async def test_watch_sees_changes_in_order(client: AsyncClient, namespace: str) -> None:
    start = await client.list(core_pb2.ConfigMap)
    stream = client.watch(core_pb2.ConfigMap, resource_version=start.resource_version)
    a = await client.create(configmap("a", x="1"))
    a.data["x"] = "2"
    await client.update(a)
    await client.delete(core_pb2.ConfigMap, "a")
    events = await next_events(stream, 3)
    assert [e.type for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert [e.object.data.get("x") for e in events if e.object] == ["1", "2", "2"]
    revs = [int(e.resource_version) for e in events]
    assert revs == sorted(revs) and len(set(revs)) == 3
    await stream.aclose()


async def test_watch_from_empty_version_starts_with_current_state(
        client: AsyncClient, namespace: str) -> None:
    await client.create(configmap("a"))
    await client.create(configmap("b"))
    stream = client.watch(core_pb2.ConfigMap)
    events = await next_events(stream, 2)
    assert sorted((e.type, e.object.metadata.name) for e in events if e.object) == [
        ("ADDED", "a"), ("ADDED", "b")]
    await client.create(configmap("c"))
    (ev,) = await next_events(stream, 1)
    assert (ev.type, ev.object and ev.object.metadata.name) == ("ADDED", "c")
    await stream.aclose()


async def test_watch_with_selector_turns_label_changes_into_add_and_delete(
        client: AsyncClient, namespace: str) -> None:
    start = await client.list(core_pb2.ConfigMap)
    stream = client.watch(core_pb2.ConfigMap, label_selector="app=web",
                          resource_version=start.resource_version)
    a = await client.create(configmap("a", labels={"app": "db"}))
    a.metadata.labels["app"] = "web"
    a = await client.update(a)
    a.metadata.labels["app"] = "db"
    a = await client.update(a)
    await client.create(configmap("marker", labels={"app": "web"}))
    events = await next_events(stream, 3)
    assert [(e.type, e.object and e.object.metadata.name) for e in events] == [
        ("ADDED", "a"), ("DELETED", "a"), ("ADDED", "marker")]
    await stream.aclose()


async def test_bookmarks_carry_the_current_revision(client: AsyncClient,
                                                    namespace: str) -> None:
    start = await client.list(core_pb2.ConfigMap)
    stream = client.watch(core_pb2.ConfigMap, resource_version=start.resource_version,
                          bookmarks=True, label_selector="never=matches")
    await client.create(configmap("a"))
    async with asyncio.timeout(10):
        async for ev in stream:
            if ev.type == "BOOKMARK" and int(ev.resource_version) > int(start.resource_version):
                break
    await stream.aclose()


async def test_client_that_disconnects_leaves_no_watcher(apiserver: InProcessAPIServer,
                                                         namespace: str) -> None:
    assert apiserver.server is not None
    cache = apiserver.server.cache
    before = cache.watcher_count()
    async with apiserver.client() as c:
        streams = [c.watch(core_pb2.ConfigMap, namespace=namespace) for _ in range(5)]
        tasks = [asyncio.create_task(anext(s)) for s in streams]  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while cache.watcher_count() < before + 5:
                await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
    async with asyncio.timeout(5):
        while cache.watcher_count() > before:
            await asyncio.sleep(0.02)


# -- requests the server must refuse ----------------------------------------


async def test_oversized_request_is_refused(client: AsyncClient, namespace: str) -> None:
    big = configmap("big", blob="x" * (5 * 1024 * 1024))
    with pytest.raises(errors.RequestEntityTooLarge):
        await client.create(big)
    mid = configmap("mid", blob="x" * (2 * 1024 * 1024))
    with pytest.raises(errors.RequestEntityTooLarge, match="limit"):
        await client.create(mid)
    with pytest.raises(errors.NotFound):
        await client.get(core_pb2.ConfigMap, "mid")


async def test_unknown_resource_and_garbage_object(client: AsyncClient) -> None:
    with pytest.raises(errors.NotFound, match="does not serve"):
        await client._call("List", resources_pb2.ListRequest(resource="widgets"),
                           resources_pb2.ListResponse)
    req = resources_pb2.CreateRequest()
    req.object.type_url = "type.googleapis.com/shoal.core.v1.ConfigMap"
    req.object.value = b"\xff\xff\xff"
    with pytest.raises(errors.BadRequest, match="cannot decode ConfigMap"):
        await client._call("Create", req, resources_pb2.ObjectResponse)
    # A field number this server does not know: refused, not silently dropped.
    req.object.value = configmap("x").SerializeToString() + b"\xa8\x06\x01"
    with pytest.raises(errors.BadRequest, match="fields this server does not know"):
        await client._call("Create", req, resources_pb2.ObjectResponse)


# -- monitoring -------------------------------------------------------------


async def test_metrics_and_health(apiserver: InProcessAPIServer, client: AsyncClient,
                                  namespace: str) -> None:
    await client.create(configmap("a"))
    port = apiserver.metrics_port

    def fetch(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    status, body = await asyncio.to_thread(fetch, "/metrics")
    assert status == 200
    assert 'shoal_apiserver_request_total{code="OK",method="Create",resource="configmap"}' in body
    assert "shoal_storage_request_duration_seconds_bucket" in body
    assert "shoal_apiserver_watchers" in body
    assert (await asyncio.to_thread(fetch, "/readyz"))[0] == 200
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(client.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_plaintext_and_unauthenticated_clients_are_refused(
        apiserver: InProcessAPIServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{apiserver.port}") as ch:
        rpc = ch.unary_unary("/shoal.resources.v1.Resources/Version",
                             request_serializer=lambda m: m.SerializeToString(),
                             response_deserializer=resources_pb2.VersionResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError):
            await rpc(resources_pb2.VersionRequest(), timeout=3)
    cfg = apiserver.client_config
    creds = grpc.ssl_channel_credentials(root_certificates=cfg.ca_pem)  # no client cert
    async with grpc.aio.secure_channel(f"127.0.0.1:{apiserver.port}", creds) as ch:
        rpc = ch.unary_unary("/shoal.resources.v1.Resources/Version",
                             request_serializer=lambda m: m.SerializeToString(),
                             response_deserializer=resources_pb2.VersionResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError):
            await rpc(resources_pb2.VersionRequest(), timeout=3)


async def test_deleting_a_namespace_removes_everything_in_it(client: AsyncClient) -> None:
    ns = core_pb2.Namespace()
    ns.metadata.name = "doomed"
    created = await client.create(ns)
    assert list(created.spec.finalizers) == ["kubernetes"]
    await client.create(_in(configmap("a"), "doomed"))
    held = _in(configmap("held"), "doomed")
    held.metadata.finalizers.append("example.com/hold")
    await client.create(held)
    marked = await client.delete(core_pb2.Namespace, "doomed")
    assert marked.status.phase == "Terminating"
    with pytest.raises(errors.Forbidden, match="being terminated"):
        await client.create(_in(configmap("late"), "doomed"))

    async def gone(kind: Any, name: str, ns: str = "doomed") -> bool:
        try:
            await client.get(kind, name, namespace=ns)
        except errors.NotFound:
            return True
        return False

    async with asyncio.timeout(10):
        while not await gone(core_pb2.ConfigMap, "a"):
            await asyncio.sleep(0.05)
    # The held object keeps the namespace alive until its finalizer is removed.
    await asyncio.sleep(0.3)
    assert not await gone(core_pb2.Namespace, "doomed", "")
    h = await client.get(core_pb2.ConfigMap, "held", namespace="doomed")
    assert h.metadata.HasField("deletion_timestamp")
    del h.metadata.finalizers[:]
    await client.update(h)
    async with asyncio.timeout(10):
        while not await gone(core_pb2.Namespace, "doomed", ""):
            await asyncio.sleep(0.05)


def _in(obj: Any, ns: str) -> Any:
    obj.metadata.namespace = ns
    return obj
