"""Whether a scheduler's step count keeps pace with the run it schedules.

A schedule that restarts at step 0 on a trained model, runs past its ``total_steps`` or
counts no step at all raises nothing and changes nothing: the topology just stops
moving. Each case is caught where it can be told apart from a legitimate flow, at no
cost to a step:

- before the first step counted after the scheduler is created or loaded (a resume
  loads the model, the optimizer and the scheduler in any order, and sets the real
  ``total_steps`` last, so only then is the state final): a step count of 0 on a model
  whose ``ever_active`` shows a run in progress, an optimizer state loaded without the
  scheduler's entry and no scheduler state after it, a step count past ``total_steps``;
- by the forwards that find a stored weight written since it was last zeroed, which
  after a step of the scheduler's own optimizer never happens (the step marks it
  clean): weights written step after step while the scheduler counts nothing are being
  trained by an optimizer it is not attached to.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Protocol

import torch

from ..distributed import is_sharded
from ..layers import SparseLayer
from . import checks
from .checks import FEW_UPDATES
from .schedule import Schedule

# Writes to one layer's weights, with no step counted in between, before the watch
# warns: far more than the few in-place edits a script makes between two steps.
WATCH_WRITES = 10


class Scheduled(Protocol):
    """What :class:`Pace` reads of its scheduler (a
    :class:`~sparse_param.scheduler.engine.SparseScheduler`)."""

    optimizer: torch.optim.Optimizer
    layers: Sequence[SparseLayer]
    schedule: Schedule
    updates_topology: bool
    step_count: int
    num_updates: int

    @property
    def total_steps(self) -> int: ...

    @property
    def stop_step(self) -> int: ...

    def count_updates(self, limit: int | None = None) -> int: ...


class Pace:
    """The checks of ``scheduler``'s step count: :meth:`check` before the next counted
    step while :attr:`due`; a watch on the eager forwards of its layers (not of FSDP2's
    sharded ones, whose forward sees a gathered copy), for a scheduler that updates the
    topology, until :meth:`unwatch`."""

    def __init__(self, scheduler: Scheduled) -> None:
        self.scheduler = scheduler
        self.due = True  # run check() before the next counted step
        self._first = True
        self._unrestored = False  # an optimizer state without the scheduler's was loaded
        self._watched_at = (-1, -1)  # (step_count, num_updates) the counts below are since
        self._writes: list[int] = []
        self._versions: list[int | None] = []
        if scheduler.updates_topology:
            this = weakref.ref(self)  # held weakly: a model keeps no optimizer alive
            for i, layer in enumerate(scheduler.layers):
                if not is_sharded(layer.weight):
                    layer.parametrization.on_write = functools.partial(_written, this, i)

    def restored(self) -> None:
        """The scheduler's state was loaded: check it at the next step."""
        self.due, self._unrestored = True, False

    def unrestored(self) -> None:
        """The optimizer loaded a state without the scheduler's: unless the scheduler's
        own state is loaded after it, say so at the next step."""
        self.due, self._unrestored = True, True

    def check(self) -> None:
        """Before counting a step: on the first, that the optimizer still holds the
        weights and the schedule updates the topology; after creation or a load, that
        the step count is where the run is."""
        s, owner = self.scheduler, type(self.scheduler).__name__
        if self._first:
            checks.check_still_held(owner, s.optimizer, s.layers)
            if s.updates_topology:
                updates = s.count_updates(limit=FEW_UPDATES)
                checks.warn_if_few_updates(owner, s.schedule, updates)
        if s.updates_topology:
            if s.step_count == 0 and s.num_updates == 0:
                checks.warn_if_restarted(owner, s.layers)
            elif self._unrestored:
                checks.warn_unrestored(owner, s.step_count, s.total_steps)
            if s.step_count >= s.total_steps:
                checks.warn_past_the_end(owner, s.step_count, s.schedule)
        self._first = self._unrestored = self.due = False

    def written(self, index: int, version: int) -> None:
        """A forward found layer ``index``'s stored weight written (at ``version``) since
        it was last zeroed. Warn once the layer was written :data:`WATCH_WRITES` times
        with no step counted and no update (an explicit ``update()`` writes the weights
        too) in between, while updates remain."""
        s = self.scheduler
        if (s.step_count, s.num_updates) != self._watched_at:  # the scheduler acted
            self._watched_at = (s.step_count, s.num_updates)
            self._writes, self._versions = [0] * len(s.layers), [None] * len(s.layers)
        if self._versions[index] == version:  # the same write, seen by another forward
            return
        self._versions[index] = version
        self._writes[index] += 1
        if self._writes[index] >= WATCH_WRITES and s.step_count < s.stop_step:
            self.unwatch()
            name = s.layers[index].name
            checks.warn_not_counted(
                type(s).__name__, name, WATCH_WRITES, s.step_count, s.total_steps, s.optimizer
            )

    def unwatch(self) -> None:
        """Stop watching the forwards."""
        for layer in self.scheduler.layers:
            layer.parametrization.on_write = None


def _written(pace: weakref.ref[Pace], index: int, version: int) -> None:
    watching = pace()
    if watching is not None:
        watching.written(index, version)
