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

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from . import distributed

if TYPE_CHECKING:
    from .layers import SparseLayer


def full(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a DTensor is gathered (a collective: every rank must call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_pair(tensor: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``tensor``'s local data and the part of the whole ``mask`` (shape of ``tensor``)
    that lines up with it; both as given for a plain tensor. No communication."""
    if not isinstance(tensor, DTensor):
        return tensor, mask
    # src_data_rank=None: every rank slices its own copy of the replicated mask.
    shard = distribute_tensor(mask, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return tensor.to_local(), shard.to_local()


def masked_fill_(tensor: Tensor, mask: Tensor, value: float) -> None:
    """``tensor[mask] = value`` in place, for a plain or a sharded ``tensor``."""
    data, where = local_pair(tensor, mask)
    data.masked_fill_(where, value)


def refuse_sharded(targets: Mapping[str, nn.Module]) -> None:
    """Raise if a target weight is already sharded by ``fully_shard``."""
    sharded = [name for name, module in targets.items() if isinstance(module.weight, DTensor)]
    if sharded:
        raise ValueError(
            f"sparsify: the weights of {sharded[:3]}{' …' if len(sharded) > 3 else ''} are "
            f"already sharded (DTensor): call sparsify(model) before fully_shard(...), "
            f"then build the optimizer and the scheduler"
        )


def capture_after_reduce(layers: Iterable[SparseLayer], on: bool = True) -> None:
    """Make every layer whose stored weight is sharded capture its dense gradient after
    FSDP2's reduce-scatter (:meth:`~sparse_param.mask.SparseMask.capture_after_reduce`);
    ``on=False`` undoes it. The scheduler calls it when it is created and removed."""
    for layer in layers:
        weight = layer.weight
        sharded = on and isinstance(weight, DTensor)
        layer.parametrization.capture_after_reduce(weight if sharded else None)


def averaged(grad: Tensor) -> Tensor:
    """A captured dense gradient averaged over ranks, whole: a sharded one (already
    averaged by FSDP2's reduce-scatter) is gathered, a plain one is all-reduced in place
    (DDP). Collective: every rank must call it."""
    if isinstance(grad, DTensor):
        return grad.full_tensor()
    return distributed.average_(grad)
