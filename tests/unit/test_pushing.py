"""``shoal image push`` against an in-process fake registry: the exact requests,
chunked uploads, idempotent re-push, and errors that name the step and status."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import errors
from shoal.cli.main import main
from shoal.images import MEDIA_MANIFEST, ImageRef, OCIArchive, build_busybox_image
from shoal.pushing import RegistryError, Target, parse_target, push_archive
from shoal.testing.registry import FakeRegistry

BUSYBOX = Path("/bin/busybox")
pytestmark = pytest.mark.skipif(not BUSYBOX.is_file(),
                                reason="needs /bin/busybox (Debian busybox-static)")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageRef:
    return build_busybox_image(tmp_path_factory.mktemp("push") / "hello.tar",
                               name="library/hello:1", cmd=["echo", "hello"])


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    with FakeRegistry() as fake:
        yield fake


def sequence(fake: FakeRegistry) -> list[str]:
    return [f"{r.method} {r.path.split('?')[0]}" for r in fake.requests]


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:5000/library/hello:1", Target("127.0.0.1:5000", "library/hello", "1")),
    ("10.77.0.1:5000/hello", Target("10.77.0.1:5000", "hello", "latest")),
    ("localhost/a/b/c:v1.2-x", Target("localhost", "a/b/c", "v1.2-x")),
    ("registry.example:443/team/app_x:2", Target("registry.example:443", "team/app_x", "2")),
])
def test_targets(text: str, want: Target) -> None:
    assert parse_target(text) == want
    assert str(want) == (text if ":" in text.rsplit("/", 1)[-1] else text + ":latest")


@pytest.mark.parametrize(("text", "problem"), [
    ("library/hello:1", "names no registry"),
    ("hello", "names no registry"),
    ("127.0.0.1:5000/Hello:1", "'Hello' is not a valid repository name component"),
    ("127.0.0.1:5000/hello@sha256:" + "a" * 64, "push to a tag, not a digest"),
    ("127.0.0.1:5000/hello:-x", "'-x' is not a valid tag"),
])
def test_bad_targets(text: str, problem: str) -> None:
    with pytest.raises(errors.BadRequest, match=problem):
        parse_target(text)


def test_push_sends_the_exact_request_sequence(image: ImageRef,
                                               registry: FakeRegistry) -> None:
    lines: list[str] = []
    result = push_archive(image.archive, f"{registry.address}/library/hello:1",
                          insecure=True, progress=lines.append)
    repo = "/v2/library/hello"
    assert sequence(registry) == [
        "GET /v2/",
        f"HEAD {repo}/blobs/{image.config_digest}",
        f"POST {repo}/blobs/uploads/",
        f"PUT {repo}/blobs/uploads/{registry.requests[3].path.split('/')[-1].split('?')[0]}",
        f"HEAD {repo}/blobs/{image.layer_digest}",
        f"POST {repo}/blobs/uploads/",
        f"PUT {repo}/blobs/uploads/{registry.requests[6].path.split('/')[-1].split('?')[0]}",
        f"HEAD {repo}/manifests/1",
        f"PUT {repo}/manifests/1",
    ]
    # The upload PUTs keep the Location's own query and add the digest.
    put_config = registry.requests[3]
    assert put_config.path.endswith(f"?_state=s0&digest={image.config_digest}")
    assert put_config.headers["content-type"] == "application/octet-stream"
    manifest_put = registry.requests[-1]
    assert manifest_put.headers["content-type"] == MEDIA_MANIFEST
    with OCIArchive(image.archive) as a:
        manifest_bytes = a.read_blob(image.digest)
        assert registry.blobs("library/hello") == {
            d: a.read_blob(d) for d in (image.config_digest, image.layer_digest)}
    assert manifest_put.body == manifest_bytes        # byte for byte: same digest
    assert registry.manifest("library/hello", "1") == (MEDIA_MANIFEST, manifest_bytes)
    assert result.digest == image.digest and result.manifest_pushed
    assert result.pushed == (image.config_digest, image.layer_digest) and not result.skipped
    assert result.reference_by_digest == f"{registry.address}/library/hello@{image.digest}"
    assert lines[-1] == f"manifest {image.digest[:19]}: pushed"


def test_pushing_again_uploads_nothing(image: ImageRef, registry: FakeRegistry) -> None:
    target = f"{registry.address}/library/hello:1"
    push_archive(image.archive, target, insecure=True)
    registry.clear_requests()
    again = push_archive(image.archive, target, insecure=True)
    assert sequence(registry) == [
        "GET /v2/",
        f"HEAD /v2/library/hello/blobs/{image.config_digest}",
        f"HEAD /v2/library/hello/blobs/{image.layer_digest}",
        "HEAD /v2/library/hello/manifests/1",
    ]
    assert again.pushed == () and not again.manifest_pushed
    assert again.skipped == (image.config_digest, image.layer_digest)
    # Another tag of the same image: blobs skipped, only the manifest is written.
    registry.clear_requests()
    other = push_archive(image.archive, f"{registry.address}/library/hello:2", insecure=True)
    assert other.manifest_pushed and other.pushed == ()
    assert sequence(registry)[-1] == "PUT /v2/library/hello/manifests/2"


def test_big_blobs_go_up_in_chunks(image: ImageRef) -> None:
    with FakeRegistry(absolute_locations=True) as fake:
        size = OCIArchive(image.archive).blob_size(image.layer_digest)
        chunk = 256 * 1024
        push_archive(image.archive, f"{fake.address}/library/hello:1", insecure=True,
                     chunk_size=chunk)
        layer = [r for r in fake.requests if r.method in ("PATCH", "PUT")
                 and "/uploads/" in r.path][1:]   # the first PUT is the (small) config
        patches, final = layer[:-1], layer[-1]
        assert [p.method for p in patches] == ["PATCH"] * -(-size // chunk)
        starts = [int(p.headers["content-range"].split("-")[0]) for p in patches]
        assert starts == list(range(0, size, chunk))
        assert all(int(p.headers["content-range"].split("-")[1]) ==
                   s + len(p.body) - 1 for p, s in zip(patches, starts, strict=True))
        assert final.method == "PUT" and final.body == b""
        assert f"digest={image.layer_digest}" in final.path
        with OCIArchive(image.archive) as a:
            assert fake.blobs("library/hello")[image.layer_digest] == a.read_blob(
                image.layer_digest)


def test_a_registry_that_wants_credentials_is_refused_clearly(image: ImageRef) -> None:
    with FakeRegistry(require_auth=True) as fake:
        with pytest.raises(errors.Unauthorized) as e:
            push_archive(image.archive, f"{fake.address}/library/hello:1", insecure=True)
        assert "checking the registry API (GET /v2/)" in e.value.message
        assert "HTTP 401" in e.value.message
        assert "does not support registry authentication" in e.value.message
        assert len(fake.requests) == 1


@pytest.mark.parametrize(("fail", "step"), [
    (("GET", "base"), "checking the registry API (GET /v2/): HTTP 503"),
    (("HEAD", "blob"), "checking blob sha256:"),
    (("POST", "upload"), "starting the upload of blob sha256:"),
    (("PUT", "upload"), "uploading blob sha256:"),
    (("PUT", "manifest"), "putting manifest sha256:"),
])
def test_a_refusal_names_the_step_and_status(image: ImageRef, fail: tuple[str, str],
                                             step: str) -> None:
    with FakeRegistry(fail={fail: 503}) as fake, pytest.raises(RegistryError) as e:
        push_archive(image.archive, f"{fake.address}/library/hello:1", insecure=True)
    assert e.value.http_status == 503
    assert step in e.value.message and "HTTP 503" in e.value.message
    if fail[0] != "HEAD":                          # HEAD answers carry no body
        assert "SCRIPTED" in e.value.message      # the registry's own error code


def test_an_unreachable_registry(image: ImageRef) -> None:
    with FakeRegistry() as fake:
        address = fake.address
    with pytest.raises(errors.Unavailable, match=f"cannot reach registry http://{address}"):
        push_archive(image.archive, f"{address}/library/hello:1", insecure=True, timeout=2)


def test_a_damaged_archive_sends_nothing(image: ImageRef, registry: FakeRegistry,
                                         tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    with tarfile.open(image.archive) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            f = src.extractfile(m) if m.isfile() else None
            data = f.read() if f else b""
            if m.name.endswith(image.layer_digest.removeprefix("sha256:")):
                data = bytes(len(data))
            dst.addfile(m, io.BytesIO(data) if f else None)
    with pytest.raises(errors.BadRequest, match="does not match its digest"):
        push_archive(bad, f"{registry.address}/library/hello:1", insecure=True)
    assert registry.requests == []


def test_cli_push_and_its_exit_codes(image: ImageRef, registry: FakeRegistry,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{registry.address}/library/hello:1"
    assert main(["image", "push", str(image.archive), target, "--insecure"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"pushed {registry.address}/library/hello@{image.digest}"
    assert main(["image", "push", str(image.archive), target, "--insecure"]) == 0
    assert "already there" in capsys.readouterr().out
    assert main(["image", "push", str(image.archive), "hello:1"]) == 2
    assert "names no registry" in capsys.readouterr().err
    with FakeRegistry(require_auth=True) as locked:
        assert main(["image", "push", str(image.archive),
                     f"{locked.address}/library/hello:1", "--insecure"]) == 1
    assert "does not support registry authentication" in capsys.readouterr().err
    with FakeRegistry() as gone:
        address = gone.address
    assert main(["image", "push", str(image.archive), f"{address}/x:1", "--insecure",
                 "--timeout", "2"]) == 3
    assert "cannot reach registry" in capsys.readouterr().err
