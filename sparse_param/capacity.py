"""Same Capacity Sparse vs Dense Comparison (SC-SDC, Tessera, Hooker & Rosman 2021).

A sparse network is compared with a dense network of the same architecture family,
narrowed until it has as many trainable connections as the sparse one has active, and
built with the same init scheme. What "same capacity" counts here:

* ``"weights"`` (the default, the paper's count of connections): the active weights
  of the sparse model's Linear/Conv layers (all weights of the layers it keeps dense),
  against all Linear/Conv weights of the dense model.
* ``"parameters"``: the same plus every other parameter (biases, norm scales and
  shifts, tokens), which both models hold densely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arguments import check_model
from .layers import DEFAULT_LAYER_TYPES, is_sparse, unwrap

__all__ = ["SameCapacity", "capacity", "same_capacity_dense"]

COUNTS = ("weights", "parameters")


def capacity(model: nn.Module, count: str = "weights") -> int:
    """Trainable connections of ``model``: active Linear/Conv weights (``"weights"``),
    plus every other parameter for ``"parameters"``. A dense model counts all of its
    Linear/Conv weights as active."""
    check_model("capacity", model)
    if count not in COUNTS:
        raise ValueError(f"capacity: count must be one of {COUNTS}, got {count!r}")
    model = unwrap(model)
    weights, seen = 0, set()
    for module in model.modules():
        if not isinstance(module, DEFAULT_LAYER_TYPES):
            continue
        if is_sparse(module):
            weights += int(module.parametrizations.weight[0].mask.count_nonzero())
            seen.add(id(module.parametrizations.weight.original))
        elif module.weight.dim() > 1:
            weights += module.weight.numel()
            seen.add(id(module.weight))
    if count == "weights":
        return weights
    return weights + sum(p.numel() for p in model.parameters() if id(p) not in seen)


@dataclass
class SameCapacity:
    """The dense counterpart found by :func:`same_capacity_dense`.

    ``model``: ``factory(width)``; ``target``: the sparse model's capacity;
    ``count``: the dense model's capacity; ``exact``: ``count == target``.
    """

    model: nn.Module
    width: int
    target: int
    count: int
    exact: bool


def same_capacity_dense(
    factory: Callable[[int], nn.Module],
    sparse_model: nn.Module,
    *,
    count: str = "weights",
    max_width: int = 1 << 16,
) -> SameCapacity:
    """The dense ``factory(width)`` whose capacity is nearest the sparse model's.

    ``factory`` builds the architecture at an integer width (hidden units of an MLP,
    base channels of a CNN), initialised by its own default scheme: build the sparse
    model with the same factory (at its larger width) before ``sparsify`` and both
    start from the same init scheme. The capacity must not decrease with the width
    (true of MLPs and CNNs), so a doubling then binary search finds the nearest width
    in ``[1, max_width]``; on a tie the narrower one wins. Probe widths are built on
    the meta device (no memory, no init); only the chosen one is built for real.

    Returns:
        a :class:`SameCapacity` with the dense model, its width and both counts.

    Raises:
        ValueError: ``count`` is unknown, the sparse model is larger than
            ``factory(max_width)``, or the factory's capacity decreases with width.
    """
    check_model("same_capacity_dense", sparse_model, "sparse_model")
    target = capacity(sparse_model, count)
    cache: dict[int, int] = {}

    def size(width: int) -> int:
        if width not in cache:
            with torch.device("meta"):  # counts only: no memory, no init
                cache[width] = capacity(factory(width), count)
        return cache[width]

    hi = 1
    while size(hi) < target:
        if hi >= max_width:
            raise ValueError(
                f"same_capacity_dense: factory({max_width}) has {size(max_width)} {count}, "
                f"fewer than the sparse model's {target}: raise max_width"
            )
        hi = min(2 * hi, max_width)
    lo = max(1, hi // 2)  # the smallest width with size >= target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if size(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    candidates = [w for w in (lo - 1, lo) if w >= 1]
    for w in {2, lo}:  # a cheap check of monotony where it matters: the start, the answer
        if 1 < w <= max_width and size(w) < size(w - 1):
            raise ValueError(
                f"same_capacity_dense: the factory's {count} decrease from width {w - 1} to "
                f"{w}; the solver needs a capacity that grows with the width"
            )
    width = min(candidates, key=lambda w: (abs(size(w) - target), w))
    return SameCapacity(factory(width), width, target, size(width), size(width) == target)
