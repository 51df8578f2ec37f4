"""The scheduler engine and its algorithms, one behaviour at a time (issue 3).

Step counting (attach / manual / remove, AMP-skipped steps, gradient accumulation), the
dense gradient's lifetime, non-finite values at an update, the update record, the
constructor's argument checks, checkpoints, the algorithm-specific rules (RigL's growth,
SNFS's redistribution, DSR's threshold, GMP's schedule) and the optimizer-state
handling (any state tensor shaped like the weight; optimizers whose update is dense).
"""

from __future__ import annotations

import math
import warnings

import helpers
import pytest
import torch
from torch import nn

import sparse_param as sp
from sparse_param.allocation import allocate, apportion
from sparse_param.layers import sparse_layers
from sparse_param.schedules import drop_fraction as drop_fraction_at


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


def sgd(model, **kw):
    kw = {"lr": 0.05, "momentum": 0.9, **kw}
    return torch.optim.SGD(model.parameters(), **kw)


def train(model, optimizer, steps, first=0, scheduler=None):
    """``steps`` plain training steps on batches ``first, first + 1, …``."""
    for i in range(first, first + steps):
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(i)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


class Recording:
    """Mixin recording, at every update, the dense gradients (after DDP averaging), the
    stored weights and the masks the update starts from."""

    def before_update(self):
        super().before_update()
        self.seen_grads = {
            layer.name: None
            if layer.parametrization.dense_grad is None
            else layer.parametrization.dense_grad.clone()
            for layer in self.layers
        }
        self.seen_weights = {layer.name: layer.weight.detach().clone() for layer in self.layers}
        self.seen_masks = {layer.name: layer.mask.clone() for layer in self.layers}
        self.seen_buffers = [b.clone() for b in getattr(self, "buffers", [])]


class RecordingRigL(Recording, sp.RigL):
    pass


class RecordingSNFS(Recording, sp.SNFS):
    pass


def make(algorithm: str, model, optimizer, **kw):
    """A scheduler of ``algorithm`` with small test defaults."""
    if algorithm == "static":
        return sp.Static(model, optimizer, **kw)
    kw = {"total_steps": 40, "update_interval": 3, **kw}
    if algorithm in ("gmp", "granet"):
        kw.setdefault("density", 0.1)
    return sp.ALGORITHMS[algorithm](model, optimizer, **kw)


def expect_counts(algorithm, scheduler, before, after):
    if algorithm in ("static", "set", "rigl"):
        assert after == before
    elif algorithm in ("snfs", "dsr"):
        assert sum(after.values()) == sum(before.values())
    else:
        assert list(after.values()) == scheduler.target_counts(scheduler.step_count)


# ------------------------------------------------------------------------ step counting


def test_attached_scheduler_counts_optimizer_steps():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.SET(model, optimizer, total_steps=100, update_interval=1000)
    train(model, optimizer, 7)
    assert scheduler.step_count == 7
    with pytest.raises(RuntimeError, match="attach=False"):
        scheduler.step()
    assert scheduler.step_count == 7


def test_manual_stepping_with_attach_false():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.SET(model, optimizer, total_steps=100, update_interval=3, attach=False)
    train(model, optimizer, 4)
    assert scheduler.step_count == 0  # optimizer steps alone are not counted
    assert scheduler.history == []
    old = helpers.masks(model)
    train(model, optimizer, 3, first=4, scheduler=scheduler)
    assert scheduler.step_count == 3
    assert [r["step"] for r in scheduler.history] == [3]
    assert any(not torch.equal(old[n], m) for n, m in helpers.masks(model).items())
    assert "attached=False" in repr(scheduler)


def test_remove_detaches_from_the_optimizer():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.RigL(model, optimizer, total_steps=100, update_interval=2)
    train(model, optimizer, 1)  # the next step is an update step: capture is armed
    assert all(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    old = helpers.masks(model)
    scheduler.remove()
    assert not any(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    train(model, optimizer, 6, first=1)
    assert scheduler.step_count == 1
    assert scheduler.history == []
    assert all(layer.parametrization.dense_grad is None for layer in scheduler.layers)
    for name, mask in helpers.masks(model).items():
        assert torch.equal(mask, old[name])
    assert "attached=False" in repr(scheduler)
    scheduler.remove()  # idempotent
    # a removed scheduler no longer rides along in the optimizer's state dict
    assert "sparse_param" not in optimizer.state_dict()


def test_amp_skipped_step_is_not_counted_and_leaves_no_stale_dense_grad():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = RecordingRigL(model, optimizer, total_steps=100, update_interval=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def scaled_step(data, poison=False):
        optimizer.zero_grad()
        loss = helpers.loss_of(model, data)
        if poison:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for i in range(2):
        scaled_step(helpers.batch(i))
    assert scheduler.step_count == 2
    weights = helpers.stored_weights(model)
    scaled_step(helpers.batch(2), poison=True)  # the step before the update: skipped
    assert scheduler.step_count == 2, "a step the scaler skipped was counted"
    assert scheduler.history == []
    assert scaler.get_scale() == 2.0**7
    for name, w in helpers.stored_weights(model).items():
        assert torch.equal(w, weights[name])

    data = helpers.batch(3)
    scale = scaler.get_scale()
    expected = helpers.dense_grads(model, [data])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no non-finite score used
        scaled_step(data)
    assert scheduler.step_count == 3
    assert [r["step"] for r in scheduler.history] == [3]
    for name, grad in scheduler.seen_grads.items():
        assert bool(torch.isfinite(grad).all()), f"{name}: the skipped step's inf was kept"
        # the gradient of this step's batch alone (scaled by the loss scale or not)
        assert _close_up_to_scale(grad, expected[name], scale), name
    assert all(layer.parametrization.dense_grad is None for layer in scheduler.layers)


def _close_up_to_scale(actual, unscaled, scale) -> bool:
    """``actual`` is ``unscaled`` or ``scale · unscaled``: whether the captured dense
    gradient is unscaled is the engine's choice (RigL's ranking does not depend on it)."""
    return any(torch.allclose(actual, s * unscaled, rtol=1e-5, atol=1e-6 * s) for s in (1.0, scale))


def test_amp_skipped_step_is_not_folded_into_snfs_momentum():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.SNFS(model, optimizer, total_steps=100, update_interval=50, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    train(model, optimizer, 2)
    before = [b.clone() for b in scheduler.buffers]

    optimizer.zero_grad()
    scaler.scale(helpers.loss_of(model, helpers.batch(2)) * math.inf).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scheduler.step_count == 2

    data = helpers.batch(3)
    scale = scaler.get_scale()
    expected = helpers.dense_grads(model, [data])
    optimizer.zero_grad()
    scaler.scale(helpers.loss_of(model, data)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scheduler.step_count == 3
    for layer, old, new in zip(scheduler.layers, before, scheduler.buffers):
        # m = β·m + g of the one real step (g scaled by the loss scale or not)
        assert _close_up_to_scale(new - 0.5 * old, expected[layer.name], scale), layer.name


def test_gradient_accumulation_counts_optimizer_steps_and_sums_dense_grads():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = RecordingRigL(model, optimizer, total_steps=100, update_interval=2)
    micro = 3
    for step in range(4):
        batches = [helpers.batch(10 * step + k) for k in range(micro)]
        expected = helpers.dense_grads(model, batches)
        optimizer.zero_grad()
        for data in batches:
            helpers.loss_of(model, data).backward()
        optimizer.step()
        assert scheduler.step_count == step + 1
        if scheduler.step_count % 2 == 0:
            assert scheduler.history[-1]["step"] == scheduler.step_count
            for name, grad in scheduler.seen_grads.items():
                torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in scheduler.history] == [2, 4]


def test_rigl_dense_grad_only_on_the_step_before_an_update():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.RigL(model, optimizer, total_steps=40, update_interval=4, stop=0.75)
    update_steps = [s for s in range(1, 41) if s % 4 == 0 and s <= 30]
    armed_steps = []
    for i in range(40):
        upcoming = scheduler.step_count + 1
        armed = [layer.parametrization.capture_dense_grad for layer in scheduler.layers]
        assert len(set(armed)) == 1
        if armed[0]:
            armed_steps.append(upcoming)
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(i)).backward()
        for layer in scheduler.layers:
            grad = layer.parametrization.dense_grad
            if armed[0]:
                assert grad is not None and grad.shape == layer.weight.shape
            else:
                assert grad is None, f"dense gradient kept at step {upcoming}"
        optimizer.step()
        assert all(layer.parametrization.dense_grad is None for layer in scheduler.layers)
    assert armed_steps == update_steps
    assert [r["step"] for r in scheduler.history] == update_steps


def test_update_without_a_captured_dense_grad_raises():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.RigL(model, optimizer, total_steps=100, update_interval=50)
    train(model, optimizer, 2)
    with pytest.raises(RuntimeError, match="no dense gradient"):
        scheduler.update()


# --------------------------------------------------------------------- non-finite values

NONFINITE = (math.nan, math.inf, -math.inf)


@pytest.mark.parametrize("where", ["weights", "grads"])
@pytest.mark.parametrize("algorithm", ["set", "rigl", "snfs", "dsr", "granet"])
def test_non_finite_values_at_an_update(algorithm, where):
    density = 0.5 if algorithm == "granet" else 0.3
    model = helpers.build_model(density=density)
    optimizer = sgd(model)
    extra = {"threshold": 0.05} if algorithm == "dsr" else {}
    scheduler = make(algorithm, model, optimizer, update_interval=2, **extra)
    train(model, optimizer, 1)
    before = helpers.counts(model)
    fc1 = next(layer for layer in scheduler.layers if layer.name == "fc1")
    active = fc1.mask.flatten().nonzero().squeeze(1)
    inactive = (~fc1.mask).flatten().nonzero().squeeze(1)
    poisoned = active[:3]

    optimizer.zero_grad()
    helpers.loss_of(model, helpers.batch(1)).backward()
    with torch.no_grad():
        if where == "weights":
            for i, value in zip(poisoned, NONFINITE):
                fc1.weight.view(-1)[i] = value
        else:
            for i, value in zip(poisoned, NONFINITE):
                fc1.weight.grad.view(-1)[i] = value
            for i, value in zip(inactive[:3], NONFINITE):
                fc1.weight.grad.view(-1)[i] = value
            for layer in scheduler.layers:
                dense = layer.parametrization.dense_grad
                if dense is not None:
                    for i, value in zip((~layer.mask).flatten().nonzero()[:3, 0], NONFINITE):
                        dense.view(-1)[i] = value
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step()
    assert scheduler.step_count == 2 and len(scheduler.history) == 1
    after = helpers.counts(model)
    expect_counts(algorithm, scheduler, before, after)
    # the non-finite weights were dropped first; nothing non-finite is left anywhere
    assert not bool(fc1.mask.flatten()[poisoned].any())
    for layer in scheduler.layers:
        assert bool(torch.isfinite(layer.weight).all()), layer.name
    helpers.check_invariants(model, optimizer)
    # training goes on (SNFS keeps the non-finite momentum and keeps warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(model, optimizer, 4, first=2)
    helpers.check_invariants(model, optimizer)


# ------------------------------------------------------------------------ update record


@pytest.mark.parametrize("algorithm", ["set", "rigl", "snfs", "dsr", "gmp", "granet"])
def test_history_records_what_each_update_did(algorithm):
    density = 0.5 if algorithm in ("gmp", "granet") else 0.3
    structure = "fan_in" if algorithm == "srigl" else None
    model = helpers.build_model(density=density, structure=structure)
    optimizer = sgd(model)
    extra = {"threshold": 0.05} if algorithm == "dsr" else {}
    scheduler = make(algorithm, model, optimizer, total_steps=30, update_interval=3, **extra)
    for i in range(30):
        old = helpers.masks(model)
        n = len(scheduler.history)
        train(model, optimizer, 1, first=i)
        if len(scheduler.history) == n:
            continue
        record = scheduler.history[-1]
        keys = {"step", "drop_fraction", "pruned", "grown", "density", "itop_rate", "egf"}
        assert set(record) == keys
        assert record["egf"] > 0  # the gradients the update saw (tests/test_gradflow.py)
        assert record["step"] == scheduler.step_count == i + 1
        assert record["drop_fraction"] == pytest.approx(scheduler.current_drop_fraction())
        pruned, grown = helpers.mask_changes(old, helpers.masks(model))
        assert record["pruned"] == {name: int(p.sum()) for name, p in pruned.items()}
        assert record["grown"] == {name: int(g.sum()) for name, g in grown.items()}
        assert record["density"] == sp.density(model)
        assert record["itop_rate"] == sp.itop_rate(model)
    assert len(scheduler.history) >= 3


def test_rigl_record_follows_the_cosine_schedule():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.RigL(model, optimizer, total_steps=30, update_interval=3, drop_fraction=0.4)
    train(model, optimizer, 30)
    assert scheduler.stop_step == 22
    assert [r["step"] for r in scheduler.history] == [3, 6, 9, 12, 15, 18, 21]
    for record in scheduler.history:
        fraction = drop_fraction_at(record["step"], 0.4, 22, "cosine")
        assert record["drop_fraction"] == pytest.approx(fraction)
    first = scheduler.history[0]
    layers = {layer.name: layer for layer in sparse_layers(model)}
    for name, n in first["pruned"].items():  # per layer: round(α_t · active)
        active = layers[name].active
        numel = layers[name].numel
        assert n == min(round(first["drop_fraction"] * active), active - 1, numel - active)
        assert first["grown"][name] == n
    rates = [r["itop_rate"] for r in scheduler.history]
    assert rates == sorted(rates) and rates[-1] > sp.density(model)


def test_repr():
    model = helpers.build_model(density=0.3)
    optimizer = sgd(model)
    scheduler = sp.RigL(model, optimizer, total_steps=100, update_interval=5)
    text = repr(scheduler)
    assert text.startswith("RigL(")
    for part in (
        "layers=4",
        "step=0/100",
        "update_interval=5",
        "drop_fraction=0.3 (cosine)",
        "stop=0.75",
        f"density={sp.density(model):.4f}",
        f"itop_rate={sp.density(model):.4f}",
        "attached=True",
    ):
        assert part in text, part
    train(model, optimizer, 5)
    assert "step=5/100" in repr(scheduler)
    assert f"itop_rate={sp.itop_rate(model):.4f}" in repr(scheduler)
    scheduler.remove()
    assert "attached=False" in repr(scheduler)
    model2 = helpers.build_model()
    text = repr(sp.Static(model2, sgd(model2), attach=False))
    assert text.startswith("Static(") and "step=0" in text and "attached=False" in text


# ------------------------------------------------------------------ constructor checks


def _hooks(optimizer) -> int:
    return sum(
        len(getattr(optimizer, name, {}))
        for name in (
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
        )
    )


def _assert_untouched(model, optimizer, state, armed):
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert _hooks(optimizer) == 0, "a hook was left on the optimizer"
    assert "sparse_param" not in optimizer.state_dict()
    layers = list(sparse_layers(model))
    assert [layer.parametrization.capture_dense_grad for layer in layers] == armed
    # and nothing acts behind the scenes: training leaves the masks alone
    old = helpers.masks(model)
    train(model, optimizer, 4)
    assert all(torch.equal(m, old[n]) for n, m in helpers.masks(model).items())
    assert all(layer.parametrization.dense_grad is None for layer in layers)


BAD_ARGUMENTS = {
    "total_steps=0": (lambda m, o: sp.SET(m, o, total_steps=0), "total_steps"),
    "total_steps=-3": (lambda m, o: sp.RigL(m, o, total_steps=-3), "total_steps"),
    "total_steps=2.5": (lambda m, o: sp.SET(m, o, total_steps=2.5), "total_steps"),
    "update_interval=0": (
        lambda m, o: sp.RigL(m, o, total_steps=10, update_interval=0),
        "update_interval",
    ),
    "drop_fraction=1.5": (
        lambda m, o: sp.SET(m, o, total_steps=10, drop_fraction=1.5),
        "drop_fraction",
    ),
    "drop_fraction=-0.1": (
        lambda m, o: sp.RigL(m, o, total_steps=10, drop_fraction=-0.1),
        "drop_fraction",
    ),
    "drop_fraction=nan": (
        lambda m, o: sp.SNFS(m, o, total_steps=10, drop_fraction=math.nan),
        "drop_fraction",
    ),
    "drop_schedule": (
        lambda m, o: sp.RigL(m, o, total_steps=10, drop_schedule="exponential"),
        "drop_schedule",
    ),
    "stop=1.5": (lambda m, o: sp.SET(m, o, total_steps=10, stop=1.5), "stop"),
    "start>stop": (lambda m, o: sp.SET(m, o, total_steps=10, start=0.9, stop=0.5), "start"),
    "snfs momentum": (lambda m, o: sp.SNFS(m, o, total_steps=10, momentum=1.0), "momentum"),
    "dsr threshold": (lambda m, o: sp.DSR(m, o, total_steps=10, threshold=0.0), "threshold"),
    "dsr target_pruned": (
        lambda m, o: sp.DSR(m, o, total_steps=10, target_pruned=0),
        "target_pruned",
    ),
    "gmp density above the model's": (
        lambda m, o: sp.GMP(m, o, total_steps=10, density=0.5),
        "density",
    ),
    "gmp distribution": (
        lambda m, o: sp.GMP(m, o, total_steps=10, density=0.1, distribution="bogus"),
        "distribution",
    ),
    "granet density": (lambda m, o: sp.GraNet(m, o, total_steps=10, density=0.9), "density"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_and_leave_things_untouched(case):
    build, argument = BAD_ARGUMENTS[case]
    model = helpers.build_model(density=0.3)
    optimizer = sgd(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=argument):
        build(model, optimizer)
    _assert_untouched(model, optimizer, state, armed=[False] * 4)


def test_weights_replaced_after_the_scheduler_are_refused_at_the_first_step():
    """fully_shard (or any wrapper that swaps in new Parameters) after the optimizer was
    built leaves it stepping the old tensors: the first step says so instead of training
    nothing."""
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.SET(model, optimizer, total_steps=100)
    weights = model.fc2.parametrizations.weight
    weights.original = torch.nn.Parameter(weights.original.detach().clone())
    optimizer.zero_grad()
    helpers.loss_of(model, helpers.batch(0)).backward()
    words = r"no longer holds the weights of sparse layers \['fc2'\].*fully_shard"
    with pytest.raises(RuntimeError, match=words):
        optimizer.step()
    assert scheduler.step_count == 0


def test_optimizer_that_does_not_hold_the_weights():
    model = helpers.build_model()
    other = helpers.build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = sgd(other)
    with pytest.raises(ValueError, match="optimizer does not hold the weights"):
        sp.RigL(model, optimizer, total_steps=10)
    assert _hooks(optimizer) == 0
    # some weights missing: the message names them
    partial = torch.optim.SGD(
        [p for n, p in model.named_parameters() if not n.startswith("fc2.")], lr=0.1
    )
    with pytest.raises(ValueError, match="fc2"):
        sp.SET(model, partial, total_steps=10)
    _assert_untouched(model, partial, state, armed=[False] * 4)


def test_model_that_is_not_sparsified():
    torch.manual_seed(0)
    model = helpers.TinyNet()
    optimizer = sgd(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for cls in (sp.SET, sp.RigL, sp.SNFS):
        with pytest.raises(ValueError, match="sparsify"):
            cls(model, optimizer, total_steps=10)
    with pytest.raises(ValueError, match="sparsify"):
        sp.Static(model, optimizer)
    assert _hooks(optimizer) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# --------------------------------------------------------------------------- checkpoints


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("algorithm", sorted(sp.ALGORITHMS))
def test_state_dict_loads_with_weights_only(algorithm, tmp_path):
    density = 0.5 if algorithm in ("gmp", "granet") else 0.3
    structure = "fan_in" if algorithm == "srigl" else None
    model = helpers.build_model(density=density, structure=structure)
    optimizer = sgd(model)
    scheduler = make(algorithm, model, optimizer)
    train(model, optimizer, 10)
    torch.save(
        {"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()},
        tmp_path / "ckpt.pt",
    )
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    _assert_same(scheduler.state_dict(), loaded["scheduler"])
    # the scheduler's state rides along in the optimizer's state dict as well
    _assert_same(scheduler.state_dict(), loaded["optimizer"]["sparse_param"])

    for source in ("scheduler", "optimizer"):
        fresh = helpers.build_model(density=density, mask_seed=99, structure=structure)
        fresh_optimizer = sgd(fresh)
        fresh_scheduler = make(algorithm, fresh, fresh_optimizer)
        if source == "scheduler":
            fresh_scheduler.load_state_dict(loaded["scheduler"])
        else:
            fresh_optimizer.load_state_dict(loaded["optimizer"])
        _assert_same(scheduler.state_dict(), fresh_scheduler.state_dict(), source)
        assert fresh_scheduler.step_count == 10


# ------------------------------------------------------------------- algorithm rules


def test_rigl_drops_smallest_magnitude_and_grows_largest_dense_gradient():
    model = helpers.build_model(density=0.2)
    optimizer = sgd(model)
    scheduler = RecordingRigL(model, optimizer, total_steps=40, update_interval=3)
    for i in range(30):
        old = helpers.masks(model)
        data = helpers.batch(i)
        expected = helpers.dense_grads(model, [data])
        n = len(scheduler.history)
        optimizer.zero_grad()
        helpers.loss_of(model, data).backward()
        optimizer.step()
        if len(scheduler.history) == n:
            continue
        pruned, grown = helpers.mask_changes(old, helpers.masks(model))
        for name in old:
            grad = scheduler.seen_grads[name]
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6)
            weight = scheduler.seen_weights[name].abs()
            kept = old[name] & ~pruned[name]
            if pruned[name].any():
                assert weight[pruned[name]].max() <= weight[kept].min(), name
            passed_over = ~old[name] & ~grown[name]
            if grown[name].any() and passed_over.any():
                assert grad.abs()[grown[name]].min() >= grad.abs()[passed_over].max(), name
    assert len(scheduler.history) >= 5


def test_same_seed_same_masks_and_the_seed_matters():
    def run(seed):
        model = helpers.build_model(density=0.2)
        optimizer = sgd(model)
        sp.SET(model, optimizer, total_steps=30, update_interval=3, seed=seed)
        train(model, optimizer, 12)
        return helpers.masks(model)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_snfs_needs_nothing_from_the_optimizer_and_redistributes():
    model = helpers.build_model(density=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum, no state
    scheduler = RecordingSNFS(model, optimizer, total_steps=60, update_interval=4)
    total = sum(helpers.counts(model).values())
    moved = False
    for i in range(40):
        old = helpers.masks(model)
        n = len(scheduler.history)
        train(model, optimizer, 1, first=i)
        assert sum(helpers.counts(model).values()) == total
        if len(scheduler.history) == n:
            continue
        record = scheduler.history[-1]
        moved |= record["pruned"] != record["grown"]
        names = list(old)
        mean_momentum = [
            float(buf.abs()[scheduler.seen_masks[name]].mean())
            for buf, name in zip(scheduler.seen_buffers, names)
        ]
        capacity = [int((~old[name]).sum()) for name in names]
        expected = apportion(
            sum(record["pruned"].values()), mean_momentum, [0] * len(names), capacity
        )
        assert [record["grown"][name] for name in names] == expected
        _, grown = helpers.mask_changes(old, helpers.masks(model))
        for buf, name in zip(scheduler.seen_buffers, names):
            passed_over = ~old[name] & ~grown[name]
            if grown[name].any() and passed_over.any():
                assert buf.abs()[grown[name]].min() >= buf.abs()[passed_over].max(), name
    assert moved, "SNFS never moved weights between layers"
    assert len(scheduler.history) >= 5
    for layer in scheduler.layers:
        assert helpers.weight_shaped_state(optimizer, layer) == {}


def test_snfs_momentum_is_that_of_the_dense_gradient():
    model = helpers.build_model()
    optimizer = sgd(model)
    scheduler = sp.SNFS(model, optimizer, total_steps=100, update_interval=50, momentum=0.8)
    expected = {layer.name: torch.zeros_like(layer.weight) for layer in scheduler.layers}
    for i in range(3):
        grads = helpers.dense_grads(model, [helpers.batch(i)])
        for name in expected:
            expected[name] = 0.8 * expected[name] + grads[name]
        train(model, optimizer, 1, first=i)
    for layer, buffer in zip(scheduler.layers, scheduler.buffers):
        torch.testing.assert_close(buffer, expected[layer.name], rtol=1e-5, atol=1e-6)
        # dense: inactive positions carry momentum too
        if (~layer.mask).any():
            assert bool((buffer[~layer.mask] != 0).any()), layer.name


def _dsr_with_small_weights(n_small: int, target: int):
    model = helpers.build_model(density=0.3)
    optimizer = sgd(model)
    scheduler = sp.DSR(
        model, optimizer, total_steps=100, update_interval=1000, threshold=0.01,
        target_pruned=target,
    )  # fmt: skip
    small = {}
    with torch.no_grad():
        for layer in scheduler.layers:
            layer.weight[layer.mask] = 1.0
        # spread the small weights over the layers, round robin
        actives = [layer.mask.flatten().nonzero().squeeze(1) for layer in scheduler.layers]
        taken = [0] * len(actives)
        for k in range(n_small):
            i = k % len(actives)
            index = actives[i][taken[i]]
            taken[i] += 1
            scheduler.layers[i].weight.view(-1)[index] = 1e-4
            small.setdefault(scheduler.layers[i].name, []).append(int(index))
    return model, scheduler, small


@pytest.mark.parametrize(
    "n_small, target, factor",
    [(20, 10, 0.5), (12, 10, 0.5), (11, 10, 1.0), (10, 10, 1.0), (9, 10, 1.0), (8, 10, 2.0),
     (0, 10, 2.0)],
)  # fmt: skip
def test_dsr_prunes_below_the_threshold_and_adapts_it(n_small, target, factor):
    model, scheduler, small = _dsr_with_small_weights(n_small, target)
    old = helpers.masks(model)
    before = helpers.counts(model)
    record = scheduler.update()
    assert scheduler.threshold == pytest.approx(0.01 * factor)
    pruned, grown = helpers.mask_changes(old, helpers.masks(model))
    for name in old:
        assert sorted(pruned[name].flatten().nonzero().squeeze(1).tolist()) == sorted(
            small.get(name, [])
        ), name
    assert sum(record["pruned"].values()) == n_small
    assert sum(helpers.counts(model).values()) == sum(before.values())
    # regrowth split in proportion to each layer's surviving weights, at zero
    names = list(old)
    surviving = [before[n] - record["pruned"][n] for n in names]
    capacity = [int((~old[n]).sum()) for n in names]
    expected = apportion(n_small, surviving, [0] * len(names), capacity)
    assert [record["grown"][n] for n in names] == expected
    for layer in scheduler.layers:
        assert bool((layer.weight[grown[layer.name]] == 0).all())


def test_dsr_interval_doubles():
    model = helpers.build_model(density=0.3)
    optimizer = sgd(model)
    scheduler = sp.DSR(model, optimizer, total_steps=64, update_interval=2, stop=1.0)
    train(model, optimizer, 64)
    expected = list(range(2, 16, 2)) + list(range(16, 32, 4)) + list(range(32, 48, 8)) + [48, 64]
    assert [r["step"] for r in scheduler.history] == expected


def test_dsr_in_a_nearly_dense_model_prunes_no_more_than_can_regrow():
    model = helpers.build_model(density=0.9)
    optimizer = sgd(model)
    scheduler = sp.DSR(model, optimizer, total_steps=20, update_interval=2, threshold=0.5)
    before = helpers.counts(model)
    room = sum(layer.numel - layer.active for layer in scheduler.layers)
    train(model, optimizer, 6)
    assert [r["step"] for r in scheduler.history] == [2, 4]
    assert sum(scheduler.history[0]["pruned"].values()) == room  # more were below H
    assert sum(helpers.counts(model).values()) == sum(before.values())
    helpers.check_invariants(model, optimizer)


@pytest.mark.parametrize("algorithm", ["gmp", "granet"])
def test_gradual_pruning_reaches_the_final_allocation_exactly_at_stop(algorithm):
    model = helpers.build_model(density=1.0)
    optimizer = sgd(model)
    scheduler = make(
        algorithm, model, optimizer, total_steps=40, update_interval=4, stop=0.75,
        start=0.1, density=0.1,
    )  # fmt: skip
    shapes = {layer.name: tuple(layer.mask.shape) for layer in scheduler.layers}
    final = allocate(shapes, 0.1, "erk")
    previous = helpers.counts(model)
    for i in range(40):
        n = len(scheduler.history)
        train(model, optimizer, 1, first=i)
        now = helpers.counts(model)
        if len(scheduler.history) > n:
            assert list(now.values()) == scheduler.target_counts(scheduler.step_count)
            assert all(now[k] <= previous[k] for k in now)
        else:
            assert now == previous
        if scheduler.step_count == 30:
            assert now == final, "final allocation not reached at stop"
        previous = now
    assert [r["step"] for r in scheduler.history] == [8, 12, 16, 20, 24, 28, 30]
    assert helpers.counts(model) == final
    assert scheduler.target_counts(0) == [layer.numel for layer in scheduler.layers]
    helpers.check_invariants(model, optimizer)


# ---------------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("kind", sorted(helpers.OPTIMIZERS))
def test_weight_shaped_optimizer_state_is_zeroed_at_pruned_and_grown(kind):
    model = helpers.build_model(density=0.3)
    optimizer = helpers.OPTIMIZERS[kind](model)
    scheduler = sp.SET(model, optimizer, total_steps=100, update_interval=1000, drop_fraction=0.5)
    train(model, optimizer, 3)
    fc1 = next(layer for layer in scheduler.layers if layer.name == "fc1")
    state = optimizer.state[fc1.weight]
    state["custom"] = torch.ones_like(fc1.weight)  # a state tensor of our own
    state["scalar"] = torch.tensor(3.0)
    state["other_shape"] = torch.ones(7)
    before = {
        layer.name: {k: v.clone() for k, v in helpers.weight_shaped_state(optimizer, layer).items()}
        for layer in scheduler.layers
    }
    assert "custom" in before["fc1"] and len(before["fc1"]) >= 2  # the optimizer's own too
    old = helpers.masks(model)
    scheduler.update()
    pruned, grown = helpers.mask_changes(old, helpers.masks(model))
    for layer in scheduler.layers:
        stable = old[layer.name] & layer.mask
        for key, value in helpers.weight_shaped_state(optimizer, layer).items():
            assert bool((value[~stable] == 0).all()), (layer.name, key)
            assert torch.equal(value[stable], before[layer.name][key][stable]), (layer.name, key)
    assert pruned["fc1"].any() and grown["fc1"].any()
    assert torch.equal(state["custom"], (old["fc1"] & fc1.mask).float())
    assert state["scalar"].item() == 3.0
    assert torch.equal(state["other_shape"], torch.ones(7))


class AddConstant(torch.optim.Optimizer):
    """A dense update: adds ``c`` to every weight and keeps a dense state tensor."""

    def __init__(self, params, c: float = 0.01):
        super().__init__(params, {"c": c})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["trace"] = state.get("trace", torch.zeros_like(p)) + 1.0
                p.add_(group["c"])


@pytest.mark.parametrize("attach", [True, False])
@pytest.mark.parametrize("algorithm", ["static", "set"])
def test_dense_update_optimizer_cannot_revive_pruned_weights(algorithm, attach):
    model = helpers.build_model(density=0.3)
    optimizer = AddConstant(model.parameters())
    kw = {} if algorithm == "static" else {"total_steps": 20, "update_interval": 3}
    scheduler = make(algorithm, model, optimizer, attach=attach, **kw)
    for i in range(9):
        old = helpers.masks(model)
        n = len(scheduler.history)
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(i)).backward()
        optimizer.step()
        if not attach:
            scheduler.step()
        # stored weights first: the scheduler (not the next forward) re-zeroed them
        for layer in scheduler.layers:
            assert bool((layer.weight[~layer.mask] == 0).all()), layer.name
            kept = old[layer.name] & layer.mask  # grown ones start at 0
            assert bool((layer.weight[kept] != 0).all()), layer.name
        if len(scheduler.history) > n:
            for layer in scheduler.layers:
                stable = old[layer.name] & layer.mask
                trace = optimizer.state[layer.weight]["trace"]
                assert bool((trace[~stable] == 0).all()), layer.name
        helpers.check_invariants(model)
    assert scheduler.step_count == 9
    assert len(scheduler.history) == (0 if algorithm == "static" else 3)


# ---------------------------------------------------------------------------- known bugs


class Twice(nn.Module):
    """One Linear applied twice in a forward (weight reuse, as in a recurrent cell)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x)))


def test_dense_grad_of_a_layer_used_twice_is_the_sum_over_uses():
    torch.manual_seed(0)
    model = sp.sparsify(Twice(), 0.5, seed=1)
    layer = next(sparse_layers(model))
    layer.parametrization.capture_dense_grad = True
    x = torch.randn(3, 6)
    model(x).sum().backward()
    twin = Twice()
    twin.load_state_dict(sp.dense_state_dict(model.state_dict()))
    twin(x).sum().backward()
    torch.testing.assert_close(layer.parametrization.dense_grad, twin.lin.weight.grad)
