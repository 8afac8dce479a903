"""Parsing of human-written quantities.

Bandwidths are bytes per second throughout the project (``_bps`` means *bytes* per second, the
unit the paper's 500 KB/s-2 MB/s figures use); decimal prefixes (1 MB/s = 1,000,000 B/s).
"""

from __future__ import annotations

import re

_BANDWIDTH_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(B|b|bit|Bit)?\s*(/s|ps)?\s*$")
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_bandwidth_bps(text: str | float | int, *, allow_zero: bool = False) -> float:
    """``"1MB/s"`` -> 1e6 bytes/s; ``"8Mbit/s"`` -> 1e6 bytes/s; a bare number is bytes/s.

    ``allow_zero`` admits 0 (an outage on the emulated link, set through the admin API); elsewhere a
    bandwidth is something to send at, so 0 is rejected here with a clear message.
    """
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _BANDWIDTH_RE.match(text)
        if not match:
            raise ValueError(
                f"cannot parse bandwidth {text!r}: use e.g. '500KB/s', '1MB/s', '8Mbit/s' or bytes/s"
            )
        number, prefix, unit, _ = match.groups()
        value = float(number) * _PREFIX[prefix.lower()]
        if unit in ("b", "bit", "Bit"):
            value /= 8.0
    if value == 0 and allow_zero:
        return 0.0
    if not value > 0:  # also rejects NaN
        raise ValueError(f"bandwidth must be positive, got {text!r}")
    return value


def format_bandwidth(bps: float) -> str:
    for div, name in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "KB/s")):
        if bps >= div:
            return f"{bps / div:g}{name}"
    return f"{bps:g}B/s"


def parse_int_ranges(text: str) -> list[int]:
    """'1-6,8,10' -> [1, 2, 3, 4, 5, 6, 8, 10] (draft lengths on command lines); every value >= 1."""
    out: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.add(int(part))
    if not out or min(out) < 1:
        raise ValueError("draft lengths must be >= 1")
    return sorted(out)
