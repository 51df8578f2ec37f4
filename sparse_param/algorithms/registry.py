"""The algorithms by name: one table, and the one function that builds a scheduler from a
name (the recipe, the demo and the studies all build theirs here)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..scheduler import SparseScheduler
from .dsr import DSR
from .gmp import GMP, GraNet
from .rigl import RigL
from .set import SET
from .snfs import SNFS
from .srigl import SRigL
from .static import Static

ALGORITHMS: dict[str, type[SparseScheduler]] = {
    cls.__name__.lower(): cls for cls in (Static, SET, RigL, SRigL, SNFS, DSR, GMP, GraNet)
}
# Those that prune a denser model down to a final ``density=`` (GMP and its kin).
PRUNING_METHODS = tuple(name for name, cls in ALGORITHMS.items() if issubclass(cls, GMP))


def create_scheduler(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
) -> SparseScheduler:
    """Build the scheduler of algorithm ``name`` (a key of :data:`ALGORITHMS`, any case)
    for a model that :func:`~sparse_param.sparsify` has made sparse.

    ``kwargs`` go to the algorithm's constructor unchanged (``total_steps``,
    ``update_interval``, ``drop_fraction``, ``seed``, the algorithm's own arguments);
    ``create_scheduler("rigl", model, optimizer, total_steps=1000)`` is
    ``RigL(model, optimizer, total_steps=1000)``. An algorithm added to
    :data:`ALGORITHMS` is found by this function too.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not an algorithm (``"dense"`` included: dense training
            has no scheduler).
    """
    if not isinstance(name, str):
        raise TypeError(f"create_scheduler: name must be an algorithm's name, got {name!r}")
    key = name.lower()
    if key not in ALGORITHMS:
        hint = " ('dense' has no scheduler: train without one)" if key == "dense" else ""
        raise ValueError(
            f"create_scheduler: unknown algorithm {name!r}{hint}; choose one of "
            f"{', '.join(ALGORITHMS)}"
        )
    return ALGORITHMS[key](model, optimizer, **kwargs)
