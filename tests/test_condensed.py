"""The condensed constant fan-in Linear equals the masked dense one, outputs and grads.

Random shapes, fan-ins, leading batch dims, ablated (empty) units and chunk sizes; float64
so the comparison is tight (only the summation order differs).
"""

from __future__ import annotations

import helpers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparse_param as sp
from sparse_param.kernels import condensed
from sparse_param.kernels.condensed import CondensedLinear, condense, condensed_linear


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


def fan_in_mask(out: int, width: int, k: int, ablated: int, generator) -> torch.Tensor:
    order = torch.rand(out, width, generator=generator).argsort(dim=1)
    mask = torch.zeros(out, width, dtype=torch.bool).scatter_(1, order[:, :k], True)
    mask[torch.randperm(out, generator=generator)[:ablated]] = False
    return mask


@given(
    out=st.integers(1, 12),
    width=st.integers(1, 20),
    data=st.data(),
    lead=st.lists(st.integers(1, 6), min_size=0, max_size=2),  # few and many rows
    bias=st.booleans(),
    chunk=st.sampled_from([1, 7, 1 << 21]),
)
def test_condensed_equals_masked_dense(out, width, data, lead, bias, chunk, monkeypatch_chunk):
    monkeypatch_chunk(chunk)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    k = data.draw(st.integers(1, width))
    mask = fan_in_mask(out, width, k, data.draw(st.integers(0, out - 1)), generator)
    weight = torch.randn(out, width, generator=generator, dtype=torch.float64) * mask
    b = torch.randn(out, generator=generator, dtype=torch.float64) if bias else None
    layer = CondensedLinear(weight, mask, b)
    assert torch.equal(layer.weight, weight)  # the dense view is exact

    x = torch.randn(*lead, width, generator=generator, dtype=torch.float64, requires_grad=True)
    dense_w = weight.clone().requires_grad_()
    expected = nn.functional.linear(x, dense_w * mask, b)
    y = layer(x)
    assert y.shape == (*lead, out)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)

    g = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    params = [x, layer.values] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, g)
    ref = torch.autograd.grad(expected, [x, dense_w], g)
    torch.testing.assert_close(grads[0], ref[0], rtol=1e-12, atol=1e-12)
    # the values' gradient is the dense gradient at the active positions
    at_active = ref[1][layer.units[:, None], layer.indices]
    torch.testing.assert_close(grads[1], at_active, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(grads[2], g.reshape(-1, out).sum(0))


@pytest.fixture(scope="session")
def monkeypatch_chunk():
    original = condensed.CHUNK_ELEMENTS

    def set_chunk(value: int) -> None:
        condensed.CHUNK_ELEMENTS = value

    yield set_chunk
    condensed.CHUNK_ELEMENTS = original


def test_condense_layout_and_refusal():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    weight = torch.arange(12.0).view(3, 4) * mask
    values, indices, units = condense(weight, mask)
    assert units.tolist() == [0, 2]
    assert indices.tolist() == [[0, 2], [1, 2]] and indices.dtype == torch.int64
    assert values.tolist() == [[0.0, 2.0], [9.0, 10.0]]
    mask[0, 1] = True
    with pytest.raises(ValueError, match="not constant fan-in"):
        condense(weight, mask)


def test_condensed_trains_like_the_sparse_layer():
    torch.manual_seed(0)
    sparse = sp.sparsify(nn.Linear(24, 10), 0.25, structure="fan_in")
    layer = CondensedLinear.from_linear(sparse)
    opt_a = torch.optim.SGD(sparse.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(6, 24, generator=torch.Generator().manual_seed(step))
        for module, opt in ((sparse, opt_a), (layer, opt_b)):
            opt.zero_grad()
            module(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(layer.weight, sparse.weight.detach())
    torch.testing.assert_close(layer.bias, sparse.bias)


def test_to_sparse_condensed(snapshot, assert_untouched):
    model = helpers.build_model(density=0.1, structure="fan_in")
    x = helpers.batch(0)[0]
    with torch.no_grad():
        expected = model(x)
    sp.to_sparse(model, format="condensed", min_sparsity=0.5)
    assert isinstance(model.fc1, CondensedLinear) and isinstance(model.fc3, CondensedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)

    plain = helpers.build_model(density=0.1)
    snap = snapshot(plain)
    with pytest.raises(ValueError, match="not constant fan-in"):
        sp.to_sparse(plain, format="condensed", min_sparsity=0.5)
    assert_untouched(plain, snap)


def test_condensed_linear_function_all_units():
    x = torch.randn(5, 8, dtype=torch.float64)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :2] = True
    weight = torch.randn(3, 8, dtype=torch.float64) * mask
    values, indices, _ = condense(weight, mask)
    torch.testing.assert_close(condensed_linear(x, values, indices), x @ weight.T)
