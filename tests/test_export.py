"""Leaving the sparse state: ``finalize``, ``dense_state_dict``, ``load_state_dict``."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from timm.layers import ScaledStdConv2d, StdConv2d
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.utils import parametrize

from sparse_param import (
    dense_state_dict,
    density,
    finalize,
    is_sparse_state_dict,
    load_state_dict,
    sparse_layers,
    sparsify,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MODELS = [
    ("resnet18", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
]


def create(name: str, kwargs: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def train_a_little(model: nn.Module, size: int, steps: int = 2) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize(("name", "kwargs", "size"), MODELS, ids=[m[0] for m in MODELS])
def test_finalize_gives_plain_params_that_load_into_a_fresh_timm_model(name, kwargs, size):
    model = create(name, kwargs)
    classes = {n: type(m) for n, m in model.named_modules()}
    sparsify(model, 0.1, seed=0)
    train_a_little(model, size)
    layers = list(sparse_layers(model))
    expected = {layer.name: (layer.weight * layer.mask).detach().clone() for layer in layers}
    masks = {layer.name: layer.mask.clone() for layer in layers}
    ids = {layer.name: id(layer.weight) for layer in layers}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        sparse_out = model(x)

    assert finalize(model) is model

    assert next(sparse_layers(model), None) is None
    for layer_name, weight in expected.items():
        module = model.get_submodule(layer_name)
        assert not parametrize.is_parametrized(module)
        assert type(module) is classes[layer_name]  # the class timm made, not a copy
        assert isinstance(module.weight, nn.Parameter)
        assert id(module.weight) == ids[layer_name]  # the optimizer's parameter
        assert torch.equal(module.weight, weight)
        assert bool((module.weight[~masks[layer_name]] == 0).all())
    with torch.no_grad():
        assert torch.equal(model(x), sparse_out)

    # the optimizer built before finalize still updates the module's weights
    before = {n: model.get_submodule(n).weight.detach().clone() for n in expected}
    model.train()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert any(not torch.equal(model.get_submodule(n).weight, before[n]) for n in expected)

    # its state dict is a plain timm checkpoint
    model.eval()
    with torch.no_grad():
        out = model(x)
    fresh = create(name, kwargs, seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_finalize_on_an_ema_copy_leaves_the_live_model_sparse(check_invariants):
    model = sparsify(create("resnet18", {}), 0.1, seed=0)
    ema = ModelEmaV3(model, decay=0.5)
    train_a_little(model, 32)
    ema.update(model, step=1)
    live_masks = {layer.name: layer.mask.clone() for layer in sparse_layers(model)}
    live_state = {k: v.clone() for k, v in model.state_dict().items()}

    finalize(ema.module)

    assert next(sparse_layers(ema.module), None) is None
    check_invariants(model, {n: int(m.sum()) for n, m in live_masks.items()})
    for key, value in model.state_dict().items():
        assert torch.equal(value, live_state[key]), key
    for layer in sparse_layers(model):
        assert parametrize.is_parametrized(layer.module)
        assert type(layer.module).__name__.startswith("Parametrized")
    # the live model still trains sparsely, and the EMA still updates from it
    train_a_little(model, 32, steps=1)
    check_invariants(model)
    for layer in sparse_layers(model):
        assert bool((layer.weight.grad[~layer.mask] == 0).all())
        assert torch.equal(layer.mask, live_masks[layer.name])
    assert density(model) == pytest.approx(0.1, abs=1e-6)
    x = torch.randn(2, 3, 32, 32)
    ema.module.eval()
    with torch.no_grad():
        assert torch.isfinite(ema.module(x)).all()


def test_finalize_on_the_live_model_leaves_a_deepcopy_working(check_invariants):
    model = sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 5)), 0.2)
    twin = copy.deepcopy(model)
    finalize(model)
    check_invariants(twin)
    twin(torch.randn(1, 3, 4, 4)).sum().backward()
    for layer in sparse_layers(twin):
        assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_finalize_refuses_standardized_convs_and_leaves_the_model(snapshot, assert_untouched):
    model = sparsify(
        nn.Sequential(StdConv2d(3, 8, 3), ScaledStdConv2d(8, 8, 3), nn.Conv2d(8, 4, 1)), 0.3
    )
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"finalize: layers \['0', '1'\] standardize their weight"):
        finalize(model)
    assert_untouched(model, snap)
    assert len(list(sparse_layers(model))) == 3


def test_finalize_refuses_a_dense_model():
    with pytest.raises(ValueError, match="no sparse layers"):
        finalize(nn.Linear(3, 3))


@pytest.mark.parametrize(("name", "kwargs", "size"), MODELS, ids=[m[0] for m in MODELS])
def test_dense_state_dict_loads_into_a_plain_model_with_same_outputs(name, kwargs, size):
    model = sparsify(create(name, kwargs), 0.1, seed=0)
    train_a_little(model, size)
    state = model.state_dict()
    saved = {k: v.clone() for k, v in state.items()}
    assert is_sparse_state_dict(state)

    plain_state = dense_state_dict(state)

    assert not is_sparse_state_dict(plain_state)
    assert not any("parametrizations" in k for k in plain_state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)  # input not modified
    plain = create(name, kwargs, seed=1)
    assert set(plain_state) == set(plain.state_dict())
    load_state_dict(plain, plain_state)  # the helper passes plain checkpoints through
    for layer in sparse_layers(model):
        assert torch.equal(plain.get_submodule(layer.name).weight, layer.weight * layer.mask)
    x = torch.randn(2, 3, size, size)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_load_state_dict_explains_a_sparse_checkpoint_for_a_dense_model(snapshot, assert_untouched):
    sparse = sparsify(create("resnet18", {}), 0.1)
    dense = create("resnet18", {}, seed=1)
    snap = snapshot(dense)
    with pytest.raises(ValueError, match="sparsify") as info:
        load_state_dict(dense, sparse.state_dict())
    assert "dense_state_dict" in str(info.value)
    assert_untouched(dense, snap)

    # ... and loads it into a model sparsified the same way
    target = sparsify(create("resnet18", {}, seed=2), 0.1, seed=3)
    result = load_state_dict(target, sparse.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for a, b in zip(sparse_layers(sparse), sparse_layers(target)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


def test_export_helpers_handle_a_sparsified_root_layer():
    # A bare layer sparsified on its own has keys without a module prefix.
    layer = sparsify(nn.Linear(6, 4), 0.5, seed=0)
    state = layer.state_dict()
    assert is_sparse_state_dict(state)
    plain = dense_state_dict(state)
    assert set(plain) == {"weight", "bias"}
    assert torch.equal(plain["weight"], layer.weight)
    fresh = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="dense_state_dict"):
        load_state_dict(fresh, state)
    load_state_dict(fresh, plain)
    x = torch.randn(3, 6)
    assert torch.equal(fresh(x), layer(x))


# ------------------------------------------- issue 19: the export command's bad inputs


@pytest.mark.parametrize(
    "case, words",
    [
        ("truncated", r"CKPT \S+ckpt.pth: torch.load cannot read it \(.*\); the file is truncated"),
        ("empty", r"CKPT \S+ckpt.pth: torch.load cannot read it \(EOFError\)"),
        ("no folder", r"OUT \S+missing/plain.safetensors: \S+missing is not an existing folder; "
                      r"create it first"),
    ],
)  # fmt: skip
def test_the_export_command_says_what_is_wrong_in_one_line(tmp_path, capsys, case, words):
    from sparse_param.export import main

    torch.manual_seed(0)
    path = tmp_path / "ckpt.pth"
    torch.save(sparsify(nn.Sequential(nn.Linear(8, 8)), 0.5).state_dict(), path)
    data = path.read_bytes()
    if case != "no folder":
        path.write_bytes(data[: len(data) // 2] if case == "truncated" else b"")
    out = tmp_path / ("missing" if case == "no folder" else "") / "plain.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.search(words, error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # nothing written
