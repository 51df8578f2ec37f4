"""Cost of topology updates, and of a scheduler between updates, on resnet50 (CPU).

    python benchmarks/bench_update.py [--rounds 7] [--threads N]

(a) One update over all layers (RigL, SET, DSR) against one training step of the same
    model: 128 px, batch 16, SGD momentum, density 0.02. Each round times one plain
    training step, then one step that ends in an update, alternating the methods; the
    update's cost is that step minus the plain step. RigL's step includes capturing the
    dense gradient on its backward pass.
(b) A training step between updates with a scheduler attached (RigL, ΔT large) against
    the same step with only ``sparsify`` (the parametrization alone), alternating.

Prints medians over rounds and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import sparse_param as sp

METHODS = ("rigl", "set", "dsr")


def build(method: str | None, update_interval: int):
    torch.manual_seed(0)
    model = sp.sparsify(timm.create_model("resnet50"), 0.02)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = None
    if method is not None:
        scheduler = sp.ALGORITHMS[method](
            model, optimizer, total_steps=10**6, update_interval=update_interval, stop=1.0
        )
    return model, optimizer, scheduler


def step(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(16, 3, 128, 128)
    y = torch.randint(0, 1000, (16,))

    # (a) every step of these schedulers is an update step (ΔT = 2, every other step).
    runs = {m: build(m, update_interval=2) for m in METHODS}
    plain, with_update = {m: [] for m in METHODS}, {m: [] for m in METHODS}
    for model, optimizer, _ in runs.values():  # warm-up: one of each kind
        step(model, optimizer, x, y)
        step(model, optimizer, x, y)
    for _ in range(args.rounds):
        for method, (model, optimizer, scheduler) in runs.items():
            assert not scheduler.is_update_step(scheduler.step_count + 1)
            plain[method].append(step(model, optimizer, x, y))
            updates = len(scheduler.history)
            with_update[method].append(step(model, optimizer, x, y))
            assert len(scheduler.history) == updates + 1
    print("(a) one topology update over all 54 layers of resnet50 vs one training step")
    print(
        f"{'method':8s} {'step s':>8s} {'step+update s':>14s} {'update s':>9s} {'update/step':>12s}"
    )
    for method in METHODS:
        base = statistics.median(plain[method])
        total = statistics.median(with_update[method])
        cost = total - base
        print(f"{method:8s} {base:8.3f} {total:14.3f} {cost:9.3f} {cost / base:12.3f}")
    del runs

    # (b) between updates: scheduler attached (no update due) vs the parametrization alone.
    alone = build(None, update_interval=1)
    attached = build("rigl", update_interval=10**6)
    times: dict[str, list[float]] = {"sparsify only": [], "RigL attached": []}
    for model, optimizer, _ in (alone, attached):
        step(model, optimizer, x, y)
    for _ in range(args.rounds):
        times["sparsify only"].append(step(*alone[:2], x, y))
        times["RigL attached"].append(step(*attached[:2], x, y))
    base = statistics.median(times["sparsify only"])
    print("\n(b) training step between updates")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:14s} median {median:.3f} s  ratio {median / base:.3f}")
    paired = statistics.median(
        a / b for a, b in zip(times["RigL attached"], times["sparsify only"])
    )
    print(f"paired ratio (median over rounds) {paired:.3f}")


if __name__ == "__main__":
    main()
