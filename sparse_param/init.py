"""Initial state of a sparse layer: its random mask, and weights scaled to the mask.

Below both :mod:`sparse_param.sparsify` (which draws masks at once) and
:mod:`sparse_param.meta` (which draws them when a meta-device model is materialized).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .arguments import check_model
from .distributed import local_pair
from .layers import sparse_layers
from .sampling import random_subset
from .structure import Structure, random_mask


@torch.no_grad()
def rescale_to_active_fan_in(model: nn.Module) -> None:
    """Scale each output unit's stored weights by ``sqrt(fan_in / active_fan_in)``.

    ``fan_in`` is the unit's dense fan-in (``weight[0].numel()``); units with no active
    input are left as they are.
    """
    check_model("rescale_to_active_fan_in", model)
    for layer in sparse_layers(model):
        active = layer.mask.flatten(1).sum(1).to(layer.weight.dtype)
        fan_in = layer.mask[0].numel()
        scale = torch.where(active > 0, (fan_in / active.clamp(min=1)).sqrt(), 1.0)
        factor = scale.view(-1, *([1] * (layer.mask.dim() - 1))).expand(layer.mask.shape)
        data, factor = local_pair(layer.weight, factor)  # sharded: this rank's rows
        data.mul_(factor)


def draw_mask(
    shape: Sequence[int], count: int, structure: Structure | None, generator: torch.Generator
) -> torch.Tensor:
    """A random bool mask of ``shape`` with ``count`` active (and ``structure``), drawn
    from ``generator``: what sparsify (and materialize, for a meta model) installs."""
    if structure is not None:
        return random_mask(shape, structure, count, generator)
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[random_subset(numel, count, generator)] = True
    return mask.view(*shape)
