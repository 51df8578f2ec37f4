"""Architectures of the sparse-training papers, registered as timm models.

Importing this module registers, for ``timm.create_model(name)`` and ``train.py --model``:

============== ============================================ ================= ==========
name           architecture                                 paper(s)          input
============== ============================================ ================= ==========
lenet_300_100  MLP 784-300-100-10 (266,610 parameters)      SNIP, SNFS, RigL  1×28×28
mlp_cifar      MLP 3072-1024-512-10                         ITOP              3×32×32
set_mlp_cifar  MLP 3072-4000-1000-4000-10, dropout 0.3      SET               3×32×32
wrn_28_2       WideResNet-28-2 (pre-activation), ~1.47M     DSR, SNFS         3×32×32
cifar_resnet34 ResNet-34, 3×3 stride-1 stem, no max-pool    ITOP (CIFAR-100)  3×32×32
cifar_vgg16    VGG-16 "C" with BN, 512-wide BN classifier   SNIP, SNFS, ITOP  3×32×32
============== ============================================ ================= ==========

Each takes timm's usual keyword arguments (``num_classes``, ``in_chans``, ``drop_rate``,
``pretrained`` — always False: no weights exist) and carries a ``pretrained_cfg`` with its
input size and the normalization of its dataset, so ``timm.data.resolve_data_config``
works. Models return logits (the reference code returned ``log_softmax``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn

__all__ = [
    "MLP",
    "CifarVGG",
    "WideResNet",
    "cifar_resnet34",
    "cifar_vgg16",
    "lenet_300_100",
    "mlp_cifar",
    "set_mlp_cifar",
    "wrn_28_2",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


# ----------------------------------------------------------------------------- MLPs


class _LinearClassifier:
    """timm's classifier interface for a model whose head is one Linear, stored under the
    attribute named by ``classifier``."""

    classifier = "head"

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        setattr(self, self.classifier, head)


class MLP(_LinearClassifier, nn.Module):
    """Fully connected classifier on the flattened image.

    Hidden layers ``fc1 … fcN`` (Linear → ReLU → Dropout(``drop_rate``)), classifier
    ``head``. The input must have ``in_chans × img_size²`` values per sample.
    """

    def __init__(
        self,
        hidden: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 28,
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans, self.img_size = in_chans, (h, w)
        self.in_features = in_chans * h * w
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        widths = [self.in_features, *hidden]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(n_in, n_out, **dd))
        self.depth = len(hidden)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = widths[-1]
        self.head = nn.Linear(widths[-1], num_classes, **dd) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of {self.in_chans}×{self.img_size[0]}×"
                f"{self.img_size[1]} = {self.in_features} values per sample, got {x.shape[1]}; "
                f"build it with matching in_chans / img_size"
            )
        for i in range(1, self.depth + 1):
            x = self.drop(self.act(getattr(self, f"fc{i}")(x)))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------- WideResNet


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3, with a
    1×1 convolution on the shortcut when the shape changes (Zagoruyko & Komodakis)."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop: float, **dd) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, **dd)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(c_out, **dd)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False, **dd)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop)
        self.shortcut = None
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        o = self.act(self.bn1(x))
        # With a projection the shortcut sees the pre-activated input, as in the WRN code.
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv2(self.drop(self.act(self.bn2(self.conv1(o)))))
        return o + skip


class WideResNet(_LinearClassifier, nn.Module):
    """CIFAR WideResNet-``depth``-``widen_factor``: a 3×3 stem of 16 channels, three
    groups of ``(depth − 4) / 6`` pre-activation blocks of 16k, 32k, 64k channels
    (strides 1, 2, 2), BN-ReLU, global average pooling, linear classifier ``fc``.

    Args:
        block_drop_rate: dropout between the two convolutions of each block (the WRN
            paper's 0.3; 0 in the DSR/SNFS runs).
        drop_rate: dropout before the classifier (timm's meaning).
    """

    classifier = "fc"

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        if global_pool != "avg":
            raise ValueError(f"WideResNet supports global_pool='avg' only, got {global_pool!r}")
        dd = {"device": device, "dtype": dtype}
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False, **dd)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="conv1")]
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                _WideBlock(
                    widths[i] if j == 0 else widths[i + 1],
                    widths[i + 1],
                    stride if j == 0 else 1,
                    block_drop_rate,
                    **dd,
                )
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(
                dict(num_chs=widths[i + 1], reduction=2**i, module=f"stages.{i}")
            )
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[-1], **dd)
        self.act = nn.ReLU(inplace=True)
        self.num_features = self.head_hidden_size = widths[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes, **dd) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.stages(self.conv1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------ VGG

# Numbers are 3×3 convolutions, (k, c) a k×k convolution, "M" a 2×2 max-pool. All convs
# have padding 1 — also the 1×1 ones of config C, which grow the map by 2 (as in the
# SNIP / sparse_learning code): a 32×32 input ends at 2×2, hence the 2048-wide flatten.
# fmt: off
VGG_CONFIGS: dict[str, list[Any]] = {
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (1, 256), "M",
          512, 512, (1, 512), "M", 512, 512, (1, 512), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"],
}
# fmt: on
VGG_CONFIGS["like"] = VGG_CONFIGS["D"]


class CifarVGG(_LinearClassifier, nn.Module):
    """VGG-16 for 32×32 inputs as in the SNIP / sparse_learning / ITOP code: conv-BN-ReLU
    features, then a classifier of Linear(→512)-ReLU-BN1d, twice for configs C and D
    (once for "like"), and Linear(512 → classes).

    An adaptive average pool to the map size a 32×32 input reaches (2×2 for C, 1×1 for
    D) sits before the flatten: the identity at 32×32, and other sizes still work.
    """

    def __init__(
        self,
        config: str = "C",
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"unknown VGG config {config!r}; expected one of {list(VGG_CONFIGS)}")
        dd = {"device": device, "dtype": dtype}
        self.config, self.num_classes, self.in_chans = config, num_classes, in_chans
        self.drop_rate = drop_rate
        layers: list[nn.Module] = []
        c_in, size = in_chans, 32
        for v in VGG_CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            k, c_out = v if isinstance(v, tuple) else (3, v)
            layers += [
                nn.Conv2d(c_in, c_out, k, padding=1, **dd),
                nn.BatchNorm2d(c_out, **dd),
                nn.ReLU(inplace=True),
            ]
            size += 3 - k
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(size)
        flat = c_in * size * size
        hidden: list[nn.Module] = []
        for _ in range(1 if config == "like" else 2):
            hidden += [nn.Linear(flat, 512, **dd), nn.ReLU(inplace=True), nn.BatchNorm1d(512, **dd)]
            flat = 512
        self.pre_logits = nn.Sequential(*hidden)
        self.num_features = self.head_hidden_size = 512
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(512, num_classes, **dd) if num_classes else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pre_logits(self.pool(x).flatten(1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# -------------------------------------------------------------------- CIFAR ResNet


def _cifar_resnet(layers: Sequence[int], **kwargs: Any) -> ResNet:
    """timm's ResNet with the CIFAR stem: a 3×3 stride-1 convolution, no max-pool."""
    model = ResNet(BasicBlock, tuple(layers), **kwargs)
    dd = {"device": model.conv1.weight.device, "dtype": model.conv1.weight.dtype}
    model.conv1 = nn.Conv2d(model.in_chans, 64, 3, 1, 1, bias=False, **dd)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    for info in model.feature_info:  # the stem no longer downsamples (×4 less)
        info["reduction"] = max(info["reduction"] // 4, 1)
    return model


# ------------------------------------------------------------------ registration


def _cfg(mean, std, input_size, num_classes=10, **kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": input_size,
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "license": "apache-2.0",
        **kwargs,
    }


_MLP_CFG = {"first_conv": "fc1", "classifier": "head", "fixed_input_size": True}

default_cfgs = generate_default_cfgs(
    {
        "lenet_300_100": _cfg(MNIST_MEAN, MNIST_STD, (1, 28, 28), **_MLP_CFG),
        "mlp_cifar": _cfg(CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32), **_MLP_CFG),
        "set_mlp_cifar": _cfg(CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32), **_MLP_CFG),
        "wrn_28_2": _cfg(
            CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32), first_conv="conv1", classifier="fc"
        ),
        "cifar_resnet34": _cfg(
            CIFAR100_MEAN,
            CIFAR100_STD,
            (3, 32, 32),
            num_classes=100,
            first_conv="conv1",
            classifier="fc",
        ),
        "cifar_vgg16": _cfg(
            CIFAR10_MEAN, CIFAR10_STD, (3, 32, 32), first_conv="features.0", classifier="head"
        ),
    }
)


def _create(variant: str, model_cls, pretrained: bool, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(
            f"{variant}: no pretrained weights exist for this sparse_param model; "
            f"create it with pretrained=False and train it (recipes/train.py)"
        )
    return build_model_with_cfg(model_cls, variant, pretrained=False, **kwargs)


def _check_no_drop_path(variant: str, kwargs: dict[str, Any]) -> None:
    for key in ("drop_path_rate", "drop_block_rate"):
        if kwargs.pop(key, 0.0):
            raise ValueError(f"{variant} does not support {key}")


@register_model
def lenet_300_100(pretrained: bool = False, **kwargs: Any) -> MLP:
    """LeNet-300-100: MLP 784-300-100-10 for MNIST (266,610 parameters)."""
    _check_no_drop_path("lenet_300_100", kwargs)
    return _create("lenet_300_100", MLP, pretrained, hidden=(300, 100), **kwargs)


@register_model
def mlp_cifar(pretrained: bool = False, **kwargs: Any) -> MLP:
    """ITOP's CIFAR-10 MLP 3072-1024-512-10."""
    _check_no_drop_path("mlp_cifar", kwargs)
    return _create("mlp_cifar", MLP, pretrained, hidden=(1024, 512), **kwargs)


@register_model
def set_mlp_cifar(pretrained: bool = False, **kwargs: Any) -> MLP:
    """SET's CIFAR-10 MLP 3072-4000-1000-4000-10, dropout 0.3 after every hidden layer
    (ReLU stands in for the paper's SReLU)."""
    _check_no_drop_path("set_mlp_cifar", kwargs)
    kwargs.setdefault("drop_rate", 0.3)
    return _create("set_mlp_cifar", MLP, pretrained, hidden=(4000, 1000, 4000), **kwargs)


@register_model
def wrn_28_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-28-2 for CIFAR (≈1.47M parameters), as in DSR and SNFS."""
    _check_no_drop_path("wrn_28_2", kwargs)
    return _create("wrn_28_2", WideResNet, pretrained, depth=28, widen_factor=2, **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 with a CIFAR stem (3×3 stride-1 conv, no max-pool), as in ITOP's
    CIFAR-100 runs; timm's ResNet otherwise (so drop_path_rate works)."""
    return _create("cifar_resnet34", _cifar_resnet, pretrained, layers=(3, 4, 6, 3), **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16 with BN for 32×32 inputs, config "C" by default (ITOP's ``vgg-c``); pass
    ``config="D"`` or ``"like"`` for the other variants of the sparse_learning code."""
    _check_no_drop_path("cifar_vgg16", kwargs)
    kwargs.setdefault("config", "C")
    return _create("cifar_vgg16", CifarVGG, pretrained, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (stored weights of sparse layers count densely)."""
    return sum(p.numel() for p in model.parameters())
