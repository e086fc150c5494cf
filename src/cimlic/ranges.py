"""Allowed ranges of numeric settings: ``">=0"``, ``">0"``, ``"<=1"``, ``"[0, 1)"``, ``"(0, 1]"``, ...

Used by the config layer (each section's ``RANGES``) and by the command line's numeric flags; a value outside its
range, or a number that is not finite, is a :class:`cimlic.errors.ConfigError` naming the key or flag.
"""

from __future__ import annotations

import math
import re
from typing import Any

from cimlic.errors import ConfigError

_RANGE = re.compile(r"^\s*(?:(>=|>|<=|<)\s*(-?[\d.e+-]+)|([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])]))\s*$")


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` is allowed by ``spec``: ``">=0"``, ``">0"``, ``"<=1"``, ``"[0, 1)"``, ``"(0, 1]"``, ..."""
    m = _RANGE.match(spec)
    if m is None:
        raise ValueError(f"bad range spec {spec!r}")
    if m.group(1):
        bound = float(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[m.group(1)]
    low, high = float(m.group(4)), float(m.group(5))
    above = value >= low if m.group(3) == "[" else value > low
    below = value <= high if m.group(6) == "]" else value < high
    return above and below


def check_range(value: Any, spec: str, where: str) -> None:
    """ConfigError naming ``where`` unless ``value`` (a number, or each item of a list) is finite and in ``spec``."""
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if not math.isfinite(v) or not in_range(v, spec):
            raise ConfigError(f"{where}: {v!r} is not allowed (must be {spec.strip()})")


def one_slot(template: str) -> bool:
    """Whether a prompt template has exactly one '{}' slot for the class name (and formats)."""
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return template.count("{}") == 1
