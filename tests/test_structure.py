"""Structured sparsity (issue 10): constant fan-in and N:M masks stay exact.

* every structure holds after ``sparsify`` for random Linear and Conv shapes; N:M on a
  fan-in that M does not divide is refused (no padding), leaving the model untouched;
* the grouped selection keeps every group's count exact for random masks and scores,
  drops only active weights, grows only inactive ones, and drops the lowest scores;
* Static, SET, RigL, SRigL and GMP keep the structure through 100 updates with SGD and
  AdamW (and the invariants in docs/architecture.md); SNFS, DSR and GraNet refuse structured models;
* SRigL ablates a unit without salient weights and redistributes its budget;
* resume is bit-identical; checkpoints record the structure, and a checkpoint whose
  mask violates it, or of another structure, is refused;
* 2:4 export checks the layout on CPU and names CUDA as the requirement.
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import sparse_param as sp
from sparse_param.allocation import allocate
from sparse_param.structure import (
    Structure,
    group_counts,
    parse_structure,
    random_mask,
    select,
    structure_of,
    violation,
)

STRUCTURES = ["fan_in", "2:4", "1:4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


def assert_structure(model: nn.Module, structure: str) -> None:
    parsed = parse_structure(structure)
    for layer in sp.sparse_layers(model):
        assert structure_of(layer.parametrization) == parsed, layer.name
        assert violation(layer.mask, parsed) is None, (layer.name, violation(layer.mask, parsed))


# ------------------------------------------------------------------------- parsing


def test_parse_structure():
    assert parse_structure(None) is None
    assert parse_structure("fan_in") == Structure("fan_in")
    assert parse_structure("2:4") == Structure("n:m", 2, 4)
    assert str(parse_structure("1:4")) == "1:4"
    for bad in ("4:4", "0:4", "2-4", "fanin", "5:4"):
        with pytest.raises(ValueError, match="expected None, 'fan_in' or 'N:M'"):
            parse_structure(bad)
    for s in ("fan_in", "2:4", "3:8"):
        parsed = parse_structure(s)
        assert Structure.decode(parsed.encode()) == parsed


# ---------------------------------------------------------------- sparsify shapes


def _layer(draw) -> nn.Module:
    if draw(st.booleans()):
        return nn.Linear(draw(st.integers(1, 40)), draw(st.integers(1, 12)))
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 6))
    cout = groups * draw(st.integers(1, 6))
    k = draw(st.integers(1, 3))
    return nn.Conv2d(cin, cout, k, groups=groups)


@given(data=st.data(), structure=st.sampled_from(STRUCTURES + ["1:2", "2:8"]))
def test_sparsify_structure_holds_or_is_refused(data, structure, snapshot, assert_untouched):
    layer = _layer(data.draw)
    model = nn.Sequential(layer)
    parsed = parse_structure(structure)
    fan_in = math.prod(layer.weight.shape[1:])  # conv: in_channels / groups · kh · kw
    if parsed.kind == "n:m":
        density = parsed.n / parsed.m
    else:
        density = data.draw(st.floats(0.01, 1.0))
        assume(round(density * layer.weight.numel()) >= 1)  # else refused, as unstructured
    snap = snapshot(model)
    if parsed.kind == "n:m" and fan_in % parsed.m:
        with pytest.raises(ValueError, match=f"not a multiple of M={parsed.m}"):
            sp.sparsify(model, density, structure=structure)
        assert_untouched(model, snap)
        return
    sp.sparsify(model, density, structure=structure, seed=data.draw(st.integers(0, 99)))
    assert_structure(model, structure)
    (sparse,) = sp.sparse_layers(model)
    counts = group_counts(sparse.mask, parsed)
    if parsed.kind == "fan_in":
        k = round(round(density * sparse.numel) / layer.weight.shape[0])
        assert bool((counts == min(max(k, 1), fan_in)).all())  # no ablated unit at start
    else:
        assert sparse.active * parsed.m == sparse.numel * parsed.n
    assert bool((sparse.weight[~sparse.mask] == 0).all())


@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
def test_masks_do_not_depend_on_the_weights(structure):
    # sparsify(seed=0) after torch.manual_seed(0): the mask stream must not be the init's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256))
    init = model[0].weight.detach().clone()
    sp.sparsify(model, 0.5, structure=structure, seed=0)
    (layer,) = sp.sparse_layers(model)
    negative = float((init[layer.mask] < 0).float().mean())
    assert abs(negative - 0.5) < 0.01  # 100k weights: a fair mask is within 0.003


def test_n_m_density_must_match():
    with pytest.raises(ValueError, match=r"N/M = 2/4 = 0.5, but density=0.1 was asked"):
        allocate({"a": (4, 8)}, 0.1, structure="2:4")
    with pytest.raises(ValueError, match="mapping cannot apply"):
        allocate({"a": (4, 8)}, 0.5, {"a": 0.5}, structure="2:4")
    model = helpers.TinyNet()
    with pytest.raises(ValueError, match="density=0.5"):
        sp.sparsify(model, 0.3, structure="2:4", exclude=["conv"])
    assert next(sp.sparse_layers(model), None) is None


@given(
    shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=5).map(
        lambda s: {f"l{i}": shape for i, shape in enumerate(s)}
    ),
    density=st.floats(0.05, 1.0),
    distribution=st.sampled_from(["erk", "er", "uniform"]),
)
def test_fan_in_allocation_is_whole_units(shapes, density, distribution):
    assume(round(density * sum(a * b for a, b in shapes.values())) >= len(shapes))
    counts = allocate(shapes, density, distribution, structure="fan_in")
    plain = allocate(shapes, density, distribution)
    for name, (out, fan_in) in shapes.items():
        k, rest = divmod(counts[name], out)
        assert rest == 0 and 1 <= k <= fan_in
        assert abs(counts[name] - plain[name]) <= out / 2 or k in (1, fan_in)


# ------------------------------------------------------------- grouped selection


@given(
    data=st.data(),
    structure=st.sampled_from(STRUCTURES + ["3:4", "2:8"]),
    out=st.integers(1, 6),
    width=st.integers(1, 4),
)
def test_select_keeps_every_group_exact(data, structure, out, width):
    parsed = parse_structure(structure)
    fan_in = width * (parsed.m if parsed.kind == "n:m" else data.draw(st.integers(1, 5)))
    shape = (out, fan_in)
    count = out * (
        fan_in * parsed.n // parsed.m if parsed.kind == "n:m" else data.draw(st.integers(1, fan_in))
    )
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    old = random_mask(shape, parsed, count, generator)
    per_group = group_counts(old, parsed)
    room = int(torch.minimum(per_group, groups_size(old, parsed) - per_group).sum())
    n = data.draw(st.integers(0, room))
    score = torch.randn(shape, generator=generator)
    if data.draw(st.booleans()):
        score[0, 0] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    drop = select(parsed, old, n, score, lowest=True, generator=generator)
    assert int(drop.sum()) == n and not bool((drop & ~old).any())
    # The lowest scores go, except where a group is at its bound (it must keep room to
    # regrow): in a group below its bound no kept weight scores below a dropped one.
    ranked = torch.where(torch.isfinite(score), score, -math.inf)
    if n:
        worst_dropped = float(ranked[drop].max())
        cap = torch.minimum(per_group, groups_size(old, parsed) - per_group)
        below = group_counts(drop, parsed) < cap
        kept_view = torch.where(old & ~drop, ranked, math.inf)
        kept_view = kept_view.reshape(-1, groups_size(old, parsed))
        assert bool((kept_view[below] >= worst_dropped).all())
    keep = old & ~drop
    grow_score = None if data.draw(st.booleans()) else torch.randn(shape, generator=generator)
    grow = select(parsed, ~old, n, grow_score, lowest=False, kept=keep, generator=generator)
    assert not bool((grow & old).any())
    new = keep | grow
    assert torch.equal(group_counts(new, parsed), per_group)
    assert violation(new, parsed) is None


def groups_size(mask: torch.Tensor, structure: Structure) -> int:
    return mask[0].numel() if structure.kind == "fan_in" else structure.m


# ------------------------------------------------------------------ algorithms


def build(algorithm, structure, optimizer_kind, init_seed=0, mask_seed=0, steps=100):
    parsed = parse_structure(structure)
    exclude = ["conv"] if parsed.kind == "n:m" else []  # conv fan-in 18: not a multiple of 4
    density = parsed.n / parsed.m if parsed.kind == "n:m" else 0.2
    kw = dict(total_steps=steps, update_interval=1, stop=1.0, seed=3)
    if algorithm == "gmp":  # dense start, pruned to the structure
        model = helpers.build_model(init_seed, 1.0, mask_seed, exclude=exclude)
        kw.update(density=density, structure=structure, update_interval=2, stop=0.5)
    else:
        model = helpers.build_model(
            init_seed, density, mask_seed, exclude=exclude, structure=structure
        )
    optimizer = helpers.OPTIMIZERS[optimizer_kind](model)
    if algorithm == "static":
        return model, optimizer, sp.Static(model, optimizer)
    return model, optimizer, sp.ALGORITHMS[algorithm](model, optimizer, **kw)


def train(model, optimizer, steps, after_step=None):
    for step in steps:
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(step)).backward()
        optimizer.step()
        if after_step is not None:
            after_step()


KEEPERS = [(a, s) for a in ("static", "set", "rigl", "gmp") for s in ("fan_in", "2:4")]


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("algorithm, structure", KEEPERS + [("srigl", "fan_in")])
def test_algorithms_keep_the_structure_for_100_updates(algorithm, structure, optimizer_kind):
    steps = 200 if algorithm == "gmp" else 100
    model, optimizer, scheduler = build(algorithm, structure, optimizer_kind, steps=steps)
    parsed = parse_structure(structure)
    allocated = {layer.name: layer.parametrization.allocated for layer in scheduler.layers}
    before = helpers.counts(model)

    def check():
        helpers.check_invariants(model, optimizer)
        for layer in scheduler.layers:
            counts = group_counts(layer.mask, parsed)
            if algorithm == "gmp":  # balanced on the way, the structure at the end
                assert counts.unique().numel() == 1, layer.name
            else:
                assert violation(layer.mask, parsed) is None, layer.name
        now = helpers.counts(model)
        if algorithm in ("static", "set", "rigl"):
            assert now == before
        elif algorithm == "srigl":  # whole units of k', never above the allocation
            for layer in scheduler.layers:
                units = int((group_counts(layer.mask, parsed) > 0).sum())
                assert allocated[layer.name] - units < now[layer.name] <= allocated[layer.name]

    train(model, optimizer, range(steps), check)
    assert len(scheduler.history) >= (50 if algorithm == "gmp" else 100) or algorithm == "static"
    if algorithm == "gmp":
        for layer in scheduler.layers:
            assert violation(layer.mask, parsed) is None, layer.name
        assert sp.density(model) == pytest.approx(
            parsed.n / parsed.m if parsed.kind == "n:m" else sp.density(model)
        )
    elif algorithm != "static":
        assert sp.itop_rate(model) > sp.density(model)  # the topology did move


@pytest.mark.parametrize("algorithm", ["snfs", "dsr", "granet"])
def test_cross_layer_algorithms_refuse_structure(algorithm):
    model = helpers.build_model(density=0.5, structure="fan_in")
    optimizer = helpers.OPTIMIZERS["sgd"](model)
    kw = {"density": 0.2} if algorithm == "granet" else {}
    with pytest.raises(ValueError, match="breaks the model's fan_in structure"):
        sp.ALGORITHMS[algorithm](model, optimizer, total_steps=10, **kw)
    assert not optimizer._optimizer_step_post_hooks
    assert "sparse_param" not in optimizer.state_dict()


def test_srigl_needs_fan_in_and_gmp_needs_balanced_start():
    model = helpers.build_model(density=0.5, structure="2:4", exclude=["conv"])
    optimizer = helpers.OPTIMIZERS["sgd"](model)
    with pytest.raises(ValueError, match="SRigL needs constant fan-in"):
        sp.SRigL(model, optimizer, total_steps=10)
    model = helpers.build_model(density=0.5)
    optimizer = helpers.OPTIMIZERS["sgd"](model)
    with pytest.raises(ValueError, match="start with the same active count"):
        sp.GMP(model, optimizer, total_steps=10, density=0.2, structure="fan_in")
    assert not optimizer._optimizer_step_post_hooks


def test_srigl_ablates_a_unit_without_salient_weights():
    torch.manual_seed(0)
    model = helpers.build_model(density=0.3, structure="fan_in")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the update moves
    scheduler = sp.SRigL(model, optimizer, total_steps=10, update_interval=1, stop=1.0)
    fc2 = next(layer for layer in scheduler.layers if layer.name == "fc2")
    fc3 = next(layer for layer in scheduler.layers if layer.name == "fc3")
    with torch.no_grad():
        fc2.weight[:4] *= 1e-6  # units 0-3 of fc2: tiny weights ...
        fc3.weight[:, :4] = 0  # ... and no gradient (nothing reads their outputs)
    before = fc2.active
    k = before // fc2.mask.shape[0]
    train(model, optimizer, range(1))
    assert scheduler.ablated()["fc2"] == 4
    counts = fc2.mask.sum(1)
    assert not bool(counts[:4].any())
    k_new = before // 12  # the budget of the 4 ablated units goes to the 12 others
    assert k_new > k and bool((counts[4:] == k_new).all())
    assert scheduler.ablated()["fc3"] == 0  # the classifier is never ablated
    helpers.check_invariants(model, optimizer)


def test_srigl_without_ablation_is_constant_fan_in_rigl():
    runs = []
    for cls, kw in ((sp.SRigL, {"gamma_sal": 0.0}), (sp.RigL, {})):
        model = helpers.build_model(density=0.2, structure="fan_in")
        optimizer = helpers.OPTIMIZERS["sgd"](model)
        cls(model, optimizer, total_steps=30, update_interval=3, **kw)
        train(model, optimizer, range(30))
        runs.append(helpers.masks(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


# ------------------------------------------------------------ resume, checkpoints


@pytest.mark.parametrize(
    "algorithm, structure",
    [("rigl", "fan_in"), ("srigl", "fan_in"), ("set", "2:4"), ("gmp", "2:4")],
)
def test_resume_is_bit_identical(algorithm, structure, tmp_path):
    n, k = 24, 10
    reference = build(algorithm, structure, "adamw", steps=n)
    train(reference[0], reference[1], range(n))
    model, optimizer, _ = build(algorithm, structure, "adamw", steps=n)
    train(model, optimizer, range(k))
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    model, optimizer, scheduler = build(
        algorithm, structure, "adamw", init_seed=1, mask_seed=77, steps=n
    )
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["opt"])
    assert scheduler.step_count == k
    train(model, optimizer, range(k, n))
    assert scheduler.history == reference[2].history
    state, expected = model.state_dict(), reference[0].state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_checkpoint_records_structure_and_refuses_violations(snapshot, assert_untouched):
    model = helpers.build_model(density=0.2, structure="fan_in")
    state = model.state_dict()
    assert Structure.decode(state["fc1.parametrizations.weight.0.structure"]) == Structure("fan_in")
    assert not any(k.endswith("structure") for k in sp.dense_state_dict(state))

    bad = {k: v.clone() for k, v in state.items()}
    row = bad["fc2.parametrizations.weight.0.mask"][0]
    row[(~row).nonzero()[0]] = True  # unit 0 gets one more input than the others
    bad["fc2.parametrizations.weight.0.ever_active"] |= bad["fc2.parametrizations.weight.0.mask"]
    fresh = helpers.build_model(init_seed=1, density=0.2, mask_seed=5, structure="fan_in")
    snap = snapshot(fresh)
    with pytest.raises(RuntimeError, match="layer 'fc2': the mask violates structure fan_in"):
        fresh.load_state_dict(bad)
    assert_untouched(fresh, snap)  # refused before any tensor was copied
    with pytest.raises(RuntimeError, match="violates structure fan_in"):
        fresh.fc2.load_state_dict({k[4:]: v for k, v in bad.items() if k.startswith("fc2.")})
    assert_untouched(fresh, snap)
    unrecorded = {k: v for k, v in bad.items() if not k.endswith(".structure")}
    with pytest.raises(RuntimeError, match="violates structure fan_in"):
        fresh.load_state_dict(unrecorded, strict=False)  # the layer's own structure holds
    assert_untouched(fresh, snap)

    other = helpers.build_model(density=0.5, structure="2:4", exclude=["conv"])
    clash = {k: v for k, v in state.items() if not k.startswith("conv.")}
    clash["conv.weight"], clash["conv.bias"] = other.conv.weight, other.conv.bias
    with pytest.raises(RuntimeError, match="sparsified with structure 2:4, the checkpoint holds"):
        other.load_state_dict(clash)

    plain = helpers.build_model(density=0.2)
    with pytest.raises(RuntimeError, match="unexpected keys.*structure"):
        plain.load_state_dict(state)
    fresh.load_state_dict(state)  # the valid checkpoint loads
    assert_structure(fresh, "fan_in")


# --------------------------------------------------------------------- 2:4 export


def test_semi_structured_export_checks_layout_on_cpu(snapshot, assert_untouched):
    model = helpers.build_model(density=0.5, structure="2:4", exclude=["conv"])
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="CUDA only"):
        sp.to_sparse(model, format="semi_structured", min_sparsity=0.5)
    assert_untouched(model, snap)
    for layer in sp.sparse_layers(model):  # the layout the kernels need: 2 of every 4
        assert bool((layer.mask.reshape(-1, 4).sum(1) == 2).all())

    unstructured = helpers.build_model(density=0.5, exclude=["conv"])
    snap = snapshot(unstructured)
    with pytest.raises(ValueError, match="groups of 4 inputs have more than 2 active"):
        sp.to_sparse(unstructured, format="semi_structured", min_sparsity=0.5)
    assert_untouched(unstructured, snap)
    with pytest.raises(ValueError, match="unknown format"):
        sp.to_sparse(model, format="bsr")


def test_structure_with_sparse_compute_gives_the_same_masks():
    runs = []
    for compute in ("dense", "sparse"):
        model = helpers.build_model(density=0.2, structure="fan_in", compute=compute)
        optimizer = helpers.OPTIMIZERS["sgd"](model)
        sp.SRigL(model, optimizer, total_steps=30, update_interval=2, stop=1.0)
        train(model, optimizer, range(30))
        assert_structure(model, "fan_in")
        runs.append(helpers.masks(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
