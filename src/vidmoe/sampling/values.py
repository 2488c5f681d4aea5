"""Scalar checks shared by the settings' validation: each refuses a wrong type or range with a
ValueError that names the field, the value and what is accepted, and never converts."""

from __future__ import annotations

import math

from vidmoe.sampling.boundary import kind_of


def integer(name: str, value, lo: int | None, hi: int | None = None, why: str = "") -> int:
    """`value` as an int in [lo, hi]: bools, floats and strings are refused, never converted."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r} ({kind_of(value)})")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be at most {hi}{why}; got {value}")
    return value


def number(name: str, value) -> float:
    """`value` as a finite float: bools, strings, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r} ({kind_of(value)})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def string(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r} ({kind_of(value)})")
    return value
