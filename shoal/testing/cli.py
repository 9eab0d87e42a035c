"""Running ``shoal`` in-process in integration tests, against a live apiserver.

    r = await run_shoal(config_path, capsys, monkeypatch, "get", "vs", stdin=None)
    ns = await make_namespace(shoal, "traffic")
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.cli.main import main


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def shoal_process(*args: str, config: Path | None = None, timeout: float = 120
                  ) -> subprocess.CompletedProcess[str]:
    """Run ``shoal *args`` as its own process (for tests against a lab), with
    ``SHOAL_CONFIG`` set to ``config`` when given; never raises on a failure."""
    env = dict(os.environ)
    if config is not None:
        env["SHOAL_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


async def run_shoal(config_path: Path | str, capsys: Any, monkeypatch: Any, *args: str,
                    stdin: str | None = None) -> Result:
    """Run ``shoal --config config_path *args`` in a thread; its exit code and output."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--config", str(config_path), *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return Result(code, captured.out, captured.err)


async def make_namespace(shoal: Any, prefix: str) -> str:
    """Apply a fresh Namespace named ``prefix-<random>`` through ``shoal``; its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    r = await shoal("apply", "-f", "-",
                    stdin=f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
    assert r.code == 0, r.err
    return name
