"""The one training loop of the demo and the studies: a small classifier on in-memory
tensors, mini-batches in a seeded order, a cosine learning rate, the method's scheduler
attached to the optimizer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..algorithms import PRUNING_METHODS, create_scheduler
from ..flops import dense_training_flops, training_flops
from ..metrics import density, gradient_flow, itop_rate
from ..scheduler import SparseScheduler
from .common import Data


@dataclass
class TrainConfig:
    """One run: ``method`` is ``"dense"`` or a name of ``sparse_param.ALGORITHMS``
    (the model must be sparsified already unless dense)."""

    method: str = "dense"
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam"
    lr: float | None = None  # default: 0.05 for SGD, 1e-3 for Adam
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    update_interval: int = 50
    drop_fraction: float = 0.3  # DSR keeps its own default
    density: float | None = None  # final density of gmp / granet
    egf_every: int | None = None  # steps between EGF measurements (None: never)


@dataclass
class Run:
    """Result of :func:`train`: test accuracy at the end, R_s, density, training FLOPs
    relative to dense, the wall-clock seconds of the training steps (evaluation
    excluded), the curve ``(step, test accuracy, R_s)`` after every epoch, and the EGF
    curve ``(step, EGF, plain ‖g‖₂)`` if measured."""

    accuracy: float
    itop_rate: float
    density: float
    flops: float
    seconds: float = 0.0
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    gradient_curve: list[tuple[int, float, float]] = field(default_factory=list)


def train(
    model: nn.Module, data: Data, config: TrainConfig, seed: int, progress: tqdm | None = None
) -> Run:
    """Train ``model`` with a cosine learning rate and return a :class:`Run`."""
    steps_per_epoch = len(data.x_train) // config.batch_size
    total = config.epochs * steps_per_epoch
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(model, optimizer, config, total, seed)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator().manual_seed(seed)
    sparse = config.method != "dense"
    curve: list[tuple[int, float, float]] = []
    gradient_curve: list[tuple[int, float, float]] = []
    seconds, step = 0.0, 0
    for _ in range(config.epochs):
        order = torch.randperm(len(data.x_train), generator=generator)
        model.train()
        start = time.perf_counter()
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            step += 1
            if config.egf_every and (step == 1 or step % config.egf_every == 0):
                flow = gradient_flow(model)
                gradient_curve.append((step, flow.egf, flow.grad_norm))
            optimizer.step()
            lr_schedule.step()
            if progress is not None:
                progress.update(1)
        seconds += time.perf_counter() - start
        rate = itop_rate(model) if sparse else 1.0
        curve.append((step, accuracy(model, data.x_test, data.y_test), rate))
    return Run(
        accuracy=curve[-1][1] if curve else accuracy(model, data.x_test, data.y_test),
        itop_rate=itop_rate(model) if sparse else 1.0,
        density=density(model) if sparse else 1.0,
        flops=training_flops(model, scheduler, steps=total) / dense_training_flops(model, total),
        seconds=seconds,
        curve=curve,
        gradient_curve=gradient_curve,
    )


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=config.lr or 1e-3, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr or 0.05,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def _scheduler(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, total: int, seed: int
) -> SparseScheduler | None:
    """The scheduler of ``config.method`` over ``total`` steps (None for dense)."""
    if config.method == "dense":
        return None
    if config.method == "static":
        return create_scheduler("static", model, optimizer)
    kwargs = dict(total_steps=total, update_interval=config.update_interval, seed=seed)
    if config.method != "dsr":
        kwargs["drop_fraction"] = config.drop_fraction
    if config.method in PRUNING_METHODS:
        kwargs["density"] = config.density
    return create_scheduler(config.method, model, optimizer, **kwargs)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of ``x (N, features)`` that ``model`` classifies as ``y (N,)``, in eval mode."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def steps_per_run(data: Data, config: TrainConfig) -> int:
    return config.epochs * (len(data.x_train) // config.batch_size)
