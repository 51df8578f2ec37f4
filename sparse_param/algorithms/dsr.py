"""DSR, dynamic sparse reparameterization (Mostafa & Wang, ICML 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import fsdp
from ..allocation import apportion
from ..arguments import check_int, check_real
from ..scheduler import SparseScheduler, redistribute
from ..schedules import doubling_interval


class DSR(SparseScheduler):
    """Dynamic Sparse Reparameterization: one adaptive global threshold.

    Each update prunes every active weight with ``|w| < H`` (keeping at least one per
    layer), K in total, and regrows K at random across layers in proportion to each
    layer's surviving active weights; grown weights start at zero. Then H adapts to
    keep K near the target N_p: halved if K > 1.1·N_p, doubled if K < 0.9·N_p. The
    total active count is exact; per-layer counts move.

    The interval doubles three times over the run (100 → 200 → 400 → 800 steps by
    default, as for WRN-28-2 in the paper).

    Args:
        threshold: initial H (1e-3).
        target_pruned: N_p, weights to prune per update; by default 10% of the active
            weights (the paper's 20,000 of WRN-28-2's ~146k at 10% density is ~14%).
        doublings: how often the interval doubles.
    """

    defaults = {**SparseScheduler.defaults, "drop_schedule": "constant"}
    keeps_structure = False  # redistributes across layers

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        threshold: float = 1e-3,
        target_pruned: int | None = None,
        doublings: int = 3,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        self.threshold = check_real(
            owner, "threshold", threshold, 0, math.inf, open_low=True, open_high=True
        )
        self.doublings = check_int(owner, "doublings", doublings, 0)
        self.target_pruned = (
            None if target_pruned is None else check_int(owner, "target_pruned", target_pruned, 1)
        )
        super().__init__(model, optimizer, **kwargs)

    def setup(self) -> None:
        if self.target_pruned is None:
            self.target_pruned = max(round(0.1 * sum(layer.active for layer in self.layers)), 1)

    def interval(self, step: int) -> int:
        return doubling_interval(step, self.update_interval, self.stop_step, self.doublings)

    def prune_counts(self, fraction: float) -> list[int]:
        below = [
            min(
                int(
                    (fsdp.full(layer.weight).abs() < self.threshold)
                    .logical_and_(layer.mask)
                    .count_nonzero()
                ),
                layer.active - 1,
            )
            for layer in self.layers
        ]
        # Regrowth only uses positions inactive before the update: in a dense model
        # there may be fewer of those than weights below H. Prune no more than can
        # regrow, sharing the cut in proportion to each layer's count below H.
        room = sum(layer.numel - layer.active for layer in self.layers)
        if sum(below) > room:
            below = apportion(room, below, [0] * len(below), below)
        return below

    def grow_counts(self, pruned: Sequence[int], capacity: Sequence[int]) -> list[int]:
        surviving = [layer.active - n for layer, n in zip(self.layers, pruned)]
        return redistribute(sum(pruned), surviving, capacity)

    def after_update(self, pruned: Sequence[int], grown: Sequence[int]) -> None:
        total = sum(pruned)
        if total > 1.1 * self.target_pruned:
            self.threshold /= 2
        elif total < 0.9 * self.target_pruned:
            self.threshold *= 2

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self.threshold}

    def _check_state(self, state: Any) -> None:
        super()._check_state(state)
        value = state.get("threshold")
        if isinstance(value, bool) or not isinstance(value, float) or not 0 < value < math.inf:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: threshold must be a positive finite "
                f"float, got {value!r}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # checks the whole state, threshold included
        self.threshold = float(state["threshold"])
