"""Sparse compute (``sparsify(..., compute="sparse")``) equals the masked-dense path.

Properties over random shapes, densities, batches and dtypes: the output, the input
gradient and the weight and bias gradients match a dense-mode twin within float
tolerance, and the weight gradient is exactly zero at inactive positions. The CSR
indices follow the mask through topology updates and ``load_state_dict`` (rebuilt
once per mask change, never per step); gradient captures for RigL are exact; training,
resume, finalize, to_sparse, deep copies and DDP keep working.
"""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparse_param as sp
from sparse_param.kernels import (
    AUTO_RULES,
    auto_picks_sparse,
    compute_modes,
    set_compute,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


def twins(model: nn.Module, density: float, seed: int = 0):
    """The same sparse model twice: dense-kernel mode and sparse mode."""
    dense = sp.sparsify(copy.deepcopy(model), density, seed=seed)
    sparse = sp.sparsify(model, density, seed=seed, compute="sparse")
    return dense, sparse


def assert_indices_match_mask(model: nn.Module) -> None:
    for layer in sp.sparse_layers(model):
        compute = layer.module.__dict__.get("sparse_compute")
        if compute is None:
            continue
        s = compute.indices_for(layer.mask)
        reference = layer.mask.float().to_sparse_csr()
        assert torch.equal(s.crow, reference.crow_indices()), layer.name
        assert torch.equal(s.col, reference.col_indices()), layer.name
        transposed = layer.mask.T.float().to_sparse_csr()
        assert torch.equal(s.crow_t, transposed.crow_indices()), layer.name
        assert torch.equal(s.col_t, transposed.col_indices()), layer.name
        values = torch.arange(1, s.index.numel() + 1, dtype=torch.float64)
        w = torch.zeros(layer.mask.shape, dtype=torch.float64)
        w.view(-1)[s.index] = values
        assert torch.equal(values[s.perm], w.T[layer.mask.T]), f"{layer.name}: perm"


@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    density=st.floats(0.01, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    input_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sparse_equals_masked_dense(
    out_features, in_features, lead, density, dtype, bias, input_grad, seed
):
    torch.manual_seed(seed)
    density = max(density, 1 / (out_features * in_features))  # at least one active weight
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    dense, sparse = twins(nn.Sequential(layer), density, seed)
    assert compute_modes(sparse) == {"0": "sparse"}
    x = torch.randn(*lead, in_features, dtype=dtype)
    outs, grads = [], []
    for model in (dense, sparse):
        xi = x.clone().requires_grad_(input_grad)
        out = model(xi)
        assert out.is_contiguous()
        out.backward(
            torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        )
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    assert outs[1].shape == outs[0].shape and outs[1].dtype == dtype
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for g_sparse, g_dense in zip(grads[1], grads[0]):
        assert (g_sparse is None) == (g_dense is None)
        if g_dense is not None:
            assert g_sparse.dtype == g_dense.dtype
            torch.testing.assert_close(g_sparse, g_dense, **tol)
    (sparse_layer,) = sp.sparse_layers(sparse)
    assert bool((sparse_layer.weight.grad[~sparse_layer.mask] == 0).all())


def test_bf16_autocast_computes_in_float32():
    torch.manual_seed(0)
    dense, sparse = twins(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8)), 0.2)
    x = torch.randn(16, 48)
    results = []
    for model in (dense, sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16  # as F.linear under autocast
        out.float().square().sum().backward()
        results.append((out.float(), [p.grad for p in model.parameters()]))
    (out_d, grads_d), (out_s, grads_s) = results
    torch.testing.assert_close(out_s, out_d, rtol=2e-2, atol=2e-2)  # dense ran in bf16
    for g_s, g_d in zip(grads_s, grads_d):
        assert g_s.dtype == torch.float32
        torch.testing.assert_close(g_s, g_d, rtol=5e-2, atol=5e-2)
    for layer in sp.sparse_layers(sparse):
        assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_inference_and_bf16_weights_fall_back_exactly():
    torch.manual_seed(0)
    dense, sparse = twins(nn.Sequential(nn.Linear(20, 10)), 0.3)
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x))
    dense.bfloat16(), sparse.bfloat16()  # no bf16 kernel: the dense path, bit-identical
    assert torch.equal(sparse(x.bfloat16()), dense(x.bfloat16()))


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
def test_indices_follow_topology_updates(algorithm):
    model = helpers.build_model(density=0.3, compute="sparse")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = sp.ALGORITHMS[algorithm](model, optimizer, total_steps=40, update_interval=4)
    linear = [layer for layer in scheduler.layers if "fc" in layer.name]
    assert compute_modes(model) == {
        "conv": "dense",
        "fc1": "sparse",
        "fc2": "sparse",
        "fc3": "sparse",
    }
    for step in range(20):
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(step)).backward()
        optimizer.step()
        helpers.check_invariants(model, optimizer)
    assert len(scheduler.history) == 5  # at steps 4, 8, …, 20
    assert_indices_match_mask(model)  # builds for the mask of the update at step 20
    for layer in linear:
        # One build at the first forward and one after each update (each writes the
        # mask), none on the other steps; RigL's armed steps run dense, building nothing.
        assert layer.module.sparse_compute.builds == 1 + 5, layer.name


def test_rigl_captures_the_exact_dense_gradient():
    model = helpers.build_model(density=0.3, compute="sparse")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = sp.RigL(model, optimizer, total_steps=40, update_interval=2)
    captured = {}
    original = scheduler.before_update

    def record():
        captured.update({x.name: x.parametrization.dense_grad.clone() for x in scheduler.layers})
        original()

    scheduler.before_update = record
    optimizer.zero_grad()
    helpers.loss_of(model, helpers.batch(0)).backward()
    optimizer.step()
    expected = helpers.dense_grads(model, [helpers.batch(1)])
    optimizer.zero_grad()
    helpers.loss_of(model, helpers.batch(1)).backward()
    optimizer.step()
    assert len(scheduler.history) == 1
    for name, grad in expected.items():
        torch.testing.assert_close(captured[name], grad)


def test_load_state_dict_of_other_masks_rebuilds():
    other = helpers.build_model(init_seed=1, density=0.3, mask_seed=7)
    model = helpers.build_model(init_seed=0, density=0.3, mask_seed=0, compute="sparse")
    data = helpers.batch(0)
    helpers.loss_of(model, data).backward()  # builds the indices of the first masks
    model.load_state_dict(other.state_dict())
    assert_indices_match_mask(model)
    with torch.no_grad():
        torch.testing.assert_close(model(data[0]), other(data[0]))
    assert model.fc1.sparse_compute.builds == 2


def test_deepcopy_follows_its_own_mask():
    model = helpers.build_model(density=0.3, compute="sparse")
    x = helpers.batch(0)[0]
    model(x)
    ema = copy.deepcopy(model)
    ema.fc1.parametrizations.weight[0].mask.copy_(~model.fc1.parametrizations.weight[0].mask)
    with torch.no_grad():
        ema.fc1.parametrizations.weight.original.normal_()
        torch.testing.assert_close(ema(x), helpers.dense_twin(ema)(x))
        assert not torch.equal(model(x), ema(x))


def test_finalize_and_to_sparse_after_sparse_training():
    model = helpers.build_model(density=0.3, compute="sparse")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sp.SET(model, optimizer, total_steps=10, update_interval=3)
    for step in range(6):
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(step)).backward()
        optimizer.step()
    x = helpers.batch(99)[0]
    with torch.no_grad():
        expected = model(x)
        inference = sp.to_sparse(copy.deepcopy(model), min_sparsity=0.5)
        assert isinstance(inference.fc1, sp.SparseLinear)
        torch.testing.assert_close(inference(x), expected, rtol=1e-5, atol=1e-6)
        sp.finalize(model)
        assert "forward" not in model.fc1.__dict__
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_bad_compute_mode_leaves_the_model_untouched(snapshot, assert_untouched):
    model = helpers.TinyNet()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown compute mode 'fast'"):
        sp.sparsify(model, 0.3, compute="fast")
    convs = nn.Sequential(nn.Conv2d(2, 4, 3))
    conv_snap = snapshot(convs)
    with pytest.raises(ValueError, match="needs an nn.Linear target"):
        sp.sparsify(convs, 0.3, compute="sparse")
    assert_untouched(model, snap)
    assert_untouched(convs, conv_snap)
    with pytest.raises(ValueError, match="unknown compute mode"):
        set_compute(helpers.build_model(), "csr")


def test_auto_follows_the_calibration_and_the_mask():
    max_density, min_numel = AUTO_RULES[1]
    big = (3072, 768)  # 0.05 · numel = 117964.8: sparsify gives it 117965 active
    assert big[0] * big[1] >= min_numel
    limit = round(max_density * big[0] * big[1])
    assert auto_picks_sparse(big, limit, 1, "cpu")
    assert not auto_picks_sparse(big, limit + 1, 1, "cpu")
    assert not auto_picks_sparse((10, 100), 1, 1, "cpu")  # too small to pay off
    assert not auto_picks_sparse(big, 1, 1, "cuda")  # not calibrated
    many = AUTO_RULES[max(AUTO_RULES)]
    assert auto_picks_sparse((1, many[1]), 1, 64, "cpu")
    assert not auto_picks_sparse((1, many[1] - 1), 1, 64, "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(768, 1024), nn.ReLU(), nn.Linear(1024, 10))
    assert 768 * 1024 >= min_numel > 10 * 1024
    sp.sparsify(model, 0.02, distribution="uniform", compute="auto")
    assert compute_modes(model) == {"0": "sparse", "2": "dense"}
    layer = next(sp.sparse_layers(model))
    layer.mask.fill_(True)  # a (denser) new topology: auto decides again
    assert compute_modes(model) == {"0": "dense", "2": "dense"}


def test_sparse_training_reaches_dense_mode_accuracy():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    train, test = slice(0, 1400), slice(1400, None)
    accuracies = {}
    for mode in ("dense", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        sp.sparsify(model, 0.1, distribution="uniform", seed=0, compute=mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp.SET(model, optimizer, total_steps=300, update_interval=50, seed=0)
        generator = torch.Generator().manual_seed(0)
        for _ in range(300):
            batch = torch.randint(1400, (64,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(model(x[train][batch]), y[train][batch]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracies[mode] = float((model(x[test]).argmax(1) == y[test]).float().mean())
    assert accuracies["dense"] > 0.85
    assert abs(accuracies["sparse"] - accuracies["dense"]) < 0.03, accuracies


@pytest.mark.parametrize("algorithm", ["set", "rigl", "granet"])
def test_resume_is_bit_identical_in_sparse_mode(algorithm, tmp_path):
    n, k = 16, 7  # the step before the update at 8 captures the dense gradient

    def build(init_seed, mask_seed):
        density = 0.5 if algorithm == "granet" else 0.3
        model = helpers.build_model(init_seed, density, mask_seed, compute="sparse")
        optimizer = helpers.OPTIMIZERS["sgd"](model)
        kw = {"density": 0.2} if algorithm == "granet" else {}
        scheduler = sp.ALGORITHMS[algorithm](
            model, optimizer, total_steps=n, update_interval=4, seed=5, **kw
        )
        return model, optimizer, scheduler

    def run(model, optimizer, steps):
        for step in steps:
            optimizer.zero_grad()
            helpers.loss_of(model, helpers.batch(1000 + step)).backward()
            optimizer.step()

    reference = build(0, 0)
    run(*reference[:2], range(n))
    first = build(0, 0)
    run(*first[:2], range(k))
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict()}, tmp_path / "c.pt")
    resumed = build(3, 9)
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["opt"])
    run(*resumed[:2], range(k, n))
    assert resumed[2].history == reference[2].history
    ref_state, res_state = reference[0].state_dict(), resumed[0].state_dict()
    for key in ref_state:
        assert torch.equal(ref_state[key], res_state[key]), key


# ------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    with helpers.gloo_group(rank, 2, port):
        results = {}
        for algorithm in ("set", "rigl"):
            model = helpers.build_model(density=0.3, compute="sparse")
            ddp = DDP(model, broadcast_buffers=False)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            sp.ALGORITHMS[algorithm](ddp, optimizer, total_steps=20, update_interval=3, seed=3)
            for step in range(10):
                optimizer.zero_grad()
                helpers.loss_of(ddp, helpers.batch(1000 * rank + step)).backward()
                optimizer.step()
            results[algorithm] = {k: v.clone() for k, v in model.state_dict().items()}
            results[algorithm]["builds"] = torch.tensor(model.fc1.sparse_compute.builds)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_agree_in_sparse_mode(tmp_path):
    args = (helpers.free_port(), str(tmp_path))
    ranks = helpers.run_ranks(_ddp_worker, args, 2, tmp_path, "DDP")
    for algorithm in ("set", "rigl"):
        for key, value in ranks[0][algorithm].items():
            assert torch.equal(value, ranks[1][algorithm][key]), f"{algorithm}: {key}"
        assert int(ranks[0][algorithm]["builds"]) == 1 + 3  # updates at 3, 6, 9


def test_exact_gradients_need_no_masking_pass(monkeypatch):
    """The CSR weight gradient is zero where inactive by construction: with SGD neither
    the gradient nor the weights get a zeroing pass between updates; a gradient edited
    after backward, or a second use of the weight through the masked-dense path, brings
    the pass back. Stored weights stay exactly zero where inactive throughout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    sp.sparsify(model, 0.3, compute="sparse")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp.SET(model, optimizer, total_steps=1000, update_interval=500)
    layers = list(sp.sparse_layers(model))
    x, y = torch.randn(8, 12), torch.randint(4, (8,))
    model(x)  # the first forward re-zeroes what sparsify's init wrote
    passes = helpers.record_zeroing_passes(monkeypatch)

    def train_step(edit: bool = False) -> None:
        passes.clear()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if edit:
            layers[0].weight.grad.mul_(2.0)
        optimizer.step()

    for _ in range(3):
        train_step()
        assert passes == []
    train_step(edit=True)
    # only the edited layer, once: its gradient is masked again before the step
    assert [t is layers[0].weight.grad for t in passes] == [True]
    for layer in layers:
        assert bool((layer.weight[~layer.mask] == 0).all()), layer.name
        assert bool((layer.weight.grad[~layer.mask] == 0).all()), layer.name

    # The weight used twice, once through the masked-dense parametrization: the sum holds
    # an unmasked gradient, which is masked once it is accumulated.
    passes.clear()
    optimizer.zero_grad()
    first = layers[0].module
    (model(x).sum() + F.linear(x, first.weight).pow(2).sum()).backward()
    assert any(t is first.parametrizations.weight.original.grad for t in passes)
    assert bool((first.parametrizations.weight.original.grad[~layers[0].mask] == 0).all())
