"""The masking parametrization registered on every sparse weight."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .distributed import local_pair

# Integer dtype of each float element size: zeroing goes through the weight's bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 18  # elements zeroed per product (measured: 2^16 to 2^20 all help)


@torch.no_grad()
def zero_where_inactive_(tensor: Tensor, mask: Tensor) -> Tensor:
    """Set ``tensor`` to exactly +0 where ``mask`` (bool, same shape) is False, in place,
    whatever it held there (NaN and Inf included); keep it bit for bit where True.

    Why this kernel (CPU, ``benchmarks/bench_core.py`` (d), resnet50's weights, 1
    thread): multiplying the float by the mask's uint8 view is fast but gives NaN for
    NaN/Inf · 0; in place, ``masked_fill_`` with a precomputed inverse and
    ``torch.where(..., out=)`` took 1.5–2× as long, a product with the bool mask ~5×;
    out-of-place forms (``torch.where``, ``clone().mul_``) 3–4×, most of it the fresh
    allocation (page faults). Multiplying the float's *bit pattern*, an integer view of
    the same size, by the mask's uint8 view runs as fast as the float product, in place,
    and is exact: ``bits · 1`` is the value unchanged, ``bits · 0`` is +0.0.
    """
    bits = _BITS.get(tensor.element_size())
    if bits is None:  # no integer of that size (complex128): the slow exact form
        return tensor.masked_fill_(~mask, 0)
    values, factors = tensor.view(bits), mask.view(torch.uint8)
    if values.is_contiguous() and factors.is_contiguous():
        # In chunks: the product first widens the uint8 factors to the integer type, a
        # temporary the size of its operand; a chunk's stays in cache and is reused.
        values, factors = values.view(-1), factors.view(-1)
        for start in range(0, values.numel(), _CHUNK):
            values[start : start + _CHUNK].mul_(factors[start : start + _CHUNK])
    else:
        values.mul_(factors)
    return tensor


class _MaskedGrad(torch.autograd.Function):
    """Identity in forward; the gradient is exactly zero where the mask is off.

    The stored weight is kept exactly zero where the mask is off, so the forward needs no
    multiplication (and no allocation): the layer computes with the stored weight
    itself. Only the gradient has to be masked, so inactive weights never train.

    Where the gradient is bound for ``weight.grad`` (``loss.backward()``), it passes
    through unchanged and the owner's post-accumulate-grad hook zeroes ``weight.grad``
    in place: a tensor the parameter owns, so no copy and one vectorized pass. Anywhere
    else (``torch.autograd.grad``, ``create_graph``) the masked gradient is a new tensor.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, owner: SparseMask | None) -> Tensor:  # noqa: D102
        ctx.save_for_backward(mask)
        ctx.owner = owner  # None: no grad hook on the weight, mask here
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (mask,) = ctx.saved_tensors
        owner = ctx.owner
        if owner is not None and not torch.is_grad_enabled() and accumulates(ctx):
            owner._grad_pending = "mask"  # the hook masks weight.grad after accumulation
            return grad, None, None
        return torch.where(mask, grad, 0), None, None


def accumulates(ctx: object, index: int = 0) -> bool:
    """Whether this backward pass accumulates input ``index`` of ``ctx``'s function into
    its ``.grad`` (runs that leaf's AccumulateGrad)."""
    node = ctx.next_functions[index][0]
    if type(node).__name__ != "AccumulateGrad":
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # asked under torch.autograd.grad, which never accumulates
        return False


class _GradThrough(torch.autograd.Function):
    """``weight`` zeroed where the mask is off in forward, the whole gradient in backward.

    Used on dense-gradient capture steps: the dense gradient reaches the stored weight's
    tensor hook (:meth:`SparseMask.grad_hook`), which keeps it and masks what goes on to
    ``.grad`` (under FSDP2, the sharded weight's post-accumulate-grad hook does, after
    the reduce-scatter: :meth:`SparseMask.capture_after_reduce`). Both hooks run outside
    any compiled graph, so capture adds no graph break under ``torch.compile``.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        return torch.where(mask, weight, 0)  # NaN-safe

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


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
    is held in between. The gradient is caught by :meth:`grad_hook`, a tensor hook on
    the stored weight (``sparsify`` registers it, an eager capture forward registers it
    on a stored weight that lacks it), never inside the forward, so ``torch.compile``
    traces the forward of every kind of step without a graph break. Under FSDP2 the
    sharded weight's hook takes it instead (:meth:`capture_after_reduce`).
    """

    mask: Tensor
    ever_active: Tensor

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
        self.capture_dense_grad = False
        self.dense_grad: Tensor | None = None
        self._capture_hooked: weakref.ref[Tensor] | None = None  # weight carrying grad_hook
        self._sharded_hook: RemovableHandle | None = None  # FSDP2: on the sharded weight
        self._sharded = False  # whether it captures (the forward reads a bool: dynamo)
        self._reduced: weakref.ref[Tensor] | None = None  # FSDP2: the sharded .grad last seen
        self._hooked: weakref.ref[Tensor] | None = None  # weight carrying our grad hook
        # What the post-accumulate-grad hook does with the next gradient: "mask" an
        # unmasked one, vouch for an "exact" one (zero where inactive by construction).
        self._grad_pending: str | None = None
        # (weight.grad, its version, the mask's) right after it was masked
        self._clean_grad: tuple[weakref.ref[Tensor], int, int] | None = None
        # the checkpoint entries an enclosing module's load pre-hook just checked
        self._checked: tuple[weakref.ref[Tensor], ...] | None = None

    def __getstate__(self) -> dict[str, object]:
        # Copies (EMA deepcopies, pickles) start without references to this weight and
        # its gradient: they hook and vouch for their own.
        state = dict(self.__dict__)
        state.update(
            _hooked=None, _grad_pending=None, _clean_grad=None, _capture_hooked=None,
            _sharded_hook=None, _sharded=False, _reduced=None, _checked=None,
        )  # fmt: skip
        return state

    def forward(self, weight: Tensor) -> Tensor:
        if self.capture_dense_grad and torch.is_grad_enabled() and weight.requires_grad:
            if not self._sharded and not torch.compiler.is_compiling():
                self.hook_weight(weight)  # a stored weight that sparsify did not hook
            return _GradThrough.apply(weight, self.mask)
        if torch.compiler.is_compiling():
            # NaN-safe selection, no version bookkeeping; fused by the compiler
            out = torch.where(self.mask, weight, 0)
        else:
            if not self.is_clean(weight):
                self.zero_inactive_(weight)
            if not (torch.is_grad_enabled() and weight.requires_grad):
                # The stored weight itself, so in-place edits under no_grad
                # (head-init scaling, nn.init) reach it instead of a temporary.
                return weight
            if weight.is_leaf:
                self.hook_accumulation(weight)
            out = _MaskedGrad.apply(weight, self.mask, self if weight.is_leaf else None)
        return out

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

    def grad_is_clean(self, weight: Tensor) -> bool:
        """Whether ``weight.grad`` is None or is the gradient masked after the last
        accumulation, untouched since (same tensor, same version, same mask)."""
        grad = weight.grad
        if grad is None:
            return True
        clean = self._clean_grad
        return (
            clean is not None
            and clean[0]() is grad
            and clean[1:] == (grad._version, self.mask._version)
        )

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

    def hook_accumulation(self, weight: Tensor) -> None:
        """Register the post-accumulate-grad hook on the stored ``weight`` (a leaf
        parameter) unless it carries it already."""
        if self._hooked is None or self._hooked() is not weight:
            weight.register_post_accumulate_grad_hook(self._after_accumulation)
            self._hooked = weakref.ref(weight)

    def expect_exact_grad(self, weight: Tensor) -> None:
        """Announce that the gradient now on its way to ``weight.grad`` is exactly zero
        where inactive by construction (the CSR compute path's), so that once it is
        accumulated ``weight.grad`` needs no pass, provided it was clean before."""
        self.hook_accumulation(weight)
        if self._grad_pending is None and self.grad_is_clean(weight):
            self._grad_pending = "exact"  # never over "mask": a sum with an unmasked one

    def _after_accumulation(self, weight: Tensor) -> None:
        # Post-accumulate-grad hook of the stored weight: weight.grad is the
        # parameter's own tensor here (autograd copied any shared gradient), so it is
        # masked in place: only a gradient _MaskedGrad let through unmasked. An exact
        # gradient added to a clean weight.grad leaves it clean: record it, no pass.
        pending, self._grad_pending = self._grad_pending, None
        if pending is None or self._hooked is None or self._hooked() is not weight:
            return
        grad = weight.grad
        if pending == "mask":
            zero_where_inactive_(grad, self.mask)
        self._clean_grad = (weakref.ref(grad), grad._version, self.mask._version)

    def hook_weight(self, weight: Tensor) -> None:
        """Register :meth:`grad_hook` on the stored ``weight`` (a leaf parameter), unless
        it carries it already."""
        if self._capture_hooked is not None and self._capture_hooked() is weight:
            return
        ref = weakref.ref(weight)  # weakly: the hook lives on the weight itself
        weight.register_hook(lambda grad: self.grad_hook(ref(), grad))
        self._capture_hooked = ref

    def grad_hook(self, weight: Tensor, grad: Tensor) -> Tensor | None:
        """Tensor hook of the stored weight, run before ``grad`` (its whole gradient of one
        backward pass) is accumulated into ``weight.grad``.

        While capturing, add ``grad`` to ``dense_grad`` exactly as ``.grad`` accumulates:
        afresh when ``weight.grad`` is None (after ``zero_grad()``, so a step the AMP
        scaler skipped leaves nothing), summed over backward passes otherwise; then hand
        on ``grad`` exactly zero where inactive. Otherwise leave ``grad`` as it is."""
        if not self.capture_dense_grad:
            return None
        if weight.grad is None or self.dense_grad is None:
            self.dense_grad = grad.detach().clone()
        else:
            self.dense_grad += grad.detach()
        return torch.where(self.mask, grad, 0)

    def capture_after_reduce(self, sharded: Tensor | None) -> None:
        """Capture the dense gradient from the sharded ``.grad`` of ``sharded`` (the
        DTensor parameter FSDP2 made of the stored weight) instead of the stored
        weight's tensor hook; None: back to the hook.

        FSDP2 swaps an all-gathered copy of the weight in for forward and backward, so no
        hook on the stored weight sees its gradient. On a capture step the all-gathered
        copy receives the whole gradient (:class:`_GradThrough`), FSDP2 reduce-scatters
        it into the sharded ``.grad`` (averaged over ranks, accumulated as ``.grad`` is:
        across backward passes, across microbatches without gradient sync, afresh after
        ``zero_grad()``) and runs this hook: ``dense_grad`` becomes that reduced shard
        (a DTensor) and ``.grad`` is masked in place, before any clipping or step.
        """
        if self._sharded_hook is not None:
            self._sharded_hook.remove()
        self._sharded_hook = self._reduced = None
        self._sharded = sharded is not None
        if sharded is not None:
            self._sharded_hook = sharded.register_post_accumulate_grad_hook(self._after_reduce)

    def _after_reduce(self, sharded: Tensor) -> None:
        if not self.capture_dense_grad:
            return  # the gradient arrived masked
        grad = sharded.grad
        data, mask = local_pair(grad, self.mask)
        fresh = self.dense_grad is None or self._reduced is None or self._reduced() is not grad
        if fresh:  # FSDP2 assigned a new .grad: nothing accumulated before it
            self.dense_grad = grad.detach().clone()
        else:  # added to the masked .grad we left: the inactive part adds to ours
            dense = local_pair(self.dense_grad, self.mask)[0]
            dense.copy_(torch.where(mask, data, dense + data))
        zero_where_inactive_(data, mask)
        self._reduced = weakref.ref(grad)

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
