"""SET (Mocanu et al., Nature Communications 2018): magnitude pruning, random regrowth."""

from __future__ import annotations

from ..scheduler import SparseScheduler


class SET(SparseScheduler):
    """Sparse Evolutionary Training.

    Each update drops the fraction ζ (0.3, constant, as in the paper) of each layer's
    active weights with the smallest ``|w|`` and regrows as many uniformly at random
    among the inactive positions, from the scheduler's own generator (the same stream
    on every DDP rank). Per-layer counts never change; grown weights start at zero.
    """

    defaults = {**SparseScheduler.defaults, "drop_schedule": "constant"}
