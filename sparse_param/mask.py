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
        return grad.clone().mul_(mask.view(torch.uint8)), None  # uint8: see zero_inactive_


class SparseMask(nn.Module):
    """Parametrization ``weight -> weight`` with an active mask.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`, so the
    module's ``weight`` is what the layer computes with, and
    ``parametrizations.weight.original`` is the stored weight.

    Buffers (both ``torch.bool``, shaped like the weight, saved in the state dict):
        mask: the active connections.
        ever_active: every connection that has been active since ``sparsify``.

    Invariant: the stored weight is exactly zero where ``mask`` is False. The forward
    can then return the stored weight unchanged (no multiply, no allocation); its
    backward zeroes the gradient at inactive positions. Whatever writes to the stored
    weight in place (an optimizer step, an EMA's lerp, ``nn.init``, loading) bumps its
    version counter, and the next forward re-zeroes it first; writes through ``.data``
    bypass the counter and are not seen. Under ``torch.compile`` the forward multiplies
    by the mask instead.

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
        self.allocated = int(mask.count_nonzero())  # active count given by the allocation
        self._clean_version = -1  # version of the stored weight when last zeroed
        self.capture_dense_grad = False
        self.dense_grad: Tensor | None = None
        self._dense_grad_task = -1  # autograd graph task that last added to dense_grad

    def forward(self, weight: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            out = weight * self.mask  # fused by the compiler; no version bookkeeping
        else:
            if weight._version != self._clean_version:
                self.zero_inactive_(weight)
            if not (torch.is_grad_enabled() and weight.requires_grad):
                # The stored weight itself, so in-place edits under no_grad
                # (head-init scaling, nn.init) reach it instead of a temporary.
                return weight
            out = _MaskedGrad.apply(weight, self.mask)
        if self.capture_dense_grad and out.requires_grad:
            out.register_hook(functools.partial(self._accumulate_dense_grad, weight))
        return out

    @torch.no_grad()
    def zero_inactive_(self, weight: Tensor) -> None:
        """Zero the stored ``weight`` where the mask is off, in place, and remember its
        version so the forward knows it is clean until something writes to it."""
        # A uint8 view, not the bool mask: on CPU, products and masked_fill with a bool
        # run an unvectorized path (measured ~20x slower). Inactive weights are finite
        # (zero gradient, zero state), so the product is exact there.
        weight.mul_(self.mask.view(torch.uint8))
        self._clean_version = weight._version

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Store ``weight`` zeroed where inactive (``module.weight = w`` goes through it)."""
        return weight * self.mask

    def _accumulate_dense_grad(self, weight: Tensor, grad: Tensor) -> None:
        # Accumulate exactly as ``weight.grad`` does: the first backward pass after
        # zero_grad() starts afresh (so a step the AMP scaler skipped leaves nothing),
        # and every use of the weight within one backward pass adds up.
        task = torch._C._current_graph_task_id()
        fresh = weight.grad is None and task != self._dense_grad_task
        if fresh or self.dense_grad is None:
            self.dense_grad = grad.detach().clone()
        else:
            self.dense_grad += grad.detach()
        self._dense_grad_task = task

    def extra_repr(self) -> str:
        active = int(self.mask.count_nonzero())
        return f"shape={tuple(self.mask.shape)}, active={active}/{self.mask.numel()}"

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling any; refusing
        # here leaves the model untouched, instead of TorchScript's "Unknown type
        # annotation" from deep inside the parametrization machinery.
        raise RuntimeError(
            "torch.jit.script: the model is sparse, and TorchScript cannot compile its "
            "masking parametrizations. Script a finalized copy instead: "
            "m = sparse_param.finalize(copy.deepcopy(model)); torch.jit.script(m). "
            "(torch.compile works on the sparse model itself.)"
        )


@torch.no_grad()
def zero_inactive_after_load(parametrizations: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook of a ``parametrizations.weight`` list: re-establish
    "stored weight is zero where the mask is off" for whatever was loaded."""
    parametrizations[0].zero_inactive_(parametrizations.original)
