"""An update plan: how many weights each layer drops and grows, and the pure rules that
algorithms combine to compute one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ..allocation import apportion

if TYPE_CHECKING:
    from ..layers import SparseLayer


@dataclass(frozen=True)
class Plan:
    """What one topology update changes, per layer, in the scheduler's layer order.

    Attributes:
        prune: active weights each layer drops (the lowest prune scores).
        grow: weights each layer grows among its positions inactive before the update
            (the highest grow scores).
        targets: structured layers only: the active count each group (unit or N:M
            group) ends the update with, ``(groups,)``; None (or a None entry): what the
            group had before the update.
    """

    prune: list[int]
    grow: list[int]
    targets: list[Tensor | None] | None = None

    def target(self, index: int) -> Tensor | None:
        """The group targets of layer ``index``, or None."""
        return None if self.targets is None else self.targets[index]


def magnitude_counts(layers: Sequence[SparseLayer], fraction: float) -> list[int]:
    """Weights each layer drops at ``fraction``: ``round(fraction · active)``, leaving at
    least one active and no more than the layer can regrow."""
    return [
        min(round(fraction * layer.active), layer.active - 1, layer.numel - layer.active)
        for layer in layers
    ]


def inactive_counts(layers: Sequence[SparseLayer]) -> list[int]:
    """Positions each layer has inactive: the most it can grow in one update."""
    return [layer.numel - layer.active for layer in layers]


def redistribute(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` regrown weights across layers in proportion to ``weights``, each
    layer taking at most its ``capacity`` (exact integers; see :func:`apportion`)."""
    return apportion(total, list(weights), [0] * len(weights), list(capacity))
