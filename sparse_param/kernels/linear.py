"""What the kernels read from a Linear layer: which classes qualify, and the weight and
pattern the layer computes with (masked for a sparse layer)."""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..layers import is_sparse


def linear_classes() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and, once timm is imported, timm's ``Linear`` (which only adds a
    torchscript cast to ``nn.Linear``'s forward). A model can hold a timm ``Linear`` only
    after timm was imported, so timm is never imported here."""
    timm_linear = getattr(sys.modules.get("timm.layers.linear"), "Linear", None)
    return (nn.Linear,) if timm_linear is None else (nn.Linear, timm_linear)


def linear_type(module: nn.Module) -> type[nn.Module]:
    """The module's class, seen through the class ``parametrize`` generates."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def computed_pattern(module: nn.Module) -> Tensor:
    """Bool pattern ``(out, in)`` of the weight a Linear computes with: its mask for a
    sparse layer (an active weight that happens to be zero counts), else its non-zeros."""
    with torch.no_grad():
        if is_sparse(module):
            return module.parametrizations.weight[0].mask
        return module.weight != 0


def computed_weight(module: nn.Module) -> Tensor:
    """The weight ``(out, in)`` a Linear computes with, detached: masked for a sparse
    layer (the stored weight may hold values off the mask), as it is otherwise."""
    with torch.no_grad():
        weight = module.weight.detach()
        if is_sparse(module):
            weight = weight * module.parametrizations.weight[0].mask
        return weight
