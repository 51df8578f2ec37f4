"""Keeping stored weights zero where inactive across optimizer steps, at no cost when the
step provably cannot move them.

An optimizer whose update is dense (Muon, Shampoo, an unknown class, or any step after
something edited a gradient) can write into inactive positions, so after its step the
stored weights are re-zeroed: one pass over every sparse weight. For torch's own SGD,
Adam and AdamW with finite hyper-parameters (and ``eps > 0``), an inactive weight that is
0, with a gradient of exactly 0 and optimizer state of exactly 0, stays exactly 0: the
update there is ``lr · 0`` (SGD, momentum, weight decay ``wd · 0``) or
``lr · 0 / (sqrt(0) + eps)`` (Adam, AdamW). For those the pass is skipped when all of
this is known, per layer:

- the stored weight was zero where inactive at the start of the step (its version
  counter has not moved since it was last zeroed);
- ``weight.grad`` is the gradient the mask zeroed after accumulation, untouched since
  (same tensor, same version: clipping, unscaling, DDP's all-reduce or a user hook that
  wrote into it make the layer fall back to the pass);
- every optimizer state tensor shaped like the weight is zero where inactive: checked
  once (and again after the optimizer's or the mask's state is loaded or the mask
  changes); afterwards the step keeps it zero, and topology updates zero it.

The forward's version-counter check stays the safety net for writes after the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..layers import SparseLayer

# Optimizer classes (exactly these, not subclasses: a subclass may change the update)
# whose step leaves an exactly-zero weight with zero gradient and zero state at zero,
# provided these hyper-parameters are finite.
_EXACT_STEP = {
    torch.optim.SGD: ("lr", "momentum", "dampening", "weight_decay"),
    torch.optim.Adam: ("lr", "betas", "eps", "weight_decay"),
    torch.optim.AdamW: ("lr", "betas", "eps", "weight_decay"),
}


def step_keeps_zeros(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``optimizer``'s step on the params of ``group`` leaves a zero weight with
    zero gradient and zero state exactly at zero."""
    names = _EXACT_STEP.get(type(optimizer))
    if names is None:
        return False
    values = []
    for name in names:
        value = group.get(name, 0.0)
        values.extend(value if isinstance(value, (tuple, list)) else [value])
    if not all(math.isfinite(float(v)) for v in values):
        return False
    return "eps" not in names or float(group["eps"]) > 0  # 0 / (0 + eps)


class InactiveZeroing:
    """After every optimizer step, make the stored weights of ``layers`` zero where
    inactive: re-zero the layers the step may have moved, mark the others clean.

    Call :meth:`after_step` once after every ``optimizer.step()``; :meth:`remove`
    detaches the hooks it registers on ``optimizer`` (a step pre-hook and a
    ``load_state_dict`` post-hook). A step pre-hook registered on the optimizer *after*
    this object that writes into weights is not seen by the check (it runs later).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layers: Sequence[SparseLayer]) -> None:
        self.optimizer = optimizer
        self.layers = list(layers)
        self._exact: list[bool] | None = None  # per layer, decided before the step
        self._state_checked: list[int | None] = [None] * len(self.layers)  # mask version
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_load_state_dict_post_hook(self._state_loaded),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        exact = []
        for i, layer in enumerate(self.layers):
            group = groups.get(id(layer.weight))
            p = layer.parametrization
            exact.append(
                group is not None
                and step_keeps_zeros(optimizer, group)
                and p.is_clean(layer.weight)
                and p.gradient.is_clean(layer.weight)
                and self._state_is_clean(i, layer)
            )
        self._exact = exact

    def _state_is_clean(self, index: int, layer: SparseLayer) -> bool:
        # Checked once per mask version: afterwards only exact steps (which keep it
        # zero) and topology updates (which zero it) write where the mask is off.
        if self._state_checked[index] == layer.mask._version:
            return True
        inactive = ~layer.mask
        for value in self.optimizer.state.get(layer.weight, {}).values():
            if isinstance(value, Tensor) and value.shape == layer.mask.shape:
                if value[inactive].any():
                    return False
        self._state_checked[index] = layer.mask._version
        return True

    def _state_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        self._state_checked = [None] * len(self.layers)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-zero every layer the last step may have moved where inactive; mark the
        others clean without a pass."""
        exact, self._exact = self._exact, None
        for i, layer in enumerate(self.layers):
            p = layer.parametrization
            if exact is not None and exact[i] and p.gradient.is_clean(layer.weight):
                p.mark_clean(layer.weight)
            else:
                p.zero_inactive_(layer.weight)

    def remove(self) -> None:
        """Detach from the optimizer."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
