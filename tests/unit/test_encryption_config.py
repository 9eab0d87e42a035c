"""Encryption config parsing and the AES-GCM/identity transformer (no storage)."""

from __future__ import annotations

import base64

import pytest
import yaml

from apiserver.encryption import (
    AESGCMKey,
    DecryptError,
    Identity,
    Transformer,
    parse_config,
)
from shoal import errors

K1 = base64.b64encode(b"1" * 32).decode()
K2 = base64.b64encode(b"2" * 16).decode()


def _doc(providers: list[object], resources: list[str] | None = None) -> str:
    return yaml.safe_dump({"apiVersion": "apiserver.config.k8s.io/v1",
                           "kind": "EncryptionConfiguration",
                           "resources": [{"resources": resources or ["secrets"],
                                          "providers": providers}]})


@pytest.mark.parametrize(("text", "message"), [
    ("[]", "(file): must be a YAML mapping"),
    (_doc([]), "resources[0].providers: must list at least one provider"),
    (_doc([{"aesgcm": {"keys": []}}]), "aesgcm.keys: must list at least one key"),
    (_doc([{"aesgcm": {"keys": [{"name": "a", "secret": "%%"}]}}]),
     "keys[0].secret: is not valid base64"),
    (_doc([{"aesgcm": {"keys": [{"name": "a", "secret": base64.b64encode(b"x" * 31).decode()}]}}]),
     "keys[0].secret: the key is 31 bytes; AES-GCM keys are 16, 24 or 32 bytes"),
    (_doc([{"aesgcm": {"keys": [{"name": "a", "secret": K1}, {"name": "a", "secret": K2}]}}]),
     "keys[1].name: duplicate key name 'a'"),
    (_doc([{"aesgcm": {"keys": [{"name": "a:b", "secret": K1}]}}]),
     "keys[0].name: must be a non-empty string without ':'"),
    (_doc([{"secretbox": {"keys": []}}]), "providers[0]: provider 'secretbox' is not supported"),
    (_doc([{"rot13": {}}]), "providers[0]: unknown provider 'rot13'"),
    (_doc([{"identity": {}, "aesgcm": {}}]), "providers[0]: must name exactly one provider"),
    (_doc([{"identity": {}}], ["secretz"]), "resources[0].resources[0]: unknown resource"),
    (_doc([{"identity": {}}], ["*.*"]), "wildcards are not supported"),
    (_doc([{"identity": {}}]).replace("apiserver.config.k8s.io/v1", "v1"), "apiVersion: must be"),
])
def test_bad_configs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(errors.BadRequest) as e:
        parse_config(text, source="enc.yaml", known_resources=["secrets", "configmaps"])
    assert message in e.value.message and "enc.yaml" in e.value.message


def test_a_good_config_maps_resources_to_storage_prefixes() -> None:
    cfg = parse_config(_doc([{"aesgcm": {"keys": [{"name": "k1", "secret": K1}]}},
                             {"identity": {}}], ["secrets", "configmaps"]))
    assert cfg.transformer_for("/registry/secrets/ns/a") is not None
    assert cfg.transformer_for("/registry/configmaps/ns/a") is not None
    assert cfg.transformer_for("/registry/pods/ns/a") is None
    assert cfg.resources == ("secrets", "configmaps")


def _aes(name: str, raw: bytes) -> AESGCMKey:
    return AESGCMKey(name=name, secret=raw)


@pytest.mark.parametrize(("writer", "readers", "stale"), [
    # written under k1, read by a config where k1 still writes: current
    ([_aes("k1", b"1" * 32)], [_aes("k1", b"1" * 32), Identity()], False),
    # written under k1, read where k2 writes and k1 only decrypts: stale
    ([_aes("k1", b"1" * 32)], [_aes("k2", b"2" * 32), _aes("k1", b"1" * 32)], True),
    # written in plaintext, read where aesgcm writes and identity reads: stale
    ([Identity()], [_aes("k1", b"1" * 32), Identity()], True),
])
def test_reads_find_their_key_by_prefix_and_report_staleness(
        writer: list[object], readers: list[object], stale: bool) -> None:
    stored = Transformer(writer).to_storage(b"data", key="/registry/secrets/a/b")  # type: ignore[arg-type]
    read = Transformer(readers).from_storage(stored, key="/registry/secrets/a/b")  # type: ignore[arg-type]
    assert read.plaintext == b"data" and read.stale is stale


def test_ciphertext_is_fresh_per_write_and_bound_to_its_key() -> None:
    t = Transformer([_aes("k1", b"1" * 32)])
    a = t.to_storage(b"data", key="/registry/secrets/a/b")
    b = t.to_storage(b"data", key="/registry/secrets/a/b")
    assert a != b and a.startswith(b"k8s:enc:aesgcm:v1:k1:") and b"data" not in a
    with pytest.raises(DecryptError, match="does not authenticate"):
        t.from_storage(a, key="/registry/secrets/a/c")
    with pytest.raises(DecryptError, match="no configured key"):
        Transformer([_aes("k2", b"2" * 32)]).from_storage(a, key="/registry/secrets/a/b")
    with pytest.raises(DecryptError, match="encrypted"):
        Transformer([Identity()]).from_storage(a, key="/registry/secrets/a/b")
