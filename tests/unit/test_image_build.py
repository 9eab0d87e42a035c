"""``shoal image build``: spec parsing and its errors, images from a directory
(deterministic), reading archives back, and the CLI's exit codes."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from shoal import errors
from shoal.cli.main import main
from shoal.images import (
    ImageFile,
    ImageSpec,
    OCIArchive,
    SpecError,
    build_from_spec,
    build_sandbox_image,
    inspect_archive,
    parse_spec,
    tree_files,
)

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(),
                                   reason="needs /bin/busybox (Debian busybox-static)")


def layer_members(archive: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    """Path -> (entry, content) of the image's single layer."""
    with OCIArchive(archive) as a:
        (image,) = a.images
        _, layer_digest = a.blob_digests(image)
        layer = gzip.decompress(a.read_blob(layer_digest))
    out = {}
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() else None
            out[m.name] = (m, f.read() if f else b"")
    return out


def image_config(archive: Path) -> dict[str, Any]:
    with OCIArchive(archive) as a:
        (image,) = a.images
        config = json.loads(a.read_blob(a.blob_digests(image)[0]))
    assert isinstance(config, dict)
    return config


# -- spec parsing ------------------------------------------------------------------

def test_a_full_spec_is_parsed(tmp_path: Path) -> None:
    (tmp_path / "serve.sh").write_text("#!/bin/sh\nexec httpd -f\n")
    (tmp_path / "serve.sh").chmod(0o755)
    (tmp_path / "data.txt").write_text("plain")
    spec = parse_spec({
        "name": "hello:1",
        "base": "busybox",
        "files": {"/var/www/index.html": "<h1>hi</h1>",
                  "/bin/serve": {"from": "serve.sh"},
                  "/srv/data": {"from": "data.txt"},
                  "/etc/app.conf": {"content": "x=1", "mode": "0600"},
                  "/etc/other": {"content": "y", "mode": 0o640}},
        "env": {"PORT": 8080, "GREETING": "hi"},
        "entrypoint": ["/bin/serve"],
        "cmd": ["-v"],
        "workingDir": "/var/www",
        "user": 65534,
        "labels": {"team": "web"},
    }, base_dir=tmp_path)
    assert spec.name == "hello:1" and spec.base == "busybox"
    assert spec.files["var/www/index.html"] == ImageFile(data=b"<h1>hi</h1>")
    assert spec.files["bin/serve"] == ImageFile(data=b"#!/bin/sh\nexec httpd -f\n",
                                                 mode=0o755)
    assert spec.files["srv/data"] == ImageFile(data=b"plain")
    assert spec.files["etc/app.conf"] == ImageFile(data=b"x=1", mode=0o600)
    assert spec.files["etc/other"].mode == 0o640
    assert spec.env == {"PORT": "8080", "GREETING": "hi"}
    assert (spec.entrypoint, spec.cmd) == (("/bin/serve",), ("-v",))
    assert (spec.working_dir, spec.user, spec.labels) == ("/var/www", "65534", {"team": "web"})


def test_an_empty_spec_is_plain_busybox(tmp_path: Path) -> None:
    assert parse_spec(None, base_dir=tmp_path) == ImageSpec()
    assert parse_spec({}, base_dir=tmp_path) == ImageSpec()


@pytest.mark.parametrize(("spec", "problem"), [
    ({"nmae": "x"}, "unknown field 'nmae' (known: name, base"),
    ({"name": 3}, "name: must be a string"),
    ({"name": " bad"}, "name: ' bad' is not an image reference"),
    ({"base": "alpine"}, "base: 'alpine' is not supported (supported: busybox)"),
    ({"files": ["a"]}, "files: must be a mapping"),
    ({"files": {"etc/x": "y"}}, 'files["etc/x"]: the path must be absolute'),
    ({"files": {"/../x": "y"}}, 'files["/../x"]: not a path inside the image'),
    ({"files": {"/": "y"}}, 'files["/"]: not a path inside the image'),
    ({"files": {"/x": 3}}, 'files["/x"]: must be the file\'s text, or a mapping'),
    ({"files": {"/x": {"content": "a", "from": "b"}}},
     'files["/x"]: give exactly one of content or from'),
    ({"files": {"/x": {}}}, 'files["/x"]: give exactly one of content or from'),
    ({"files": {"/x": {"content": 1}}}, 'files["/x"].content: must be a string'),
    ({"files": {"/x": {"content": "a", "mode": "rwx"}}},
     'files["/x"].mode: \'rwx\' is not an octal mode'),
    ({"files": {"/x": {"content": "a", "mode": 0o10000}}},
     'files["/x"].mode: 0o10000 is out of range'),
    ({"files": {"/x": {"content": "a", "owner": "me"}}},
     'files["/x"]: unknown field \'owner\''),
    ({"files": {"/x": {"from": "missing.txt"}}},
     'files["/x"].from: cannot read'),
    ({"files": {"/x": {"from": "/etc/passwd"}}},
     'files["/x"].from: /etc/passwd must be relative to the spec\'s directory'),
    ({"files": {"/x": {"from": "sub"}}}, 'files["/x"].from: '),
    ({"env": ["A=b"]}, "env: must be a mapping of names to strings"),
    ({"env": {"A": [1]}}, "env.A: must be a string, not list"),
    ({"env": {"A": True}}, "env.A: must be a string, not bool"),
    ({"env": {"A=B": "c"}}, "env.A=B: a variable name cannot contain '='"),
    ({"labels": {"a": None}}, "labels.a: must be a string, not NoneType"),
    ({"cmd": "echo hi"}, "cmd: must be a list of strings"),
    ({"entrypoint": ["sh", 1]}, "entrypoint: must be a list of strings"),
    ({"workingDir": "app"}, "workingDir: must be an absolute path"),
    ({"user": ["root"]}, "user: must be a string"),
])
def test_bad_spec_fields_are_named(tmp_path: Path, spec: dict[str, Any], problem: str
                                   ) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(SpecError) as e:
        parse_spec(spec, base_dir=tmp_path, source="app.yaml")
    assert any(p.startswith("app.yaml: ") and problem in p for p in e.value.problems), \
        e.value.problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"base": "x", "cmd": "y", "workingDir": "z", "extra": 1},
                   base_dir=tmp_path, source="s.yaml")
    assert len(e.value.problems) == 4
    assert isinstance(e.value, errors.BadRequest)


def test_a_spec_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="must be a mapping of fields"):
        parse_spec(["x"], base_dir=tmp_path, source="s.yaml")


# -- directories -------------------------------------------------------------------

def make_tree(root: Path) -> Path:
    (root / "www" / "img").mkdir(parents=True)
    (root / "www" / "index.html").write_text("<h1>tree</h1>\n")
    (root / "www" / "img" / "empty").mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "run").write_text("echo run\n")
    (root / "bin" / "run").chmod(0o700)
    (root / "tmp").mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("from the tree\n")
    os.symlink("www/index.html", root / "index")
    (root / "shoal-image.yaml").write_text("cmd: [run]\n")
    return root


def test_tree_files_keep_content_modes_links_and_empty_dirs(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    files = tree_files(root, exclude=[root / "shoal-image.yaml"])
    assert "shoal-image.yaml" not in files
    assert files["www/index.html"] == ImageFile(data=b"<h1>tree</h1>\n", mode=0o644)
    assert files["bin/run"] == ImageFile(data=b"echo run\n", mode=0o755)
    assert files["index"] == ImageFile(link="www/index.html")
    assert files["www/img/empty"] == ImageFile(directory=True)


def test_tree_files_refuse_what_an_image_cannot_hold(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SpecError, match="pipe: not a regular file"):
        tree_files(tmp_path)
    with pytest.raises(SpecError, match="not a directory"):
        tree_files(tmp_path / "pipe")


@needs_busybox
def test_an_image_from_a_directory_is_deterministic(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=True)
    # Other times and owners change nothing.
    os.utime(b / "www" / "index.html", (1, 1))
    if os.geteuid() == 0:
        os.chown(b / "etc" / "motd", 1234, 1234)
    spec = parse_spec({"cmd": ["run"], "files": {"/etc/motd": "from the spec\n"}},
                      base_dir=a)
    ra = build_from_spec(tmp_path / "a.tar", spec, name="tree:1",
                         tree=tree_files(a, exclude=[a / "shoal-image.yaml"]))
    rb = build_from_spec(tmp_path / "b.tar", spec, name="tree:1",
                         tree=tree_files(b, exclude=[b / "shoal-image.yaml"]))
    assert ra.archive.read_bytes() == rb.archive.read_bytes()
    assert (ra.digest, ra.layer_digest) == (rb.digest, rb.layer_digest)
    members = layer_members(ra.archive)
    assert members["www/index.html"][1] == b"<h1>tree</h1>\n"
    assert members["bin/run"][0].mode == 0o755
    assert members["index"][0].issym() and members["index"][0].linkname == "www/index.html"
    assert members["www/img/empty"][0].isdir()
    assert members["tmp"][0].mode == 0o1777          # the base's mode is kept
    assert members["etc/motd"][1] == b"from the spec\n"  # the spec wins over the tree
    assert members["bin/sh"][0].issym()              # busybox is still there
    assert "shoal-image.yaml" not in members
    # A changed file changes the layer.
    (b / "www" / "index.html").write_text("changed\n")
    rc = build_from_spec(tmp_path / "c.tar", spec, name="tree:1",
                         tree=tree_files(b, exclude=[b / "shoal-image.yaml"]))
    assert rc.layer_digest != ra.layer_digest


@needs_busybox
def test_spec_config_fields_reach_the_image_config(tmp_path: Path) -> None:
    spec = parse_spec({"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo $A"],
                       "env": {"A": "b"}, "user": "65534", "labels": {"k": "v"},
                       "workingDir": "/tmp"}, base_dir=tmp_path)
    ref = build_from_spec(tmp_path / "i.tar", spec, name="cfg:1")
    config = image_config(ref.archive)["config"]
    assert config["Entrypoint"] == ["/bin/sh", "-c"] and config["Cmd"] == ["echo $A"]
    assert "A=b" in config["Env"] and config["Env"][0].startswith("PATH=")
    assert (config["User"], config["Labels"], config["WorkingDir"]) == (
        "65534", {"k": "v"}, "/tmp")
    # Without cmd or entrypoint the image runs a shell; with only an entrypoint, no cmd.
    plain = build_from_spec(tmp_path / "p.tar", ImageSpec(), name="plain:1")
    assert image_config(plain.archive)["config"]["Cmd"] == ["sh"]
    assert "User" not in image_config(plain.archive)["config"]
    only_ep = build_from_spec(tmp_path / "e.tar", ImageSpec(entrypoint=("httpd",)),
                              name="ep:1")
    assert image_config(only_ep.archive)["config"]["Cmd"] == []


@needs_busybox
def test_a_file_inside_a_file_is_refused(tmp_path: Path) -> None:
    spec = ImageSpec(files={"etc/passwd/x": ImageFile(data=b"x")})
    with pytest.raises(errors.BadRequest, match="/etc/passwd is a file"):
        build_from_spec(tmp_path / "x.tar", spec, name="x:1")


def test_an_image_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no image name"):
        build_from_spec(tmp_path / "x.tar", ImageSpec())


# -- reading archives back -----------------------------------------------------------

@needs_busybox
def test_archives_are_read_back_and_damage_is_found(tmp_path: Path) -> None:
    ref = build_sandbox_image(tmp_path / "pause.tar")
    (image,) = inspect_archive(ref.archive)
    assert (image.name, image.digest) == ("docker.io/shoal/pause:1", ref.digest)
    # Flip one byte of the layer blob: verify() names it.
    bad = tmp_path / "bad.tar"
    with tarfile.open(ref.archive) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            f = src.extractfile(m) if m.isfile() else None
            data = f.read() if f else b""
            if m.name.endswith(ref.layer_digest.removeprefix("sha256:")):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(m, io.BytesIO(data) if f else None)
    with pytest.raises(errors.BadRequest, match=f"blob {ref.layer_digest} does not match"):
        inspect_archive(bad)
    with pytest.raises(errors.NotFound):
        inspect_archive(tmp_path / "missing.tar")
    (tmp_path / "junk.tar").write_bytes(b"junk")
    with pytest.raises(errors.BadRequest, match="not a tar archive"):
        inspect_archive(tmp_path / "junk.tar")
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(errors.BadRequest, match="no oci-layout"):
        inspect_archive(tmp_path / "empty.tar")


# -- the CLI -------------------------------------------------------------------------

@needs_busybox
def test_cli_builds_from_a_directory_with_its_spec(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = make_tree(tmp_path / "app")
    (root / "shoal-image.yaml").write_text(
        "name: app:1\ncmd: [run]\nfiles:\n  /etc/motd: {from: www/index.html}\n")
    assert main(["image", "build", str(root), "-o", str(tmp_path / "app.tar")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("built docker.io/library/app:1 sha256:")
    members = layer_members(tmp_path / "app.tar")
    assert members["etc/motd"][1] == b"<h1>tree</h1>\n"
    assert "shoal-image.yaml" not in members
    # -t overrides the spec's name; the same content gives the same digest.
    assert main(["image", "build", "-t", "other/app:2", str(root), "-o",
                 str(tmp_path / "app2.tar")]) == 0
    assert capsys.readouterr().out.split()[2] == out.split()[2]
    assert [i.name for i in inspect_archive(tmp_path / "app2.tar")] == [
        "docker.io/other/app:2"]


@needs_busybox
def test_cli_sandbox_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "build", "--sandbox", "-o", str(tmp_path / "p.tar")]) == 0
    assert "docker.io/shoal/pause:1" in capsys.readouterr().out
    assert image_config(tmp_path / "p.tar")["config"]["Cmd"] == ["sleep", "2147483647"]
    assert main(["image", "build", "--sandbox", "-f", "x.yaml", "-o", "p.tar"]) == 2
    assert "--sandbox takes no spec" in capsys.readouterr().err


def test_cli_reports_every_spec_problem_with_exit_code_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("base: alpine\ncmd: echo\nfiles:\n  /x: {from: nope}\n")
    assert main(["image", "build", "-t", "x:1", "-f", str(spec), "-o",
                 str(tmp_path / "x.tar")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith(f"error: {spec}: ") for line in err)
    assert not (tmp_path / "x.tar").exists()
    spec.write_text("a: 1\na: 2\n")
    assert main(["image", "build", "-t", "x:1", "-f", str(spec), "-o", "x.tar"]) == 2
    assert "duplicate key" in capsys.readouterr().err
    assert main(["image", "build", "-f", str(tmp_path / "none.yaml"), "-o", "x.tar",
                 "-t", "x:1"]) == 2
    assert "cannot read the image spec" in capsys.readouterr().err
    assert main(["image", "build", "-t", "x:1", str(tmp_path / "nodir"), "-o", "x.tar"]) == 2
    assert "not a directory" in capsys.readouterr().err
