"""to_sparse / SparseLinear (CSR inference) and save_safetensors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparse_param import dense_state_dict, finalize, sparse_layers, sparsify
from sparse_param.checkpoint import save_safetensors
from sparse_param.kernels import SparseLinear, to_sparse

timm = pytest.importorskip("timm")

ATOL = 1e-5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)
    ).eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10
    ).eval()


def sparse_linear_count(model: nn.Module) -> int:
    return sum(isinstance(m, SparseLinear) for m in model.modules())


@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 32), (3, 2, 4, 32), (3, 45, 32), (32,), (0, 32)])
def test_mlp_matches_masked_dense(shape):
    model = sparsify(mlp(), 0.05, distribution="uniform")
    reference = copy.deepcopy(model)
    assert to_sparse(model) is model
    assert sparse_linear_count(model) == 3
    assert next(sparse_layers(model), None) is None
    x = torch.randn(shape)
    with torch.no_grad():
        out, expected = model(x), reference(x)
    assert out.shape == expected.shape == (*shape[:-1], 10)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


def test_inference_mode_and_double():
    model = sparsify(mlp(), 0.05, distribution="uniform")
    reference = copy.deepcopy(model).double()
    to_sparse(model).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), atol=1e-12, rtol=1e-12)


def test_bfloat16_computes_in_float32():
    model = sparsify(mlp(), 0.05, distribution="uniform")
    reference = copy.deepcopy(model)
    to_sparse(model).bfloat16()
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = model(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(x), atol=0.05, rtol=0.05)


def test_tiny_vit_matches_masked_dense():
    model = sparsify(tiny_vit(), 0.05)
    reference = copy.deepcopy(model)
    to_sparse(model)
    # ERK gives the 10-class head a high density: it stays a (masked) Linear, and the
    # patch-embedding convolution stays masked dense.
    assert sparse_linear_count(model) == 4 * 12
    assert isinstance(model.head, nn.Linear) and parametrize.is_parametrized(model.head)
    assert parametrize.is_parametrized(model.patch_embed.proj)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=ATOL, rtol=1e-5)


def test_finalized_and_plain_models_convert():
    sparse = sparsify(tiny_vit(), 0.05)
    reference = copy.deepcopy(sparse)
    finalized = finalize(copy.deepcopy(sparse))
    with pytest.raises(ValueError, match="no layer"):
        to_sparse(finalized, plain=False)
    to_sparse(finalized)
    assert sparse_linear_count(finalized) == 4 * 12
    plain = tiny_vit()
    plain.load_state_dict(dense_state_dict(sparse.state_dict()))
    to_sparse(plain)
    assert sparse_linear_count(plain) == 4 * 12
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(finalized(x), expected, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)


def test_min_sparsity_threshold():
    model = sparsify(mlp(), 0.3, distribution={"0": 0.05, "2": 0.5, "4": 0.5})
    to_sparse(model, min_sparsity=0.9)
    assert [type(m).__name__ for m in model] == [
        "SparseLinear",
        "GELU",
        "ParametrizedLinear",
        "GELU",
        "ParametrizedLinear",
    ]


def test_threshold_allows_one_weight_of_rounding():
    # 77 weights at density 0.1: 8 active (round(7.7)), 89.6% zeros, still "90% sparse"
    model = sparsify(nn.Sequential(nn.Linear(7, 11)), 0.1)
    to_sparse(model, min_sparsity=0.9)
    assert isinstance(model[0], SparseLinear) and model[0].nnz <= 8


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_min_sparsity(bad):
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse(sparsify(mlp(), 0.05), min_sparsity=bad)


def test_dense_model_raises_and_is_unchanged():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no layer of Sequential to convert"):
        to_sparse(model)
    assert sparse_linear_count(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_sparse_below_threshold_names_the_sparsest_layer():
    model = sparsify(mlp(), 0.5, distribution="uniform")
    with pytest.raises(ValueError, match=r"sparsest candidate, '\d', is 50\.\d+% zeros"):
        to_sparse(model)
    assert sparse_linear_count(model) == 0


def test_conv_only_sparse_model_explains_convs_stay_dense():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)), 0.05)
    with pytest.raises(ValueError, match="no sparse convolution"):
        to_sparse(model)


def test_multihead_attention_out_proj_is_left_alone():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4), "fc": nn.Linear(32, 32)})
    sparsify(model, 0.05, distribution="uniform")
    to_sparse(model)
    assert isinstance(model["fc"], SparseLinear)
    assert not isinstance(model["attn"].out_proj, SparseLinear)


def test_gradient_input_raises():
    model = to_sparse(sparsify(mlp(), 0.05, distribution="uniform"))
    x = torch.randn(2, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        model(x)
    with torch.no_grad():
        assert not model(x).requires_grad


@pytest.mark.parametrize("block,threads", [(1, 2), (7, 2), (1000, 1), (None, 1), (None, 2)])
def test_token_blocks(block, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    weight = torch.randn(40, 30) * (torch.rand(40, 30) < 0.1)
    bias = torch.randn(40)
    layer = SparseLinear(weight, bias)
    layer.block_tokens = block
    x = torch.randn(5, 13, 30)  # 65 tokens: 32 + 32 + 1 in blocks on one thread
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T + bias, atol=ATOL, rtol=1e-5)


def test_sparse_linear_no_bias_and_shape_errors():
    torch.manual_seed(0)
    weight = torch.randn(8, 6) * (torch.rand(8, 6) < 0.2)
    layer = SparseLinear(weight)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T, atol=ATOL, rtol=1e-5)
        with pytest.raises(ValueError, match="features"):
            layer(torch.randn(2, 5))
    assert layer.nnz == int((weight != 0).sum())
    torch.testing.assert_close(layer.weight, weight)
    with pytest.raises(ValueError, match="bias"):
        SparseLinear(weight, torch.zeros(3))


def test_state_dict_is_plain_and_loads_back():
    sparse = sparsify(tiny_vit(), 0.05)
    model = to_sparse(copy.deepcopy(sparse))
    state = model.state_dict()
    assert state["blocks.0.mlp.fc1.weight"].layout == torch.strided
    assert state["blocks.0.mlp.fc1.weight"].shape == (768, 192)
    plain = tiny_vit()
    plain.load_state_dict(dense_state_dict(state))
    # and into another to_sparse model, whose CSR weights are rebuilt from the file
    other = to_sparse(sparsify(tiny_vit(), 0.05, seed=1))
    other.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = sparse.eval()(x)
        torch.testing.assert_close(plain(x), expected, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(other(x), expected, atol=ATOL, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.weight"})


def test_deepcopy_and_pickle():
    model = to_sparse(sparsify(mlp(), 0.05, distribution="uniform"))
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("form", ["sparse", "finalized", "to_sparse"])
def test_save_safetensors_round_trip(tmp_path, form):
    from safetensors.torch import load_file

    model = sparsify(tiny_vit(), 0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    if form == "finalized":
        finalize(model)
    elif form == "to_sparse":
        to_sparse(model)
    path = tmp_path / "model.safetensors"
    save_safetensors(model, path)
    assert next(sparse_layers(model), None) is not None or form != "sparse"
    fresh = tiny_vit()
    tensors = load_file(path)
    assert not any("parametrizations" in key for key in tensors)
    fresh.load_state_dict(tensors)  # strict: every key present
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=ATOL, rtol=1e-5)
    if form == "sparse":
        torch.testing.assert_close(
            tensors["blocks.0.mlp.fc1.weight"],
            model.blocks[0].mlp.fc1.weight.detach(),
            atol=0,
            rtol=0,
        )


def test_save_safetensors_tied_weights(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
    model["b"].weight = model["a"].weight
    save_safetensors(model, tmp_path / "tied.safetensors")
    tensors = load_file(tmp_path / "tied.safetensors")
    assert set(tensors) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    torch.testing.assert_close(tensors["b.weight"], model["a"].weight.detach())


def test_save_safetensors_refuses_standardized_convs(tmp_path):
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = sparsify(nn.Sequential(StdConv2d(3, 8, 3), nn.ReLU(), StdConv2d(8, 8, 3)), 0.1)
    with pytest.raises(ValueError, match="standardize"):
        save_safetensors(model, tmp_path / "std.safetensors")
