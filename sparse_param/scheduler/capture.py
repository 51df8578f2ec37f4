"""The dense gradient dL/dW that gradient-based growth scores, captured only when due.

Each layer's :class:`~sparse_param.mask.SparseMask` catches the gradient while its
``capture_dense_grad`` flag is on; this module arms and disarms the flags, averages
what was caught over ranks before an update, and drops it after. Under FSDP2 an
all-gathered copy of the weight replaces the stored one in forward and backward, so no
hook on the stored weight sees its gradient: the sharded weight's post-accumulate-grad
hook takes the reduce-scattered shard instead (sharded like the weight until the
update gathers it, averaged and accumulated by FSDP2 itself, eager and compiled alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..distributed import averaged, is_sharded

if TYPE_CHECKING:
    from ..layers import SparseLayer


class DenseGradCapture:
    """Dense-gradient capture of ``layers``: hooked on the sharded weights at creation,
    unhooked by :meth:`remove`."""

    def __init__(self, layers: Sequence[SparseLayer]) -> None:
        self.layers = list(layers)
        for layer in self.layers:
            weight = layer.weight
            layer.parametrization.catch.after_reduce_on(weight if is_sharded(weight) else None)

    def arm(self, on: bool) -> None:
        """Capture (or not) in the backward passes of the next optimizer step."""
        for layer in self.layers:
            layer.parametrization.capture_dense_grad = on

    def average(self, owner: str, step: int) -> None:
        """Replace every captured gradient by its average over ranks, whole. Collective:
        every rank must call it. Raises if a layer caught nothing."""
        for layer in self.layers:
            grad = layer.parametrization.dense_grad
            if grad is None:
                raise RuntimeError(
                    f"{owner}: no dense gradient was captured for layer {layer.name!r} "
                    f"before the update at step {step}; run forward and backward through "
                    f"the model before optimizer.step()"
                )
            layer.parametrization.dense_grad = averaged(grad)

    def clear(self) -> None:
        """Drop what was captured (after an update: no dense tensor is held in between)."""
        for layer in self.layers:
            layer.parametrization.dense_grad = None

    def remove(self) -> None:
        """Stop capturing and unhook the sharded weights."""
        for layer in self.layers:
            layer.parametrization.catch.after_reduce_on(None)
        self.arm(False)
        self.clear()
