"""torch.compile with sparse_param: graph breaks, compiled graphs, and step times.

(a) Graph breaks (``torch._dynamo.explain``) of the sparse model's forward on each kind of
    step: steady, dense-gradient capture (the step before a RigL update), after an update.
(b) Compiled graphs over a RigL run of ``--cycles`` update cycles (a counting backend
    wrapping ``--backend``): after the first cycle, and at the end.
(c) Training step time (forward, backward, SGD-momentum step, the scheduler's post-step
    work) of one sparse model and of its dense twin, each run eagerly and through
    ``torch.compile``, in turn, after a warm-up; medians over ``--repeats`` alternating
    repeats, and the ratios. Steady steps only (the scheduler's update interval is longer
    than the timed run). With inductor, also both compiled with its layout optimization
    off (``torch._inductor.config.layout_optimization = False``): on by default, it
    turns convolutions channels-last, and then copies every masked weight and every
    mask into that layout on every step.

Run: python benchmarks/bench_compile.py [--model resnet18] [--img 64] [--batch 8]
The machine may be shared and noisy: compare the ratio, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._inductor.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_param as sp  # noqa: E402


def build(args: argparse.Namespace, update_interval: int, total_steps: int):
    torch.manual_seed(0)
    model = sp.sparsify(timm.create_model(args.model, num_classes=10), args.density)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = sp.RigL(model, optimizer, total_steps=total_steps, update_interval=update_interval)
    return model, optimizer, scheduler


def train_step(model, optimizer, data) -> None:
    x, y = data
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def graph_breaks(args, data) -> dict[str, int]:
    model, optimizer, scheduler = build(args, update_interval=2, total_steps=100)
    found = {}
    for kind in ("steady", "capture", "after update"):
        armed = scheduler.wants_dense_grad(scheduler.step_count + 1)
        assert armed == (kind == "capture"), kind
        found[kind] = torch._dynamo.explain(model)(data[0]).graph_break_count
        train_step(model, optimizer, data)
    return found


def compiled_graphs(args, data) -> tuple[int, int]:
    torch._dynamo.reset()
    interval = 3
    model, optimizer, scheduler = build(args, interval, total_steps=100 * interval)
    counter = torch._dynamo.testing.CompileCounterWithBackend(args.backend)
    compiled = torch.compile(model, backend=counter)
    first = 0
    for i in range(args.cycles * interval):
        train_step(compiled, optimizer, data)
        if i + 1 == interval:
            first = counter.frame_count
    assert len(scheduler.history) == args.cycles
    return first, counter.frame_count


def step_times(args, data) -> dict[str, float]:
    """Median step time of the sparse and of the dense model, eager and compiled; with
    inductor, also compiled with its layout optimization off (a model of its own each,
    compiled under the setting)."""
    torch._dynamo.reset()

    def dense_model():
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def sparse_model():
        model, optimizer, _ = build(args, update_interval=10**6, total_steps=10**7)
        return model, optimizer

    model, optimizer = sparse_model()
    dense, dense_optimizer = dense_model()
    default, no_layout = {}, {"layout_optimization": False}
    runs = {
        "eager": (model, optimizer, default),
        "compiled": (torch.compile(model, backend=args.backend), optimizer, default),
        "dense eager": (dense, dense_optimizer, default),
        "dense compiled": (torch.compile(dense, backend=args.backend), dense_optimizer, default),
    }
    if args.backend == "inductor":
        for name, make in (("compiled", sparse_model), ("dense compiled", dense_model)):
            other, other_optimizer = make()
            compiled = torch.compile(other, backend=args.backend)
            runs[f"{name}, no layout opt"] = (compiled, other_optimizer, no_layout)
    for run, opt, config in runs.values():
        with torch._inductor.config.patch(config):  # read when the graph is compiled
            for _ in range(args.warmup):
                train_step(run, opt, data)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            run, opt, _ = runs[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(run, opt, data)
            times[name].append((time.perf_counter() - start) / args.steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--cycles", type=int, default=3, help="RigL update cycles in (b)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(args.batch, 3, args.img, args.img, generator=g),
        torch.randint(10, (args.batch,), generator=g),
    )
    print(
        f"{args.model}, {args.img}px, batch {args.batch}, density {args.density}, "
        f"backend {args.backend}, {args.threads} threads, torch {torch.__version__}"
    )
    breaks = graph_breaks(args, data)
    print("(a) graph breaks: " + ", ".join(f"{k} {v}" for k, v in breaks.items()))
    first, total = compiled_graphs(args, data)
    print(
        f"(b) compiled graphs: {first} after the first update cycle, {total} after "
        f"{args.cycles} cycles"
    )
    times = step_times(args, data)
    print(
        "(c) step time (ms): "
        + ", ".join(f"{name} {t * 1e3:.1f}" for name, t in times.items())
        + f"; compiled/eager: sparse {times['compiled'] / times['eager']:.2f}, dense "
        f"{times['dense compiled'] / times['dense eager']:.2f}; sparse/dense: eager "
        f"{times['eager'] / times['dense eager']:.2f}, compiled "
        f"{times['compiled'] / times['dense compiled']:.2f}"
    )
    if "compiled, no layout opt" in times:
        print(
            "    layout optimization off: sparse compiled/eager "
            f"{times['compiled, no layout opt'] / times['eager']:.2f}, sparse/dense compiled "
            f"{times['compiled, no layout opt'] / times['dense compiled, no layout opt']:.2f}"
        )


if __name__ == "__main__":
    main()
