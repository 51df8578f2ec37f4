"""Layer allocation: ``apportion``, ``layer_scores`` and ``allocate``
(docs/guide/sparsify.md, Allocation)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparse_param.allocation import DISTRIBUTIONS, allocate, apportion, layer_scores

TOL = 1e-6  # float slack on real-valued shares (counts are integers)

# ------------------------------------------------------------------------- strategies

weight_values = st.one_of(
    st.just(0.0),
    st.integers(1, 1000).map(float),
    st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False),
)


@st.composite
def apportion_problems(draw, weights=weight_values, max_n=8):
    """(total, weights, lower, upper) with a feasible total."""
    n = draw(st.integers(1, max_n))
    w = draw(st.lists(weights, min_size=n, max_size=n))
    lower = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    upper = [lo + draw(st.integers(0, 300)) for lo in lower]
    total = draw(st.integers(sum(lower), sum(upper)))
    return total, w, lower, upper


@st.composite
def layer_shapes(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    c_out, c_in = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    kernel = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}[kind]
    return (c_out, c_in, *draw(st.lists(st.integers(1, 5), min_size=kernel, max_size=kernel)))


shape_maps = st.lists(layer_shapes(), min_size=1, max_size=10).map(
    lambda shapes: {f"layer{i}": s for i, s in enumerate(shapes)}
)
densities = st.floats(1e-4, 1.0, allow_nan=False, exclude_min=False)


def total_of(shapes):
    return sum(math.prod(s) for s in shapes.values())


def feasible(shapes, density):
    return round(density * total_of(shapes)) >= len(shapes)


# --------------------------------------------------------------------------- apportion


@given(apportion_problems())
def test_apportion_sum_is_exact_and_bounds_hold(problem):
    total, weights, lower, upper = problem
    counts = apportion(total, weights, lower, upper)
    assert len(counts) == len(weights)
    assert all(isinstance(c, int) for c in counts)
    assert sum(counts) == total
    assert all(lo <= c <= hi for c, lo, hi in zip(counts, lower, upper))


@given(apportion_problems())
def test_apportion_is_within_one_of_the_real_bounded_share(bounded_shares, problem):
    total, weights, lower, upper = problem
    counts = apportion(total, weights, lower, upper)
    _, shares = bounded_shares(total, weights, lower, upper)
    for c, share in zip(counts, shares):
        assert abs(c - share) < 1 + TOL, (counts, shares)


@given(
    st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=8),
    st.integers(0, 5000),
)
def test_apportion_is_proportional_when_no_bound_binds(weights, total):
    n = len(weights)
    counts = apportion(total, weights, [0] * n, [total] * n)
    assert sum(counts) == total
    for c, w in zip(counts, weights):
        share = total * w / sum(weights)
        assert math.floor(share - TOL) <= c <= math.ceil(share + TOL)
        assert abs(c - share) < 1 + TOL


@given(apportion_problems(weights=st.integers(0, 1000).map(float)), st.data())
def test_apportion_is_monotone_in_the_weights(problem, data):
    total, weights, lower, upper = problem
    counts = apportion(total, weights, lower, upper)
    n = len(weights)
    # A layer with a larger weight and no tighter bounds never gets fewer units.
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j] and lower[i] >= lower[j] and upper[i] >= upper[j]:
                assert counts[i] >= counts[j], (i, j, counts)
    # Raising one layer's weight never lowers that layer's count.
    i = data.draw(st.integers(0, n - 1))
    raised = list(weights)
    raised[i] += data.draw(st.integers(1, 1000))
    assert apportion(total, raised, lower, upper)[i] >= counts[i]


@given(st.integers(1, 10), st.integers(0, 100))
def test_apportion_equal_weights_split_evenly_ties_to_lower_index(n, total):
    counts = apportion(total, [1.0] * n, [0] * n, [total] * n)
    q, r = divmod(total, n)
    assert counts == [q + 1] * r + [q] * (n - r)


def test_apportion_unweighted_layers_take_what_the_weighted_cannot_hold():
    # Layer 0 can hold 3 at most; the rest must go to the weight-0 layer.
    assert apportion(10, [1.0, 0.0], [0, 0], [3, 100]) == [3, 7]
    # With room to spare the weight-0 layer stays at its lower bound.
    assert apportion(3, [1.0, 0.0], [0, 2], [5, 100]) == [1, 2]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((5, [1.0, 1.0], [0], [5, 5]), "same length"),
        ((5, [1.0, 1.0], [3, 0], [2, 5]), "lower bound exceeds"),
        ((5, [1.0, -1.0], [0, 0], [5, 5]), "non-negative"),
        ((5, [1.0, math.nan], [0, 0], [5, 5]), "finite"),
        ((5, [1.0, math.inf], [0, 0], [5, 5]), "finite"),
        ((11, [1.0, 1.0], [0, 0], [5, 5]), "cannot share 11"),
        ((1, [1.0, 1.0], [1, 1], [5, 5]), "cannot share 1"),
    ],
)
def test_apportion_rejects_infeasible_requests(args, words):
    with pytest.raises(ValueError, match=words):
        apportion(*args)


# ------------------------------------------------------------------------ layer_scores


@given(layer_shapes())
def test_layer_scores_follow_the_formulas(shape):
    assert layer_scores(shape, "uniform") == 1.0
    n_out, n_in = shape[0], shape[1]
    assert layer_scores(shape, "er") == pytest.approx((n_in + n_out) / (n_in * n_out))
    assert layer_scores(shape, "erk") == pytest.approx(sum(shape) / math.prod(shape))


def test_erk_score_of_a_conv_counts_the_kernel_dims():
    # docs/guide/sparsify.md, Allocation: (c_out + c_in + k_h + k_w) / (c_out * c_in * k_h * k_w)
    assert layer_scores((64, 32, 3, 3), "erk") == pytest.approx((64 + 32 + 3 + 3) / (64 * 32 * 9))
    assert layer_scores((64, 32, 3, 3), "er") == pytest.approx((64 + 32) / (64 * 32))


def test_layer_scores_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution 'erdos'"):
        layer_scores((3, 3), "erdos")


# --------------------------------------------------------------------------- allocate


@given(shape_maps, densities, st.sampled_from(DISTRIBUTIONS))
def test_allocate_named_distributions_are_exact(shapes, density, distribution):
    if not feasible(shapes, density):
        with pytest.raises(ValueError, match="at least one"):
            allocate(shapes, density, distribution)
        return
    counts = allocate(shapes, density, distribution)
    assert list(counts) == list(shapes)
    assert sum(counts.values()) == round(density * total_of(shapes))
    for name, shape in shapes.items():
        assert 1 <= counts[name] <= math.prod(shape)
        assert isinstance(counts[name], int)


@given(shape_maps, densities)
def test_allocate_erk_matches_the_formula(erk_reference, shapes, density):
    if not feasible(shapes, density):
        return
    counts = allocate(shapes, density, "erk")
    ref = erk_reference(shapes, density)
    for name in shapes:
        # within one of the real-valued ERK share (with the at-least-one bound)
        assert abs(counts[name] - ref.share[name]) < 1 + TOL, name
        # capped layers are dense
        if name in ref.dense:
            assert counts[name] == ref.numel[name], name
    if ref.iterative_eps is not None:
        # No layer needed the at-least-one bound: the allocation loop of
        # docs/guide/sparsify.md is the solution.
        for name in shapes:
            real = min(1.0, ref.iterative_eps * ref.score[name]) * ref.numel[name]
            assert real == pytest.approx(ref.share[name], rel=1e-9, abs=1e-9), name
            assert abs(counts[name] - real) < 1 + TOL, name
            if ref.iterative_eps * ref.score[name] > 1 + TOL:
                assert counts[name] == ref.numel[name], name


@given(shape_maps, densities, st.sampled_from(["uniform", "er"]))
def test_allocate_uniform_and_er_are_within_one_of_their_share(
    bounded_shares, shapes, density, distribution
):
    if not feasible(shapes, density):
        return
    counts = allocate(shapes, density, distribution)
    names = list(shapes)
    numel = [math.prod(shapes[n]) for n in names]

    def score(s):
        return 1.0 if distribution == "uniform" else (s[0] + s[1]) / (s[0] * s[1])

    weights = [score(shapes[n]) * k for n, k in zip(names, numel)]
    target = round(density * sum(numel))
    _, shares = bounded_shares(target, weights, [1] * len(names), numel)
    for name, share in zip(names, shares):
        assert abs(counts[name] - share) < 1 + TOL, name
    plain = [target * k / sum(numel) for k in numel]  # uniform, bounds aside
    if distribution == "uniform" and all(share >= 1 for share in plain):
        for name, share in zip(names, plain):
            assert abs(counts[name] - share) < 1 + TOL


def test_allocate_erk_caps_a_small_shortcut_dense_and_keeps_the_total():
    # sparse_learning #20: without the cap the 1x1 shortcut got density > 1 and the model
    # ended below target.
    shapes = {"conv": (512, 512, 3, 3), "shortcut": (8, 4, 1, 1), "fc": (10, 512)}
    density = 0.1
    total = total_of(shapes)
    naive_eps = round(density * total) / sum(sum(s) for s in shapes.values())
    assert naive_eps * sum(shapes["shortcut"]) / math.prod(shapes["shortcut"]) > 1
    counts = allocate(shapes, density, "erk")
    assert counts["shortcut"] == math.prod(shapes["shortcut"])
    assert sum(counts.values()) == round(density * total)


def test_allocate_full_density_is_dense():
    shapes = {"a": (4, 3), "b": (8, 4, 3, 3)}
    for distribution in DISTRIBUTIONS:
        assert allocate(shapes, 1.0, distribution) == {"a": 12, "b": 288}


@given(shape_maps, densities, st.data())
def test_allocate_mapping_gives_each_layer_its_rounded_density(shapes, density, data):
    names = list(shapes)
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    mapping = {n: data.draw(st.floats(1e-3, 1.0), label=n) for n in chosen}
    counts = allocate(shapes, density, mapping)
    for name, shape in shapes.items():
        d = mapping.get(name, density)
        assert counts[name] == max(1, round(d * math.prod(shape)))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, math.inf])
def test_allocate_rejects_densities_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        allocate({"a": (4, 4)}, bad, "erk")


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_allocate_rejects_non_numeric_density(bad):
    with pytest.raises(TypeError, match="density must be a number"):
        allocate({"a": (4, 4)}, bad, "erk")


def test_allocate_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="unknown distribution 'erk2'.*uniform"):
        allocate({"a": (4, 4)}, 0.5, "erk2")


def test_allocate_rejects_mapping_with_unknown_layers():
    with pytest.raises(ValueError, match=r"not sparse targets: \['nope'\]"):
        allocate({"a": (4, 4)}, 0.5, {"nope": 0.5})


@pytest.mark.parametrize("bad", [0, 1.5, math.nan, -1])
def test_allocate_rejects_mapping_densities_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"density of 'a' must be in \(0, 1\]"):
        allocate({"a": (4, 4), "b": (4, 4)}, 0.5, {"a": bad})


def test_allocate_rejects_no_layers_and_empty_layers():
    with pytest.raises(ValueError, match="no layers"):
        allocate({}, 0.5, "erk")
    with pytest.raises(ValueError, match=r"no weights: \['empty'\]"):
        allocate({"a": (4, 4), "empty": (0, 4)}, 0.5, "erk")


def test_allocate_rejects_fewer_weights_than_layers():
    shapes = {f"l{i}": (10, 10) for i in range(5)}  # 500 weights, 5 layers
    with pytest.raises(ValueError, match="gives 4 active weights for 5 layers"):
        allocate(shapes, 4 / 500, "uniform")
    assert sum(allocate(shapes, 5 / 500, "uniform").values()) == 5


@pytest.mark.parametrize("shape", [(10, 20.5), (10, True), "10x20", (10, -2)])
def test_allocate_rejects_shapes_that_are_not_whole_dims(shape):
    with pytest.raises(TypeError, match=r"shape of .a. must be a sequence of non-negative ints"):
        allocate({"a": shape}, 0.5)


def test_allocate_takes_numpy_numbers():
    np = pytest.importorskip("numpy")
    assert allocate({"a": (np.int64(10), 20)}, np.float32(0.5)) == {"a": 100}
