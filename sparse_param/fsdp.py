"""FSDP2 (``torch.distributed.fsdp.fully_shard``): sparse state next to sharded weights.

Supported order: ``sparsify(model)`` first, then ``fully_shard`` (its submodules, then
the root), then the optimizer and the scheduler. ``sparsify`` refuses weights that are
already sharded.

The stored weights (and every optimizer state tensor) become DTensors sharded on dim 0;
``mask`` and ``ever_active`` stay plain tensors, replicated: the same whole tensor on
every rank. FSDP2 all-gathers each weight for the forward and backward, which then need
the whole mask of the layer on every rank at every step (the gradient is masked before
it is reduce-scattered); a sharded mask would have to be all-gathered as often. The cost
is 2 bytes per weight per rank (mask and ever_active, bool), against 4 / world_size bytes
of sharded float32 weight. Where the library writes to a sharded tensor (re-zeroing after
a step, pruning and growing, zeroing optimizer state) it writes the local shard with the
matching slice of the mask; an update gathers each layer's weight (``full_tensor``) so a
layer's top-k is global over its shards and every rank computes the same new mask.
The dense gradient of a capture step reaches no hook on the stored weight (FSDP2 swaps
an all-gathered copy in), so it is taken from the sharded ``.grad`` once FSDP2 has
reduce-scattered it (:func:`capture_after_reduce`): sharded like the weight until the
update, reduced and accumulated by FSDP2 itself, eager and compiled alike.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from . import distributed

if TYPE_CHECKING:
    from .scheduler import SparseScheduler


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
