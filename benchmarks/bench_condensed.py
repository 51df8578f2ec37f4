"""Condensed constant fan-in Linear vs dense (and vs CSR inference) on CPU.

For a ``(out, in)`` Linear sparsified with ``structure="fan_in"`` at each density, times

  inference (no_grad):   dense ``F.linear`` with the masked weight, the condensed layer
                         (``CondensedLinear``), and the CSR ``SparseLinear`` of
                         ``to_sparse`` (the inference CSR path on main);
  training (fwd + bwd):  dense masked weight (what ``sparsify`` computes with) vs the
                         condensed layer (gradients for the input and the values).

Shapes are ViT-B MLP layers (3072x768, 768x3072) with 1 token (online inference) and
197 tokens (one image). The variants are timed in turn within each round (rotating the
order), medians over the rounds reported; ratio = dense time / other time (> 1: faster
than dense). With 1 and 2 threads.

Run: python benchmarks/bench_condensed.py [--repeats 15] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_param import sparsify  # noqa: E402
from sparse_param.kernels import CondensedLinear, SparseLinear  # noqa: E402

SHAPES = ((3072, 768), (768, 3072))
TOKENS = (1, 197)
DENSITIES = (0.1, 0.05)


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each function, timed in turn (rotating order) every round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def case(out: int, inp: int, tokens: int, density: float, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    layer = sparsify(nn.Linear(inp, out), density, structure="fan_in", distribution="uniform")
    weight = (layer.weight * layer.parametrizations.weight[0].mask).detach()
    bias = layer.bias.detach()
    cond = CondensedLinear.from_linear(layer)
    csr = SparseLinear.from_linear(layer)
    x = torch.randn(tokens, inp)
    xg = x.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    grad = torch.randn(tokens, out)

    def dense_train():
        y = F.linear(xg, w, bias)
        y.backward(grad)

    def cond_train():
        y = cond(xg)
        y.backward(grad)

    with torch.no_grad():
        torch.testing.assert_close(cond(x), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
        inference = timed(
            {
                "dense": lambda: F.linear(x, weight, bias),
                "condensed": lambda: cond(x),
                "csr": lambda: csr(x),
            },
            repeats,
        )
    training = timed({"dense": dense_train, "condensed": cond_train}, repeats)
    return {
        "k": cond.fan_in,
        "inf_dense_ms": inference["dense"] * 1e3,
        "inf_cond_ms": inference["condensed"] * 1e3,
        "inf_csr_ms": inference["csr"] * 1e3,
        "train_dense_ms": training["dense"] * 1e3,
        "train_cond_ms": training["condensed"] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(
        "| threads | weight (out×in) | tokens | density | k | dense ms | condensed ms "
        "(×) | CSR ms (×) | train dense ms | train condensed ms (×) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for out, inp in SHAPES:
            for tokens in TOKENS:
                for density in DENSITIES:
                    r = case(out, inp, tokens, density, args.repeats)
                    print(
                        f"| {threads} | {out}×{inp} | {tokens} | {density} | {r['k']} | "
                        f"{r['inf_dense_ms']:.3f} | {r['inf_cond_ms']:.3f} "
                        f"({r['inf_dense_ms'] / r['inf_cond_ms']:.2f}) | {r['inf_csr_ms']:.3f} "
                        f"({r['inf_dense_ms'] / r['inf_csr_ms']:.2f}) | "
                        f"{r['train_dense_ms']:.3f} | {r['train_cond_ms']:.3f} "
                        f"({r['train_dense_ms'] / r['train_cond_ms']:.2f}) |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
