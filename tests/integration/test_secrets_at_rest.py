"""Secrets encrypted at rest: what etcd (and SQLite) hold is ciphertext, key
rotation keeps every Secret readable, and a bad config stops the server."""

from __future__ import annotations

import asyncio
import base64
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from apiserver.encryption import default_config_text, new_key_secret
from shoal import errors
from shoal.api.core.v1 import core_pb2
from shoal.client import AsyncClient
from shoal.testing.apiserver import InProcessAPIServer
from shoal.testing.etcd import EtcdServer, etcd_binary

PLAINTEXT = b"hunter2-the-password"


def _config(keys: list[tuple[str, str]], *, identity_first: bool = False) -> str:
    aes = {"aesgcm": {"keys": [{"name": n, "secret": s} for n, s in keys]}}
    providers: list[Any] = [{"identity": {}}, aes] if identity_first else [aes,
                                                                          {"identity": {}}]
    import yaml

    return yaml.safe_dump({"apiVersion": "apiserver.config.k8s.io/v1",
                           "kind": "EncryptionConfiguration",
                           "resources": [{"resources": ["secrets"], "providers": providers}]})


def _secret(name: str, ns: str, value: bytes = PLAINTEXT) -> core_pb2.Secret:
    s = core_pb2.Secret(type="Opaque")
    s.metadata.name, s.metadata.namespace = name, ns
    s.data["password"] = value
    return s


async def _namespace(client: AsyncClient) -> str:
    ns = core_pb2.Namespace()
    ns.metadata.name = f"enc-{uuid.uuid4().hex[:8]}"
    await client.create(ns)
    return ns.metadata.name


async def _reencrypt(api: InProcessAPIServer,
                     capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`shoal secrets reencrypt`, run in a thread (the apiserver shares this loop)."""
    from shoal.cli.main import main

    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--config", str(api.config_path),
                                          "secrets", "reencrypt"])
    return code, capsys.readouterr().out


def _etcdctl_get(endpoint: str, key: str) -> bytes:
    """What `etcdctl get` prints for the key's value."""
    out = subprocess.run(["etcdctl", "--endpoints", endpoint, "get", key,
                          "--print-value-only"], check=True, capture_output=True, timeout=30,
                         env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
    return out.stdout


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own: its history will hold ciphertext, which an
    apiserver without the key (the session's) must never replay."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (Debian package etcd-server)")
    with EtcdServer() as server:
        yield server


def _use_keys(cfg: Path, keys: list[tuple[str, str]]) -> None:
    cfg.write_text(_config(keys))


async def _rotation_keeps_every_secret_readable(
        api: InProcessAPIServer, cfg: Path, raw: Callable[[str], bytes],
        capsys: pytest.CaptureFixture[str]) -> None:
    """key1 -> (key2 first, key1 kept) + reencrypt -> key2 only; every step readable,
    what storage holds is ciphertext under the expected key."""
    key1, key2 = new_key_secret(), new_key_secret()
    _use_keys(cfg, [("key1", key1)])
    await api.start()
    try:
        async with api.client() as c:
            ns = await _namespace(c)
            names = [f"s{i}" for i in range(5)]
            for name in names:
                await c.create(_secret(name, ns))
            stored = raw(f"/registry/secrets/{ns}/s0")
            assert stored.startswith(b"k8s:enc:aesgcm:v1:key1:")
            assert PLAINTEXT not in stored and base64.b64encode(PLAINTEXT) not in stored
            # Reads, lists and the watch cache see plaintext.
            assert (await c.get(core_pb2.Secret, "s0", namespace=ns)).data["password"] == \
                PLAINTEXT
            listed = await c.list(core_pb2.Secret, namespace=ns)
            assert {s.metadata.name for s in listed.items} == set(names)
            assert all(s.data["password"] == PLAINTEXT for s in listed.items)
            # Other kinds are untouched.
            cm = core_pb2.ConfigMap()
            cm.metadata.name, cm.metadata.namespace = "plain", ns
            cm.data["k"] = "visible"
            await c.create(cm)
            assert b"visible" in raw(f"/registry/configmaps/{ns}/plain")

        # Rotation steps 1+2: key2 first (writes), key1 kept (reads). Restart.
        await api.stop()
        _use_keys(cfg, [("key2", key2), ("key1", key1)])
        await api.start()
        async with api.client() as c:
            before = {s.metadata.name: s for s in
                      (await c.list(core_pb2.Secret, namespace=ns)).items}
            assert all(s.data["password"] == PLAINTEXT for s in before.values())
            # Step 3: rewrite every Secret under key2, with the CLI command.
            code, out = await _reencrypt(api, capsys)
            assert code == 0 and "rewrote 5 of " in out, out
            for name in names:
                stored = raw(f"/registry/secrets/{ns}/{name}")
                assert stored.startswith(b"k8s:enc:aesgcm:v1:key2:"), stored[:40]
            after = {s.metadata.name: s for s in
                     (await c.list(core_pb2.Secret, namespace=ns)).items}
            for name, s in after.items():  # same data and identity; only the version moved
                assert s.data == before[name].data
                assert s.metadata.uid == before[name].metadata.uid
                assert s.metadata.generation == before[name].metadata.generation
                assert s.metadata.resource_version != before[name].metadata.resource_version
            # Running it again rewrites nothing.
            code, out = await _reencrypt(api, capsys)
            assert code == 0 and "rewrote 0 of " in out, out

        # Step 4: drop key1. Everything still reads (history under key1 is not replayed).
        await api.stop()
        _use_keys(cfg, [("key2", key2)])
        await api.start()
        async with api.client() as c:
            for name in names:
                s = await c.get(core_pb2.Secret, name, namespace=ns)
                assert s.data["password"] == PLAINTEXT
            listed = await c.list(core_pb2.Secret, namespace=ns, resource_version="0")
            assert len(listed.items) == 5  # from the watch cache
    finally:
        await api.stop()


@pytest.mark.etcd
@pytest.mark.skipif(shutil.which("etcdctl") is None,
                    reason="etcdctl is not installed (Debian package etcd-client)")
async def test_etcd_holds_only_ciphertext_and_rotation_keeps_every_secret_readable(
        own_etcd: EtcdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "encryption.yaml"
    api = InProcessAPIServer(tmp_path, etcd_endpoint=own_etcd.endpoint,
                             encryption_provider_config=str(cfg))
    await _rotation_keeps_every_secret_readable(
        api, cfg, lambda key: _etcdctl_get(own_etcd.endpoint, key), capsys)


async def test_sqlite_rotation_keeps_every_secret_readable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "encryption.yaml"
    db = tmp_path / "state.db"
    api = InProcessAPIServer(tmp_path, sqlite_path=str(db),
                             encryption_provider_config=str(cfg))

    def raw(key: str) -> bytes:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT value FROM kv WHERE CAST(name AS TEXT) = ? "
                               "ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return bytes(row[0])

    await _rotation_keeps_every_secret_readable(api, cfg, raw, capsys)


async def test_sqlite_holds_ciphertext_and_a_value_moved_to_another_key_does_not_decrypt(
        tmp_path: Path) -> None:
    cfg = tmp_path / "encryption.yaml"
    cfg.write_text(default_config_text())
    db = tmp_path / "state.db"
    async with InProcessAPIServer(tmp_path, sqlite_path=str(db),
                                  encryption_provider_config=str(cfg)) as api:
        async with api.client() as c:
            ns = await _namespace(c)
            await c.create(_secret("a", ns, b"value-of-a"))
            await c.create(_secret("b", ns, b"value-of-b"))
            # Watches and the watch cache decrypt too.
            events = c.watch(core_pb2.Secret, namespace=ns, resource_version="1")
            ev = await anext(aiter(events))
            assert ev.object.data["password"] in (b"value-of-a", b"value-of-b")
            await events.aclose()
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT value, prev_value FROM kv WHERE CAST(name AS TEXT) LIKE ?",
                (f"/registry/secrets/{ns}/%",)).fetchall()
        assert rows and all(bytes(v).startswith(b"k8s:enc:aesgcm:v1:key1:") for v, _ in rows)
        assert not any(b"value-of" in bytes(v) + bytes(p or b"") for v, p in rows)
        # Swap a's ciphertext into b's key: the key is bound in, so it is refused.
        assert api.server is not None
        inner = api.server.store
        kv_a = await inner.get(f"/registry/secrets/{ns}/a")
        assert kv_a is not None
        raw_store: Any = api.server.store.inner.inner  # type: ignore[attr-defined]
        stored_a = (await raw_store.get(f"/registry/secrets/{ns}/a")).value
        kv_b = await raw_store.get(f"/registry/secrets/{ns}/b")
        await raw_store.update(f"/registry/secrets/{ns}/b", stored_a,
                               expected_revision=kv_b.mod_revision)
        with pytest.raises(errors.InternalError, match="does not authenticate"):
            await inner.get(f"/registry/secrets/{ns}/b")


@pytest.mark.parametrize(("text", "message"), [
    (_config([("k", base64.b64encode(b"x" * 20).decode())]),
     "resources[0].providers[0].aesgcm.keys[0].secret: the key is 20 bytes"),
    (_config([("k", "not base64!!")]),
     "resources[0].providers[0].aesgcm.keys[0].secret: is not valid base64"),
    (_config([]).replace("aesgcm", "aescbc"),
     "resources[0].providers[0]: provider 'aescbc' is not supported"),
    (_config([("k", new_key_secret())]).replace("identity", "rot13"),
     "resources[0].providers[1]: unknown provider 'rot13'"),
])
def test_a_bad_config_stops_the_server_with_the_field_named(
        tmp_path: Path, text: str, message: str) -> None:
    from apiserver import pki

    pki.init(tmp_path, server_addresses=["127.0.0.1:6443"])
    cfg = tmp_path / "encryption.yaml"
    cfg.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "apiserver.main", "serve", "--data-dir", str(tmp_path),
         "--listen", "127.0.0.1:0", "--join-listen", "", "--metrics-listen", "127.0.0.1:0",
         "--encryption-provider-config", str(cfg)],
        check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert str(cfg) in out.stderr


async def test_a_secret_under_a_removed_key_stops_the_server_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "encryption.yaml"
    db = tmp_path / "state.db"
    _use_keys(cfg, [("key1", new_key_secret())])
    api = InProcessAPIServer(tmp_path, sqlite_path=str(db), encryption_provider_config=str(cfg))
    async with api, api.client() as c:
        await c.create(_secret("orphan", "default"))
    _use_keys(cfg, [("key2", new_key_secret())])  # key1 dropped before a reencrypt
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "apiserver.main", "serve", "--data-dir", str(tmp_path),
        "--sqlite-path", str(db), "--listen", "127.0.0.1:0", "--join-listen", "",
        "--metrics-listen", "127.0.0.1:0", "--controllers", "",
        "--encryption-provider-config", str(cfg)],
        check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "cannot decrypt /registry/secrets/default/orphan" in out.stderr
    assert "k8s:enc:aesgcm:v1:key1:" in out.stderr and "Traceback" not in out.stderr
