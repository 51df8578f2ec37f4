"""Gradient flow in miniature (Tessera, Hooker & Rosman 2021): EGF over training for a
sparse wide MLP (Static, random ERK mask) and the dense narrow MLP of the same capacity,
under SGD vs Adam, ReLU vs Swish vs PReLU, with and without BatchNorm.

Claims tested:
1. BatchNorm helps sparse networks more than dense ones (accuracy gain from BN).
2. With SGD, Swish and PReLU do better than ReLU for sparse networks.
3. Adam (an EWMA optimizer) gives sparse networks a higher gradient flow than SGD.
4. EGF correlates with final accuracy better than the plain gradient norm ‖g‖₂ does
   (Kendall τ over the configurations, per network type).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..capacity import same_capacity_dense
from ..sparsify import sparsify
from .common import against_noise, kendall_tau, load_data, mean_std, mlp, std
from .loop import Run, TrainConfig, steps_per_run, train


@dataclass(frozen=True)
class GradflowSize:
    wide: int = 256
    depth: int = 2
    density: float = 0.1
    pool: int = 2
    limit: int | None = None
    epochs: int = 10
    egf_every: int = 10
    optimizers: tuple[str, ...] = ("sgd", "adam")
    activations: tuple[str, ...] = ("relu", "swish", "prelu")
    seeds: tuple[int, ...] = (0, 1)


SIZES = {
    "default": GradflowSize(),
    "full": GradflowSize(wide=1024, depth=3, density=0.05, pool=1, epochs=30, seeds=(0, 1, 2)),
    "tiny": GradflowSize(
        wide=32,
        depth=1,
        density=0.3,
        pool=4,
        limit=256,
        epochs=1,
        egf_every=2,
        activations=("relu", "swish"),
        optimizers=("sgd", "adam"),
        seeds=(0,),
    ),
}
NETWORKS = ("sparse", "dense")

Key = tuple[str, str, str, bool]  # network, optimizer, activation, batchnorm


def run(out: Path, size: GradflowSize, seeds: tuple[int, ...] | None = None) -> Path:
    """Train every configuration for every seed; write ``results.md`` and the plots."""
    size = replace(size, seeds=tuple(seeds)) if seeds else size
    data = load_data(size.pool, size.limit)
    base = TrainConfig(epochs=size.epochs, egf_every=size.egf_every)
    keys = _keys(size)
    results: dict[Key, list[Run]] = {}
    widths: dict[bool, int] = {}
    with tqdm(
        total=steps_per_run(data, base) * len(keys) * len(size.seeds), desc="gradflow", unit="step"
    ) as bar:
        for key in keys:
            net, opt, act, bn = key
            for seed in size.seeds:
                bar.set_postfix_str(f"{net} {opt} {act}{' bn' if bn else ''} seed {seed}")

                def factory(width: int, act=act, bn=bn) -> torch.nn.Module:
                    return mlp(data.features, [width] * size.depth, activation=act, batchnorm=bn)

                torch.manual_seed(seed)
                model = factory(size.wide)
                sparsify(model, size.density, seed=seed, sparse_init=True)
                method = "static"
                if net == "dense":
                    torch.manual_seed(seed)
                    match = same_capacity_dense(factory, model)
                    model, method, widths[bn] = match.model, "dense", match.width
                config = replace(base, method=method, optimizer=opt)
                results.setdefault(key, []).append(train(model, data, config, seed, bar))
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, size, out)
    path = out / "results.md"
    path.write_text(_report(results, widths, size, data))
    return path


def _keys(size: GradflowSize) -> list[Key]:
    """Every configuration: network × optimizer × activation × BatchNorm off / on."""
    return list(itertools.product(NETWORKS, size.optimizers, size.activations, (False, True)))


def runs_per_seed(size: GradflowSize) -> int:
    return len(_keys(size))


def _mean_egf(run: Run) -> float:
    return statistics.mean(egf for _, egf, _ in run.gradient_curve)


def _mean_norm(run: Run) -> float:
    return statistics.mean(norm for _, _, norm in run.gradient_curve)


def _acc(results: dict, key: Key) -> float:
    return statistics.mean(r.accuracy for r in results[key])


def _report(results: dict, widths: dict, size: GradflowSize, data) -> str:
    lines = [
        "# Gradient flow in miniature: EGF of sparse and dense MLPs",
        "",
        f"Sparse: MLP {data.features}-{size.wide}×{size.depth}-10, Static random ERK mask at "
        f"density {size.density}, init rescaled to each unit's active fan-in "
        f"(`sparse_init=True`). Dense: the same MLP at the same capacity (width "
        f"{widths.get(False, '?')}, {widths.get(True, '?')} with BatchNorm). MNIST-5k "
        f"({len(data.x_train)} train / {len(data.x_test)} test), {size.epochs} epochs of batch "
        f"64, cosine lr (SGD momentum 0.9 lr 0.05; Adam lr 1e-3). EGF = mean over layers of "
        f"‖g_l‖₂ / n_l at the active weights (Tessera et al. 2021, Sec. 3), measured every "
        f"{size.egf_every} steps and averaged over training; ‖g‖₂ = plain gradient norm over "
        f"all parameters. Seeds {list(size.seeds)}; mean ± std.",
        "",
        "| network | optimizer | activation | BatchNorm | test accuracy (%) | mean EGF | "
        "mean ‖g‖₂ |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        net, opt, act, bn = key
        lines.append(
            f"| {net} | {opt} | {act} | {'yes' if bn else 'no'} | "
            f"{mean_std([r.accuracy for r in runs], 100)} | "
            f"{statistics.mean(map(_mean_egf, runs)):.3e} | "
            f"{statistics.mean(map(_mean_norm, runs)):.3f} |"
        )
    lines += ["", "## Claims", ""]
    lines += _claims(results, size)
    lines += ["", "Plots: `gradflow_egf_curves.png`, `gradflow_correlation.png`."]
    return "\n".join(lines) + "\n"


def _claims(results: dict, size: GradflowSize) -> list[str]:
    lines = []
    # 1. BatchNorm gain, sparse vs dense
    gains = {
        net: statistics.mean(
            _acc(results, (net, o, a, True)) - _acc(results, (net, o, a, False))
            for o in size.optimizers
            for a in size.activations
        )
        for net in NETWORKS
    }
    noise = statistics.mean(std([r.accuracy for r in rs]) for rs in results.values())
    lines.append(
        f"- **Claim 1 (BatchNorm matters more for sparse):** "
        f"{against_noise(gains['sparse'] - gains['dense'], noise)} — mean accuracy gain from "
        f"BatchNorm {100 * gains['sparse']:+.2f} points sparse vs {100 * gains['dense']:+.2f} "
        f"dense (over optimizers and activations; mean seed std of a configuration "
        f"{100 * noise:.2f})."
    )
    # 2. Swish / PReLU vs ReLU, sparse, SGD
    if "sgd" in size.optimizers and "relu" in size.activations:
        for act in (a for a in size.activations if a != "relu"):
            diff = statistics.mean(
                _acc(results, ("sparse", "sgd", act, bn))
                - _acc(results, ("sparse", "sgd", "relu", bn))
                for bn in (False, True)
            )
            lines.append(
                f"- **Claim 2 ({act} beats ReLU, sparse, SGD):** {against_noise(diff, noise)} — "
                f"{100 * diff:+.2f} points (mean over BatchNorm on/off)."
            )
    # 3. Adam vs SGD gradient flow, sparse
    if set(size.optimizers) >= {"sgd", "adam"}:
        pairs = [
            (_mean_egf(adam), _mean_egf(sgd))
            for a in size.activations
            for bn in (False, True)
            for adam, sgd in zip(results["sparse", "adam", a, bn], results["sparse", "sgd", a, bn])
        ]
        wins = sum(adam > sgd for adam, sgd in pairs)
        verdict = "holds" if wins == len(pairs) else "does not hold" if not wins else "partly holds"
        lines.append(
            f"- **Claim 3 (Adam: higher gradient flow in sparse networks):** {verdict} — "
            f"Adam's mean EGF is higher in {wins}/{len(pairs)} paired runs (same activation, "
            f"BatchNorm and seed); overall {statistics.mean(p[0] for p in pairs):.3e} vs "
            f"{statistics.mean(p[1] for p in pairs):.3e} with SGD."
        )
    # 4. Kendall τ of EGF and of ‖g‖₂ with accuracy, per network type, over all runs
    for net in NETWORKS:
        runs = [r for key, rs in results.items() if key[0] == net for r in rs]
        acc = [r.accuracy for r in runs]
        tau_egf = kendall_tau([_mean_egf(r) for r in runs], acc)
        tau_norm = kendall_tau([_mean_norm(r) for r in runs], acc)
        lines.append(
            f"- **Claim 4 ({net}: EGF correlates better with accuracy than ‖g‖₂):** "
            f"{_verdict(abs(tau_egf) > abs(tau_norm), tau_egf, tau_norm)} — Kendall τ "
            f"{tau_egf:+.2f} for EGF vs {tau_norm:+.2f} for ‖g‖₂ over {len(runs)} runs "
            f"(compared by |τ|)."
        )
    return lines


def _verdict(claim: bool, *taus: float) -> str:
    if any(math.isnan(t) for t in taus):
        return "inconclusive (an accuracy or measure is constant)"
    return "holds" if claim else "does not hold"


def _plot(results: dict, size: GradflowSize, out: Path) -> None:
    from ..plots import _figure, _finish

    panels = [(net, opt) for net in NETWORKS for opt in size.optimizers]
    fig, axes = _figure(3.4 * len(panels), 3.2, ncols=len(panels))
    for ax, (net, opt) in zip(axes, panels):
        for i, (act, bn) in enumerate(itertools.product(size.activations, (False, True))):
            runs = results[net, opt, act, bn]
            steps = [s for s, _, _ in runs[0].gradient_curve]
            mean = [
                statistics.mean(r.gradient_curve[j][1] for r in runs) for j in range(len(steps))
            ]
            ax.plot(
                steps,
                mean,
                color=f"C{i // 2}",
                ls="-" if bn else "--",
                label=f"{act}{' + BN' if bn else ''}",
            )
        ax.set(xlabel="step", ylabel="EGF", title=f"{net}, {opt}", yscale="log")
    _finish(
        fig,
        axes,
        "effective gradient flow over training (dashed: no BatchNorm)",
        out / "gradflow_egf_curves.png",
    )

    fig, axes = _figure(9, 3.8, ncols=2)
    for ax, (label, measure) in zip(axes, (("mean EGF", _mean_egf), ("mean ‖g‖₂", _mean_norm))):
        for i, net in enumerate(NETWORKS):
            runs = [r for key, rs in results.items() if key[0] == net for r in rs]
            ax.scatter(
                [measure(r) for r in runs],
                [100 * r.accuracy for r in runs],
                color=f"C{i}",
                s=14,
                label=net,
            )
        ax.set(xlabel=label, ylabel="test accuracy (%)", xscale="log")
    _finish(
        fig,
        axes,
        "final accuracy against gradient flow (one point per run)",
        out / "gradflow_correlation.png",
    )
