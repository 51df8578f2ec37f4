"""Schedules of dynamic sparse training: pure functions of the step."""

from __future__ import annotations

import math

DROP_SCHEDULES = ("constant", "cosine", "linear")


def drop_fraction(step: int, initial: float, end_step: int, schedule: str = "cosine") -> float:
    """Share of each layer's active weights dropped at ``step`` (RigL's α_t).

    ``"constant"``: α. ``"cosine"``: α/2·(1 + cos(π·t/T_end)). ``"linear"``: α·(1 − t/T_end).
    ``t`` is clamped to ``[0, T_end]``, so the decaying schedules reach 0 at ``end_step``.
    """
    progress = min(max(step / end_step, 0.0), 1.0) if end_step > 0 else 1.0
    if schedule == "constant":
        return initial
    if schedule == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return initial * (1 - progress)
    raise ValueError(f"unknown drop schedule {schedule!r}; expected one of {DROP_SCHEDULES}")


def cubic_decay(step: int, start_step: int, end_step: int) -> float:
    """``(1 − p)³`` with ``p = (t − t₀)/(t_end − t₀)`` clamped to [0, 1].

    The share of the way still to go in Zhu & Gupta's gradual pruning: density at ``t``
    is ``d_final + (d_initial − d_final) · cubic_decay(t)``.
    """
    if end_step <= start_step:
        return 0.0 if step >= end_step else 1.0
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return (1.0 - progress) ** 3


def doubling_interval(step: int, base: int, end_step: int, doublings: int = 3) -> int:
    """Update interval that doubles ``doublings`` times over ``[0, end_step]``.

    DSR's schedule (100 → 200 → 400 → 800 steps for WRN-28-2): the interval is
    ``base · 2^k`` in the ``k``-th of ``doublings + 1`` equal parts of the run.
    """
    if end_step <= 0:
        return base
    part = min(int(step * (doublings + 1) / end_step), doublings)
    return base * 2 ** max(part, 0)
