"""The checked-in generated code matches proto/ (regenerate: python tools/genproto.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_generated_code_is_not_stale(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, "tools/genproto.py", "--check"], cwd=repo_root,
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        "shoal/api is stale; run `python tools/genproto.py`:\n" + result.stdout + result.stderr)


def test_every_kind_has_metadata_first(repo_root: Path) -> None:
    from shoal.kinds import builtin_kinds

    for kind in builtin_kinds():
        fields = kind.message.DESCRIPTOR.fields
        assert fields[0].name == "metadata" and fields[0].number == 1, kind.kind
