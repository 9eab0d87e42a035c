"""shoal.files.write_atomic: readers see the old file or the new one, never a part."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.files import write_atomic


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_writes_the_data_with_the_mode_asked(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "sub" / "key.pem"
    write_atomic(path, b"secret", mode=mode)
    assert path.read_bytes() == b"secret"
    assert path.stat().st_mode & 0o777 == mode


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "conf"
    write_atomic(path, b"old")

    def broken(src: str, dst: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]
