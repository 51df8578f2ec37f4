"""Shared test configuration and helpers for the sparse_param test suite.

Hypothesis profiles: ``ci`` (the default, 200 examples per property, no deadline) and
``dev`` (30 examples, for quick local iterations); pick one with the environment variable
``HYPOTHESIS_PROFILE``.

Helpers are handed out as session-scoped fixtures (so they also work inside
``@given`` tests, where function-scoped fixtures are refused):

* ``check_invariants(model, counts=None)``: docs/architecture.md, invariants 1-4 for every sparse
  layer, plus exact per-layer active counts when ``counts`` is given.
* ``zero_off(tensor, mask)``: whether ``tensor`` is exactly 0 wherever ``mask`` is False.
* ``snapshot(model)`` / ``assert_untouched(model, snap)``: prove a failed call left the
  model exactly as it was (state dict values, parameter identities, module classes).
* ``erk_reference(shapes, density)``: an independent solution of the ERK allocation
  (docs/guide/sparsify.md, Allocation), written from the formula, not from
  ``sparse_param.allocation``.
* ``bounded_shares(total, weights, lower, upper)``: the exact real-valued solution of
  ``sum(clamp(eps * w_i, lo_i, hi_i)) == total`` by walking the breakpoints.

``torch_single_thread`` (module scope) runs a test module with one intra-op thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from sparse_param.layers import sparse_layers

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tests with one intra-op thread.

    The tests use tiny tensors, for which a thread pool only adds overhead; on a busy
    2-core machine each op then waits for a descheduled worker (measured 16x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- invariants


def _check_invariants(model: nn.Module, counts: Mapping[str, int] | None = None) -> None:
    layers = list(sparse_layers(model))
    assert layers, "the model has no sparse layers"
    for layer in layers:
        stored = layer.weight
        mask, ever = layer.mask, layer.ever_active
        where = f"layer {layer.name!r}"
        # 1. bool buffers shaped like the weight, on the weight's device
        assert mask.dtype == torch.bool, where
        assert ever.dtype == torch.bool, where
        assert mask.shape == stored.shape, where
        assert ever.shape == stored.shape, where
        assert mask.device == stored.device, where
        assert ever.device == stored.device, where
        # 2. the computed weight is exactly 0 off the mask, the stored weight on it
        assert _zero_off(stored.detach(), mask), f"{where}: pruned stored weights are not 0"
        computed = layer.module.weight.detach()
        assert computed.shape == stored.shape, where
        if not torch.equal(computed, stored):  # (equal to a clean stored weight is enough)
            assert _zero_off(computed, mask), f"{where}: computes with pruned weights"
            assert torch.equal(computed[mask], stored[mask]), f"{where}: active weights differ"
        # 4. ever_active contains the mask
        assert not bool((mask & ~ever).any()), f"{where}: ever_active misses active weights"
        # 3. at least one active weight, exact counts when known
        assert layer.active >= 1, where
        if counts is not None:
            assert layer.active == counts[layer.name], where
    if counts is not None:
        assert {layer.name for layer in layers} == set(counts)


def _zero_off(tensor: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether ``tensor`` is exactly 0 wherever ``mask`` is False (fast on big tensors)."""
    return not bool((tensor != 0).logical_and_(~mask).any())


@pytest.fixture(scope="session")
def check_invariants():
    return _check_invariants


@pytest.fixture(scope="session")
def zero_off():
    return _zero_off


# ------------------------------------------------------------------- untouched models


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    classes: list[tuple[str, type]]
    params: list[tuple[str, int]]
    instance_forwards: list[str]


def _snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        classes=[(name, type(m)) for name, m in model.named_modules()],
        params=[(name, id(p)) for name, p in model.named_parameters()],
        instance_forwards=[name for name, m in model.named_modules() if "forward" in vars(m)],
    )


def _assert_untouched(model: nn.Module, snap: Snapshot) -> None:
    after = _snapshot(model)
    assert after.classes == snap.classes, "module classes changed"
    assert after.params == snap.params, "parameters were replaced"
    assert after.instance_forwards == snap.instance_forwards, "a forward was installed"
    assert list(after.state) == list(snap.state), "state dict keys changed"
    for key, value in snap.state.items():
        new = after.state[key]
        assert new.dtype == value.dtype and new.shape == value.shape, key
        assert torch.equal(new, value), f"{key} changed"


@pytest.fixture(scope="session")
def snapshot():
    return _snapshot


@pytest.fixture(scope="session")
def assert_untouched():
    return _assert_untouched


# ------------------------------------------------------------------ reference solvers


def _bounded_shares(
    total: float,
    weights: Sequence[float],
    lower: Sequence[float],
    upper: Sequence[float],
) -> tuple[float, list[float]]:
    """``(eps, shares)`` with ``shares[i] = clamp(eps * w_i, lo_i, hi_i)`` summing to total.

    ``f(eps) = sum(clamp(eps * w_i, lo_i, hi_i))`` is continuous, non-decreasing and
    linear between the breakpoints ``lo_i / w_i`` and ``hi_i / w_i``: find the segment
    holding ``total`` and solve it exactly. Layers of weight 0 sit at their lower bound,
    except when the weighted layers are all full: then the weighted ones are fixed at
    their upper bound and the unweighted ones are solved again with their room
    ``hi - lo`` as weight (the documented behaviour of ``apportion``).
    """
    n = len(weights)
    full = sum(hi if w > 0 else lo for w, lo, hi in zip(weights, lower, upper))
    if total > full:
        room = [0.0 if w > 0 else float(hi - lo) for w, lo, hi in zip(weights, lower, upper)]
        base = [hi if w > 0 else lo for w, lo, hi in zip(weights, lower, upper)]
        return _bounded_shares(total, room, base, upper)

    def f(eps: float) -> float:
        return sum(min(hi, max(lo, eps * w)) for w, lo, hi in zip(weights, lower, upper))

    points = sorted(
        {0.0}
        | {lo / w for w, lo in zip(weights, lower) if w > 0}
        | {hi / w for w, hi in zip(weights, upper) if w > 0}
    )
    previous = points[0]
    for point in points:
        if f(point) >= total:
            break
        previous = point
    else:  # total == full is reached at the last breakpoint
        point = previous
    left, right = previous, point
    # On [left, right] f is linear: the free layers are those strictly inside bounds.
    free = [
        i
        for i in range(n)
        if weights[i] > 0 and lower[i] < weights[i] * (left + right) / 2 < upper[i]
    ]
    slope = sum(weights[i] for i in free)
    if slope == 0:
        eps = right
    else:
        eps = left + (total - f(left)) / slope
    return eps, [min(hi, max(lo, eps * w)) for w, lo, hi in zip(weights, lower, upper)]


@dataclass
class ErkReference:
    eps: float  # the scale: density_l = eps * score_l for layers between the bounds
    score: dict[str, float]  # (sum of dims) / (product of dims)
    numel: dict[str, int]
    share: dict[str, float]  # real-valued active count of each layer
    dense: set[str]  # layers whose ERK density would exceed 1
    # ε by the allocation loop of docs/guide/sparsify.md (None if a lower bound binds)
    iterative_eps: float | None


def _erk_reference(shapes: Mapping[str, Sequence[int]], density: float) -> ErkReference:
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    score = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    target = round(density * sum(numel.values()))
    names = list(shapes)

    # docs/guide/sparsify.md, Allocation, literally: solve ε, make every layer above
    # density 1 dense, repeat.
    dense: set[str] = set()
    while True:
        rest = [n for n in names if n not in dense]
        budget = target - sum(numel[n] for n in dense)
        eps = budget / sum(score[n] * numel[n] for n in rest) if rest else math.inf
        over = {n for n in rest if eps * score[n] > 1}
        if not over:
            break
        dense |= over
    iterative_eps = eps
    # The allocation also gives every layer at least one weight. When that bound binds,
    # the loop above is not the whole story: solve the two-sided problem exactly.
    weights = [score[n] * numel[n] for n in names]
    eps2, shares = _bounded_shares(target, weights, [1] * len(names), [numel[n] for n in names])
    share = dict(zip(names, shares))
    binds_low = any(eps * score[n] * numel[n] < 1 for n in names if n not in dense)
    return ErkReference(
        eps=eps2,
        score=score,
        numel=numel,
        share=share,
        dense={n for n in names if share[n] >= numel[n]},
        iterative_eps=None if binds_low else iterative_eps,
    )


@pytest.fixture(scope="session")
def erk_reference():
    return _erk_reference


@pytest.fixture(scope="session")
def bounded_shares():
    return _bounded_shares
