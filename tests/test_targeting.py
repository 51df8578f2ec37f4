"""Which layers ``sparsify`` targets is what the user said: patterns given as a single
string, patterns that match nothing, tied weights, and weights computed by a
parametrization (weight_norm, spectral_norm) or a pre-hook, each refused by name with
the model left exactly as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from sparse_param import effective_density, sparse_layers, sparsify
from sparse_param.layers import find_targets

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.conv = nn.Conv1d(2, 4, 3)
    model.fc1 = nn.Linear(8, 8)
    model.fc2 = nn.Linear(8, 8)
    model.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 3))
    return model


def sparse_names(model: nn.Module) -> list[str]:
    return [layer.name for layer in sparse_layers(model)]


# ---------------------------------------------------------------- patterns and types


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"include": "fc*"}, ["fc1", "fc2"]),  # was: '*' matched every layer
        ({"exclude": "fc2"}, ["conv", "fc1", "head.1"]),  # was: excluded nothing
        ({"include": "head"}, ["head.1"]),  # a module selects the layers inside it
        ({"exclude": "head"}, ["conv", "fc1", "fc2"]),
        ({"exclude": nn.Conv1d}, ["fc1", "fc2", "head.1"]),
        ({"layer_types": nn.Conv1d}, ["conv"]),
        ({"include": ("fc1", "head.*")}, ["fc1", "head.1"]),
    ],
)
def test_a_single_pattern_or_type_is_one_item(kwargs, expected):
    assert list(find_targets(net(), **kwargs)) == expected
    assert sparse_names(sparsify(net(), 0.5, **kwargs)) == expected


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"include": [1]}, r"include must hold only name patterns \(str\), got \[1\]"),
        ({"include": b"fc*"}, "include must be name patterns"),
        ({"include": 3}, "include must be name patterns"),
        ({"include": [nn.Linear]}, "include must hold only name patterns"),
        ({"exclude": [1.5]}, r"exclude must hold only name patterns \(str\) or module types"),
        ({"exclude": None}, "exclude must be name patterns"),
        ({"layer_types": "Linear"}, "layer_types must be module types"),
        ({"layer_types": [int]}, "layer_types must be nn.Module subclasses"),
    ],
)
def test_arguments_of_the_wrong_type_are_refused(snapshot, assert_untouched, kwargs, words):
    model = net()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=words):
        sparsify(model, 0.5, **kwargs)
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"exclude": "fc3"}, r"'fc3' matches no module .*did you mean \['fc2', 'fc1'\]"),
        ({"exclude": ["fc1", "haed"]}, r"exclude pattern 'haed' matches no module .*'head'"),
        ({"include": "block*"}, "include pattern 'block\\*' matches no module"),
    ],
)
def test_a_pattern_that_matches_nothing_is_refused(snapshot, assert_untouched, kwargs, words):
    model = net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=words):
        sparsify(model, 0.5, **kwargs)
    assert_untouched(model, snap)


# Short names that are also characters of other names: iterating a string would select
# the wrong layers.
names = st.lists(st.sampled_from(["f", "c", "fc", "c2", "fc2", "x", "l1"]), min_size=1, unique=True)


@given(names, st.data())
def test_a_name_as_a_string_selects_that_layer_and_nothing_else(layer_names, data):
    model = nn.ModuleDict({name: nn.Linear(3, 3) for name in layer_names})
    chosen = data.draw(st.sampled_from(layer_names))
    rest = [name for name in layer_names if name != chosen]
    assert list(find_targets(model, include=chosen)) == [chosen]
    assert list(find_targets(model, include=[chosen])) == [chosen]
    if rest:
        assert list(find_targets(model, exclude=chosen)) == rest
        assert list(find_targets(model, exclude=[chosen])) == rest
        assert sparse_names(sparsify(model, 0.5, exclude=chosen)) == rest


# ------------------------------------------------------------------------ tied weights


class TinyLM(nn.Module):
    """An LM head tied to the token embedding, as GPT-2 and most LMs have it."""

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(self.emb(tokens))))


def test_a_head_tied_to_the_embedding_is_left_dense_and_named():
    # GPT-2, BERT and most LMs tie the head to the token embedding: masking the head
    # would zero the embedding too, so it stays dense and the user is told once.
    model = TinyLM()
    with pytest.warns(UserWarning, match=r"tied: \['head \(to emb\.weight \(Embedding\)\)'\]"):
        sparsify(model, 0.1)
    assert sparse_names(model) == ["block"]
    assert model.head.weight is model.emb.weight
    assert int(model.emb.weight.count_nonzero()) == model.emb.weight.numel()


@pytest.mark.parametrize("fix", [{"exclude": "head"}, {"dense_last": True}])
def test_the_fix_leaves_the_tied_embedding_dense(fix):
    model = sparsify(TinyLM(), 0.1, **fix)
    assert sparse_names(model) == ["block"]
    assert model.head.weight is model.emb.weight
    assert int(model.emb.weight.count_nonzero()) == model.emb.weight.numel()
    assert effective_density(model, torch.tensor([[1, 2, 3]])) == {"block": 6 / 64}


def test_a_weight_tied_to_a_parent_parameter_is_left_dense():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.register_parameter("proj", model[1].weight)
    with pytest.warns(UserWarning, match=r"'1 \(to \(the model\)\.proj \(Sequential\)\)'"):
        sparsify(model, 0.5)
    assert sparse_names(model) == ["0"]


class Recurrent(nn.Module):
    """Every kind of weight matrix sparsify cannot mask, beside two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, bidirectional=True)
        self.gru = nn.GRU(16, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.sep = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)


def test_weight_matrices_of_kinds_it_cannot_mask_are_named_once():
    model = Recurrent()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify(model, 0.3)
    notices = [str(w.message) for w in caught if "left" in str(w.message)]
    assert len(notices) == 1
    expected = [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0_reverse",
        "lstm.weight_hh_l0_reverse", "gru.weight_ih_l0",
    ]  # fmt: skip
    assert (
        f"left 10 weight matrices dense. of a kind sparsify cannot mask: {expected}" in (notices[0])
    )
    assert sparse_names(model) == ["attn.out_proj", "sep.out_proj", "fc", "head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded on purpose: nothing to say
        sparsify(Recurrent(), 0.3, exclude=["lstm", "gru", "attn", "sep"])


def test_one_layer_under_two_names_is_not_a_tie():
    model = nn.Module()
    model.a = model.b = nn.Linear(6, 6)
    sparsify(model, 0.5)
    assert sparse_names(model) == ["a"] and model.b is model.a


# ------------------------------------------------------ weights computed from others


class Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(-1, -2)


def old_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still in use
        return nn.utils.weight_norm(module)


COMPUTED = {
    "weight_norm": (P.weight_norm, r"\['_WeightNorm'\]"),
    "spectral_norm": (P.spectral_norm, r"\['_SpectralNorm'\]"),
    "user parametrization": (
        lambda m: parametrize.register_parametrization(m, "weight", Symmetric()),
        r"\['Symmetric'\]",
    ),
    "old weight_norm": (old_weight_norm, r"\['WeightNorm'\]"),
    "old spectral_norm": (nn.utils.spectral_norm, r"\['SpectralNorm'\]"),
}


def computed_net(how: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 2))
    COMPUTED[how][0](model[2])
    return model


@pytest.mark.parametrize("how", list(COMPUTED))
def test_a_weight_computed_from_other_tensors_is_refused_by_name(snapshot, assert_untouched, how):
    model = computed_net(how)
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=rf"layer '2' \(Linear\) computes its weight with {COMPUTED[how][1]}.*"
        r"exclude=\['2'\]",
    ):
        sparsify(model, 0.5)
    assert_untouched(model, snap)


@pytest.mark.parametrize("how", list(COMPUTED))
def test_excluding_a_computed_weight_leaves_exactly_that_layer_dense(how):
    model = sparsify(computed_net(how), 0.5, distribution="uniform", exclude="2")
    assert sparse_names(model) == ["0", "3"]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    # What the layers compute with: the sparse ones at their density, the excluded one
    # is not a sparse layer (it computes densely, as the user chose).
    assert effective_density(model.eval(), x) == {"0": 0.5, "3": 0.5}
    assert int(model[2].weight.count_nonzero()) == model[2].weight.numel()


def test_a_lazy_layer_is_refused_until_initialized():
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 4))
    weight = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '0' \(LazyLinear\) .*run one forward pass"):
        sparsify(model, 0.5)
    assert type(model[1]) is nn.Linear and torch.equal(model[1].weight, weight)
    model(torch.randn(2, 3))
    assert sparse_names(sparsify(model, 0.5)) == ["0", "1"]


def test_effective_density_of_a_transformer_encoder_reads_the_attention_output_weights():
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: its share is
    # that of the weight handed out, which is what the attention computes with.
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # in_proj_weight left dense: tested above
        sparsify(model, 0.3)
    got = effective_density(model, torch.randn(5, 3, 16))
    assert got == {x.name: x.active / x.numel for x in sparse_layers(model)}
    assert "layers.1.self_attn.out_proj" in got
