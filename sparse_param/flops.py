"""Training FLOPs of sparse (and dense) training, counted from the active weights.

Cost model (the one of RigL, Evci et al. 2020, App. H): a weight layer with n weights,
a of them active, used u times per sample (1 for a Linear on a vector, H_out·W_out for
a conv), costs per sample and training step

    forward          2·a·u   (a multiply and an add per active weight and use)
    input gradient   2·a·u
    weight gradient  2·a·u, or 2·n·u on a step that captures the dense gradient
                     (the step before a RigL/GraNet update, every SNFS step)

Layers the model keeps dense count with a = n. Biases, norms, activations and the
optimizer's own arithmetic are not counted: they are small next to the weights and the
same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arguments import check_model
from .layers import DEFAULT_LAYER_TYPES, is_sparse, unwrap

__all__ = ["FlopLayer", "dense_training_flops", "flop_layers", "training_flops", "weight_uses"]


@dataclass(frozen=True)
class FlopLayer:
    """One weight layer as the cost model sees it: ``numel`` weights, ``active`` of them
    active now, each used ``uses`` times per sample; ``sparse``: it has a mask."""

    name: str
    numel: int
    active: int
    uses: int
    sparse: bool


def _weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in unwrap(model).named_modules()
        if isinstance(module, DEFAULT_LAYER_TYPES) and module.weight.dim() > 1
    }


@torch.no_grad()
def weight_uses(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, int]:
    """Run ``model(*inputs, **kwargs)`` once and return, per Linear/Conv layer, how many
    times each of its weights is used per sample: the output's positions per sample
    and channel (1 for a Linear on vectors, H_out·W_out for a Conv2d), summed over
    calls when a layer runs more than once. Layers that did not run are left out.

    The forward runs in eval mode (norm statistics and dropout untouched), and the
    train/eval flags are restored after."""
    check_model("weight_uses", model)
    modules = _weight_modules(model)
    modes = {module: module.training for module in unwrap(model).modules()}
    uses: dict[str, int] = {}

    def record(name: str, module: nn.Module, output: torch.Tensor) -> None:
        per_sample = output.numel() // output.shape[0]
        uses[name] = uses.get(name, 0) + per_sample // module.weight.shape[0]

    handles = [
        module.register_forward_hook(lambda m, a, out, n=name: record(n, m, out))
        for name, module in modules.items()
    ]
    try:
        unwrap(model).eval()(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return uses


def flop_layers(model: nn.Module, uses: dict[str, int] | None = None) -> list[FlopLayer]:
    """Every Linear/Conv layer of ``model`` with its counts now; ``uses`` from
    :func:`weight_uses` (default: 1 per weight, exact for MLPs on vectors)."""
    layers = []
    for name, module in _weight_modules(model).items():
        sparse = is_sparse(module)
        numel = module.weight.numel()
        active = int(module.parametrizations.weight[0].mask.count_nonzero()) if sparse else numel
        layers.append(FlopLayer(name, numel, active, (uses or {}).get(name, 1), sparse))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layer to count")
    return layers


def dense_training_flops(
    model: nn.Module, steps: int, *, batch_size: int = 1, uses: dict[str, int] | None = None
) -> float:
    """FLOPs of ``steps`` dense training steps of ``model``'s architecture: 6·n·u per
    weight layer, sample and step, times ``batch_size``."""
    check_model("dense_training_flops", model)
    layers = flop_layers(model, uses)
    return 6.0 * sum(layer.numel * layer.uses for layer in layers) * steps * batch_size


def training_flops(
    model: nn.Module,
    scheduler: Any = None,
    *,
    steps: int | None = None,
    start: int = 0,
    batch_size: int = 1,
    uses: dict[str, int] | None = None,
) -> float:
    """FLOPs of training steps ``start + 1 … steps``, from the active counts of each step.

    The counts are rebuilt from the scheduler's update history (each record's pruned and
    grown counts per layer, undone backwards from the masks now), so the result needs no
    state of its own. Step s computes with the masks left by the updates before it, and
    pays a dense weight gradient where ``scheduler.wants_dense_grad(s)``. Exact when
    ``scheduler.history`` holds every update after ``start``: always in the process that
    ran them; after a resume ``history`` holds only the checkpoint's last records, so
    count from the resumed step (``start``) and add the earlier FLOPs kept with the
    checkpoint, as ``recipes/train.py`` does.

    Args:
        model: the trained model (wrappers are looked through).
        scheduler: its :class:`~sparse_param.SparseScheduler`, or None for a model
            whose masks never changed (dense, or sparse without updates).
        steps: last step to count (default: ``scheduler.step_count``); required without
            a scheduler.
        start: steps already counted elsewhere (0: count from the first step).
        batch_size: samples per step (all ranks together).
        uses: weight uses per sample from :func:`weight_uses` (default 1 per weight).

    Returns:
        FLOPs (multiplies and adds) as a float.

    Raises:
        ValueError: bad ``steps`` / ``start`` / ``batch_size``, or ``start`` = 0 while
            the history has lost early records (``scheduler.num_updates`` exceeds it).
    """
    check_model("training_flops", model)
    if steps is None:
        if scheduler is None:
            raise ValueError("training_flops: give steps when there is no scheduler")
        steps = scheduler.step_count
    if not 0 <= start <= steps or batch_size < 1:
        raise ValueError(
            f"training_flops: need 0 ≤ start ≤ steps and batch_size ≥ 1, got start={start}, "
            f"steps={steps}, batch_size={batch_size}"
        )
    layers = flop_layers(model, uses)
    history = list(scheduler.history) if scheduler is not None else []
    total_updates = getattr(scheduler, "num_updates", len(history))
    if start == 0 and total_updates > len(history):
        raise ValueError(
            f"training_flops: scheduler.history holds {len(history)} of the run's "
            f"{total_updates} updates (a resumed run keeps only the checkpoint's last "
            f"records): count from the resumed step with start=... and add the FLOPs of "
            f"the steps before it"
        )
    index = {layer.name: i for i, layer in enumerate(layers)}
    # counts[k]: active counts in force after the k-th update (counts[0]: before any).
    counts = [[layer.active for layer in layers]]
    for record in reversed(history):
        before = list(counts[0])
        for name, n in record["grown"].items():
            before[index[name]] -= n
        for name, n in record["pruned"].items():
            before[index[name]] += n
        counts.insert(0, before)
    update_steps = [record["step"] for record in history]
    wants_dense = scheduler.wants_dense_grad if scheduler is not None else None

    def cost(active: list[int], dense_grad: bool) -> float:
        total = 0
        for layer, a in zip(layers, active):
            weight_grad = layer.numel if dense_grad and layer.sparse else a
            total += (2 * a + weight_grad) * layer.uses
        return 2.0 * total

    # Segment k: the steps after update k-1 up to and including update k's step.
    bounds = [0, *(min(u, steps) for u in update_steps), steps]
    flops = 0.0
    for k, active in enumerate(counts):
        span = range(max(bounds[k], start) + 1, max(bounds[k + 1], start) + 1)
        dense = sum(1 for s in span if wants_dense and wants_dense(s))
        flops += dense * cost(active, True) + (len(span) - dense) * cost(active, False)
    return flops * batch_size
