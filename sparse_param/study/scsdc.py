"""SC-SDC in miniature (Tessera, Hooker & Rosman 2021): sparse wide MLPs (Static and
RigL) against dense narrow MLPs of the same capacity (active weights), over several
capacities, all with PyTorch's default init.

Claim tested: at the same number of active connections, the sparse wide network
reaches a higher test accuracy than the dense narrow one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..capacity import same_capacity_dense
from ..sparsify import sparsify
from .common import against_noise, load_data, mean_std, mlp, std
from .loop import Run, TrainConfig, steps_per_run, train


@dataclass(frozen=True)
class ScsdcSize:
    wide: int = 256
    depth: int = 2
    pool: int = 2
    limit: int | None = None
    densities: tuple[float, ...] = (0.03, 0.1, 0.3)
    epochs: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)


SIZES = {
    "default": ScsdcSize(),
    "full": ScsdcSize(wide=1024, pool=1, densities=(0.01, 0.03, 0.1, 0.3), epochs=30),
    "tiny": ScsdcSize(wide=32, depth=1, pool=4, limit=256, densities=(0.3,), epochs=1, seeds=(0,)),
}
MODELS = ("dense narrow", "static wide", "rigl wide")


def run(out: Path, size: ScsdcSize, seeds: tuple[int, ...] | None = None) -> Path:
    """Train every capacity and model for every seed; write ``results.md`` and the plot."""
    size = replace(size, seeds=tuple(seeds)) if seeds else size
    data = load_data(size.pool, size.limit)
    base = TrainConfig(epochs=size.epochs, update_interval=50, drop_fraction=0.3)

    def factory(width: int) -> torch.nn.Module:
        return mlp(data.features, [width] * size.depth)

    results: dict[tuple[float, str], list[Run]] = {}
    matches: dict[float, tuple[int, int, int]] = {}  # density: dense width, target, count
    steps = steps_per_run(data, base) * runs_per_seed(size) * len(size.seeds)
    with tqdm(total=steps, desc="scsdc", unit="step") as bar:
        for d in size.densities:
            for seed in size.seeds:
                for name in MODELS:
                    bar.set_postfix_str(f"density {d} {name} seed {seed}")
                    torch.manual_seed(seed)
                    sparse = factory(size.wide)
                    sparsify(sparse, d, seed=seed, sparse_init=True)
                    if name == "dense narrow":
                        torch.manual_seed(seed)
                        match = same_capacity_dense(factory, sparse)
                        matches[d] = (match.width, match.target, match.count)
                        model, config = match.model, replace(base, method="dense")
                    else:
                        model, config = sparse, replace(base, method=name.split()[0])
                    results.setdefault((d, name), []).append(train(model, data, config, seed, bar))
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, matches, size, out)
    path = out / "results.md"
    path.write_text(_report(results, matches, size, data))
    return path


def runs_per_seed(size: ScsdcSize) -> int:
    return len(size.densities) * len(MODELS)


def _report(results: dict, matches: dict, size: ScsdcSize, data) -> str:
    lines = [
        "# SC-SDC in miniature: sparse wide vs dense narrow at the same capacity",
        "",
        f"MLPs {data.features}-({size.wide}×{size.depth} sparse | width×{size.depth} dense)-10 "
        f"on MNIST-5k ({len(data.x_train)} train / {len(data.x_test)} test), {size.epochs} "
        f"epochs of batch 64, SGD momentum 0.9 lr 0.05 cosine; RigL ΔT=50, drop 0.3. "
        f"Capacity = active Linear weights (biases not counted); the dense width is "
        f"`same_capacity_dense`'s nearest. Init: PyTorch's default for every model, the "
        f"sparse ones rescaled to each unit's active fan-in (`sparse_init=True`, the "
        f"variance-preserving form of the same scheme). Seeds {list(size.seeds)}; mean ± std.",
        "",
        "| sparse density | active weights | dense width (weights) | dense narrow (%) | "
        "static wide (%) | RigL wide (%) |",
        "|---|---|---|---|---|---|",
    ]
    for d in size.densities:
        width, target, count = matches[d]
        accs = [mean_std([r.accuracy for r in results[d, m]], 100) for m in MODELS]
        lines.append(f"| {d:g} | {target} | {width} ({count}) | " + " | ".join(accs) + " |")
    lines += ["", "## Claim: sparse wide beats dense narrow at the same capacity", ""]
    for d in size.densities:
        dense = [r.accuracy for r in results[d, "dense narrow"]]
        for name in MODELS[1:]:
            sparse = [r.accuracy for r in results[d, name]]
            gap = 100 * (statistics.mean(sparse) - statistics.mean(dense))
            spread = 100 * max(std(sparse), std(dense))
            verdict = against_noise(gap, spread)
            lines.append(
                f"- density {d:g}, {name}: {verdict} — {gap:+.2f} points vs dense narrow "
                f"(largest seed std {spread:.2f})."
            )
    lines += ["", "Plot: `scsdc_accuracy.png`."]
    return "\n".join(lines) + "\n"


def _plot(results: dict, matches: dict, size: ScsdcSize, out: Path) -> None:
    from ..plots import _figure, _finish

    fig, (ax,) = _figure(6, 4)
    xs = [matches[d][1] for d in size.densities]
    for i, name in enumerate(MODELS):
        runs = [[r.accuracy * 100 for r in results[d, name]] for d in size.densities]
        ax.errorbar(
            xs,
            [statistics.mean(r) for r in runs],
            yerr=[std(r) for r in runs],
            color=f"C{i}",
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set(xlabel="active weights (capacity)", ylabel="test accuracy (%)", xscale="log")
    _finish(fig, [ax], "same capacity: sparse wide vs dense narrow", out / "scsdc_accuracy.png")
