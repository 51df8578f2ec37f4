"""The engine of dynamic sparse training: one scheduler visits every sparse layer.

An algorithm is a subclass that declares what it needs and writes the few rules that
make it different: :meth:`~SparseScheduler.plan` (how many weights each layer drops and
grows), :meth:`~SparseScheduler.prune_score` and :meth:`~SparseScheduler.grow_score`
(which ones). Each reads the model and returns; nothing one rule sets is read by
another. Its own state is declared in ``state_fields`` and saved, checked and loaded by
the base. The engine does the rest the same way for every algorithm: when to update,
exact selection, dropping non-finite weights, zeroing weights and optimizer state,
``ever_active``, records. The plumbing lives beside it: optimizer hooks
(:mod:`.hooks`), zeroing after steps (:mod:`.zeroing`), dense-gradient capture
(:mod:`.capture`), checkpoint state (:mod:`.state`), records and logs (:mod:`.records`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..arguments import check_int, check_model, check_optimizer
from ..layers import SparseLayer, sparse_layers
from ..metrics import density, itop_rate
from ..structure import structure_of
from . import checks, registry, state, topology
from .capture import DenseGradCapture
from .hooks import OptimizerHooks
from .pace import Pace
from .plan import Plan, magnitude_counts
from .records import append_record, check_log_path, update_record
from .schedule import FIELDS, Schedule, schedule_attribute
from .selection import select
from .zeroing import InactiveZeroing

HISTORY_SIZE = 20  # full update records a checkpoint keeps (so checkpoints stay bounded)


class SparseScheduler:
    """Base scheduler: attach to an optimizer and update the sparse topology.

    Every ``update_interval`` optimizer steps, in ``(start, stop] · total_steps``, each
    layer drops its ``drop_fraction`` (decayed by ``drop_schedule``) of active weights
    with the lowest :meth:`prune_score` and regrows as many among the positions that
    were inactive before the update, those with the highest :meth:`grow_score`.
    A connection dropped at an update can come back only at a later one; grown weights
    start at zero with zero optimizer state. Active weights that are not finite are
    dropped first at every update, by every algorithm, on top of what the algorithm
    drops, and regrown in the same layer, so the counts stay exactly the algorithm's.

    Args:
        model: a model passed through :func:`sparse_param.sparsify` (DDP and
            torch.compile wrappers are looked through).
        optimizer: the optimizer training the model's parameters.
        total_steps: optimizer steps of the whole run.
        update_interval: ΔT, optimizer steps between topology updates.
        drop_fraction: α, share of active weights dropped at an update, before decay.
        drop_schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` decay of α.
        stop: share of ``total_steps`` after which the topology is frozen (T_end).
            Left at None, these four take the algorithm's published defaults
            (its ``defaults`` class attribute).
        start: share of ``total_steps`` before which the topology is not updated.
        seed: seed of the scheduler's own generator (random growth); keep it equal on
            every DDP rank.
        attach: count steps through ``optimizer.register_step_post_hook`` (default).
            With ``attach=False`` call :meth:`step` after every ``optimizer.step()``.
        history_size: full update records kept in :meth:`state_dict` (the most recent
            ones), so checkpoints stay bounded; ``history`` in memory keeps every record
            of this process.
        log_path: a file to which every update record is appended as one JSON line
            (the complete per-layer history of the run, across resumes; under DDP
            rank 0 writes it).

    The six schedule attributes (``total_steps``, ``update_interval``, ``drop_fraction``,
    ``drop_schedule``, ``stop``, ``start``) may be assigned at any time, e.g.
    ``scheduler.total_steps = epochs * len(loader)`` once the length of the run is known;
    an assignment is validated (a bad value, or a ``total_steps`` below ``step_count``,
    raises and changes nothing) and re-derives what depends on it (the dense-gradient
    capture of the next step).

    After every optimizer step the stored weights are re-zeroed where inactive, so
    optimizers whose update is dense (Shampoo, Muon, …) cannot revive pruned weights;
    the pass is skipped where the step provably kept them zero (see
    :mod:`sparse_param.scheduler.zeroing`). Steps an AMP ``GradScaler`` skips are not
    counted; with gradient accumulation only real optimizer steps count.

    One scheduler per optimizer and per model: a second one is refused until the first
    is :meth:`remove`-d (:func:`~sparse_param.attached_scheduler` finds it).

    Checkpoints: :meth:`state_dict` holds the algorithm's name, the layers' names and
    shapes, the counters, the generator, the last ``history_size`` records and the
    algorithm's declared ``state_fields``. It is also stored under
    ``optimizer.state_dict()["sparse_param"]`` and restored by
    ``optimizer.load_state_dict``, so any script that checkpoints the optimizer resumes
    the scheduler exactly, provided the scheduler exists when the optimizer is loaded
    (creating it afterwards warns). A state of another algorithm or layer set is
    refused before anything (scheduler or optimizer) is changed. A resume that leaves
    the step count behind the run, or past ``total_steps``, warns at the first step
    (:mod:`.pace`), as does a model trained by an optimizer this scheduler does not count.
    """

    # What an algorithm declares (class attributes).
    needs_dense_grad = False  # grows by dL/dW: captured on the step before each update
    captures_every_step = False  # SNFS: dL/dW on every step, handed to observe()
    updates_topology = True  # False for Static: never updates, no warning about it
    updates_at_stop = False  # GMP: also updates at stop, to reach its final counts
    regrows = True  # structured layers: keep room in every group to regrow what it drops
    keeps_structure = True  # False: moves counts across layers, refuses structured models
    state_fields: ClassVar[dict[str, state.Field]] = {}  # saved, checked, loaded by the base
    defaults: ClassVar[dict[str, Any]] = {  # for the arguments left at None
        "update_interval": 100,
        "drop_fraction": 0.3,
        "drop_schedule": "cosine",
        "stop": 0.75,
    }

    total_steps = schedule_attribute("total_steps", "Optimizer steps of the whole run.")
    update_interval = schedule_attribute("update_interval", "ΔT, steps between updates.")
    drop_fraction = schedule_attribute("drop_fraction", "α, share dropped, before decay.")
    drop_schedule = schedule_attribute("drop_schedule", "Decay of α: one of DROP_SCHEDULES.")
    stop = schedule_attribute("stop", "Share of total_steps after which nothing updates.")
    start = schedule_attribute("start", "Share of total_steps before which nothing updates.")

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        update_interval: int | None = None,
        drop_fraction: float | None = None,
        drop_schedule: str | None = None,
        stop: float | None = None,
        start: float = 0.0,
        seed: int = 0,
        attach: bool = True,
        history_size: int = HISTORY_SIZE,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        owner = type(self).__name__
        check_model(owner, model)
        check_optimizer(owner, optimizer)
        layers = checks.sparse_layers_of(owner, model)
        given = dict(zip(FIELDS, (total_steps, update_interval, drop_fraction, drop_schedule)))
        given.update(stop=stop, start=start)
        self.schedule = Schedule.checked(
            owner, {k: self.defaults.get(k) if v is None else v for k, v in given.items()}
        )
        seed = check_int(owner, "seed", seed, 0, maximum=2**64 - 1)  # torch.Generator's
        if not isinstance(attach, bool):
            raise TypeError(f"{owner}: attach must be True or False, got {attach!r}")
        self.history_size = check_int(owner, "history_size", history_size, 0)
        self.log_path = check_log_path(owner, log_path)
        checks.check_optimizer(owner, model, optimizer, layers, self.updates_topology)
        self.model, self.optimizer, self.layers = model, optimizer, layers
        self.structures = [structure_of(layer.parametrization) for layer in layers]
        if not self.keeps_structure and any(self.structures):
            raise ValueError(
                f"{owner} moves active weights across layers or groups, which breaks the "
                f"model's {next(filter(None, self.structures))} structure: use Static, SET, "
                f"RigL, SRigL or GMP, or sparsify without structure="
            )
        self.step_count = 0
        self.num_updates = 0  # over the whole run, across resumes
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, Any]] = []
        self.setup()  # may raise: nothing is attached yet
        checks.warn_if_optimizer_has_state(owner, optimizer)
        self._zeroing = InactiveZeroing(optimizer, layers)
        self._capture = DenseGradCapture(layers)
        self._pace = Pace(self)
        self._hooks = OptimizerHooks(
            optimizer, self._on_step if attach else None, self.state_dict,
            self._check_state, self.load_state_dict, self._pace.unrestored,
        )  # fmt: skip
        registry.attach(self, [optimizer, *(layer.parametrization for layer in layers)])
        self._arm_dense_grad()

    # ------------------------------------------------- what an algorithm writes
    def setup(self) -> None:
        """Derive the algorithm's state and check its arguments, once the layers and the
        schedule are known and before anything is attached (so a bad argument leaves the
        optimizer untouched)."""

    def interval(self, step: int) -> int:
        """Update interval in force at ``step``."""
        return self.update_interval

    def observe(self, dense_grads: Sequence[Tensor | None]) -> None:
        """After every counted optimizer step, before any update, with the dense
        gradients captured in it (all None unless ``captures_every_step``)."""

    def plan(self, fraction: float) -> Plan:
        """The counts of the update about to happen at drop fraction ``fraction``.
        Default: :func:`~.plan.magnitude_counts`, each layer regrowing what it drops."""
        pruned = magnitude_counts(self.layers, fraction)
        return Plan(prune=pruned, grow=list(pruned))

    def prune_score(self, index: int, layer: SparseLayer) -> Tensor:
        """Keep score of each weight (shape of the weight); the lowest active go first.
        Default: magnitude ``|w|``."""
        return layer.weight.detach().abs()

    def grow_score(self, index: int, layer: SparseLayer) -> Tensor | None:
        """Grow score (shape of the weight); the highest inactive grow. ``None``: uniform
        random choice from the scheduler's generator (the default)."""
        return None

    def adapt(self, plan: Plan) -> Mapping[str, Any]:
        """Changes to the declared state after an update that carried out ``plan`` (the
        algorithm's own counts, without the engine's extra drops of non-finite weights);
        a mapping of field names to new values. Default: none."""
        return {}

    # ------------------------------------------------------------- the schedule
    @property
    def start_step(self) -> int:
        return self.schedule.start_step

    @property
    def stop_step(self) -> int:
        return self.schedule.stop_step

    def _set_schedule(self, **changes: Any) -> None:
        schedule = self.schedule.changed(type(self).__name__, **changes)
        if "total_steps" in changes and self.updates_topology:
            checks.check_total_steps(type(self).__name__, schedule.total_steps, self.step_count)
        self.schedule = schedule
        self._arm_dense_grad()

    def is_update_step(self, step: int) -> bool:
        """Whether the topology is updated after optimizer step ``step``."""
        if not self.updates_topology:
            return False
        return self.schedule.is_update_step(step, self.interval(step), self.updates_at_stop)

    def count_updates(self, limit: int | None = None) -> int:
        """Topology updates over the whole run, counting stops at ``limit``."""
        return self.schedule.count_updates(self.is_update_step, limit)

    def current_drop_fraction(self) -> float:
        return self.schedule.drop_fraction_at(self.step_count)

    def wants_dense_grad(self, step: int) -> bool:
        """Whether the backward passes of optimizer step ``step`` capture dL/dW."""
        return self.captures_every_step or (self.needs_dense_grad and self.is_update_step(step))

    def _arm_dense_grad(self) -> None:
        self._capture.arm(self.wants_dense_grad(self.step_count + 1))

    # -------------------------------------------------------------- the engine
    def step(self) -> None:
        """Count one optimizer step (for ``attach=False``); updates the topology when due."""
        if self._hooks.counts_steps:
            raise RuntimeError(
                f"{type(self).__name__} is attached to the optimizer and counts its steps "
                f"itself; create it with attach=False to call step() by hand"
            )
        self._on_step()

    def _on_step(self) -> None:
        if self._pace.due:  # after creation or a load, when the state is final (.pace)
            self._pace.check()
        self.step_count += 1
        self._zeroing.after_step()
        self.observe([layer.parametrization.dense_grad for layer in self.layers])
        if self.is_update_step(self.step_count):
            self.update()
        else:
            self._capture.clear()
        self._arm_dense_grad()

    def before_update(self) -> None:
        """The first stage of every update: average over ranks what every rank must
        agree on (the captured dense gradients, state fields declared ``averaged``)."""
        if self.needs_dense_grad:
            self._capture.average(type(self).__name__, self.step_count)
        for name, field in self.state_fields.items():
            if field.averaged:
                for tensor in getattr(self, name):
                    distributed.average_(tensor)

    @torch.no_grad()
    def update(self) -> dict[str, Any]:
        """Prune and regrow every layer now; returns (and appends to ``history``) the
        record of the update.

        Non-finite active weights are dropped first, on top of the algorithm's own
        counts, and as many are regrown in the same layer, as far as the layer keeps one
        active weight and has positions to regrow into (a warning says so)."""
        fraction = self.current_drop_fraction()
        self.before_update()
        owner, step = type(self).__name__, self.step_count
        old_masks = [layer.mask.clone() for layer in self.layers]
        plan = self.plan(fraction)
        broken = topology.non_finite_active(self.layers, old_masks)
        extra = topology.extra_drops(self.layers, self.structures, broken, plan)
        pruned = [p + e for p, e in zip(plan.prune, extra)]
        grown = [g + e for g, e in zip(plan.grow, extra)]
        for i, (layer, old) in enumerate(zip(self.layers, old_masks)):
            common = dict(
                generator=self.generator, structure=self.structures[i], targets=plan.target(i),
                regrow=self.regrows, where=f"{owner} in layer {layer.name!r} at step {step}",
            )  # fmt: skip
            drop = select(old, pruned[i], self.prune_score(i, layer), lowest=True,
                          first=broken[i], **common)  # fmt: skip
            topology.warn_non_finite(owner, layer.name, step, broken[i], drop)
            grow = select(~old, grown[i], self.grow_score(i, layer), lowest=False,
                          kept=old & ~drop, **common)  # fmt: skip
            new = distributed.broadcast_mask_((old & ~drop) | grow)
            topology.install_mask(layer, self.optimizer, old, new)
        self._assign(self.adapt(plan))
        self._capture.clear()
        record = update_record(self.model, self.layers, step, fraction, pruned, grown)
        self.history.append(record)
        self.num_updates += 1
        if self.log_path is not None:
            append_record(self.log_path, record)
        return record

    def _assign(self, changes: Mapping[str, Any]) -> None:
        unknown = set(changes) - set(self.state_fields)
        if unknown:
            raise TypeError(f"{type(self).__name__}.adapt: {sorted(unknown)} are not declared")
        for name, value in changes.items():
            setattr(self, name, value)

    # ---------------------------------------------------------- life cycle & state
    def remove(self) -> None:
        """Detach from the optimizer and the model and stop capturing gradients; the
        optimizer and the model are then free for another scheduler."""
        self._hooks.remove()
        self._pace.unwatch()
        registry.detach(self, [self.optimizer, *(x.parametrization for x in self.layers)])
        self._zeroing.remove()
        self._capture.remove()

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's name, the layers (name and shape), the counters, the generator
        state, the last ``history_size`` update records and the declared state fields:
        tensors and plain values only, loadable with ``torch.load(...,
        weights_only=True)``; bounded in size however long the run."""
        recent = self.history[-self.history_size :] if self.history_size else []
        return {
            "algorithm": type(self).__name__,
            "layers": state.layer_list(self.layers),
            "step_count": self.step_count,
            "num_updates": self.num_updates,
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in recent],
            **state.save_fields(self),
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. The whole state is checked first (algorithm,
        layers, every entry's type and shape); a state that does not fit raises
        ``ValueError`` and leaves the scheduler as it was. ``history`` becomes the
        records the state holds."""
        self._check_state(saved)
        self.step_count = int(saved["step_count"])
        self.num_updates = int(saved["num_updates"])
        self.generator.set_state(saved["generator"])
        self.history = [dict(r) for r in saved["history"]]
        state.load_fields(self, saved)
        self._pace.restored()
        self._arm_dense_grad()

    def _check_state(self, saved: Any) -> None:
        layers = state.layer_list(self.layers)
        state.check_base(type(self).__name__, saved, layers, self.generator.get_state())
        state.check_fields(self, saved)

    def __repr__(self) -> str:
        schedule = (
            f"/{self.total_steps}, update_interval={self.update_interval}, drop_fraction="
            f"{self.drop_fraction} ({self.drop_schedule}), stop={self.stop}"
            if self.updates_topology
            else ""
        )
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, step={self.step_count}"
            f"{schedule}, {self._model_summary()}, attached={self._hooks.counts_steps})"
        )

    def _model_summary(self) -> str:
        if next(sparse_layers(self.model), None) is None:  # after sp.finalize(model)
            return "finalized"
        return f"density={density(self.model):.4f}, itop_rate={itop_rate(self.model):.4f}"
