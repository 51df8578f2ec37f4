"""SRigL, structured RigL (Lasby et al., "Dynamic Sparse Training with Structured
Sparsity", ICLR 2024): constant fan-in RigL with neuron ablation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..arguments import check_real
from ..distributed import full
from ..layers import SparseLayer
from ..scheduler import LayerCounts, Plan, magnitude_counts
from ..structure import group_counts
from .rigl import RigL


class SRigL(RigL):
    """Structured RigL: RigL on constant fan-in masks, with dynamic neuron ablation.

    Needs a model sparsified with ``structure="fan_in"``. Every update, per layer
    (Lasby et al. 2024, Sec. 4 and their code):

    1. Saliency. With ``n`` the RigL drop count and ``A`` the active count, a weight is
       *salient* if it is among the ``A − n`` largest ``|w|`` of the layer (it would be
       kept) or among the ``n`` largest ``|dL/dW|`` of the dense gradient (it would be
       grown).
    2. Neuron ablation. A unit (output neuron / filter) with fewer than
       ``max(1, int(γ_sal · k))`` salient weights is ablated: all its weights are pruned.
       ``k`` is the layer's constant fan-in at ``sparsify`` (the authors' option of
       comparing with the sparse, not the dense, fan-in), ``γ_sal = 0.3`` as in their
       experiments. At least ``ceil(budget / fan_in)`` units stay (the most salient),
       so the budget fits; the last layer is never ablated (the classifier's units are
       the classes). An ablated unit returns at a later update if it becomes salient.
    3. The budget is redistributed: every remaining unit gets fan-in
       ``k' = budget // units_left``, so the layer keeps its budget up to the rounding to
       whole units (``k' · units_left <= budget``). The budget is the layer's active count
       when the scheduler is created, kept in :meth:`state_dict` (a load of the model
       resets ``allocated`` to the loaded count, which ablation may have rounded down).
    4. Prune the ``n`` smallest ``|w|`` of the layer (at least all of each ablated unit)
       and regrow every remaining unit to ``k'`` where ``|dL/dW|`` is largest among its
       positions inactive before the update (grown at zero), as RigL.

    With ``gamma_sal=0`` no unit is ablated: constant fan-in RigL.

    Args:
        gamma_sal: γ_sal, the share of the constant fan-in a unit must keep salient.
    """

    state_fields = {"budgets": LayerCounts(minimum=1)}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        gamma_sal: float = 0.3,
        **kwargs: Any,
    ):
        self.gamma_sal = check_real("SRigL", "gamma_sal", gamma_sal, 0, 1)
        self.budgets: list[int] = []
        super().__init__(model, optimizer, **kwargs)

    def setup(self) -> None:
        wrong = [
            layer.name
            for layer, s in zip(self.layers, self.structures)
            if s is None or s.kind != "fan_in"
        ]
        if wrong:
            raise ValueError(
                f"SRigL needs constant fan-in masks; layers {wrong[:5]} are not: "
                f"sparsify(model, density, structure='fan_in')"
            )
        self.budgets = [layer.active for layer in self.layers]

    def plan(self, fraction: float) -> Plan:
        counts = magnitude_counts(self.layers, fraction)
        targets: list[Tensor | None] = []
        grow = []
        last = len(self.layers) - 1
        for i, (layer, n) in enumerate(zip(self.layers, counts)):
            active = group_counts(layer.mask, self.structures[i])
            ablate = i != last and self.gamma_sal > 0
            target = self._ablate(layer, n, self.budgets[i]) if ablate else active
            size = layer.mask[0].numel()
            low = (active - target).clamp(min=0)
            high = active - (target - (size - active)).clamp(min=0)
            counts[i] = min(max(n, int(low.sum())), int(high.sum()))
            targets.append(target)
            grow.append(int(target.sum()) - layer.active + counts[i])
        return Plan(counts, grow, targets)

    def _ablate(self, layer: SparseLayer, n: int, budget: int) -> Tensor:
        """Per-unit target fan-in after neuron ablation: ``k'`` or 0."""
        units, fan_in = layer.mask.shape[0], layer.mask[0].numel()
        salient = torch.zeros(layer.numel, dtype=torch.bool, device=layer.mask.device)
        keep = layer.active - n
        magnitude = full(layer.weight.detach()).abs()  # whole under FSDP2
        salient[magnitude.flatten().topk(keep, sorted=False).indices] = True
        grad = layer.parametrization.dense_grad.abs().flatten()
        salient[grad.topk(n, sorted=False).indices] = True
        per_unit = salient.view(units, fan_in).sum(1)
        threshold = max(1, int(self.gamma_sal * (budget // units)))
        survive = per_unit >= threshold
        fewest = math.ceil(budget / fan_in)
        if int(survive.sum()) < fewest:  # keep the most salient units that fit the budget
            order = per_unit.argsort(descending=True, stable=True)
            survive = torch.zeros_like(survive)
            survive[order[:fewest]] = True
        k = budget // int(survive.sum())
        return torch.where(survive, k, 0)

    def ablated(self) -> dict[str, int]:
        """Number of ablated units (no active input) of each layer."""
        return {
            layer.name: int((group_counts(layer.mask, s) == 0).sum())
            for layer, s in zip(self.layers, self.structures)
        }
