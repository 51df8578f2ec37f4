"""Reading the sparse state: density, in-time over-parameterization rate, summary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .layers import SparseLayer, sparse_layers


def _require_layers(model: nn.Module) -> list[SparseLayer]:
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError("the model has no sparse layers: call sparse_param.sparsify(model) first")
    return layers


def density(model: nn.Module) -> float:
    """Share of active weights over all sparse layers (active / numel)."""
    layers = _require_layers(model)
    return sum(layer.active for layer in layers) / sum(layer.numel for layer in layers)


def itop_rate(model: nn.Module) -> float:
    """In-time over-parameterization rate R_s: share of weights ever active since sparsify.

    R_s = Σ ever_active / Σ numel over the sparse layers (Liu et al., ICML 2021). It starts
    at the density and never decreases.
    """
    layers = _require_layers(model)
    ever = sum(int(layer.ever_active.count_nonzero()) for layer in layers)
    return ever / sum(layer.numel for layer in layers)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per sparse layer: name, shape, numel, active, density, ever_active, itop_rate."""
    rows = []
    for layer in _require_layers(model):
        ever = int(layer.ever_active.count_nonzero())
        rows.append(
            {
                "name": layer.name,
                "shape": tuple(layer.mask.shape),
                "numel": layer.numel,
                "allocated": layer.parametrization.allocated,
                "active": layer.active,
                "density": layer.active / layer.numel,
                "ever_active": ever,
                "itop_rate": ever / layer.numel,
            }
        )
    return rows


def summary(model: nn.Module) -> str:
    """A per-layer table (name, shape, allocated and current density, active count, R_s)
    followed by the totals, as text."""
    rows = layer_table(model)
    header = ("layer", "shape", "numel", "alloc", "active", "density", "R_s")
    lines = [
        (
            r["name"],
            "x".join(map(str, r["shape"])),
            str(r["numel"]),
            f"{r['allocated'] / r['numel']:.4f}",
            str(r["active"]),
            f"{r['density']:.4f}",
            f"{r['itop_rate']:.4f}",
        )
        for r in rows
    ]
    numel = sum(r["numel"] for r in rows)
    active = sum(r["active"] for r in rows)
    allocated = sum(r["allocated"] for r in rows)
    ever = sum(r["ever_active"] for r in rows)
    lines.append(
        (
            f"total ({len(rows)} layers)",
            "",
            str(numel),
            f"{allocated / numel:.4f}",
            str(active),
            f"{active / numel:.4f}",
            f"{ever / numel:.4f}",
        )
    )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


_WEIGHTED_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d}


class _WeightRecorder(TorchFunctionMode):
    """Records the weight of every linear/conv op, credited to the sparse layer whose
    stored weight it is (a parent module may call ``F.linear(x, self.qkv.weight)``, as
    timm's EVA and SwinV2 attention do), or else to the sparse module running (a layer
    that transforms its weight in forward passes a new tensor)."""

    def __init__(self, stack: list[str], owners: dict[int, str], seen: dict[str, list[Tensor]]):
        super().__init__()
        self.stack, self.owners, self.seen = stack, owners, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHTED_OPS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, Tensor):
                owner = self.owners.get(weight.data_ptr())
                owner = owner or (self.stack[-1] if self.stack else None)
                if owner is not None:
                    self.seen.setdefault(owner, []).append(weight.detach().clone())
        return func(*args, **kwargs)


@torch.no_grad()
def effective_density(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, float]:
    """Run ``model(*inputs, **kwargs)`` and return, per sparse layer, the share of
    non-zero entries in the weight its linear/conv op actually received.

    This checks the computation, not only ``module.weight``: a layer that transforms
    its weight in forward (weight standardization, say) is caught if the op sees a
    denser weight than the mask allows.

    Raises:
        RuntimeError: a sparse layer computed with a non-zero weight where its mask is
            off, or never ran a linear/conv op on its weight.
    """
    layers = _require_layers(model)
    stack: list[str] = []
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for layer in layers:
        handles.append(
            layer.module.register_forward_pre_hook(lambda m, a, n=layer.name: stack.append(n))
        )
        handles.append(layer.module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    try:
        owners = {layer.weight.data_ptr(): layer.name for layer in layers}
        with _WeightRecorder(stack, owners, seen):
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    result: dict[str, float] = {}
    for layer in layers:
        weights = [w for w in seen.get(layer.name, []) if w.shape == layer.mask.shape]
        if not weights:
            raise RuntimeError(
                f"layer {layer.name!r} ({type(layer.module).__name__}) ran no linear/conv op "
                f"on a weight of its shape: its sparsity cannot be checked"
            )
        for w in weights:
            outside = int((w != 0).logical_and_(~layer.mask).sum())
            if outside:
                raise RuntimeError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) computed with "
                    f"{outside} non-zero weights where its mask is off"
                )
        # Exact share (a float32 mean can round above the mask's own density).
        result[layer.name] = max(int(torch.count_nonzero(w)) / w.numel() for w in weights)
    return result
