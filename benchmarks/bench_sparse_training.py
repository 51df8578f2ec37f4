"""Whole training steps with sparse compute vs dense, in one process.

Every case builds the same model (same init) three or four times: plain dense (no
sparsify), sparsified with ``compute="dense"`` (masked dense kernels), ``"sparse"``
(CSR kernels) and ``"auto"``. A step is ``zero_grad``, forward, cross-entropy (or a
squared-output loss for a lone layer), backward and an SGD step (momentum 0.9, weight
decay 5e-5); sparse variants carry a SET scheduler between updates (its post-step
re-zeroing runs, no topology update falls in the run). Variants are timed in turn,
the order rotating every round, after a warm-up; the table gives medians and speed-ups
(dense median / variant median).

    python benchmarks/bench_sparse_training.py                       # all cases
    python benchmarks/bench_sparse_training.py --cases set_mlp_cifar --threads 1
    python benchmarks/bench_sparse_training.py --calibrate           # the "auto" table
    python benchmarks/bench_sparse_training.py --capture             # dense-grad capture
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

import sparse_param.models  # noqa: F401  registers set_mlp_cifar and lenet_300_100 with timm
from sparse_param import SET, sparsify
from sparse_param.kernels import compute_modes

VARIANTS = ("plain", "dense", "sparse", "auto")


def build(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """Model, input batch and labels (None: the loss is the output's mean square)."""
    g = torch.Generator().manual_seed(0)
    if case == "set_mlp_cifar":
        model = timm.create_model("set_mlp_cifar", drop_rate=0.0)
        x, classes = torch.randn(128, 3, 32, 32, generator=g), 10
    elif case == "lenet_300_100":
        model = timm.create_model("lenet_300_100")
        x, classes = torch.randn(128, 1, 28, 28, generator=g), 10
    elif case == "vit_small_patch16_224":
        model = timm.create_model("vit_small_patch16_224", num_classes=10)
        x, classes = torch.randn(4, 3, 224, 224, generator=g), 10
    elif case == "linear_3072x768":
        model = nn.Sequential(nn.Linear(768, 3072))
        return model, torch.randn(128, 768, generator=g).requires_grad_(), None
    else:
        raise ValueError(f"unknown case {case!r}")
    return model, x, torch.randint(classes, (x.shape[0],), generator=g)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, sparse: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
    if sparse:  # between updates: the scheduler's per-step work, no topology change
        SET(model, optimizer, total_steps=10**6, update_interval=10**4)

    def step() -> None:
        optimizer.zero_grad()
        out = model(x)
        loss = out.square().mean() if y is None else F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()

    return step


def variants(case: str, density: float, names: Sequence[str]) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base, x, y = build(case)
    steps = {}
    for name in names:
        model = copy.deepcopy(base)
        if name != "plain":
            sparsify(model, density, compute=name)
        steps[name] = make_step(model, x, y, sparse=name != "plain")
        if name == "auto":
            modes = compute_modes(model)
            picked = sum(m == "sparse" for m in modes.values())
            steps["auto_layers"] = f"{picked}/{len(modes)}"
    return steps


def time_rounds(steps: dict[str, Callable[[], None]], repeats: int, warmup: int):
    runnable = {k: v for k, v in steps.items() if callable(v)}
    names = list(runnable)
    for _ in range(warmup):
        for name in names:
            runnable[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            runnable[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run_cases(args) -> None:
    print(
        "| case | threads | density | plain dense (ms) | speed-up sparse vs plain | "
        "sparse vs dense-kernel mode | auto vs plain | auto vs dense-kernel mode | "
        "auto layers sparse |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in args.cases:
            slow = case == "vit_small_patch16_224"
            for density in args.densities:
                steps = variants(case, density, VARIANTS)
                med = time_rounds(steps, args.vit_repeats if slow else args.repeats, 1)
                print(
                    f"| {case} | {threads} | {density} | {1e3 * med['plain']:.1f} | "
                    f"{med['plain'] / med['sparse']:.2f}x | {med['dense'] / med['sparse']:.2f}x | "
                    f"{med['plain'] / med['auto']:.2f}x | {med['dense'] / med['auto']:.2f}x | "
                    f"{steps['auto_layers']} |",
                    flush=True,
                )


CALIBRATION_SHAPES = ((100, 300), (300, 784), (256, 256), (768, 768), (3072, 768), (768, 3072))
CALIBRATION_SHAPES += ((1000, 4000), (4000, 3072))


def calibrate(args) -> None:
    """One Linear layer (weight out×in), step of dense-kernel mode / step of sparse mode."""
    print("| threads | weight (out×in) | batch | " + " | ".join(f"d={d}" for d in args.densities))
    print("|---|---|---|" + "---|" * len(args.densities))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for out_features, in_features in CALIBRATION_SHAPES:
            for batch in args.batches:
                cells = []
                for density in args.densities:
                    torch.manual_seed(0)
                    base = nn.Sequential(nn.Linear(in_features, out_features))
                    x = torch.randn(batch, in_features).requires_grad_()
                    steps = {}
                    for mode in ("dense", "sparse"):
                        model = sparsify(copy.deepcopy(base), density, compute=mode)
                        steps[mode] = make_step(model, x, None, sparse=True)
                    med = time_rounds(steps, args.repeats, 2)
                    cells.append(f"{med['dense'] / med['sparse']:.2f}")
                print(
                    f"| {threads} | {out_features}×{in_features} | {batch} | "
                    + " | ".join(cells)
                    + " |",
                    flush=True,
                )


def capture_cost(args) -> None:
    """Sparse mode: a step that captures the dense gradient (RigL / GraNet before an
    update, every SNFS step) vs an ordinary step, set_mlp_cifar at each density."""
    print("| threads | density | ordinary step (ms) | capturing step (ms) | ratio |")
    print("|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for density in args.densities:
            torch.manual_seed(0)
            model, x, y = build("set_mlp_cifar")
            sparsify(model, density, compute="sparse")
            step = make_step(model, x, y, sparse=True)
            masks = [layer.parametrization for layer in sparse_param.sparse_layers(model)]

            def armed(step=step, masks=masks) -> None:
                for m in masks:
                    m.capture_dense_grad = True
                step()
                for m in masks:
                    m.capture_dense_grad, m.dense_grad = False, None

            med = time_rounds({"ordinary": step, "armed": armed}, args.repeats, 1)
            print(
                f"| {threads} | {density} | {1e3 * med['ordinary']:.1f} | "
                f"{1e3 * med['armed']:.1f} | {med['armed'] / med['ordinary']:.2f} |",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cases = ("set_mlp_cifar", "lenet_300_100", "vit_small_patch16_224", "linear_3072x768")
    parser.add_argument("--cases", nargs="+", default=list(cases), choices=cases)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--vit-repeats", type=int, default=3)
    parser.add_argument("--calibrate", action="store_true", help="per-layer table for 'auto'")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--capture", action="store_true", help="cost of dense-grad capture")
    args = parser.parse_args(argv)
    if args.capture:
        capture_cost(args)
    elif args.calibrate:
        calibrate(args)
    else:
        run_cases(args)


if __name__ == "__main__":
    main()
