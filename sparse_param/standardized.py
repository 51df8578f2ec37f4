"""Sparse forward for convolutions that standardize their weight in forward.

timm's ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d`` and ``ScaledStdConv2dSame``
compute ``(w - mean) / std`` per output channel before convolving; standardizing a
masked weight makes it dense again. For these layers ``sparsify`` installs the forward
below, which standardizes the stored (sparse) weight exactly as timm does and then
applies the mask, so the convolution receives a weight that is zero wherever the mask
is off.
"""

from __future__ import annotations

import sys
import types

import torch.nn.functional as F
from torch import Tensor, nn

_STANDARDIZED_NAMES = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def standardized_convs() -> tuple[type[nn.Module], ...]:
    """timm's standardized convolution classes, looked up only once timm is imported
    (importing sparse_param never imports timm; without it no model holds one)."""
    timm_layers = sys.modules.get("timm.layers")
    found = (getattr(timm_layers, name, None) for name in _STANDARDIZED_NAMES)
    return tuple(cls for cls in found if cls is not None)


def is_standardized(module: nn.Module) -> bool:
    return isinstance(module, standardized_convs())


def standardized_weight(module: nn.Module) -> Tensor:
    """The weight the convolution receives: standardized, then masked (shape of weight)."""
    weight = module.weight
    gain = (module.gain * module.scale).view(-1) if hasattr(module, "gain") else None
    weight = F.batch_norm(
        weight.reshape(1, module.out_channels, -1),
        None,
        None,
        weight=gain,
        training=True,
        momentum=0.0,
        eps=module.eps,
    ).reshape_as(weight)
    return weight * module.parametrizations.weight[0].mask


def _sparse_standardized_forward(self: nn.Module, x: Tensor) -> Tensor:
    if getattr(self, "same_pad", False):
        from timm.layers.padding import pad_same  # loaded: self is one of timm's convs

        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
    weight = standardized_weight(self)
    return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def install_sparse_forward(module: nn.Module) -> None:
    """Make a standardized conv apply its mask after standardization."""
    module.forward = types.MethodType(_sparse_standardized_forward, module)
