"""Finding the scheduler attached to an optimizer or a model."""

from __future__ import annotations

import torch
from torch import nn

from ..arguments import describe
from ..layers import sparse_layers
from . import registry
from .engine import SparseScheduler


def attached_scheduler(obj: torch.optim.Optimizer | nn.Module) -> SparseScheduler | None:
    """The scheduler attached to an optimizer, or to any sparse layer of a model (DDP and
    torch.compile wrappers are looked through); None if there is none.

    Call its :meth:`~sparse_param.SparseScheduler.remove` to detach it.
    """
    if isinstance(obj, torch.optim.Optimizer):
        keys: list[object] = [obj]
    elif not isinstance(obj, nn.Module):
        raise TypeError(
            f"attached_scheduler: expected the optimizer or the model the scheduler was "
            f"created with, got {describe(obj)}"
        )
    else:
        keys = [layer.parametrization for layer in sparse_layers(obj)]
    found = registry.lookup(keys)
    return found if isinstance(found, SparseScheduler) else None
