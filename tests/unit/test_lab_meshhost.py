"""The lab's mesh-only hosts: names, addresses and commands (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import errors
from shoal.lab import meshhost


def test_host_names_and_address() -> None:
    h = meshhost.host(Path("/lab"), 1)
    assert (h.name, h.netns, h.host_veth, h.ip) == (
        "meshhost-1", "shoal-meshhost-1", "shlm-1", "10.77.0.101")
    assert h.data_dir == Path("/lab/meshhosts/meshhost-1")
    with pytest.raises(errors.BadRequest, match="1..20"):
        meshhost.host(Path("/lab"), 0)


def test_agent_runs_in_mesh_host_mode_and_the_app_as_nobody() -> None:
    h = meshhost.host(Path("/lab"), 2)
    argv = meshhost.agent_argv(h, python="python3")
    assert argv[:5] == ["python3", "-P", "-m", "meshagent.main", "run"]
    assert "--mesh-host" in argv and "--capture" in argv
    assert argv[argv.index("--config") + 1] == "/lab/meshhosts/meshhost-2/node.conf"
    app = meshhost.app_argv(h)
    assert app[:2] == ["busybox", "httpd"] and "65534:65534" in app and "10.77.0.102:8080" in app


def test_host_programs_use_the_agents_dns() -> None:
    h = meshhost.host(Path("/lab"), 1)
    conf = meshhost.resolv_conf(h, "shop")
    assert conf.startswith("nameserver 10.77.0.101\nsearch shop.svc.cluster.local ")
