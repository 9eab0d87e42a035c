"""Resource quantities ("50m", "64Mi", "1.5", "2e3"), parsed and compared as numbers.

A quantity is kept as the user wrote it (``shoal.meta.v1.Quantity.value``) and
turned into an exact :class:`fractions.Fraction` when it is compared or summed,
with Kubernetes' suffixes:

- binary: Ki Mi Gi Ti Pi Ei (powers of 1024)
- decimal: n u m "" k M G T P E (powers of 1000)
- exponent: e<N> / E<N> (powers of ten)
"""

from __future__ import annotations

import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_RE = re.compile(
    r"^(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE](?P<exp>[+-]?\d+))?$"
)


class QuantityError(ValueError):
    """The text is not a quantity."""


def parse(text: str) -> Fraction:
    """The exact value of a quantity string. Raises QuantityError with the reason."""
    if not isinstance(text, str):
        raise QuantityError(f"quantity must be a string, not {type(text).__name__}")
    s = text.strip()
    m = _RE.match(s)
    if m is None:
        raise QuantityError(
            f"quantities must match the regular expression "
            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$', got {text!r}"
        )
    value = Fraction(m.group("num"))
    if m.group("exp") is not None:
        exp = int(m.group("exp"))
        if abs(exp) > 30:
            raise QuantityError(f"quantity exponent out of range in {text!r}")
        return value * Fraction(10) ** exp
    suffix = m.group("suffix") or ""
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    return value * _DECIMAL[suffix]


def milli(text: str) -> int:
    """The value in thousandths, rounded up, as Kubernetes does for CPU."""
    v = parse(text) * 1000
    return -((-v.numerator) // v.denominator)


def to_int(text: str) -> int:
    """The value rounded up to a whole number (bytes, pods)."""
    v = parse(text)
    return -((-v.numerator) // v.denominator)


def format_cpu_milli(m: int) -> str:
    """1500 -> "1500m", 2000 -> "2"."""
    return str(m // 1000) if m % 1000 == 0 else f"{m}m"


def format_bytes(n: int) -> str:
    """The shortest exact binary form: 67108864 -> "64Mi"."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
