"""SNFS, sparse momentum (Dettmers & Zettlemoyer 2019): momentum-based regrowth and
redistribution across layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..arguments import check_real
from ..distributed import full
from ..layers import SparseLayer
from ..scheduler import (
    LayerTensors,
    Plan,
    SparseScheduler,
    inactive_counts,
    magnitude_counts,
    redistribute,
)


class SNFS(SparseScheduler):
    """Sparse Networks From Scratch.

    Each update drops the fraction p_t (0.5, cosine decayed) of each layer's active
    weights with the smallest ``|w|``. The total dropped is regrown across layers in
    proportion to the mean ``|momentum|`` of each layer's active weights, and within a
    layer where ``|momentum|`` is largest among the inactive positions. The total active
    count is exact; per-layer counts move.

    The momentum is that of the *dense* gradient (inactive positions included), as in
    the paper's code: SNFS keeps its own buffer ``m ← β·m + dL/dW`` for every weight.
    That costs 4 bytes per weight and a dense gradient capture on every step, which the
    other algorithms avoid. The buffers are averaged over DDP ranks before each update
    (the momentum of averaged gradients) and saved in ``state_dict``.

    Args:
        momentum: β of the dense-gradient momentum (0.9, the paper's SGD momentum).
    """

    defaults = {**SparseScheduler.defaults, "drop_fraction": 0.5}
    keeps_structure = False  # redistributes across layers
    captures_every_step = True
    state_fields = {"buffers": LayerTensors(averaged=True)}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        momentum: float = 0.9,
        **kwargs: Any,
    ):
        self.momentum = check_real(type(self).__name__, "momentum", momentum, 0, 1, open_high=True)
        super().__init__(model, optimizer, **kwargs)

    def setup(self) -> None:
        # Shaped like the mask: whole on every rank, like the dense gradient it sums
        # (under FSDP2 too, where the weight is sharded).
        self.buffers = [torch.zeros_like(layer.mask, dtype=torch.float32) for layer in self.layers]

    def observe(self, dense_grads: Sequence[Tensor | None]) -> None:
        for buffer, grad in zip(self.buffers, dense_grads):
            if grad is not None:  # sharded under FSDP2: gathered (reduced already)
                buffer.mul_(self.momentum).add_(full(grad))

    def plan(self, fraction: float) -> Plan:
        pruned = magnitude_counts(self.layers, fraction)
        weights = [
            float(buffer.abs()[layer.mask].mean()) if layer.active else 0.0
            for buffer, layer in zip(self.buffers, self.layers)
        ]
        weights = [w if math.isfinite(w) else 0.0 for w in weights]
        return Plan(pruned, redistribute(sum(pruned), weights, inactive_counts(self.layers)))

    def grow_score(self, index: int, layer: SparseLayer) -> Tensor:
        return self.buffers[index].abs()
