"""Parse quantities written with unit suffixes: sizes, bandwidths, durations.

All results are in base SI units: bytes, bytes per second, seconds.
Bandwidths accept bits (``10Gbps``, ``100Mbps``) or bytes (``600GB/s``, ``25GiB/s``).
"""
from __future__ import annotations

import math
import re

from .yamlio import show

_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_SIZE = {
    "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
}
_BITRATE = {"bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8, "tbps": 1e12 / 8}
_BYTERATE = {k + "/s": v for k, v in _SIZE.items()}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class UnitError(ValueError):
    """A quantity that does not parse; the message says what was expected."""


def _parse(value, table: dict, what: str, example: str) -> float:
    if isinstance(value, bool):
        raise UnitError(f"expected a {what} like {example!r}, got {show(value)}")
    if isinstance(value, (int, float)):
        raise UnitError(f"{show(value)} has no unit; write a {what} like {example!r}")
    if not isinstance(value, str):
        raise UnitError(f"expected a {what} like {example!r}, got {type(value).__name__}")
    m = re.fullmatch(r"\s*" + _NUM + r"\s*([A-Za-zµ/]+)\s*", value)
    if not m:
        raise UnitError(f"cannot parse {show(value)} as a {what} (example: {example!r})")
    number, unit = float(m.group(1)), m.group(2)
    # Case matters for bits vs bytes only in the b/B distinction; accept common spellings.
    key = unit.lower()
    if table is _BITRATE or table is _BYTERATE:
        if unit.endswith("/s"):
            # "GB/s" and "GiB/s" are bytes; "Gb/s" (lower-case b) is bits, like "Gbps".
            if unit[:-2].endswith("b"):
                key, table = unit[:-2].lower() + "ps", _BITRATE
            else:
                table = _BYTERATE
        elif unit.endswith("ps"):
            if len(unit) >= 3 and unit[-3] == "B":  # e.g. "GBps" means bytes
                key = key[:-2] + "/s"
                table = _BYTERATE
            else:
                table = _BITRATE
        else:
            table = _BYTERATE
    if key not in table:
        raise UnitError(f"unknown unit {show(unit)} in {show(value)}; use one of {', '.join(_units_for(what))}")
    result = number * table[key]
    if not math.isfinite(result):
        raise UnitError(f"{show(value)} is not a finite {what}")
    return result


def _units_for(what: str) -> list[str]:
    if what == "size":
        return ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]
    if what == "bandwidth":
        return ["Mbps", "Gbps", "MB/s", "GB/s", "GiB/s"]
    return ["s", "ms", "us", "ns"]


def parse_size(value) -> float:
    """``"24GB"`` -> 24e9 bytes; ``"16GiB"`` -> 16 * 2**30 bytes."""
    return _parse(value, _SIZE, "size", "24GB")


def parse_bandwidth(value) -> float:
    """``"10Gbps"`` -> 1.25e9 bytes/s; ``"600GB/s"`` -> 6e11 bytes/s."""
    return _parse(value, _BITRATE, "bandwidth", "10Gbps")


def parse_time(value) -> float:
    """``"0.5ms"`` -> 5e-4 s."""
    return _parse(value, _TIME, "duration", "0.5ms")


def format_size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def format_bandwidth(bps: float) -> str:
    bits = bps * 8
    if bits >= 1e9:
        return f"{bits / 1e9:g} Gbps"
    return f"{bits / 1e6:g} Mbps"


# ---- exact spellings, for specs hexplan writes (a plan's cluster section) -------------------

def _exact(value: float, parse, spellings) -> str:
    """The shortest spelling that parses back to exactly ``value`` (the last one always does)."""
    exact = [text for text in spellings if parse(text) == value]
    return min(exact, key=len)


def exact_size(nbytes: float) -> str:
    """``48e9`` -> ``"48GB"``; a size that no short spelling hits exactly is written in bytes."""
    return _exact(nbytes, parse_size, (f"{nbytes / 1e9:g}GB", f"{nbytes / 2 ** 30:g}GiB", f"{float(nbytes)!r}B"))


def exact_bandwidth(bps: float) -> str:
    """``1.25e9`` -> ``"10Gbps"``, ``6e11`` -> ``"600GB/s"``; else in bytes/s, exactly."""
    return _exact(bps, parse_bandwidth, (f"{bps * 8 / 1e6:g}Mbps", f"{bps * 8 / 1e9:g}Gbps", f"{bps / 1e9:g}GB/s",
                                         f"{float(bps)!r}B/s"))


def exact_time(seconds: float) -> str:
    """``5e-4`` -> ``"0.5ms"``; else in seconds, exactly."""
    return _exact(seconds, parse_time, (f"{seconds:g}s", f"{seconds * 1e3:g}ms", f"{seconds * 1e6:g}us",
                                       f"{float(seconds)!r}s"))
