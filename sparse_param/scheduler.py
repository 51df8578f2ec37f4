"""The engine of dynamic sparse training: one scheduler visits every sparse layer.

An algorithm is a subclass that says how many weights each layer drops, which ones
(``prune_score``), how many each layer regrows and which ones (``grow_score``). The
engine does the rest the same way for all: counting optimizer steps, deciding when to
update, the dense gradient for gradient-based growth, exact top-k selection, zeroing
weights and optimizer state, keeping ``ever_active``, DDP agreement, records and
checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .allocation import apportion
from .layers import SparseLayer, sparse_layers
from .metrics import density, itop_rate
from .sampling import random_subset
from .schedules import DROP_SCHEDULES
from .schedules import drop_fraction as drop_fraction_at

OPTIMIZER_STATE_KEY = "sparse_param"  # where the scheduler's state sits in optimizer.state_dict()


class SparseScheduler:
    """Base scheduler: attach to an optimizer and update the sparse topology.

    Every ``update_interval`` optimizer steps, up to ``stop · total_steps``, each
    layer drops its ``drop_fraction`` (decayed by ``drop_schedule``) of active weights
    with the lowest :meth:`prune_score` and regrows as many among the positions that
    were inactive before the update, those with the highest :meth:`grow_score`.
    A connection dropped at an update can come back only at a later one; grown weights
    start at zero with zero optimizer state.

    Args:
        model: a model passed through :func:`sparse_param.sparsify` (DDP and
            torch.compile wrappers are looked through).
        optimizer: the optimizer training the model's parameters.
        total_steps: optimizer steps of the whole run.
        update_interval: ΔT, optimizer steps between topology updates.
        drop_fraction: α, share of active weights dropped at an update, before decay.
        drop_schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` decay of α.
        stop: share of ``total_steps`` after which the topology is frozen (T_end).
            Left at None, these four take the algorithm's published defaults (class
            attributes of the same names).
        start: share of ``total_steps`` before which the topology is not updated.
        seed: seed of the scheduler's own generator (random growth); keep it equal on
            every DDP rank.
        attach: count steps through ``optimizer.register_step_post_hook`` (default).
            With ``attach=False`` call :meth:`step` after every ``optimizer.step()``.

    After every optimizer step the stored weights are re-zeroed where inactive, so
    optimizers whose update is dense (Shampoo, Muon, …) cannot revive pruned weights.
    Steps an AMP ``GradScaler`` skips are not counted; with gradient accumulation only
    real optimizer steps count.

    Checkpoints: :meth:`state_dict` holds the counters, the generator and the history.
    It is also stored under ``optimizer.state_dict()["sparse_param"]`` and restored by
    ``optimizer.load_state_dict``, so any script that checkpoints the optimizer resumes
    the scheduler exactly, provided the scheduler exists when the optimizer is loaded.
    """

    needs_dense_grad = False  # gradient-based growth captures dL/dW on update steps
    # Defaults of the algorithm, used for the arguments left at None.
    update_interval = 100
    drop_fraction = 0.3
    drop_schedule = "cosine"
    stop = 0.75

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
    ) -> None:
        update_interval = self.update_interval if update_interval is None else update_interval
        drop_fraction = self.drop_fraction if drop_fraction is None else drop_fraction
        drop_schedule = self.drop_schedule if drop_schedule is None else drop_schedule
        stop = self.stop if stop is None else stop
        self.layers: list[SparseLayer] = list(sparse_layers(model))
        if not self.layers:
            raise ValueError(
                f"{type(self).__name__}: the model has no sparse layers; call "
                f"sparse_param.sparsify(model) before creating the scheduler"
            )
        _check_positive_int(total_steps, "total_steps")
        _check_positive_int(update_interval, "update_interval")
        if not 0 <= drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
        if drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"unknown drop_schedule {drop_schedule!r}; expected one of {DROP_SCHEDULES}"
            )
        if not 0 <= stop <= 1:
            raise ValueError(f"stop must be a share of total_steps in [0, 1], got {stop}")
        if not 0 <= start <= stop:
            raise ValueError(
                f"start must be a share of total_steps in [0, stop={stop}], got {start}"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [layer.name for layer in self.layers if id(layer.weight) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the weights of sparse layers {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''}: build it from model.parameters() "
                f"(after or before sparsify, both work)"
            )
        self.model = model
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.update_interval = update_interval
        self.drop_fraction = drop_fraction
        self.drop_schedule = drop_schedule
        self.stop = stop
        self.start = start
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, Any]] = []
        self.setup()  # may raise: nothing is attached yet
        self._hook = (
            optimizer.register_step_post_hook(self._after_optimizer_step) if attach else None
        )
        # Ride along in the optimizer's state_dict, so a script that checkpoints and
        # resumes the optimizer (timm's CheckpointSaver / resume_checkpoint) resumes
        # the topology schedule too.
        self._state_hooks = [
            optimizer.register_state_dict_post_hook(self._save_into_optimizer_state),
            optimizer.register_load_state_dict_pre_hook(self._load_from_optimizer_state),
        ]
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
        """Called after every update with the per-layer counts."""

    def interval(self, step: int) -> int:
        """Update interval in force at ``step``."""
        return self.update_interval

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
        self.step_count += 1
        self._zero_inactive_weights()
        self.observe()
        if self.is_update_step(self.step_count):
            self.update()
        self._arm_dense_grad()

    @torch.no_grad()
    def update(self) -> dict[str, Any]:
        """Prune and regrow every layer now; returns (and appends to ``history``) the
        record of the update."""
        fraction = self.current_drop_fraction()
        self.before_update()
        old_masks = [layer.mask.clone() for layer in self.layers]
        capacity = [layer.numel - layer.active for layer in self.layers]
        pruned = self.prune_counts(fraction)
        kept = [
            old & ~self._select(layer, old, n, self.prune_score(i, layer), lowest=True)
            for i, (layer, old, n) in enumerate(zip(self.layers, old_masks, pruned))
        ]
        grown = self.grow_counts(pruned, capacity)
        for i, (layer, old, keep, n) in enumerate(zip(self.layers, old_masks, kept, grown)):
            grow = self._select(layer, ~old, n, self.grow_score(i, layer), lowest=False)
            self._apply(layer, old, distributed.broadcast_mask_(keep | grow))
        self.after_update(pruned, grown)
        self._clear_dense_grads()
        record = self._record(fraction, pruned, grown)
        self.history.append(record)
        return record

    def _select(
        self, layer: SparseLayer, candidates: Tensor, n: int, score: Tensor | None, lowest: bool
    ) -> Tensor:
        """Bool tensor marking the ``n`` ``candidates`` with the lowest (``lowest``) or
        highest ``score``; uniform at random when ``score`` is None. Non-finite scores
        rank last (dropped first, grown last), with a warning."""
        chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
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
                    warnings.warn(
                        f"{type(self).__name__}: {int((~finite).sum())} non-finite scores in "
                        f"layer {layer.name!r} at step {self.step_count}; they rank last",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    # -inf ranks last either way: dropped first, grown last.
                    values = torch.where(finite, values, -torch.inf)
                pick = torch.topk(values, n, largest=not lowest, sorted=False).indices
            chosen[index[pick]] = True
        return chosen.view_as(candidates)

    def _apply(self, layer: SparseLayer, old: Tensor, new: Tensor) -> None:
        """Install ``new`` as the mask: zero pruned and grown weights and their
        optimizer state (every state tensor shaped like the weight), extend ever_active."""
        # masked_fill, not mul: a non-finite value times 0 is NaN, not 0.
        unstable = ~(old & new)
        layer.weight.masked_fill_(unstable, 0)
        for value in self.optimizer.state.get(layer.weight, {}).values():
            if isinstance(value, Tensor) and value.shape == layer.weight.shape:
                value.masked_fill_(unstable, 0)
        layer.mask.copy_(new)
        layer.ever_active.logical_or_(new)

    @torch.no_grad()
    def _zero_inactive_weights(self) -> None:
        for layer in self.layers:
            layer.parametrization.zero_inactive_(layer.weight)

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
            distributed.average_(grad)

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
        }

    # ------------------------------------------------------------ lifecycle & state
    def remove(self) -> None:
        """Detach from the optimizer and stop capturing gradients."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for handle in self._state_hooks:
            handle.remove()
        self._state_hooks = []
        for layer in self.layers:
            layer.parametrization.capture_dense_grad = False
        self._clear_dense_grads()

    def state_dict(self) -> dict[str, Any]:
        """Counters, the generator state and the history: tensors and plain values only,
        loadable with ``torch.load(..., weights_only=True)``."""
        return {
            "step_count": self.step_count,
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in self.history],
        }

    def _save_into_optimizer_state(self, optimizer, state: dict[str, Any]) -> None:
        state[OPTIMIZER_STATE_KEY] = self.state_dict()

    def _load_from_optimizer_state(self, optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state = dict(state)
        ours = state.pop(OPTIMIZER_STATE_KEY, None)
        if ours is not None:
            self.load_state_dict(ours)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in state["history"]]
        self._arm_dense_grad()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, step={self.step_count}/"
            f"{self.total_steps}, update_interval={self.update_interval}, "
            f"drop_fraction={self.drop_fraction} ({self.drop_schedule}), stop={self.stop}, "
            f"density={density(self.model):.4f}, itop_rate={itop_rate(self.model):.4f}, "
            f"attached={self._hook is not None})"
        )


def redistribute(total: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """Split ``total`` regrown weights across layers in proportion to ``weights``, each
    layer taking at most its ``capacity`` (exact integers; see :func:`apportion`)."""
    return apportion(total, list(weights), [0] * len(weights), list(capacity))


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
