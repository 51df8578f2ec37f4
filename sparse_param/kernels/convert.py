"""``to_sparse``: the one entry point from a trained sparse model to a sparse format.

:data:`FORMATS` maps a format's name to a :class:`Format`: the layer that replaces a
chosen Linear layer, the sparsity pattern (:mod:`sparse_param.structure`) every chosen
layer must have, and any further requirement. ``to_sparse`` checks every chosen layer
against its format before it replaces any.

PyTorch has no sparse convolution on CPU, so convolutions stay as they are: a sparse
conv keeps computing densely with its masked weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arguments import check_model
from ..layers import is_sparse, unwrap
from ..structure import Structure, violation
from .condensed import CondensedLinear
from .inference import SparseLinear
from .linear import computed_pattern, computed_weight, linear_classes, linear_type
from .semi_structured import TWO_FOUR, check_device, semi_structured_linear


@dataclass(frozen=True)
class Format:
    """How :func:`to_sparse` converts a chosen Linear layer.

    Attributes:
        build: the layer put in place of a chosen one (which it leaves unchanged).
        structure: the sparsity pattern every chosen layer must have; None for any.
        at_most: an N:M group may hold fewer than N active (see
            :func:`~sparse_param.structure.violation`).
        fix: how to get a layer into ``structure``, for the error message.
        check: a further requirement on a chosen layer, given with its name (its device,
            say): raises before any layer is replaced.
    """

    build: Callable[[nn.Module], nn.Module]
    structure: Structure | None = None
    at_most: bool = False
    fix: str = ""
    check: Callable[[nn.Module, str], None] | None = None


FORMATS: dict[str, Format] = {
    "csr": Format(SparseLinear.from_linear),
    "condensed": Format(
        CondensedLinear.from_linear,
        Structure("fan_in"),
        fix="sparsify with structure='fan_in', or use format='csr'",
    ),
    "semi_structured": Format(
        semi_structured_linear,
        TWO_FOUR,
        at_most=True,
        fix="sparsify with structure='2:4' (or prune to it with GMP)",
        check=check_device,
    ),
}


def to_sparse(
    model: nn.Module, *, min_sparsity: float = 0.9, plain: bool = True, format: str = "csr"
) -> nn.Module:
    """Replace the sparse ``nn.Linear`` layers of ``model`` by :class:`SparseLinear`, in place.

    ``format`` picks the replacement (:data:`FORMATS`): ``"csr"`` (default,
    :class:`~sparse_param.kernels.SparseLinear`, CPU), ``"condensed"``
    (:class:`~sparse_param.kernels.CondensedLinear`, for constant fan-in masks:
    ``sparsify(..., structure="fan_in")``) or ``"semi_structured"`` (a plain
    ``nn.Linear`` whose weight is ``torch.sparse.to_sparse_semi_structured`` of the 2:4
    weight, run by the sparse tensor cores of NVIDIA GPUs from Ampere on; CUDA only,
    float16 / bfloat16 weights, shapes as that function requires). For ``"condensed"``
    and ``"semi_structured"`` every layer chosen must have the structure; otherwise the
    call raises before changing anything. ``min_sparsity`` still chooses the layers (pass
    ``min_sparsity=0.5`` for 2:4).

    For inference only (CPU): the converted layers compute with a CSR weight and pass no
    gradient; do not keep training a ``to_sparse`` model (train the sparse model, then
    convert a copy, or load its ``state_dict`` into a plain model).

    Converted: every layer whose class is ``nn.Linear`` (or timm's ``Linear``) and
        - carries a :class:`~sparse_param.SparseMask` (from ``sparsify``), or
        - with ``plain=True``, is a plain Linear, as after ``finalize`` or after loading
          a ``dense_state_dict`` / ``save_safetensors`` checkpoint into a fresh model,
    provided the share of exact zeros in the weight it computes with is at least
    ``min_sparsity`` (give or take one weight, for integer rounding). Sparse compute is
    slower than dense for denser weights, so the others stay as they are. Subclasses of
    ``nn.Linear`` with their own forward (e.g. the ``out_proj`` of
    ``nn.MultiheadAttention``, whose weight is read directly) are left alone, and so are
    convolutions: PyTorch has no sparse convolution, so sparse convs keep computing
    densely with their masked weight.

    Forward hooks registered on a converted module are not carried over. The converted
    model's ``state_dict`` stores each converted layer as an ``nn.Linear`` would
    (``weight`` dense with zeros, ``bias``); unconverted sparse layers keep their
    masking parametrization keys, which :func:`~sparse_param.dense_state_dict` and
    :func:`~sparse_param.save_safetensors` turn into plain ones.

    Args:
        model: a model (DDP / DataParallel / ``torch.compile`` wrappers are looked through).
        min_sparsity: convert only Linear layers with at least this share of zero weights,
            in [0, 1]. The default 0.9 is where the CSR product is clearly faster than
            dense on CPU (see :mod:`sparse_param.kernels.inference`).
        plain: also convert plain Linear layers that are at least ``min_sparsity`` zeros.
        format: a key of :data:`FORMATS`.

    Returns:
        ``model``, with its layers replaced.

    Raises:
        ValueError: ``min_sparsity`` outside [0, 1], an unknown ``format``, no layer to
            convert (no sparse or plain Linear at least ``min_sparsity`` zeros), or a
            chosen layer without the format's structure; the model is left unchanged.
        RuntimeError: ``format="semi_structured"`` with a layer that is not on CUDA.
    """
    check_model("to_sparse", model)
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"to_sparse: min_sparsity must be in [0, 1], got {min_sparsity}")
    if format not in FORMATS:
        raise ValueError(f"to_sparse: unknown format {format!r}; expected one of {tuple(FORMATS)}")
    root = unwrap(model)
    chosen, below, sparse_other = _choose(root, min_sparsity, plain)
    if not chosen:
        raise ValueError(_nothing_to_convert(root, min_sparsity, plain, below, sparse_other))
    _check_format(root, [child for _, _, child in chosen], format)
    build = FORMATS[format].build
    converted: dict[int, nn.Module] = {}  # a module shared by two parents converts once
    for parent, child_name, child in chosen:
        if id(child) not in converted:
            converted[id(child)] = build(child)
        setattr(parent, child_name, converted[id(child)])
    return model


def _choose(
    root: nn.Module, min_sparsity: float, plain: bool
) -> tuple[list[tuple[nn.Module, str, nn.Module]], list[tuple[float, str]], list[str]]:
    """The layers to convert, as (parent, child name, child); (sparsity, name) of the
    Linear candidates below ``min_sparsity``; names of the sparse non-Linear layers."""
    classes = linear_classes()
    chosen: list[tuple[nn.Module, str, nn.Module]] = []
    below: list[tuple[float, str]] = []
    sparse_other: list[str] = []
    for parent_name, parent in root.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if linear_type(child) not in classes:
                if is_sparse(child):
                    sparse_other.append(name)
                continue
            sparse = is_sparse(child)
            if not sparse and (not plain or parametrize.is_parametrized(child)):
                continue
            weight = computed_weight(child)
            numel = weight.numel()
            zeros = numel - int(torch.count_nonzero(weight))
            # one weight of slack: density 0.1 rounds to 10.00001% active on many shapes
            if zeros + 1 >= min_sparsity * numel:
                chosen.append((parent, child_name, child))
            elif sparse or zeros > numel / 2:
                below.append((zeros / numel, name))
    return chosen, below, sparse_other


def _check_format(root: nn.Module, modules: list[nn.Module], format: str) -> None:
    """Raise before any change if a chosen layer cannot take ``format``."""
    spec = FORMATS[format]
    names = {id(m): name for name, m in root.named_modules()}
    for module in modules:
        name = names[id(module)]
        if spec.structure is not None:
            why = violation(computed_pattern(module), spec.structure, at_most=spec.at_most)
            if why is not None:
                kind = spec.structure.kind
                pattern = "constant fan-in" if kind == "fan_in" else str(spec.structure)
                raise ValueError(
                    f"to_sparse(format={format!r}): layer {name!r} is not {pattern} ({why}); "
                    f"{spec.fix}"
                )
        if spec.check is not None:
            spec.check(module, name)


def _nothing_to_convert(
    model: nn.Module,
    min_sparsity: float,
    plain: bool,
    below: list[tuple[float, str]],
    sparse_other: list[str],
) -> str:
    kinds = "sparse nn.Linear (sparse_param.sparsify)"
    if plain:
        kinds += " or plain nn.Linear"
    msg = (
        f"to_sparse: no layer of {type(model).__name__} to convert: no {kinds} layer has "
        f"at least {min_sparsity:.0%} zero weights."
    )
    if below:
        sparsity, name = max(below)
        msg += (
            f" The sparsest candidate, {name!r}, is {sparsity:.2%} zeros; pass a lower "
            f"min_sparsity to convert it (below about 85% sparsity the CSR product is "
            f"slower than dense on CPU)."
        )
    if sparse_other:
        msg += (
            f" The model's other sparse layers ({len(sparse_other)}, e.g. {sparse_other[0]!r})"
            f" are convolutions or other non-Linear modules, which stay masked dense:"
            f" PyTorch has no sparse convolution."
        )
    return msg
