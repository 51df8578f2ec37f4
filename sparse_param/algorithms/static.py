"""Static sparsity: the random mask of ``sparsify`` never changes (the baseline)."""

from __future__ import annotations

import torch
from torch import nn

from ..metrics import density
from ..scheduler import SparseScheduler


class Static(SparseScheduler):
    """Fixed mask. Attach it anyway: it counts steps and keeps stored inactive weights
    at zero after every optimizer step, whatever the optimizer.

    R_s stays at the density: no connection is ever explored.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, attach: bool = True):
        super().__init__(model, optimizer, total_steps=1, stop=0.0, attach=attach)

    def is_update_step(self, step: int) -> bool:
        return False

    def __repr__(self) -> str:
        return (
            f"Static(layers={len(self.layers)}, step={self.step_count}, "
            f"density={density(self.model):.4f}, attached={self._hook is not None})"
        )
