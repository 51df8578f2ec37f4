"""Structured sparsity: constant fan-in and N:M masks, as pure functions of tensors.

Two structures, both defined on the weight flattened to ``(out, fan_in)`` with
``fan_in = weight[0].numel()`` (``in_features`` for a Linear, ``in_channels / groups ·
k_h · k_w`` for a Conv2d):

* ``"fan_in"``: every output unit (row) has the same number ``k`` of active inputs, or
  none at all (a unit SRigL ablated). Groups are the rows: ``(out, fan_in)``.
* ``"N:M"``: every run of ``M`` consecutive inputs of a row has exactly ``N`` active.
  Groups are those runs, along the flattened input dimension (for a conv, the order of
  ``(in_channels, k_h, k_w)`` in memory): ``(out · fan_in / M, M)``. A fan-in that ``M``
  does not divide is refused, not padded: a padded group would hold fewer than ``M``
  real weights, and neither hardware 2:4 kernels nor the density ``N / M`` would hold.

Selection inside groups keeps counts exact: :func:`select_prune` drops the ``n``
lowest-scored active weights of a layer with per-group lower and upper bounds, and
:func:`select_grow` gives every group exactly its own number of new weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Structure:
    """A sparsity structure: ``Structure("fan_in")`` or ``Structure("n:m", n, m)``."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return "fan_in" if self.kind == "fan_in" else f"{self.n}:{self.m}"

    def encode(self) -> Tensor:
        """The structure as an int64 tensor ``[kind, n, m]`` (kind 1: fan-in, 2: N:M), the
        form checkpoints store it in."""
        return torch.tensor([1 if self.kind == "fan_in" else 2, self.n, self.m])

    @staticmethod
    def decode(code: Tensor) -> Structure:
        """Inverse of :meth:`encode`; raises ``ValueError`` on anything else."""
        values = [int(v) for v in code.flatten().tolist()]
        if values == [1, 0, 0]:
            return Structure("fan_in")
        if len(values) == 3 and values[0] == 2 and 0 < values[1] < values[2]:
            return Structure("n:m", values[1], values[2])
        raise ValueError(f"not an encoded sparsity structure: {values}")


def parse_structure(spec: str | Structure | None) -> Structure | None:
    """``None``, ``"fan_in"`` or ``"N:M"`` (``0 < N < M``, e.g. ``"2:4"``) as a
    :class:`Structure`; raises ``ValueError`` naming the accepted forms otherwise."""
    if spec is None or isinstance(spec, Structure):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"structure must be None, 'fan_in' or 'N:M', got {type(spec).__name__}")
    if spec == "fan_in":
        return Structure("fan_in")
    match = re.fullmatch(r"(\d+):(\d+)", spec)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            f"unknown structure {spec!r}; expected None, 'fan_in' or 'N:M' with 0 < N < M "
            f"(e.g. '2:4', '1:4')"
        )
    return Structure("n:m", int(match[1]), int(match[2]))


def check_shape(shape: Sequence[int], structure: Structure, name: str = "layer") -> None:
    """Raise ``ValueError`` if a weight of ``shape`` cannot hold ``structure``."""
    if len(shape) < 2:
        raise ValueError(f"{name}: structured sparsity needs a weight of 2+ dims, got {shape}")
    fan_in = math.prod(shape[1:])
    if structure.kind == "n:m" and fan_in % structure.m:
        raise ValueError(
            f"{name}: fan-in {fan_in} (weight {tuple(shape)}) is not a multiple of M="
            f"{structure.m}, so it cannot be cut into {structure} groups (groups run along "
            f"the flattened input dimension; padding is not supported): exclude the layer "
            f"or use structure='fan_in'"
        )


def groups(tensor: Tensor, structure: Structure) -> Tensor:
    """View of ``tensor`` (shaped like a weight) as ``(groups, group_size)``:
    ``(out, fan_in)`` for fan-in, ``(out · fan_in / M, M)`` for N:M."""
    rows = tensor.reshape(tensor.shape[0], -1)
    return rows if structure.kind == "fan_in" else rows.reshape(-1, structure.m)


def group_counts(mask: Tensor, structure: Structure) -> Tensor:
    """Active count of every group of ``mask`` (int64, ``(groups,)``)."""
    return groups(mask, structure).sum(1)


def violation(mask: Tensor, structure: Structure, *, at_most: bool = False) -> str | None:
    """Why ``mask`` does not satisfy ``structure``, or None when it does.

    ``at_most``: an N:M group may hold fewer than ``N`` active (the layout 2:4 sparse
    kernels take, which a weight with extra zeros still fits); no effect on fan-in.
    """
    if mask.dim() < 2:
        return f"shape {tuple(mask.shape)} cannot hold structure {structure}: it needs 2+ dims"
    if structure.kind == "n:m" and mask[0].numel() % structure.m:
        return (
            f"shape {tuple(mask.shape)} cannot hold structure {structure}: fan-in "
            f"{mask[0].numel()} is not a multiple of {structure.m}"
        )
    counts = group_counts(mask, structure)
    if structure.kind == "fan_in":
        fan_ins = counts[counts > 0].unique()
        if fan_ins.numel() > 1:
            return f"units have different fan-ins {fan_ins.tolist()[:8]}"
        return None
    wrong = ((counts > structure.n) if at_most else (counts != structure.n)).nonzero().flatten()
    if not wrong.numel():
        return None
    first = f"group {int(wrong[0])} has {int(counts[wrong[0]])}"
    if at_most:
        return (
            f"{wrong.numel()} of {counts.numel()} groups of {structure.m} inputs have more "
            f"than {structure.n} active ({first})"
        )
    return (
        f"{wrong.numel()} of {counts.numel()} groups of {structure.m} do not have "
        f"{structure.n} active ({first})"
    )


def fan_in_of(shape: Sequence[int]) -> int:
    """Dense fan-in of a weight: ``prod(shape[1:])``."""
    return math.prod(shape[1:])


def random_mask(
    shape: Sequence[int], structure: Structure, count: int, generator: torch.Generator
) -> Tensor:
    """Uniformly random bool mask of ``shape`` with ``count`` active satisfying
    ``structure``: ``count / out`` per unit (fan-in) or ``N`` per group (N:M); ``count``
    must be a whole number of units (fan-in) or ``N/M`` of the weight (N:M)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    view = groups(mask, structure)
    per_group, remainder = divmod(count, view.shape[0])
    if remainder or (structure.kind == "n:m" and per_group != structure.n):
        raise ValueError(
            f"{count} active weights do not fit {structure} in a {tuple(shape)} weight"
        )
    # Per-row random order from one permutation of the whole weight. Not torch.rand:
    # with a generator seeded like the global one (seed=0 after torch.manual_seed(0)),
    # its floats are the very ones nn.init drew, and sorting them picks the most
    # negative weights (measured: 81% of the active weights negative).
    keys = torch.randperm(view.numel(), generator=generator).view(view.shape)
    order = keys.argsort(dim=1)
    view.scatter_(1, order[:, :per_group], True)
    return mask


def _ranked(key: Tensor, first: Tensor, descending: bool) -> Tensor:
    """Per-row order putting ``first`` entries before the others, each part sorted by
    ``key`` (descending or not); stable, so equal keys keep index order."""
    by_key = key.argsort(dim=1, descending=descending, stable=True)
    by_flag = (~first.gather(1, by_key)).to(torch.uint8).argsort(dim=1, stable=True)
    return by_key.gather(1, by_flag)


def _finite(score: Tensor) -> Tensor:
    # Non-finite scores rank last: -inf is dropped first and grown last.
    score = score.float()
    return torch.where(torch.isfinite(score), score, -torch.inf)


def select_prune(
    active: Tensor, n: int, score: Tensor, structure: Structure, low: Tensor, high: Tensor
) -> Tensor:
    """Bool mask (shape of ``active``) of the ``n`` active weights to drop: the lowest
    ``score`` of the layer, with between ``low[g]`` and ``high[g]`` dropped in group ``g``
    (the lowest ``low[g]`` of every group go first).

    Requires ``0 <= low <= high <= active count`` per group and
    ``sum(low) <= n <= sum(high)``.
    """
    cand, values = groups(active, structure), groups(_finite(score), structure)
    if not int(low.sum()) <= n <= int(high.sum()):
        raise AssertionError(f"cannot drop {n} within group bounds [{low.sum()}, {high.sum()}]")
    order = _ranked(values, cand, descending=False)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    forced = rank < low[:, None]
    optional = ~forced & (rank < high[:, None])
    chosen = forced.clone()
    extra = n - int(low.sum())
    if extra:
        pool = optional.flatten().nonzero().flatten()
        pick = torch.topk(values.flatten()[pool], extra, largest=False, sorted=False).indices
        chosen.view(-1)[pool[pick]] = True
    return chosen.view(active.shape)


def select_grow(
    inactive: Tensor,
    need: Tensor,
    score: Tensor | None,
    structure: Structure,
    generator: torch.Generator,
) -> Tensor:
    """Bool mask of the weights to grow: exactly ``need[g]`` of group ``g``'s ``inactive``
    positions, those with the highest ``score`` (uniformly at random when None)."""
    cand = groups(inactive, structure)
    if bool((need > cand.sum(1)).any()) or bool((need < 0).any()):
        raise AssertionError("a group is asked to grow more than its inactive positions")
    if score is None:  # random keys from a permutation, as in random_mask
        values = torch.randperm(cand.numel(), generator=generator).view(cand.shape)
    else:
        values = groups(_finite(score), structure)
    order = _ranked(values.to(cand.device), cand, descending=True)
    chosen = torch.zeros_like(cand)
    take = torch.arange(cand.shape[1], device=cand.device)[None, :] < need[:, None]
    chosen.scatter_(1, order, take)
    return chosen.view(inactive.shape)


def select(
    structure: Structure,
    candidates: Tensor,
    n: int,
    score: Tensor | None,
    *,
    lowest: bool,
    kept: Tensor | None = None,
    targets: Tensor | None = None,
    regrow: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """The scheduler's selection on a structured layer (bool, shape of ``candidates``).

    Prune (``lowest``, ``candidates`` = the active mask): drop the ``n`` lowest-scored
    weights such that every group can end the update at its ``targets`` count (default:
    its count now): a group keeps at most its target, and when the algorithm regrows
    (``regrow``) it keeps enough that regrowing among its inactive positions reaches the
    target; without regrowth every group drops exactly down to its target.

    Grow (``kept`` = the mask after pruning, ``candidates`` = positions inactive before
    the update): every group grows ``targets − kept`` of its candidates, those with the
    highest ``score`` (random when None); the total must equal ``n``.
    """
    if kept is None:
        counts = group_counts(candidates, structure)
        targets = counts if targets is None else targets
        size = groups(candidates, structure).shape[1]
        low = (counts - targets).clamp(min=0)
        high = counts - (targets - (size - counts)).clamp(min=0) if regrow else low
        return select_prune(candidates, n, score, structure, low, high)
    targets = group_counts(~candidates, structure) if targets is None else targets
    need = targets - group_counts(kept, structure)
    if int(need.sum()) != n:
        raise AssertionError(
            f"structure {structure}: the groups need {int(need.sum())} new weights, the "
            f"algorithm grows {n}"
        )
    return select_grow(candidates, need, score, structure, generator)


def structure_of(parametrization: torch.nn.Module) -> Structure | None:
    """The structure a :class:`~sparse_param.SparseMask` records (its ``structure``
    buffer, set by ``sparsify(..., structure=...)``), or None for an unstructured mask."""
    code = getattr(parametrization, "structure", None)
    return None if code is None else Structure.decode(code)


def record(parametrization: torch.nn.Module, structure: Structure) -> None:
    """Record ``structure`` on a SparseMask as an int64 buffer ``structure`` = ``[kind, n,
    m]``, saved in the state dict next to ``mask``; loading refuses masks that violate
    it (:func:`checkpoint_problems`, called by :mod:`sparse_param.checkpoint`)."""
    parametrization.register_buffer("structure", structure.encode().to(parametrization.mask.device))


def checkpoint_problems(
    name: str, parametrization: torch.nn.Module, mask: Tensor, code: Any
) -> list[str]:
    """What is wrong, structure-wise, with a checkpoint's entries for one sparse layer
    (``mask``, already checked bool and shaped like the weight, and ``code``, its
    ``structure`` entry or None): a structure other than the layer's, or a mask that
    violates the layer's structure. Empty for an unstructured layer."""
    own = structure_of(parametrization)
    if own is None:
        return []
    try:
        loaded = own if code is None else Structure.decode(code)
    except (ValueError, AttributeError):
        return [f"layer {name!r}: {code!r} is not an encoded sparsity structure"]
    if loaded != own:
        return [
            f"layer {name!r} was sparsified with structure {own}, the checkpoint holds "
            f"{loaded}: sparsify the model with structure={str(loaded)!r} before loading"
        ]
    why = violation(mask, own)
    return [] if why is None else [f"layer {name!r}: the mask violates structure {own}: {why}"]
