"""Reading the sparse state: density, in-time over-parameterization rate, summary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .arguments import check_model
from .layers import DEFAULT_LAYER_TYPES, SparseLayer, sparse_layers, unwrap


def _require_layers(owner: str, model: nn.Module) -> list[SparseLayer]:
    check_model(owner, model)
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError(
            f"{owner}: the model has no sparse layers: call sparse_param.sparsify(model) first"
        )
    return layers


def density(model: nn.Module) -> float:
    """Share of active weights over the sparse layers only: Σ active / Σ numel of the
    weights ``sparsify`` masked. Layers left dense (excluded, frozen, tied, kinds it
    cannot mask), biases, norms and embeddings are not counted."""
    layers = _require_layers("density", model)
    return sum(layer.active for layer in layers) / sum(layer.numel for layer in layers)


def itop_rate(model: nn.Module) -> float:
    """In-time over-parameterization rate R_s: share of weights ever active since sparsify.

    R_s = Σ ever_active / Σ numel over the sparse layers (Liu et al., ICML 2021). It starts
    at the density and never decreases.
    """
    layers = _require_layers("itop_rate", model)
    ever = sum(int(layer.ever_active.count_nonzero()) for layer in layers)
    return ever / sum(layer.numel for layer in layers)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per sparse layer: name, shape, numel, active, density, ever_active, itop_rate."""
    rows = []
    for layer in _require_layers("layer_table", model):
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
    check_model("summary", model)
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


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode; afterwards restore every module's mode,
    every buffer (the masks excepted: a forward never writes them) and the torch RNGs."""
    modes = [(m, m.training) for m in model.modules()]
    masks = {id(b) for layer in sparse_layers(model) for b in layer.parametrization.buffers()}
    buffers = [(b, b.clone()) for b in model.buffers() if id(b) not in masks]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        for buffer, saved in buffers:
            buffer.copy_(saved)


@torch.no_grad()
def effective_density(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, float]:
    """Run ``model(*inputs, **kwargs)`` and return, per sparse layer, the share of
    non-zero entries in the weight its linear/conv op actually received.

    This checks the computation, not only ``module.weight``: a layer that transforms
    its weight in forward (weight standardization, say) is caught if the op sees a
    denser weight than the mask allows.

    Reading never changes the model: it runs in eval mode (BatchNorm uses its running
    statistics, so a batch of one works; dropout is off), then gives every module back
    its own mode, every buffer its value, and the torch random generators (CPU, and CUDA
    where initialized) their state.

    A sparse layer whose forward never runs because its parent reads its weight
    directly (``nn.MultiheadAttention`` and its ``out_proj``) is measured on the weight
    it hands out, which is what the parent computes with.

    Raises:
        RuntimeError: a sparse layer computed with a non-zero weight where its mask is
            off, or ran no linear/conv op on its weight (and its weight was not read).
    """
    layers = _require_layers("effective_density", model)
    stack: list[str] = []
    ran: set[str] = set()  # layers whose forward ran
    read: set[str] = set()  # layers whose (masked) weight was read
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for layer in layers:
        handles.append(
            layer.module.register_forward_pre_hook(
                lambda m, a, n=layer.name: stack.append(n) or ran.add(n)
            )
        )
        handles.append(layer.module.register_forward_hook(lambda m, a, o: stack.pop() and None))
        handles.append(
            layer.parametrization.register_forward_hook(lambda m, a, o, n=layer.name: read.add(n))
        )
    try:
        owners = {layer.weight.data_ptr(): layer.name for layer in layers}
        with _WeightRecorder(stack, owners, seen), _untouched(model):
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    result: dict[str, float] = {}
    for layer in layers:
        weights = [w for w in seen.get(layer.name, []) if w.shape == layer.mask.shape]
        if not weights and layer.name not in ran and layer.name in read:
            # Its parent reads the weight without calling the layer (nn.MultiheadAttention
            # and its out_proj): the weight handed out is what the parent computes with.
            weights = [layer.module.weight]
        if not weights:
            raise RuntimeError(
                f"layer {layer.name!r} ({type(layer.module).__name__}) ran no linear/conv op "
                f"on a weight of its shape in this forward, so its sparsity cannot be checked "
                f"by it (sp.density(model) reads the masks instead)"
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


# ------------------------------------------------------------------ gradient flow


@dataclass(frozen=True)
class GradientFlow:
    """Gradient flow of one backward pass (Tessera, Hooker & Rosman, 2021).

    Attributes:
        p: the norm's order.
        layers: one row per weight layer, in module order: ``name``, ``shape``,
            ``active`` (count of active weights n_l), ``norm_active`` (‖g_l‖_p over the
            active weights only), ``norm_all`` (‖g_l‖_p over every position of the
            stored weight's gradient), ``egf`` (the layer's EGF term ‖g_l‖_p / n_l).
            Gradients are in loss units per weight unit; norms are over flattened tensors.
        active: Σ n_l over the layers.
        norm_active: p-norm of all layers' active-weight gradients together.
        grad_norm: the plain gradient flow ‖g‖_p over every parameter with a gradient
            (biases and norms included), the measure EGF is compared against.
        egf: effective gradient flow, the mean of the layers' EGF terms.
    """

    p: float
    layers: list[dict[str, Any]]
    active: int
    norm_active: float
    grad_norm: float
    egf: float


def _weight_layers(model: nn.Module) -> list[tuple[str, Tensor, Tensor | None]]:
    """(name, stored weight, mask or None for all active) of every sparse layer, or of
    every Linear/Conv weight when the model has no sparse layer (a dense network)."""
    layers = [(layer.name, layer.weight, layer.mask) for layer in sparse_layers(model)]
    if layers:
        return layers
    return [
        (name, module.weight, None)
        for name, module in unwrap(model).named_modules()
        if isinstance(module, DEFAULT_LAYER_TYPES)
        and isinstance(module.weight, Tensor)
        and module.weight.dim() > 1
    ]


def _norm(values: Tensor, p: float) -> float:
    return float(torch.linalg.vector_norm(values.detach().double(), ord=p))


@torch.no_grad()
def gradient_flow(model: nn.Module, p: float = 2) -> GradientFlow:
    """Per-layer gradient flow of the gradients now in ``.grad``, and the paper's EGF.

    Call after ``loss.backward()`` and before ``optimizer.zero_grad()`` (an optimizer
    step does not clear ``.grad``, so right after ``optimizer.step()`` works too). The
    layers are the sparse layers; a model without any (a dense baseline) counts every
    Linear/Conv weight as a layer with all weights active, so sparse and dense networks
    are measured alike. DDP and ``torch.compile`` wrappers are looked through.

    EGF (Tessera, Hooker & Rosman, "Keep the Gradients Flowing", 2021, Sec. 3):

        EGF_p = (1 / L) · Σ_{l=1..L} ‖g_l‖_p / n_l

    where g_l is the gradient of layer l at its active weights only, n_l their count
    and L the number of layers: each layer's norm is normalised by its active count and
    the layers are averaged evenly, so wide layers do not dominate and inactive
    positions (whatever their ``.grad`` holds) contribute nothing.

    Args:
        model: a model whose weight layers have ``.grad`` populated.
        p: order of the norm, > 0 (1 and 2 in the paper; ``math.inf`` works).

    Returns:
        a :class:`GradientFlow` with the per-layer table and the totals.

    Raises:
        ValueError: ``p`` is not positive, the model has no weight layers, or a layer has
            no gradient (``.grad`` is None).
    """
    check_model("gradient_flow", model)
    if not p > 0:
        raise ValueError(f"gradient_flow: p must be > 0, got {p}")
    layers = _weight_layers(model)
    if not layers:
        raise ValueError(
            f"gradient_flow: {type(model).__name__} has no Linear/Conv weight to measure"
        )
    missing = [name for name, weight, _ in layers if weight.grad is None]
    if missing:
        raise ValueError(
            f"gradient_flow: layers {missing} have no gradient (.grad is None): call "
            f"loss.backward() first, and measure before optimizer.zero_grad()"
        )
    rows = []
    active_grads = []
    for name, weight, mask in layers:
        grad = weight.grad
        active = grad.flatten() if mask is None else grad[mask]
        active_grads.append(active)
        norm_active = _norm(active, p)
        rows.append(
            {
                "name": name,
                "shape": tuple(grad.shape),
                "active": active.numel(),
                "norm_active": norm_active,
                "norm_all": _norm(grad, p),
                "egf": norm_active / active.numel(),
            }
        )
    grads = [q.grad.flatten() for q in unwrap(model).parameters() if q.grad is not None]
    return GradientFlow(
        p=p,
        layers=rows,
        active=sum(r["active"] for r in rows),
        norm_active=_norm(torch.cat(active_grads), p),
        grad_norm=_norm(torch.cat(grads), p),
        egf=sum(r["egf"] for r in rows) / len(rows),
    )


def effective_gradient_flow(model: nn.Module, p: float = 2) -> float:
    """The paper's EGF of the gradients now in ``.grad``, as one float.

    EGF_p = (1 / L) · Σ_l ‖g_l‖_p / n_l (Tessera, Hooker & Rosman 2021, Sec. 3):
    the p-norm of each layer's gradient at its active weights, divided by its active
    count, averaged evenly over the L layers. See :func:`gradient_flow` for the layers
    counted, when to call it, and the errors.
    """
    check_model("effective_gradient_flow", model)
    return gradient_flow(model, p).egf


@torch.no_grad()
def egf_at_update(
    layers: Sequence[SparseLayer], pruned: Sequence[int], grown: Sequence[int], p: float = 2
) -> float | None:
    """EGF (Tessera et al. 2021, see :func:`gradient_flow`) of the gradients in
    ``.grad`` right after a topology update that pruned / grew these counts per layer.

    Those gradients were computed under the masks before the update, which zeroed them
    everywhere else, so ‖g_l‖_p over the whole tensor is the norm over the old active
    weights and n_l = active now − grown + pruned. O(weights); None when a layer has no
    gradient (an update called by hand after ``zero_grad(set_to_none=True)``).
    """
    terms = []
    for layer, n_pruned, n_grown in zip(layers, pruned, grown):
        if layer.weight.grad is None:
            return None
        terms.append(_norm(layer.weight.grad, p) / (layer.active - n_grown + n_pruned))
    return sum(terms) / len(terms)
