"""A sample of timm architectures, sparsified at density 0.05: every layer computes with
a weight no denser than its mask, overall density exact, inactive gradients zero."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers.padding import pad_same
from torch import nn

from sparse_param import allocate, density, effective_density, sparse_layers, sparsify
from sparse_param.layers import find_targets

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DENSITY = 0.05
TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# (name, create_model kwargs, input size): each at its smallest workable size; fixed-size
# models get img_size (and swin a window that divides every stage).
ARCHS = [
    ("resnet18", {}, 32),
    ("resnetv2_50x1_bit", {}, 32),  # StdConv2d
    ("eca_nfnet_l0", {}, 32),  # ScaledStdConv2d, Conv1d (ECA)
    ("nf_regnet_b0", {}, 32),  # ScaledStdConv2d, depthwise
    ("efficientnet_b0", {}, 32),
    ("tf_efficientnet_b0", {}, 32),  # Conv2dSame
    ("mobilenetv3_small_100", {}, 32),
    ("mixnet_s", {}, 32),  # MixedConv2d
    ("ghostnet_100", {}, 32),
    ("lcnet_050", {}, 32),
    ("repvgg_a0", {}, 32),
    ("convnext_atto", {}, 32),
    ("regnetx_002", {}, 32),
    ("densenet121", {}, 32),
    ("dla34", {}, 32),
    ("inception_v3", {}, 75),
    ("convmixer_768_32", {}, 32),
    ("poolformer_s12", {}, 32),
    ("edgenext_xx_small", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("pvt_v2_b0", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("cait_xxs24_224", {"img_size": 32}, 32),
    ("xcit_nano_12_p16_224", {"img_size": 32}, 32),
    ("mixer_s16_224", {"img_size": 32}, 32),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}, 64),
    ("coat_lite_tiny", {"img_size": 64}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    pytest.param("vgg11", {}, 32, marks=pytest.mark.slow),  # 129M parameters
    pytest.param("dm_nfnet_f0", {}, 32, marks=pytest.mark.slow),  # ScaledStdConv2dSame, 68M
]


def _id(arch) -> str:
    return arch.values[0] if hasattr(arch, "values") else arch[0]


@pytest.mark.parametrize(("name", "kwargs", "size"), ARCHS, ids=[_id(a) for a in ARCHS])
def test_timm_model_is_sparse_where_it_computes(check_invariants, zero_off, name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, TARGET_TYPES) and m.weight.dim() >= 2
    }
    assert list(find_targets(model)) == list(shapes)
    counts = allocate(shapes, DENSITY, "erk")

    sparsify(model, DENSITY, seed=0)

    check_invariants(model, counts)
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(density(model) - DENSITY) <= 0.5 / total + 1e-12
    assert density(model) == round(DENSITY * total) / total

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    for layer in sparse_layers(model):
        grad = layer.weight.grad
        assert grad is not None, f"{layer.name} got no gradient"
        assert zero_off(grad, layer.mask), f"{layer.name}: inactive weights train"

    model.eval()
    seen = effective_density(model, x)  # raises if a layer computes off its mask
    assert set(seen) == set(shapes)
    for layer in sparse_layers(model):
        assert seen[layer.name] <= layer.active / layer.numel, layer.name


STD_CONVS = [StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame]


def reference_standardized(module: nn.Module, stored: torch.Tensor, mask: torch.Tensor):
    """timm's weight standardization, written out: per output channel, biased variance."""
    w = stored.reshape(stored.shape[0], -1)
    mean = w.mean(1, keepdim=True)
    var = w.var(1, unbiased=False, keepdim=True)
    w = (w - mean) / torch.sqrt(var + module.eps)
    if hasattr(module, "gain"):
        w = w * (module.gain.view(-1, 1) * module.scale)
    return w.reshape_as(stored) * mask


@pytest.mark.parametrize("conv", STD_CONVS, ids=lambda c: c.__name__)
def test_standardized_convs_stay_sparse_after_standardization(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3, stride=2), nn.ReLU(), conv(8, 8, 3))
    sparsify(model, 0.2, seed=0)
    x = torch.randn(2, 3, 11, 11)

    seen = effective_density(model, x)
    for layer in sparse_layers(model):
        assert seen[layer.name] <= layer.active / layer.numel
        module = layer.module
        inp = x if layer.name == "0" else F.relu(model[0](x))
        padded = inp
        if getattr(module, "same_pad", False):
            padded = pad_same(inp, module.kernel_size, module.stride, module.dilation)
        weight = reference_standardized(module, layer.weight.detach(), layer.mask)
        expected = F.conv2d(
            padded,
            weight,
            module.bias,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )
        assert torch.allclose(module(inp), expected, atol=1e-5)
    model(x).square().sum().backward()
    for layer in sparse_layers(model):
        assert bool((layer.weight.grad[~layer.mask] == 0).all())

    # Without the sparse forward timm's standardization makes the weight dense again,
    # and the check above would catch it: it can fail.
    del model[0].forward
    with pytest.raises(RuntimeError, match="layer '0'.*non-zero weights where its mask is off"):
        effective_density(model, x)
