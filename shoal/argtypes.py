"""argparse ``type=`` converters shared by the daemons' command lines."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number_between(low: float, high: float, *, what: str, unit: str = ""
                   ) -> Callable[[str], float]:
    """A converter to a float in [low, high]; the error names ``what`` (e.g. "a number
    of seconds") and the bounds with ``unit`` (e.g. "seconds")."""
    bounds = f"between {low:g} and {high:g}{' ' + unit if unit else ''}"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if math.isnan(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text}: must be {bounds}")
        return value

    convert.__name__ = what  # argparse names the type in its own messages
    return convert


percent = number_between(0.0, 100.0, what="a percentage", unit="percent")
