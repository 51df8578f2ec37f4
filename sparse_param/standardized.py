"""Sparse forward for convolutions that standardize their weight in forward.

timm's ``StdConv2d``, ``StdConv2dSame``, ``ScaledStdConv2d`` and ``ScaledStdConv2dSame``
compute ``(w - mean) / std`` per output channel before convolving; standardizing a
masked weight makes it dense again. For these layers ``sparsify`` installs the forward
below, which standardizes the stored (sparse) weight exactly as timm does and then
applies the mask, so the convolution receives a weight that is zero wherever the mask
is off.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import Tensor, nn

try:
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    from timm.layers.padding import pad_same

    STANDARDIZED_CONVS: tuple[type[nn.Module], ...] = (
        StdConv2d,
        StdConv2dSame,
        ScaledStdConv2d,
        ScaledStdConv2dSame,
    )
except ImportError:  # timm is optional for the core
    STANDARDIZED_CONVS = ()


def is_standardized(module: nn.Module) -> bool:
    return isinstance(module, STANDARDIZED_CONVS)


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
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
    weight = standardized_weight(self)
    return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def install_sparse_forward(module: nn.Module) -> None:
    """Make a standardized conv apply its mask after standardization."""
    module.forward = types.MethodType(_sparse_standardized_forward, module)
