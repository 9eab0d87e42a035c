"""Registry mirrors for the node agent's containerd: ``--registry-mirror
REGISTRY=URL`` parsing, and the hosts.toml files it turns into."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nodeagent.containerd import (
    RegistryMirror,
    parse_registry_mirror,
    write_registry_hosts,
    write_registry_mirrors,
)
from nodeagent.main import _parser
from shoal import errors


@pytest.mark.parametrize(("text", "want"), [
    ("docker.io=http://10.77.0.1:5000", RegistryMirror("docker.io", "http://10.77.0.1:5000")),
    ("10.77.0.1:5000=http://10.77.0.1:5000/",
     RegistryMirror("10.77.0.1:5000", "http://10.77.0.1:5000")),
    ("registry.k8s.io=https://mirror.example",
     RegistryMirror("registry.k8s.io", "https://mirror.example")),
])
def test_mirrors_parse(text: str, want: RegistryMirror) -> None:
    assert parse_registry_mirror(text) == want


@pytest.mark.parametrize(("text", "problem"), [
    ("docker.io", "must be REGISTRY=URL"),
    ("=http://x:5000", "must be REGISTRY=URL"),
    ("docker.io=", "must be REGISTRY=URL"),
    ("docker.io/library=http://x:5000", "is not a registry host"),
    ("docker.io=10.77.0.1:5000", "must be an http:// or https:// URL"),
    ("docker.io=ftp://10.77.0.1", "must be an http:// or https:// URL"),
    ("docker.io=http://x:5000/v2/sub", "must be an http:// or https:// URL"),
])
def test_bad_mirrors_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(errors.BadRequest, match=problem):
        parse_registry_mirror(text)


def test_the_agent_takes_repeated_mirrors(capsys: pytest.CaptureFixture[str]) -> None:
    ns = _parser().parse_args([
        "run", "--node-ip", "10.77.0.11", "--registry-mirror", "docker.io=http://10.77.0.1:5000",
        "--registry-mirror", "10.77.0.1:5000=http://10.77.0.1:5000"])
    assert ns.registry_mirrors == [RegistryMirror("docker.io", "http://10.77.0.1:5000"),
                                   RegistryMirror("10.77.0.1:5000", "http://10.77.0.1:5000")]
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--node-ip", "1.2.3.4", "--registry-mirror", "nope"])
    assert "must be REGISTRY=URL" in capsys.readouterr().err


def test_mirror_files_pin_the_registry_to_the_mirror(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    (certs / "old.example").mkdir(parents=True)
    (certs / "old.example" / "hosts.toml").write_text("server = 'https://old'\n")
    written = write_registry_mirrors(certs, [
        RegistryMirror("docker.io", "http://10.77.0.1:5000"),
        RegistryMirror("10.77.0.1:5000", "http://10.77.0.1:5000")])
    assert written == [certs / "docker.io" / "hosts.toml",
                       certs / "10.77.0.1:5000" / "hosts.toml"]
    assert sorted(p.name for p in certs.iterdir()) == ["10.77.0.1:5000", "docker.io"]
    doc = tomllib.loads(written[0].read_text())
    # The mirror is also the server: containerd never falls back to registry-1.docker.io.
    assert doc == {"server": "http://10.77.0.1:5000", "capabilities": ["pull", "resolve"],
                   "host": {"http://10.77.0.1:5000": {"capabilities": ["pull", "resolve"]}}}
    # Idempotent, and no mirror at all leaves an empty directory.
    assert write_registry_mirrors(certs, []) == []
    assert list(certs.iterdir()) == []


def test_plain_hosts_file_keeps_the_upstream(tmp_path: Path) -> None:
    path = write_registry_hosts(tmp_path, registry="docker.io",
                                endpoint="https://mirror.example", skip_verify=True)
    assert tomllib.loads(path.read_text()) == {"host": {"https://mirror.example": {
        "capabilities": ["pull", "resolve"], "skip_verify": True}}}
