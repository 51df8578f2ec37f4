"""Keeping stored weights zero where inactive across optimizer steps, at no cost when the
step provably cannot move them.

Before every step the optimizer is handed a gradient that is exactly zero where
inactive: a ``weight.grad`` that anything wrote into since the mask zeroed it (clipping,
unscaling, DDP's all-reduce, a user's hook, a stray NaN) is masked again first, so no
value at an inactive position reaches the optimizer's state or, through a dense update
(Muon, Shampoo), the active weights.

An optimizer whose update is dense (an unknown class, or hyper-parameters that are not
finite) can still write into inactive positions, so after its step the stored weights
are re-zeroed: one pass over every sparse weight. For torch's own SGD, Adam and AdamW
with finite hyper-parameters (and ``eps > 0``), an inactive weight that is 0, with a
gradient of exactly 0 and optimizer state of exactly 0, stays exactly 0: the update there
is ``lr · 0`` (SGD, momentum, weight decay ``wd · 0``) or ``lr · 0 / (sqrt(0) + eps)``
(Adam, AdamW). For those the pass is skipped, per layer, once the step's inputs are made
exact before it:

- the stored weight is zero where inactive (its version counter has not moved since it
  was last zeroed; otherwise it is zeroed now);
- ``weight.grad`` is zero where inactive (as above);
- every optimizer state tensor shaped like the weight is zero where inactive. This is
  known without a pass when each one is the very tensor, at the very version, that an
  exact step left behind, under the same mask; otherwise it is checked, and whatever it
  holds where inactive (a NaN a dirty step wrote there, values loaded from elsewhere) is
  zeroed: an inactive weight's state never reaches an active weight, since a grown
  weight starts with zero state.

Nothing is trusted that a write could have changed without moving a version counter;
the forward's check stays the safety net for writes after the step.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import local_pair
from ..layers import SparseLayer
from ..zeros import zero_where_inactive_

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


class _StateSeen:
    """The optimizer state tensors (shaped like the weight) of one layer as an exact step
    left them: which tensors, at which versions, under which mask version."""

    def __init__(self, mask: Tensor, state: list[Tensor]) -> None:
        self.mask_version = mask._version
        self.tensors = [(weakref.ref(t), t._version) for t in state]

    def unchanged(self, mask: Tensor, state: list[Tensor]) -> bool:
        return (
            self.mask_version == mask._version
            and len(self.tensors) == len(state)
            and all(r() is t and v == t._version for (r, v), t in zip(self.tensors, state))
        )


class InactiveZeroing:
    """Around every optimizer step, keep the stored weights of ``layers`` zero where
    inactive: before it, make each stepped layer's gradient (and, where the step is exact,
    its weight and optimizer state) zero where inactive; after it, re-zero the layers
    whose step was not exact and mark the others clean without a pass.

    Call :meth:`after_step` once after every ``optimizer.step()``; :meth:`remove`
    detaches the hooks it registers on ``optimizer`` (a step pre-hook and a
    ``load_state_dict`` post-hook). A step pre-hook registered on the optimizer *after*
    this object that writes into a gradient is seen after the step: that layer is
    re-zeroed, and its state checked again before the next step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layers: Sequence[SparseLayer]) -> None:
        self.optimizer = optimizer
        self.layers = list(layers)
        # per layer, decided before the step: exact, not exact, or not stepped (None)
        self._exact: list[bool | None] | None = None
        self._state_seen: list[_StateSeen | None] = [None] * len(self.layers)
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_load_state_dict_post_hook(self._state_loaded),
        ]

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        keeps_zeros = {id(g): step_keeps_zeros(optimizer, g) for g in optimizer.param_groups}
        exact: list[bool | None] = []
        for i, layer in enumerate(self.layers):
            group = groups.get(id(layer.weight))
            if group is None:
                exact.append(None)  # the step does not touch it
                continue
            p = layer.parametrization
            if not p.gradient.is_clean(layer.weight):
                p.gradient.mask_now(layer.weight)
            if not p.is_clean(layer.weight):  # written since the forward
                p.zero_inactive_(layer.weight)
            if keeps_zeros[id(group)]:
                self._zero_state(i, layer)
            exact.append(keeps_zeros[id(group)])
        self._exact = exact

    def _shaped_state(self, layer: SparseLayer) -> list[Tensor]:
        state = self.optimizer.state.get(layer.weight, {})
        shape = layer.mask.shape
        return [v for v in state.values() if isinstance(v, Tensor) and v.shape == shape]

    def _zero_state(self, index: int, layer: SparseLayer) -> None:
        state = self._shaped_state(layer)
        seen = self._state_seen[index]
        if seen is not None and seen.unchanged(layer.mask, state):
            return  # as the last exact step left it: zero where inactive
        for value in state:
            data, mask = local_pair(value, layer.mask)
            zero_where_inactive_(data, mask)

    def _state_loaded(self, optimizer: torch.optim.Optimizer) -> None:
        self._state_seen = [None] * len(self.layers)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-zero every layer the last step may have moved where inactive; mark the
        others clean without a pass."""
        exact, self._exact = self._exact, None
        if exact is None:  # no pre-hook ran since the last call (nested steps): assume moved
            exact = [False] * len(self.layers)
        for i, layer in enumerate(self.layers):
            if exact[i] is None:
                continue  # not stepped
            p = layer.parametrization
            if exact[i] and p.gradient.is_clean(layer.weight):
                p.mark_clean(layer.weight)
                self._state_seen[i] = _StateSeen(layer.mask, self._shaped_state(layer))
            else:
                p.zero_inactive_(layer.weight)
                self._state_seen[i] = None

    def remove(self) -> None:
        """Detach from the optimizer."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
