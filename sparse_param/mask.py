"""The masking parametrization registered on every sparse weight."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .distributed import local_pair
from .gradients import DenseGradCatch, GradMasking, GradThrough, MaskedGrad
from .zeros import zero_where_inactive_


def canonical_mask(mask: Tensor) -> Tensor:
    """``mask`` (bool) with every byte 0 or 1. A bool tensor made by viewing other bytes
    as bool (``uint8_tensor.view(torch.bool)``) can hold 0xFF for True: torch reads it as
    True, but byte-wise arithmetic (the checkpoint checks, the uint8 fast path of
    :func:`~sparse_param.zeros.zero_where_inactive_`) does not."""
    return mask.view(torch.uint8).ne(0)


class SparseMask(nn.Module):
    """Parametrization ``weight -> weight`` with an active mask.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization`, so the
    module's ``weight`` is what the layer computes with, and
    ``parametrizations.weight.original`` is the stored weight.

    Buffers (both ``torch.bool``, shaped like the weight, saved in the state dict):
        mask: the active connections.
        ever_active: every connection that has been active since ``sparsify``.

    Invariant: the stored weight is exactly zero where ``mask`` is False, whatever was
    written there (NaN and Inf included). The forward can then return the stored weight
    unchanged (no multiply, no allocation); the gradient is exactly zero at inactive
    positions, even where the incoming gradient is NaN or Inf, while NaN/Inf at active
    positions stay visible. Whatever writes to the stored weight in place (an optimizer
    step, an EMA's lerp, ``nn.init``, loading) bumps its version counter, and the next
    forward re-zeroes it first; writes through ``.data`` bypass the counter and are not
    seen. Under ``torch.compile`` the forward selects by the mask instead
    (``torch.where``, NaN-safe, fused by the compiler).

    While ``capture_dense_grad`` is True, every backward pass adds the dense gradient of
    the loss with respect to the weight (shape of the weight) to ``dense_grad``, and
    starts afresh after ``zero_grad()`` as ``.grad`` does; the scheduler arms it only
    on the step before a gradient-based update and clears it after, so no dense tensor
    is held in between. The gradient is caught by a tensor hook on the stored weight
    (``sparsify`` registers it, an eager capture forward registers it on a stored weight
    that lacks it), never inside the forward, so ``torch.compile`` traces the forward of
    every kind of step without a graph break. Under FSDP2 the sharded weight's hook takes
    it instead. The gradient side lives in two helpers (:mod:`sparse_param.gradients`):
    ``gradient`` masks ``weight.grad``, ``catch`` keeps the dense gradient.
    """

    mask: Tensor
    ever_active: Tensor
    # Set by an attached scheduler (its watch for an optimizer it does not count):
    # called with the stored weight's version when an eager forward finds the weight
    # written since it was last zeroed. A class default, so older pickles have it too.
    on_write: Callable[[int], None] | None = None

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
        self.register_buffer("mask", mask.clone())
        self.register_buffer("ever_active", mask.clone())
        # Active count given by the allocation (sparsify sets it for a meta-device mask).
        self.allocated = 0 if mask.is_meta else int(mask.count_nonzero())
        self.plan = None  # a meta.MaskPlan while the mask waits for materialize()
        self._clean = (-1, -1)  # versions of the stored weight and mask when last zeroed
        self.gradient = GradMasking(self)
        self.catch = DenseGradCatch(self)
        # the checkpoint entries an enclosing module's load pre-hook just checked
        self._checked: tuple[weakref.ref[Tensor], ...] | None = None

    def __getstate__(self) -> dict[str, object]:
        # Copies (EMA deepcopies, pickles) start without references to the checkpoint
        # entries this one checked; its helpers forget their weights the same way.
        return {**self.__dict__, "_checked": None, "on_write": None}

    @property
    def capture_dense_grad(self) -> bool:
        """Whether backward passes catch the dense gradient into :attr:`dense_grad`."""
        return self.catch.armed

    @capture_dense_grad.setter
    def capture_dense_grad(self, on: bool) -> None:
        self.catch.armed = on

    @property
    def dense_grad(self) -> Tensor | None:
        """The dense gradient dL/dW caught while armed (shape of the weight; a shard of
        it under FSDP2), None when nothing was caught."""
        return self.catch.grad

    @dense_grad.setter
    def dense_grad(self, grad: Tensor | None) -> None:
        self.catch.grad = grad

    def forward(self, weight: Tensor) -> Tensor:
        if self.plan is not None and not weight.is_meta:
            raise RuntimeError(
                "sparse layer: the mask has not been drawn yet: the model was sparsified on "
                "the meta device and given storage (to_empty) whose memory is uninitialised; "
                "call sp.materialize(model) before the first forward"
            )
        if self.capture_dense_grad and torch.is_grad_enabled() and weight.requires_grad:
            if not self.catch.sharded and not torch.compiler.is_compiling():
                self.catch.hook(weight)  # a stored weight that sparsify did not hook
                self._tell_written(weight)
            return GradThrough.apply(weight, self.mask)
        if torch.compiler.is_compiling():
            # NaN-safe selection, no version bookkeeping; fused by the compiler
            out = torch.where(self.mask, weight, 0)
        else:
            if not self.is_clean(weight):
                self._tell_written(weight)
                self.zero_inactive_(weight)
            if not (torch.is_grad_enabled() and weight.requires_grad):
                # The stored weight itself, so in-place edits under no_grad
                # (head-init scaling, nn.init) reach it instead of a temporary.
                return weight
            if not weight.is_leaf:
                return MaskedGrad.apply(weight, self.mask)
            out = self.gradient.hand_out(weight)  # its hooks mask the gradient
        return out

    def _tell_written(self, weight: Tensor) -> None:
        # Only writes to the weight itself: a mask rewritten in place (DDP's buffer
        # broadcast at every forward) is no training step.
        if self.on_write is not None and weight._version != self._clean[0]:
            self.on_write(weight._version)

    def zero_inactive_(self, weight: Tensor) -> None:
        """Zero the stored ``weight`` where the mask is off (exactly, NaN/Inf included),
        in place, and remember its version so the forward knows it is clean until
        something writes to it."""
        data, mask = local_pair(weight, self.mask)  # a sharded weight: its shard
        zero_where_inactive_(data, mask)
        self.mark_clean(weight)

    def mark_clean(self, weight: Tensor) -> None:
        """Record that the stored ``weight`` is zero where inactive as it is now, without
        touching it: only for a caller that knows (see :mod:`sparse_param.scheduler.zeroing`)."""
        self._clean = (weight._version, self.mask._version)

    def is_clean(self, weight: Tensor) -> bool:
        """Whether nothing has written to the stored ``weight`` or the mask since the
        weight was last zeroed."""
        return self._clean == (weight._version, self.mask._version)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Store ``weight`` zeroed where inactive (``module.weight = w`` goes through it)."""
        return torch.where(self.mask, weight, 0)

    def mark_checked(self, entries: tuple[Tensor, ...] | None) -> None:
        """Remember the checkpoint tensors (stored weight, mask, ever_active) of this
        layer that a load pre-hook has checked (weakly: they belong to the caller)."""
        self._checked = None if entries is None else tuple(weakref.ref(e) for e in entries)

    def consume_checked(self, entries: tuple[Tensor, ...]) -> bool:
        """Whether ``entries`` are the very tensors last marked checked; forget them."""
        checked, self._checked = self._checked, None
        return checked is not None and all(r() is e for r, e in zip(checked, entries))

    def extra_repr(self) -> str:
        meta = self.mask.is_meta  # not drawn yet: the allocation's count
        active = self.allocated if meta else int(self.mask.count_nonzero())
        where = " (meta)" if meta else ""
        return f"shape={tuple(self.mask.shape)}, active={active}/{self.mask.numel()}{where}"

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
    "stored weight is zero where the mask is off" for whatever was loaded (NaN/Inf
    included)."""
    parametrizations[0].zero_inactive_(parametrizations.original)


@torch.no_grad()
def zero_inactive_before_save(parametrizations: nn.Module, prefix: str, keep_vars: bool) -> None:
    """``state_dict`` pre-hook of a ``parametrizations.weight`` list: save the stored
    weight zeroed where the mask is off, even when nothing re-zeroed it since it was last
    written. An EMA copy is the case: a compiled forward selects by the mask instead of
    re-zeroing, and timm's ``ModelEmaV3`` reads ``state_dict()`` before every lerp, so
    the lerp starts from, and with the model's zeros ends at, exact zeros."""
    mask = parametrizations[0]
    if not mask.is_clean(parametrizations.original):
        mask.zero_inactive_(parametrizations.original)
