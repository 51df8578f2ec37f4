"""Core costs of sparse training with sparse_param, measured side by side in one process.

(a) Training step time, timm resnet50 on CPU (128 px, batch 16, SGD momentum): a dense
    model, ``sparse_param.sparsify(model, 0.02)``, and a naive ``weight * mask``
    parametrization (defined below, same masks) are built in one process and stepped in
    turn (order rotated every round) after a warm-up; medians and ratios to dense.
(b) Persistent sparse state: bytes of every buffer the library adds, per weight of the
    sparse layers; the model's total parameter + buffer bytes before and after
    ``sparsify``; no dense-sized tensor kept on the SparseMask between steps.
(c) ``sparsify`` time on vit_base_patch16_224 (a fresh model per run, median).
(d) CPU time of the elementwise mask work per step, the library's and reference forms.
(e) Training step time at CIFAR size, where the papers train and the per-step mask work
    (O(weights)) weighs most against the small compute: timm resnet18 (10 classes) at
    32 px, batch 32, density 0.1 (ERK), SGD momentum with weight decay, RigL attached
    and between updates; dense vs sparse_param, timed in turn as in (a).

Run: python benchmarks/bench_core.py [--repeats 15] [--warmup 3] [--sparsify-runs 5]
The machine may be shared and noisy: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_param  # noqa: E402
from sparse_param import sparse_layers, sparsify  # noqa: E402


class NaiveMask(nn.Module):
    """The textbook masking parametrization: ``weight * mask`` with a float mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def naive_sparsify(model: nn.Module, like: nn.Module) -> nn.Module:
    """Register ``NaiveMask`` on the layers ``like`` has sparse, with the same masks."""
    modules = dict(model.named_modules())
    for layer in sparse_layers(like):
        module = modules[layer.name]
        mask = layer.mask.to(module.weight.dtype)
        with torch.no_grad():
            module.weight.mul_(mask)
        parametrize.register_parametrization(module, "weight", NaiveMask(mask))
    return model


def state_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def make_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet50", pretrained=False, num_classes=1000)


def bench_steps(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """(a): per model, (wall, process CPU) seconds of each timed step."""
    dense = make_resnet()
    sparse = sparsify(make_resnet(), args.density)
    naive = naive_sparsify(make_resnet(), sparse)
    models = {"dense": dense, "sparse_param": sparse, "naive w*mask": naive}
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
        for k, m in models.items()
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    return time_steps(models, opts, x, y, sparse, args)


def bench_cifar_steps(args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    """(e): resnet18 at 32 px with RigL attached, between updates; as (a)."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("resnet18", pretrained=False, num_classes=10)

    models = {"dense": make(), "sparse_param": sparsify(make(), 0.1)}
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for k, m in models.items()
    }
    # The first update would be at step 10^5: every timed step is between updates.
    scheduler = sparse_param.RigL(
        models["sparse_param"], opts["sparse_param"], total_steps=10**6, update_interval=10**5
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    times = time_steps(models, opts, x, y, models["sparse_param"], args)
    assert not scheduler.history, "a topology update ran inside the timed steps"
    return times


def time_steps(
    models: dict[str, nn.Module],
    opts: dict[str, torch.optim.Optimizer],
    x: torch.Tensor,
    y: torch.Tensor,
    sparse: nn.Module,
    args: argparse.Namespace,
) -> dict[str, list[tuple[float, float]]]:
    """Per model, (wall, process CPU) seconds of each timed step, the models stepped in
    turn (order rotated every round); checks the sparse invariants of ``sparse``."""
    masks = [layer.parametrization for layer in sparse_layers(sparse)]

    def step(name: str) -> tuple[float, float]:
        model, opt = models[name], opts[name]
        start, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start, time.process_time() - cpu

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    names = list(models)
    began = time.perf_counter()
    for r in range(args.warmup + args.repeats):
        if r >= args.warmup + 5 and time.perf_counter() - began > args.max_seconds:
            print(f"stopped after {r - args.warmup} rounds: --max-seconds reached")
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = step(name)
            if r >= args.warmup:
                times[name].append(t)
        if any(p.dense_grad is not None for p in masks):
            raise AssertionError("a SparseMask holds a dense gradient between steps")
    # the sparse invariant held through the steps
    for layer in sparse_layers(sparse):
        assert not layer.weight[~layer.mask].any(), layer.name
    return times


def bench_mask_ops(args: argparse.Namespace) -> dict[str, float]:
    """CPU ms per training step of the elementwise work each masking form adds, on
    resnet50's sparse weights: what the step-time difference is made of. The library
    rows call the library's own code, so they follow its changes."""
    from sparse_param.mask import SparseMask
    from sparse_param.zeros import zero_where_inactive_

    model = sparsify(make_resnet(), args.density)
    layers = list(sparse_layers(model))
    params = [layer.parametrization for layer in layers]
    weights = [layer.weight.detach().clone() for layer in layers]
    leaves = [w.clone().requires_grad_() for w in weights]
    masks = [layer.mask for layer in layers]
    leaf_masks = [SparseMask(m) for m in masks]  # one per leaf: it hooks its weight
    bytes_ = [m.view(torch.uint8) for m in masks]
    inverse = [~m for m in masks]
    fmasks = [m.float() for m in masks]
    grads = [torch.randn_like(w) for w in weights]
    zero = torch.zeros(())

    def library_backward() -> None:
        # grads[i] is shared, so autograd copies it into .grad first (in a training step
        # it steals the fresh gradient of the conv instead): one copy in every row.
        for leaf, p, g in zip(leaves, leaf_masks, grads):
            leaf.grad = None
            torch.autograd.backward(p(leaf), g)

    ops = {
        # The forward re-zeroes the stored weight after a write the step did not vouch for
        "library fwd: SparseMask.zero_inactive_": lambda: [
            p.zero_inactive_(w) for p, w in zip(params, weights)
        ],
        "library bwd: SparseMask into .grad": library_backward,
        "naive fwd: w * fmask": lambda: [w * f for w, f in zip(weights, fmasks)],
        "naive bwd: grad * fmask": lambda: [g * f for g, f in zip(grads, fmasks)],
        "old bwd: grad.clone().mul_(uint8)": lambda: [
            g.clone().mul_(b) for g, b in zip(grads, bytes_)
        ],
        "ref: grad * mask (bool)": lambda: [g * m for g, m in zip(grads, masks)],
        "ref: grad * mask.view(uint8)": lambda: [g * b for g, b in zip(grads, bytes_)],
        "ref: where(mask, grad, 0)": lambda: [
            torch.where(m, g, zero) for g, m in zip(grads, masks)
        ],
        "old fwd: grad.mul_(uint8) in place": lambda: [g.mul_(b) for g, b in zip(grads, bytes_)],
        "ref: masked_fill_(~mask, 0) in place": lambda: [
            g.masked_fill_(i, 0) for g, i in zip(grads, inverse)
        ],
        "ref: where(mask, grad, 0, out=grad)": lambda: [
            torch.where(m, g, zero, out=g) for g, m in zip(grads, masks)
        ],
        "new: int bits.mul_(uint8) in place": lambda: [
            zero_where_inactive_(g, m) for g, m in zip(grads, masks)
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for r in range(2 + args.op_repeats):
        for name, op in ops.items():
            start = time.process_time()
            op()
            if r >= 2:
                times[name].append(time.process_time() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def bench_state(args: argparse.Namespace) -> dict[str, float]:
    model = make_resnet()
    before = state_bytes(model)
    sparsify(model, args.density)
    after = state_bytes(model)
    layers = list(sparse_layers(model))
    sparse_numel = sum(layer.numel for layer in layers)
    added = 0
    for layer in layers:
        p = layer.parametrization
        added += sum(b.numel() * b.element_size() for b in p.buffers())
        stray = [k for k, v in vars(p).items() if isinstance(v, torch.Tensor)]
        assert not stray, f"{layer.name}: tensor attributes outside buffers: {stray}"
        assert p.dense_grad is None
    naive = naive_sparsify(make_resnet(), model)
    naive_added = state_bytes(naive) - before
    return {
        "sparse_numel": sparse_numel,
        "added_bytes": added,
        "bytes_per_weight": added / sparse_numel,
        "before": before,
        "after": after,
        "delta": after - before,
        "naive_bytes_per_weight": naive_added / sparse_numel,
        "density": sparse_param.density(model),
    }


def bench_sparsify(args: argparse.Namespace) -> list[float]:
    times = []
    for run in range(args.sparsify_runs):
        torch.manual_seed(run)
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        start = time.perf_counter()
        sparsify(model, args.density, seed=run)
        times.append(time.perf_counter() - start)
        del model
    return times


def print_steps(
    title: str, times: dict[str, list[tuple[float, float]]], args: argparse.Namespace
) -> None:
    rounds = len(times["dense"])
    print(f"\n{title}; {rounds} steps each after {args.warmup} warm-up")
    print(
        f"{'model':<14} {'wall med s':>10} {'min s':>7} {'ratio':>6} {'paired':>6}  "
        f"{'cpu med s':>9} {'ratio':>6} {'paired':>6}"
    )
    for name, ts in times.items():
        cells = []
        for i in (0, 1):  # wall, cpu
            mine = [t[i] for t in ts]
            dense = [t[i] for t in times["dense"]]
            med = statistics.median(mine)
            paired = statistics.median(a / b for a, b in zip(mine, dense))
            cells.append((med, min(mine), med / statistics.median(dense), paired))
        (w, wmin, wr, wp), (c, _, cr, cp) = cells
        print(f"{name:<14} {w:10.3f} {wmin:7.3f} {wr:6.3f} {wp:6.3f}  ", end="")
        print(f"{c:9.3f} {cr:6.3f} {cp:6.3f}")
    print("ratio = median / dense median; paired = median over rounds of step / dense step")
    print("SparseMask.dense_grad was None after every step; inactive weights stayed 0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument(
        "--max-seconds", type=float, default=120, help="(a): stop after this long (min 5 rounds)"
    )
    parser.add_argument("--sparsify-runs", type=int, default=5)
    parser.add_argument("--op-repeats", type=int, default=10, help="(d) mask-op timings")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0: torch default")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["steps", "state", "sparsify", "ops", "cifar"]
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}",
        flush=True,
    )

    if "steps" not in args.skip:
        times = bench_steps(args)
        print_steps(
            f"(a) resnet50 train step, {args.img_size}px batch {args.batch}, SGD momentum, "
            f"density {args.density}",
            times,
            args,
        )

    if "state" not in args.skip:
        s = bench_state(args)
        print(f"\n(b) persistent sparse state, resnet50 at density {s['density']:.4f}")
        print(f"sparse weights                    {s['sparse_numel']:>12,}")
        print(f"bytes of buffers the library adds {s['added_bytes']:>12,}")
        print(f"bytes per sparse weight           {s['bytes_per_weight']:>12.3f}")
        print(f"params+buffers before sparsify    {s['before']:>12,}")
        print(f"params+buffers after sparsify     {s['after']:>12,}")
        print(f"difference                        {s['delta']:>12,}")
        print(f"naive w*mask (float mask), B/w    {s['naive_bytes_per_weight']:>12.3f}")
        assert s["delta"] == s["added_bytes"], "sparsify kept tensors other than its buffers"

    if "sparsify" not in args.skip:
        ts = bench_sparsify(args)
        print(f"\n(c) sparsify(vit_base_patch16_224, {args.density}), {len(ts)} runs")
        print(f"median {statistics.median(ts):.3f} s  min {min(ts):.3f} s  max {max(ts):.3f} s")

    if "ops" not in args.skip:
        ops = bench_mask_ops(args)
        print("\n(d) elementwise mask work per step on resnet50's sparse weights (CPU ms)")
        for name, ms in ops.items():
            print(f"{name:<40} {ms:8.1f}")

    if "cifar" not in args.skip:
        times = bench_cifar_steps(args)
        print_steps(
            "(e) resnet18 train step, 32px batch 32, SGD momentum, density 0.1, "
            "RigL attached, between updates",
            times,
            args,
        )


if __name__ == "__main__":
    main()
