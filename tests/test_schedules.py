"""Pure schedules of dynamic sparse training (``sparse_param.schedules``), property-based.

drop_fraction: RigL's α_t (cosine), its linear and constant variants (docs/papers.md#algorithms).
cubic_decay: Zhu & Gupta's gradual pruning schedule (GMP, GraNet).
doubling_interval: DSR's 100 → 200 → 400 → 800 update intervals.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sparse_param.schedules import DROP_SCHEDULES, cubic_decay, doubling_interval, drop_fraction

steps = st.integers(-1000, 10**6)
end_steps = st.integers(1, 10**6)
alphas = st.floats(0.0, 1.0, allow_nan=False)
decaying = st.sampled_from(["cosine", "linear"])


# ----------------------------------------------------------------------- drop_fraction


@given(steps, alphas, end_steps)
def test_constant_is_alpha_everywhere(step, alpha, end):
    assert drop_fraction(step, alpha, end, "constant") == alpha


@given(st.integers(0, 10**6), alphas, end_steps)
def test_cosine_formula(step, alpha, end):
    assume(step <= end)
    expected = alpha / 2 * (1 + math.cos(math.pi * step / end))
    assert drop_fraction(step, alpha, end, "cosine") == pytest.approx(expected, abs=1e-12)


@given(st.integers(0, 10**6), alphas, end_steps)
def test_linear_formula(step, alpha, end):
    assume(step <= end)
    expected = alpha * (1 - step / end)
    assert drop_fraction(step, alpha, end, "linear") == pytest.approx(expected, abs=1e-12)


def test_cosine_known_values():
    assert drop_fraction(0, 0.3, 100, "cosine") == pytest.approx(0.3)
    assert drop_fraction(50, 0.3, 100, "cosine") == pytest.approx(0.15)
    assert drop_fraction(25, 0.4, 100, "cosine") == pytest.approx(0.2 * (1 + math.sqrt(0.5)))
    assert drop_fraction(100, 0.3, 100, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert drop_fraction(50, 0.3, 100, "linear") == pytest.approx(0.15)
    assert drop_fraction(75, 0.4, 100, "linear") == pytest.approx(0.1)


@given(steps, alphas, end_steps, st.sampled_from(DROP_SCHEDULES))
def test_bounds(step, alpha, end, schedule):
    value = drop_fraction(step, alpha, end, schedule)
    assert 0.0 <= value <= alpha + 1e-15


@given(steps, steps, alphas, end_steps, decaying)
def test_decaying_schedules_are_monotone_non_increasing(a, b, alpha, end, schedule):
    first, second = min(a, b), max(a, b)
    assert drop_fraction(second, alpha, end, schedule) <= drop_fraction(first, alpha, end, schedule)


@given(st.integers(0, 10**6), alphas, end_steps, decaying)
def test_decaying_schedules_reach_zero_at_end_and_stay(extra, alpha, end, schedule):
    assert drop_fraction(end, alpha, end, schedule) == pytest.approx(0.0, abs=1e-15)
    assert drop_fraction(end + extra, alpha, end, schedule) == pytest.approx(0.0, abs=1e-15)


@given(st.integers(-1000, 0), alphas, end_steps, decaying)
def test_decaying_schedules_start_at_alpha(step, alpha, end, schedule):
    """At step 0 (and before: t is clamped) the full α is dropped."""
    assert drop_fraction(step, alpha, end, schedule) == pytest.approx(alpha, abs=1e-15)


@given(steps, alphas, decaying)
def test_no_decay_window_means_zero(step, alpha, schedule):
    """T_end = 0 (topology frozen from the start): nothing to drop."""
    assert drop_fraction(step, alpha, 0, schedule) == pytest.approx(0.0, abs=1e-15)


@given(st.text(min_size=1).filter(lambda s: s not in DROP_SCHEDULES))
def test_unknown_schedule_raises(name):
    with pytest.raises(ValueError, match="unknown drop schedule"):
        drop_fraction(10, 0.3, 100, name)


# ------------------------------------------------------------------------- cubic_decay

starts = st.integers(-1000, 10**5)
spans = st.integers(1, 10**5)


@given(starts, spans, st.integers(0, 10**5))
def test_cubic_is_one_at_start_and_before(start, span, before):
    assert cubic_decay(start, start, start + span) == 1.0
    assert cubic_decay(start - before, start, start + span) == 1.0


@given(starts, spans, st.integers(0, 10**5))
def test_cubic_is_zero_at_end_and_after(start, span, after):
    assert cubic_decay(start + span, start, start + span) == 0.0
    assert cubic_decay(start + span + after, start, start + span) == 0.0


@given(starts, spans, st.integers(-(10**5), 3 * 10**5), st.integers(-(10**5), 3 * 10**5))
def test_cubic_is_monotone_non_increasing_and_bounded(start, span, a, b):
    end = start + span
    first, second = start + min(a, b), start + max(a, b)
    va, vb = cubic_decay(first, start, end), cubic_decay(second, start, end)
    assert 0.0 <= vb <= va <= 1.0


@given(starts, spans, st.integers(0, 10**5))
def test_cubic_formula(start, span, offset):
    assume(offset <= span)
    expected = (1 - offset / span) ** 3
    assert cubic_decay(start + offset, start, start + span) == pytest.approx(expected, abs=1e-12)


def test_cubic_known_values():
    assert cubic_decay(50, 0, 100) == pytest.approx(0.125)
    assert cubic_decay(20, 10, 30) == pytest.approx(0.125)
    # the GMP density: d_f + (d_i - d_f) * (1 - p)^3, halfway from 1.0 to 0.1
    assert 0.1 + 0.9 * cubic_decay(50, 0, 100) == pytest.approx(0.2125)


@given(st.integers(-100, 100), st.integers(-100, 100))
def test_cubic_with_empty_window_is_a_step(step, end):
    """start >= end: nothing to interpolate; 1 before the end, 0 from it on."""
    assert cubic_decay(step, end, end) == (0.0 if step >= end else 1.0)


# ------------------------------------------------------------------- doubling_interval


def test_dsr_interval_doubles_over_four_equal_parts():
    """The paper's WRN-28-2 schedule: 100 → 200 → 400 → 800 over four quarters."""
    end = 1000
    got = [doubling_interval(s, 100, end) for s in range(end + 1)]
    assert got[:250] == [100] * 250
    assert got[250:500] == [200] * 250
    assert got[500:750] == [400] * 250
    assert got[750:] == [800] * 251
    assert doubling_interval(5000, 100, end) == 800  # after the end: stays at the last


@given(st.integers(0, 10**6), st.integers(1, 10**6), st.integers(1, 1000), st.integers(0, 6))
def test_doubling_interval_part_formula(step, end, base, doublings):
    part = min(step * (doublings + 1) // end, doublings)
    assert doubling_interval(step, base, end, doublings) == base * 2**part


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6), st.integers(1, 1000))
def test_doubling_interval_is_monotone_and_bounded(a, b, end, base):
    first, second = min(a, b), max(a, b)
    v1, v2 = doubling_interval(first, base, end), doubling_interval(second, base, end)
    assert base <= v1 <= v2 <= 8 * base
    assert v1 in {base, 2 * base, 4 * base, 8 * base}


@given(st.integers(0, 10**6), st.integers(1, 1000))
def test_doubling_interval_without_window_is_base(step, base):
    assert doubling_interval(step, base, 0) == base
