"""A scheduler in a ``torch.distributed.checkpoint`` (DCP) checkpoint, as FSDP2 runs save."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .. import distributed

if TYPE_CHECKING:
    from ..scheduler import SparseScheduler


class SchedulerState:
    """A scheduler as one entry of a ``torch.distributed.checkpoint`` (DCP) state dict.

    DCP flattens nested state dicts into keys and loads into a state dict of the same
    keys; a scheduler's update records vary in number and content, so its state travels
    as one serialized value (``torch.save`` bytes) per rank, under ``"rank{r}"``::

        state = {"model": model_sd, "optim": optim_sd, "sparse": SchedulerState(scheduler)}
        dcp.save(state, checkpoint_id=path)   # and dcp.load(state, checkpoint_id=path)

    Per rank, because a scheduler may hold rank-local state between updates (SNFS's
    momentum sums the rank's own gradients until an update averages them): resume with
    the same number of ranks. DCP calls :meth:`state_dict` when saving and
    :meth:`load_state_dict` when loading (``torch.distributed.checkpoint.stateful``);
    the scheduler's own checks run.
    """

    def __init__(self, scheduler: SparseScheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, bytes]:
        buffer = io.BytesIO()
        torch.save(self.scheduler.state_dict(), buffer)
        return {f"rank{distributed.rank()}": buffer.getvalue()}

    def load_state_dict(self, state: Mapping[str, bytes]) -> None:
        self.scheduler.load_state_dict(load_scheduler_state(state, distributed.rank()))


def load_scheduler_state(state: Mapping[str, bytes], rank: int = 0) -> dict:
    """Rank ``rank``'s scheduler state in a :class:`SchedulerState` entry, e.g. of a DCP
    checkpoint converted to a plain one (``dcp_to_torch_save``), for
    ``scheduler.load_state_dict``."""
    key = f"rank{rank}"
    if key not in state:
        raise ValueError(
            f"load_scheduler_state: no state of rank {rank} (saved: {sorted(state)}); "
            f"resume with as many ranks as the run that saved it"
        )
    return torch.load(io.BytesIO(state[key]), weights_only=True)
