"""Models built on the meta device: ``sparsify`` records, :func:`materialize` draws.

A model too big to build eagerly is built under ``torch.device("meta")`` (tensors with
shapes and no storage), sharded, then given storage with ``to_empty`` and initialized.
A mask drawn before that would have nowhere to live, so ``sparsify`` on a meta model
only records what the masks will be (the allocation's counts, the generator's state,
the layer order) and :func:`materialize` draws them, in the same order from the same
generator state as an eager ``sparsify``: the same seed gives the same masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .arguments import check_model, listed
from .distributed import masked_fill_
from .init import draw_mask, rescale_to_active_fan_in
from .layers import sparse_layers
from .structure import Structure


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """What an eager ``sparsify`` would have drawn, shared by the layers of one call.

    Attributes:
        generator_state: ``torch.Generator.get_state()`` before the first mask.
        counts: active count of each layer, in the order the masks are drawn.
        structure: the ``structure=`` of sparsify (None: unstructured).
        sparse_init: whether to rescale to the active fan-in once the weights exist.
    """

    generator_state: Tensor
    counts: tuple[int, ...]
    structure: Structure | None
    sparse_init: bool


def is_meta(module: nn.Module) -> bool:
    """Whether ``module`` holds any parameter or buffer on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@torch.no_grad()
def materialize(model: nn.Module, init_fn: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Draw the masks of a model sparsified on the meta device, once it has storage.

    Call after ``model.to_empty(device=...)`` (which leaves garbage in every tensor):
    draws each layer's mask exactly as an eager ``sparsify`` with the same seed would
    (``ever_active`` equal to it), then initializes the weights with ``init_fn(model)``
    (default: ``reset_parameters()`` of every module that has one, PyTorch's idiom for
    meta-built models), zeroes the stored weights where inactive, and applies
    ``sparse_init`` if ``sparsify`` asked for it. The masks are drawn before
    ``init_fn`` runs, so an ``init_fn`` that reads ``module.weight`` sees a valid mask.

    Args:
        model: a model passed through ``sparsify`` while on the meta device (DDP and
            torch.compile wrappers are looked through).
        init_fn: initializes the weights in place; it may write through
            ``module.weight`` (under ``no_grad``) or to the stored weights.

    Returns:
        ``model``.

    Raises:
        ValueError: no sparse layer is waiting for its mask, or a sparse layer still has
            tensors on the meta device (call ``model.to_empty(device=...)`` first); the
            model is left as it was.
    """
    check_model("materialize", model)
    layers = [layer for layer in sparse_layers(model) if layer.parametrization.plan is not None]
    if not layers:
        raise ValueError(
            "materialize: no sparse layer is waiting for its mask; call it on a model "
            "sparsified on the meta device (sparsify draws the masks of other models)"
        )
    on_meta = [layer.name for layer in layers if is_meta(layer.module)]
    if on_meta:
        raise ValueError(
            f"materialize: layers {listed(on_meta, 3)} are still "
            f"on the meta device; call model.to_empty(device=...) first"
        )
    plans: dict[int, MaskPlan] = {}
    for layer in layers:
        plans.setdefault(id(layer.parametrization.plan), layer.parametrization.plan)
    for plan in plans.values():
        generator = torch.Generator().manual_seed(0)
        generator.set_state(plan.generator_state)
        mine = [layer for layer in layers if layer.parametrization.plan is plan]
        for layer, count in zip(mine, plan.counts):
            mask = draw_mask(layer.mask.shape, count, plan.structure, generator)
            mask = mask.to(layer.mask.device)
            layer.mask.copy_(mask)
            layer.ever_active.copy_(mask)
            if plan.structure is not None:  # its code buffer was left as garbage too
                layer.parametrization.structure.copy_(plan.structure.encode())
    waiting = [layer.parametrization.plan for layer in layers]
    for layer in layers:  # the masks are drawn: the layers may run (init reads weights)
        layer.parametrization.plan = None
    try:
        _initialize(model, init_fn)
    except BaseException:
        for layer, plan in zip(layers, waiting):  # materialize may be called again
            layer.parametrization.plan = plan
        raise
    for layer in layers:
        # masked_fill, not mul: the garbage to_empty left may hold NaN. Sharded by
        # fully_shard: each rank fills its own shard.
        masked_fill_(layer.weight, ~layer.mask, 0)
        layer.parametrization.zero_inactive_(layer.weight)  # records the clean version
    for plan in plans.values():
        if plan.sparse_init:
            rescale_to_active_fan_in(model)
            break
    return model


def _initialize(model: nn.Module, init_fn: Callable[[nn.Module], None] | None) -> None:
    if init_fn is None:
        for module in model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    else:
        init_fn(model)
