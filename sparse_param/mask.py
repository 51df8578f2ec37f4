"""The masking parametrization registered on every sparse weight."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


class _MaskedGrad(torch.autograd.Function):
    """Identity in forward, ``grad * mask`` in backward.

    The stored weight is kept exactly zero where the mask is off, so the forward needs no
    multiplication (and no allocation): the layer computes with the stored weight
    itself. Only the gradient has to be masked, so inactive weights never train.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class SparseMask(nn.Module):
    """Parametrization ``weight -> weight`` with an active mask.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`, so the
    module's ``weight`` is what the layer computes with, and
    ``parametrizations.weight.original`` is the stored weight.

    Buffers (both ``torch.bool``, shaped like the weight, saved in the state dict):
        mask: the active connections.
        ever_active: every connection that has been active since ``sparsify``.

    Invariant kept by this library: the stored weight is exactly zero where ``mask`` is
    False (``sparsify``, ``load_state_dict`` and every scheduler step enforce it). In
    training mode the forward can then return the stored weight unchanged, and its
    backward zeroes the gradient at inactive positions; in eval mode it multiplies by
    the mask, which keeps deep copies such as EMA models exact.

    While ``capture_dense_grad`` is True, every backward pass adds the dense gradient of
    the loss with respect to the weight (shape of the weight) to ``dense_grad``, and
    starts afresh after ``zero_grad()`` as ``.grad`` does; the scheduler arms it only
    on the step before a gradient-based update and clears it after, so no dense tensor
    is held in between.
    """

    mask: Tensor
    ever_active: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
        self.register_buffer("mask", mask.clone())
        self.register_buffer("ever_active", mask.clone())
        self.allocated = int(mask.sum())  # active count given by the allocation
        self.capture_dense_grad = False
        self.dense_grad: Tensor | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training:
            # Evaluation copies (an EMA lerped toward pruned weights, a checkpoint being
            # validated) may hold stale values where the mask is off: mask explicitly.
            return weight * self.mask
        out = _MaskedGrad.apply(weight, self.mask)
        if self.capture_dense_grad and out.requires_grad:
            out.register_hook(functools.partial(self._accumulate_dense_grad, weight))
        return out

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Store ``weight`` zeroed where inactive (``module.weight = w`` goes through it)."""
        return weight * self.mask

    def _accumulate_dense_grad(self, weight: Tensor, grad: Tensor) -> None:
        # Accumulate exactly as ``weight.grad`` does: a backward pass after zero_grad
        # starts afresh, so an optimizer step the AMP scaler skipped leaves nothing.
        if weight.grad is None or self.dense_grad is None:
            self.dense_grad = grad.detach().clone()
        else:
            self.dense_grad += grad.detach()

    def extra_repr(self) -> str:
        active = int(self.mask.sum())
        return f"shape={tuple(self.mask.shape)}, active={active}/{self.mask.numel()}"


@torch.no_grad()
def zero_inactive_after_load(parametrizations: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook of a ``parametrizations.weight`` list: re-establish
    "stored weight is zero where the mask is off" for whatever was loaded."""
    parametrizations.original.mul_(parametrizations[0].mask)
