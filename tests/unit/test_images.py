"""OCI image-layout archives built from the host's busybox: structure, digests,
determinism; and image reference normalization."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.images import (
    ANNOTATION_REF_NAME,
    APPLETS,
    ImageRef,
    build_busybox_image,
    build_sandbox_image,
    host_architecture,
    normalize_reference,
)

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(),
                                   reason="needs /bin/busybox (Debian busybox-static)")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}


def blob(files: dict[str, bytes], digest: str) -> bytes:
    return files["blobs/sha256/" + digest.removeprefix("sha256:")]


def build(tmp: Path, **kw: Any) -> ImageRef:
    args: dict[str, Any] = {"name": "shoal/busybox:test", "cmd": ["httpd", "-f", "-p", "80"],
                            "files": {"/var/www/index.html": b"<h1>hi</h1>\n",
                                      "/bin/hello": b"#!/bin/sh\necho hello\n"},
                            "env": {"GREETING": "hi"}}
    args.update(kw)
    return build_busybox_image(tmp / "image.tar", **args)


@needs_busybox
def test_archive_is_an_oci_layout_whose_digests_match(tmp_path: Path) -> None:
    ref = build(tmp_path, entrypoint=["/bin/sh", "-c"], working_dir="/var/www")
    files = read_archive(ref.archive)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["annotations"][ANNOTATION_REF_NAME] == "docker.io/shoal/busybox:test"
    assert ref.name == "docker.io/shoal/busybox:test"
    assert desc["platform"] == {"architecture": host_architecture(), "os": "linux"}
    manifest_bytes = blob(files, desc["digest"])
    assert sha(manifest_bytes) == desc["digest"] == ref.digest
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config_bytes = blob(files, manifest["config"]["digest"])
    assert sha(config_bytes) == manifest["config"]["digest"] == ref.config_digest
    (layer_desc,) = manifest["layers"]
    layer = blob(files, layer_desc["digest"])
    assert sha(layer) == layer_desc["digest"] == ref.layer_digest
    assert layer_desc["size"] == len(layer)
    config = json.loads(config_bytes)
    assert config["os"] == "linux" and config["architecture"] == host_architecture()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha(gzip.decompress(layer))]}
    assert ref.diff_id == config["rootfs"]["diff_ids"][0]
    assert config["config"]["Cmd"] == ["httpd", "-f", "-p", "80"]
    assert config["config"]["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["config"]["WorkingDir"] == "/var/www"
    assert config["config"]["Env"][0].startswith("PATH=") and "GREETING=hi" in \
        config["config"]["Env"]
    # Every blob is referenced, and nothing else is in the archive.
    assert sorted(n for n in files if n.startswith("blobs/sha256/")) == sorted(
        "blobs/sha256/" + d.removeprefix("sha256:")
        for d in (ref.digest, ref.config_digest, ref.layer_digest))


@needs_busybox
def test_layer_holds_busybox_applets_and_files(tmp_path: Path) -> None:
    ref = build(tmp_path)
    files = read_archive(ref.archive)
    layer = blob(files, ref.layer_digest)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        bb = tar.extractfile("bin/busybox").read()  # type: ignore[union-attr]
        index = tar.extractfile("var/www/index.html").read()  # type: ignore[union-attr]
        passwd = tar.extractfile("etc/passwd").read()  # type: ignore[union-attr]
    assert names == sorted(names)
    assert bb == BUSYBOX.read_bytes() and members["bin/busybox"].mode == 0o755
    for applet in ("sh", "httpd", "sleep", "echo", "wget", "nc", "env", "cat", "ls", "id"):
        m = members[f"bin/{applet}"]
        assert m.issym() and m.linkname == "busybox"
    assert set(APPLETS) <= {n.removeprefix("bin/") for n in names if n.startswith("bin/")}
    for d in ("tmp", "dev", "proc", "sys", "etc", "var/www"):
        assert members[d].isdir()
    assert members["tmp"].mode == 0o1777
    assert index == b"<h1>hi</h1>\n" and members["var/www/index.html"].mode == 0o644
    assert members["bin/hello"].mode == 0o755
    assert passwd.startswith(b"root:x:0:0:")
    assert {(m.uid, m.gid, m.mtime) for m in members.values()} == {(0, 0, 946684800)}


@needs_busybox
def test_builds_are_deterministic(tmp_path: Path) -> None:
    a = build(tmp_path / "a")
    b = build(tmp_path / "b")
    assert a.archive.read_bytes() == b.archive.read_bytes()
    assert (a.digest, a.config_digest, a.layer_digest) == (b.digest, b.config_digest,
                                                           b.layer_digest)
    # Another command changes the config, not the layer.
    c = build(tmp_path / "c", cmd=["sleep", "1"])
    assert c.layer_digest == a.layer_digest and c.config_digest != a.config_digest
    # Another file changes the layer.
    d = build(tmp_path / "d", files={"/etc/motd": b"x"})
    assert d.layer_digest != a.layer_digest


@needs_busybox
def test_sandbox_image_sleeps_for_ever(tmp_path: Path) -> None:
    ref = build_sandbox_image(tmp_path / "pause.tar", name="shoal/pause:1")
    files = read_archive(ref.archive)
    config = json.loads(blob(files, ref.config_digest))
    assert config["config"]["Cmd"] == ["sleep", "2147483647"]
    assert ref.name == "docker.io/shoal/pause:1"
    assert ref.ref_by_digest == f"docker.io/shoal/pause@{ref.digest}"


@needs_busybox
@pytest.mark.parametrize("bad", ["../etc/x", "/", "a/../../b"])
def test_bad_file_paths_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(errors.BadRequest):
        build(tmp_path, files={bad: b"x"})


@pytest.mark.parametrize(("ref", "want"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("local/busybox:1", "docker.io/local/busybox:1"),
    ("docker.io/library/nginx", "docker.io/library/nginx:latest"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    ("localhost/app:2", "localhost/app:2"),
    ("busybox@sha256:" + "a" * 64, "docker.io/library/busybox@sha256:" + "a" * 64),
])
def test_normalize_reference(ref: str, want: str) -> None:
    assert normalize_reference(ref) == want


def test_normalize_refuses_nonsense() -> None:
    with pytest.raises(errors.BadRequest):
        normalize_reference(" busybox")
