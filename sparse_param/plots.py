"""Plots of sparse training runs, shared by ``recipes/train.py`` and the demo.

Pure functions: plain data in (lists, dicts), one PNG out. They draw on a private
``matplotlib.figure.Figure`` with the Agg canvas, so they neither need a display nor touch
pyplot's global state or the backend of the caller. matplotlib is an optional
dependency (``pip install sparse_param[demo]``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "load_summary",
    "plot_allocation",
    "plot_curves",
    "plot_layer_density",
    "plot_training_curves",
]

Series = Mapping[str, Sequence[float]]


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _finish(fig, axes, title: str | None, path: str | os.PathLike) -> Path:
    """Grid and legend on every axis, the title, then save."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_training_curves(
    runs: Mapping[str, Series],
    path: str | os.PathLike,
    *,
    x: str = "epoch",
    accuracy: str = "accuracy",
    itop_rate: str = "itop_rate",
    density: str | None = "density",
    title: str | None = None,
) -> Path:
    """Accuracy (left) and in-time over-parameterization rate R_s (right) over training,
    one line per run.

    Args:
        runs: run label (e.g. the method) to its series: ``{x: [...], accuracy: [...],
            itop_rate: [...]}``, optionally ``density``, lists of equal length. A run
            without ``itop_rate`` (a dense baseline) is drawn in the accuracy panel only.
        path: the PNG to write (parent directories are created).
        x, accuracy, itop_rate, density: keys of the series; ``density`` (dotted, same
            colour, right panel) is skipped when None or missing.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not runs:
        raise ValueError("plot_training_curves: no runs to plot")
    fig, (ax_acc, ax_rs) = _figure(10, 4, ncols=2)
    for i, (label, series) in enumerate(runs.items()):
        if x not in series or accuracy not in series:
            raise KeyError(
                f"plot_training_curves: run {label!r} needs series {x!r} and {accuracy!r}"
            )
        color = f"C{i % 10}"
        xs = list(series[x])
        ax_acc.plot(xs, list(series[accuracy]), color=color, marker="o", ms=3, label=label)
        if itop_rate in series:
            ax_rs.plot(
                xs, list(series[itop_rate]), color=color, marker="o", ms=3, label=f"{label} R_s"
            )
        if density and density in series:
            ax_rs.plot(xs, list(series[density]), color=color, ls=":", label=f"{label} density")
    ax_acc.set(xlabel=x, ylabel=accuracy, title="accuracy")
    ax_rs.set(xlabel=x, ylabel="share of weights", title="R_s (ever active) and density")
    ax_rs.set_yscale("log")  # sparse runs sit near the density, dense ones at 1
    return _finish(fig, (ax_acc, ax_rs), title, path)


def plot_layer_density(
    allocations: Mapping[str, Mapping[str, float]] | Mapping[str, float],
    path: str | os.PathLike,
    *,
    numel: Mapping[str, int] | None = None,
    target: float | None = None,
    title: str | None = None,
) -> Path:
    """Per-layer density of one or more allocations, as bars in layer order.

    Args:
        allocations: either layer name to density (one allocation) or label to such a
            mapping (grouped bars, e.g. ``{"erk": ..., "uniform": ...}`` or
            ``{"allocated": ..., "final": ...}``). Layers are taken in the order of the
            first allocation.
        path: the PNG to write.
        numel: layer name to weight count, drawn as a grey line on a log axis on the
            right (where the parameters are).
        target: overall density, drawn as a dashed horizontal line.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not allocations:
        raise ValueError("plot_layer_density: nothing to plot")
    first = next(iter(allocations.values()))
    groups = {"density": allocations} if not isinstance(first, Mapping) else dict(allocations)
    names = list(next(iter(groups.values())))
    n, k = len(names), len(groups)
    fig, (ax,) = _figure(max(6.0, min(0.28 * n * max(k, 1) + 2, 24.0)), 4.5)
    width = 0.8 / k
    for j, (label, dens) in enumerate(groups.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
        ax.bar(
            xs,
            [float(dens.get(name, math.nan)) for name in names],
            width,
            label=label,
            color=f"C{j % 10}",
        )
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=max(4, 9 - n // 20))
    ax.set(ylabel="density (active / weights)", ylim=(0, 1.05), xlim=(-0.6, n - 0.4))
    ax.grid(axis="y", alpha=0.3)
    if numel:
        ax2 = ax.twinx()
        ax2.plot(
            range(n),
            [numel.get(name, math.nan) for name in names],
            color="0.4",
            marker=".",
            lw=1,
            label="weights",
        )
        ax2.set_yscale("log")
        ax2.set_ylabel("weights in layer")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "per-layer density")
    return _save(fig, path)


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[Sequence[float]]]],
    path: str | os.PathLike,
    *,
    x_label: str = "step",
    title: str | None = None,
) -> Path:
    """Accuracy and R_s over training per method, over several seeds.

    Args:
        curves: method to a list of runs (seeds), each a list of ``(x, accuracy, R_s)``
            points (x: step or epoch). Each method is drawn as the mean over its runs
            (at the x values of its first run), with a band from the lowest to the
            highest run; runs of different lengths are cut to the shortest.
        path: the PNG to write.
        x_label: label of the x axis.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not curves:
        raise ValueError("plot_curves: no curves to plot")
    fig, (ax_acc, ax_rs) = _figure(10, 4, ncols=2)
    for i, (method, runs) in enumerate(curves.items()):
        runs = [list(run) for run in runs if len(run)]
        if not runs:
            continue
        color = f"C{i % 10}"
        length = min(len(run) for run in runs)
        xs = [float(point[0]) for point in runs[0][:length]]
        for ax, column, suffix in ((ax_acc, 1, ""), (ax_rs, 2, " R_s")):
            values = [[float(run[j][column]) for run in runs] for j in range(length)]
            mean = [sum(v) / len(v) for v in values]
            label = f"{method}{suffix}" + (f" (n={len(runs)})" if len(runs) > 1 else "")
            ax.plot(xs, mean, color=color, marker="o", ms=3, label=label)
            if len(runs) > 1:
                ax.fill_between(
                    xs,
                    [min(v) for v in values],
                    [max(v) for v in values],
                    color=color,
                    alpha=0.2,
                    lw=0,
                )
    ax_acc.set(xlabel=x_label, ylabel="accuracy", title="accuracy")
    ax_rs.set(xlabel=x_label, ylabel="R_s (share of weights ever active)", title="R_s")
    ax_rs.set_yscale("log")  # sparse runs sit near the density, dense ones at 1
    return _finish(fig, (ax_acc, ax_rs), title, path)


def plot_allocation(
    allocation: Mapping[str, Mapping[str, int]],
    sizes: Mapping[str, int],
    path: str | os.PathLike,
    *,
    target: float | None = None,
    title: str | None = None,
) -> Path:
    """Per-layer density of allocations given as active counts.

    Args:
        allocation: distribution name to layer name to active count, e.g.
            ``{d: sparse_param.allocate(shapes, 0.02, d) for d in ("erk", "er", "uniform")}``.
        sizes: layer name to its number of weights.
        path: the PNG to write.
        target: overall density (dashed line); by default the first allocation's total
            active count over the total size.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not allocation:
        raise ValueError("plot_allocation: nothing to plot")
    densities = {
        label: {name: count / sizes[name] for name, count in counts.items()}
        for label, counts in allocation.items()
    }
    if target is None:
        first = next(iter(allocation.values()))
        target = sum(first.values()) / sum(sizes[name] for name in first)
    return plot_layer_density(
        densities, path, numel=sizes, target=target, title=title or "per-layer density"
    )


def load_summary(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read a timm-style ``summary.csv`` into columns of floats (empty cells as NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {key: [] for key in (rows[0] if rows else {})}
    for row in rows:
        for key in columns:
            value = row.get(key, "")
            try:
                columns[key].append(float(value))
            except (TypeError, ValueError):
                columns[key].append(math.nan)
    return columns
