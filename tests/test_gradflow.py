"""Gradient flow: sparse_param.gradient_flow / effective_gradient_flow against an
independent NumPy computation of Tessera et al.'s EGF, and the EGF of update records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparse_param as sp

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _cnn(channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, channels, kernel, padding=kernel // 2),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 3),
    )


def _backward(model: nn.Module, inputs: torch.Tensor, classes: int, seed: int) -> None:
    target = torch.randint(
        0, classes, (inputs.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    F.cross_entropy(model(inputs), target).backward()


def _reference(model: nn.Module, p: float) -> tuple[list[dict], float, float]:
    """EGF_p = mean_l ||g_l[mask_l]||_p / n_l, written from the formula in NumPy."""
    rows = []
    for name, module in model.named_modules():
        if not sp.layers.is_sparse(module):
            continue
        grad = module.parametrizations.weight.original.grad.numpy().astype(np.float64)
        mask = module.parametrizations.weight[0].mask.numpy()
        active = grad[mask]
        norm = float(np.sum(np.abs(active) ** p) ** (1 / p))
        rows.append(
            {
                "name": name,
                "active": int(mask.sum()),
                "norm_active": norm,
                "norm_all": float(np.sum(np.abs(grad) ** p) ** (1 / p)),
                "egf": norm / int(mask.sum()),
            }
        )
    every = np.concatenate(
        [
            q.grad.numpy().astype(np.float64).ravel()
            for q in model.parameters()
            if q.grad is not None
        ]
    )
    plain = float(np.sum(np.abs(every) ** p) ** (1 / p))
    return rows, sum(r["egf"] for r in rows) / len(rows), plain


def _check(model: nn.Module, p: float) -> None:
    flow = sp.gradient_flow(model, p)
    rows, egf, plain = _reference(model, p)
    assert [r["name"] for r in flow.layers] == [r["name"] for r in rows]
    for got, want in zip(flow.layers, rows):
        assert got["active"] == want["active"]
        for key in ("norm_active", "norm_all", "egf"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-12), (got["name"], key)
    assert flow.egf == pytest.approx(egf, rel=1e-6)
    assert sp.effective_gradient_flow(model, p) == flow.egf
    assert flow.grad_norm == pytest.approx(plain, rel=1e-6)
    assert flow.active == sum(r["active"] for r in rows)
    joint = float(np.sum([r["norm_active"] ** p for r in rows]) ** (1 / p))
    assert flow.norm_active == pytest.approx(joint, rel=1e-6)


@given(
    widths=st.lists(st.integers(3, 24), min_size=2, max_size=4),
    density=st.floats(0.2, 1.0),
    p=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_egf_matches_reference_on_mlps(widths, density, p, seed):
    torch.manual_seed(seed)
    model = _mlp([5, *widths])
    sp.sparsify(model, density, distribution="uniform", seed=seed)
    _backward(model, torch.randn(7, 5), widths[-1], seed)
    _check(model, p)


@given(
    channels=st.integers(2, 6),
    kernel=st.sampled_from([1, 3]),
    density=st.floats(0.25, 1.0),
    p=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_egf_matches_reference_on_cnns(channels, kernel, density, p, seed):
    torch.manual_seed(seed)
    model = _cnn(channels, kernel)
    sp.sparsify(model, density, seed=seed)
    _backward(model, torch.randn(4, 2, 6, 6), 3, seed)
    _check(model, p)


@given(seed=st.integers(0, 2**16), p=st.sampled_from([1, 2]))
def test_egf_ignores_gradients_at_inactive_positions(seed, p):
    torch.manual_seed(seed)
    model = _mlp([6, 9, 4])
    sp.sparsify(model, 0.3, distribution="uniform", seed=seed)
    _backward(model, torch.randn(5, 6), 4, seed)
    before = sp.gradient_flow(model, p)
    for layer in sp.sparse_layers(model):
        noise = torch.randn(layer.weight.shape) * 1e3
        layer.weight.grad[~layer.mask] = noise[~layer.mask]
    after = sp.gradient_flow(model, p)
    assert after.egf == before.egf
    assert [r["norm_active"] for r in after.layers] == [r["norm_active"] for r in before.layers]
    assert all(a["norm_all"] > b["norm_all"] for a, b in zip(after.layers, before.layers))


def test_dense_model_counts_every_weight_as_active():
    torch.manual_seed(0)
    model = _mlp([4, 8, 3])
    _backward(model, torch.randn(6, 4), 3, 0)
    flow = sp.gradient_flow(model)
    grads = [model[0].weight.grad, model[2].weight.grad]
    want = sum(float(g.double().norm()) / g.numel() for g in grads) / 2
    assert [r["name"] for r in flow.layers] == ["0", "2"]
    assert flow.egf == pytest.approx(want, rel=1e-9)
    assert flow.active == 4 * 8 + 8 * 3


def test_refuses_a_model_without_gradients():
    model = _mlp([4, 8, 3])
    sp.sparsify(model, 0.5)
    with pytest.raises(ValueError, match=r"no gradient.*loss.backward\(\)"):
        sp.effective_gradient_flow(model)
    _backward(model, torch.randn(2, 4), 3, 0)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"layers \['0', '2'\] have no gradient"):
        sp.gradient_flow(model)
    with pytest.raises(ValueError, match="p must be > 0"):
        sp.gradient_flow(model, p=0)


def test_works_through_compile_and_ddp_wrappers(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = _mlp([5, 7, 3])
    sp.sparsify(model, 0.4)
    _backward(model, torch.randn(4, 5), 3, 0)
    want = sp.gradient_flow(model)
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    assert sp.gradient_flow(compiled) == want
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert sp.effective_gradient_flow(wrapped) == want.egf
        assert sp.effective_gradient_flow(torch.compile(wrapped)) == want.egf
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "dsr"])
def test_update_records_carry_the_egf_of_the_gradients_before_the_update(method):
    torch.manual_seed(0)
    model = _mlp([6, 12, 12, 4])
    sp.sparsify(model, 0.3, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = {} if method == "dsr" else {"drop_fraction": 0.5}
    scheduler = sp.ALGORITHMS[method](
        model, optimizer, total_steps=40, update_interval=3, seed=0, **kwargs
    )
    expected = []
    for step in range(1, 13):
        optimizer.zero_grad()
        _backward(model, torch.randn(8, 6), 4, step)
        if scheduler.is_update_step(step):
            # measured independently, on the masks the gradients were computed under
            expected.append(sp.effective_gradient_flow(model))
        optimizer.step()
    got = [record["egf"] for record in scheduler.history]
    assert len(got) >= 3
    assert got == pytest.approx(expected, rel=1e-9)


def test_update_record_egf_is_none_without_gradients():
    model = _mlp([6, 12, 4])
    sp.sparsify(model, 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = sp.SET(model, optimizer, total_steps=10, update_interval=5)
    assert scheduler.update()["egf"] is None
    assert not math.isnan(sp.density(model))
