"""Argument checks shared by the pipeline, the CLI and batch files: each error says what to do."""

from __future__ import annotations

import math
import numbers
from typing import Optional

from .errors import InvalidInputError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit unsigned value


def whole_number(value) -> Optional[int]:
    """``value`` as an int if it is a whole number (Python or numpy integer, not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def positive_int(value, name: str) -> int:
    n = whole_number(value)
    if n is None or n < 1:
        raise InvalidInputError(f"{name} must be a whole number of at least 1, got {value!r}")
    return n


def check_size(name: str, value, multiple: int) -> int:
    n = whole_number(value)
    if n is None or n < multiple or n % multiple:
        hint = ""
        if n is not None and n >= multiple:
            lower = n // multiple * multiple
            hint = f" (try {lower} or {lower + multiple})"
        raise InvalidInputError(f"{name} must be a positive multiple of {multiple}, got {value!r}{hint}")
    return n


def check_float(value, name: str, low: float, high: Optional[float], hint: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidInputError(f"{name} must be a finite number {span}, got {value!r}; {hint}")
    return float(value)
