"""Authorization and audit against a live apiserver: real TLS, and user and node
certificates issued by the test CA with chosen CN (user) and O (groups)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.api.apps.v1 import apps_pb2
from shoal.api.authorization.v1 import authorization_pb2 as authz_pb2
from shoal.api.core.v1 import core_pb2
from shoal.api.rbac.v1 import rbac_pb2
from shoal.cli.main import main
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.waiting import eventually

RBAC = "rbac.authorization.k8s.io"
_COUNTER = iter(range(1, 1_000_000))


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}-{next(_COUNTER)}"


async def _namespace(admin: AsyncClient) -> str:
    ns = core_pb2.Namespace()
    ns.metadata.name = unique_name("authz")
    await admin.create(ns)
    return ns.metadata.name


async def _bind(admin: AsyncClient, *, namespace: str, role: str, user: str = "",
                group: str = "") -> None:
    """A RoleBinding of a ClusterRole (namespace set) or a ClusterRoleBinding."""
    msg: Any = rbac_pb2.RoleBinding() if namespace else rbac_pb2.ClusterRoleBinding()
    msg.metadata.name = unique_name(f"{role}-{user or group}")
    msg.metadata.namespace = namespace
    msg.role_ref.CopyFrom(rbac_pb2.RoleRef(api_group=RBAC, kind="ClusterRole", name=role))
    if user:
        msg.subjects.add(kind="User", api_group=RBAC, name=user)
    if group:
        msg.subjects.add(kind="Group", api_group=RBAC, name=group)
    await admin.create(msg)


async def _review(c: AsyncClient, **fields: Any) -> authz_pb2.AccessReviewResponse:
    rpc = c.channel.unary_unary(
        "/shoal.authorization.v1.Authorization/AccessReview",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=authz_pb2.AccessReviewResponse.FromString)
    resp: authz_pb2.AccessReviewResponse = await rpc(authz_pb2.AccessReviewRequest(**fields))
    return resp


async def _granted(c: AsyncClient, **fields: Any) -> None:
    """RBAC is read from the watch cache: wait until a new binding is seen."""
    async def allowed() -> bool:
        return (await _review(c, **fields)).allowed
    await eventually(f"{fields} allowed", allowed)


def _deployment(ns: str, name: str = "web") -> apps_pb2.Deployment:
    d = apps_pb2.Deployment()
    d.metadata.name, d.metadata.namespace = name, ns
    d.spec.selector.match_labels["app"] = name
    d.spec.template.metadata.labels["app"] = name
    d.spec.template.spec.containers.add(name="web", image="nginx")
    return d


def _pod(ns: str, name: str, *, node: str, secret: str = "") -> core_pb2.Pod:
    p = core_pb2.Pod()
    p.metadata.name, p.metadata.namespace = name, ns
    p.spec.node_name = node
    c = p.spec.containers.add(name="app", image="nginx")
    if secret:
        c.env.add(name="PASSWORD").value_from.secret_key_ref.CopyFrom(
            core_pb2.SecretKeySelector(name=secret, key="password"))
    return p


def _secret(ns: str, name: str, value: bytes = b"hunter2") -> core_pb2.Secret:
    s = core_pb2.Secret()
    s.metadata.name, s.metadata.namespace = name, ns
    s.data["password"] = value
    return s


@pytest.fixture
async def user(apiserver: InProcessAPIServer) -> AsyncIterator[Any]:
    opened: list[AsyncClient] = []

    def connect(name: str, *groups: str) -> AsyncClient:
        c = AsyncClient(apiserver.user_client_config(name, groups))
        opened.append(c)
        return c

    yield connect
    for c in opened:
        await c.close()


async def test_a_user_bound_to_view_reads_but_cannot_create(
        client: AsyncClient, user: Any) -> None:
    ns = await _namespace(client)
    await client.create(_deployment(ns, "existing"))
    await _bind(client, namespace=ns, role="view", user="vera")
    vera = user("vera", "readers")
    await _granted(vera, verb="list", group="apps", resource="deployments", namespace=ns)

    listed = await vera.list(apps_pb2.Deployment, namespace=ns)
    assert [d.metadata.name for d in listed.items] == ["existing"]
    with pytest.raises(errors.Forbidden) as err:
        await vera.create(_deployment(ns))
    assert err.value.message == (
        f'deployments.apps is forbidden: User "vera" cannot create resource "deployments" '
        f'in API group "apps" in the namespace "{ns}"')
    with pytest.raises(errors.Forbidden, match='cannot get resource "secrets"'):
        await vera.get(core_pb2.Secret, "anything", namespace=ns)
    # Streams are authorized too: a watch of Secrets, exec into a pod.
    with pytest.raises(errors.Forbidden, match='cannot watch resource "secrets"'):
        async for _ in vera.watch(core_pb2.Secret, namespace=ns):
            break
    with pytest.raises(errors.Forbidden, match='cannot create resource "pods/exec"'):
        await vera.exec("web-0", ["true"], namespace=ns)
    with pytest.raises(errors.Forbidden, match='cannot get resource "nodes/proxy"'):
        await vera.mesh_status()
    # Nothing was written.
    assert len((await client.list(apps_pb2.Deployment, namespace=ns)).items) == 1


async def test_edit_in_one_namespace_cannot_touch_another(
        client: AsyncClient, user: Any) -> None:
    mine, theirs = await _namespace(client), await _namespace(client)
    await client.create(_deployment(theirs, "theirs"))
    await _bind(client, namespace=mine, role="edit", user="eddie")
    eddie = user("eddie")
    await _granted(eddie, verb="create", group="apps", resource="deployments", namespace=mine)

    created = await eddie.create(_deployment(mine))
    created.spec.replicas = 3
    await eddie.update(created)
    await eddie.create(_secret(mine, "db"))  # edit may write Secrets
    await eddie.delete(apps_pb2.Deployment, "web", namespace=mine)
    for attempt in (
        eddie.create(_deployment(theirs)),
        eddie.get(apps_pb2.Deployment, "theirs", namespace=theirs),
        eddie.list(apps_pb2.Deployment, namespace=theirs),
        eddie.delete(apps_pb2.Deployment, "theirs", namespace=theirs),
        eddie.list(apps_pb2.Deployment),  # all namespaces = cluster scope
    ):
        with pytest.raises(errors.Forbidden):
            await attempt
    # edit grants no RBAC: it cannot bind itself wider.
    with pytest.raises(errors.Forbidden, match='cannot create resource "rolebindings"'):
        await _bind(eddie, namespace=mine, role="admin", user="eddie")
    assert (await client.get(apps_pb2.Deployment, "theirs", namespace=theirs)).metadata.name


async def test_no_one_grants_what_they_do_not_hold(client: AsyncClient, user: Any) -> None:
    ns = await _namespace(client)
    await _bind(client, namespace=ns, role="admin", user="ada")
    ada = user("ada")
    await _granted(ada, verb="create", group=RBAC, resource="rolebindings", namespace=ns)
    await _bind(ada, namespace=ns, role="edit", user="ed")  # admin holds all of edit there
    with pytest.raises(errors.Forbidden,
                       match="attempting to grant RBAC permissions not currently held: "
                             r'\{APIGroups:\["\*"\], Resources:\["\*"\], Verbs:\["\*"\]\}'):
        await _bind(ada, namespace=ns, role="cluster-admin", user="ada")
    role = rbac_pb2.Role(rules=[rbac_pb2.PolicyRule(verbs=["get"], api_groups=[""],
                                                    resources=["pods", "nodes"])])
    role.metadata.name, role.metadata.namespace = "peek", ns
    with pytest.raises(errors.Forbidden, match=r'Resources:\["nodes" "pods"\]'):
        await ada.create(role)
    del role.rules[0].resources[1]
    await ada.create(role)  # pods she holds
    # The admin (system:masters) may grant anything.
    await _bind(client, namespace=ns, role="cluster-admin", user="ada")


async def test_a_node_reads_only_its_pods_secrets_and_writes_only_itself(
        apiserver: InProcessAPIServer, client: AsyncClient) -> None:
    ns = await _namespace(client)
    n1, n2 = unique_name("n1"), unique_name("n2")
    for name in (n1, n2):
        node = core_pb2.Node()
        node.metadata.name = name
        await client.create(node)
    await client.create(_secret(ns, "s1"))
    await client.create(_secret(ns, "s2"))
    await client.create(_pod(ns, "on-1", node=n1, secret="s1"))
    await client.create(_pod(ns, "on-2", node=n2, secret="s2"))

    async with AsyncClient(apiserver.node_client_config(n1)) as node1:
        got = await node1.get(core_pb2.Secret, "s1", namespace=ns)
        assert got.data["password"] == b"hunter2"
        with pytest.raises(errors.Forbidden) as err:
            await node1.get(core_pb2.Secret, "s2", namespace=ns)
        assert err.value.message == (
            f'secrets "s2" is forbidden: User "system:node:{n1}" cannot get resource '
            f'"secrets" in API group "" in the namespace "{ns}": no relationship found '
            f"between node '{n1}' and this object")
        with pytest.raises(errors.Forbidden):
            await node1.list(core_pb2.Secret, namespace=ns)

        # Its own Node's status: yes. Another node's: no, and nothing changes.
        own = await node1.get(core_pb2.Node, n1)
        own.status.node_info.kernel_version = "6.1-test"
        await node1.update_status(own)
        other = await node1.get(core_pb2.Node, n2)
        other.status.node_info.kernel_version = "forged"
        with pytest.raises(errors.Forbidden, match=f"cannot modify node '{n2}'"):
            await node1.update_status(other)
        assert (await client.get(core_pb2.Node, n2)).status.node_info.kernel_version == ""

        # Pods: status of its own, not of another node's.
        pod = await node1.get(core_pb2.Pod, "on-1", namespace=ns)
        pod.status.phase = "Running"
        await node1.update_status(pod)
        pod2 = await node1.get(core_pb2.Pod, "on-2", namespace=ns)
        pod2.status.phase = "Failed"
        with pytest.raises(errors.Forbidden, match="is not bound to node"):
            await node1.update_status(pod2)

        # A pod bound later: its Secret becomes readable at once (the graph
        # follows the watch cache; a refusal is retried after catching up).
        await client.create(_pod(ns, "late", node=n1, secret="s2"))
        assert (await node1.get(core_pb2.Secret, "s2", namespace=ns)).metadata.name == "s2"


async def test_can_i_answers_and_impersonation_needs_rights(
        apiserver: InProcessAPIServer, client: AsyncClient, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    ns, other = await _namespace(client), await _namespace(client)
    await _bind(client, namespace=ns, role="edit", user="carla")
    await _granted(client, user="carla", verb="create", group="apps",
                   resource="deployments", namespace=ns)
    carla_conf = tmp_path / "carla.conf"
    apiserver.user_client_config("carla").save(carla_conf)

    async def shoal(config: Path, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(config), *args])
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out.strip(), out.err.strip()

    assert await shoal(carla_conf, "auth", "can-i", "create", "deployments", "-n", ns) == (
        0, "yes", "")
    assert (await shoal(carla_conf, "auth", "can-i", "create", "deploy", "-n", other))[:2] \
        == (1, "no")
    assert (await shoal(carla_conf, "auth", "can-i", "get", "pods/log", "web", "-n", ns))[:2] \
        == (0, "yes")
    assert (await shoal(carla_conf, "auth", "can-i", "list", "nodes"))[:2] == (1, "no")
    assert (await shoal(carla_conf, "auth", "can-i", "-q", "delete", "secrets", "-n", ns)) \
        == (0, "", "")
    # The admin may impersonate; carla may not.
    admin_conf = apiserver.config_path
    assert (await shoal(admin_conf, "auth", "can-i", "create", "pods", "-n", ns,
                        "--as", "carla"))[:2] == (0, "yes")
    assert (await shoal(admin_conf, "auth", "can-i", "create", "pods", "-n", other,
                        "--as", "carla"))[:2] == (1, "no")
    assert (await shoal(admin_conf, "auth", "can-i", "delete", "nodes", "--as", "x",
                        "--as-group", "system:masters"))[:2] == (0, "yes")
    code, out, err = await shoal(carla_conf, "auth", "can-i", "get", "pods", "--as", "vera")
    assert code == 1 and out == ""
    assert 'users "vera" is forbidden: User "carla" cannot impersonate resource "users"' in err
    # Bad input: exit 2, nothing asked.
    code, _, err = await shoal(carla_conf, "auth", "can-i", "get", "pods/log/x")
    assert code == 2 and "RESOURCE/SUBRESOURCE" in err


@pytest.fixture
async def audited(tmp_path: Path) -> AsyncIterator[tuple[InProcessAPIServer, Path]]:
    log_path = tmp_path / "audit" / "audit.log"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [ResponseStarted]\n"
        "rules:\n"
        "- level: None\n  users: [system:kube-controller-manager]\n"
        "- level: None\n  resources: [{group: '', resources: [events]}]\n"
        "- level: Request\n")
    async with InProcessAPIServer(tmp_path / "srv", audit_log_path=str(log_path),
                                  audit_policy_file=str(policy)) as api:
        yield api, log_path


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_the_audit_log_records_denials_and_never_secret_data(
        audited: tuple[InProcessAPIServer, Path]) -> None:
    api, log_path = audited
    async with api.client() as admin, AsyncClient(api.user_client_config("mallory")) as m:
        ns = await _namespace(admin)
        await admin.create(_secret(ns, "db", b"s3cr3t-value"))
        cm = core_pb2.ConfigMap()
        cm.metadata.name, cm.metadata.namespace = "conf", ns
        cm.data["key"] = "configmap-value"
        await admin.create(cm)
        await admin.create(_deployment(ns))
        with pytest.raises(errors.Forbidden):
            await m.get(core_pb2.Secret, "db", namespace=ns)
        with pytest.raises(errors.Forbidden):
            await m.create(_deployment(ns, "evil"))

    text = log_path.read_text()
    assert "s3cr3t-value" not in text
    assert base64.b64encode(b"s3cr3t-value").decode() not in text
    assert "configmap-value" not in text
    events = _events(log_path)
    denied = [e for e in events if e["user"]["username"] == "mallory"]
    assert [(e["verb"], e["objectRef"]["resource"], e["responseStatus"]["code"])
            for e in denied] == [("get", "secrets", 403), ("create", "deployments", 403)]
    get = denied[0]
    assert get["objectRef"] == {"resource": "secrets", "apiGroup": "", "namespace": ns,
                                "name": "db"}
    assert get["annotations"]["authorization.k8s.io/decision"] == "forbid"
    assert get["stage"] == "ResponseComplete" and get["level"] == "Metadata"
    assert get["latencySeconds"] >= 0 and get["requestReceivedTimestamp"].endswith("Z")
    # Request level logs the object of other kinds...
    create = next(e for e in events if e["verb"] == "create" and e.get("objectRef", {}).get(
        "resource") == "deployments" and e["user"]["username"] == "admin")
    assert create["level"] == "Request"
    assert create["requestObject"]["metadata"]["name"] == "web"
    assert create["responseStatus"]["code"] == 200
    # ...but Secrets and ConfigMaps only at Metadata.
    secret = next(e for e in events if e["verb"] == "create" and e.get("objectRef", {}).get(
        "resource") == "secrets")
    assert secret["level"] == "Metadata" and "requestObject" not in secret
    # The policy's None rules hold.
    assert not [e for e in events if e.get("objectRef", {}).get("resource") == "events"]


async def test_logs_stream_is_authorized_and_audited(
        audited: tuple[InProcessAPIServer, Path]) -> None:
    api, log_path = audited
    async with AsyncClient(api.user_client_config("mallory")) as m:
        with pytest.raises(errors.Forbidden, match='cannot get resource "pods/log"'):
            async for _ in m.logs("web", namespace="default"):
                break
    logs = [e for e in _events(log_path) if e.get("objectRef", {}).get("subresource") == "log"]
    assert [e["responseStatus"]["code"] for e in logs] == [403]


def test_a_bad_audit_policy_is_refused_at_start(tmp_path: Path) -> None:
    from apiserver.server import ServerConfig, build

    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Loud\n")
    with pytest.raises(errors.Invalid, match=r"rules\[0\]\.level: 'Loud'"):
        build(ServerConfig(data_dir=tmp_path, audit_log_path=str(tmp_path / "a.log"),
                           audit_policy_file=str(policy)))


