"""Exact zeros at inactive positions, whatever was written there (docs/architecture.md, invariant 2;
issue 7 §1), and reading state without changing it (issue 7 §6).

NaN · 0 is NaN: re-zeroing or masking a gradient by multiplying with the mask lets a
non-finite value at an inactive position through. These properties write NaN, ±Inf and
huge finite values where the mask is off, by every route a user has (a write under
``no_grad``, a checkpoint, an optimizer with a dense update, a non-finite gradient), and
require exact zeros there, while NaN at active positions stays visible.
"""

from __future__ import annotations

import math
import warnings

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import IN_SHAPE, N_CLASSES, build_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparse_param as sp
from sparse_param.layers import sparse_layers

pytestmark = pytest.mark.usefixtures("torch_single_thread")

POISON = [math.nan, math.inf, -math.inf, 3e38, -3e38]
poison = st.sampled_from(POISON)
densities = st.sampled_from([0.2, 0.5, 0.8])
seeds = st.integers(0, 2**16)


class ConvNet(nn.Module):
    """A Conv2d and a Linear of shapes drawn by hypothesis."""

    def __init__(self, c_in: int, c_out: int, k: int, n_out: int, size: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k)
        self.fc = nn.Linear(c_out * (size - k + 1) ** 2, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


conv_nets = st.builds(
    ConvNet, st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 5)
)


def sparse_net(net: ConvNet, density: float, seed: int) -> ConvNet:
    torch.manual_seed(seed)
    for p in net.parameters():
        nn.init.normal_(p)
    return sp.sparsify(net, density, seed=seed)


def masked_dense(model: ConvNet, x: torch.Tensor) -> torch.Tensor:
    """The reference: the layers computed with their stored weights zeroed off the mask
    (by selection, not multiplication), active values as stored."""
    w = {}
    for layer in sparse_layers(model):
        w[layer.name] = torch.where(layer.mask, layer.weight.detach(), 0)
    h = torch.relu(F.conv2d(x, w["conv"], model.conv.bias)).flatten(1)
    return F.linear(h, w["fc"], model.fc.bias)


def poison_inactive_(model: nn.Module, value: float) -> dict[str, torch.Tensor]:
    """Write ``value`` at every inactive stored position under no_grad (a tracked
    in-place write); return the clean active values."""
    active = {}
    with torch.no_grad():
        for layer in sparse_layers(model):
            active[layer.name] = layer.weight[layer.mask].clone()
            layer.weight.masked_fill_(~layer.mask, value)
    return active


def assert_exact_zeros(model: nn.Module) -> None:
    for layer in sparse_layers(model):
        stored = layer.weight.detach()
        assert bool((stored[~layer.mask] == 0).all()), f"{layer.name}: stored off-mask not 0"
        computed = layer.module.weight.detach()
        assert bool((computed[~layer.mask] == 0).all()), f"{layer.name}: computes off-mask"


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equal, NaN where NaN."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ written to the weight


@given(conv_nets, densities, seeds, poison)
def test_non_finite_written_under_no_grad_never_reaches_the_computation(net, density, seed, value):
    model = sparse_net(net, density, seed)
    active = poison_inactive_(model, value)
    x = torch.randn(2, net.conv.in_channels, 6, 6)
    out = model(x)
    assert_exact_zeros(model)
    for layer in sparse_layers(model):
        assert torch.equal(layer.weight[layer.mask], active[layer.name])
    assert torch.equal(out, masked_dense(model, x))
    assert bool(out.isfinite().all())


@given(conv_nets, densities, seeds, poison)
def test_non_finite_in_a_checkpoint_is_zeroed_on_load(net, density, seed, value):
    model = sparse_net(net, density, seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in sparse_layers(model):
        key = f"{layer.name}.parametrizations.weight.original"
        state[key].masked_fill_(~layer.mask, value)
    fresh = sparse_net(ConvNet(*_args(net)), density, seed + 1)
    fresh.load_state_dict(state)
    assert_exact_zeros(fresh)
    x = torch.randn(2, net.conv.in_channels, 6, 6)
    assert torch.equal(fresh(x), masked_dense(fresh, x))


def _args(net: ConvNet) -> tuple[int, int, int, int]:
    return net.conv.in_channels, net.conv.out_channels, net.conv.kernel_size[0], net.fc.out_features


class DenseUpdate(torch.optim.SGD):
    """An optimizer whose update is dense: it writes ``value`` everywhere it is told
    (a subclass of SGD: the exact-class rule must not trust it)."""

    def __init__(self, params, value: float) -> None:
        super().__init__(params, lr=0.1)
        self.value = value

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() > 1:
                    p.fill_(self.value)


@given(conv_nets, densities, seeds, poison)
def test_an_optimizer_writing_non_finite_values_everywhere_is_re_zeroed(net, density, seed, value):
    # Once any SGD exists, torch has wrapped SGD.step with the hook runner, so the
    # subclass's super().step() runs the step hooks a second time, nested inside its own.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    model = sparse_net(net, density, seed)
    optimizer = DenseUpdate(model.parameters(), value)
    sp.Static(model, optimizer)
    x = torch.randn(2, net.conv.in_channels, 6, 6)
    model(x).sum().backward()
    optimizer.step()
    assert_exact_zeros(model)  # right after the step, before any forward
    for layer in sparse_layers(model):  # active positions keep what the optimizer wrote
        assert_same(layer.weight[layer.mask], torch.full_like(layer.weight[layer.mask], value))


# ----------------------------------------------------------------------------- gradients


@given(conv_nets, densities, seeds, poison, st.booleans())
def test_non_finite_upstream_gradient_is_exactly_zero_off_mask(
    net, density, seed, value, functional
):
    model = sparse_net(net, density, seed)
    for layer in sparse_layers(model):
        g = torch.Generator().manual_seed(seed)
        upstream = torch.randn(layer.mask.shape, generator=g)
        upstream.view(-1)[::2] = value  # at active and inactive positions alike
        loss = (layer.module.weight * upstream).sum()  # dL/dW = upstream
        expected = torch.where(layer.mask, upstream, 0)
        if functional:
            (grad,) = torch.autograd.grad(loss, [layer.weight])
        else:
            loss.backward()
            grad = layer.weight.grad
        assert_same(grad, expected)  # NaN/Inf visible where active, exact 0 elsewhere
        if not functional:  # a second backward accumulates, still exact off the mask
            (layer.module.weight * upstream).sum().backward()
            assert_same(layer.weight.grad, expected + expected)


@given(conv_nets, densities, seeds, poison)
def test_a_non_finite_input_poisons_only_active_gradients(net, density, seed, value):
    model = sparse_net(net, density, seed)
    x = torch.randn(2, net.conv.in_channels, 6, 6)
    x[0, 0, 0, 0] = value
    model(x).sum().backward()
    for layer in sparse_layers(model):
        assert bool((layer.weight.grad[~layer.mask] == 0).all()), layer.name


# ------------------------------------------------------------------------ training steps

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),  # not trusted
}


@settings(max_examples=40)
@given(
    st.sampled_from(sorted(OPTIMIZERS)),
    st.sampled_from(["SET", "RigL"]),
    densities,
    seeds,
    st.lists(
        st.sampled_from(["clean", "poison_input", "poison_grad", "poison_weight"]),
        min_size=1,
        max_size=8,
    ),
    poison,
)
def test_training_steps_never_leave_a_non_zero_inactive_weight(
    name, method, density, seed, steps, value
):
    model = build_model(seed, density, mask_seed=seed)
    optimizer = OPTIMIZERS[name](model.parameters())
    getattr(sp, method)(model, optimizer, total_steps=40, update_interval=2)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite scores rank last
        for kind in steps:
            x = torch.randn(4, *IN_SHAPE, generator=g)
            y = torch.randint(N_CLASSES, (4,), generator=g)
            if kind == "poison_input":
                x[0, 0, 0, 0] = value
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if kind == "poison_grad":  # e.g. clip_grad_norm_ with a NaN total norm
                for p in model.parameters():
                    p.grad.mul_(value)
            if kind == "poison_weight":  # between backward and step
                with torch.no_grad():
                    for layer in sparse_layers(model):
                        layer.weight.masked_fill_(~layer.mask, value)
            optimizer.step()
            assert_exact_zeros(model)
            # A poisoned gradient (or weight, through weight decay) reaches the state at
            # active positions only (the user's to see); where inactive it stays 0.
            for layer in sparse_layers(model):
                for state in optimizer.state[layer.weight].values():
                    if isinstance(state, torch.Tensor) and state.shape == layer.mask.shape:
                        assert bool((state[~layer.mask] == 0).all()), (layer.name, kind)


def test_exact_optimizers_skip_the_post_step_pass(monkeypatch):
    """SGD with momentum, between updates: no re-zeroing pass over the weights after the
    step (the gradient is masked once, in place); every other step keeps it."""
    model = build_model(0, 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp.RigL(model, optimizer, total_steps=1000, update_interval=500)
    x, y = torch.randn(4, *IN_SHAPE), torch.randint(N_CLASSES, (4,))
    model(x)  # the first forward re-zeroes what sparsify's init wrote (the safety net)
    passes = helpers.record_zeroing_passes(monkeypatch)
    layers = list(sparse_layers(model))
    for step in range(4):
        passes.clear()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {id(layer.weight.grad) for layer in layers}
        optimizer.step()
        weights = [t for t in passes if any(t is layer.weight for layer in layers)]
        assert {id(t) for t in passes} == grads, step  # one in-place pass per gradient
        assert not weights, f"step {step}: the weights were re-zeroed after an exact step"
    assert_exact_zeros(model)

    passes.clear()
    for p in model.parameters():  # an edited gradient: masked again before the step
        p.grad.mul_(0.5)
    optimizer.step()
    assert [id(t) for t in passes] == [id(layer.weight.grad) for layer in layers]


# -------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_forward_selects_exact_zeros_without_graph_breaks(backend):
    torch._dynamo.reset()
    model = sparse_net(ConvNet(2, 3, 3, 4), 0.3, 0)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # a break raises
    x = torch.randn(2, 2, 6, 6)
    compiled(x)  # compile first: the eager re-zeroing must not be what saves it
    with torch.no_grad():
        for layer in sparse_layers(model):
            layer.weight.masked_fill_(~layer.mask, math.nan)
    out = compiled(x)
    expected = masked_dense(model, x)
    assert torch.equal(out, expected)
    for layer in sparse_layers(model):
        layer.weight.grad = None
    x[0, 0, 0, 0] = math.inf
    compiled(x).sum().backward()
    for layer in sparse_layers(model):
        assert bool((layer.weight.grad[~layer.mask] == 0).all()), layer.name


def test_compiled_training_with_a_scheduler_keeps_stored_zeros():
    torch._dynamo.reset()
    model = sparse_net(ConvNet(2, 3, 3, 4), 0.3, 0)
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp.SET(model, optimizer, total_steps=20, update_interval=2)
    x = torch.randn(2, 2, 6, 6)
    x[1, 1, 2, 2] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            optimizer.zero_grad()
            compiled(x).sum().backward()
            optimizer.step()
            for layer in sparse_layers(model):
                assert bool((layer.weight[~layer.mask] == 0).all()), layer.name


# ----------------------------------------------------------- effective_density only reads


class BNNet(nn.Module):
    """Conv-BN blocks down to 1x1 (BatchNorm in train mode refuses a batch of one there),
    dropout (draws from the RNG in train mode) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 4), nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))  # 1x1 for an 8x8 input
        return self.fc(self.drop(x.flatten(1)))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("modes", ["train", "eval", "mixed"])
def test_effective_density_leaves_the_model_and_rng_exactly_as_they_were(
    batch, modes, snapshot, assert_untouched
):
    torch.manual_seed(0)
    model = sp.sparsify(BNNet(), 0.3)
    model.train(modes != "eval")
    if modes == "mixed":
        model.bn2.eval()
        model.drop.eval()
    before_modes = [(name, m.training) for name, m in model.named_modules()]
    x = torch.randn(batch, 3, 8, 8)
    snap = snapshot(model)
    rng = torch.get_rng_state()

    seen = sp.effective_density(model, x)

    assert seen == {layer.name: layer.active / layer.numel for layer in sparse_layers(model)}
    assert [(name, m.training) for name, m in model.named_modules()] == before_modes
    assert_untouched(model, snap)  # BatchNorm statistics and counters included
    assert torch.equal(torch.get_rng_state(), rng)


def test_effective_density_on_a_timm_resnet18_at_batch_one(snapshot, assert_untouched):
    import timm

    torch.manual_seed(0)
    model = sp.sparsify(timm.create_model("resnet18", num_classes=4), 0.1)
    model.train()
    x = torch.randn(1, 3, 32, 32)
    snap, rng = snapshot(model), torch.get_rng_state()
    seen = sp.effective_density(model, x)
    assert set(seen) == {layer.name for layer in sparse_layers(model)}
    assert_untouched(model, snap)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


# ------------------------------------------- guards of the skipped post-step pass (new)


def test_loaded_optimizer_state_non_zero_off_mask_keeps_the_pass():
    """Momentum loaded non-zero where the mask is off would move those weights: the
    post-step pass must not be skipped on trust (a guard of the skip; the old code
    re-zeroed after every step)."""
    model = build_model(0, 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp.RigL(model, optimizer, total_steps=1000, update_interval=500)
    x, y = torch.randn(4, *IN_SHAPE), torch.randint(N_CLASSES, (4,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    state = optimizer.state_dict()
    for layer in sparse_layers(model):
        index = [id(p) for p in model.parameters()].index(id(layer.weight))
        state["state"][index]["momentum_buffer"] = torch.ones_like(layer.weight)
    optimizer.load_state_dict(state)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for layer in sparse_layers(model):  # right after the step, before any forward
            assert bool((layer.weight[~layer.mask] == 0).all()), layer.name


# ------------------------------- a non-finite value between topology updates (issue 19 §1)

ALGORITHM_KWARGS = {"granet": {"density": 0.1}, "gmp": {"density": 0.1}, "dsr": {"threshold": 0.02}}
EXACT_OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, amsgrad=True),
}


def run_with_fault(name, opt, seed, fault_at, fault, value, update_interval, steps=10):
    """Train ``steps`` steps; at step ``fault_at`` (between backward and step) write
    ``value`` into three inactive entries of the first layer's gradient (``fault="grad"``)
    or of its optimizer state (``fault="state"``). Returns the model, optimizer and the
    losses."""
    structure = "fan_in" if name == "srigl" else None
    density = 0.5 if name in ("gmp", "granet") else 0.3
    model = helpers.build_model(seed, density, mask_seed=seed, structure=structure)
    optimizer = EXACT_OPTIMIZERS[opt](model.parameters())
    kwargs = {} if name == "static" else {"update_interval": update_interval}
    sp.ALGORITHMS[name](
        model, optimizer, total_steps=40, **kwargs, **ALGORITHM_KWARGS.get(name, {})
    )
    layer = next(iter(sparse_layers(model)))
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = helpers.loss_of(model, helpers.batch(step))
        loss.backward()
        losses.append(loss.item())
        if step == fault_at and fault is not None:
            inactive = (~layer.mask).flatten().nonzero().flatten()[:3]
            target = layer.weight.grad
            if fault == "state":
                target = next(t for t in optimizer.state[layer.weight].values() if t.dim())
            with torch.no_grad():
                target.view(-1)[inactive] = value
        optimizer.step()
    return model, optimizer, losses


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(sp.ALGORITHMS)),
    st.sampled_from(sorted(EXACT_OPTIMIZERS)),
    seeds,
    st.integers(1, 8),
    st.sampled_from(["grad", "state"]),
    poison,
    st.sampled_from([3, 1000]),
)
def test_a_non_finite_inactive_entry_never_reaches_the_weights(
    name, opt, seed, fault_at, fault, value, update_interval
):
    """A NaN/Inf written into an inactive gradient or optimizer-state entry after the
    optimizer state was first seen clean (the fault of issue 19 §1): the run goes on
    bit for bit as the same run without the fault, with exact zeros where inactive in the
    weights and in every state tensor shaped like them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few updates at update_interval=1000
        clean, _, clean_losses = run_with_fault(
            name, opt, seed, fault_at, None, value, update_interval
        )
        model, optimizer, losses = run_with_fault(
            name, opt, seed, fault_at, fault, value, update_interval
        )
    assert losses == clean_losses
    assert all(math.isfinite(loss) for loss in losses)
    assert_exact_zeros(model)
    for layer, twin in zip(sparse_layers(model), sparse_layers(clean)):
        assert_same(layer.weight.detach(), twin.weight.detach())
        assert torch.equal(layer.mask, twin.mask)
        for state in helpers.weight_shaped_state(optimizer, layer).values():
            assert bool((state[~layer.mask] == 0).all()), layer.name


def test_a_nan_in_an_inactive_gradient_under_static_sgd_momentum():
    """The repro of issue 19 §1, as a user wrote it: loss NaN two steps later before."""
    torch.manual_seed(0)
    model = sp.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp.Static(model, optimizer)
    x = torch.randn(4, 8)
    model(x).sum().backward()
    optimizer.step()  # the state is seen clean here
    optimizer.zero_grad()
    model(x).sum().backward()
    layer = next(iter(sparse_layers(model)))
    rows, cols = (~layer.mask).nonzero()[:3].T
    layer.weight.grad[rows, cols] = math.nan
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        loss = model(x).sum()
        loss.backward()
        assert math.isfinite(loss.item())
    assert not optimizer.state[layer.weight]["momentum_buffer"].isnan().any()
