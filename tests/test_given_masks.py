"""``sparsify(model, masks=...)``: fine-tuning a pruned model from the masks it already
has, the zeros of its weights or given bool tensors."""

from __future__ import annotations

import helpers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_param as sp


@pytest.fixture(autouse=True)
def _one_thread():
    with helpers.torch_threads(1):
        yield


def pruned(seed: int, density: float) -> helpers.TinyNet:
    """A TinyNet magnitude-pruned per layer to ``density`` (at least one weight each)."""
    torch.manual_seed(seed)
    model = helpers.TinyNet()
    with torch.no_grad():
        for module in (model.conv, model.fc1, model.fc2, model.fc3):
            weight = module.weight
            keep = max(1, round(density * weight.numel()))
            cut = weight.abs().flatten().kthvalue(weight.numel() - keep + 1).values
            weight.mul_(weight.abs() >= cut)
    return model


def random_masks(model: torch.nn.Module, seed: int, density: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name in ("conv", "fc1", "fc2", "fc3"):
        shape = model.get_submodule(name).weight.shape
        mask = torch.rand(shape, generator=g) < density
        mask.view(-1)[torch.randint(mask.numel(), (1,), generator=g)] = True  # ≥ 1 active
        masks[name] = mask
    return masks


@given(seed=st.integers(0, 2**16), density=st.floats(0.01, 1.0))
def test_nonzero_masks_are_the_weights_zeros_and_the_weights_stay_bit_identical(
    check_invariants, seed, density
):
    model = pruned(seed, density)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sp.sparsify(model, masks="nonzero")
    names = ("conv", "fc1", "fc2", "fc3")
    check_invariants(model, {n: int(before[f"{n}.weight"].count_nonzero()) for n in names})
    for layer in sp.sparse_layers(model):
        dense = before[f"{layer.name}.weight"]
        assert torch.equal(layer.mask, dense != 0), layer.name
        assert torch.equal(layer.module.weight, dense), layer.name  # no rescale, no redraw
        assert layer.parametrization.allocated == int((dense != 0).sum())


@given(seed=st.integers(0, 2**16), density=st.floats(0.01, 1.0))
def test_given_masks_are_installed_as_given(check_invariants, seed, density):
    torch.manual_seed(seed)
    model = helpers.TinyNet()
    before = {n: m.weight.detach().clone() for n, m in model.named_children()}
    masks = random_masks(model, seed, density)
    sp.sparsify(model, masks={name: mask.clone() for name, mask in masks.items()})
    check_invariants(model, {name: int(mask.sum()) for name, mask in masks.items()})
    for layer in sp.sparse_layers(model):
        assert torch.equal(layer.mask, masks[layer.name])
        expected = torch.where(masks[layer.name], before[layer.name], 0)
        assert torch.equal(layer.module.weight, expected)  # kept where active, 0 elsewhere


def test_static_keeps_given_masks_and_a_dynamic_method_moves_them(check_invariants):
    for method, moves in (("static", False), ("rigl", True)):
        model = pruned(0, 0.2)
        sp.sparsify(model, masks="nonzero")
        masks = {layer.name: layer.mask.clone() for layer in sp.sparse_layers(model)}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        kw = {} if method == "static" else {"total_steps": 12, "update_interval": 3}
        sp.create_scheduler(method, model, optimizer, **kw)
        for step in range(9):
            optimizer.zero_grad()
            helpers.loss_of(model, helpers.batch(step)).backward()
            optimizer.step()
        check_invariants(model, {name: int(mask.sum()) for name, mask in masks.items()})
        changed = any(not torch.equal(x.mask, masks[x.name]) for x in sp.sparse_layers(model))
        assert changed == moves, method


def _bad(model):
    shapes = {n: m.weight.shape for n, m in model.named_children()}
    ones = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    return {
        "unknown string": ("magnitude", ValueError, "masks must be 'nonzero' or a mapping"),
        "not a mapping": ([1, 2], TypeError, "masks must be 'nonzero' or a mapping"),
        "unknown layer": ({**ones, "fc9": ones["fc1"]}, ValueError, r"names \['fc9'\]: not"),
        "missing layer": ({"conv": ones["conv"]}, ValueError, r"no mask for target layers"),
        "not bool": ({**ones, "fc2": ones["fc2"].float()}, TypeError, "'fc2' must be a bool"),
        "wrong shape": ({**ones, "fc3": ones["fc2"]}, ValueError, r"'fc3' has shape \(16, 24\)"),
        "empty": ({**ones, "fc3": ~ones["fc3"]}, ValueError, r"layers \['fc3'\] have no active"),
    }


@pytest.mark.parametrize("case", list(_bad(helpers.TinyNet())))
def test_bad_masks_are_refused_and_change_nothing(snapshot, assert_untouched, case):
    model = helpers.TinyNet()
    masks, error, words = _bad(model)[case]
    snap = snapshot(model)
    with pytest.raises(error, match=words):
        sp.sparsify(model, masks=masks)
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"density": 0.1}, r"\['density'\] would do nothing"),
        ({"distribution": "uniform"}, r"\['distribution'\]"),
        ({"structure": "fan_in"}, r"\['structure'\]"),
        ({"sparse_init": True}, r"\['sparse_init'\]"),
    ],
)
def test_arguments_that_given_masks_make_meaningless_are_refused(
    snapshot, assert_untouched, kwargs, words
):
    model = pruned(0, 0.3)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=words):
        sp.sparsify(model, masks="nonzero", **kwargs)
    assert_untouched(model, snap)


def test_nonzero_masks_need_the_weights():
    with torch.device("meta"):
        model = helpers.TinyNet()
    with pytest.raises(ValueError, match="on the meta device; load the pruned weights"):
        sp.sparsify(model, masks="nonzero")
    assert next(sp.sparse_layers(model), None) is None
