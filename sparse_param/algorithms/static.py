"""Static sparsity: the random mask of ``sparsify`` never changes (the baseline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..scheduler import SparseScheduler


class Static(SparseScheduler):
    """Fixed mask. Attach it anyway: it counts steps and keeps stored inactive weights
    at zero after every optimizer step, whatever the optimizer.

    Takes the common arguments of every method (``total_steps`` is optional here, as
    nothing depends on it); the topology is never updated. R_s stays at the density:
    no connection is ever explored.
    """

    updates_topology = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, optimizer, total_steps=total_steps, **kwargs)

    def is_update_step(self, step: int) -> bool:
        return False

    def prune_counts(self, fraction: float) -> list[int]:
        # An explicit update() drops nothing by Static's rule, whatever drop_fraction
        # says (only non-finite weights, which every algorithm drops).
        return [0] * len(self.layers)

    def __repr__(self) -> str:
        return (
            f"Static(layers={len(self.layers)}, step={self.step_count}, "
            f"{self._model_summary()}, attached={self._hook is not None})"
        )
