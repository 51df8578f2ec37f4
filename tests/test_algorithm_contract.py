"""The algorithm contract: hooks that only read and return, state declared and kept by
the base (docs/guide/algorithms.md, Writing an algorithm)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import helpers
import pytest
import torch

import sparse_param as sp
from sparse_param.scheduler import LayerTensors, Plan, magnitude_counts

ALGORITHMS_DIR = Path(sp.__file__).parent / "algorithms"
KWARGS = {"granet": {"density": 0.1}, "gmp": {"density": 0.1}, "dsr": {"threshold": 0.02}}


class GradientMomentumGrowth(sp.SparseScheduler):
    """The example of the guide, verbatim."""

    captures_every_step = True
    state_fields = {"running": LayerTensors(averaged=True)}

    def setup(self):
        self.running = [torch.zeros_like(x.mask, dtype=torch.float32) for x in self.layers]

    def observe(self, dense_grads):
        for running, grad in zip(self.running, dense_grads):
            running.mul_(0.9).add_(grad.abs(), alpha=0.1)

    def plan(self, fraction):
        pruned = magnitude_counts(self.layers, fraction)
        return Plan(prune=pruned, grow=pruned)

    def grow_score(self, index, layer):
        return self.running[index]


def build(name: str, seed: int = 0):
    structure = "fan_in" if name == "srigl" else None
    density = 0.5 if name in ("gmp", "granet") else 0.3
    model = helpers.build_model(seed, density, structure=structure)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "example":
        scheduler = GradientMomentumGrowth(model, optimizer, total_steps=20, update_interval=3)
    else:
        scheduler = sp.ALGORITHMS[name](
            model, optimizer, total_steps=20, update_interval=3, **KWARGS.get(name, {})
        )
    return model, optimizer, scheduler


def train(model, optimizer, steps):
    for step in steps:
        optimizer.zero_grad()
        helpers.loss_of(model, helpers.batch(step)).backward()
        optimizer.step()


def test_no_algorithm_writes_its_own_checkpoint_code():
    for path in ALGORITHMS_DIR.glob("*.py"):
        defined = {
            node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef)
        }  # fmt: skip
        assert not defined & {"state_dict", "load_state_dict", "_check_state"}, path.name


def plan_twice(scheduler: sp.SparseScheduler) -> tuple[Plan, Plan]:
    """Two plans at the current step; raises if asking changed anything: an attribute of
    the scheduler (added, removed or reassigned), its state dict, the masks, the weights."""
    attributes = dict(vars(scheduler))
    state = copy.deepcopy(scheduler.state_dict())
    masks, weights = helpers.masks(scheduler.model), helpers.stored_weights(scheduler.model)
    plans = tuple(scheduler.plan(scheduler.current_drop_fraction()) for _ in range(2))
    assert vars(scheduler).keys() == attributes.keys(), "plan() added or removed attributes"
    for key, value in attributes.items():
        assert vars(scheduler)[key] is value, f"plan() reassigned {key}"
    now = scheduler.state_dict()
    for key, value in state.items():
        same = torch.equal if isinstance(value, torch.Tensor) else lambda a, b: str(a) == str(b)
        assert same(now[key], value), key
    assert all(torch.equal(m, masks[n]) for n, m in helpers.masks(scheduler.model).items())
    assert all(
        torch.equal(w, weights[n]) for n, w in helpers.stored_weights(scheduler.model).items()
    )
    return plans


@pytest.mark.parametrize("name", [n for n in sp.ALGORITHMS if n != "static"])
def test_plan_only_reads(name):
    """At an update step, the plan is a function of the model and the scheduler: asking
    twice gives the same plan and changes nothing."""
    model, optimizer, scheduler = build(name)
    train(model, optimizer, range(2))
    helpers.arm_and_capture(scheduler, model, helpers.batch(2))  # dense grads where needed
    first, second = plan_twice(scheduler)
    assert first.prune == second.prune and first.grow == second.grow
    assert len(first.prune) == len(first.grow) == len(scheduler.layers)
    for a, b in zip(first.targets or [], second.targets or []):
        assert torch.equal(a, b)


def test_a_plan_that_leaves_a_side_channel_is_caught():
    class SideChannel(sp.SET):
        def plan(self, fraction):
            self.regrow = [1] * len(self.layers)  # read by some later hook: not allowed
            return super().plan(fraction)

    model = helpers.build_model(0, 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = SideChannel(model, optimizer, total_steps=20, update_interval=3)
    with pytest.raises(AssertionError, match="added or removed attributes"):
        plan_twice(scheduler)


def test_a_declared_state_is_saved_checked_and_resumed_exactly():
    reference = build("example")
    train(*reference[:2], range(12))
    assert reference[2].num_updates >= 2
    helpers.check_invariants(reference[0], reference[1])

    model, optimizer, scheduler = build("example")
    train(model, optimizer, range(5))
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert len(saved["optimizer"]["sparse_param"]["running"]) == len(scheduler.layers)

    model, optimizer, scheduler = build("example", seed=1)
    bad = copy.deepcopy(saved["optimizer"])
    bad["sparse_param"]["running"] = bad["sparse_param"]["running"][:-1]
    with pytest.raises(ValueError, match="running must be a list of"):
        optimizer.load_state_dict(bad)
    assert scheduler.step_count == 0 and not any(r.any() for r in scheduler.running)

    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train(model, optimizer, range(5, 12))
    assert scheduler.history == reference[2].history
    for mine, theirs in zip(scheduler.running, reference[2].running):
        assert torch.equal(mine, theirs)
    for name, weight in helpers.stored_weights(reference[0]).items():
        assert torch.equal(helpers.stored_weights(model)[name], weight), name


def test_adapt_may_only_change_declared_state():
    class Undeclared(sp.SET):
        def adapt(self, plan):
            return {"threshold": 1.0}

    model = helpers.build_model(0, 0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = Undeclared(model, optimizer, total_steps=20, update_interval=3)
    with pytest.raises(TypeError, match=r"\['threshold'\] are not declared"):
        scheduler.update()
