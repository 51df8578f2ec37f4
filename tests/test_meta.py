"""Meta-device models: ``sparsify`` records the masks, ``sp.materialize`` draws them
after ``to_empty``, identically to an eager ``sparsify`` with the same seed."""

from __future__ import annotations

import helpers
import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_param as sp


@pytest.fixture(autouse=True)
def _one_thread():
    with helpers.torch_threads(1):
        yield


def meta_tiny(**kw) -> helpers.TinyNet:
    with torch.device("meta"):
        model = helpers.TinyNet()
    return sp.sparsify(model, **kw)


@given(
    seed=st.integers(0, 2**31 - 1),
    density=st.floats(0.05, 1.0),
    distribution=st.sampled_from(["erk", "er", "uniform"]),
    sparse_init=st.booleans(),
    structure=st.sampled_from([None, "fan_in"]),
)
def test_materialize_equals_eager_sparsify(seed, density, distribution, sparse_init, structure):
    kw = dict(
        density=density,
        distribution=distribution,
        seed=seed,
        sparse_init=sparse_init,
        structure=structure,
    )
    torch.manual_seed(seed)
    eager = sp.sparsify(helpers.TinyNet(), **kw)
    model = meta_tiny(**kw)
    assert all(t.is_meta for t in model.state_dict().values())
    model.to_empty(device="cpu")
    torch.manual_seed(seed)  # reset_parameters draws the same init as TinyNet()
    assert sp.materialize(model) is model
    expected = eager.state_dict()
    assert list(model.state_dict()) == list(expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    helpers.check_invariants(model)
    for layer, twin in zip(sp.sparse_layers(model), sp.sparse_layers(eager)):
        assert layer.parametrization.allocated == twin.parametrization.allocated
        assert layer.parametrization.plan is None


def test_meta_forward_and_allocation_before_materialize():
    model = meta_tiny(density=0.3)
    out = model(torch.randn(8, *helpers.IN_SHAPE, device="meta"))
    assert out.is_meta and out.shape == (8, helpers.N_CLASSES)
    eager = sp.sparsify(helpers.TinyNet(), 0.3)
    allocated = [layer.parametrization.allocated for layer in sp.sparse_layers(model)]
    assert allocated == [layer.active for layer in sp.sparse_layers(eager)]
    assert "(meta)" in repr(model.fc1.parametrizations.weight[0])


def test_materialize_zeroes_garbage_and_runs_init_fn_after_drawing():
    model = meta_tiny(density=0.3)
    model.to_empty(device="cpu")
    for layer in sp.sparse_layers(model):
        layer.weight.detach().fill_(float("nan"))  # what to_empty may leave
    seen = []

    def init_fn(m):
        seen.append({layer.name: layer.mask.clone() for layer in sp.sparse_layers(m)})
        for layer in sp.sparse_layers(m):
            layer.module.bias.zero_()

    sp.materialize(model, init_fn=init_fn)
    assert len(seen) == 1
    for name, mask in helpers.masks(model).items():
        assert torch.equal(seen[0][name], mask), name  # drawn before init_fn ran
    for layer in sp.sparse_layers(model):
        assert bool((layer.weight[~layer.mask] == 0).all()), layer.name
        assert bool(layer.weight[layer.mask].isnan().all()), layer.name  # init_fn's to do
        assert torch.equal(layer.ever_active, layer.mask)


def test_materialize_refuses_and_leaves_model_as_it_was(assert_untouched, snapshot):
    model = meta_tiny(density=0.3)
    with pytest.raises(ValueError, match=r"still on the meta device; call model.to_empty"):
        sp.materialize(model)
    assert all(layer.parametrization.plan is not None for layer in sp.sparse_layers(model))
    eager = helpers.build_model()
    snap = snapshot(eager)
    with pytest.raises(ValueError, match="no sparse layer is waiting for its mask"):
        sp.materialize(eager)
    assert_untouched(eager, snap)


def test_sparsify_refuses_a_model_partly_on_meta():
    model = helpers.TinyNet()
    model.fc2.to("meta")
    params = [id(p) for p in model.parameters()]
    dense = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(ValueError, match=r"\['fc2'\] are on the meta device and others"):
        sp.sparsify(model, 0.3)
    assert next(sp.sparse_layers(model), None) is None
    assert [id(p) for p in model.parameters()] == params
    for key, value in dense.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_timm_model_on_meta_gets_the_eager_masks_and_trains():
    eager = sp.sparsify(timm.create_model("resnet18", num_classes=10), 0.1, seed=5)
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=10)
    sp.sparsify(model, 0.1, seed=5)
    model.to_empty(device="cpu")

    def init_fn(m):  # buffers and norms as PyTorch does, then timm's own weight init
        for module in m.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        m.init_weights()

    sp.materialize(model, init_fn=init_fn)
    for name, mask in helpers.masks(eager).items():
        assert torch.equal(helpers.masks(model)[name], mask), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = sp.RigL(model, optimizer, total_steps=4, update_interval=2, stop=1.0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert [r["step"] for r in scheduler.history] == [2]
    helpers.check_invariants(model, optimizer)


def test_training_before_materialize_is_refused():
    # to_empty gives storage holding whatever memory held: masks drawn from it would be
    # garbage (density far from the allocation, NaN weights), so nothing may run on it.
    model = meta_tiny(density=0.1)
    model.to_empty(device="cpu")
    x = torch.randn(2, *helpers.IN_SHAPE)
    with pytest.raises(RuntimeError, match=r"sp\.materialize\(model\)"):
        model(x)
    sp.materialize(model)
    assert torch.isfinite(model(x)).all()


def test_a_failing_init_fn_leaves_the_model_waiting_for_materialize():
    model = meta_tiny(density=0.1)
    model.to_empty(device="cpu")

    def broken(_: torch.nn.Module) -> None:
        raise OSError("weights file missing")

    with pytest.raises(OSError, match="weights file missing"):
        sp.materialize(model, init_fn=broken)
    with pytest.raises(RuntimeError, match="materialize"):
        model(torch.randn(2, *helpers.IN_SHAPE))
    sp.materialize(model)
    helpers.check_invariants(model)
