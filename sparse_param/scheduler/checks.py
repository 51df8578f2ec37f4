"""Checks a scheduler makes of what it is given and of where the run is: at creation,
at its first step, at the first step after a load, and from the forwards (:mod:`.pace`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..arguments import listed
from ..layers import SparseLayer, sparse_layers
from ..warn import warn
from . import registry
from .hooks import OPTIMIZER_STATE_KEY
from .schedule import Schedule

FEW_UPDATES = 5  # a schedule with fewer topology updates than this gets a warning


def sparse_layers_of(owner: str, model: nn.Module) -> list[SparseLayer]:
    """The model's sparse layers; raises if it has none."""
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError(
            f"{owner}: the model has no sparse layers; call sparse_param.sparsify(model) "
            f"before creating the scheduler"
        )
    return layers


def check_optimizer(
    owner: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layers: Sequence[SparseLayer],
    updates_topology: bool = True,
) -> None:
    """Raise unless ``optimizer`` holds every trainable sparse weight, no frozen one is
    left to a method that moves masks, and neither the optimizer nor the model has a
    scheduler attached already."""
    frozen = [layer.name for layer in layers if not layer.weight.requires_grad]
    if frozen and updates_topology:
        raise ValueError(
            f"{owner}: sparse layers {listed(frozen)} are frozen "
            f"(requires_grad=False): nothing trains them, so moving their masks would only "
            f"cut weights. Unfreeze them, train with Static (masks fixed), or freeze them "
            f"before sparsify (which leaves frozen layers dense)"
        )
    missing = not_held(optimizer, layers)
    if missing:
        raise ValueError(
            f"{owner}: the optimizer does not hold the weights of sparse layers {missing}: "
            f"build it from model.parameters() (after or before sparsify, both work)"
        )
    for what, keys in (("optimizer", [optimizer]), ("model", [x.parametrization for x in layers])):
        first = registry.lookup(keys)
        if first is not None:
            raise RuntimeError(
                f"{owner}: {first!r} is already attached to this {what}; two schedulers "
                f"would both change the topology and share the checkpoint entry. Call "
                f"remove() on the first (sparse_param.attached_scheduler({what})"
                f".remove()) before creating another"
            )


def not_held(optimizer: torch.optim.Optimizer, layers: Sequence[SparseLayer]) -> str:
    """The names of the trainable sparse layers whose stored weight the optimizer does
    not hold (at most five listed); empty if it holds them all."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [
        layer.name
        for layer in layers
        if id(layer.weight) not in held and layer.weight.requires_grad  # frozen: not stepped
    ]
    return listed(missing) if missing else ""


def check_still_held(
    owner: str, optimizer: torch.optim.Optimizer, layers: Sequence[SparseLayer]
) -> None:
    """At the first step: a wrapper that replaced the parameters after the scheduler was
    created leaves the optimizer stepping the old ones and the model untrained."""
    missing = not_held(optimizer, layers)
    if missing:
        raise RuntimeError(
            f"{owner}: the optimizer no longer holds the weights of sparse layers {missing}: "
            f"they were replaced after the optimizer was built (by fully_shard, for one). "
            f"Build the optimizer and the scheduler after: sparsify(model) → "
            f"fully_shard(...) → optimizer → scheduler"
        )


def warn_if_few_updates(owner: str, schedule: Schedule, updates: int) -> None:
    """Warn when ``updates`` (the run's topology updates, counted up to
    :data:`FEW_UPDATES`) are fewer than :data:`FEW_UPDATES`."""
    if updates >= FEW_UPDATES:
        return
    what = "never changes" if updates == 0 else f"changes only {updates} time{'s' * (updates > 1)}"
    warn(
        f"{owner}: the topology {what} in this run: updates every update_interval="
        f"{schedule.update_interval} steps in ({schedule.start_step}, {schedule.stop_step}] "
        f"(start={schedule.start}, stop={schedule.stop} of total_steps="
        f"{schedule.total_steps}). Lower update_interval or check total_steps"
    )


def check_total_steps(owner: str, total_steps: int, step_count: int) -> None:
    """Refuse a ``total_steps`` below the steps already counted: no update would follow."""
    if total_steps < step_count:
        raise ValueError(
            f"{owner}: total_steps={total_steps} is below step_count={step_count}, the "
            f"optimizer steps this scheduler has already counted: the topology would never "
            f"update again. Set total_steps to the length of the whole run (at least "
            f"{step_count}), e.g. epochs * len(loader)"
        )


def warn_if_restarted(owner: str, layers: Sequence[SparseLayer]) -> None:
    """At step 0 of a scheduler that has not updated yet: warn when more weights have
    been active (``ever_active``, which contains the mask) than are active now, a model
    mid-run whose scheduler state was not restored."""
    active = sum(layer.active for layer in layers)
    ever = sum(int(layer.ever_active.count_nonzero()) for layer in layers)
    if ever <= active:
        return
    total = sum(layer.numel for layer in layers)
    warn(
        f"{owner}: the schedule starts at step 0, but the model is mid-run: {ever} of its "
        f"{total} sparse weights have been active (ever_active, R_s={ever / total:.4f}) "
        f"and {active} are active now (density {active / total:.4f}). The scheduler's "
        f"state was not restored: load the optimizer state dict saved with the model (it "
        f"carries the scheduler's, under '{OPTIMIZER_STATE_KEY}'; in timm, without "
        f"--no-resume-opt), or call scheduler.load_state_dict(saved_scheduler_state). If a "
        f"new schedule on this trained model is what you mean, ignore this warning"
    )


def warn_unrestored(owner: str, step: int, total_steps: int) -> None:
    """Warn that an optimizer state without the scheduler's was loaded, and no scheduler
    state after it, while the scheduler was at ``step``."""
    warn(
        f"{owner}: optimizer.load_state_dict was given a state without the scheduler's "
        f"(no '{OPTIMIZER_STATE_KEY}' entry) and no scheduler state was loaded after it: "
        f"the schedule goes on from its own step {step} of total_steps={total_steps}, "
        f"wherever the optimizer state comes from. If it comes from another point of the "
        f"run, load the scheduler state saved with it: scheduler.load_state_dict(...)"
    )


def warn_past_the_end(owner: str, step: int, schedule: Schedule) -> None:
    """Warn that the scheduler is at ``step``, at or past the end of ``schedule``."""
    warn(
        f"{owner}: the scheduler is at step {step} of total_steps={schedule.total_steps}: "
        f"the run goes on past the end of its schedule (updates end at step "
        f"{schedule.stop_step}), so the topology never changes again. If the state comes "
        f"from a longer run, set total_steps to the run's real length "
        f"(scheduler.total_steps = ..., more than {step})"
    )


def warn_not_counted(
    owner: str, layer: str, writes: int, step: int, total_steps: int, optimizer: object
) -> None:
    """Warn that ``layer``'s weights were written ``writes`` times while the scheduler,
    at ``step`` of ``total_steps`` and attached to ``optimizer``, counted no step: an
    optimizer it is not attached to trains the model."""
    warn(
        f"{owner}: the weights of layer {layer!r} were written {writes} times (optimizer "
        f"steps) while the scheduler counted no step: it is still at step {step} of "
        f"total_steps={total_steps} and will not update the topology. An optimizer other "
        f"than the one it is attached to ({type(optimizer).__name__}) trains the model: "
        f"attach the scheduler to the optimizer you step (scheduler.remove(), then "
        f"{owner}(model, that_optimizer, ...)), or with attach=False call "
        f"scheduler.step() after every optimizer.step()"
    )


def warn_if_optimizer_has_state(owner: str, optimizer: torch.optim.Optimizer) -> None:
    """Warn at creation when ``optimizer`` already holds state: a resumed run whose
    scheduler would start its schedule at step 0."""
    if any(bool(state) for state in optimizer.state.values()):
        warnings.warn(
            f"{owner}: the optimizer already holds state (it has taken steps or was loaded "
            f"from a checkpoint); this scheduler starts its schedule at step 0. If you are "
            f"resuming, create the scheduler before optimizer.load_state_dict(...), or "
            f"restore it with scheduler.load_state_dict(checkpoint_of_the_optimizer"
            f"['sparse_param'])",
            UserWarning,
            stacklevel=3,
        )
