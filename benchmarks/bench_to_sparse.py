"""Dense Linear vs ``sparse_param.to_sparse`` (CSR) inference on CPU, side by side.

Cases, at weight densities 0.02 / 0.05 / 0.1 (every layer sparsified uniformly):
  layer    one 3072x768 Linear, 197 tokens (a ViT-B MLP fc1 on one image); the other
           CSR forms PyTorch offers are timed too, to show why SparseLinear uses
           ``addmm(b, W_csr, x_block.T).T`` over blocks of 32 tokens on one thread and
           one call over all tokens on several.
  vit-mlp  4 pre-norm residual ViT-S MLP blocks (384 -> 1536 -> 384), 4 x 197 tokens.
  vit-s    (opt-in) vit_small_patch16_224, batch 1, whole model (patch conv stays dense).
Each with torch.set_num_threads(1) and with the default thread count. The dense
baseline is the finalized model (plain nn.Linear holding the zeros); dense and sparse
are timed in turn within each round, medians reported, speedup = dense / sparse.

Run: python benchmarks/bench_to_sparse.py [--repeats 30] [--cases layer vit-mlp vit-s]
     [--threads 1 0]   (0: torch's default thread count)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_param import finalize, sparsify  # noqa: E402
from sparse_param.kernels import SparseLinear, to_sparse  # noqa: E402

DENSITIES = (0.02, 0.05, 0.1)


class MlpStack(nn.Module):
    def __init__(self, dim: int = 384, hidden: int = 1536, depth: int = 4) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(Mlp(dim, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return x


def timed(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2):
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def report(case: str, density: float, threads: int, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["dense"])
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = statistics.median(d / s for d, s in zip(times["dense"], ts))
        print(
            f"{case:<8} {density:>5} {threads:>3} {name:<28} {med * 1e3:9.2f} "
            f"{base / med:7.2f} {paired:7.2f}"
        )


def layer_case(density: float, threads: int, repeats: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(768, 3072)
    sparsify(linear, density, distribution="uniform")
    sparse_layer = to_sparse(nn.Sequential(copy.deepcopy(linear)))[0]
    finalize(linear)
    assert isinstance(sparse_layer, SparseLinear)
    x = torch.randn(197, 768)
    w, b = linear.weight.detach(), linear.bias.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_csr = w.to_sparse_csr()
    one_call = copy.deepcopy(sparse_layer)
    one_call.block_tokens = 10**9
    fns = {
        "dense": lambda: linear(x),
        "to_sparse (SparseLinear)": lambda: sparse_layer(x),
        "addmm(b,csr,x.T).T, 1 call": lambda: one_call(x),
        "sparse.mm(csr,x.T).T+b": lambda: torch.sparse.mm(w_csr, x.T).T + b,
        "F.linear(x,csr,b)": lambda: F.linear(x, w_csr, b),
    }
    with torch.no_grad():
        expected = linear(x)
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), expected, atol=1e-4, rtol=1e-4, msg=name)
        report("layer", density, threads, timed(fns, repeats))


def model_case(case: str, density: float, threads: int, repeats: int) -> None:
    torch.manual_seed(0)
    if case == "vit-mlp":
        model, x = MlpStack(), torch.randn(4, 197, 384)
        exclude: list[str] = []
    else:
        model = timm.create_model("vit_small_patch16_224", pretrained=False)
        x, exclude = torch.randn(1, 3, 224, 224), ["patch_embed.*"]
    sparsify(model.eval(), density, distribution="uniform", exclude=exclude)
    sparse = to_sparse(copy.deepcopy(model))
    dense = finalize(model)
    fns = {"dense": lambda: dense(x), "to_sparse": lambda: sparse(x)}
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-4, rtol=1e-4)
        report(case, density, threads, timed(fns, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per form")
    parser.add_argument("--model-repeats", type=int, default=10, help="timed calls, models")
    parser.add_argument(
        "--cases",
        nargs="*",
        default=["layer", "vit-mlp"],
        choices=["layer", "vit-mlp", "vit-s"],
    )
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 0], help="0: default")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, default threads {default_threads}")
    print(
        f"{'case':<8} {'dens':>5} {'thr':>3} {'form':<28} {'median ms':>9} "
        f"{'speedup':>7} {'paired':>7}"
    )
    for threads in args.threads:
        threads = threads or default_threads
        torch.set_num_threads(threads)
        for case in args.cases:
            for density in DENSITIES:
                if case == "layer":
                    layer_case(density, threads, args.repeats)
                else:
                    model_case(case, density, threads, args.model_repeats)
    torch.set_num_threads(default_threads)
    print("speedup = median dense / median form; paired = median over rounds of dense/form")


if __name__ == "__main__":
    main()
