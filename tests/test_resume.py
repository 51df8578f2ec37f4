"""Resuming mid-run is bit-identical to never stopping (docs/architecture.md, invariants 7).

Train N steps uninterrupted; separately train k steps, save model / optimizer /
scheduler state dicts with ``torch.save``, load them with ``weights_only=True`` into a
freshly built model of the same architecture (initialized from another seed and
sparsified with *another* mask seed, so the masks can only come from the checkpoint),
a fresh optimizer and a fresh scheduler, and continue to N. Batches are a function of
the step index only. On CPU the masks, ``ever_active``, the stored weights, the
optimizer state and the scheduler's record must be bit-identical (``torch.equal``).
"""

from __future__ import annotations

import helpers
import pytest
import torch

import sparse_param as sp

N = 24
ALGORITHMS = ["set", "rigl", "snfs", "dsr", "granet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


def build(algorithm: str, optimizer_kind: str, init_seed: int, mask_seed: int):
    density = 0.5 if algorithm == "granet" else 0.2
    model = helpers.build_model(init_seed, density, mask_seed)
    optimizer = helpers.OPTIMIZERS[optimizer_kind](model)
    kw = dict(total_steps=N, update_interval=3, seed=5)
    if algorithm == "granet":
        kw["density"] = 0.1
    if algorithm == "dsr":
        kw["threshold"] = 0.02
    scheduler = sp.ALGORITHMS[algorithm](model, optimizer, **kw)
    return model, optimizer, scheduler


def run(model, optimizer, steps):
    for step in steps:
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(1000 + step)).backward()
        optimizer.step()


def assert_identical(a, b):
    (model_a, opt_a, sched_a), (model_b, opt_b, sched_b) = a, b
    assert sched_a.step_count == sched_b.step_count == N
    assert sched_a.history == sched_b.history
    for name, mask in helpers.masks(model_a).items():
        assert torch.equal(mask, helpers.masks(model_b)[name]), f"{name}: masks differ"
    for name, ever in helpers.ever_actives(model_a).items():
        assert torch.equal(ever, helpers.ever_actives(model_b)[name]), f"{name}: ever_active"
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"{key} differs"
    for layer_a, layer_b in zip(sched_a.layers, sched_b.layers):
        sa = helpers.weight_shaped_state(opt_a, layer_a)
        sb = helpers.weight_shaped_state(opt_b, layer_b)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{layer_a.name}: optimizer {key!r}"


@pytest.mark.parametrize("via", ["scheduler", "optimizer"])
@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("k", [8, 9])  # the step before an update (capture armed), an update
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_is_bit_identical(algorithm, k, optimizer_kind, via, tmp_path):
    reference = build(algorithm, optimizer_kind, init_seed=0, mask_seed=0)
    run(reference[0], reference[1], range(N))
    assert len(reference[2].history) >= 3  # the run did change the topology

    model, optimizer, scheduler = build(algorithm, optimizer_kind, init_seed=0, mask_seed=0)
    run(model, optimizer, range(k))
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if via == "scheduler":
        checkpoint["scheduler"] = scheduler.state_dict()
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    del model, optimizer, scheduler

    loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed = build(algorithm, optimizer_kind, init_seed=1, mask_seed=12345)
    model, optimizer, scheduler = resumed
    fresh_masks = helpers.masks(model)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])  # also restores the scheduler's state
    if via == "scheduler":
        scheduler.load_state_dict(loaded["scheduler"])
    assert scheduler.step_count == k
    assert any(not torch.equal(fresh_masks[n], m) for n, m in helpers.masks(model).items())
    helpers.check_invariants(model, optimizer)
    run(model, optimizer, range(k, N))
    assert_identical(reference, resumed)
