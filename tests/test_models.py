"""The papers' architectures in ``sparse_param.models``, created through timm."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from torch import nn

import sparse_param
import sparse_param.models  # noqa: F401  (registers the models)

NAMES = ["lenet_300_100", "mlp_cifar", "set_mlp_cifar", "wrn_28_2", "cifar_resnet34", "cifar_vgg16"]


def _mlp_params(*widths: int) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(widths[:-1], widths[1:]))


# Parameter counts (weights + biases + BN affine). LeNet-300-100: 266,610 (784·300+300 +
# 300·100+100 + 100·10+10); WRN-28-2: 1.47M (DSR, SNFS); the MLPs by their layer widths;
# ResNet-34 for CIFAR-100: 21.3M as in the ITOP code (timm's classifier adds a bias);
# VGG-16 C of the SNIP / ITOP code: 13 conv-BN layers, 2048-512-512-10 classifier with BN.
PARAMS = {
    "lenet_300_100": 266_610,
    "mlp_cifar": _mlp_params(3072, 1024, 512, 10),  # 3,676,682
    "set_mlp_cifar": _mlp_params(3072, 4000, 1000, 4000, 10),  # 20,337,010
    "wrn_28_2": 1_467_610,
    "cifar_resnet34": 21_328_292,
    "cifar_vgg16": 11_323_466,
}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # one thread: on shared, loaded CPUs oversubscription makes the big models crawl
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registered_with_timm():
    available = set(timm.list_models())
    assert set(NAMES) <= available
    for name in NAMES:
        assert not timm.is_model_pretrained(name)


@pytest.mark.parametrize("name", NAMES)
def test_create_forward_backward_and_sparsify(name):
    model = timm.create_model(name)
    config = resolve_data_config({}, model=model)
    chans, height, width = config["input_size"]
    assert len(config["mean"]) == len(config["std"]) == chans
    x = torch.randn(2, chans, height, width)
    out = model(x)
    assert out.shape == (2, model.num_classes)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    sparse_param.sparsify(model, density=0.05)
    for layer in sparse_param.sparse_layers(model):
        assert layer.mask.dtype == torch.bool and layer.mask.shape == layer.weight.shape
        assert bool((layer.weight[~layer.mask] == 0).all()), layer.name
        assert torch.equal(layer.ever_active, layer.mask) and layer.active >= 1
    assert sparse_param.density(model) == pytest.approx(0.05, abs=1e-6)
    model.zero_grad()
    model(x).logsumexp(1).mean().backward()
    for layer in sparse_param.sparse_layers(model):
        assert bool((layer.weight.grad[~layer.mask] == 0).all()), layer.name


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    model = timm.create_model(name)
    assert sparse_param.models.count_parameters(model) == PARAMS[name]


def test_paper_sizes():
    def millions(name):
        return sparse_param.models.count_parameters(timm.create_model(name)) / 1e6

    assert millions("wrn_28_2") == pytest.approx(1.47, abs=0.005)
    assert millions("cifar_resnet34") == pytest.approx(21.3, abs=0.05)
    assert sparse_param.models.count_parameters(timm.create_model("lenet_300_100")) == 266_610


@pytest.mark.parametrize(
    "name, input_size, mean",
    [
        ("lenet_300_100", (1, 28, 28), (0.1307,)),
        ("mlp_cifar", (3, 32, 32), sparse_param.models.CIFAR10_MEAN),
        ("wrn_28_2", (3, 32, 32), sparse_param.models.CIFAR10_MEAN),
        ("cifar_resnet34", (3, 32, 32), sparse_param.models.CIFAR100_MEAN),
        ("cifar_vgg16", (3, 32, 32), sparse_param.models.CIFAR10_MEAN),
    ],
)
def test_data_config(name, input_size, mean):
    model = timm.create_model(name)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == input_size
    assert tuple(config["mean"]) == tuple(mean)
    assert config["crop_pct"] == 1.0
    assert model.pretrained_cfg["num_classes"] == model.num_classes


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_raises(name):
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", NAMES)
def test_timm_kwargs(name):
    model = timm.create_model(name, num_classes=7, drop_rate=0.2)
    chans, h, w = model.pretrained_cfg["input_size"]
    assert model(torch.randn(2, chans, h, w)).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(torch.randn(2, chans, h, w)).shape == (2, 3)


@pytest.mark.parametrize("name", ["wrn_28_2", "cifar_resnet34", "cifar_vgg16"])
def test_in_chans(name):
    model = timm.create_model(name, in_chans=1, num_classes=10)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_mlp_in_chans_and_wrong_input():
    model = timm.create_model("lenet_300_100", in_chans=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="expects inputs of 3×28×28"):
        model(torch.randn(2, 1, 28, 28))


def test_set_mlp_dropout_default():
    model = timm.create_model("set_mlp_cifar")
    assert model.drop.p == 0.3
    assert timm.create_model("set_mlp_cifar", drop_rate=0.0).drop.p == 0.0


def test_cifar_resnet34_stem():
    model = timm.create_model("cifar_resnet34")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    assert [len(stage) for stage in stages] == [3, 4, 6, 3]
    assert [f["reduction"] for f in model.feature_info] == [1, 1, 2, 4, 8]


def test_wrn_structure():
    model = timm.create_model("wrn_28_2")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 4 * 2 + 3  # stem, 12 blocks of 2, 3 projection shortcuts
    assert [m.out_channels for m in convs[:1]] == [16]
    assert model.fc.in_features == 128
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 128, 8, 8)


def test_vgg_configs():
    model = timm.create_model("cifar_vgg16")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 2, 2)
    assert model.pre_logits[0].in_features == 2048
    d = timm.create_model("cifar_vgg16", config="D")
    assert d.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 1, 1)
    assert d.pre_logits[0].in_features == 512
    like = timm.create_model("cifar_vgg16", config="like")
    assert sum(isinstance(m, nn.Linear) for m in like.modules()) == 2
    with pytest.raises(ValueError, match="unknown VGG config"):
        timm.create_model("cifar_vgg16", config="E")
    # another input size still runs (adaptive pool before the flatten)
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_dense_first_last_on_mlp():
    model = timm.create_model("lenet_300_100")
    sparse_param.sparsify(model, density=0.02, dense_first=True, dense_last=True)
    assert [layer.name for layer in sparse_param.sparse_layers(model)] == ["fc2"]
