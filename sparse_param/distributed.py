"""The few collective operations the scheduler needs; no-ops outside distributed runs."""

from __future__ import annotations

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
