"""Uniform sampling without replacement, fast for the small shares sparse training needs."""

from __future__ import annotations

import torch
from torch import Tensor


def random_subset(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(n)`` (int64, CPU, unsorted).

    For ``k <= n / 8`` it costs O(k log k) rather than the O(n) of ``randperm(n)[:k]``:
    draw with replacement, keep the distinct values (a uniform random subset of their
    number), draw more if short, then pick ``k`` of them uniformly. Deterministic for a
    given generator state on every platform.
    """
    if not 0 <= k <= n:
        raise ValueError(f"random_subset: cannot draw {k} of {n}")
    if 8 * k > n:
        return torch.randperm(n, generator=generator)[:k]
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < k:
        draw = torch.randint(n, (k + k // 8 + 16,), generator=generator)
        picked = torch.cat([picked, draw]).unique()
    return picked[torch.randperm(picked.numel(), generator=generator)[:k]]
