"""Which scheduler is attached to an optimizer or a model: at most one each.

Keys (an optimizer, each sparse layer's SparseMask) are held weakly, so a dropped
optimizer or model frees its entry; values are weak references too, so the registry
keeps nothing alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import sparse_layers

if TYPE_CHECKING:
    from .scheduler import SparseScheduler

_ATTACHED: weakref.WeakKeyDictionary[object, weakref.ref[SparseScheduler]] = (
    weakref.WeakKeyDictionary()
)


def attached_scheduler(obj: torch.optim.Optimizer | nn.Module) -> SparseScheduler | None:
    """The scheduler attached to an optimizer, or to any sparse layer of a model (DDP and
    torch.compile wrappers are looked through); None if there is none.

    Call its :meth:`~sparse_param.SparseScheduler.remove` to detach it.
    """
    if isinstance(obj, torch.optim.Optimizer):
        keys: list[object] = [obj]
    else:
        keys = [layer.parametrization for layer in sparse_layers(obj)]
    for key in keys:
        ref = _ATTACHED.get(key)
        if ref is not None and ref() is not None:
            return ref()
    return None


def attach(scheduler: SparseScheduler, keys: Iterable[object]) -> None:
    """Record ``scheduler`` as the one attached to each of ``keys``."""
    for key in keys:
        _ATTACHED[key] = weakref.ref(scheduler)


def detach(scheduler: SparseScheduler, keys: Iterable[object]) -> None:
    """Forget ``scheduler`` for each of ``keys`` it is attached to."""
    for key in keys:
        ref = _ATTACHED.get(key)
        if ref is not None and ref() is scheduler:
            del _ATTACHED[key]
