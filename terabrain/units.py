"""Sizes as users write them (``80GB``, ``80GiB``) and as `terabrain plan` prints them."""

from __future__ import annotations

import re

from terabrain.errors import ConfigError

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*$")


def parse_memory(text: str, option: str = "--gpu-memory") -> int:
    """``80GB`` (10^9), ``80GiB`` (2^30), ``512MB``, ``1.5TB`` ... -> bytes."""
    match = _MEMORY.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{option}: expected a size with a unit, such as 80GB, 80GiB or 512MB "
            f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{option}: must be more than 0 bytes, got {text!r}")
    return value


def format_bytes(count: float) -> str:
    """Decimal units, three significant digits: 39.3 GB, 55.1 MB, 0 B."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        count /= 1000.0
        if count < 999.5 or unit == "PB":
            digits = 2 if count < 9.995 else (1 if count < 99.95 else 0)
            return f"{count:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    """9830646608 -> '9.83 B', 3149824 -> '3.15 M'."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {suffix}"
    return str(count)


def format_seconds(seconds: float) -> str:
    """412 us, 35.2 ms, 1.25 s, 3.4 h, 8.1 d: three significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    for limit, scale, unit in ((60, 1, "s"), (3600, 60, "min"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 86400:.3g} d"
