"""containerd's config.toml from the typed struct, and the process wrapper's
start-up failures (with stand-in binaries; no root, no containerd)."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from nodeagent.containerd import (
    CRI_PLUGIN,
    ContainerdConfig,
    ContainerdError,
    ContainerdProcess,
    _unescape,
    leftover_netns,
    mounts_under,
    render_toml,
    write_registry_hosts,
)
from shoal import errors


def config(tmp_path: Path, **kw: object) -> ContainerdConfig:
    return ContainerdConfig.under(tmp_path / "node", cni_conf_dir=tmp_path / "cni", **kw)


def section(text: str, header: str) -> str:
    """The lines of one [table] of a rendered TOML text."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("["):
            inside = line == header
            continue
        if inside and line:
            out.append(line)
    return "\n".join(out)


def test_rendered_config_has_what_this_machine_needs(tmp_path: Path) -> None:
    cfg = config(tmp_path, sandbox_image="docker.io/shoal/pause:1",
                 registry_config_path=tmp_path / "certs.d")
    text = cfg.render()
    cri_table = section(text, f'[plugins."{CRI_PLUGIN}"]')
    assert "restrict_oom_score_adj = true" in cri_table.splitlines()
    assert 'sandbox_image = "docker.io/shoal/pause:1"' in cri_table.splitlines()
    doc = tomllib.loads(text)
    assert doc["version"] == 2
    assert doc["root"] == str(tmp_path / "node" / "root")
    assert doc["state"] == str(tmp_path / "node" / "state")
    assert doc["grpc"]["address"] == str(tmp_path / "node" / "containerd.sock")
    cri = doc["plugins"][CRI_PLUGIN]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == "docker.io/shoal/pause:1"
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": str(tmp_path / "cni"),
                          "max_conf_num": 1}
    assert cri["registry"]["config_path"] == str(tmp_path / "certs.d")
    assert cri["containerd"]["snapshotter"] == "overlayfs"
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"]["SystemdCgroup"] is False
    assert cri["containerd"]["default_runtime_name"] == "runc"
    # Nothing of this node's containerd lives in shared places.
    assert doc["plugins"]["io.containerd.internal.v1.opt"]["path"].startswith(str(tmp_path))
    assert "io.containerd.snapshotter.v1.overlayfs" not in doc["disabled_plugins"]
    # The metadata GC's checks every 250 ms or so, not every 25 ms (an idle node's
    # containerd woke about 240 times a second at containerd's 0.02).
    assert doc["plugins"]["io.containerd.gc.v1.scheduler"] == {"pause_threshold": 0.002}


def test_options_change_the_rendering(tmp_path: Path) -> None:
    cfg = config(tmp_path, restrict_oom_score_adj=False, systemd_cgroup=True,
                 snapshotter="native", runtime_binary="crun",
                 disabled_plugins=("io.containerd.tracing.processor.v1.otlp",))
    doc = tomllib.loads(cfg.render())
    cri = doc["plugins"][CRI_PLUGIN]
    assert cri["restrict_oom_score_adj"] is False
    assert "registry" not in cri                       # no mirrors configured
    assert cri["containerd"]["snapshotter"] == "native"
    opts = cri["containerd"]["runtimes"]["runc"]["options"]
    assert opts == {"SystemdCgroup": True, "BinaryName": "crun"}
    assert "io.containerd.tracing.processor.v1.otlp" in doc["disabled_plugins"]


def test_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(errors.BadRequest, match="too long"):
        ContainerdConfig.under(tmp_path / ("x" * 120))
    with pytest.raises(errors.BadRequest, match="absolute"):
        ContainerdConfig(root=Path("root"), state=tmp_path, address=tmp_path / "s.sock")


@pytest.mark.parametrize("value", ['quote " and back\\slash', "tab\tnew\nline", "ünï",
                                   "plain"])
def test_toml_strings_round_trip(value: str) -> None:
    doc = tomllib.loads(render_toml({"a": {"b.c": {"k": value, "n": 3, "l": [value]}}}))
    assert doc == {"a": {"b.c": {"k": value, "n": 3, "l": [value]}}}


def test_registry_hosts_file(tmp_path: Path) -> None:
    path = write_registry_hosts(tmp_path, registry="docker.io",
                                endpoint="http://127.0.0.1:5000")
    assert path == tmp_path / "docker.io" / "hosts.toml"
    doc = tomllib.loads(path.read_text())
    assert doc == {"host": {"http://127.0.0.1:5000": {"capabilities": ["pull", "resolve"]}}}


def test_command_uses_nsenter_not_ip_netns_exec(tmp_path: Path) -> None:
    proc = ContainerdProcess(config(tmp_path), netns="node1")
    argv = proc.command()
    assert argv[:2] == ["nsenter", "--net=/var/run/netns/node1"]
    assert argv[2:] == ["containerd", "--config", str(proc.config_file)]
    assert "ip" not in argv
    assert ContainerdProcess(config(tmp_path)).command()[0] == "containerd"


def test_mountinfo_unescaping_and_netns_diff(tmp_path: Path) -> None:
    assert _unescape(r"/tmp/with\040space") == "/tmp/with space"
    assert Path("/proc") in mounts_under(Path("/proc"))
    assert mounts_under(tmp_path) == []
    (tmp_path / "cni-old").touch()
    before = [p.name for p in tmp_path.iterdir()]
    (tmp_path / "cni-new").touch()
    (tmp_path / "node1").touch()
    assert leftover_netns(before, tmp_path) == ["cni-new"]
    assert leftover_netns([], tmp_path / "absent") == []


def stand_in(tmp_path: Path, script: str) -> str:
    path = tmp_path / "bin" / "fake-containerd"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


async def test_start_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    proc = ContainerdProcess(config(tmp_path),
                             binary=stand_in(tmp_path, 'echo "boom: bad config" >&2; exit 3'),
                             start_timeout=10)
    with pytest.raises(ContainerdError) as e:
        await proc.start()
    assert "status 3" in e.value.message and "boom: bad config" in e.value.message
    assert proc.pid is None and not proc.pidfile.exists()
    # The config was written where the command line says.
    assert tomllib.loads(proc.config_file.read_text())["version"] == 2


async def test_start_gives_up_on_a_runtime_that_never_answers(tmp_path: Path) -> None:
    proc = ContainerdProcess(config(tmp_path), binary=stand_in(tmp_path, "exec sleep 60"),
                             start_timeout=0.5, stop_grace=5)
    with pytest.raises(ContainerdError, match="did not become ready"):
        await proc.start()
    assert proc.pid is None
    # The process it started is gone (it was stopped by its PID).
    leftovers = [p for p in os.listdir("/proc") if p.isdigit()
                 and re.search(rb"sleep\x0060", _cmd(int(p)))
                 and _ppid(int(p)) == os.getpid()]
    assert leftovers == []


async def test_a_socket_served_by_someone_else_is_refused(tmp_path: Path) -> None:
    import asyncio

    cfg = config(tmp_path)
    cfg.address.parent.mkdir(parents=True)
    server = await asyncio.start_unix_server(lambda r, w: None, path=str(cfg.address))
    try:
        proc = ContainerdProcess(cfg, binary=stand_in(tmp_path, "exec sleep 60"))
        with pytest.raises(ContainerdError, match="did not start"):
            await proc.start()
        assert proc.pid is None
    finally:
        server.close()
        await server.wait_closed()


def _cmd(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
