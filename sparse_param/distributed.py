"""The tensor operations that differ under DDP and FSDP2; plain tensors pass through.

Under DDP every rank holds whole tensors and the few collectives the scheduler needs
(averaging, broadcasting a mask) are no-ops outside a distributed run. Under FSDP2
(``fully_shard``) the stored weights, their gradients and every optimizer state tensor
are DTensors sharded on dim 0, while ``mask`` and ``ever_active`` stay whole on every
rank (replicated): where the library writes to a sharded tensor it writes the local
shard with the matching slice of the mask (:func:`local_pair`), and where it needs a
layer's whole tensor (a top-k over the layer) it gathers it (:func:`full`).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def average_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over all ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def broadcast_mask_(mask: Tensor) -> Tensor:
    """Make every rank hold rank 0's ``mask`` (bool), in place."""
    if world_size() > 1:
        # Not every backend (gloo) broadcasts bool tensors: go through uint8.
        as_bytes = mask.to(torch.uint8)
        dist.broadcast(as_bytes, src=0)
        mask.copy_(as_bytes.bool())
    return mask


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's sharded parameters, gradients, state).

    Looked up, never imported: importing ``torch.distributed.tensor`` costs about a second,
    and no tensor can be a DTensor before something else imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a DTensor is gathered (a collective: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_pair(tensor: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``tensor``'s local data and the part of the whole ``mask`` (shape of ``tensor``)
    that lines up with it; both as given for a plain tensor. No communication."""
    if not is_sharded(tensor):
        return tensor, mask
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank slices its own copy of the replicated mask.
    shard = distribute_tensor(mask, tensor.device_mesh, tensor.placements, src_data_rank=None)
    return tensor.to_local(), shard.to_local()


def masked_fill_(tensor: Tensor, mask: Tensor, value: float) -> None:
    """``tensor[mask] = value`` in place, for a plain or a sharded ``tensor``."""
    data, where = local_pair(tensor, mask)
    data.masked_fill_(where, value)


def averaged(grad: Tensor) -> Tensor:
    """A captured dense gradient averaged over ranks, whole: a sharded one (already
    averaged by FSDP2's reduce-scatter) is gathered, a plain one is all-reduced in place
    (DDP). Collective: every rank must call it."""
    if is_sharded(grad):
        return grad.full_tensor()
    return average_(grad)
