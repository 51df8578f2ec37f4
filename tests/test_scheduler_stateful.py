"""Stateful property tests of the scheduler engine (docs/architecture.md, invariants 1-7).

A hypothesis ``RuleBasedStateMachine`` drives one algorithm on a tiny model (a Conv2d
and three Linear layers) through random sequences of

* training steps (forward, backward, ``optimizer.step()``; one or two micro-batches;
  the scheduler attached to the optimizer or stepped by hand with ``attach=False``),
* explicit ``scheduler.update()`` calls, at any step, and
* checkpoint round trips: model, optimizer and scheduler state dicts through
  ``torch.save`` / ``torch.load(weights_only=True)`` into a freshly built model
  sparsified with a *different* mask seed, a new optimizer and a new scheduler,

with the optimizer drawn from SGD (momentum, Nesterov, weight decay), Adam, AdamW,
RMSprop and timm's Lamb, Lion, Adan and Adopt, and the scheduler's arguments (density,
interval, drop fraction and schedule, stop, DSR threshold, GMP start density) drawn too.

After every rule: masks bool and shaped like the weight; computed weight exactly 0 off
the mask in train and eval mode; stored inactive weights exactly 0; per-layer counts
unchanged (Static, SET, RigL), total unchanged (SNFS, DSR), GMP/GraNet counts equal to
``target_counts(step)`` after each update and unchanged between updates; every layer
≥ 1 active; ``ever_active`` ⊇ mask and never loses a bit; R_s non-decreasing and equal
to the density for Static; every optimizer state tensor shaped like a weight zero at
inactive positions; no dense gradient held between steps. After every backward:
inactive positions have zero gradient. After every update: grown ∩ old mask = ∅,
grown weights and their optimizer state exactly 0, and the history record's per-layer
pruned/grown counts equal the actual mask changes.

Coverage: ``STATEFUL_EXAMPLES`` (default 35) sequences of up to ``STATEFUL_STEPS``
(default 10) rules per algorithm: 7 x 35 = 245 sequences, ~2,400 rules in total. Set
the environment variables higher for a longer soak.
"""

from __future__ import annotations

import io
import os

import helpers
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import sparse_param as sp
from sparse_param.layers import sparse_layers
from sparse_param.schedules import DROP_SCHEDULES

STATEFUL_EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "35"))
STATEFUL_STEPS = int(os.environ.get("STATEFUL_STEPS", "10"))

ALGORITHMS = ["static", "set", "rigl", "snfs", "dsr", "gmp", "granet"]
FIXED_PER_LAYER = {"static", "set", "rigl"}
FIXED_TOTAL = {"snfs", "dsr"}
SCHEDULED = {"gmp", "granet"}
GMP_FINAL_DENSITY = 0.15


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with helpers.torch_threads(1):
        yield


class SchedulerMachine(RuleBasedStateMachine):
    algorithm: str = ""

    # ------------------------------------------------------------------ construction
    def _build(self, mask_seed: int):
        cfg = self.cfg
        model = helpers.build_model(cfg["init_seed"], cfg["density"], mask_seed)
        optimizer = helpers.OPTIMIZERS[cfg["optimizer"]](model)
        cls = sp.ALGORITHMS[self.algorithm]
        if self.algorithm == "static":
            scheduler = cls(model, optimizer, attach=cfg["attach"])
        else:
            kwargs = dict(
                total_steps=cfg["total_steps"],
                update_interval=cfg["interval"],
                stop=cfg["stop"],
                seed=cfg["seed"],
                attach=cfg["attach"],
            )
            if self.algorithm in {"set", "rigl", "snfs", "granet"}:
                kwargs.update(drop_fraction=cfg["alpha"], drop_schedule=cfg["schedule"])
            if self.algorithm == "dsr":
                kwargs.update(threshold=cfg["threshold"])
            if self.algorithm in SCHEDULED:
                kwargs.update(density=GMP_FINAL_DENSITY)
            scheduler = cls(model, optimizer, **kwargs)
        return model, optimizer, scheduler

    @initialize(
        optimizer=st.sampled_from(sorted(helpers.OPTIMIZERS)),
        density=st.sampled_from([0.1, 0.3, 0.6, 0.8]),
        start_density=st.sampled_from([1.0, 0.6]),
        total_steps=st.integers(4, 24),
        interval=st.integers(1, 3),
        stop=st.sampled_from([0.5, 0.75, 1.0]),
        alpha=st.sampled_from([0.1, 0.3, 0.5, 1.0]),
        schedule=st.sampled_from(DROP_SCHEDULES),
        threshold=st.sampled_from([1e-3, 0.05, 0.3]),
        attach=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def setup(
        self, optimizer, density, start_density, total_steps, interval, stop, alpha,
        schedule, threshold, attach, seed,
    ):  # fmt: skip
        self.cfg = dict(
            optimizer=optimizer,
            density=start_density if self.algorithm in SCHEDULED else density,
            total_steps=total_steps,
            interval=interval,
            stop=stop,
            alpha=alpha,
            schedule=schedule,
            threshold=threshold,
            attach=attach,
            seed=seed,
            init_seed=seed + 1,
        )
        self.model, self.optimizer, self.scheduler = self._build(mask_seed=seed)
        self.initial_counts = helpers.counts(self.model)
        self.prev_counts = dict(self.initial_counts)
        self.prev_ever = helpers.ever_actives(self.model)
        self.prev_rs = sp.itop_rate(self.model)
        self.density0 = sp.density(self.model)
        self.updated = False  # whether the last rule ran a topology update
        self.data_seed = 0

    # ------------------------------------------------------------------------- rules
    def _next_batch(self):
        self.data_seed += 1
        return helpers.batch(self.cfg["seed"] * 1000 + self.data_seed)

    @rule(micro_batches=st.integers(1, 2))
    def train_step(self, micro_batches):
        old = helpers.masks(self.model)
        n_records = len(self.scheduler.history)
        self.optimizer.zero_grad()
        for _ in range(micro_batches):
            helpers.loss_of(self.model, self._next_batch()).backward()
        for layer in sparse_layers(self.model):
            grad = layer.weight.grad
            assert grad is not None and bool((grad[~layer.mask] == 0).all()), (
                f"layer {layer.name!r}: gradient at inactive positions"
            )
        self.optimizer.step()
        if not self.cfg["attach"]:
            self.scheduler.step()
        self._after_possible_update(old, n_records)

    @rule(n=st.integers(2, 4))
    def train_steps(self, n):
        for _ in range(n):
            self.train_step(1)
            self.active_counts()  # the per-update checks hold after each step

    @rule()
    def explicit_update(self):
        old = helpers.masks(self.model)
        n_records = len(self.scheduler.history)
        if self.scheduler.needs_dense_grad:
            helpers.arm_and_capture(self.scheduler, self.model, self._next_batch())
        record = self.scheduler.update()
        self.scheduler._arm_dense_grad()  # restore the scheduler's own arming
        assert record is self.scheduler.history[-1]
        self._after_possible_update(old, n_records)

    @rule(mask_seed=st.integers(0, 2**16))
    def save_and_load(self, mask_seed):
        buffer = io.BytesIO()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            },
            buffer,
        )
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        model, optimizer, scheduler = self._build(mask_seed=mask_seed + 7919)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        # Everything observable came back exactly.
        for old, new in zip(sparse_layers(self.model), sparse_layers(model)):
            assert torch.equal(old.mask, new.mask), old.name
            assert torch.equal(old.ever_active, new.ever_active), old.name
            assert torch.equal(old.weight, new.weight), old.name
            old_state = helpers.weight_shaped_state(self.optimizer, old)
            new_state = helpers.weight_shaped_state(optimizer, new)
            assert old_state.keys() == new_state.keys(), old.name
            for key in old_state:
                assert torch.equal(old_state[key], new_state[key]), (old.name, key)
        assert scheduler.step_count == self.scheduler.step_count
        assert scheduler.history == self.scheduler.history
        assert scheduler.generator.get_state().equal(self.scheduler.generator.get_state())
        if self.algorithm == "dsr":
            assert scheduler.threshold == self.scheduler.threshold
        if self.algorithm in SCHEDULED:
            assert scheduler.target_counts(5) == self.scheduler.target_counts(5)
        self.scheduler.remove()
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.updated = False

    # ---------------------------------------------------------------- update checks
    def _after_possible_update(self, old, n_records):
        new = helpers.masks(self.model)
        records = self.scheduler.history[n_records:]
        assert len(records) <= 1
        self.updated = bool(records)
        if not records:
            for name in old:
                assert torch.equal(old[name], new[name]), f"{name}: mask changed without update"
            return
        record = records[0]
        assert record["step"] == self.scheduler.step_count
        pruned, grown = helpers.mask_changes(old, new)
        for layer in sparse_layers(self.model):
            name = layer.name
            # 6. grown positions were inactive before, and start at exactly 0
            assert not bool((grown[name] & old[name]).any()), name
            assert bool((layer.weight[grown[name]] == 0).all()), f"{name}: grown weight not 0"
            for key, value in helpers.weight_shaped_state(self.optimizer, layer).items():
                assert bool((value[grown[name]] == 0).all()), f"{name}: grown state {key!r}"
            # the record says what actually happened
            assert record["pruned"][name] == int(pruned[name].sum()), name
            assert record["grown"][name] == int(grown[name].sum()), name
        assert record["density"] == sp.density(self.model)
        assert record["itop_rate"] == sp.itop_rate(self.model)

    # -------------------------------------------------------------------- invariants
    @invariant()
    def layer_invariants(self):
        helpers.check_invariants(self.model, self.optimizer)

    @invariant()
    def active_counts(self):
        now = helpers.counts(self.model)
        if self.algorithm in FIXED_PER_LAYER:
            assert now == self.initial_counts
        elif self.algorithm in FIXED_TOTAL:
            assert sum(now.values()) == sum(self.initial_counts.values())
        elif self.updated:
            targets = self.scheduler.target_counts(self.scheduler.step_count)
            assert list(now.values()) == targets
        else:
            assert now == self.prev_counts
        self.prev_counts = now

    @invariant()
    def exploration(self):
        ever = helpers.ever_actives(self.model)
        for name, before in self.prev_ever.items():
            assert bool((ever[name] | ~before).all()), f"{name}: ever_active lost a bit"
        rate = sp.itop_rate(self.model)
        assert rate >= self.prev_rs
        if self.algorithm == "static":
            assert rate == sp.density(self.model) == self.density0
        self.prev_ever, self.prev_rs = ever, rate

    @invariant()
    def no_dense_gradient_held(self):
        for layer in self.scheduler.layers:
            assert layer.parametrization.dense_grad is None, layer.name
            armed = layer.parametrization.capture_dense_grad
            assert armed == self.scheduler.wants_dense_grad(self.scheduler.step_count + 1)


def _machine(algorithm: str) -> type[SchedulerMachine]:
    return type(f"{algorithm.capitalize()}Machine", (SchedulerMachine,), {"algorithm": algorithm})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_scheduler_state_machine(algorithm):
    run_state_machine_as_test(
        _machine(algorithm),
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
