"""Parsing of byte sizes and durations as users write them ("512MiB", "2GiB", "30s")."""

from __future__ import annotations

import re

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float) -> int:
    """Parse '512MiB', '2GiB', '1.5G', '1000' or a number into bytes.

    Raises ValueError naming the text when it is not a non-negative size.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a byte size: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"byte size must not be negative: {text!r}")
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 512MiB, 2GiB, 1000000)")
    number, unit = m.groups()
    factor = _BYTE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, KB, MB, GB)"
        )
    return int(float(number) * factor)


def format_bytes(n: int) -> str:
    """Render bytes compactly with binary units ('1.5 GiB')."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str | int | float) -> float:
    """Parse '30s', '250ms', '5m' or a number of seconds into seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 30s, 5m)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
