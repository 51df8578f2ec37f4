"""Changing a layer's topology: non-finite weights dropped first, and a new mask
installed with the weights and optimizer state it leaves behind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..distributed import full, masked_fill_
from ..structure import Structure
from ..warn import warn
from .plan import Plan

if TYPE_CHECKING:
    from ..layers import SparseLayer


def non_finite_active(layers: Sequence[SparseLayer], masks: Sequence[Tensor]) -> list[Tensor]:
    """Per layer, the active positions (of ``masks``) whose stored weight is not finite."""
    return [old & ~torch.isfinite(full(layer.weight)) for layer, old in zip(layers, masks)]


def extra_drops(
    layers: Sequence[SparseLayer],
    structures: Sequence[Structure | None],
    broken: Sequence[Tensor],
    plan: Plan,
) -> list[int]:
    """Non-finite weights each layer drops on top of ``plan`` (and regrows in the same
    layer), as far as it keeps one active weight and has positions to regrow into.
    Structured layers add none: they drop non-finite weights first within their own
    counts (they score -inf), since an extra drop would not fit every group."""
    extra = []
    for layer, structure, bad, prune, grow in zip(
        layers, structures, broken, plan.prune, plan.grow
    ):
        room = min(
            int(bad.count_nonzero()), layer.active - 1 - prune, layer.numel - layer.active - grow
        )
        extra.append(0 if structure is not None else max(room, 0))
    return extra


def warn_non_finite(owner: str, layer: str, step: int, broken: Tensor, dropped: Tensor) -> None:
    """Say how many non-finite active weights ``layer`` had at ``step`` (``owner``: the
    scheduler's class name) and how many of them stay active."""
    total = int(broken.count_nonzero())
    if total == 0:
        return
    left = int((broken & ~dropped).count_nonzero())
    stay = (
        f"; {left} stay active (a layer keeps one active weight and regrows only into "
        f"positions inactive before the update)"
        if left
        else ""
    )
    warn(
        f"{owner}: {total} non-finite active weights in layer {layer!r} at step {step}: "
        f"dropped first{stay}",
        RuntimeWarning,
    )


def install_mask(
    layer: SparseLayer, optimizer: torch.optim.Optimizer, old: Tensor, new: Tensor
) -> None:
    """Install ``new`` as the layer's mask: zero its pruned and grown weights and their
    optimizer state (every state tensor shaped like the weight), extend ever_active."""
    # masked_fill, not mul: a non-finite value times 0 is NaN, not 0.
    unstable = ~(old & new)
    masked_fill_(layer.weight, unstable, 0)
    for value in optimizer.state.get(layer.weight, {}).values():
        if isinstance(value, Tensor) and value.shape == layer.weight.shape:
            masked_fill_(value, unstable, 0)
    layer.mask.copy_(new)
    layer.ever_active.logical_or_(new)
