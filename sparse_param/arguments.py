"""Validating the numbers a user passes to a scheduler: errors that name the class called."""

from __future__ import annotations

import numbers
from typing import Any


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int (numpy integers accepted), refusing anything below
    ``minimum``; errors name ``owner`` (the class the user called) and ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"{owner}: {name} must be a whole number, got {value!r}")
    if not float(value) >= minimum:
        raise ValueError(f"{owner}: {name} must be an int ≥ {minimum}, got {value!r}")
    return int(value)


def check_real(
    owner: str, name: str, value: Any, low: float, high: float, *, open_low: bool = False,
    open_high: bool = False,
) -> float:  # fmt: skip
    """``value`` as a Python float (numpy scalars accepted) in ``[low, high]``, each end
    excluded where ``open_low`` / ``open_high``; NaN never passes. Errors name ``owner``
    (the class the user called) and ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return value
