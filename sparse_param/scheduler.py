"""The engine of dynamic sparse training: one scheduler visits every sparse layer.

An algorithm is a subclass that says how many weights each layer drops, which ones
(``prune_score``), how many each layer regrows and which ones (``grow_score``). The
engine does the rest the same way for all: counting optimizer steps, deciding when to
update, the dense gradient for gradient-based growth, exact top-k selection, dropping
non-finite weights, zeroing weights and optimizer state, keeping ``ever_active``, DDP
agreement, records, checkpoints and the life cycle (one scheduler per optimizer and
model, validated schedule attributes, validated state).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import attachment, distributed, fsdp
from .allocation import apportion
from .arguments import check_int, check_real
from .layers import SparseLayer, sparse_layers
from .metrics import density, egf_at_update, itop_rate
from .sampling import random_subset
from .schedules import DROP_SCHEDULES
from .schedules import drop_fraction as drop_fraction_at
from .structure import Structure, structure_of
from .structure import select as structured_select
from .warn import warn
from .zeroing import InactiveZeroing

OPTIMIZER_STATE_KEY = "sparse_param"  # where the scheduler's state sits in optimizer.state_dict()
HISTORY_SIZE = 20  # full update records a checkpoint keeps (so checkpoints stay bounded)
FEW_UPDATES = 5  # a schedule with fewer topology updates than this gets a warning


def _schedule_attribute(name: str, doc: str) -> property:
    """A schedule attribute: reading returns it, assigning validates the whole schedule
    with the new value and re-derives what depends on it (see ``_set_schedule``)."""

    def get(self: SparseScheduler) -> Any:
        return self._schedule[name]

    def set_(self: SparseScheduler, value: Any) -> None:
        self._set_schedule(**{name: value})

    return property(get, set_, doc=doc)


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
    an assignment is validated (a bad value raises and changes nothing) and re-derives
    what depends on it (the dense-gradient capture of the next step).

    After every optimizer step the stored weights are re-zeroed where inactive, so
    optimizers whose update is dense (Shampoo, Muon, …) cannot revive pruned weights;
    the pass is skipped where the step provably kept them zero (see
    :mod:`sparse_param.zeroing`).
    Steps an AMP ``GradScaler`` skips are not counted; with gradient accumulation only
    real optimizer steps count.

    One scheduler per optimizer and per model: a second one is refused until the first
    is :meth:`remove`-d (:func:`~sparse_param.attached_scheduler` finds it).

    Checkpoints: :meth:`state_dict` holds the algorithm's name, the layers' names and
    shapes, the counters, the generator and the last ``history_size`` records. It is
    also stored under ``optimizer.state_dict()["sparse_param"]`` and restored by
    ``optimizer.load_state_dict``, so any script that checkpoints the optimizer resumes
    the scheduler exactly, provided the scheduler exists when the optimizer is loaded
    (creating it afterwards warns). A state of another algorithm or layer set is
    refused before anything (scheduler or optimizer) is changed.
    """

    needs_dense_grad = False  # gradient-based growth captures dL/dW on update steps
    updates_topology = True  # False for Static: no warning about a schedule that never updates
    # Defaults of the algorithm, used for the arguments left at None.
    defaults: ClassVar[dict[str, Any]] = {
        "update_interval": 100,
        "drop_fraction": 0.3,
        "drop_schedule": "cosine",
        "stop": 0.75,
    }

    total_steps = _schedule_attribute("total_steps", "Optimizer steps of the whole run.")
    update_interval = _schedule_attribute(
        "update_interval", "ΔT, optimizer steps between topology updates."
    )
    drop_fraction = _schedule_attribute(
        "drop_fraction", "α, share of active weights dropped at an update, before decay."
    )
    drop_schedule = _schedule_attribute("drop_schedule", "Decay of α: one of ``DROP_SCHEDULES``.")
    stop = _schedule_attribute("stop", "Share of total_steps after which nothing updates.")
    start = _schedule_attribute("start", "Share of total_steps before which nothing updates.")
    regrows = True  # structured layers: keep room in every group to regrow what it drops
    keeps_structure = True  # False: moves counts across layers, refuses structured models

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
        layers = list(sparse_layers(model))
        if not layers:
            raise ValueError(
                f"{owner}: the model has no sparse layers; call "
                f"sparse_param.sparsify(model) before creating the scheduler"
            )
        given = {
            "total_steps": total_steps,
            "update_interval": update_interval,
            "drop_fraction": drop_fraction,
            "drop_schedule": drop_schedule,
            "stop": stop,
            "start": start,
        }
        schedule = self._check_schedule(
            {k: self.defaults.get(k) if v is None else v for k, v in given.items()}
        )
        seed = check_int(owner, "seed", seed, 0)
        if not isinstance(attach, bool):
            raise TypeError(f"{owner}: attach must be True or False, got {attach!r}")
        history_size = check_int(owner, "history_size", history_size, 0)
        if log_path is not None:
            log_path = Path(log_path)
            if not log_path.parent.is_dir():
                raise ValueError(
                    f"{owner}: log_path {str(log_path)!r}: folder {str(log_path.parent)!r} "
                    f"does not exist; create it first"
                )
        missing = _not_held(optimizer, layers)
        if missing:
            raise ValueError(
                f"{owner}: the optimizer does not hold the weights of sparse layers "
                f"{missing}: build it from model.parameters() (after or before sparsify, "
                f"both work)"
            )
        for what, obj in (("optimizer", optimizer), ("model", model)):
            first = attachment.attached_scheduler(obj)
            if first is not None:
                raise RuntimeError(
                    f"{owner}: {first!r} is already attached to this {what}; two schedulers "
                    f"would both change the topology and share the checkpoint entry. Call "
                    f"remove() on the first (sparse_param.attached_scheduler({what})"
                    f".remove()) before creating another"
                )
        self.model = model
        self.optimizer = optimizer
        self.layers: list[SparseLayer] = layers
        self._schedule = schedule
        self.history_size = history_size
        self.log_path = log_path
        self.step_count = 0
        self.num_updates = 0  # over the whole run, across resumes
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, Any]] = []
        self._schedule_checked = False
        self._pending_state: dict[str, Any] | None = None
        self._hook = None
        self._state_hooks: list[Any] = []
        self.structures: list[Structure | None] = [
            structure_of(layer.parametrization) for layer in layers
        ]
        if not self.keeps_structure and any(self.structures):
            raise ValueError(
                f"{owner} moves active weights across layers or groups, which breaks the "
                f"model's {next(filter(None, self.structures))} structure: use Static, SET, "
                f"RigL, SRigL or GMP, or sparsify without structure="
            )
        self.setup()  # may raise: nothing is attached yet
        if any(bool(state) for state in optimizer.state.values()):
            warnings.warn(
                f"{owner}: the optimizer already holds state (it has taken steps or was "
                f"loaded from a checkpoint); this scheduler starts its schedule at step 0. "
                f"If you are resuming, create the scheduler before "
                f"optimizer.load_state_dict(...), or restore it with "
                f"scheduler.load_state_dict(checkpoint_of_the_optimizer['sparse_param'])",
                UserWarning,
                stacklevel=2,
            )
        self._zeroing = InactiveZeroing(optimizer, self.layers)
        fsdp.capture_after_reduce(self.layers)
        self._hook = (
            optimizer.register_step_post_hook(self._after_optimizer_step) if attach else None
        )
        # Ride along in the optimizer's state_dict, so a script that checkpoints and
        # resumes the optimizer (timm's CheckpointSaver / resume_checkpoint) resumes
        # the topology schedule too. Loading checks in the pre-hook (before torch loads
        # anything) and assigns in the post-hook (after torch accepted the state).
        self._state_hooks = [
            optimizer.register_state_dict_post_hook(self._save_into_optimizer_state),
            optimizer.register_load_state_dict_pre_hook(self._check_optimizer_state),
            optimizer.register_load_state_dict_post_hook(self._load_from_optimizer_state),
        ]
        attachment.attach(self, [optimizer, *(layer.parametrization for layer in layers)])
        self._arm_dense_grad()

    # ----------------------------------------------------------------- the criteria
    def prune_score(self, index: int, layer: SparseLayer) -> Tensor:
        """Keep score of each weight (shape of the weight); the lowest active go first.

        Default: magnitude ``|w|``.
        """
        return layer.weight.detach().abs()

    def grow_score(self, index: int, layer: SparseLayer) -> Tensor | None:
        """Grow score (shape of the weight); the highest inactive grow. ``None``: uniform
        random choice from the scheduler's generator (the default)."""
        return None

    def prune_counts(self, fraction: float) -> list[int]:
        """Weights each layer drops: ``round(fraction · active)``, leaving at least one
        active and no more than the layer can regrow."""
        return [
            min(round(fraction * layer.active), layer.active - 1, layer.numel - layer.active)
            for layer in self.layers
        ]

    def grow_counts(self, pruned: Sequence[int], capacity: Sequence[int]) -> list[int]:
        """Weights each layer regrows, given what it pruned and how many positions were
        inactive before the update. Default: as many as it pruned."""
        return list(pruned)

    def setup(self) -> None:
        """Called once the layers and the schedule are known, before the scheduler
        attaches to the optimizer: algorithms derive their own state and check their
        arguments here, so a bad argument leaves the optimizer untouched."""

    def observe(self) -> None:
        """Called after every counted optimizer step, before any update."""

    def before_update(self) -> None:
        """Called at the start of every update. Default: average the captured dense
        gradients over DDP ranks, so every rank scores the same values."""
        if self.needs_dense_grad:
            self._average_dense_grads()

    def after_update(self, pruned: Sequence[int], grown: Sequence[int]) -> None:
        """Called after every update with the per-layer counts of the algorithm's own
        rule (``prune_counts`` / ``grow_counts``; the engine's extra drops of non-finite
        weights, regrown in the same layer, are not included)."""

    def interval(self, step: int) -> int:
        """Update interval in force at ``step``."""
        return self.update_interval

    def group_targets(self, index: int, layer: SparseLayer) -> Tensor | None:
        """Structured layers: active count each group (unit or N:M group) ends the
        update with, ``(groups,)``. Default None: what it had before the update."""
        return None

    # ----------------------------------------------------------------- the schedule
    def _check_schedule(self, schedule: Mapping[str, Any]) -> dict[str, Any]:
        """The schedule with every value validated and made a plain Python value."""
        owner = type(self).__name__
        checked = {
            "total_steps": check_int(owner, "total_steps", schedule["total_steps"], 1),
            "update_interval": check_int(owner, "update_interval", schedule["update_interval"], 1),
            "drop_fraction": check_real(owner, "drop_fraction", schedule["drop_fraction"], 0, 1),
            "drop_schedule": schedule["drop_schedule"],
            "stop": check_real(owner, "stop (a share of total_steps)", schedule["stop"], 0, 1),
            "start": check_real(owner, "start (a share of total_steps)", schedule["start"], 0, 1),
        }
        if checked["drop_schedule"] not in DROP_SCHEDULES:
            raise ValueError(
                f"{owner}: unknown drop_schedule {checked['drop_schedule']!r}; expected one "
                f"of {DROP_SCHEDULES}"
            )
        if checked["start"] > checked["stop"]:
            raise ValueError(
                f"{owner}: start={checked['start']} is after stop={checked['stop']}; start "
                f"must be a share of total_steps in [0, stop]"
            )
        return checked

    def _set_schedule(self, **changes: Any) -> None:
        """Assign schedule attributes: validate the whole new schedule first (a bad value
        raises and changes nothing), then re-derive what depends on it."""
        self._schedule = self._check_schedule({**self._schedule, **changes})
        self._arm_dense_grad()

    def count_updates(self, limit: int | None = None) -> int:
        """Topology updates the schedule makes over the whole run, counting stops at
        ``limit``. Update steps are among the multiples of ``update_interval`` and
        ``stop · total_steps`` (GMP's final update)."""
        candidates = range(
            (self.start_step // self.update_interval + 1) * self.update_interval,
            self.stop_step + 1,
            self.update_interval,
        )
        found = 0
        for step in candidates:
            found += self.is_update_step(step)
            if limit is not None and found >= limit:
                return found
        if self.stop_step % self.update_interval and self.is_update_step(self.stop_step):
            found += 1
        return found if limit is None else min(found, limit)

    def _check_weights_still_held(self) -> None:
        # At the first step: a wrapper that replaces the parameters after the scheduler
        # was created leaves the optimizer stepping the old ones, the model untrained.
        missing = _not_held(self.optimizer, self.layers)
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}: the optimizer no longer holds the weights of sparse "
                f"layers {missing}: they were replaced after the optimizer was built (by "
                f"fully_shard, for one). Build the optimizer and the scheduler after: "
                f"sparsify(model) → fully_shard(...) → optimizer → scheduler"
            )

    def _warn_if_few_updates(self) -> None:
        # At the first counted step, not at creation: a script may create the scheduler
        # with a placeholder total_steps and set the real one later (timm's train.py).
        self._schedule_checked = True
        if not self.updates_topology:
            return
        n = self.count_updates(limit=FEW_UPDATES)
        if n >= FEW_UPDATES:
            return
        what = "never changes" if n == 0 else f"changes only {n} time{'s' * (n > 1)}"
        warn(
            f"{type(self).__name__}: the topology {what} in this run: updates every "
            f"update_interval={self.update_interval} steps in ({self.start_step}, "
            f"{self.stop_step}] (start={self.start}, stop={self.stop} of total_steps="
            f"{self.total_steps}). Lower update_interval or check total_steps"
        )

    # ------------------------------------------------------------------- the engine
    @property
    def start_step(self) -> int:
        return int(self.start * self.total_steps)

    @property
    def stop_step(self) -> int:
        return int(self.stop * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        in_window = self.start_step < step <= self.stop_step
        return in_window and step % self.interval(step) == 0

    def current_drop_fraction(self) -> float:
        return drop_fraction_at(
            self.step_count, self.drop_fraction, self.stop_step, self.drop_schedule
        )

    def step(self) -> None:
        """Count one optimizer step (for ``attach=False``); updates the topology when due."""
        if self._hook is not None:
            raise RuntimeError(
                f"{type(self).__name__} is attached to the optimizer and counts its steps "
                f"itself; create it with attach=False to call step() by hand"
            )
        self._on_step()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self._on_step()

    def _on_step(self) -> None:
        if not self._schedule_checked:
            self._check_weights_still_held()
            self._warn_if_few_updates()
        self.step_count += 1
        self._zero_inactive_weights()
        self.observe()
        if self.is_update_step(self.step_count):
            self.update()
        self._arm_dense_grad()

    @torch.no_grad()
    def update(self) -> dict[str, Any]:
        """Prune and regrow every layer now; returns (and appends to ``history``) the
        record of the update.

        Non-finite active weights are dropped first, on top of the algorithm's own
        counts, and as many are regrown in the same layer, as far as the layer keeps one
        active weight and has positions to regrow into (a warning says so)."""
        fraction = self.current_drop_fraction()
        self.before_update()
        old_masks = [layer.mask.clone() for layer in self.layers]
        capacity = [layer.numel - layer.active for layer in self.layers]
        planned = self.prune_counts(fraction)
        targets = [self.group_targets(i, layer) for i, layer in enumerate(self.layers)]
        planned_grown = self.grow_counts(planned, capacity)
        broken = [
            old & ~torch.isfinite(fsdp.full(layer.weight))
            for layer, old in zip(self.layers, old_masks)
        ]
        # Structured layers drop non-finite weights first within their own counts (they
        # score -inf): an extra drop would not fit every group.
        extra = [
            0 if s is not None else max(min(int(b.count_nonzero()), layer.active - 1 - p, c - g), 0)
            for layer, s, b, p, g, c in zip(
                self.layers, self.structures, broken, planned, planned_grown, capacity
            )
        ]
        pruned = [p + e for p, e in zip(planned, extra)]
        grown = [g + e for g, e in zip(planned_grown, extra)]
        for i, (layer, old) in enumerate(zip(self.layers, old_masks)):
            drop = self._select(
                layer, old, pruned[i], self.prune_score(i, layer), lowest=True,
                first=broken[i], index=i, targets=targets[i],
            )  # fmt: skip
            self._warn_non_finite(layer, broken[i], drop)
            grow = self._select(
                layer, ~old, grown[i], self.grow_score(i, layer), lowest=False, index=i,
                targets=targets[i], kept=old & ~drop,
            )  # fmt: skip
            self._apply(layer, old, distributed.broadcast_mask_((old & ~drop) | grow))
        self.after_update(planned, planned_grown)
        self._clear_dense_grads()
        record = self._record(fraction, pruned, grown)
        self.history.append(record)
        self.num_updates += 1
        # Every rank holds the same record; one line per update, from rank 0.
        if self.log_path is not None and (
            distributed.world_size() == 1 or torch.distributed.get_rank() == 0
        ):
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(record, default=_plain) + "\n")
        return record

    def _select(
        self,
        layer: SparseLayer,
        candidates: Tensor,
        n: int,
        score: Tensor | None,
        lowest: bool,
        first: Tensor | None = None,
        index: int = 0,
        targets: Tensor | None = None,
        kept: Tensor | None = None,
    ) -> Tensor:
        """Bool tensor marking ``n`` of the ``candidates``: those in ``first`` before any
        other, then the lowest (``lowest``) or highest ``score``; uniform at random when
        ``score`` is None. Non-finite scores rank last (dropped first, grown last), with a
        warning. A structured layer (``self.structures[index]``) selects inside its groups
        (:func:`sparse_param.structure.select`) so that every group ends at its
        ``targets`` count; ``kept`` is the mask after pruning, for growth."""
        structure = self.structures[index]
        if score is not None:
            score = fsdp.full(score)  # sharded: the top-k is global over the shards
        if structure is not None:
            return structured_select(
                structure, candidates, n, score, lowest=lowest, kept=kept, targets=targets,
                regrow=self.regrows, generator=self.generator,
            )  # fmt: skip
        chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
        if first is not None:
            forced = (candidates & first).flatten().nonzero().squeeze(1)[:n]
            chosen[forced] = True
            candidates = candidates & ~first
            n -= forced.numel()
        if n > 0:
            index = candidates.flatten().nonzero().squeeze(1)
            if n > index.numel():
                raise AssertionError(
                    f"{type(self).__name__}: asked to pick {n} of {index.numel()} positions "
                    f"in layer {layer.name!r}"
                )
            if score is None:
                pick = random_subset(index.numel(), n, self.generator).to(index.device)
            else:
                values = score.flatten()[index].float()
                finite = torch.isfinite(values)
                if not bool(finite.all()):
                    warn(
                        f"{type(self).__name__}: {int((~finite).sum())} non-finite scores in "
                        f"layer {layer.name!r} at step {self.step_count}; they rank last",
                        RuntimeWarning,
                    )
                    # -inf ranks last either way: dropped first, grown last.
                    values = torch.where(finite, values, -torch.inf)
                pick = torch.topk(values, n, largest=not lowest, sorted=False).indices
            chosen[index[pick]] = True
        return chosen.view_as(candidates)

    def _warn_non_finite(self, layer: SparseLayer, broken: Tensor, dropped: Tensor) -> None:
        total = int(broken.count_nonzero())
        if total == 0:
            return
        left = int((broken & ~dropped).count_nonzero())
        stay = (
            f"; {left} stay active (a layer keeps one active weight and regrows only into "
            f"positions inactive before the update)"
            if left
            else ""
        )
        warn(
            f"{type(self).__name__}: {total} non-finite active weights in layer "
            f"{layer.name!r} at step {self.step_count}: dropped first{stay}",
            RuntimeWarning,
        )

    def _apply(self, layer: SparseLayer, old: Tensor, new: Tensor) -> None:
        """Install ``new`` as the mask: zero pruned and grown weights and their
        optimizer state (every state tensor shaped like the weight), extend ever_active."""
        # masked_fill, not mul: a non-finite value times 0 is NaN, not 0.
        unstable = ~(old & new)
        fsdp.masked_fill_(layer.weight, unstable, 0)
        for value in self.optimizer.state.get(layer.weight, {}).values():
            if isinstance(value, Tensor) and value.shape == layer.weight.shape:
                fsdp.masked_fill_(value, unstable, 0)
        layer.mask.copy_(new)
        layer.ever_active.logical_or_(new)

    def _zero_inactive_weights(self) -> None:
        self._zeroing.after_step()

    def wants_dense_grad(self, step: int) -> bool:
        """Whether the backward passes of optimizer step ``step`` capture dL/dW.
        Default: on update steps of gradient-based algorithms only."""
        return self.needs_dense_grad and self.is_update_step(step)

    def _arm_dense_grad(self) -> None:
        armed = self.wants_dense_grad(self.step_count + 1)
        for layer in self.layers:
            layer.parametrization.capture_dense_grad = armed

    def _average_dense_grads(self) -> None:
        for layer in self.layers:
            grad = layer.parametrization.dense_grad
            if grad is None:
                raise RuntimeError(
                    f"{type(self).__name__}: no dense gradient was captured for layer "
                    f"{layer.name!r} before the update at step {self.step_count}; run "
                    f"forward and backward through the model before optimizer.step()"
                )
            layer.parametrization.dense_grad = fsdp.averaged(grad)

    def _clear_dense_grads(self) -> None:
        for layer in self.layers:
            layer.parametrization.dense_grad = None

    def _record(
        self, fraction: float, pruned: Sequence[int], grown: Sequence[int]
    ) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "drop_fraction": fraction,
            "pruned": {layer.name: n for layer, n in zip(self.layers, pruned)},
            "grown": {layer.name: n for layer, n in zip(self.layers, grown)},
            "density": density(self.model),
            "itop_rate": itop_rate(self.model),
            "egf": egf_at_update(self.layers, pruned, grown),
        }

    # ------------------------------------------------------------ lifecycle & state
    def remove(self) -> None:
        """Detach from the optimizer and the model and stop capturing gradients; the
        optimizer and the model are then free for another scheduler."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for handle in self._state_hooks:
            handle.remove()
        self._state_hooks = []
        attachment.detach(self, [self.optimizer, *(layer.parametrization for layer in self.layers)])
        self._zeroing.remove()
        fsdp.capture_after_reduce(self.layers, on=False)
        for layer in self.layers:
            layer.parametrization.capture_dense_grad = False
        self._clear_dense_grads()

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's name, the layers (name and shape), the counters, the generator
        state and the last ``history_size`` update records: tensors and plain values
        only, loadable with ``torch.load(..., weights_only=True)``; bounded in size
        however long the run."""
        recent = self.history[-self.history_size :] if self.history_size else []
        return {
            "algorithm": type(self).__name__,
            "layers": [[layer.name, list(layer.mask.shape)] for layer in self.layers],
            "step_count": self.step_count,
            "num_updates": self.num_updates,
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in recent],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. The whole state is checked first (algorithm,
        layers, every entry's type and shape); a state that does not fit raises
        ``ValueError`` and leaves the scheduler as it was. ``history`` becomes the
        records the state holds."""
        self._check_state(state)
        self.step_count = int(state["step_count"])
        self.num_updates = int(state["num_updates"])
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in state["history"]]
        self._arm_dense_grad()

    def _check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a :meth:`state_dict` of this
        algorithm over the same layers. Subclasses check their own entries after
        ``super()._check_state(state)``."""
        owner = type(self).__name__
        where = f"{owner}.load_state_dict"
        if not isinstance(state, Mapping):
            raise ValueError(f"{where}: expected the dict of state_dict(), got {type(state)}")
        saved = state.get("algorithm")
        if saved is None:
            raise ValueError(
                f"{where}: the state has no 'algorithm' entry (keys {sorted(state)}): it was "
                f"not saved by a sparse_param scheduler of this version"
            )
        if saved != owner:
            raise ValueError(
                f"{where}: the state was saved by a {saved} scheduler and this one is {owner}; "
                f"create a {saved} scheduler to resume it, or start {owner} without loading it"
            )
        layers = [[layer.name, list(layer.mask.shape)] for layer in self.layers]
        if state.get("layers") != layers:
            theirs = state.get("layers")
            count = len(theirs) if isinstance(theirs, list) else "?"
            differ = next(
                (
                    f"saved {s}, here {o}"
                    for s, o in zip(theirs if isinstance(theirs, list) else [], layers)
                    if s != o
                ),
                "",
            )
            raise ValueError(
                f"{where}: the state was saved for {count} sparse layers and this model has "
                f"{len(layers)} ({differ or 'names or shapes differ'}); load it into the model "
                f"it was saved from (same architecture and sparsify targets)"
            )
        for key in ("step_count", "num_updates"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be an int ≥ 0, got {value!r}")
        generator = state.get("generator")
        expected = self.generator.get_state()
        if not (
            isinstance(generator, Tensor)
            and generator.dtype == expected.dtype
            and generator.shape == expected.shape
        ):
            raise ValueError(
                f"{where}: generator must be a {expected.dtype} tensor of shape "
                f"{tuple(expected.shape)} (torch.Generator.get_state())"
            )
        history = state.get("history")
        if not isinstance(history, list) or not all(isinstance(r, Mapping) for r in history):
            raise ValueError(f"{where}: history must be a list of update records (dicts)")

    def _save_into_optimizer_state(self, optimizer, state: dict[str, Any]) -> None:
        state[OPTIMIZER_STATE_KEY] = self.state_dict()

    def _check_optimizer_state(self, optimizer, state: dict[str, Any]) -> dict[str, Any]:
        # Runs before torch loads the optimizer: raising here leaves it untouched.
        state = dict(state)
        ours = state.pop(OPTIMIZER_STATE_KEY, None)
        if ours is not None:
            self._check_state(ours)
        self._pending_state = ours
        return state

    def _load_from_optimizer_state(self, optimizer) -> None:
        # Runs once torch has accepted the optimizer state: a refused optimizer state
        # leaves the scheduler untouched too.
        ours, self._pending_state = self._pending_state, None
        if ours is not None:
            self.load_state_dict(ours)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, step={self.step_count}/"
            f"{self.total_steps}, update_interval={self.update_interval}, "
            f"drop_fraction={self.drop_fraction} ({self.drop_schedule}), stop={self.stop}, "
            f"{self._model_summary()}, attached={self._hook is not None})"
        )

    def _model_summary(self) -> str:
        if next(sparse_layers(self.model), None) is None:  # after sp.finalize(model)
            return "finalized"
        return f"density={density(self.model):.4f}, itop_rate={itop_rate(self.model):.4f}"


def _not_held(optimizer: torch.optim.Optimizer, layers: Sequence[SparseLayer]) -> str:
    """The names of the sparse layers whose stored weight the optimizer does not hold
    (at most five listed); empty if it holds them all."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [layer.name for layer in layers if id(layer.weight) not in held]
    return f"{missing[:5]}{' …' if len(missing) > 5 else ''}" if missing else ""


def redistribute(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` regrown weights across layers in proportion to ``weights``, each
    layer taking at most its ``capacity`` (exact integers; see :func:`apportion`)."""
    return apportion(total, list(weights), [0] * len(weights), list(capacity))


def _plain(value: Any) -> Any:
    """JSON form of what a record may hold besides plain values (tensors, numpy scalars)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"update record value {value!r} is not JSON serializable")
