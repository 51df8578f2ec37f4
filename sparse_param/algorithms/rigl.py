"""RigL (Evci et al., ICML 2020): magnitude pruning, gradient-based regrowth."""

from __future__ import annotations

from torch import Tensor

from ..layers import SparseLayer
from ..scheduler import SparseScheduler


class RigL(SparseScheduler):
    """Rigging the Lottery.

    Each update drops the fraction α_t = α/2·(1 + cos(π t / T_end)) of each layer's
    active weights with the smallest ``|w|`` and regrows as many where the dense
    gradient ``|dL/dW|`` is largest among the inactive positions; grown weights start
    at zero. The dense gradient is captured only on the backward passes of the step
    before an update (no dense buffer in between) and averaged over DDP ranks.

    Defaults from the paper: ΔT = 100, α = 0.3, cosine decay, T_end = 75% of training.
    """

    needs_dense_grad = True

    def grow_score(self, index: int, layer: SparseLayer) -> Tensor:
        return layer.parametrization.dense_grad.abs()
