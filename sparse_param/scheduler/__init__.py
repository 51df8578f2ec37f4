"""The scheduler: one engine that updates every sparse layer's topology, and its plumbing.

:class:`SparseScheduler` (``engine``) decides when to update and carries out the
:class:`Plan` an algorithm returns; around it, one module per concern: the schedule's
numbers (``schedule``), exact selection (``selection``), installing masks
(``topology``), optimizer hooks (``hooks``), zeroing after steps (``zeroing``),
dense-gradient capture (``capture``), checkpoint state (``state``), records and logs
(``records``), argument checks (``checks``), a step count that falls behind the run
(``pace``) and the one-scheduler-per-optimizer registry (``registry``, ``attachment``).
"""

from .attachment import attached_scheduler
from .engine import SparseScheduler
from .hooks import OPTIMIZER_STATE_KEY
from .plan import Plan, inactive_counts, magnitude_counts, redistribute
from .state import Field, LayerCounts, LayerTensors, PositiveReal

__all__ = [
    "OPTIMIZER_STATE_KEY",
    "Field",
    "LayerCounts",
    "LayerTensors",
    "Plan",
    "PositiveReal",
    "SparseScheduler",
    "attached_scheduler",
    "inactive_counts",
    "magnitude_counts",
    "redistribute",
]
