"""The scheduler at the edges (issue 7): every misuse gets a clear answer, and a refusal
leaves the model, the optimizer and the scheduler bit-for-bit as they were.

* Non-finite active weights are dropped first by every algorithm, counts exact.
* Scheduler state: the algorithm and the layer set are stored and checked, the whole
  state before anything is assigned, through ``load_state_dict`` and through the
  optimizer's state dict; checkpoints stay bounded; the JSON-lines log keeps the detail.
* Life cycle: the README's timm sequence (placeholder ``total_steps``, then the real one)
  resumes at every step of a cycle; schedule attributes are validated properties; a
  scheduler created after ``optimizer.load_state_dict`` warns; a second scheduler is
  refused; ``finalize`` detaches; a schedule with (almost) no updates warns; one
  constructor for all; numpy scalars; DSR's own arguments.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import warnings

import helpers
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sparse_param as sp
from sparse_param.schedules import DROP_SCHEDULES

SCHEDULE = ("total_steps", "update_interval", "drop_fraction", "drop_schedule", "stop", "start")
DYNAMIC = ["set", "rigl", "snfs", "dsr", "gmp", "granet"]
PRUNING = {"gmp", "granet"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def build(algorithm: str, mask_seed: int = 0, optimizer_kind: str = "sgd", **kw):
    """Model, optimizer, scheduler of ``algorithm`` with small test settings."""
    density = 0.5 if algorithm in PRUNING else 0.3
    structure = "fan_in" if algorithm == "srigl" else None  # SRigL needs constant fan-in
    model = helpers.build_model(density=density, mask_seed=mask_seed, structure=structure)
    optimizer = helpers.OPTIMIZERS[optimizer_kind](model)
    cls = sp.ALGORITHMS[algorithm]
    if algorithm != "static":
        kw = {"total_steps": 12, "update_interval": 3, **kw}
    if algorithm in PRUNING:
        kw.setdefault("density", 0.2)
    return model, optimizer, cls(model, optimizer, **kw)


def train(model, optimizer, steps, first=0):
    for i in range(first, first + steps):
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(i)).backward()
        optimizer.step()


def clone(value):
    """A deep copy of a state (tensors cloned), through torch.save as a checkpoint is."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def snapshot(model, optimizer, scheduler=None) -> dict:
    """Everything a refusal must leave alone, bit for bit."""
    layers = list(sp.sparse_layers(model))
    return clone(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "hooks": [
                len(getattr(optimizer, name))
                for name in (
                    "_optimizer_step_post_hooks",
                    "_optimizer_state_dict_post_hooks",
                    "_optimizer_load_state_dict_pre_hooks",
                    "_optimizer_load_state_dict_post_hooks",
                )
            ],
            "armed": [layer.parametrization.capture_dense_grad for layer in layers],
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "schedule": None
            if scheduler is None
            else {name: getattr(scheduler, name) for name in SCHEDULE},
            "attached": sp.attached_scheduler(optimizer) is scheduler,
        }
    )


def assert_untouched(before, model, optimizer, scheduler=None):
    assert_same(before, snapshot(model, optimizer, scheduler))


# -------------------------------------------------------------- §1 non-finite weights

POISON = (math.nan, math.inf, -math.inf)


def _nothing_planned(algorithm: str) -> dict:
    """Arguments with which an update at step 0 drops nothing by the algorithm's own
    rule: whatever is dropped is the engine's doing."""
    if algorithm == "dsr":
        return {"threshold": 1e-30}
    if algorithm == "gmp":
        return {}
    return {"drop_fraction": 0.0}


@settings(max_examples=60)
@given(
    algorithm=st.sampled_from(DYNAMIC),
    layer=st.integers(0, 3),
    n_bad=st.integers(1, 6),
    values=st.lists(st.sampled_from(POISON), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_every_algorithm_drops_non_finite_active_weights_first(
    algorithm, layer, n_bad, values, seed
):
    model, optimizer, scheduler = build(algorithm, mask_seed=seed, **_nothing_planned(algorithm))
    target = scheduler.layers[layer]
    active = target.mask.flatten().nonzero().squeeze(1)
    # room to drop them all: the layer keeps one active weight and regrows into positions
    # inactive before the update (a dense layer has none: see the test below)
    n_bad = min(n_bad, target.active - 1, target.numel - target.active)
    assume(n_bad > 0)
    bad = active[torch.randperm(active.numel(), generator=torch.Generator().manual_seed(seed))]
    bad = bad[:n_bad]
    with torch.no_grad():
        for i, value in zip(bad, values):
            target.weight.view(-1)[i] = value
    if scheduler.needs_dense_grad:
        helpers.arm_and_capture(scheduler, model, helpers.batch(seed))
    before = helpers.counts(model)
    old = helpers.masks(model)
    with pytest.warns(RuntimeWarning, match="non-finite active weights") as caught:
        record = scheduler.update()
    assert {w.filename for w in caught} == {__file__}
    after = helpers.counts(model)
    if algorithm in ("set", "rigl"):
        assert after == before
    elif algorithm in ("snfs", "dsr"):
        assert sum(after.values()) == sum(before.values())
    else:
        assert list(after.values()) == scheduler.target_counts(0) == list(before.values())
    assert not bool(target.mask.flatten()[bad].any()), "a non-finite weight stayed active"
    for each in scheduler.layers:
        assert bool(torch.isfinite(each.weight).all()), each.name
    pruned, grown = helpers.mask_changes(old, helpers.masks(model))
    assert record["pruned"] == {n: int(p.sum()) for n, p in pruned.items()}
    assert record["grown"] == {n: int(g.sum()) for n, g in grown.items()}
    assert record["pruned"][target.name] == n_bad  # nothing else: the rule planned nothing
    helpers.check_invariants(model, optimizer)


def test_dsr_drops_nan_weights_during_training():
    model, optimizer, scheduler = build("dsr", threshold=1e-30, total_steps=40)
    total = sum(helpers.counts(model).values())
    fc1 = scheduler.layers[1]
    bad = fc1.mask.flatten().nonzero().squeeze(1)[:5]
    train(model, optimizer, 2)
    optimizer.zero_grad()
    helpers.loss_of(model, helpers.batch(2)).backward()
    with torch.no_grad():  # e.g. an overflow in the step: NaN written into 5 weights
        fc1.weight.view(-1)[bad] = math.nan
    with pytest.warns(RuntimeWarning, match="5 non-finite active weights in layer 'fc1'") as w:
        optimizer.step()  # step 3: an update
    assert {each.filename for each in w} == {__file__}  # this line, not torch's hook runner
    assert len(scheduler.history) == 1
    assert not bool(fc1.mask.flatten()[bad].any())
    assert sum(helpers.counts(model).values()) == total
    train(model, optimizer, 3, first=3)
    for layer in scheduler.layers:
        assert bool(torch.isfinite(layer.weight).all()), layer.name


def test_a_layer_of_only_non_finite_weights_keeps_one_and_says_so():
    model, optimizer, scheduler = build("set", drop_fraction=0.0)
    fc1 = scheduler.layers[1]
    with torch.no_grad():
        fc1.weight[fc1.mask] = math.inf
    n = fc1.active
    assert fc1.numel - n >= n  # room to regrow all but the one the layer must keep
    with pytest.warns(RuntimeWarning, match=f"{n} non-finite .*'fc1'.*; 1 stay active"):
        scheduler.update()
    assert fc1.active == n
    assert int((~torch.isfinite(fc1.weight)).sum()) == 1


# ---------------------------------------------------------- §3 scheduler state checks

ALGORITHM_PAIRS = [
    ("rigl", "snfs"), ("rigl", "dsr"), ("rigl", "granet"), ("snfs", "rigl"),
    ("dsr", "set"), ("gmp", "granet"), ("static", "set"), ("set", "static"),
]  # fmt: skip


@pytest.mark.parametrize("via", ["scheduler", "optimizer"])
@pytest.mark.parametrize("saved_by, loaded_into", ALGORITHM_PAIRS)
def test_state_of_another_algorithm_is_refused_naming_both(saved_by, loaded_into, via):
    model, optimizer, scheduler = build(saved_by)
    train(model, optimizer, 4)
    saved = clone({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()})
    model2, optimizer2, scheduler2 = build(loaded_into, mask_seed=1)
    train(model2, optimizer2, 2)
    before = snapshot(model2, optimizer2, scheduler2)
    names = (type(scheduler).__name__, type(scheduler2).__name__)
    with pytest.raises(ValueError, match=rf"saved by a {names[0]} .* this one is {names[1]}"):
        if via == "scheduler":
            scheduler2.load_state_dict(saved["scheduler"])
        else:
            optimizer2.load_state_dict(saved["optimizer"])
    assert_untouched(before, model2, optimizer2, scheduler2)


def test_state_of_another_layer_set_is_refused():
    model, optimizer, scheduler = build("rigl")
    train(model, optimizer, 4)
    saved = clone(optimizer.state_dict())
    other = helpers.build_model(exclude=["fc2"])
    other_optimizer = sgd(other)
    other_scheduler = sp.RigL(other, other_optimizer, total_steps=12, update_interval=3)
    before = snapshot(other, other_optimizer, other_scheduler)
    with pytest.raises(ValueError, match="saved for 4 sparse layers and this model has 3"):
        other_optimizer.load_state_dict(saved)
    assert_untouched(before, other, other_optimizer, other_scheduler)


def _corrupt(algorithm: str, key: str, value):
    def change(state):
        state = dict(state)
        state[key] = value(state[key]) if callable(value) else value
        return state

    return algorithm, change


CORRUPT = {
    "no algorithm entry": ("rigl", lambda s: {k: v for k, v in s.items() if k != "algorithm"}),
    "negative step_count": _corrupt("set", "step_count", -1),
    "float step_count": _corrupt("set", "step_count", 3.0),
    "generator of another dtype": _corrupt("set", "generator", lambda g: g.float()),
    "generator too short": _corrupt("rigl", "generator", lambda g: g[:10]),
    "history not a list": _corrupt("rigl", "history", {"step": 3}),
    "layer shapes differ": _corrupt("rigl", "layers", lambda ls: [[n, s[::-1]] for n, s in ls]),
    "snfs buffer shape": _corrupt("snfs", "buffers", lambda b: [x.flatten() for x in b]),
    "snfs buffer missing": _corrupt("snfs", "buffers", lambda b: b[:-1]),
    "dsr threshold nan": _corrupt("dsr", "threshold", math.nan),
    "dsr threshold missing": ("dsr", lambda s: {k: v for k, v in s.items() if k != "threshold"}),
    "gmp initial_counts length": _corrupt("gmp", "initial_counts", lambda c: c[:2]),
    "gmp initial_counts below final": _corrupt("gmp", "initial_counts", lambda c: [1] * len(c)),
}


@pytest.mark.parametrize("via", ["scheduler", "optimizer"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_state_is_refused_before_anything_is_assigned(case, via):
    algorithm, change = CORRUPT[case]
    model, optimizer, scheduler = build(algorithm)
    train(model, optimizer, 5)
    state = change(clone(optimizer.state_dict())["sparse_param"])
    model2, optimizer2, scheduler2 = build(algorithm, mask_seed=1)
    train(model2, optimizer2, 1, first=9)
    before = snapshot(model2, optimizer2, scheduler2)
    with pytest.raises(ValueError, match="load_state_dict"):
        if via == "scheduler":
            scheduler2.load_state_dict(state)
        else:
            optimizer2.load_state_dict({**clone(optimizer.state_dict()), "sparse_param": state})
    assert_untouched(before, model2, optimizer2, scheduler2)


def test_an_optimizer_state_torch_refuses_leaves_the_scheduler_untouched():
    model, optimizer, scheduler = build("rigl")
    train(model, optimizer, 4)
    saved = clone(optimizer.state_dict())
    saved["param_groups"] = saved["param_groups"] * 2  # torch: "number of parameter groups"
    model2, optimizer2, scheduler2 = build("rigl", mask_seed=1)
    before = snapshot(model2, optimizer2, scheduler2)
    with pytest.raises(ValueError, match="parameter groups"):
        optimizer2.load_state_dict(saved)
    assert_untouched(before, model2, optimizer2, scheduler2)


# ------------------------------------------------------------- §3 bounded checkpoints


def test_checkpoints_stay_bounded_and_the_log_keeps_every_record(tmp_path):
    log = tmp_path / "updates.jsonl"
    model, optimizer, scheduler = build(
        "set", total_steps=400, update_interval=1, stop=1.0, history_size=5, log_path=log
    )
    sizes = {}
    for updates in (10, 60):
        train(model, optimizer, updates - scheduler.step_count, first=scheduler.step_count)
        sizes[updates] = len(pickle.dumps(clone(optimizer.state_dict())["sparse_param"]))
        state = optimizer.state_dict()["sparse_param"]
        assert [r["step"] for r in state["history"]] == list(range(updates - 4, updates + 1))
        assert state["num_updates"] == updates
    assert abs(sizes[60] - sizes[10]) <= 16, sizes  # a few digits longer at most
    assert len(scheduler.history) == 60  # in memory: every record of this process
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == scheduler.history

    # resume: the window and the update count come back; the log goes on
    model2, optimizer2, scheduler2 = build(
        "set", mask_seed=3, total_steps=400, update_interval=1, stop=1.0, history_size=5,
        log_path=log,
    )  # fmt: skip
    model2.load_state_dict(model.state_dict())
    optimizer2.load_state_dict(optimizer.state_dict())
    assert scheduler2.num_updates == 60
    assert scheduler2.history == scheduler.history[-5:]
    train(model2, optimizer2, 3, first=60)
    assert scheduler2.num_updates == 63
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 64))


def test_history_size_zero_keeps_no_record_in_the_state():
    model, optimizer, scheduler = build("rigl", history_size=0)
    train(model, optimizer, 6)
    assert scheduler.state_dict()["history"] == [] and len(scheduler.history) == 2


def test_log_path_in_a_missing_folder_is_refused(tmp_path):
    model = helpers.build_model()
    optimizer = sgd(model)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="does not exist"):
        sp.SET(model, optimizer, total_steps=10, log_path=tmp_path / "missing" / "log.jsonl")
    assert_untouched(before, model, optimizer)


# ------------------------------------------------- §4 the README's timm sequence, resumed

CYCLE = 12  # steps; updates every 3 steps until 0.75 · 12 = 9


@pytest.mark.parametrize("algorithm", ["rigl", "granet", "snfs", "dsr"])
def test_readme_timm_sequence_resumes_at_every_step_of_a_cycle(algorithm):
    """create_model → sparsify → optimizer → Method(total_steps=1) → resume (model and
    optimizer state) → ``scheduler.total_steps = T`` → train: bit-identical to the
    uninterrupted run, whatever the step of the checkpoint."""
    # DSR: interval 1 doubling over the 9 steps: updates at 1, 2, 4, 8
    extra = {"threshold": 0.02, "update_interval": 1} if algorithm == "dsr" else {}

    def readme_sequence(mask_seed):
        model, optimizer, scheduler = build(algorithm, mask_seed=mask_seed, total_steps=1, **extra)
        return model, optimizer, scheduler

    model, optimizer, scheduler = readme_sequence(0)
    scheduler.total_steps = CYCLE
    checkpoints = []
    for step in range(CYCLE):
        checkpoints.append(clone({"model": model.state_dict(), "opt": optimizer.state_dict()}))
        train(model, optimizer, 1, first=step)
    reference = helpers.masks(model), helpers.stored_weights(model)
    updates = scheduler.num_updates
    assert updates == len(scheduler.history) >= 3

    for k, checkpoint in enumerate(checkpoints):
        model, optimizer, scheduler = readme_sequence(mask_seed=7)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["opt"])
        scheduler.total_steps = CYCLE  # after the resume, as timm's train.py does
        assert scheduler.step_count == k
        train(model, optimizer, CYCLE - k, first=k)
        assert scheduler.num_updates == updates, k
        for name, mask in reference[0].items():
            assert torch.equal(helpers.masks(model)[name], mask), (k, name)
            assert torch.equal(helpers.stored_weights(model)[name], reference[1][name]), (k, name)


# --------------------------------------------------- §4 schedule attributes as properties


def test_assigning_a_schedule_attribute_re_derives_the_dense_gradient_capture():
    model, optimizer, scheduler = build("rigl", total_steps=100, update_interval=50)
    train(model, optimizer, 3)
    assert not any(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    scheduler.update_interval = 4  # step 4 is now an update step
    assert all(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    train(model, optimizer, 1, first=3)
    assert [r["step"] for r in scheduler.history] == [4]
    assert not any(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    scheduler.update_interval = 5  # step 5 is an update step
    assert all(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    scheduler.stop = 0.04  # stop_step 4: no further update
    assert not any(layer.parametrization.capture_dense_grad for layer in scheduler.layers)
    scheduler.stop = 0.75
    scheduler.total_steps = 6  # stop_step 4 again
    assert not any(layer.parametrization.capture_dense_grad for layer in scheduler.layers)


BAD_VALUES = {
    "total_steps": [0, -1, 2.5, "100", None, math.nan, True],
    "update_interval": [0, 1.5, "3", None, math.inf],
    "drop_fraction": [-0.1, 1.1, math.nan, math.inf, "0.3", None],
    "drop_schedule": ["exponential", 3, None],
    "stop": [1.5, -0.2, math.nan, "0.75"],
    "start": [1.1, -0.1, math.nan, 0.9],  # 0.9 > stop (0.75)
}


@settings(max_examples=80)
@given(
    algorithm=st.sampled_from(sorted(sp.ALGORITHMS)),
    attribute_value=st.sampled_from([(a, v) for a, vs in BAD_VALUES.items() for v in vs]),
    steps=st.integers(0, 4),
)
def test_a_bad_schedule_value_raises_and_changes_nothing(algorithm, attribute_value, steps):
    attribute, value = attribute_value
    model, optimizer, scheduler = build(algorithm)
    train(model, optimizer, steps)
    before = snapshot(model, optimizer, scheduler)
    with pytest.raises((TypeError, ValueError), match=f"{type(scheduler).__name__}: .*"):
        setattr(scheduler, attribute, value)
    assert_untouched(before, model, optimizer, scheduler)


@settings(max_examples=60)
@given(
    total_steps=st.integers(1, 60),
    update_interval=st.integers(1, 8),
    drop_fraction=st.floats(0, 1),
    drop_schedule=st.sampled_from(DROP_SCHEDULES),
    stop=st.floats(0, 1),
)
def test_assigned_schedule_behaves_as_if_given_at_creation(
    total_steps, update_interval, drop_fraction, drop_schedule, stop
):
    values = dict(
        total_steps=total_steps, update_interval=update_interval, drop_fraction=drop_fraction,
        drop_schedule=drop_schedule, stop=stop,
    )  # fmt: skip
    model = helpers.build_model()
    given_now = sp.RigL(model, sgd(model), **values)
    model2 = helpers.build_model()
    later = sp.RigL(model2, sgd(model2), total_steps=1)
    for name, value in values.items():
        setattr(later, name, value)
    for step in range(total_steps + 2):
        assert later.is_update_step(step) == given_now.is_update_step(step)
        assert later.wants_dense_grad(step) == given_now.wants_dense_grad(step)
    assert repr(later) == repr(given_now)
    armed = [
        [layer.parametrization.capture_dense_grad for layer in s.layers] for s in (later, given_now)
    ]
    assert armed[0] == armed[1]


# -------------------------------------------------------------------- §4 creation order


def test_creating_the_scheduler_after_the_optimizer_was_loaded_warns_with_the_fix():
    model, optimizer, scheduler = build("rigl")
    train(model, optimizer, 5)
    saved = clone(optimizer.state_dict())
    model2 = helpers.build_model(mask_seed=1)
    optimizer2 = sgd(model2)
    optimizer2.load_state_dict(saved)
    with pytest.warns(UserWarning, match=r"before optimizer.load_state_dict.*\['sparse_param'\]"):
        late = sp.RigL(model2, optimizer2, total_steps=12, update_interval=3)
    late.load_state_dict(saved["sparse_param"])  # the fix the warning names
    assert late.step_count == 5
    # a fresh optimizer: no warning
    model3 = helpers.build_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.RigL(model3, sgd(model3), total_steps=12, update_interval=3)


# ------------------------------------------------------------ §4 one scheduler at a time


@pytest.mark.parametrize("shared", ["optimizer", "model"])
@pytest.mark.parametrize("attach", [True, False])
def test_a_second_scheduler_is_refused_naming_the_first(shared, attach):
    model, optimizer, first = build("rigl", attach=attach)
    train(model, optimizer, 2)
    other = optimizer if shared == "optimizer" else sgd(model)
    before = snapshot(model, optimizer, first)
    for cls in (sp.RigL, sp.SET, sp.Static):
        with pytest.raises(
            RuntimeError, match=r"RigL\(layers=4.* is already attached .*remove\(\)"
        ):
            cls(model, other, total_steps=12)
    assert_untouched(before, model, optimizer, first)
    assert sp.attached_scheduler(optimizer) is first
    assert sp.attached_scheduler(model) is first
    sp.attached_scheduler(other if shared == "optimizer" else model).remove()
    assert sp.attached_scheduler(optimizer) is None and sp.attached_scheduler(model) is None
    second = sp.SET(model, other, total_steps=12, update_interval=3, attach=attach)
    assert sp.attached_scheduler(model) is second


def test_an_ema_copy_is_a_model_of_its_own():
    import copy

    model, optimizer, scheduler = build("rigl")
    ema = copy.deepcopy(model)
    assert sp.attached_scheduler(ema) is None
    ema_scheduler = sp.Static(ema, sgd(ema))
    assert sp.attached_scheduler(ema) is ema_scheduler
    assert sp.attached_scheduler(model) is scheduler


def test_finalize_detaches_the_scheduler_and_training_goes_on_dense():
    model, optimizer, scheduler = build("rigl")
    train(model, optimizer, 4)
    inactive = {layer.name: ~layer.mask.clone() for layer in scheduler.layers}
    sp.finalize(model)
    assert sp.attached_scheduler(optimizer) is None
    assert "attached=False" in repr(scheduler)
    assert "sparse_param" not in optimizer.state_dict()
    train(model, optimizer, 3, first=4)  # no AttributeError: plain dense training
    assert scheduler.step_count == 4
    for name, off in inactive.items():
        if off.any():  # a dense layer (ERK) has no inactive position
            assert bool((model.get_submodule(name).weight[off] != 0).any()), name


# ----------------------------------------------------------- §4 schedules that never update


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(total_steps=24), r"never changes in this run: updates every update_interval=100 "
                               r"steps in \(0, 18\] \(start=0.0, stop=0.75 of total_steps=24\)"),
        (dict(total_steps=40, update_interval=10), "changes only 3 times"),
        (dict(total_steps=40, update_interval=25, stop=1.0), "changes only 1 time in this run"),
    ],
)  # fmt: skip
def test_a_schedule_with_few_updates_warns_once_with_the_numbers(kw, expected):
    model = helpers.build_model()
    optimizer = sgd(model)
    sp.SET(model, optimizer, **kw)
    with pytest.warns(UserWarning, match=expected) as caught:
        train(model, optimizer, 3)
    (warning,) = [w for w in caught if "the topology" in str(w.message)]
    assert warning.filename == __file__  # the user's optimizer.step(), not torch's hook
    # and no warning where there are enough updates, nor for Static
    for algorithm in sorted(sp.ALGORITHMS):
        kw = {} if algorithm == "static" else {"total_steps": 60}
        model, optimizer, scheduler = build(algorithm, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train(model, optimizer, 2)


@settings(max_examples=60)
@given(
    algorithm=st.sampled_from(DYNAMIC),
    total_steps=st.integers(1, 300),
    update_interval=st.integers(1, 40),
    start=st.floats(0, 0.5),
    stop=st.floats(0.5, 1),
)
def test_count_updates_counts_the_update_steps_of_the_run(
    algorithm, total_steps, update_interval, start, stop
):
    _, _, scheduler = build(
        algorithm, total_steps=total_steps, update_interval=update_interval, start=start,
        stop=stop,
    )  # fmt: skip
    steps = [s for s in range(1, total_steps + 1) if scheduler.is_update_step(s)]
    assert scheduler.count_updates() == len(steps)
    assert scheduler.count_updates(limit=3) == min(len(steps), 3)


# ----------------------------------------------------------------- §4 one constructor


@pytest.mark.parametrize("algorithm", sorted(sp.ALGORITHMS))
def test_every_method_takes_the_common_arguments_as_numpy_scalars_too(algorithm):
    common = dict(
        total_steps=np.int64(12), update_interval=np.int32(3), drop_fraction=np.float32(0.25),
        drop_schedule="linear", stop=np.float64(0.75), start=np.float32(0.0),
        seed=np.int64(4), attach=True,
    )  # fmt: skip
    model, optimizer, scheduler = build(algorithm, **common)
    for name in SCHEDULE:
        value = getattr(scheduler, name)
        assert type(value) in (int, float, str), name  # plain Python values
    assert scheduler.total_steps == 12 and scheduler.update_interval == 3
    assert scheduler.drop_fraction == pytest.approx(0.25)
    train(model, optimizer, 12)
    assert scheduler.step_count == 12
    clone(scheduler.state_dict())  # still loadable with weights_only
    if algorithm == "static":  # a drop_fraction does not make Static drop anything
        masks = helpers.masks(model)
        scheduler.update()
        assert all(torch.equal(m, masks[n]) for n, m in helpers.masks(model).items())


CLASS_ERRORS = {
    "granet without density": (lambda m, o: sp.GraNet(m, o, total_steps=10), TypeError, "GraNet"),
    "gmp without density": (lambda m, o: sp.GMP(m, o, total_steps=10), TypeError, "GMP"),
    "granet bad total_steps": (
        lambda m, o: sp.GraNet(m, o, total_steps=0, density=0.1), ValueError, "GraNet: total",
    ),
    "static bad total_steps": (lambda m, o: sp.Static(m, o, total_steps=-1), ValueError, "Static"),
    "rigl bad seed": (
        lambda m, o: sp.RigL(m, o, total_steps=10, seed=-1), ValueError, "RigL: seed",
    ),
    "set attach string": (
        lambda m, o: sp.SET(m, o, total_steps=10, attach="no"), TypeError, "SET: attach",
    ),
    "gmp density equals the model's": (
        lambda m, o: sp.GMP(m, o, total_steps=10, density=0.3, distribution="uniform"),
        ValueError, "GMP: the final density 0.3 is not below",
    ),
    "granet density nan": (
        lambda m, o: sp.GraNet(m, o, total_steps=10, density=math.nan),
        ValueError, "GraNet: density",
    ),
    "gmp distribution disagrees": (
        lambda m, o: sp.GMP(m, o, total_steps=10, density=0.25, distribution="erk"),
        ValueError, r"GMP: the 'erk' allocation .* more weights than they have active now",
    ),
    "granet unknown distribution": (
        lambda m, o: sp.GraNet(m, o, total_steps=10, density=0.1, distribution="bogus"),
        ValueError, "GraNet: .*bogus",
    ),
    "dsr threshold nan": (lambda m, o: sp.DSR(m, o, total_steps=10, threshold=math.nan),
                          ValueError, "DSR: threshold"),
    "dsr threshold inf": (lambda m, o: sp.DSR(m, o, total_steps=10, threshold=math.inf),
                          ValueError, "DSR: threshold"),
    "dsr threshold string": (lambda m, o: sp.DSR(m, o, total_steps=10, threshold="1e-3"),
                             TypeError, "DSR: threshold"),
    "dsr doublings string": (lambda m, o: sp.DSR(m, o, total_steps=10, doublings="3"),
                             TypeError, "DSR: doublings"),
    "dsr doublings fraction": (lambda m, o: sp.DSR(m, o, total_steps=10, doublings=2.5),
                               ValueError, "DSR: doublings"),
    "dsr doublings negative": (lambda m, o: sp.DSR(m, o, total_steps=10, doublings=-1),
                               ValueError, "DSR: doublings"),
    "dsr target_pruned fraction": (lambda m, o: sp.DSR(m, o, total_steps=10, target_pruned=1.5),
                                   ValueError, "DSR: target_pruned"),
    "seed above torch.Generator's": (lambda m, o: sp.SET(m, o, total_steps=10, seed=2**70),
                                     ValueError, r"SET: seed must be an int ≤ 1844674407"),
    "dsr target_pruned above the model": (
        lambda m, o: sp.DSR(m, o, total_steps=10, target_pruned=10**9),
        ValueError, r"DSR: target_pruned=1000000000 is more than an update can prune in this "
                    r"model \(\d+ of \d+ active weights\)"),
    "snfs momentum nan": (lambda m, o: sp.SNFS(m, o, total_steps=10, momentum=math.nan),
                          ValueError, "SNFS: momentum"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLASS_ERRORS))
def test_errors_name_the_class_called_and_leave_everything_untouched(case):
    make, error, message = CLASS_ERRORS[case]
    model = helpers.build_model(density=0.3, distribution="uniform")
    optimizer = sgd(model)
    train(model, optimizer, 1)
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=message):
        make(model, optimizer)
    assert_untouched(before, model, optimizer)
    assert sp.attached_scheduler(model) is None


def test_dsr_numpy_arguments_are_plain_values():
    model = helpers.build_model()
    scheduler = sp.DSR(
        model, sgd(model), total_steps=np.int64(20), threshold=np.float32(0.01),
        doublings=np.int64(2), target_pruned=np.int32(5),
    )  # fmt: skip
    assert type(scheduler.threshold) is float and type(scheduler.doublings) is int
    assert type(scheduler.target_pruned) is int
    assert isinstance(scheduler.state_dict()["threshold"], float)


# ------------------------------------------------ issue 19: arguments of the wrong kind

NOT_A_MODEL = {
    "None": (None, "got None; pass the nn.Module itself"),
    "a state dict": ({"0.weight": torch.ones(2)}, "got a dict; a state dict is not a model"),
    "a tensor": (torch.ones(3), r"got a torch.float32 tensor of shape \(3,\); pass the module"),
}
READERS = {  # every public function taking a model, called with whatever stands in for it
    "finalize": lambda m: sp.finalize(m),
    "density": lambda m: sp.density(m),
    "itop_rate": lambda m: sp.itop_rate(m),
    "layer_table": lambda m: sp.layer_table(m),
    "summary": lambda m: sp.summary(m),
    "effective_density": lambda m: sp.effective_density(m, torch.ones(1, 8)),
    "gradient_flow": lambda m: sp.gradient_flow(m),
    "effective_gradient_flow": lambda m: sp.effective_gradient_flow(m),
    "to_sparse": lambda m: sp.to_sparse(m),
    "save_safetensors": lambda m: sp.save_safetensors(m, "unused.safetensors"),
    "load_state_dict": lambda m: sp.load_state_dict(m, {}),
    "capacity": lambda m: sp.capacity(m),
    "training_flops": lambda m: sp.training_flops(m, steps=1),
    "weight_uses": lambda m: sp.weight_uses(m, torch.ones(1, 8)),
    "materialize": lambda m: sp.materialize(m),
    "rescale_to_active_fan_in": lambda m: sp.rescale_to_active_fan_in(m),
    "sparse_layers": lambda m: list(sp.sparse_layers(m)),
}


@pytest.mark.parametrize("given", list(NOT_A_MODEL))
@pytest.mark.parametrize("algorithm", sorted(sp.ALGORITHMS))
def test_a_scheduler_given_no_model_names_it_and_changes_nothing(algorithm, given):
    value, words = NOT_A_MODEL[given]
    model = helpers.build_model()
    optimizer = sgd(model)
    train(model, optimizer, 1)
    before = snapshot(model, optimizer)
    name = sp.ALGORITHMS[algorithm].__name__
    kw = {"density": 0.2} if algorithm in PRUNING else {}
    with pytest.raises(TypeError, match=rf"{name}: model must be a torch.nn.Module, {words}"):
        sp.create_scheduler(algorithm, value, optimizer, total_steps=12, **kw)
    assert_untouched(before, model, optimizer)
    assert sp.attached_scheduler(optimizer) is None


@pytest.mark.parametrize("given", list(NOT_A_MODEL))
@pytest.mark.parametrize("function", list(READERS))
def test_a_function_given_no_model_names_itself_and_what_it_got(function, given):
    value, words = NOT_A_MODEL[given]
    with pytest.raises(TypeError, match=rf"^{function}: model must be a torch.nn.Module, {words}"):
        READERS[function](value)


@pytest.mark.parametrize(
    "wrong, words",
    [
        ("None", "got None; build it with torch.optim.SGD"),
        ("the model", r"got a TinyNet \(the model was passed where the optimizer goes\)"),
    ],
)
@pytest.mark.parametrize("algorithm", sorted(sp.ALGORITHMS))
def test_a_scheduler_given_no_optimizer_names_the_fix(algorithm, wrong, words):
    model = helpers.build_model()
    optimizer = sgd(model)
    before = snapshot(model, optimizer)
    name = sp.ALGORITHMS[algorithm].__name__
    kw = {"density": 0.2} if algorithm in PRUNING else {}
    given = None if wrong == "None" else model
    with pytest.raises(TypeError, match=rf"{name}: optimizer must be a torch.optim.Optimizer, "
                                        rf"{words}"):  # fmt: skip
        sp.create_scheduler(algorithm, model, given, total_steps=12, **kw)
    assert_untouched(before, model, optimizer)
    assert sp.attached_scheduler(model) is None


def test_attached_scheduler_of_neither_an_optimizer_nor_a_model_says_what_it_takes():
    with pytest.raises(TypeError, match="attached_scheduler: expected the optimizer or the model"):
        sp.attached_scheduler(None)


@pytest.mark.parametrize("algorithm", sorted(set(sp.ALGORITHMS) - {"static"}))
def test_a_method_that_moves_masks_refuses_a_frozen_sparse_layer(algorithm):
    # Frozen after sparsify: no gradient would guide its regrowth and no step would
    # train what grows, so moving its mask could only cut weights.
    model = helpers.build_model(density=0.3, distribution="uniform")
    model.fc1.requires_grad_(False)
    optimizer = sgd(model)
    before = snapshot(model, optimizer)
    kw = {"density": 0.2, "distribution": "uniform"} if algorithm in ("gmp", "granet") else {}
    with pytest.raises(ValueError, match=r"sparse layers \['fc1'\] are frozen .*Static"):
        sp.create_scheduler(algorithm, model, optimizer, total_steps=10, **kw)
    assert_untouched(before, model, optimizer)
    assert sp.attached_scheduler(model) is None


def test_static_keeps_a_frozen_sparse_layer_as_it_is():
    model = helpers.build_model(density=0.3, distribution="uniform")
    model.fc1.requires_grad_(False)
    frozen = {k: clone(v) for k, v in model.fc1.state_dict().items()}
    optimizer = torch.optim.SGD((p for p in model.parameters() if p.requires_grad), lr=0.1)
    sp.Static(model, optimizer)  # the optimizer need not hold the frozen weight
    train(model, optimizer, 3)
    for key, value in model.fc1.state_dict().items():
        assert_same(value, frozen[key], key)
    helpers.check_invariants(model)


# ------------------------------- §5 schedules that restart or stop without a word (issue 19)


RUN = {"total_steps": 40, "update_interval": 2}  # enough updates not to warn of too few


def _mid_run(steps: int = 8, total_steps: int = 40) -> dict:
    """A checkpoint (model, optimizer with the scheduler's entry) taken after ``steps``
    steps of a run whose topology has changed (ever_active holds more than the mask)."""
    model, optimizer, scheduler = build("rigl", **{**RUN, "total_steps": total_steps})
    train(model, optimizer, steps)
    assert sp.itop_rate(model) > sp.density(model)
    return clone({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def _caught(caught, text: str) -> list:
    return [w for w in caught if text in str(w.message)]


@pytest.mark.parametrize("optimizer_state", ["not loaded", "without the scheduler's entry"])
def test_a_restart_at_step_0_on_a_model_mid_run_warns_once_with_the_counts(optimizer_state):
    """timm's --no-resume-opt, or an optimizer checkpoint saved without the scheduler:
    the model is at step 8, the scheduler at 0."""
    checkpoint = _mid_run()
    model, optimizer, scheduler = build("rigl", mask_seed=1, **RUN)
    model.load_state_dict(checkpoint["model"])
    if optimizer_state != "not loaded":
        del checkpoint["optimizer"]["sparse_param"]
        optimizer.load_state_dict(checkpoint["optimizer"])
    ever = sum(int(layer.ever_active.count_nonzero()) for layer in scheduler.layers)
    active = sum(layer.active for layer in scheduler.layers)
    with pytest.warns(UserWarning, match="starts at step 0") as caught:
        train(model, optimizer, 3, first=8)
    (warning,) = _caught(caught, "starts at step 0")
    message = str(warning.message)
    assert f"{ever} of its 2072 sparse weights have been active" in message
    assert f"and {active} are active now" in message
    assert "load the optimizer state dict saved with the model" in message
    assert warning.filename == __file__  # the user's optimizer.step()


def _resume(flow: str, checkpoint: dict, total_steps: int = 40):
    """A resumed model, optimizer and scheduler, by ``flow``."""
    placeholder = flow == "timm placeholder"  # docs/guide/timm.md: 1, resume, the real one
    kw = {**RUN, "total_steps": 1 if placeholder else total_steps}
    model, optimizer, scheduler = build("rigl", mask_seed=1, **kw)
    model.load_state_dict(checkpoint["model"])
    state = dict(checkpoint["optimizer"])
    scheduler_state = state.pop("sparse_param")
    if flow == "scheduler saved apart":  # recipes/train.py, tests/test_legacy_checkpoint.py
        optimizer.load_state_dict(state)
        scheduler.load_state_dict(scheduler_state)
    else:
        optimizer.load_state_dict({**state, "sparse_param": scheduler_state})
    if placeholder:
        scheduler.total_steps = total_steps
    return model, optimizer, scheduler


@pytest.mark.parametrize("flow", ["optimizer", "scheduler saved apart", "timm placeholder"])
def test_resumes_that_restore_the_schedule_do_not_warn(flow):
    model, optimizer, scheduler = _resume(flow, _mid_run())
    assert scheduler.step_count == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, 4, first=8)
    assert scheduler.step_count == 12


def test_an_optimizer_state_without_the_schedulers_loaded_mid_run_warns_at_the_next_step():
    model, optimizer, scheduler = build("rigl", **RUN)
    train(model, optimizer, 2)
    older = clone(optimizer.state_dict())
    del older["sparse_param"]
    train(model, optimizer, 3, first=2)
    optimizer.load_state_dict(older)
    with pytest.warns(UserWarning, match="without the scheduler's") as caught:
        train(model, optimizer, 2, first=5)
    (warning,) = _caught(caught, "without the scheduler's")
    assert "goes on from its own step 5 of total_steps=40" in str(warning.message)
    assert "scheduler.load_state_dict" in str(warning.message)
    # the scheduler's state loaded after it: no warning
    optimizer.load_state_dict(older)
    scheduler.load_state_dict(clone(scheduler.state_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, 1, first=7)


def test_a_state_past_total_steps_warns_at_the_first_step_with_both_numbers():
    """A state saved at step 15 of a 40-step run, resumed with total_steps=10: the
    schedule is over, the run goes on; said once total_steps is final (the first step)."""
    checkpoint = _mid_run(steps=15, total_steps=40)
    model, optimizer, scheduler = _resume("optimizer", checkpoint, total_steps=10)
    assert scheduler.step_count == 15
    with pytest.warns(UserWarning, match="past the end") as caught:
        train(model, optimizer, 2, first=15)
    (warning,) = _caught(caught, "past the end")
    message = str(warning.message)
    assert "at step 15 of total_steps=10" in message
    assert "set total_steps to the run's real length" in message
    # the fix, before the first step: no warning
    model, optimizer, scheduler = _resume("timm placeholder", checkpoint, total_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, 2, first=15)


@pytest.mark.parametrize("algorithm", ["rigl", "gmp"])
def test_total_steps_below_the_steps_counted_is_refused_and_changes_nothing(algorithm):
    model, optimizer, scheduler = build(algorithm, total_steps=100, update_interval=10)
    train(model, optimizer, 30)
    before = snapshot(model, optimizer, scheduler)
    name = type(scheduler).__name__
    refused = rf"{name}: total_steps=10 is below step_count=30.*at least 30"
    with pytest.raises(ValueError, match=refused):
        scheduler.total_steps = np.int64(10)
    assert_untouched(before, model, optimizer, scheduler)
    scheduler.total_steps = 30  # the run ends here: allowed
    assert scheduler.total_steps == 30


def _steps(model, optimizer, steps, micro_batches=1, edit=None):
    """``steps`` steps of ``optimizer``, each over ``micro_batches`` forwards, with
    ``edit(model)`` before each forward."""
    for i in range(steps):
        optimizer.zero_grad()
        for j in range(micro_batches):
            if edit is not None:
                edit(model)
            helpers.loss_of(model, helpers.batch(100 * i + j)).backward()
        optimizer.step()


@pytest.mark.parametrize("attach", [True, False])
@pytest.mark.parametrize("algorithm", ["rigl", "snfs"])  # SNFS captures dL/dW in every forward
def test_training_with_an_optimizer_the_scheduler_does_not_count_warns_once(algorithm, attach):
    import copy

    model, optimizer, scheduler = build(algorithm, total_steps=100, update_interval=50,
                                        attach=attach)  # fmt: skip
    _steps(model, optimizer, 3)
    if attach:
        other = torch.optim.AdamW(model.parameters(), lr=1e-3)  # a new optimizer
        steps_counted = 3
    else:
        other = optimizer  # scheduler.step() never called
        steps_counted = 0
    ema = copy.deepcopy(model)  # a copy is not watched: the scheduler is not its own
    with pytest.warns(UserWarning, match="while the scheduler counted no step") as caught:
        _steps(model, other, 15)
    (warning,) = _caught(caught, "counted no step")
    message = str(warning.message)
    assert "layer 'conv' were written 10 times" in message
    assert f"still at step {steps_counted} of total_steps=100" in message
    assert "attach the scheduler to the optimizer you step" in message
    assert warning.filename == helpers.__file__  # the user's forward, helpers.loss_of
    assert scheduler.step_count == steps_counted
    assert all(layer.parametrization.on_write is None for layer in sp.sparse_layers(ema))


def _rewrite_masks(model):
    """What DDP's buffer broadcast does to the masks before every forward."""
    with torch.no_grad():
        for layer in sp.sparse_layers(model):
            layer.mask.copy_(layer.mask.clone())


@pytest.mark.parametrize("algorithm", ["rigl", "snfs"])
def test_the_optimizer_the_scheduler_counts_raises_no_false_alarm(algorithm):
    """Many micro-batches, masks rewritten before every forward, an in-place edit of the
    weights after every step (max-norm): the scheduler counts every step, no warning."""
    model, optimizer, scheduler = build(algorithm, total_steps=100, update_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(12):
            _steps(model, optimizer, 1, micro_batches=12, edit=_rewrite_masks)
            with torch.no_grad():
                model.fc1.parametrizations.weight.original.clamp_(-0.5, 0.5)
    assert scheduler.step_count == 12 and scheduler.num_updates == 2


def test_explicit_updates_between_forwards_raise_no_false_alarm():
    """update() writes the weights too (pruned ones zeroed): the scheduler acted."""
    model, optimizer, scheduler = build("set", total_steps=100, update_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(12):
            helpers.loss_of(model, helpers.batch(i)).backward()
            scheduler.update()
    assert scheduler.step_count == 0 and scheduler.num_updates == 12
