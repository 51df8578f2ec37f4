"""The ``SparseMask`` parametrization on its own (docs/architecture.md, invariants 2, 5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from sparse_param import SparseMask

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def masked_linear(n_in: int, n_out: int, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    mask = torch.rand(n_out, n_in, generator=g) < 0.5
    mask.view(-1)[0] = True  # at least one active, one inactive for non-trivial sizes
    if mask.numel() > 1:
        mask.view(-1)[-1] = False
    parametrize.register_parametrization(layer, "weight", SparseMask(mask))
    return layer, mask


def test_mask_must_be_bool():
    with pytest.raises(TypeError, match="mask must be torch.bool, got torch.float32"):
        SparseMask(torch.ones(3, 3))
    with pytest.raises(TypeError, match="torch.uint8"):
        SparseMask(torch.ones(3, 3, dtype=torch.uint8))


def test_buffers_are_copies_and_saved():
    mask = torch.tensor([[True, False], [False, True]])
    p = SparseMask(mask)
    mask[0, 0] = False  # the caller's tensor is not the buffer
    assert torch.equal(p.mask, torch.tensor([[True, False], [False, True]]))
    assert torch.equal(p.ever_active, p.mask)
    assert p.ever_active.data_ptr() != p.mask.data_ptr()
    assert p.allocated == 2
    assert set(p.state_dict()) == {"mask", "ever_active"}
    assert "active=2/4" in repr(p)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_registration_zeroes_pruned_and_keeps_active(n_in, n_out, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    dense = layer.weight.detach().clone()
    param = layer.weight
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g) < 0.5
    parametrize.register_parametrization(layer, "weight", SparseMask(mask))
    stored = layer.parametrizations.weight.original
    assert stored is param  # same Parameter object: optimizers keep working
    assert torch.equal(stored[mask], dense[mask])
    assert bool((stored[~mask] == 0).all())
    assert torch.equal(layer.weight, stored)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_gradient_is_the_dense_gradient_masked(n_in, n_out, seed):
    layer, mask = masked_linear(n_in, n_out, seed)
    torch.manual_seed(seed)
    x = torch.randn(3, n_in)
    target = torch.randn(3, n_out)
    ((layer(x) - target) ** 2).sum().backward()
    grad = layer.parametrizations.weight.original.grad

    reference = nn.Linear(n_in, n_out)
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(layer.bias)
    ((reference(x) - target) ** 2).sum().backward()
    assert bool((grad[~mask] == 0).all())
    assert torch.allclose(grad[mask], reference.weight.grad[mask], rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_assigning_weight_stores_it_masked(n_in, n_out, seed):
    layer, mask = masked_linear(n_in, n_out, seed)
    stored = layer.parametrizations.weight.original
    new = torch.rand(n_out, n_in, generator=torch.Generator().manual_seed(seed + 1)) + 1.0
    given_values = new.clone()
    layer.weight = new  # goes through SparseMask.right_inverse
    assert layer.parametrizations.weight.original is stored
    assert torch.equal(stored[mask], new[mask])
    assert bool((stored[~mask] == 0).all())
    assert bool((layer.weight[~mask] == 0).all())
    assert torch.equal(new, given_values)  # the assigned tensor itself is not modified


def test_in_place_init_of_module_weight_never_reaches_the_computation_off_mask():
    # docs/papers.md#pitfalls-found-elsewhere: nn.init and reset_parameters() write in
    # place into whatever ``module.weight`` returns. Whatever that reaches, the layer
    # must go on computing with zeros where the mask is off.
    layer, mask = masked_linear(6, 5, 0)
    nn.init.constant_(layer.weight, 2.0)
    x = torch.randn(3, 6)
    out = layer(x)
    assert bool((layer.weight[~mask] == 0).all())
    assert bool((layer.parametrizations.weight.original[~mask] == 0).all())
    computed = layer.weight.detach()
    assert torch.allclose(out, torch.nn.functional.linear(x, computed, layer.bias))
    layer.reset_parameters()
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer(x).sum().backward()
    assert bool((layer.parametrizations.weight.original[~mask] == 0).all())
    assert bool((layer.parametrizations.weight.original.grad[~mask] == 0).all())


def test_capture_dense_grad_accumulates_like_grad_and_restarts_after_zero_grad():
    layer, mask = masked_linear(7, 4, 3)
    p = layer.parametrizations.weight[0]
    stored = layer.parametrizations.weight.original
    x1, x2 = torch.randn(5, 7), torch.randn(5, 7)

    def dense_grad_of(x):
        w = layer.weight.detach().clone().requires_grad_(True)
        torch.nn.functional.linear(x, w, layer.bias.detach()).square().sum().backward()
        return w.grad

    layer(x1).square().sum().backward()
    assert p.dense_grad is None  # off by default

    layer.zero_grad()
    p.capture_dense_grad = True
    layer(x1).square().sum().backward()
    g1 = dense_grad_of(x1)
    assert torch.allclose(p.dense_grad, g1, rtol=1e-5, atol=1e-6)
    assert bool((p.dense_grad[~mask] != 0).any())  # dense, not masked
    assert bool((stored.grad[~mask] == 0).all())  # while .grad stays masked

    layer(x2).square().sum().backward()  # accumulation, as .grad does
    assert torch.allclose(p.dense_grad, g1 + dense_grad_of(x2), rtol=1e-5, atol=1e-5)

    layer.zero_grad()  # set_to_none: the next backward starts afresh
    layer(x2).square().sum().backward()
    assert torch.allclose(p.dense_grad, dense_grad_of(x2), rtol=1e-5, atol=1e-6)
    assert torch.allclose(stored.grad, dense_grad_of(x2) * mask, rtol=1e-5, atol=1e-6)


def test_a_deepcopy_masks_its_own_gradient_and_leaves_the_original_alone():
    # EMA copies are deepcopies taken mid-training: the copy hooks its own weight.
    import copy

    layer, mask = masked_linear(6, 5, 1)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    twin = copy.deepcopy(layer)
    layer.zero_grad()
    twin(x).square().sum().backward()
    assert layer.parametrizations.weight.original.grad is None
    grad = twin.parametrizations.weight.original.grad
    assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())
