"""torch.compile: no graph break inside the library on any kind of step, bounded
recompiles, the same training as eager, and EMA copies whose stored weights stay zero.

The tests use the ``aot_eager`` backend (dynamo and AOT autograd, no code generation:
fast), except one that generates code with inductor on the small model (marked slow);
``benchmarks/bench_compile.py`` runs inductor on timm models.
"""

from __future__ import annotations

import helpers
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from timm.utils import ModelEmaV3

import sparse_param as sp

PRUNING = {"gmp", "granet"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with helpers.torch_threads(1):
        yield
    torch._dynamo.reset()


def build(algorithm: str):
    structure = {"structure": "fan_in"} if algorithm == "srigl" else {}
    model = helpers.build_model(density=0.5 if algorithm in PRUNING else 0.3, **structure)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = {} if algorithm == "static" else {"total_steps": 24, "update_interval": 3}
    if algorithm in PRUNING:
        kw["density"] = 0.2
    return model, optimizer, sp.ALGORITHMS[algorithm](model, optimizer, **kw)


def step(model, optimizer, i):
    optimizer.zero_grad()
    helpers.loss_of(model, helpers.batch(i)).backward()
    optimizer.step()


def test_no_graph_break_on_steady_capture_and_update_steps():
    model, optimizer, scheduler = build("rigl")
    x, _ = helpers.batch(0)
    kinds = {}
    for i in range(3):  # steps 1, 2 steady; step 3 captures and updates
        helpers.set_capture(model, scheduler.wants_dense_grad(scheduler.step_count + 1))
        kinds[scheduler.step_count + 1] = torch._dynamo.explain(model)(x)
        step(model, optimizer, i)
    assert [r["step"] for r in scheduler.history] == [3]
    kinds["after update"] = torch._dynamo.explain(model)(x)
    assert scheduler.wants_dense_grad(3)
    for kind, explained in kinds.items():
        assert explained.graph_break_count == 0, (kind, explained.break_reasons)
        assert explained.graph_count == 1, kind


@pytest.mark.parametrize("algorithm", sorted(sp.ALGORITHMS))
def test_compiled_training_equals_eager_one_graph_per_kind_of_step(algorithm):
    """Every algorithm: the compiled model trains like the eager one (same masks after
    every update, weights equal up to float rounding), the invariants hold after every
    step, and dynamo compiles one graph per kind of step (steady, dense-gradient capture:
    two for RigL/GraNet/GMP, one for SNFS which captures every step and for the others),
    none after the first update cycle."""
    eager, eager_opt, eager_sched = build(algorithm)
    model, optimizer, scheduler = build(algorithm)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    frames_after_first_cycle = None
    for i in range(12):
        step(eager, eager_opt, i)
        step(compiled, optimizer, i)
        helpers.check_invariants(model, optimizer)
        for name, mask in helpers.masks(eager).items():
            assert torch.equal(helpers.masks(model)[name], mask), f"step {i + 1}: {name}"
        for name, w in helpers.stored_weights(model).items():
            torch.testing.assert_close(w, helpers.stored_weights(eager)[name], rtol=1e-4, atol=1e-5)
        if i == 2:
            frames_after_first_cycle = counter.frame_count
    assert len(scheduler.history) == len(eager_sched.history)
    kinds = {scheduler.wants_dense_grad(s) for s in range(1, 13)}  # capture or not
    assert frames_after_first_cycle == counter.frame_count == len(kinds)
    assert [r["step"] for r in scheduler.history] == [r["step"] for r in eager_sched.history]


def test_compiled_dense_grad_accumulates_like_grad_and_restarts_after_zero_grad():
    model, _, _ = build("rigl")
    compiled = torch.compile(model, backend="aot_eager")
    helpers.set_capture(model, True)
    b1, b2 = helpers.batch(1), helpers.batch(2)
    helpers.loss_of(compiled, b1).backward()
    helpers.loss_of(compiled, b2).backward()  # accumulates, as .grad does
    expected = helpers.dense_grads(model, [b1, b2])
    for layer in sp.sparse_layers(model):
        torch.testing.assert_close(layer.parametrization.dense_grad, expected[layer.name])
        assert bool((layer.weight.grad[~layer.mask] == 0).all()), layer.name  # .grad masked
    model.zero_grad()  # the next backward starts afresh
    helpers.loss_of(compiled, b2).backward()
    expected = helpers.dense_grads(model, [b2])
    for layer in sp.sparse_layers(model):
        torch.testing.assert_close(layer.parametrization.dense_grad, expected[layer.name])
        torch.testing.assert_close(layer.weight.grad, expected[layer.name] * layer.mask)


def test_compiled_ema_copy_stores_exact_zeros_where_inactive():
    """timm's ModelEmaV3 lerps the EMA's stored weights; a compiled EMA forward
    multiplies by the mask instead of re-zeroing. The EMA's state dict (what it lerps
    from and what checkpoints save) is exactly zero where the EMA's mask is off."""
    model, optimizer, scheduler = build("set")
    ema = ModelEmaV3(model, decay=0.5)
    compiled, compiled_ema = (torch.compile(m, backend="aot_eager") for m in (model, ema))
    for i in range(12):
        step(compiled, optimizer, i)
        ema.update(model, step=i)
        with torch.no_grad():
            compiled_ema(helpers.batch(i)[0])
        state = ema.module.state_dict()
        for layer in sp.sparse_layers(ema.module):
            key = f"{layer.name}.parametrizations.weight"
            mask = state[f"{key}.0.mask"]
            assert torch.equal(mask, layer.mask)
            assert bool((state[f"{key}.original"][~mask] == 0).all()), (i, layer.name)
    assert len(scheduler.history) >= 3  # the masks moved under the EMA


@pytest.mark.slow
def test_inductor_training_equals_eager_with_exact_zeros():
    """Inductor's generated kernels (steady and capture graphs, a RigL update between):
    the same masks as eager after every step, weights within float rounding, the stored
    weights and their gradients exactly zero where inactive."""
    eager, eager_opt, _ = build("rigl")
    model, optimizer, scheduler = build("rigl")
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    for i in range(7):  # updates at steps 3 and 6
        step(eager, eager_opt, i)
        step(compiled, optimizer, i)
        helpers.check_invariants(model, optimizer)
        if not scheduler.is_update_step(i + 1):  # else .grad predates the new masks
            for layer in sp.sparse_layers(model):
                assert bool((layer.weight.grad[~layer.mask] == 0).all()), (i, layer.name)
        for name, mask in helpers.masks(eager).items():
            assert torch.equal(helpers.masks(model)[name], mask), f"step {i + 1}: {name}"
        for name, w in helpers.stored_weights(model).items():
            torch.testing.assert_close(w, helpers.stored_weights(eager)[name], rtol=1e-4, atol=1e-5)
    assert [r["step"] for r in scheduler.history] == [3, 6]
    assert counter.frame_count == 2  # steady and capture, none recompiled after an update
