"""SNFS, sparse momentum (Dettmers & Zettlemoyer 2019): momentum-based regrowth and
redistribution across layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed, fsdp
from ..arguments import check_real
from ..layers import SparseLayer
from ..scheduler import SparseScheduler, redistribute


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
        self.buffers = [
            # Shaped like the mask: whole on every rank, like the dense gradient it sums
            # (under FSDP2 too, where the weight is sharded).
            torch.zeros_like(layer.mask, dtype=torch.float32)
            for layer in self.layers
        ]

    def wants_dense_grad(self, step: int) -> bool:
        return True

    def observe(self) -> None:
        for buffer, layer in zip(self.buffers, self.layers):
            grad = layer.parametrization.dense_grad
            if grad is not None:  # sharded under FSDP2: gathered (reduced already)
                buffer.mul_(self.momentum).add_(fsdp.full(grad))
                layer.parametrization.dense_grad = None

    def before_update(self) -> None:
        for buffer in self.buffers:
            distributed.average_(buffer)

    def grow_counts(self, pruned: Sequence[int], capacity: Sequence[int]) -> list[int]:
        weights = [
            float(buffer.abs()[layer.mask].mean()) if layer.active else 0.0
            for buffer, layer in zip(self.buffers, self.layers)
        ]
        weights = [w if math.isfinite(w) else 0.0 for w in weights]
        return redistribute(sum(pruned), weights, capacity)

    def grow_score(self, index: int, layer: SparseLayer) -> Tensor:
        return self.buffers[index].abs()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffers": [b.clone() for b in self.buffers]}

    def _check_state(self, state: Any) -> None:
        super()._check_state(state)
        saved = state.get("buffers")
        if not (
            isinstance(saved, list)
            and len(saved) == len(self.buffers)
            and all(
                isinstance(s, Tensor) and s.is_floating_point() and s.shape == b.shape
                for s, b in zip(saved, self.buffers)
            )
        ):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: buffers must be a list of "
                f"{len(self.buffers)} float tensors shaped like the layers' weights"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # checks the whole state, buffers included
        for buffer, saved in zip(self.buffers, state["buffers"]):
            buffer.copy_(saved)
