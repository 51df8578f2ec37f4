"""Masks a user already has: the zeros of a pruned checkpoint (``masks="nonzero"``) or
one bool tensor per layer, checked whole before ``sparsify`` changes anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .arguments import describe, listed
from .mask import canonical_mask

NONZERO = "nonzero"


def given_masks(
    targets: Mapping[str, nn.Module],
    masks: str | Mapping[str, Tensor],
    frozen: Sequence[str] = (),
) -> dict[str, Tensor]:
    """One bool mask per target layer (CPU, shaped like its weight), from ``masks``.

    ``"nonzero"``: each target's active weights are its non-zero ones (NaN counts as
    non-zero). A mapping: layer name to a bool tensor shaped like that layer's weight,
    one for every target and none for anything else.

    Raises:
        TypeError: ``masks`` is neither, or a mask is not a bool tensor.
        ValueError: unknown or missing layer names, a wrong shape, a layer on the meta
            device (``"nonzero"``: its values do not exist yet), or a mask with no
            active weight. Nothing is changed.
    """
    if isinstance(masks, str):
        if masks != NONZERO:
            raise ValueError(
                f"sparsify: masks must be {NONZERO!r} or a mapping of layer name to bool "
                f"tensor, got {masks!r}"
            )
        meta = [name for name, module in targets.items() if module.weight.is_meta]
        if meta:
            raise ValueError(
                f"sparsify: masks='nonzero' reads the weights, and layers {meta[:3]} are on "
                f"the meta device; load the pruned weights first"
            )
        found = {name: module.weight.detach().ne(0).cpu() for name, module in targets.items()}
    elif isinstance(masks, Mapping):
        _check_names(targets, masks, frozen)
        found = {name: _checked(name, masks[name], module) for name, module in targets.items()}
    else:
        raise TypeError(
            f"sparsify: masks must be {NONZERO!r} or a mapping of layer name to bool "
            f"tensor, got {describe(masks)}"
        )
    empty = [name for name, mask in found.items() if not mask.any()]
    if empty:
        raise ValueError(
            f"sparsify: the masks of layers {listed(empty)} have no active weight; every sparse "
            f"layer needs at least one: exclude them (exclude=[...]) or give them a mask"
        )
    return found


def _check_names(
    targets: Mapping[str, nn.Module], masks: Mapping[str, Tensor], frozen: Sequence[str]
) -> None:
    unknown = [name for name in masks if name not in targets]
    if unknown:
        frozen_only = set(unknown) <= set(frozen)
        why = "frozen layers, which sparsify leaves dense" if frozen_only else "not target layers"
        raise ValueError(
            f"sparsify: masks names {listed(unknown)}: {why}; the targets are "
            f"{listed(list(targets), 8)}"
        )
    missing = [name for name in targets if name not in masks]
    if missing:
        raise ValueError(
            f"sparsify: masks gives no mask for target layers {listed(missing)}; give one "
            f"for each, or leave them dense "
            f"with exclude=[...]"
        )


def _checked(name: str, mask: object, module: nn.Module) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"sparsify: the mask of {name!r} must be a bool tensor, got {describe(mask)}; "
            f"convert it with .bool() (or weight != 0)"
        )
    shape = tuple(module.weight.shape)
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"sparsify: the mask of {name!r} has shape {tuple(mask.shape)}, the layer's weight "
            f"{shape}"
        )
    return canonical_mask(mask.detach()).cpu()  # on the CPU, as drawn masks are
