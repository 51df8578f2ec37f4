"""DSR, dynamic sparse reparameterization (Mostafa & Wang, ICML 2019)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..allocation import apportion
from ..arguments import check_int, check_real
from ..distributed import full
from ..scheduler import Plan, PositiveReal, SparseScheduler, inactive_counts, redistribute
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
    state_fields = {"threshold": PositiveReal()}

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
        active = sum(layer.active for layer in self.layers)
        if self.target_pruned is None:
            self.target_pruned = max(round(0.1 * active), 1)
            return
        # an update prunes at most every active weight but one per layer, and no more
        # than can regrow where nothing is active
        most = min(active - len(self.layers), sum(inactive_counts(self.layers)))
        if self.target_pruned > max(most, 1):
            raise ValueError(
                f"{type(self).__name__}: target_pruned={self.target_pruned} is more than an "
                f"update can prune in this model ({most} of {active} active weights); "
                f"pass at most {most}, such as the default 10% of the active weights"
            )

    def interval(self, step: int) -> int:
        return doubling_interval(step, self.update_interval, self.stop_step, self.doublings)

    def plan(self, fraction: float) -> Plan:
        below = [
            min(int(((full(x.weight).abs() < self.threshold) & x.mask).count_nonzero()),
                x.active - 1)
            for x in self.layers
        ]  # fmt: skip
        # Regrowth only uses positions inactive before the update: in a dense model
        # there may be fewer of those than weights below H. Prune no more than can
        # regrow, sharing the cut in proportion to each layer's count below H.
        room = inactive_counts(self.layers)
        if sum(below) > sum(room):
            below = apportion(sum(room), below, [0] * len(below), below)
        surviving = [layer.active - n for layer, n in zip(self.layers, below)]
        return Plan(prune=below, grow=redistribute(sum(below), surviving, room))

    def adapt(self, plan: Plan) -> Mapping[str, Any]:
        pruned = sum(plan.prune)
        if pruned > 1.1 * self.target_pruned:
            return {"threshold": self.threshold / 2}
        if pruned < 0.9 * self.target_pruned:
            return {"threshold": self.threshold * 2}
        return {}
