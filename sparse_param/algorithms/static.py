"""Static sparsity: the random mask of ``sparsify`` never changes (the baseline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..scheduler import Plan, SparseScheduler


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

    def plan(self, fraction: float) -> Plan:
        # An explicit update() drops nothing by Static's rule, whatever drop_fraction
        # says (only non-finite weights, which every algorithm drops).
        none = [0] * len(self.layers)
        return Plan(prune=none, grow=list(none))
