"""SC-SDC: capacity counts and the same-capacity width solver, exact on MLPs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparse_param as sp
from sparse_param.models import MLP, WideResNet

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _mlp_weights(width: int, d_in: int, depth: int, d_out: int) -> int:
    return d_in * width + (depth - 1) * width * width + width * d_out


@given(
    wide=st.integers(4, 120),
    depth=st.integers(1, 3),
    density=st.floats(0.05, 1.0),
    count=st.sampled_from(["weights", "parameters"]),
    seed=st.integers(0, 100),
)
def test_width_solver_is_exact_on_mlps(wide, depth, density, count, seed):
    d_in, d_out = 16, 5  # 4x4 images, 5 classes

    def factory(width: int) -> MLP:
        return MLP([width] * depth, num_classes=d_out, img_size=4)

    sparse = factory(wide)
    sp.sparsify(sparse, density, seed=seed)
    biases = depth * wide + d_out
    active = sum(layer.active for layer in sp.sparse_layers(sparse))
    target = active + (biases if count == "parameters" else 0)
    assert sp.capacity(sparse, count) == target

    def size(w: int) -> int:
        return _mlp_weights(w, d_in, depth, d_out) + (
            depth * w + d_out if count == "parameters" else 0
        )

    # brute force: the nearest width, the narrower one on a tie
    want = min(range(1, wide + 1), key=lambda w: (abs(size(w) - target), w))
    found = sp.same_capacity_dense(factory, sparse, count=count)
    assert found.width == want
    assert found.target == target
    assert found.count == size(want) == sp.capacity(found.model, count)
    assert found.exact == (size(want) == target)
    assert found.model.fc1.out_features == want
    assert not any(True for _ in sp.sparse_layers(found.model))


def test_dense_model_of_the_same_width_is_its_own_counterpart():
    factory = lambda w: MLP([w, w], img_size=8)  # noqa: E731
    found = sp.same_capacity_dense(factory, factory(37))
    assert (found.width, found.exact) == (37, True)


def test_wide_resnet_counterpart_is_nearest():
    factory = lambda k: WideResNet(depth=10, widen_factor=k)  # noqa: E731
    sparse = factory(8)
    sp.sparsify(sparse, 0.1)
    found = sp.same_capacity_dense(factory, sparse)
    with torch.device("meta"):
        sizes = {k: sp.capacity(factory(k)) for k in range(1, 9)}
    assert found.width == min(sizes, key=lambda k: (abs(sizes[k] - found.target), k))
    assert found.count == sizes[found.width]
    assert found.target == sum(layer.active for layer in sp.sparse_layers(sparse))


def test_errors_name_the_problem():
    factory = lambda w: MLP([w], img_size=4)  # noqa: E731
    with pytest.raises(ValueError, match="count must be one of"):
        sp.capacity(factory(3), "connections")
    with pytest.raises(ValueError, match="raise max_width"):
        sp.same_capacity_dense(factory, factory(50), max_width=8)
    shrinking = lambda w: nn.Linear(max(1, 100 - w), 3)  # noqa: E731
    with pytest.raises(ValueError, match="grows with the width"):
        sp.same_capacity_dense(shrinking, nn.Linear(10, 3), max_width=128)
