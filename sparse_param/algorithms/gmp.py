"""GMP, gradual magnitude pruning (Zhu & Gupta 2017), and GraNet (Liu et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..allocation import allocate
from ..arguments import check_real
from ..layers import SparseLayer
from ..scheduler import LayerCounts, Plan, SparseScheduler
from ..schedules import cubic_decay
from ..structure import Structure, group_counts, parse_structure


class GMP(SparseScheduler):
    """Gradual magnitude pruning from the model's current density to ``density``.

    Sparsify the model at density 1.0 (dense start) or any density above the target.
    Each layer's active count follows the cubic schedule
    ``final + (initial − final)·(1 − (t − t₀)/(t_end − t₀))³`` from ``start`` to ``stop``
    (shares of ``total_steps``), pruning the smallest ``|w|``; the final per-layer
    counts are ``allocate(shapes, density, distribution)``, reached exactly at
    ``stop``. Nothing regrows.

    With ``structure`` (``"fan_in"`` or ``"N:M"``) GMP prunes to that structure: it
    starts from a mask whose groups (units, or runs of M inputs) all hold the same count
    (a dense start does), the schedule is applied per group, so every update leaves each
    group of a layer with the same count c_t, and at ``stop`` the masks satisfy the
    structure exactly (e.g. 2:4 from dense: 4 → 3 → 2 active per group). The masks'
    recorded structure stays the one of ``sparsify`` (they are not N:M before ``stop``).

    Args:
        density: final density over the sparse layers (required; below the model's
            current density; N/M for an N:M structure).
        distribution: allocation of the final counts (``"erk"``, ``"er"``,
            ``"uniform"``, or a mapping of layer name to density).
        structure: None, ``"fan_in"`` or ``"N:M"``: the structure to prune to.
    """

    defaults = {**SparseScheduler.defaults, "drop_fraction": 0.0, "drop_schedule": "constant"}
    regrows = False
    updates_at_stop = True  # the final counts are reached exactly at stop
    state_fields = {"initial_counts": LayerCounts(minimum=lambda gmp: gmp.final_counts)}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float | None = None,
        distribution: str | Mapping[str, float] = "erk",
        structure: str | None = None,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        if density is None:
            raise TypeError(
                f"{owner} needs density=, the final density over the sparse layers (the "
                f"model is pruned to it from its current density)"
            )
        self.density = check_real(owner, "density", density, 0, 1, open_low=True)
        self.distribution = distribution
        self.structure = parse_structure(structure)
        super().__init__(model, optimizer, **kwargs)

    def setup(self) -> None:
        owner = type(self).__name__
        shapes = {layer.name: tuple(layer.mask.shape) for layer in self.layers}
        if self.structure is not None:
            self._setup_structure(self.structure)
        try:
            final = allocate(shapes, self.density, self.distribution, self.structure)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{owner}: {error}") from error
        active = sum(layer.active for layer in self.layers)
        if sum(final.values()) >= active:
            current = active / sum(layer.numel for layer in self.layers)
            raise ValueError(
                f"{owner}: the final density {self.density} is not below the model's current "
                f"density {current:.4f}, so there is nothing to prune; sparsify the model at a "
                f"higher density (1.0 for a dense start) or pass a lower density"
            )
        over = [
            f"{layer.name}: {final[layer.name]} > {layer.active}"
            for layer in self.layers
            if final[layer.name] > layer.active
        ]
        if over:
            raise ValueError(
                f"{owner}: the {self.distribution!r} allocation of density {self.density} "
                f"gives {len(over)} layers more weights than they have active now "
                f"({', '.join(over[:3])}{' …' if len(over) > 3 else ''}): the model was "
                f"sparsified with another distribution. Pass {owner} the distribution the "
                f"model was sparsified with, or sparsify it at a higher density"
            )
        self.initial_counts = [layer.active for layer in self.layers]
        self.final_counts = [final[layer.name] for layer in self.layers]

    def _setup_structure(self, structure: Structure) -> None:
        if not self.keeps_structure:
            raise ValueError(f"{type(self).__name__} cannot prune to a structure (use GMP)")
        recorded = {str(s) for s in self.structures if s is not None}
        if recorded - {str(structure)}:
            raise ValueError(
                f"{type(self).__name__}: the model was sparsified with structure "
                f"{recorded.pop()}, which differs from structure={str(structure)!r}"
            )
        uneven = [
            layer.name
            for layer in self.layers
            if group_counts(layer.mask, structure).unique().numel() > 1
        ]
        if uneven:
            raise ValueError(
                f"{type(self).__name__}: to prune to {structure} every group of a layer must "
                f"start with the same active count; layers {uneven[:5]} do not: sparsify "
                f"at density 1.0 (dense start) or with structure={str(structure)!r}"
            )
        self.structures = [structure] * len(self.layers)

    def target_counts(self, step: int) -> list[int]:
        """Active count of each layer scheduled for ``step`` (with a structure: the
        schedule per group times the number of groups)."""
        left = cubic_decay(step, self.start_step, self.stop_step)
        if self.structure is None:
            return [
                f + round((i - f) * left) for i, f in zip(self.initial_counts, self.final_counts)
            ]
        sizes = [group_counts(layer.mask, self.structure).numel() for layer in self.layers]
        return [
            g * (f // g + round((i - f) // g * left))
            for i, f, g in zip(self.initial_counts, self.final_counts, sizes)
        ]

    def plan(self, fraction: float) -> Plan:
        targets = self.target_counts(self.step_count)
        pruned = [max(layer.active - t, 0) for layer, t in zip(self.layers, targets)]
        return Plan(pruned, [0] * len(pruned), self._group_targets(targets))

    def _group_targets(self, counts: list[int]) -> list[Tensor | None] | None:
        """With a structure: every group of a layer ends at the same count."""
        if self.structure is None:
            return None
        targets: list[Tensor | None] = []
        for layer, count in zip(self.layers, counts):
            groups = group_counts(layer.mask, self.structure)
            targets.append(torch.full_like(groups, count // groups.numel()))
        return targets


class GraNet(GMP):
    """GraNet: gradual magnitude pruning plus zero-cost neuroregeneration.

    At each update every layer is first pruned to its scheduled count as in
    :class:`GMP`; then it drops a further fraction r_t (0.5, cosine decayed) of that
    count by magnitude and regrows as many where the dense gradient is largest among
    the positions that were inactive before the update (RigL-style, grown at zero).
    Each layer ends every update at exactly its scheduled count.
    """

    needs_dense_grad = True
    defaults = {**GMP.defaults, "drop_fraction": 0.5, "drop_schedule": "cosine"}
    regrows = True
    keeps_structure = False  # its regrowth counts are per layer, not per group

    def plan(self, fraction: float) -> Plan:
        targets = self.target_counts(self.step_count)
        regrow = [
            max(min(round(fraction * t), layer.numel - layer.active, t - 1), 0)
            for layer, t in zip(self.layers, targets)
        ]
        pruned = [max(x.active - t, 0) + r for x, t, r in zip(self.layers, targets, regrow)]
        return Plan(pruned, regrow)

    def grow_score(self, index: int, layer: SparseLayer) -> Tensor:
        return layer.parametrization.dense_grad.abs()
