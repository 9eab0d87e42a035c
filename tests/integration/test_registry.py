"""``shoal image push`` into a real registry (Debian's docker-registry on a free
loopback port), read back over the distribution API and checked with skopeo."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.cli import imaging
from shoal.cli.main import main
from shoal.images import MEDIA_MANIFEST, ImageRef, OCIArchive, build_busybox_image
from shoal.pushing import push_archive
from shoal.testing.registry import RegistryServer, RegistryStartError

pytestmark = [
    pytest.mark.skipif(shutil.which("docker-registry") is None,
                       reason="docker-registry is not installed (Debian package docker-registry)"),
    pytest.mark.skipif(not Path("/bin/busybox").is_file(),
                       reason="needs /bin/busybox (Debian busybox-static)"),
]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryServer]:
    with RegistryServer() as server:
        yield server


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageRef:
    return build_busybox_image(tmp_path_factory.mktemp("reg") / "hello.tar",
                               name="library/hello:1", cmd=["echo", "hello"],
                               files={"/etc/motd": b"from the registry\n"})


def get(url: str, accept: str = "") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with _OPENER.open(req, timeout=10) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


def test_push_then_read_the_manifest_and_blobs_back(registry: RegistryServer, image: ImageRef,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{registry.address}/library/hello:1"
    assert main(["image", "push", str(image.archive), target, "--insecure"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"pushed {registry.address}/library/hello@{image.digest}")
    status, headers, body = get(f"{registry.url}/v2/library/hello/manifests/1", MEDIA_MANIFEST)
    assert status == 200 and headers["docker-content-digest"] == image.digest
    assert headers["content-type"] == MEDIA_MANIFEST
    with OCIArchive(image.archive) as a:
        assert body == a.read_blob(image.digest)
        for digest in (image.config_digest, image.layer_digest):
            _, _, blob = get(f"{registry.url}/v2/library/hello/blobs/{digest}")
            assert blob == a.read_blob(digest)
    _, _, tags = get(f"{registry.url}/v2/library/hello/tags/list")
    assert json.loads(tags) == {"name": "library/hello", "tags": ["1"]}


def test_pushing_again_is_a_no_op(registry: RegistryServer, image: ImageRef) -> None:
    target = f"{registry.address}/library/hello:1"
    push_archive(image.archive, target, insecure=True)
    again = push_archive(image.archive, target, insecure=True)
    assert again.pushed == () and not again.manifest_pushed


def test_chunked_upload_is_accepted(registry: RegistryServer, image: ImageRef) -> None:
    moved: list[tuple[int, int]] = []
    result = push_archive(image.archive, f"{registry.address}/chunked/hello:1", insecure=True,
                          chunk_size=128 * 1024, on_bytes=lambda d, t: moved.append((d, t)))
    assert result.pushed == (image.config_digest, image.layer_digest)
    # Progress: the bytes sent grow chunk by chunk up to the blobs' total.
    total = moved[-1][1]
    assert moved[-1] == (total, total) and len(moved) > 2
    assert all(a[0] < b[0] for a, b in itertools.pairwise(moved))
    _, headers, _ = get(f"{registry.url}/v2/chunked/hello/manifests/1", MEDIA_MANIFEST)
    assert headers["docker-content-digest"] == image.digest


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_sees_the_pushed_image(registry: RegistryServer, image: ImageRef) -> None:
    push_archive(image.archive, f"{registry.address}/library/hello:1", insecure=True)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw",
         f"docker://{registry.address}/library/hello:1"],
        capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["layers"][0]["digest"] == image.layer_digest
    done = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--config",
         f"docker://{registry.address}/library/hello:1"],
        capture_output=True, text=True, timeout=60, check=False, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["Cmd"] == ["echo", "hello"]


def test_stop_ends_exactly_its_process_and_keeps_given_storage(tmp_path: Path,
                                                               image: ImageRef) -> None:
    storage = tmp_path / "storage"
    server = RegistryServer(storage_dir=storage)
    server.start()
    pid = server.pid
    push_archive(image.archive, f"{server.address}/kept/hello:1", insecure=True)
    server.stop()
    server.stop()                                   # idempotent
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert (storage / "docker" / "registry" / "v2" / "repositories" / "kept").is_dir()
    # A restarted registry on the same storage still has the image.
    with RegistryServer(storage_dir=storage) as again:
        _, headers, _ = get(f"{again.url}/v2/kept/hello/manifests/1", MEDIA_MANIFEST)
        assert headers["docker-content-digest"] == image.digest


def test_a_taken_fixed_port_is_a_clear_start_error(registry: RegistryServer) -> None:
    with pytest.raises(RegistryStartError, match="address already in use"):
        RegistryServer(address=registry.address, start_timeout=10).start()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_shoal_image_push_shows_bytes_on_a_terminal_only(registry: RegistryServer,
                                                         image: ImageRef) -> None:
    target = f"{registry.address}/progress/hello:1"
    out, err = io.StringIO(), _Terminal()
    assert imaging.push(archive=image.archive, target=target, insecure=True, timeout=30,
                        out=out, err=err) == 0
    assert "pushing [" in err.getvalue() and err.getvalue().endswith("\r\033[K")
    assert "pushing" not in out.getvalue() and "pushed " in out.getvalue()
    out, piped = io.StringIO(), io.StringIO()
    assert imaging.push(archive=image.archive, target=target, insecure=True, timeout=30,
                        out=out, err=piped) == 0
    assert piped.getvalue() == ""
