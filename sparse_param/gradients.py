"""The gradient side of a sparse weight: masked on its way into ``weight.grad``, and the
dense gradient caught on the steps a growth criterion needs it.

Two small objects, one per concern, held by each :class:`~sparse_param.mask.SparseMask`:
:class:`GradMasking` zeroes ``weight.grad`` where inactive after each accumulation (or
vouches for a gradient that is exact by construction), :class:`DenseGradCatch` keeps
the whole gradient dL/dW while armed. Both hold weak references to the weight they
hook, and a copy (an EMA's deepcopy) starts without them.
"""

from __future__ import annotations

import enum
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from .distributed import local_pair
from .zeros import zero_where_inactive_


class MaskedGrad(torch.autograd.Function):
    """Identity in forward; the gradient is exactly zero where the mask is off, as a new
    tensor. For a stored weight that is not a leaf (computed from something else): a
    leaf's gradient is masked by its hooks instead (:class:`GradMasking`)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0), None


class GradThrough(torch.autograd.Function):
    """``weight`` zeroed where the mask is off in forward, the whole gradient in backward.

    Used on dense-gradient capture steps: the dense gradient reaches the stored weight's
    tensor hook (:meth:`DenseGradCatch.grad_hook`), which keeps it and masks what goes on
    to ``.grad`` (under FSDP2, the sharded weight's post-accumulate-grad hook does, after
    the reduce-scatter: :meth:`DenseGradCatch.after_reduce_on`). Both hooks run outside
    any compiled graph, so capture adds no graph break under ``torch.compile``.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        return torch.where(mask, weight, 0)  # NaN-safe

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


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


class Pending(enum.Enum):
    """What the post-accumulate-grad hook does with the gradient on its way."""

    MASK = "mask"  # an unmasked gradient: zero weight.grad where inactive
    EXACT = "exact"  # zero where inactive by construction: record it clean, no pass


class GradMasking:
    """Keeps ``weight.grad`` of the stored weight exactly zero where ``owner.mask`` (the
    :class:`~sparse_param.mask.SparseMask` holding it) is off, and knows when it still
    is (so the step after it can skip re-zeroing).

    The forward hands the stored weight itself to the layer (no autograd node, no
    copy), so the masking lives in two hooks on it. A tensor hook sees each backward
    pass's whole gradient first: bound for ``weight.grad`` (``loss.backward()``), it
    passes unchanged and the post-accumulate-grad hook zeroes ``weight.grad`` in place
    (a tensor the parameter owns: one vectorized pass, no allocation); bound anywhere
    else (``torch.autograd.grad``, ``create_graph``), the tensor hook hands on a masked
    copy.
    """

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.pending: Pending | None = None
        self.handed_out = False  # the forward gave the stored weight to a dense use
        self._hooked: weakref.ref[Tensor] | None = None  # weight carrying the hooks
        self._handles: tuple[RemovableHandle, ...] = ()
        self._accumulator: Any = None  # the AccumulateGrad node of the hooked weight
        self._clean: tuple[weakref.ref[Tensor], int, int] | None = None  # grad, versions

    def __getstate__(self) -> dict[str, Any]:
        reset = {"pending": None, "handed_out": False, "_hooked": None, "_clean": None}
        reset.update(_accumulator=None, _handles=())
        return {**self.__dict__, **reset}

    def hook(self, weight: Tensor) -> None:
        """Register the tensor hook and the post-accumulate-grad hook on the stored
        ``weight`` (a leaf parameter) unless it carries them already."""
        if self._hooked is None or self._hooked() is not weight:
            self.unhook()
            ref = weakref.ref(weight)  # weakly: the hooks live on the weight itself
            self._handles = (
                weight.register_hook(lambda grad: self._before_accumulation(ref(), grad)),
                weight.register_post_accumulate_grad_hook(self._after_accumulation),
            )
            self._hooked = ref

    def unhook(self) -> None:
        """Remove the hooks from the weight carrying them (``finalize``: the weight
        trains dense from then on)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked, self._accumulator = (), None, None

    def hand_out(self, weight: Tensor) -> Tensor:
        """The stored ``weight`` (a leaf), hooked, for a computation whose gradient
        arrives unmasked."""
        self.hook(weight)
        self.handed_out = True
        return weight

    def is_clean(self, weight: Tensor) -> bool:
        """Whether ``weight.grad`` is None or is the gradient masked after the last
        accumulation, untouched since (same tensor, same version, same mask)."""
        grad = weight.grad
        if grad is None:
            return True
        clean = self._clean
        return (
            clean is not None
            and clean[0]() is grad
            and clean[1:] == (grad._version, self.owner.mask._version)
        )

    def expect_exact(self, weight: Tensor) -> None:
        """Announce that the gradient now on its way to ``weight.grad`` is exactly zero
        where inactive by construction (the CSR compute path's), so that once it is
        accumulated ``weight.grad`` needs no pass, provided it was clean before."""
        self.hook(weight)
        if self.pending is None and self.is_clean(weight):
            self.pending = Pending.EXACT  # never over MASK: a sum with an unmasked one

    def mask_now(self, weight: Tensor) -> None:
        """Zero ``weight.grad`` where inactive now, whatever was written into it since it
        was masked (NaN and Inf included), and record it clean."""
        grad = weight.grad
        data, mask = local_pair(grad, self.owner.mask)  # a sharded gradient: its shard
        zero_where_inactive_(data, mask)
        self._clean = (weakref.ref(grad), grad._version, self.owner.mask._version)

    def _before_accumulation(self, weight: Tensor | None, grad: Tensor) -> Tensor | None:
        if weight is None or self.owner.catch.armed:
            return None  # the catch masks what it hands on (or FSDP2's shard hook does)
        if torch.is_grad_enabled() or not self._will_accumulate(weight):
            return torch.where(self.owner.mask, grad, 0)  # create_graph, autograd.grad
        if self.pending is not Pending.EXACT or self.handed_out:
            self.pending = Pending.MASK  # a sum with an unmasked gradient is unmasked
        return None

    def _will_accumulate(self, weight: Tensor) -> bool:
        # Whether the running backward pass accumulates into weight.grad. The node that
        # does is kept (looking it up costs microseconds); it holds the weight, which
        # its module holds anyway, and is replaced with the weight.
        node = self._accumulator
        if node is None or node.variable is not weight:
            node = self._accumulator = get_gradient_edge(weight).node
        try:
            return torch._C._will_engine_execute_node(node)
        except RuntimeError:  # asked under torch.autograd.grad, which never accumulates
            return False

    def _after_accumulation(self, weight: Tensor) -> None:
        # weight.grad is the parameter's own tensor here (autograd copied any shared
        # gradient), so it is masked in place. An exact gradient added to a clean
        # weight.grad leaves it clean: record it, no pass.
        pending, self.pending, self.handed_out = self.pending, None, False
        if pending is None or self._hooked is None or self._hooked() is not weight:
            return
        grad = weight.grad
        if pending is Pending.MASK:
            zero_where_inactive_(grad, self.owner.mask)
        self._clean = (weakref.ref(grad), grad._version, self.owner.mask._version)


class DenseGradCatch:
    """While ``armed``, adds every backward pass's dense gradient of the stored weight
    (shape of the weight) to ``grad``, starting afresh after ``zero_grad()`` as ``.grad``
    does; what goes on to ``.grad`` is masked by ``owner.mask`` (the
    :class:`~sparse_param.mask.SparseMask` holding it)."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        self.armed = False
        self.grad: Tensor | None = None
        self.sharded = False  # caught after FSDP2's reduce-scatter (a plain bool: dynamo)
        self._hooked: weakref.ref[Tensor] | None = None  # weight carrying grad_hook
        self._handle: RemovableHandle | None = None
        self._sharded_hook: RemovableHandle | None = None
        self._reduced: weakref.ref[Tensor] | None = None  # the sharded .grad last seen

    def __getstate__(self) -> dict[str, Any]:
        reset = {"_hooked": None, "_sharded_hook": None, "sharded": False, "_reduced": None}
        reset["_handle"] = None
        return {**self.__dict__, **reset}

    def hook(self, weight: Tensor) -> None:
        """Register :meth:`grad_hook` on the stored ``weight`` (a leaf parameter), unless
        it carries it already."""
        if self._hooked is not None and self._hooked() is weight:
            return
        self.unhook()
        ref = weakref.ref(weight)  # weakly: the hook lives on the weight itself
        self._handle = weight.register_hook(lambda grad: self.grad_hook(ref(), grad))
        self._hooked = ref

    def unhook(self) -> None:
        """Remove the hooks from the weight carrying them (``finalize``)."""
        if self._handle is not None:
            self._handle.remove()
        self.after_reduce_on(None)
        self._handle = self._hooked = None

    def grad_hook(self, weight: Tensor, grad: Tensor) -> Tensor | None:
        """Tensor hook of the stored weight, run before ``grad`` (its whole gradient of one
        backward pass) is accumulated into ``weight.grad``.

        While armed, add ``grad`` to :attr:`grad` exactly as ``.grad`` accumulates:
        afresh when ``weight.grad`` is None (after ``zero_grad()``, so a step the AMP
        scaler skipped leaves nothing), summed over backward passes otherwise; then hand
        on ``grad`` exactly zero where inactive. Otherwise leave ``grad`` as it is."""
        if not self.armed:
            return None
        if weight.grad is None or self.grad is None:
            self.grad = grad.detach().clone()
        else:
            self.grad += grad.detach()
        return torch.where(self.owner.mask, grad, 0)

    def after_reduce_on(self, sharded: Tensor | None) -> None:
        """Catch the dense gradient from the sharded ``.grad`` of ``sharded`` (the
        DTensor parameter FSDP2 made of the stored weight) instead of the stored
        weight's tensor hook; None: back to the hook.

        FSDP2 swaps an all-gathered copy of the weight in for forward and backward, so no
        hook on the stored weight sees its gradient. On a capture step the all-gathered
        copy receives the whole gradient (:class:`GradThrough`), FSDP2 reduce-scatters
        it into the sharded ``.grad`` (averaged over ranks, accumulated as ``.grad`` is:
        across backward passes, across microbatches without gradient sync, afresh after
        ``zero_grad()``) and runs this hook: :attr:`grad` becomes that reduced shard (a
        DTensor) and ``.grad`` is masked in place, before any clipping or step.
        """
        if self._sharded_hook is not None:
            self._sharded_hook.remove()
        self._sharded_hook = self._reduced = None
        self.sharded = sharded is not None
        if sharded is not None:
            self._sharded_hook = sharded.register_post_accumulate_grad_hook(self._after_reduce)

    def _after_reduce(self, sharded: Tensor) -> None:
        if not self.armed:
            return  # the gradient arrived masked
        grad = sharded.grad
        data, mask = local_pair(grad, self.owner.mask)
        fresh = self.grad is None or self._reduced is None or self._reduced() is not grad
        if fresh:  # FSDP2 assigned a new .grad: nothing accumulated before it
            self.grad = grad.detach().clone()
        else:  # added to the masked .grad we left: the inactive part adds to ours
            dense = local_pair(self.grad, self.owner.mask)[0]
            dense.copy_(torch.where(mask, data, dense + data))
        zero_where_inactive_(data, mask)
        self._reduced = weakref.ref(grad)
