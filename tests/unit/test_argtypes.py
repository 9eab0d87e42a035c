"""shoal.argtypes: bounded numbers on the daemons' command lines."""

from __future__ import annotations

import argparse

import pytest

from shoal import argtypes


@pytest.mark.parametrize("text, message", [
    ("abc", "not a percentage: 'abc'"),
    ("-1", "-1: must be between 0 and 100 percent"),
    ("100.5", "100.5: must be between 0 and 100 percent"),
    ("nan", "nan: must be between 0 and 100 percent"),
])
def test_a_percentage_out_of_range_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        argtypes.percent(text)


def test_in_range_values_and_the_bounds_pass() -> None:
    assert [argtypes.percent(t) for t in ("0", "0.5", "100")] == [0.0, 0.5, 100.0]
    seconds = argtypes.number_between(0.1, 3600, what="a number of seconds", unit="seconds")
    assert seconds("5") == 5.0
    with pytest.raises(argparse.ArgumentTypeError, match="between 0.1 and 3600 seconds"):
        seconds("0")


def test_argparse_reports_the_flag_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--trace-sampling", type=argtypes.percent)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--trace-sampling", "150"])
    assert e.value.code == 2
    assert "--trace-sampling: 150: must be between 0 and 100 percent" in capsys.readouterr().err
