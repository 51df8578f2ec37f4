"""Semi-structured 2:4 inference: the layout the sparse tensor cores of NVIDIA GPUs take
(Ampere and newer), at most 2 non-zeros in every 4 consecutive inputs of a row.

``to_sparse(format="semi_structured")`` puts a plain ``nn.Linear`` whose weight is
``torch.sparse.to_sparse_semi_structured`` of the 2:4 weight in place of a sparse Linear
layer: CUDA only, float16 / bfloat16 weights, shapes as that function requires.
"""

from __future__ import annotations

import torch
from torch import nn

from ..structure import Structure
from .linear import computed_weight

TWO_FOUR = Structure("n:m", 2, 4)  # at most: a 2:4 weight with extra zeros still fits


def check_device(module: nn.Module, name: str) -> None:
    """Raise ``RuntimeError`` unless the layer ``name`` is on CUDA, where the kernels run."""
    if module.weight.device.type != "cuda":
        raise RuntimeError(
            f"to_sparse(format='semi_structured'): layer {name!r} is on "
            f"{module.weight.device}; 2:4 semi-structured sparse kernels run on CUDA only "
            f"(NVIDIA Ampere or newer): move the model with model.cuda().half() first, "
            f"or use format='csr' / 'condensed' on CPU"
        )


def semi_structured_linear(module: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` computing with ``module``'s 2:4 weight ``(out, in)`` in
    semi-structured form (the weight frozen); the module is unchanged."""
    weight = computed_weight(module)
    with torch.no_grad():
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight = nn.Parameter(
        torch.sparse.to_sparse_semi_structured(weight), requires_grad=False
    )
    return linear
