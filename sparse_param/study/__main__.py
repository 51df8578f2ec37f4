"""``python -m sparse_param.study {itop,scsdc,gradflow} --out DIR [--full] [--seeds ...]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import STUDIES


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_param.study", description=__doc__.split("``")[0] or None
    )
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", type=Path, required=True, help="folder for results.md and PNGs")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true", help="the larger setting (hours)")
    sizes.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CI: seconds
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the size's)")
    args = parser.parse_args(argv)
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
