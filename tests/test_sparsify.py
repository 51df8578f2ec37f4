"""``sparsify`` on random layer stacks: docs/architecture.md, invariants 1-4 and 7, gradients,
seeds, state dicts, dtype / memory-format conversions, deep copies, bad input."""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from sparse_param import (
    SparseMask,
    allocate,
    density,
    effective_density,
    itop_rate,
    layer_table,
    sparse_layers,
    sparsify,
    summary,
)
from sparse_param.layers import find_targets
from sparse_param.sampling import random_subset

TARGET_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# ------------------------------------------------------------------ random layer stacks


@dataclass(frozen=True)
class Spec:
    kind: str  # linear, conv1d, conv2d, conv3d
    c_in: int
    c_out: int
    kernel: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    nested: bool = False

    def build(self) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(self.c_in, self.c_out, bias=self.bias)
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
        return conv(self.c_in, self.c_out, self.kernel, groups=self.groups, bias=self.bias)

    def input(self, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "linear":
            return torch.randn(2, self.c_in, generator=generator)
        spatial = [k + 1 for k in self.kernel]
        return torch.randn(1, self.c_in, *spatial, generator=generator)


@st.composite
def specs(draw) -> Spec:
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    bias, nested = draw(st.booleans()), draw(st.booleans())
    if kind == "linear":
        c_in, c_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        return Spec(kind, c_in, c_out, bias=bias, nested=nested)
    dims = int(kind[4])
    size = st.integers(1, 3 if dims < 3 else 2)
    kernel = tuple(draw(st.lists(size, min_size=dims, max_size=dims)))
    grouping = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if grouping == "plain":
        groups, c_in, c_out = 1, draw(st.integers(1, 8)), draw(st.integers(1, 8))
    elif grouping == "grouped":
        groups = draw(st.integers(2, 4))
        c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    else:
        c_in = groups = draw(st.integers(1, 8))
        c_out = c_in * draw(st.integers(1, 2))
    return Spec(kind, c_in, c_out, kernel, groups, bias, nested)


stacks = st.lists(specs(), min_size=1, max_size=6)
seeds = st.integers(0, 2**31 - 1)
distributions = st.sampled_from(["uniform", "er", "erk"])
densities = st.floats(0.01, 1.0)


class Stack(nn.Module):
    """Target layers (some nested) next to modules sparsify must leave alone."""

    def __init__(self, layer_specs: list[Spec]) -> None:
        super().__init__()
        self.specs = list(layer_specs)
        self.layers = nn.ModuleList(
            nn.Sequential(s.build()) if s.nested else s.build() for s in layer_specs
        )
        self.norm = nn.LayerNorm(3)
        self.embed = nn.Embedding(5, 3)
        self.scale = nn.Parameter(torch.ones(3, 3))  # 2-D, but not a Linear/Conv weight

    def target(self, i: int) -> nn.Module:
        layer = self.layers[i]
        return layer[0] if self.specs[i].nested else layer

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        total = self.embed(torch.tensor([1, 2])).sum() + self.norm(self.scale).sum()
        for i, spec in enumerate(self.specs):
            out = self.target(i)(spec.input(generator))
            total = total + (out * torch.randn(out.shape, generator=generator)).sum()
        return total


def build(layer_specs: list[Spec], init_seed: int) -> Stack:
    torch.manual_seed(init_seed)
    return Stack(layer_specs)


def target_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Layer name to weight shape, found independently of ``find_targets``."""
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(m, TARGET_TYPES)
    }


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def feasible(shapes, d) -> bool:
    return round(d * numel(shapes)) >= len(shapes)


def masks_of(model) -> dict[str, torch.Tensor]:
    return {layer.name: layer.mask.clone() for layer in sparse_layers(model)}


def reference_output(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's output computed functionally with ``weight``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    return conv(
        x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups
    )


# --------------------------------------------------------------------- sparsify: state


@given(stacks, densities, distributions, seeds, seeds, st.booleans())
def test_sparsify_invariants_and_exact_counts(
    check_invariants,
    snapshot,
    assert_untouched,
    layer_specs,
    d,
    distribution,
    seed,
    init,
    sparse_init,
):
    model = build(layer_specs, init)
    shapes = target_shapes(model)
    if not feasible(shapes, d):
        snap = snapshot(model)
        with pytest.raises(ValueError, match="every layer needs at least one"):
            sparsify(model, d, distribution=distribution, seed=seed, sparse_init=sparse_init)
        assert_untouched(model, snap)
        return
    dense = {
        name: m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, TARGET_TYPES)
    }
    target_ids = {id(m.weight) for m in model.modules() if isinstance(m, TARGET_TYPES)}
    others = {k: v.detach().clone() for k, v in model.named_parameters() if id(v) not in target_ids}
    counts = allocate(shapes, d, distribution)

    assert (
        sparsify(model, d, distribution=distribution, seed=seed, sparse_init=sparse_init) is model
    )

    check_invariants(model, counts)
    layers = list(sparse_layers(model))
    assert [layer.name for layer in layers] == list(shapes)
    for layer in layers:
        assert isinstance(layer.parametrization, SparseMask)
        assert type(layer.module).__bases__[0] in TARGET_TYPES
        assert torch.equal(layer.ever_active, layer.mask)
        if sparse_init:  # each unit scaled to its active fan-in (the default)
            fan_in = layer.mask[0].numel()
            active = layer.mask.flatten(1).sum(1, keepdim=True)
            factor = (fan_in / active.clamp(min=1).double()).sqrt()
            factor = factor.view(-1, *[1] * (layer.mask.dim() - 1)).expand_as(layer.mask)
            expected = dense[layer.name].double() * factor
            assert torch.allclose(
                layer.weight[layer.mask].double(), expected[layer.mask], rtol=1e-6, atol=0
            )
        else:  # the active weights are the model's own, bit for bit
            assert torch.equal(layer.weight[layer.mask], dense[layer.name][layer.mask])
        assert layer.parametrization.allocated == counts[layer.name]
    assert sum(counts.values()) == round(d * numel(shapes))
    assert density(model) == sum(counts.values()) / numel(shapes)
    assert itop_rate(model) == density(model)
    # biases, norms, embeddings and other parameters are never touched
    for key, value in model.named_parameters():
        if key in others:
            assert torch.equal(value, others[key]), key
    for module in (model.norm, model.embed):
        assert not parametrize.is_parametrized(module)
    assert isinstance(model.scale, nn.Parameter)


@given(stacks, densities, distributions, seeds)
def test_gradient_of_stored_weight_is_masked_dense_gradient(
    check_invariants, layer_specs, d, distribution, seed
):
    model = build(layer_specs, seed)
    if not feasible(target_shapes(model), d):
        return
    sparsify(model, d, distribution=distribution, seed=seed)
    inputs = [s.input(torch.Generator().manual_seed(seed + i)) for i, s in enumerate(layer_specs)]
    layers = {layer.name: layer for layer in sparse_layers(model)}
    for i, x in enumerate(inputs):
        module = model.target(i)
        layer = next(lay for lay in layers.values() if lay.module is module)
        probe = torch.randn(reference_output(module, layer.mask.float(), x).shape)
        (module(x) * probe).sum().backward()

        w = module.weight.detach().clone().requires_grad_(True)
        (reference_output(module, w, x) * probe).sum().backward()
        grad = layer.weight.grad
        assert grad is not None
        assert bool((grad[~layer.mask] == 0).all()), layer.name
        assert torch.allclose(grad[layer.mask], w.grad[layer.mask], rtol=1e-4, atol=1e-5)

    # an optimizer step keeps pruned stored weights at exactly 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        opt.step()
    check_invariants(model)


@given(stacks, seeds, seeds, seeds)
def test_same_seed_same_masks_different_seed_different_masks(layer_specs, seed, init_a, init_b):
    d = 0.3
    a, b = build(layer_specs, init_a), build(layer_specs, init_b)
    if not feasible(target_shapes(a), d):
        return
    torch.manual_seed(init_a + 1)  # the global RNG state plays no part
    sparsify(a, d, seed=seed)
    torch.manual_seed(init_b + 2)
    sparsify(b, d, seed=seed)
    ma, mb = masks_of(a), masks_of(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    # a generator seeded the same way is the same as the int seed
    c = build(layer_specs, init_b)
    sparsify(c, d, seed=torch.Generator().manual_seed(seed))
    assert all(torch.equal(ma[k], m) for k, m in masks_of(c).items())

    other = build(layer_specs, init_a)
    sparsify(other, d, seed=seed + 1)
    # Only insist on a difference when a collision is astronomically unlikely.
    log_choices = sum(math.log(math.comb(layer.numel, layer.active)) for layer in sparse_layers(a))
    if log_choices > 40:
        mo = masks_of(other)
        assert any(not torch.equal(ma[k], mo[k]) for k in ma)


def test_different_seeds_give_different_masks_on_a_real_size_model():
    def model():
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Linear(32, 10))

    a, b = sparsify(model(), 0.1, seed=1), sparsify(model(), 0.1, seed=2)
    for ma, mb in zip(masks_of(a).values(), masks_of(b).values()):
        assert not torch.equal(ma, mb)
        assert int(ma.sum()) == int(mb.sum())


@given(stacks, distributions, seeds)
def test_state_dict_round_trip_restores_everything_exactly(
    check_invariants, layer_specs, distribution, seed
):
    d = 0.4
    a = build(layer_specs, seed)
    if not feasible(target_shapes(a), d):
        return
    sparsify(a, d, distribution=distribution, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in sparse_layers(a):  # make the state more than what sparsify produced
        layer.module.weight = torch.randn(layer.mask.shape, generator=g)
        layer.ever_active.logical_or_(torch.rand(layer.mask.shape, generator=g) < 0.5)
    state = a.state_dict()

    b = build(layer_specs, seed + 1)
    sparsify(b, d, distribution=distribution, seed=seed + 1)
    b.load_state_dict(state)

    after = b.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert after[key].dtype == value.dtype
        assert torch.equal(after[key], value), key
    check_invariants(b, {layer.name: layer.active for layer in sparse_layers(a)})
    for la, lb in zip(sparse_layers(a), sparse_layers(b)):
        assert torch.equal(la.module.weight, lb.module.weight)
        assert la.mask.data_ptr() != lb.mask.data_ptr()  # copied, not shared


def test_loading_a_checkpoint_with_values_at_pruned_positions_zeroes_them(check_invariants):
    # e.g. a checkpoint of an EMA copy that lerped toward pruned weights
    a = sparsify(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(2, 4, 3)), 0.3, seed=0)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for key in state:
        if key.endswith("parametrizations.weight.original"):
            state[key] += 1.0
    b = sparsify(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(2, 4, 3)), 0.3, seed=1)
    b.load_state_dict(state)
    check_invariants(b)
    for la, lb in zip(sparse_layers(a), sparse_layers(b)):
        assert torch.equal(lb.mask, la.mask)
        assert torch.equal(lb.weight[lb.mask], la.weight[la.mask] + 1.0)


@given(stacks, seeds)
def test_assigning_module_weight_stores_it_masked(check_invariants, layer_specs, seed):
    model = build(layer_specs, seed)
    if not feasible(target_shapes(model), 0.5):
        return
    sparsify(model, 0.5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in sparse_layers(model):
        param = layer.weight
        new = torch.rand(layer.mask.shape, generator=g) + 1.0  # no zeros
        layer.module.weight = new
        assert layer.weight is param
        assert torch.equal(layer.weight[layer.mask], new[layer.mask])
        assert bool((layer.weight[~layer.mask] == 0).all())
        assert bool((new != 0).all())  # the caller's tensor is not modified
    check_invariants(model)


@given(stacks, seeds)
def test_in_place_init_of_module_weight_never_computes_with_pruned_weights(layer_specs, seed):
    # nn.init / reset_parameters() write into whatever ``module.weight`` returns
    # (docs/papers.md#pitfalls-found-elsewhere); whatever the write reaches, the layer
    # must not compute with it.
    model = build(layer_specs, seed)
    if not feasible(target_shapes(model), 0.3):
        return
    sparsify(model, 0.3, seed=seed)
    for i, spec in enumerate(layer_specs):
        module = model.target(i)
        nn.init.uniform_(module.weight, 1.0, 2.0)
        module.reset_parameters()
        mask = module.parametrizations.weight[0].mask
        x = spec.input(torch.Generator().manual_seed(seed))
        seen = effective_density(module, x)  # raises if it computed off the mask
        assert seen[""] <= int(mask.sum()) / mask.numel()
        stored = module.parametrizations.weight.original.detach()
        assert torch.allclose(module(x), reference_output(module, stored * mask, x), atol=1e-5)
        assert bool((module.weight[~mask] == 0).all())


# ------------------------------------------------------- conversions, copies, formats

DTYPE_CONVERSIONS = [
    ("to_float64", lambda m: m.to(torch.float64), torch.float64),
    ("double", lambda m: m.double(), torch.float64),
    ("half", lambda m: m.half(), torch.float16),
    ("to_float16", lambda m: m.to(dtype=torch.float16), torch.float16),
    ("bfloat16", lambda m: m.bfloat16(), torch.bfloat16),
    ("to_bfloat16", lambda m: m.to(torch.bfloat16), torch.bfloat16),
]

FIXED_SPECS = [
    Spec("linear", 12, 7),
    Spec("conv1d", 4, 6, (3,), groups=2),
    Spec("conv2d", 6, 6, (3, 3), groups=6, nested=True),
    Spec("conv2d", 3, 8, (1, 3), bias=False),
    Spec("conv3d", 2, 4, (2, 2, 2)),
]


@pytest.mark.parametrize(("how", "convert", "dtype"), DTYPE_CONVERSIONS, ids=lambda v: str(v))
def test_dtype_conversions_keep_masks_bool(check_invariants, how, convert, dtype):
    model = sparsify(build(FIXED_SPECS, 0), 0.3, seed=0)
    before = masks_of(model)
    params = [id(layer.weight) for layer in sparse_layers(model)]
    convert(model)
    for layer in sparse_layers(model):
        assert layer.weight.dtype == dtype
        assert layer.mask.dtype == torch.bool
        assert layer.ever_active.dtype == torch.bool
        assert torch.equal(layer.mask, before[layer.name])
    assert [id(layer.weight) for layer in sparse_layers(model)] == params
    check_invariants(model)
    g = torch.Generator().manual_seed(0)
    for i, spec in enumerate(FIXED_SPECS):
        module = model.target(i)
        out = module(spec.input(g).to(dtype))
        assert out.dtype == dtype
        out.float().square().sum().backward()
    for layer in sparse_layers(model):
        assert layer.weight.grad.dtype == dtype
        assert bool((layer.weight.grad[~layer.mask] == 0).all())


@pytest.mark.parametrize(
    ("memory_format", "kind"),
    [(torch.channels_last, "conv2d"), (torch.channels_last_3d, "conv3d")],
)
def test_channels_last_keeps_masks_correct(check_invariants, memory_format, kind):
    layer_specs = [
        Spec(kind, 4, 8, (3,) * int(kind[4])),
        Spec(kind, 4, 8, (2,) * int(kind[4]), groups=2, nested=True),
        Spec(kind, 6, 6, (3,) * int(kind[4]), groups=6),
    ]
    plain = sparsify(build(layer_specs, 3), 0.3, seed=3)
    model = copy.deepcopy(plain).to(memory_format=memory_format)
    for layer, ref in zip(sparse_layers(model), sparse_layers(plain)):
        assert layer.weight.is_contiguous(memory_format=memory_format)
        assert layer.mask.dtype == torch.bool
        assert torch.equal(layer.mask, ref.mask)
        assert torch.equal(layer.ever_active, ref.ever_active)
        assert torch.equal(layer.weight, ref.weight)
    check_invariants(model)
    g = torch.Generator().manual_seed(0)
    for i, spec in enumerate(layer_specs):
        x = spec.input(g)
        out = model.target(i)(x.contiguous(memory_format=memory_format))
        assert torch.allclose(out, plain.target(i)(x), atol=1e-5)
        out.square().sum().backward()
    for layer in sparse_layers(model):
        assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_deepcopy_is_independent_and_sparse(check_invariants):
    model = sparsify(build(FIXED_SPECS, 1), 0.3, seed=1)
    clone = copy.deepcopy(model)
    check_invariants(clone)
    for a, b in zip(sparse_layers(model), sparse_layers(clone)):
        assert a.name == b.name
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
        assert a.weight is not b.weight and a.mask.data_ptr() != b.mask.data_ptr()
    g = torch.Generator().manual_seed(1)
    for i, spec in enumerate(FIXED_SPECS):
        x = spec.input(g)
        assert torch.equal(model.target(i)(x), clone.target(i)(x))
        clone.target(i)(x).square().sum().backward()
    for layer in sparse_layers(clone):
        assert bool((layer.weight.grad[~layer.mask] == 0).all())
    assert all(layer.weight.grad is None for layer in sparse_layers(model))
    # changing the copy leaves the original alone
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in sparse_layers(clone):
        layer.mask.fill_(True)
        layer.module.weight = torch.ones_like(layer.weight)
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), key
    check_invariants(model)


def test_sparse_init_rescales_to_active_fan_in():
    def make():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(30, 20), nn.Conv2d(4, 6, 3))

    plain = sparsify(make(), 0.2, seed=5, sparse_init=False)
    scaled = sparsify(make(), 0.2, seed=5)  # the default
    for a, b in zip(sparse_layers(plain), sparse_layers(scaled)):
        assert torch.equal(a.mask, b.mask)
        fan_in = a.mask[0].numel()
        for row in range(a.mask.shape[0]):
            active = int(a.mask[row].sum())
            factor = math.sqrt(fan_in / active) if active else 1.0
            assert torch.allclose(b.weight[row], a.weight[row] * factor, rtol=1e-6)


# -------------------------------------------------------------------- target selection


def test_target_selection_options():
    def model():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)),
            nn.Conv1d(8, 8, 1),
            nn.Linear(8, 10),
        )

    assert list(find_targets(model())) == ["0", "1.0", "2", "3"]
    assert list(find_targets(model(), dense_first=True, dense_last=True)) == ["1.0", "2"]
    assert list(find_targets(model(), include=["1.*", "3"])) == ["1.0", "3"]
    assert list(find_targets(model(), exclude=["1.*", nn.Conv1d])) == ["0", "3"]
    assert list(find_targets(model(), layer_types=[nn.Linear])) == ["3"]

    m = sparsify(model(), 0.2, dense_first=True, exclude=[nn.Linear])
    assert [layer.name for layer in sparse_layers(m)] == ["1.0", "2"]
    assert not parametrize.is_parametrized(m[0]) and not parametrize.is_parametrized(m[3])


def test_a_bare_layer_can_be_sparsified(check_invariants):
    layer = sparsify(nn.Linear(20, 10), 0.25, seed=0)
    check_invariants(layer, {"": 50})
    assert density(layer) == 0.25


# ---------------------------------------------------------------------------- bad input


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Conv1d(20, 4, 3), nn.LayerNorm(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"density": 0}, ValueError, r"density must be in \(0, 1\], got 0"),
        ({"density": -0.1}, ValueError, r"density must be in \(0, 1\], got -0.1"),
        ({"density": 1.5}, ValueError, r"density must be in \(0, 1\], got 1.5"),
        ({"density": math.nan}, ValueError, r"density must be in \(0, 1\], got nan"),
        ({"density": "0.1"}, TypeError, "density must be a number"),
        ({"density": 0.5, "distribution": "erk-ish"}, ValueError, "unknown distribution 'erk-ish'"),
        ({"density": 0.5, "distribution": {"9": 0.5}}, ValueError, r"not sparse targets: \['9'\]"),
        ({"density": 0.5, "distribution": {"0": 0.0}}, ValueError, r"density of '0' must be in"),
        ({"density": 0.5, "distribution": {"0": 1.5}}, ValueError, r"density of '0' must be in"),
        ({"density": 0.5, "distribution": {"2": 0.001}}, ValueError, "layer '2' has 240 weights"),
        ({"density": 1 / 440}, ValueError, "gives 1 active weights for 2 layers"),
        ({"density": 0.5, "seed": "0"}, TypeError, "seed must be an int"),
        ({"density": 0.5, "seed": 2**70}, ValueError, r"seed must be in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_untouched(
    snapshot, assert_untouched, kwargs, error, words
):
    model = small_model()
    snap = snapshot(model)
    with pytest.raises(error, match=words):
        sparsify(model, **kwargs)
    assert_untouched(model, snap)
    assert next(sparse_layers(model), None) is None


def test_lowest_feasible_density_gives_one_weight_per_layer(check_invariants):
    with pytest.warns(UserWarning, match=r"layers \['0', '2'\] get a single active weight"):
        model = sparsify(small_model(), 2 / 440, distribution="uniform")
    check_invariants(model, {"0": 1, "2": 1})


@pytest.mark.parametrize("model", [None, {"weight": torch.ones(2, 2)}, torch.ones(2, 2)])
def test_a_model_that_is_not_a_module_is_named(model):
    with pytest.raises(TypeError, match="sparsify: model must be a torch.nn.Module, got"):
        sparsify(model, 0.5)


def test_numpy_densities_and_seeds_are_numbers(check_invariants):
    expected = sparsify(small_model(), 0.5, seed=3).state_dict()
    for number in (np.float32(0.5), np.float64(0.5)):
        model = sparsify(small_model(), number, seed=np.int64(3))
        check_invariants(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_frozen_layers_are_left_dense_and_named(check_invariants, snapshot, assert_untouched):
    # A frozen backbone under a trainable head: masking it would cut a network that
    # nothing trains, so it stays dense and the user is told.
    model = small_model()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before: stays valid
    with pytest.warns(UserWarning, match=r"left 1 weight matrices dense\. frozen .*\['0'\]"):
        sparsify(model, 0.5)
    assert [layer.name for layer in sparse_layers(model)] == ["2"]
    assert isinstance(model[0].weight, nn.Parameter) and not model[0].weight.requires_grad
    (model[0](torch.randn(3, 10)).sum() + model[2](torch.randn(3, 20, 6)).sum()).backward()
    optimizer.step()
    check_invariants(model)
    frozen = small_model().requires_grad_(False)
    snap = snapshot(frozen)
    with pytest.raises(ValueError, match=r"every candidate weight is frozen .*\['0', '2'\]"):
        sparsify(frozen, 0.5)
    assert_untouched(frozen, snap)


def test_no_target_layers(snapshot, assert_untouched):
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3), nn.Embedding(4, 3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no target layers in Sequential"):
        sparsify(model, 0.5)
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match="no target layers"):
        sparsify(small_model(), 0.5, include=["3"])  # only the LayerNorm


def test_already_sparse(snapshot, assert_untouched):
    model = sparsify(small_model(), 0.5, seed=0)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already sparse"):
        sparsify(model, 0.2, seed=1)
    assert_untouched(model, snap)


def test_layers_sharing_one_weight_are_left_dense_and_named(snapshot, assert_untouched):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with pytest.warns(UserWarning, match=r"tied: \['0 \(to 1\.weight \(Linear\)\)', '1 "):
        sparsify(model, 0.5)
    assert [layer.name for layer in sparse_layers(model)] == ["2"]
    assert model[1].weight is model[0].weight and bool(model[0].weight.ne(0).all())
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    snap = snapshot(tied)
    with pytest.raises(ValueError, match="every candidate weight is frozen or tied"):
        sparsify(tied, 0.5)
    assert_untouched(tied, snap)


def test_failure_midway_rolls_back_exactly(monkeypatch, snapshot, assert_untouched):
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        timm_layers.StdConv2d(3, 8, 3),
        nn.Linear(8, 8),
        timm_layers.ScaledStdConv2d(8, 8, 3),
        nn.Conv2d(8, 8, 1),
    )
    snap = snapshot(model)

    def fail(module):
        raise RuntimeError("boom")

    module = importlib.import_module("sparse_param.sparsify")
    monkeypatch.setattr(module, "install_sparse_forward", fail)
    with pytest.raises(RuntimeError, match="boom"):
        sparsify(model, 0.2)
    assert_untouched(model, snap)


# ------------------------------------------------------------------ sampling, metrics


@given(st.integers(0, 5000), st.data(), seeds)
def test_random_subset_is_exact_distinct_and_deterministic(n, data, seed):
    k = data.draw(st.integers(0, n))
    picked = random_subset(n, k, torch.Generator().manual_seed(seed))
    assert picked.dtype == torch.int64
    assert picked.numel() == k
    assert picked.unique().numel() == k
    if k:
        assert 0 <= int(picked.min()) and int(picked.max()) < n
    again = random_subset(n, k, torch.Generator().manual_seed(seed))
    assert torch.equal(picked, again)


def test_random_subset_rejects_impossible_draws():
    with pytest.raises(ValueError, match="cannot draw 6 of 5"):
        random_subset(5, 6, torch.Generator())
    with pytest.raises(ValueError, match="cannot draw -1 of 5"):
        random_subset(5, -1, torch.Generator())


def test_random_subset_is_uniform_over_positions():
    n, k, trials = 64, 4, 4000  # the sparse path (8k <= n)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(n)
    for _ in range(trials):
        hits[random_subset(n, k, g)] += 1
    expected = trials * k / n
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 for a uniform sampler


def test_metrics_agree_with_the_masks():
    model = sparsify(build(FIXED_SPECS, 2), 0.3, seed=2)
    rows = layer_table(model)
    layers = list(sparse_layers(model))
    assert [r["name"] for r in rows] == [layer.name for layer in layers]
    for row, layer in zip(rows, layers):
        assert row["active"] == int(layer.mask.sum()) == row["allocated"]
        assert row["numel"] == layer.mask.numel()
        assert row["density"] == row["active"] / row["numel"]
        assert row["ever_active"] == int(layer.ever_active.sum())
    layers[0].ever_active.fill_(True)  # R_s reads ever_active, density reads the mask
    total = sum(r["numel"] for r in rows)
    assert itop_rate(model) == (sum(r["ever_active"] for r in rows[1:]) + rows[0]["numel"]) / total
    assert density(model) == sum(r["active"] for r in rows) / total
    text = summary(model)
    assert f"total ({len(rows)} layers)" in text
    assert all(r["name"] in text for r in rows)
    with pytest.raises(ValueError, match="no sparse layers"):
        density(nn.Linear(3, 3))


def test_effective_density_is_the_exact_share_of_non_zeros():
    model = sparsify(nn.Sequential(nn.Conv2d(3, 64, 7), nn.Flatten(), nn.Linear(64, 9)), 0.3)
    for layer in sparse_layers(model):
        layer.module.weight = torch.rand(layer.mask.shape) + 1.0  # no zero on the mask
    seen = effective_density(model, torch.randn(1, 3, 7, 7))
    for layer in sparse_layers(model):
        assert seen[layer.name] == layer.active / layer.numel


def test_effective_density_catches_a_layer_computing_off_its_mask():
    class Shifted(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight + 0.5, self.bias)  # dense again

    model = sparsify(nn.Sequential(nn.Linear(6, 6), Shifted(6, 6)), 0.3, seed=0)
    with pytest.raises(RuntimeError, match="layer '1'.*non-zero weights where its mask is off"):
        effective_density(model, torch.randn(2, 6))

    class Idle(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="'unused'.*ran no linear/conv op"):
        effective_density(sparsify(Idle(), 0.5), torch.randn(1, 4))


# ------------------------------------------------------------------ the "done when" check


def test_resnet50_at_two_percent_is_exact_erk(erk_reference):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet50", pretrained=False)
    shapes = {name: tuple(m.weight.shape) for name, m in find_targets(model).items()}
    assert shapes == target_shapes(model)
    counts = allocate(shapes, 0.02, "erk")

    sparsify(model, 0.02)

    assert abs(density(model) - 0.02) <= 0.0005
    assert density(model) == round(0.02 * numel(shapes)) / numel(shapes)
    active = {layer.name: layer.active for layer in sparse_layers(model)}
    assert active == counts
    ref = erk_reference(shapes, 0.02)
    assert ref.iterative_eps is not None  # no layer at the one-weight floor
    for name, count in counts.items():
        real = min(1.0, ref.iterative_eps * ref.score[name]) * ref.numel[name]
        assert abs(count - real) < 1 + 1e-6, name
    dense = [n for n in shapes if ref.iterative_eps * ref.score[n] >= 1]
    assert all(counts[n] == ref.numel[n] for n in dense)
